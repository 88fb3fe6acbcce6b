//! `shadowkv eval` on the CPU path with the built-in SmolLM2 (fetched by tools/setup.sh):
//! a tiny grid writes its markdown, JSON and heatmaps, and bad input is refused clearly.
use std::path::PathBuf;

#[path = "support/cli.rs"]
mod support;
use support::shadowkv;

fn out_dir(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("shadowkv-eval-{name}-{}", std::process::id()))
}

/// Two short prompts (about 320 tokens), full attention and one small ShadowKV setting.
#[test]
fn a_tiny_cpu_eval_writes_markdown_json_and_heatmaps() {
    let out = out_dir("tiny");
    let (ok, stdout, stderr) = shadowkv(&[
        "eval",
        "--device",
        "cpu",
        "--tasks",
        "niah-number,vt",
        "--lengths",
        "320",
        "--depths",
        "50",
        "--budgets",
        "64",
        "--ranks",
        "32",
        "--outliers",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("| niah-number |") && stdout.contains("S64 r32 c8 o4 bf16 host"),
        "{stdout}"
    );
    let markdown = std::fs::read_to_string(out.join("eval.md")).unwrap();
    assert_eq!(markdown, stdout);
    assert!(markdown.contains("falls off"), "{markdown}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval.json")).unwrap()).unwrap();
    let outcomes = json["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 4, "2 prompts x 2 modes");
    for outcome in outcomes {
        let tokens = outcome["prompt_tokens"].as_u64().unwrap();
        assert!((250..=320).contains(&tokens), "{outcome}");
        let score = outcome["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{outcome}");
    }
    let shadow = &json["modes"][1];
    let recall = shadow["layers"]["recall"].as_array().unwrap();
    assert_eq!(recall.len(), 30, "a recall summary per layer");
    let mean = recall[0]["mean"].as_f64().unwrap();
    assert!(mean > 0.0 && mean <= 1.0 + 1e-6, "{shadow}");
    assert_eq!(shadow["layers"]["hit_rate"].as_array().unwrap().len(), 30);
    for name in ["heatmap-full.png", "heatmap-S64-r32-c8-o4-bf16-host.png"] {
        let png = std::fs::read(out.join(name)).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{name}");
    }
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn bad_eval_input_is_refused_with_a_clear_error() {
    let out = out_dir("bad");
    let out = out.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--tasks", "niah-number,haystack"],
            "unknown task \"haystack\"",
        ),
        (
            &["--lengths", "100000"],
            "longer than the model supports (8192 tokens)",
        ),
        (
            &["--lengths", "512", "--budgets", "1024"],
            "sparse budget 1024 tokens is not smaller",
        ),
        (&["--depths", "150"], "outside 0 to 100%"),
        (&["--value-formats", "int4"], "GPU"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["eval", "--device", "cpu", "--out", out];
        args.extend_from_slice(extra);
        let (ok, _, stderr) = shadowkv(&args);
        assert!(!ok, "{extra:?} was accepted");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
    let (ok, _, stderr) = shadowkv(&["eval", "--tasks", "nope"]);
    assert!(!ok && stderr.contains("niah-number, niah-word"), "{stderr}");
    let (ok, stdout, _) = shadowkv(&["eval", "--help"]);
    assert!(ok && stdout.contains("CPU path only"), "{stdout}");
}
