//! Landmark scoring, pass two, and top-k chunk selection: one block per (sequence, KV head),
//! or for long sequences at small batches one thread-block cluster of up to 8 blocks, each
//! over a contiguous range of the landmarks (see [`cluster_blocks`]); the blocks of a cluster
//! exchange their histograms and counts through distributed shared memory between cluster
//! barriers. The exchanges of shared memory use a barrier whose release covers shared memory
//! only (`sync_cluster_shared`); the full barrier, whose release compiles to a GPU-wide memory
//! barrier that waits for every score store in flight (about a microsecond each), is left
//! for the one place that orders global memory (the selection, before the plan). Every block
//! repeats the per-block fixed work, so a cluster pays only where the landmarks dominate
//! (see [`MIN_CLUSTER_BLOCK_LANDMARKS`]). (With full barriers everywhere, and with a global
//! histogram and a last-block hand-off instead of a cluster, spreading a head over several
//! blocks was slower than one block at every shape: `docs/EXPERIMENTS.md`, Top-k.)
//!
//! 1. Merges `scoring`'s per-tile (max, sum) into each query head's softmax normaliser (a
//!    warp per head, a lane per tile) and writes `score = max over the group of
//!    exp2(logit - max_g) / sum_g` per landmark, to `scores` and, when the sequence's scores
//!    fit, to shared memory for the passes below. Every head's logits of
//!    [`landmarks_in_flight`] landmarks are loaded before any is used.
//! 2. Radix-selects the `budget_chunks`-th largest score: scores are `>= 0`, so the 31 bits
//!    below the sign order like their values; three passes of 11, 10 and 10 bits (the first
//!    histogram is built while the scores are computed) narrow the threshold `T`.
//! 3. An ordered compaction writes the chunk ids of every score `> T` and of the first
//!    (lowest-index) scores `== T` until `budget_chunks` are taken, in landmark order, so the
//!    output is deterministic and a CPU reference can match it exactly. Each warp owns a
//!    contiguous segment of landmarks and ranks 32 at a time with ballots, keeping the
//!    landmarks at or above `T` in a list of its own ([`WARP_LIST`]), so one walk and one
//!    block-wide scan of the warps' totals order the whole output; the chunk ids are then
//!    gathered by all threads at once. (Each thread walking a contiguous run of its own, as before, read
//!    global memory uncoalesced once the scores no longer fit shared memory: 233.7 against
//!    144.8 µs at 1 x 128K landmarks on the H100; from shared memory the two are even.)
//! 4. When the launch carries a plan (the decode step's), the block then runs the cache-aware
//!    plan of its (sequence, KV head) (`plan::plan_head`): one launch and one kernel boundary
//!    fewer per step.

use crate::plan::PlanParams;
use crate::shadow::ShadowShape;

/// A whole block of 32 warps (64 registers each fit; `LAUNCH_BOUNDS` holds ptxas to that): at batch 1 the 8 blocks of a step are
/// the kernel, so more warps per block is its only parallelism (16 warps were 7% slower:
/// `docs/EXPERIMENTS.md`). At batch 1 the kernel is bound by its instructions on 8 SMs, so
/// the block scans leave the warp totals to warp 0 (every thread summing them was a fifth of
/// the instructions).
pub const WARPS: u32 = 32;
pub const THREADS: u32 = WARPS * 32;
/// Bits of each radix pass, from the top of the 31 value bits of a score.
pub const DIGIT_BITS: [u32; 3] = [11, 10, 10];
/// Bins of the largest histogram.
pub const MAX_BINS: u32 = 1 << 11;
/// Logit loads each thread has in flight in pass one: `LOADS_IN_FLIGHT / G` landmarks, all
/// `G` heads of each, before any is used.
pub const LOADS_IN_FLIGHT: u32 = 16;
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
    /// `scoring`'s landmarks per tile.
    pub tile_len: u32,
    /// Scores the dynamic shared memory holds (see [`shared_bytes`]); a sequence with more
    /// landmarks works on `scores` in global memory.
    pub shared_scores: u32,
    pub _reserved: u32,
    /// The plan each block runs after its selection (see `plan`), for the same sequences;
    /// none when `plan.resident` is 0.
    pub plan: PlanParams,
}

