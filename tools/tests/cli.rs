//! The `shadowkv` command line on the CPU path (the built-in SmolLM2 that tools/setup.sh
//! fetches): it generates, says which path ran, explains its options, and rejects bad input
//! with a clear message and a non-zero exit.

#[path = "support/cli.rs"]
mod support;
use support::shadowkv;

#[test]
fn generate_on_the_cpu_path_answers_and_reports_its_rates() {
    let (ok, stdout, stderr) = shadowkv(&[
        "generate",
        "--device",
        "cpu",
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "10",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Paris"), "{stdout}");
    assert!(
        stderr.contains("CPU reference path") && stderr.contains("tokens/s"),
        "{stderr}"
    );
}

#[test]
fn several_prompts_are_served_together_with_prefixed_lines() {
    let dir = std::env::temp_dir().join(format!("shadowkv-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts = dir.join("prompts.txt");
    std::fs::write(
        &prompts,
        "What is the capital of France?\n\nWhat is the capital\nof Italy?\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = shadowkv(&[
        "generate",
        "--device",
        "cpu",
        "--prompts",
        prompts.to_str().unwrap(),
        "--prompt",
        "Say hello.",
        "--max-tokens",
        "8",
        "--prefill-budget",
        "16",
    ]);
    std::fs::remove_dir_all(&dir).ok();
    assert!(ok, "{stderr}");
    // Index 0 is the --prompt one; the file's prompts follow.
    let text = |index: usize| -> String {
        let prefix = format!("[{index}] ");
        stdout
            .lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(text(1).contains("Paris"), "{stdout}");
    // The two-line prompt arrives whole: SmolLM2 answers it (in its own way) about Italy.
    assert!(text(2).contains("Italy"), "{stdout}");
    assert!(!text(0).is_empty(), "{stdout}");
    assert!(stdout.lines().all(|line| line.starts_with('[')), "{stdout}");
    for index in 0..3 {
        assert!(
            stderr.contains(&format!("[{index}] prompt ")),
            "no summary of {index}: {stderr}"
        );
    }
    assert!(stderr.contains("3 prompts"), "{stderr}");
}

#[test]
fn help_explains_every_option() {
    let (ok, stdout, _) = shadowkv(&["generate", "--help"]);
    assert!(ok);
    for option in [
        "--model",
        "--prompt",
        "--prompt-file",
        "--prompts",
        "--prefill-budget",
        "--raw",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--seed",
        "--attention",
        "--device",
        "--chunk-size",
        "--sparse-budget",
        "--rank",
        "--local-chunks",
        "--outlier-chunks",
    ] {
        assert!(stdout.contains(option), "generate --help lacks {option}");
    }
    let (ok, stdout, _) = shadowkv(&["bench", "--help"]);
    assert!(
        ok && stdout.contains("SYNTHETIC CONTEXT") && stdout.contains("--batch"),
        "{stdout}"
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let cases: [(&[&str], &str); 4] = [
        (&["generate", "--device", "cpu"], "--prompt"),
        (
            &[
                "generate",
                "--device",
                "cpu",
                "--prompt",
                "hi",
                "--attention",
                "shadowkv",
                "--rank",
                "100",
            ],
            "rank 100",
        ),
        (
            &[
                "generate",
                "--device",
                "cpu",
                "--prompt",
                "hi",
                "--temperature=-1",
            ],
            "temperature",
        ),
        (
            &[
                "generate",
                "--device",
                "cpu",
                "--prompt",
                "hi",
                "--model",
                "/nonexistent.gguf",
            ],
            "/nonexistent.gguf",
        ),
    ];
    for (args, expected) in cases {
        let (ok, _, stderr) = shadowkv(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A prompt shorter than the sparse budget is no error: it keeps exact attention.
    let short = [
        "generate",
        "--device",
        "cpu",
        "--prompt",
        "hi",
        "--attention",
        "shadowkv",
        "--max-tokens",
        "2",
    ];
    let (ok, _, stderr) = shadowkv(&short);
    assert!(ok, "{short:?} failed: {stderr}");
}

/// `--value-format` takes bf16, fp8 or int4 (another name is clap's error listing them), and
/// `plan` shows the batch each format fits: int4 at least 3x bf16's with host memory the
/// limit (Llama-3-8B, 122K tokens, 128 GiB of host memory).
#[test]
fn value_formats_are_named_and_plan_shows_the_batch_of_each() {
    let (ok, _, stderr) = shadowkv(&[
        "plan",
        "--gpu-gib",
        "139",
        "--host-gib",
        "128",
        "--value-format",
        "fp4",
    ]);
    assert!(!ok);
    for expected in ["fp4", "bf16", "fp8", "int4"] {
        assert!(stderr.contains(expected), "{stderr}");
    }
    let (ok, stdout, stderr) = shadowkv(&["plan", "--gpu-gib", "400", "--host-gib", "128"]);
    assert!(ok, "{stderr}");
    println!("{stdout}");
    let batch = |label: &str| -> usize {
        let line = stdout
            .lines()
            .find(|l| l.contains(label))
            .unwrap_or_else(|| panic!("no {label:?} line in {stdout}"));
        let after = &line[line.find("batch").unwrap() + "batch".len()..];
        after.split_whitespace().next().unwrap().parse().unwrap()
    };
    let bf16 = batch("values on host, bf16");
    let fp8 = batch("values on host, fp8");
    let int4 = batch("values on host, int4");
    assert!(bf16 > 0 && fp8 > bf16 && int4 >= 3 * bf16, "{stdout}");
    let (ok, stdout, _) = shadowkv(&[
        "plan",
        "--gpu-gib",
        "400",
        "--host-gib",
        "128",
        "--value-format",
        "int4",
        "--attention",
        "shadowkv",
    ]);
    assert!(
        ok && stdout.contains("values on host, int4") && !stdout.contains("values on host, bf16"),
        "{stdout}"
    );
    // The CPU path keeps bf16 values: a compressed format there is an error.
    let (ok, _, stderr) = shadowkv(&[
        "generate",
        "--device",
        "cpu",
        "--prompt",
        "hi",
        "--attention",
        "shadowkv",
        "--value-format",
        "fp8",
    ]);
    assert!(!ok && stderr.contains("--value-format fp8"), "{stderr}");
}

/// `bandwidth --help` defines the metric; a bad axis value is refused before anything runs;
/// without a GPU the sweep says so and exits non-zero; on a GPU a one-configuration sweep
/// writes a measured CSV row and the chart (the quick grid is `gpu-bundle/run.sh values`).
#[test]
fn bandwidth_explains_its_metric_and_needs_a_gpu() {
    let (ok, stdout, _) = shadowkv(&["bandwidth", "--help"]);
    assert!(ok, "{stdout}");
    for expected in [
        "Equivalent bandwidth",
        "full attention",
        "--quick",
        "--hit-rates",
    ] {
        assert!(stdout.contains(expected), "{expected}: {stdout}");
    }
    let (ok, _, stderr) = shadowkv(&["bandwidth", "--quick", "--hit-rates", "often"]);
    assert!(!ok && stderr.contains("selected"), "{stderr}");
    if !shadowkv::gpu_available() {
        let (ok, _, stderr) = shadowkv(&["bandwidth", "--quick"]);
        assert!(!ok, "succeeded without a GPU");
        assert!(stderr.contains("measures on a GPU"), "{stderr}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("shadowkv-bandwidth-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("sweep");
    let out_arg = out.to_str().unwrap();
    let (ok, stdout, stderr) = shadowkv(&[
        "bandwidth",
        "--contexts",
        "32K",
        "--batches",
        "1",
        "--hit-rates",
        "60",
        "--value-formats",
        "bf16",
        "--homes",
        "host",
        "--samples",
        "1",
        "--steps",
        "2",
        "--out",
        out_arg,
    ]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("equiv TB/s"), "{stdout}");
    let csv = std::fs::read_to_string(out.with_extension("csv")).unwrap();
    let row = csv.lines().nth(1).expect("a row");
    assert!(row.starts_with("host,bf16,32768,1,1,false,0.6,"), "{row}");
    // A measured row leaves the last column (why it was skipped) empty.
    assert!(row.ends_with(','), "{row}");
    assert!(std::fs::metadata(out.with_extension("png")).unwrap().len() > 1000);
    std::fs::remove_dir_all(&dir).unwrap();
}
