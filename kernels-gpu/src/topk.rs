//! Landmark scoring, pass two, and top-k chunk selection: one block per (sequence, KV head).
//!
//! 1. Merges `scoring`'s per-tile (max, sum) into each query head's softmax normaliser and
//!    writes `score = max over the group of exp2(logit - max_g) / sum_g` per landmark.
//! 2. Radix-selects the `budget_chunks`-th largest score: scores are `>= 0`, so their bit
//!    patterns order like their values; four passes of 8 bits narrow the threshold `T`.
//! 3. An ordered compaction writes the chunk ids of every score `> T` and of the first
//!    (lowest-index) scores `== T` until `budget_chunks` are taken, in landmark order, so the
//!    output is deterministic and a CPU reference can match it exactly.

use crate::shadow::ShadowShape;

pub const WARPS: u32 = 16;
pub const THREADS: u32 = WARPS * 32;
/// Bits per radix pass and bins of its histogram.
pub const RADIX_BITS: u32 = 8;
pub const BINS: u32 = 1 << RADIX_BITS;

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
    pub _reserved: u32,
}

/// Shared memory: the histogram, the block-scan scratch, the per-head normalisers
/// (max, 1/sum) and the selection state.
pub const fn shared_bytes(group: u32) -> u32 {
    (BINS + 32 + 2 * group + 4) * 4
}

pub const KERNEL_NAME: &str = "topk_select";

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::attention::NO_SCORE;
    use crate::block::{exclusive_count, warp_inclusive_sum, MAX_WARPS};
    use crate::device::*;
    use crate::scoring::{tile_stat_index, tiles};
    use crate::shadow::{slot_base, ShadowSequence};

    /// # Safety
    /// The host launcher validated the layouts (every sequence has at least `budget_chunks`
    /// landmarks) and launched `(kv_heads, batch)` blocks of [`THREADS`] with
    /// [`shared_bytes`].
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn topk_select(p: TopkParams) {
        let shape = &p.shape;
        let kv_head = block_idx_x();
        let sequence_index = block_idx_y();
        let tid = thread_idx_x();
        let group = shape.group;
        let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
        let count = sequence.landmarks;
        let k = shape.budget_chunks;

        let histogram = dynamic_shared::<u32>();
        let scratch = histogram.add(BINS as usize);
        let normaliser = scratch.add(MAX_WARPS) as *mut f32;
        let state = normaliser.add(2 * group as usize) as *mut u32;

        // 1. Each head's max and 1/sum over every tile of the sequence.
        if tid < group {
            let mut max = NO_SCORE;
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
        for bin in (tid..BINS).step_by(THREADS as usize) {
            *histogram.add(bin as usize) = 0;
        }
        sync_threads();

        let base = sequence.landmark_base(kv_head) as usize;
        let scores = (p.scores as *mut f32).add(base);
        let mut j = tid;
        while j < count {
            let mut score = 0.0f32;
            for g in 0..group {
                let logit = *(p.logits as *const f32)
                    .add(sequence.logit_base(kv_head, group, g) as usize + j as usize);
                let weight = exp2(logit - *normaliser.add(2 * g as usize))
                    * *normaliser.add(2 * g as usize + 1);
                score = max_f32(score, weight);
            }
            *scores.add(j as usize) = score;
            atomic_add_shared_u32(histogram.add((score.to_bits() >> 24) as usize), 1);
            j += THREADS;
        }
        sync_threads();

        // 2. Radix select: after each pass, `prefix` holds the top bits of the threshold and
        //    `remaining` how many of the scores that share them are still to be taken.
        let (mut prefix, mut prefix_mask, mut remaining) = (0u32, 0u32, k);
        let mut pass = 0;
        loop {
            let shift = 24 - RADIX_BITS * pass;
            if warp_id() == 0 {
                // Lane l holds bins 255 - 8l ..= 248 - 8l, highest first.
                let lane = lane_id();
                let mut counts = [0u32; 8];
                let mut lane_total = 0;
                for (i, c) in counts.iter_mut().enumerate() {
                    *c = *histogram.add((BINS - 1 - (8 * lane + i as u32)) as usize);
                    lane_total += *c;
                }
                let inclusive = warp_inclusive_sum(lane_total);
                let mut above = inclusive - lane_total;
                if above < remaining && remaining <= inclusive {
                    for (i, c) in counts.iter().enumerate() {
                        if above + *c >= remaining {
                            *state = BINS - 1 - (8 * lane + i as u32);
                            *state.add(1) = above;
                            break;
                        }
                        above += *c;
                    }
                }
            }
            sync_threads();
            let digit = *state;
            remaining -= *state.add(1);
            prefix |= digit << shift;
            prefix_mask |= (BINS - 1) << shift;
            pass += 1;
            if pass == 4 {
                break;
            }
            for bin in (tid..BINS).step_by(THREADS as usize) {
                *histogram.add(bin as usize) = 0;
            }
            sync_threads();
            let next_shift = shift - RADIX_BITS;
            let mut j = tid;
            while j < count {
                let bits = (*scores.add(j as usize)).to_bits();
                if bits & prefix_mask == prefix {
                    atomic_add_shared_u32(
                        histogram.add(((bits >> next_shift) & (BINS - 1)) as usize),
                        1,
                    );
                }
                j += THREADS;
            }
            sync_threads();
        }
        let threshold = prefix;
        let needed_equal = remaining;

        // 3. Ordered compaction: every score above the threshold, and the first
        //    `needed_equal` equal to it.
        let chunk_ids = (p.chunk_ids as *const u32).add(base);
        let selection =
            (p.selection as *mut u32).add(slot_base(sequence_index, kv_head, shape.kv_heads, k));
        let (mut above_run, mut equal_run) = (0u32, 0u32);
        let mut start = 0;
        while start < count {
            // No divergent code before `exclusive_count` (see `block`): the load is clamped
            // into range and the flags combined without short-circuits.
            let j = start + tid;
            let valid = j < count;
            let bits = (*scores.add(min_u32(j, count - 1) as usize)).to_bits();
            let above = valid & (bits > threshold);
            let equal = valid & (bits == threshold);
            let (above_rank, above_total) = exclusive_count(above, scratch);
            let (equal_rank, equal_total) = exclusive_count(equal, scratch);
            let equal_before = equal_run + equal_rank;
            if above || (equal && equal_before < needed_equal) {
                let position = above_run + above_rank + min_u32(equal_before, needed_equal);
                if position < k {
                    *selection.add(position as usize) = *chunk_ids.add(j as usize);
                }
            }
            above_run += above_total;
            equal_run += equal_total;
            start += THREADS;
        }
    }
}
