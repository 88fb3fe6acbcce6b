//! Landmark scoring, pass two, and top-k chunk selection: one block per (sequence, KV head).
//!
//! 1. Merges `scoring`'s per-tile (max, sum) into each query head's softmax normaliser and
//!    writes `score = max over the group of exp2(logit - max_g) / sum_g` per landmark, to
//!    `scores` and, when the sequence's scores fit, to shared memory for the passes below.
//! 2. Radix-selects the `budget_chunks`-th largest score: scores are `>= 0`, so the 31 bits
//!    below the sign order like their values; three passes of 11, 10 and 10 bits (the first
//!    histogram is built while the scores are computed) narrow the threshold `T`.
//! 3. An ordered compaction writes the chunk ids of every score `> T` and of the first
//!    (lowest-index) scores `== T` until `budget_chunks` are taken, in landmark order, so the
//!    output is deterministic and a CPU reference can match it exactly. Each thread owns a
//!    contiguous run of landmarks, so one block-wide scan orders the whole output.

use crate::shadow::ShadowShape;

pub const WARPS: u32 = 16;
pub const THREADS: u32 = WARPS * 32;
/// Bits of each radix pass, from the top of the 31 value bits of a score.
pub const DIGIT_BITS: [u32; 3] = [11, 10, 10];
/// Bins of the largest histogram.
pub const MAX_BINS: u32 = 1 << 11;
/// Landmarks per thread whose logits are loaded before any is used (loads in flight).
pub const UNROLL: u32 = 8;
/// Most scores per sequence staged in shared memory (160 KiB; 40K landmarks is 320K tokens at
/// c = 8); longer sequences run the passes over `scores` in global memory.
pub const MAX_SHARED_SCORES: u32 = 40 * 1024;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TopkParams {
    pub shape: ShadowShape,
    /// f32 base-2 logits from `scoring`.
    pub logits: u64,
    /// f32 per-tile (max, sum) from `scoring`.
    pub tile_stats: u64,
    /// u32 chunk id of each landmark (see `shadow`).
    pub chunk_ids: u64,
    /// f32 scores out, one per landmark (see `shadow`).
    pub scores: u64,
    /// u32 `[batch, Hkv, budget_chunks]` selected chunk ids out, in landmark order.
    pub selection: u64,
    /// `scoring`'s grid x (the tile stride of `tile_stats`).
    pub max_tiles: u32,
    /// Scores the dynamic shared memory holds (see [`shared_bytes`]); a sequence with more
    /// landmarks works on `scores` in global memory.
    pub shared_scores: u32,
}

/// Scores staged in shared memory for a batch whose longest sequence has `max_landmarks`.
pub const fn shared_scores(max_landmarks: u32) -> u32 {
    if max_landmarks <= MAX_SHARED_SCORES {
        max_landmarks
    } else {
        0
    }
}

/// Shared memory: the histogram, the block-scan scratch, the per-head normalisers
/// (max, 1/sum), the selection state, then the staged scores.
pub const fn shared_bytes(group: u32, shared_scores: u32) -> u32 {
    (MAX_BINS + 32 + 2 * group + 4 + shared_scores) * 4
}