/// Scores staged in shared memory by each block, for a batch whose longest sequence has
/// `max_landmarks`, in clusters of `cluster_blocks`.
pub const fn shared_scores(max_landmarks: u32, cluster_blocks: u32) -> u32 {
    let most = block_landmarks(max_landmarks, cluster_blocks);
    if most <= MAX_SHARED_SCORES {
        most
    } else {
        0
    }
}

/// Landmarks each block of a cluster of `cluster_blocks` takes of a sequence's `count`: block
/// `r` takes the contiguous range from `r` times this (the last ranges may be short or empty).
pub const fn block_landmarks(count: u32, cluster_blocks: u32) -> u32 {
    count.div_ceil(if cluster_blocks == 0 {
        1
    } else {
        cluster_blocks
    })
}

/// Fewest landmarks per block worth a cluster: below this a block's fixed work and the cluster
/// barriers outweigh what the split saves. H100, top-k alone at batch 1
/// (`docs/logs/decode-bench-h100.log`): 15,304 landmarks per head take 18.5 µs in one block,
/// 16.7 in 2, 15.3 in 4 (3.8K each) and 17.4 in 8 (1.9K each); 4,040 take 11.2 in one block
/// and 12.5 in 2 (2K each).
pub const MIN_CLUSTER_BLOCK_LANDMARKS: u32 = 3584;

/// Blocks per cluster for `rows` (sequence, KV head) pairs on `multiprocessors` SMs, the
/// longest sequence having `max_landmarks`: as many as the idle SMs allow, up to
/// [`MAX_CLUSTER_BLOCKS`](crate::MAX_CLUSTER_BLOCKS), each with at least
/// [`MIN_CLUSTER_BLOCK_LANDMARKS`]; 1 (no cluster) for short sequences or large batches.
pub const fn cluster_blocks(multiprocessors: u32, rows: u32, max_landmarks: u32) -> u32 {
    let mut blocks = multiprocessors / if rows == 0 { 1 } else { rows };
    let by_landmarks = max_landmarks / MIN_CLUSTER_BLOCK_LANDMARKS;
    if by_landmarks < blocks {
        blocks = by_landmarks;
    }
    if blocks > crate::MAX_CLUSTER_BLOCKS {
        blocks = crate::MAX_CLUSTER_BLOCKS;
    }
    if blocks == 0 {
        1
    } else {
        blocks
    }
}

/// Selected landmarks each warp keeps in shared memory from its one walk of the compaction;
/// a warp that selects more walks its segment a second time.
pub const WARP_LIST: u32 = 128;

/// Shared memory: the histogram, the block-scan scratch, the per-head normalisers
/// (max, 1/sum), the selection state, the warps' lists of selected landmarks, then the staged
/// scores; or, once the selection is written, the plan's (`plan_bytes`, 0 without a plan),
/// whichever is larger.
pub const fn shared_bytes(group: u32, shared_scores: u32, plan_bytes: u32) -> u32 {
    let selection_bytes = (MAX_BINS + 32 + 2 * group + 4 + WARPS * WARP_LIST + shared_scores) * 4;
    if plan_bytes > selection_bytes {
        plan_bytes
    } else {
        selection_bytes
    }
}

/// Landmarks per thread whose logits (every head of the group) are loaded together.
pub const fn landmarks_in_flight(group: u32) -> u32 {
    if group >= LOADS_IN_FLIGHT {
        1
    } else {
        LOADS_IN_FLIGHT / group
    }
}

