//! `--value-tier-gib` on the command line without a GPU: `plan` prints the batch a value tier
//! leaves and its chunks per KV head; a tier of no size, one that does not fit and one where it
//! cannot apply are clear errors.

#[path = "support/cli.rs"]
mod support;
use support::shadowkv;

const PLAN: [&str; 7] = [
    "plan",
    "--gpu-gib",
    "139",
    "--host-gib",
    "1000",
    "--attention",
    "shadowkv",
];

/// The batch on a `plan` line containing `label`.
fn batch(stdout: &str, label: &str) -> usize {
    let line = stdout
        .lines()
        .find(|l| l.contains(label))
        .unwrap_or_else(|| panic!("no {label:?} line in {stdout}"));
    let after = &line[line.find("batch").unwrap() + "batch".len()..];
    after.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn plan_shows_the_batch_beside_a_value_tier() {
    let args: Vec<&str> = PLAN
        .iter()
        .copied()
        .chain(["--value-format", "int4", "--value-tier-gib", "20"])
        .collect();
    let (ok, stdout, stderr) = shadowkv(&args);
    assert!(ok, "{stderr}");
    println!("{stdout}");
    let plain = batch(&stdout, "values on host, int4");
    let tiered = batch(&stdout, "host + tier, int4");
    assert!(0 < tiered && tiered < plain, "{stdout}");
    assert!(stdout.contains("chunks per KV head"), "{stdout}");
}

#[test]
fn bad_tiers_are_clear_errors() {
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        PLAN.iter().copied().chain(extra.iter().copied()).collect()
    };
    let cases: [(Vec<&str>, &str); 4] = [
        (with(&["--value-tier-gib", "0"]), "a positive size"),
        (with(&["--value-tier-gib=-3"]), "a positive size"),
        (with(&["--value-tier-gib", "400"]), "are left for it"),
        (
            vec![
                "generate",
                "--device",
                "cpu",
                "--prompt",
                "hi",
                "--attention",
                "shadowkv",
                "--value-tier-gib",
                "1",
            ],
            "--value-tier-gib",
        ),
    ];
    for (args, expected) in cases {
        let (ok, _, stderr) = shadowkv(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
