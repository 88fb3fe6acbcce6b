//! Greedy sampling on the GPU: the index of the largest logit of each row (the lowest index
//! among equal values; NaNs never win), so a greedy decode step copies 4 bytes per sequence
//! back instead of a vocabulary of logits.

/// Threads per block (one block per row).
pub const THREADS: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ArgmaxParams {
    /// f32 `[rows, vocab]`.
    pub logits: u64,
    /// u32 `[rows]`.
    pub out: u64,
    pub rows: u32,
    pub vocab: u32,
}

pub const ARGMAX_KERNEL: &str = "argmax_rows";

/// Shared memory of [`ARGMAX_KERNEL`]: each warp's best value and index.
pub const ARGMAX_SHARED_BYTES: u32 = THREADS / 32 * 8;

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::device::*;

    /// The better of two (value, index) candidates: larger value, then lower index.
    #[inline(always)]
    fn better(a: (f32, u32), b: (f32, u32)) -> (f32, u32) {
        if b.0 > a.0 || (b.0 == a.0 && b.1 < a.1) {
            b
        } else {
            a
        }
    }

    /// # Safety
    /// The host checked `logits` and `out` against `rows` and `vocab` and launched one block
    /// of [`THREADS`] per row with [`ARGMAX_SHARED_BYTES`] of dynamic shared memory.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn argmax_rows(p: ArgmaxParams) {
        let row = block_idx_x();
        if row >= p.rows {
            return;
        }
        let logits = (p.logits as *const f32).add(row as usize * p.vocab as usize);
        let mut best = (f32::NEG_INFINITY, u32::MAX);
        let mut i = thread_idx_x();
        while i < p.vocab {
            best = better(best, (*logits.add(i as usize), i));
            i += THREADS;
        }
        let mut mask = 16;
        while mask > 0 {
            let other = (
                shuffle_xor_f32(best.0, mask),
                shuffle_xor_f32(f32::from_bits(best.1), mask).to_bits(),
            );
            best = better(best, other);
            mask >>= 1;
        }
        let scratch = dynamic_shared::<(f32, u32)>();
        if lane_id() == 0 {
            *scratch.add(warp_id() as usize) = best;
        }
        sync_threads();
        if thread_idx_x() == 0 {
            let mut w = 1;
            while w < THREADS / 32 {
                best = better(best, *scratch.add(w as usize));
                w += 1;
            }
            // A row of NaNs or -inf only: index 0 rather than an id past the vocabulary.
            *(p.out as *mut u32).add(row as usize) = if best.1 < p.vocab { best.1 } else { 0 };
        }
    }
}
