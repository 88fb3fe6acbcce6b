//! Shared helpers for the workspace tests and benches: random inputs, poisoned buffers and
//! the GPU test harness that reports GPU tests as ignored (with the reason) on machines
//! without one, so they never pass silently.
use std::sync::OnceLock;

use half::bf16;
use rand::Rng;
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::{Gpu, Result};

/// A NaN that marks every element a kernel should have written.
pub const POISON: bf16 = bf16::from_bits(0x7fc1);

/// `n` values uniform in `[-scale, scale)`, rounded to bf16.
pub fn random_bf16(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.gen_range(-scale..scale)))
        .collect()
}

/// A device buffer of `n` poisoned values.
pub fn poisoned(gpu: &Gpu, n: usize) -> Result<CudaSlice<bf16>> {
    Ok(gpu.stream().clone_htod(&vec![POISON; n])?)
}

/// bf16 values widened for comparison.
pub fn to_f64(values: &[bf16]) -> Vec<f64> {
    values.iter().map(|v| v.to_f64()).collect()
}

/// The GPU of this process, or why there is none.
pub fn shared_gpu() -> std::result::Result<&'static Gpu, String> {
    static GPU: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new(0).map_err(|error| error.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// A GPU test: gets the device, returns a message on failure.
pub type GpuTest = fn(&Gpu) -> std::result::Result<(), String>;

/// Runs GPU tests under libtest-mimic. Without a GPU each one is reported as ignored and the
/// reason is printed, so `cargo test` shows "N ignored" rather than N silent passes.
pub fn run_gpu_tests(tests: &[(&'static str, GpuTest)]) -> ! {
    let arguments = libtest_mimic::Arguments::from_args();
    let gpu = shared_gpu();
    match &gpu {
        Ok(gpu) => eprintln!(
            "GPU tests on {} ({} multiprocessors)",
            gpu.info().name,
            gpu.info().multiprocessors
        ),
        Err(reason) => eprintln!("GPU tests SKIPPED (reported as ignored): {reason}"),
    }
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            libtest_mimic::Trial::test(name, move || {
                let gpu = shared_gpu().map_err(|reason| format!("no GPU: {reason}"))?;
                test(gpu).map_err(Into::into)
            })
            .with_ignored_flag(gpu.is_err())
        })
        .collect();
    libtest_mimic::run(&arguments, trials).exit()
}