pub const KERNEL_NAME: &str = "topk_select";

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::block::{exclusive_sum, MAX_WARPS};
    use crate::device::*;
    use crate::scoring::{tile_stat_index, tiles};
    use crate::shadow::{slot_base, ShadowSequence};

    /// Finds the digit of the `remaining`-th largest score among the `bins` counted: writes
    /// the digit to `state[0]` and the count in higher bins to `state[1]`. Every thread
    /// calls it; thread `t` scans bins `bins - 1 - per * t` downwards.
    #[inline(always)]
    unsafe fn find_digit(
        histogram: *const u32,
        bins: u32,
        remaining: u32,
        scratch: *mut u32,
        state: *mut u32,
    ) {
        let per = bins / THREADS;
        let top = bins - 1 - per * thread_idx_x();
        let mut total = 0;
        for i in 0..per {
            total += *histogram.add((top - i) as usize);
        }
        let (mut above, _) = exclusive_sum(total, scratch);
        if above < remaining && remaining <= above + total {
            for i in 0..per {
                let count = *histogram.add((top - i) as usize);
                if above + count >= remaining {
                    *state = top - i;
                    *state.add(1) = above;
                    break;
                }
                above += count;
            }
        }
        sync_threads();
    }

    unsafe fn clear(histogram: *mut u32, bins: u32) {
        for bin in (thread_idx_x()..bins).step_by(THREADS as usize) {
            *histogram.add(bin as usize) = 0;
        }
    }

    /// # Safety
    /// The host launcher validated the layouts (every sequence has at least `budget_chunks`
    /// landmarks) and launched `(kv_heads, sequences)` blocks of [`THREADS`] with
    /// [`shared_bytes`] for `shared_scores`.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn topk_select(p: TopkParams) {
        let shape = &p.shape;
        let kv_head = block_idx_x();
        let sequence_index = shape.first_sequence + block_idx_y();
        let tid = thread_idx_x();
        let group = shape.group;
        let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
        let count = sequence.landmarks;
        let k = shape.budget_chunks;

        let histogram = dynamic_shared::<u32>();
        let scratch = histogram.add(MAX_BINS as usize);
        let normaliser = scratch.add(MAX_WARPS) as *mut f32;
        let state = normaliser.add(2 * group as usize) as *mut u32;
        let staged = state.add(4) as *mut f32;

        // 1. Each head's max and 1/sum over every tile of the sequence.
        if tid < group {
            let mut max = crate::attention::NO_SCORE;
            let stats = p.tile_stats as *const f32;
            let at = |tile| {
                tile_stat_index(
                    sequence_index,
                    kv_head,
                    tile,
                    tid,
                    shape.kv_heads,
                    p.max_tiles,
                    group,
                )
            };
            let tile_count = tiles(count);
            for tile in 0..tile_count {
                max = max_f32(max, *stats.add(at(tile)));
            }
            let mut sum = 0.0f32;
            for tile in 0..tile_count {
                sum += *stats.add(at(tile) + 1) * exp2(*stats.add(at(tile)) - max);
            }
            *normaliser.add(2 * tid as usize) = max;
            *normaliser.add(2 * tid as usize + 1) = reciprocal(sum);
        }
        clear(histogram, MAX_BINS);
        sync_threads();

        let base = sequence.landmark_base(kv_head) as usize;
        let scores = (p.scores as *mut f32).add(base);
        let in_shared = count <= p.shared_scores;
        // The passes below read the scores from here: shared memory, or `scores` itself.
        let working = if in_shared { staged } else { scores };
        let logits = p.logits as *const f32;
        let first_shift = 31 - DIGIT_BITS[0];
        let mut start = 0;
        while start < count {
            // All of this thread's `UNROLL` logits of a head are loaded before any is used.
            let mut score = [0.0f32; UNROLL as usize];
            for g in 0..group {
                let row = logits.add(sequence.logit_base(kv_head, group, g) as usize);
                let mut logit = [f32::NEG_INFINITY; UNROLL as usize];
                for (u, value) in logit.iter_mut().enumerate() {
                    let j = start + u as u32 * THREADS + tid;
                    if j < count {
                        *value = *row.add(j as usize);
                    }
                }
                let max = *normaliser.add(2 * g as usize);
                let inverse_sum = *normaliser.add(2 * g as usize + 1);
                for u in 0..UNROLL as usize {
                    score[u] = max_f32(score[u], exp2(logit[u] - max) * inverse_sum);
                }
            }
            for (u, &value) in score.iter().enumerate() {
                let j = start + u as u32 * THREADS + tid;
                if j < count {
                    *scores.add(j as usize) = value;
                    if in_shared {
                        *staged.add(j as usize) = value;
                    }
                    let digit = min_u32(value.to_bits() >> first_shift, MAX_BINS - 1);
                    atomic_add_shared_u32(histogram.add(digit as usize), 1);
                }
            }
            start += UNROLL * THREADS;
        }
        sync_threads();

        // 2. Radix select: after each pass, `prefix` holds the top bits of the threshold and
        //    `remaining` how many of the scores that share them are still to be taken.
        let (mut prefix, mut prefix_mask, mut remaining) = (0u32, 0u32, k);
        let mut shift = 31;
        for pass in 0..DIGIT_BITS.len() {
            let bins = 1 << DIGIT_BITS[pass];
            shift -= DIGIT_BITS[pass];
            find_digit(histogram, bins, remaining, scratch, state);
            let digit = *state;
            remaining -= *state.add(1);
            prefix |= digit << shift;
            prefix_mask |= (bins - 1) << shift;
            if pass + 1 == DIGIT_BITS.len() {
                break;
            }
            let next_bins = 1u32 << DIGIT_BITS[pass + 1];
            let next_shift = shift - DIGIT_BITS[pass + 1];
            // Every thread has read `state` (the barrier of the next `find_digit` or the one
            // below orders its next write after these reads).
            clear(histogram, next_bins);
            sync_threads();
            let mut j = tid;
            while j < count {
                let bits = (*working.add(j as usize)).to_bits();
                if bits & prefix_mask == prefix {
                    atomic_add_shared_u32(
                        histogram.add(((bits >> next_shift) & (next_bins - 1)) as usize),
                        1,
                    );
                }
                j += THREADS;
            }
            sync_threads();
        }
        let threshold = prefix;
        let needed_equal = remaining;

        // 3. Ordered compaction over each thread's contiguous run: every score above the
        //    threshold, and the first `needed_equal` equal to it.
        let per_thread = count.div_ceil(THREADS);
        let first = min_u32(tid * per_thread, count);
        let last = min_u32(first + per_thread, count);
        let (mut above, mut equal) = (0u32, 0u32);
        for j in first..last {
            let bits = (*working.add(j as usize)).to_bits();
            above += (bits > threshold) as u32;
            equal += (bits == threshold) as u32;
        }
        let (mut above_before, _) = exclusive_sum(above, scratch);
        let (mut equal_before, _) = exclusive_sum(equal, scratch);
        let chunk_ids = (p.chunk_ids as *const u32).add(base);
        let selection =
            (p.selection as *mut u32).add(slot_base(sequence_index, kv_head, shape.kv_heads, k));
        for j in first..last {
            let bits = (*working.add(j as usize)).to_bits();
            let position = if bits > threshold {
                above_before += 1;
                above_before - 1 + min_u32(equal_before, needed_equal)
            } else if bits == threshold {
                equal_before += 1;
                if equal_before > needed_equal {
                    continue;
                }
                above_before + equal_before - 1
            } else {
                continue;
            };
            if position < k {
                *selection.add(position as usize) = *chunk_ids.add(j as usize);
            }
        }
    }
}
