//! Builds `kernels-gpu` to PTX through `shadowkv-codegen` and generates `kernels.rs`.
use std::path::PathBuf;

fn main() {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernel_crate = manifest_dir.join("../kernels-gpu");
    println!(
        "cargo:rerun-if-changed={}",
        kernel_crate.join("src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        kernel_crate.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../codegen/src").display()
    );
    println!("cargo:rerun-if-env-changed=PTXAS");
    println!("cargo:rerun-if-env-changed=PATH");

    // `<target>/<profile>/build/<pkg>/out` -> `<target>/shadowkv-ptx`, shared by every profile
    // (one directory per architecture below it).
    let target_dir = out_dir
        .ancestors()
        .nth(4)
        .map(|target| target.join("shadowkv-ptx"))
        .unwrap_or_else(|| out_dir.join("shadowkv-ptx"));
    let config = shadowkv_codegen::BuildConfig {
        kernel_crate,
        target_dir,
        out_dir,
        cargo: std::env::var_os("CARGO")
            .map(PathBuf::from)
            .unwrap_or_else(|| "cargo".into()),
        rustc: std::env::var_os("RUSTC")
            .map(PathBuf::from)
            .unwrap_or_else(|| "rustc".into()),
        ptxas: shadowkv_codegen::find_ptxas(),
        launch_bounds: shadowkv_kernels::LAUNCH_BOUNDS
            .iter()
            .map(|&(prefix, threads)| (prefix.to_owned(), threads))
            .collect(),
    };
    match shadowkv_codegen::build(&config) {
        Ok(output) => {
            for module in &output.modules {
                match &module.resources {
                    Some(resources) => {
                        for kernel in resources {
                            println!("cargo:warning=ptxas {}: {kernel}", module.target.cpu);
                        }
                    }
                    None => println!(
                        "cargo:warning=ptxas not found (set PTXAS or put it on PATH): the {} PTX of {} kernels was not checked for spills",
                        module.target.cpu,
                        output.kernels.len()
                    ),
                }
            }
        }
        Err(error) => {
            eprintln!("error: building the GPU kernels failed: {error}");
            std::process::exit(1);
        }
    }
}
