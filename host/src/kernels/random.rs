//! Launcher of the deterministic random fill (see `shadowkv_kernels::random`).
use cudarc::driver::{CudaStream, DevicePtrMut};
use half::bf16;
pub use shadowkv_kernels::random as kernel_layout;
use shadowkv_kernels::random::{self as layout, RandomParams};

use crate::error::{invalid, Result};
use crate::gpu::{grid_for, Gpu, LaunchBuffers};
use crate::ptx;

/// Fills `out` with values uniform in `[offset - scale, offset + scale)`, element `i` a
/// function of `(seed, i)` only ([`kernel_layout::value`], rounded to bf16).
pub fn fill(
    gpu: &Gpu,
    stream: &CudaStream,
    out: &mut impl DevicePtrMut<bf16>,
    seed: u64,
    scale: f32,
    offset: f32,
) -> Result<()> {
    if !(scale.is_finite() && offset.is_finite()) {
        return Err(invalid(
            "fill",
            format!("scale {scale}, offset {offset}"),
            "finite values",
        ));
    }
    let len = out.len();
    if len == 0 {
        return Ok(());
    }
    let mut used = LaunchBuffers::new(stream);
    let params = RandomParams {
        out: used.write(out),
        len: len as u64,
        seed,
        scale,
        offset,
    };
    let launch = grid_for(len, layout::THREADS, 4 * 65_536);
    // SAFETY: the kernel writes elements below `len`, the length of `out`.
    unsafe { gpu.launch(stream, ptx::FILL_RANDOM_BF16, launch, params) }
}
