//! Launcher of greedy sampling on the GPU (see `shadowkv_kernels::sampling`).
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
pub use shadowkv_kernels::sampling as kernel_layout;
use shadowkv_kernels::sampling::{self as layout, ArgmaxParams};

use crate::error::{check_len, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::ptx;

/// `out[r]` = the index of the largest of `logits[r, ..vocab]` (lowest among equals).
pub fn argmax(
    gpu: &Gpu,
    stream: &CudaStream,
    logits: &impl DevicePtr<f32>,
    vocab: usize,
    out: &mut impl DevicePtrMut<u32>,
) -> Result<()> {
    let rows = out.len();
    if vocab == 0 || vocab > u32::MAX as usize || rows == 0 || rows > i32::MAX as usize {
        return Err(invalid(
            "argmax",
            format!("{rows} rows of {vocab} logits"),
            "1 to 2^31 - 1 rows of 1 to 2^32 - 1 logits",
        ));
    }
    check_len(
        "logits",
        logits.len(),
        rows * vocab,
        "[rows, vocab] with one output per row",
    )?;
    let mut used = LaunchBuffers::new(stream);
    let params = ArgmaxParams {
        logits: used.read(logits),
        out: used.write(out),
        rows: rows as u32,
        vocab: vocab as u32,
    };
    let launch = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: layout::ARGMAX_SHARED_BYTES,
    };
    // SAFETY: `logits` holds `rows * vocab` values and `out` one per row (checked above).
    unsafe { gpu.launch(stream, ptx::ARGMAX_ROWS, launch, params) }
}
