//! Reference for [`crate::kernels::random`]: the same values, computed on the CPU.
use half::bf16;

use crate::kernels::random::kernel_layout::value;

/// Elements `first..first + len` of the fill with `seed`, `scale` and `offset`.
pub fn fill(first: u64, len: usize, seed: u64, scale: f32, offset: f32) -> Vec<bf16> {
    (first..first + len as u64)
        .map(|i| bf16::from_f32(value(seed, i, scale, offset)))
        .collect()
}
