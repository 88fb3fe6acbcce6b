//! Running the built `shadowkv` binary from the command-line tests.
use std::process::Command;

/// Runs `shadowkv` with `args`: whether it succeeded, its stdout and its stderr.
pub fn shadowkv(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_shadowkv"))
        .args(args)
        .output()
        .expect("the shadowkv binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