/// Entry-point name for a group size (`1..=MAX_KERNEL_GROUP` of `attention`, and its
/// `MAX_GROUP`).
#[cfg(not(target_arch = "nvptx64"))]
pub fn kernel_name(group: u32) -> String {
    format!("topk_select_g{group}")
}

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use core::num::NonZeroU32;

    use super::*;
    use crate::block::{clear_u32, exclusive_sum, radix_select, Cluster, MAX_WARPS};
    use crate::device::*;
    use crate::plan::plan_head;
    use crate::scoring::{tile_stat_index, tiles};
    use crate::shadow::{slot_base, ShadowSequence};
    use crate::tile::{merge_softmax_stats, warp_merge_softmax_stats};

    /// Tile statistics each lane loads per round in [`normalisers`].
    const NORMALISER_LOADS: usize = 4;

    /// Each query head's softmax `(max, 1/sum)` over every scoring tile of the sequence into
    /// `normaliser`: warp `g` merges head `g`'s tiles, a lane per tile.
    unsafe fn normalisers(
        p: &TopkParams,
        sequence_index: u32,
        kv_head: u32,
        count: u32,
        normaliser: *mut f32,
    ) {
        let shape = &p.shape;
        let (warp, lane) = (warp_id(), lane_id());
        let Some(tile_len) = NonZeroU32::new(p.tile_len) else {
            return;
        };
        let tile_count = tiles(count, tile_len);
        let stats = p.tile_stats as *const f32;
        // Warp-uniform: the group has at most `attention::MAX_GROUP` <= `WARPS` heads.
        let g = warp;
        if g < shape.group {
            let mut merged = (crate::attention::NO_SCORE, 0.0f32);
            // Rounds of `NORMALISER_LOADS` tiles per lane, all loaded before any is merged
            // (one latency per round, where a merge after each load made a chain of them).
            let mut round = 0;
            while round < tile_count {
                let mut loaded = [(crate::attention::NO_SCORE, 0.0f32); NORMALISER_LOADS];
                for (r, pair) in loaded.iter_mut().enumerate() {
                    let tile = round + r as u32 * 32 + lane;
                    if tile < tile_count {
                        let at = tile_stat_index(
                            sequence_index,
                            kv_head,
                            tile,
                            g,
                            shape.kv_heads,
                            p.max_tiles,
                            shape.group,
                        );
                        *pair = (*stats.add(at), *stats.add(at + 1));
                    }
                }
                for pair in loaded {
                    merged = merge_softmax_stats(merged, pair);
                }
                round += NORMALISER_LOADS as u32 * 32;
            }
            let (max, sum) = warp_merge_softmax_stats(merged, 1, 32);
            if lane == 0 {
                *normaliser.add(2 * g as usize) = max;
                *normaliser.add(2 * g as usize + 1) = reciprocal(sum);
            }
        }
    }

    /// # Safety
    /// The host launcher validated the layouts (every sequence has at least `budget_chunks`
    /// landmarks) and launched `(kv_heads * C, sequences)` blocks of [`THREADS`] in clusters
    /// of `(C, 1, 1)` (`C` <= [`MAX_CLUSTER_BLOCKS`](crate::MAX_CLUSTER_BLOCKS); 1 without
    /// clusters) with [`shared_bytes`] for `shared_scores` and the plan, and
    /// `shape.group == G`; a plan's parameters were validated as for the `cache_plan` kernel,
    /// for the same sequences.
    // The loops index register arrays by counters that unroll to constants (as in `attention`).
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn topk_select<const G: usize>(p: &TopkParams) {
        let shape = &p.shape;
        let cluster = Cluster::current();
        let kv_head = block_idx_x() / cluster.blocks;
        let sequence_index = shape.first_sequence + block_idx_y();
        let tid = thread_idx_x();
        let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
        let k = shape.budget_chunks;
        // This block's contiguous range of the sequence's landmarks (all of them alone).
        let per_block = block_landmarks(sequence.landmarks, cluster.blocks);
        let block_first = min_u32(cluster.rank * per_block, sequence.landmarks);
        let count = min_u32(block_first + per_block, sequence.landmarks) - block_first;

        let histogram = dynamic_shared::<u32>();
        let scratch = histogram.add(MAX_BINS as usize);
        let normaliser = scratch.add(MAX_WARPS) as *mut f32;
        let state = normaliser.add(2 * G) as *mut u32;
        let lists = state.add(4);
        let staged = lists.add((WARPS * WARP_LIST) as usize) as *mut f32;

        // 1. The scores of this block's landmarks and the histogram of their top digit. The
        //    first logits are loaded before the barrier that publishes the normalisers, so
        //    their latency overlaps the normalisers' merge (warps 0..G) and the other warps'
        //    wait for it.
        let rows: [*const f32; G] = core::array::from_fn(|g| {
            (p.logits as *const f32).add(
                sequence.logit_base(kv_head, G as u32, g as u32) as usize + block_first as usize,
            )
        });
        // Past 8 heads (GLM-4's 16) a pointer per head would not fit the 64 registers of a
        // 1024-thread block: head `g`'s row is found from the first (rows are `landmarks`
        // apart), and its normaliser is read from shared memory where it is used.
        let row = |g: usize| {
            if G > 8 {
                rows[0].add(g * sequence.landmarks as usize)
            } else {
                rows[g]
            }
        };
        let per = landmarks_in_flight(G as u32) as usize;
        // Every head's logits of this thread's `per` landmarks from `start`, loaded before any
        // is used.
        let load_logits = |start: u32| {
            let mut logit = [[f32::NEG_INFINITY; G]; LOADS_IN_FLIGHT as usize];
            for u in 0..per {
                let j = start + u as u32 * THREADS + tid;
                if j < count {
                    for g in 0..G {
                        logit[u][g] = *row(g).add(j as usize);
                    }
                }
            }
            logit
        };
        let mut logit = load_logits(0);
        normalisers(p, sequence_index, kv_head, sequence.landmarks, normaliser);
        clear_u32(histogram, MAX_BINS);
        sync_threads();
        let base = sequence.landmark_base(kv_head) as usize + block_first as usize;
        let scores = (p.scores as *mut f32).add(base);
        let in_shared = count <= p.shared_scores;
        let first_shift = 31 - DIGIT_BITS[0];
        let mut max = [0.0f32; G];
        let mut inverse_sum = [0.0f32; G];
        if G <= 8 {
            for g in 0..G {
                max[g] = *normaliser.add(2 * g);
                inverse_sum[g] = *normaliser.add(2 * g + 1);
            }
        }
        let mut start = 0;
        while start < count {
            for u in 0..per {
                let j = start + u as u32 * THREADS + tid;
                if j < count {
                    let mut value = 0.0f32;
                    for g in 0..G {
                        let (max, inverse_sum) = if G > 8 {
                            (*normaliser.add(2 * g), *normaliser.add(2 * g + 1))
                        } else {
                            (max[g], inverse_sum[g])
                        };
                        value = max_f32(value, exp2(logit[u][g] - max) * inverse_sum);
                    }
                    *scores.add(j as usize) = value;
                    if in_shared {
                        *staged.add(j as usize) = value;
                    }
                    let digit = min_u32(value.to_bits() >> first_shift, MAX_BINS - 1);
                    atomic_add_shared_u32(histogram.add(digit as usize), 1);
                }
            }
            start += per as u32 * THREADS;
            if start < count {
                logit = load_logits(start);
            }
        }
        sync_threads();

        // The passes read the scores from shared memory, or from `scores` itself.
        let working = if in_shared { staged } else { scores };
        let score_bits = |j: u32| (*working.add(j as usize)).to_bits();

        // 2. Radix select of the threshold over the 31 value bits of the cluster's scores
        //    (the first histogram is already built).
        let (threshold, needed_equal) = radix_select(
            score_bits,
            count,
            k,
            &DIGIT_BITS,
            histogram,
            scratch,
            state,
            cluster,
        );

        // 3. Ordered compaction: every score above the threshold, and the first
        //    `needed_equal` equal to it, in landmark order. Each warp owns a contiguous
        //    segment and walks it 32 landmarks at a time (lane-consecutive, so the loads are
        //    conflict-free in shared memory and coalesced in global memory); ballots rank a
        //    step's landmarks, and the warp keeps the landmarks above or equal to the
        //    threshold, in order, in its list. One block scan of the warps' totals then orders
        //    the warps (the lower-ranked blocks of a cluster first), and each warp places its
        //    list. The step is branch-free up to the store, so every lane reaches every ballot.
        let lane = lane_id();
        let lower_lanes = (1u32 << lane) - 1;
        let segment = count.div_ceil(WARPS).next_multiple_of(32);
        let warp_first = min_u32(warp_id() * segment, count);
        let warp_last = min_u32(warp_first + segment, count);
        let step_votes = |first: u32| {
            let j = first + lane;
            let valid = j < warp_last;
            let bits = score_bits(min_u32(j, warp_last - 1));
            (
                j,
                ballot(valid & (bits > threshold)),
                ballot(valid & (bits == threshold)),
            )
        };
        let list = lists.add((warp_id() * WARP_LIST) as usize);
        let (mut warp_above, mut warp_equal) = (0u32, 0u32);
        let mut first = warp_first;
        while first < warp_last {
            let (j, above, equal) = step_votes(first);
            let kept = above | equal;
            let listed = warp_above + warp_equal;
            // Warp-uniform: a full list stops growing (the warp walks again below).
            if listed + popcount(kept) <= WARP_LIST && (kept >> lane) & 1 != 0 {
                let equal_flag = ((equal >> lane) & 1) << 31;
                *list.add((listed + popcount(kept & lower_lanes)) as usize) = j | equal_flag;
            }
            warp_above += popcount(above);
            warp_equal += popcount(equal);
            first += 32;
        }
        // Lane 0 carries the warp's totals into the block scans; every lane takes lane 0's
        // prefix.
        let leader = lane == 0;
        // Block-uniform: below 2^16 landmarks per block both counts share one scan (neither
        // half can carry into the other), saving a scan's three barriers.
        let (above_prefix, block_above, equal_prefix, block_equal) = if count < 1 << 16 {
            let packed = warp_above | warp_equal << 16;
            let (prefix, total) = exclusive_sum(if leader { packed } else { 0 }, scratch);
            (prefix & 0xffff, total & 0xffff, prefix >> 16, total >> 16)
        } else {
            let (above_prefix, block_above) =
                exclusive_sum(if leader { warp_above } else { 0 }, scratch);
            let (equal_prefix, block_equal) =
                exclusive_sum(if leader { warp_equal } else { 0 }, scratch);
            (above_prefix, block_above, equal_prefix, block_equal)
        };
        let totals = state.add(2);
        if tid == 0 {
            *totals = block_above;
            *totals.add(1) = block_equal;
        }
        // Every block has its totals, and has read every histogram for the last time.
        cluster.sync_shared();
        let above_lower = cluster.sum_below(totals, cluster.rank);
        let equal_lower = cluster.sum_below(totals.add(1), cluster.rank);
        let mut above_before = above_lower + shuffle_idx_u32(above_prefix, 0);
        let mut equal_before = equal_lower + shuffle_idx_u32(equal_prefix, 0);
        // This block's positions in the selection.
        let block_position = above_lower + min_u32(equal_lower, needed_equal);
        let block_end =
            above_lower + block_above + min_u32(equal_lower + block_equal, needed_equal);
        let chunk_ids = (p.chunk_ids as *const u32).add(base);
        let selection =
            (p.selection as *mut u32).add(slot_base(sequence_index, kv_head, shape.kv_heads, k));
        // The first `MAX_BINS` positions collect landmark indices in the (now free)
        // histogram, so that their chunk ids are gathered by all threads at once below, not
        // one load after another by the lane that found it.
        let positions = histogram;
        // Places a landmark ranked after `above_before` landmarks above the threshold and
        // `equal_before` equal to it, if it is taken.
        let place =
            |j: u32, is_above: bool, is_equal: bool, above_before: u32, equal_before: u32| {
                // Selected landmarks before this one: the scores above it, and the equal ones
                // before it that are taken.
                let position = above_before + min_u32(equal_before, needed_equal);
                if is_above || (is_equal && equal_before < needed_equal) {
                    if position < min_u32(k, MAX_BINS) {
                        *positions.add(position as usize) = j;
                    } else if position < k {
                        *selection.add(position as usize) = *chunk_ids.add(j as usize);
                    }
                }
            };
        // Warp-uniform: from the list, 32 entries at a time, or (a warp that kept more than
        // its list holds) from a second walk of the segment.
        if warp_above + warp_equal <= WARP_LIST {
            let mut entry = 0;
            while entry < warp_above + warp_equal {
                let listed = entry + lane < warp_above + warp_equal;
                let word = if listed {
                    *list.add((entry + lane) as usize)
                } else {
                    0
                };
                let is_equal = word >> 31 != 0;
                let equal = ballot(listed & is_equal);
                let above = ballot(listed & !is_equal);
                if listed {
                    place(
                        word & !(1 << 31),
                        !is_equal,
                        is_equal,
                        above_before + popcount(above & lower_lanes),
                        equal_before + popcount(equal & lower_lanes),
                    );
                }
                above_before += popcount(above);
                equal_before += popcount(equal);
                entry += 32;
            }
        } else {
            let mut first = warp_first;
            while first < warp_last {
                let (j, above, equal) = step_votes(first);
                place(
                    j,
                    (above >> lane) & 1 != 0,
                    (equal >> lane) & 1 != 0,
                    above_before + popcount(above & lower_lanes),
                    equal_before + popcount(equal & lower_lanes),
                );
                above_before += popcount(above);
                equal_before += popcount(equal);
                first += 32;
            }
        }
        sync_threads();
        let gathered = min_u32(block_end, min_u32(k, MAX_BINS));
        for position in (block_position + tid..gathered).step_by(THREADS as usize) {
            let j = *positions.add(position as usize);
            *selection.add(position as usize) = *chunk_ids.add(j as usize);
        }
        // No block leaves (taking its shared memory with it) before the others have read its
        // totals; with a plan, every block's part of the selection (global memory) is also
        // written before the first block plans from it.
        if p.plan.resident != 0 {
            cluster.sync();
        } else {
            cluster.sync_shared();
        }

        // 4. The plan of this (sequence, KV head), in place of a launch of its own, by the
        //    cluster's first block. The block barrier makes a lone block's selection writes
        //    visible to all its threads and frees the shared memory.
        if p.plan.resident != 0 {
            sync_threads();
            if cluster.rank == 0 {
                plan_head(&p.plan, sequence_index, kv_head, dynamic_shared::<u32>());
            }
        }
    }

    macro_rules! entries {
        ($($name:ident = $g:literal),* $(,)?) => {$(
            #[no_mangle]
            pub unsafe extern "ptx-kernel" fn $name(params: TopkParams) {
                topk_select::<$g>(&params)
            }
        )*};
    }
    entries! {
        topk_select_g1 = 1, topk_select_g2 = 2, topk_select_g3 = 3, topk_select_g4 = 4,
        topk_select_g5 = 5, topk_select_g6 = 6, topk_select_g7 = 7, topk_select_g8 = 8,
        topk_select_g16 = 16,
    }
}
