//! Deterministic random fills for synthetic models and contexts: element `i` of a fill with
//! seed `s` is a function of `(s, i)` only (SplitMix64), so the host reproduces any element
//! and a fill is the same whatever the grid.

/// Threads per block.
pub const THREADS: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RandomParams {
    /// bf16 `[len]`.
    pub out: u64,
    pub len: u64,
    pub seed: u64,
    /// Values are uniform in `[offset - scale, offset + scale)`.
    pub scale: f32,
    pub offset: f32,
}

pub const KERNEL_NAME: &str = "fill_random_bf16";

/// SplitMix64's output for `seed` and `index`.
#[inline(always)]
pub fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Element `index` of the fill as f32 (before rounding to bf16): 24 random bits mapped to
/// `[-1, 1)`, then scaled and offset.
#[inline(always)]
pub fn value(seed: u64, index: u64, scale: f32, offset: f32) -> f32 {
    let unit = (mix(seed, index) >> 40) as f32 * (1.0 / (1u64 << 23) as f32) - 1.0;
    offset + scale * unit
}

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::device::*;

    /// # Safety
    /// `out` holds `len` bf16 values; any 1-D grid of [`THREADS`]-thread blocks.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn fill_random_bf16(p: RandomParams) {
        let stride = grid_dim_x() as u64 * THREADS as u64;
        let mut index = block_idx_x() as u64 * THREADS as u64 + thread_idx_x() as u64;
        while index < p.len {
            *(p.out as *mut u16).add(index as usize) =
                f32_to_bf16(value(p.seed, index, p.scale, p.offset));
            index += stride;
        }
    }
}
