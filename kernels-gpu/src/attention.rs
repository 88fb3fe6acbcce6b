//! Sparse GQA decode attention (flash-decoding over a ragged batch).
//!
//! One query token per sequence attends over its KV heads' GPU buffers. Each sequence `b` owns
//! a block `[kv_heads, capacity_b, head_dim]` of the K and V buffers, starting at
//! `offset_b` elements, of which the first `len_b` tokens per head are valid. In ShadowKV that
//! buffer is local window + outliers + sparse slots + generated tokens; when it holds the whole
//! context, the same kernel is the full-attention baseline.
//!
//! Work split: blocks `(split, kv_head, sequence)`; a split covers `split_len` tokens of one
//! KV head for all `G` query heads of its group, so each K/V row is read once. A sequence
//! with one split writes its bf16 output directly; longer ones write per-split partial
//! outputs and log-sum-exps, and the last block of each `(sequence, kv_head)` to finish
//! (counted with an atomic) merges them, so there is no second launch.
//!
//! A sliding window (Gemma's local layers) only moves the start of the tokens walked: the
//! splits cover the last `window` tokens.
//!
//! Scores are kept in the log2 domain: `q` is pre-scaled by `scale * log2(e)` so the softmax
//! uses `exp2`; partial log-sum-exps are base 2 as well.

use core::num::NonZeroU32;

/// Threads per block of the split kernel: four warps.
pub const WARPS: u32 = 4;
pub const THREADS: u32 = WARPS * 32;
/// bf16 values per 16-byte vector: the unit every thread loads.
pub const VECTOR: u32 = 8;
/// Largest GQA group (query heads per KV head) with a compiled kernel.
pub const MAX_KERNEL_GROUP: u32 = 8;
/// Largest GQA group the launchers take: the one group past [`MAX_KERNEL_GROUP`] (GLM-4's 16)
/// runs the kernel of half the group over two virtual KV heads per KV head
/// ([`kernel_group`]), each reading the head's keys and values (the second read mostly from
/// L2): a group-16 kernel would hold 2 x 128 registers of queries and accumulators per lane.
pub const MAX_GROUP: u32 = 16;

/// The compiled group that runs `group` and the virtual KV heads per KV head: `(group, 1)`
/// up to [`MAX_KERNEL_GROUP`], `(group / 2, 2)` past it (only [`MAX_GROUP`] is accepted:
/// GLM-4's, the one model with such a group).
pub const fn kernel_group(group: u32) -> (u32, u32) {
    if group > MAX_KERNEL_GROUP {
        (group / 2, 2)
    } else {
        (group, 1)
    }
}
/// Head dimensions with a compiled kernel.
pub const HEAD_DIMS: [u32; 3] = [64, 128, 256];
/// Groups compiled at head dimension 256 (decode attention and scoring): those of the models
/// with such heads, Gemma-3 270M and 1B (4 query heads per KV head), Gemma-2 and the larger
/// Gemma-3 (2), and 1 for multi-head attention. The other head dimensions have every group up
/// to [`MAX_KERNEL_GROUP`] and [`MAX_GROUP`]; all groups at 256 would add 20 kernels to every
/// PTX module.
pub const D256_GROUPS: [u32; 3] = [1, 2, 4];

/// Whether kernels are compiled for `group` query heads per KV head at `head_dim`.
pub const fn has_kernel(group: u32, head_dim: u32) -> bool {
    match head_dim {
        64 | 128 => (group >= 1 && group <= MAX_KERNEL_GROUP) || group == MAX_GROUP,
        256 => group == 1 || group == 2 || group == 4,
        _ => false,
    }
}
/// Running max before any token is seen: finite, so `exp2(m_old - m_new)` never forms inf - inf.
pub const NO_SCORE: f32 = -1.0e30;

// The K/V block layout is shared with `shadow` (whose state names each sequence's block), so
// it lives in a module of its own that both import; re-exported here, where it is read.
pub use crate::kv::SequenceLayout;

/// Kernel part: every valid token (the plain kernel).
pub const ALL_TOKENS: u32 = 0;
/// Kernel part: every token except the sparse slots filled this step; the output goes to the
/// carry buffers instead of `out`.
pub const RESIDENT_TOKENS: u32 = 1;
/// Kernel part: only the tokens of this step's misses, merged with the carry into `out`.
pub const FRESH_TOKENS: u32 = 2;

/// ShadowKV's split of a decode step's attention in two launches: the resident part runs while
/// the misses' values are still being fetched; the fresh part, after the fetch, covers only the
/// misses' tokens (through the miss list) and merges the two by their log-sum-exps. The plain
/// kernel ([`ALL_TOKENS`]) ignores it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SlotFilter {
    /// `[batch]` [`ShadowSequence`](crate::shadow::ShadowSequence): where each sequence's
    /// sparse slots start (`sparse_start`).
    pub sequences: u64,
    /// u32 `[batch, kv_heads, budget_chunks]`: nonzero for a slot filled this step (`plan`);
    /// the resident part skips those slots.
    pub fresh: u64,
    /// `[batch, kv_heads, budget_chunks]` [`Miss`](crate::shadow::Miss) and u32
    /// `[batch, kv_heads]` counts (`plan`): the tokens the fresh part walks.
    pub misses: u64,
    pub miss_counts: u64,
    /// f32 `[batch, q_heads, head_dim]`: the resident part's normalised output.
    pub carry_out: u64,
    /// f32 `[batch, q_heads]`: the resident part's base-2 log-sum-exp.
    pub carry_lse: u64,
    /// Tokens per slot (`c`).
    pub chunk_size: u32,
    /// Slots per (sequence, KV head).
    pub budget_chunks: u32,
}

/// The one parameter struct of this family, passed by value to both kernels.
/// Pointers are device addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct DecodeAttentionParams {
    /// `[batch, q_heads, head_dim]` bf16, post-RoPE.
    pub q: u64,
    /// bf16 keys, laid out per [`SequenceLayout`].
    pub k: u64,
    /// bf16 values, laid out like `k`.
    pub v: u64,
    /// `[batch]` [`SequenceLayout`].
    pub layouts: u64,
    /// `[batch, q_heads, head_dim]` bf16.
    pub out: u64,
    /// `[batch, max_splits, q_heads, head_dim]` f32, normalised per split.
    pub partial_out: u64,
    /// `[batch, max_splits, q_heads]` f32, base-2 log-sum-exp of each split.
    pub partial_lse: u64,
    /// `[batch, kv_heads]` u32 finished-split counters; zero between launches (the merging
    /// block resets its counter).
    pub counters: u64,
    pub batch: u32,
    pub kv_heads: u32,
    /// Tokens per split; a multiple of [`tokens_per_iteration`].
    pub split_len: u32,
    /// Splits of the longest sequence (grid x and the partial buffers' split stride).
    pub max_splits: u32,
    /// `softmax_scale * log2(e)`.
    pub scale_log2: f32,
    /// `kv_heads * group` (grid y is `kv_heads`, virtual heads included).
    pub q_heads: u32,
    /// Sliding window of the plain kernel ([`ALL_TOKENS`]), 0 for none: the query, at
    /// position `len - 1`, attends only to the last `window` tokens (positions
    /// `> len - 1 - window`, row = position). The ShadowKV parts ignore it.
    pub window: u32,
    /// Virtual KV heads per KV head (1 or 2, see [`kernel_group`]): block `y` reads the keys
    /// and values, slots and misses of KV head `y / kv_head_split`; `kv_heads` counts the
    /// virtual heads.
    pub kv_head_split: u32,
    pub filter: SlotFilter,
}

/// 16-byte vectors per K/V row: the lanes that cooperate on one token.
pub const fn lanes_per_token(head_dim: u32) -> u32 {
    head_dim / VECTOR
}

/// Tokens each lane group loads before it updates the softmax: more bytes in flight per
/// thread, bounded by registers (the group's `q` and accumulators grow with `group`).
pub const fn unroll(group: u32) -> u32 {
    if group > 4 {
        2
    } else {
        4
    }
}

/// Tokens one block covers per loop iteration.
pub const fn tokens_per_iteration(group: u32, head_dim: u32) -> u32 {
    WARPS * (32 / lanes_per_token(head_dim)) * unroll(group)
}

/// Most splits of one sequence: the merging block keeps a weight per split and head in
/// shared memory.
pub const MAX_SPLITS: u32 = 256;

/// Words of the shared region the two phases reuse: per warp and head, `head_dim`
/// accumulators plus the running max and sum; in the merge, each head's log-sum-exp and
/// [`MAX_SPLITS`] weights per head.
const fn shared_words(group: u32, head_dim: u32) -> u32 {
    let accumulators = WARPS * group * (head_dim + 2);
    let merge = group * (1 + MAX_SPLITS);
    if accumulators > merge {
        accumulators
    } else {
        merge
    }
}

/// Shortest split length (a whole number of iterations) that covers `tokens` in at most
/// [`MAX_SPLITS`] splits.
pub const fn shortest_split_len(tokens: u32, group: u32, head_dim: u32) -> u32 {
    tokens
        .div_ceil(MAX_SPLITS)
        .next_multiple_of(tokens_per_iteration(group, head_dim))
}

/// Dynamic shared memory of the split kernel: the region above, then one word telling the
/// block whether it merges.
pub const fn shared_bytes(group: u32, head_dim: u32) -> u32 {
    shared_words(group, head_dim) * 4 + 16
}

/// Splits of a sequence of `len` tokens. (`NonZeroU32` division cannot panic, so the device
/// code carries no panic path.)
#[inline(always)]
pub fn num_splits(len: u32, split_len: NonZeroU32) -> u32 {
    len / split_len + (len % split_len != 0) as u32
}

/// Index of `(sequence, split, q_head)` in `partial_lse`; times `head_dim` in `partial_out`.
pub const fn partial_index(
    sequence: u32,
    split: u32,
    q_head: u32,
    max_splits: u32,
    q_heads: u32,
) -> usize {
    ((sequence as usize * max_splits as usize) + split as usize) * q_heads as usize
        + q_head as usize
}

/// Entry-point name of the split kernel for a group size and head dimension.
#[cfg(not(target_arch = "nvptx64"))]
pub fn kernel_name(group: u32, head_dim: u32) -> String {
    format!("decode_attention_g{group}_d{head_dim}")
}

/// Entry-point name of a ShadowKV step's part ([`RESIDENT_TOKENS`] or [`FRESH_TOKENS`]).
#[cfg(not(target_arch = "nvptx64"))]
pub fn part_kernel_name(part: u32, group: u32, head_dim: u32) -> String {
    let part = if part == FRESH_TOKENS {
        "fresh"
    } else {
        "resident"
    };
    format!("decode_attention_{part}_g{group}_d{head_dim}")
}

// Register arrays are indexed by loop counters that unroll to constants; the index form keeps
// the per-lane math readable and is what the verified PTX was built from.
#[cfg(target_arch = "nvptx64")]
#[allow(clippy::needless_range_loop)]
mod kernel {
    use super::*;
    use crate::device::*;
    use crate::shadow::{slot_base, Miss, ShadowSequence};
    use crate::tile::{
        load_query, merge_softmax_stats, row_dots, scale_query, warp_merge_softmax_stats,
    };

    /// Partial outputs one thread loads before it uses any, in the merge ...
    const MERGE_LOADS: usize = 32;
    /// ... from at most this many splits (more would cost the small groups registers, and
    /// with them blocks per SM, in the main loop).
    const MERGE_SPLITS: usize = 8;
    /// Most output elements one thread merges: `G * D / THREADS` of the largest pair
    /// (group 8 at 128, 4 at 256).
    const MAX_MERGE_ELEMENTS: usize = (MAX_KERNEL_GROUP * 128 / THREADS) as usize;

    /// # Safety
    /// The host launcher validated every pointer and layout against the buffers' lengths,
    /// `group == G`, `head_dim == D`, and launched `(max_splits, kv_heads, batch)` blocks of
    /// [`THREADS`] threads with [`shared_bytes`] of dynamic shared memory.
    #[inline(always)]
    pub unsafe fn decode_attention<const G: usize, const D: usize, const PART: u32>(
        p: &DecodeAttentionParams,
    ) {
        let lanes = lanes_per_token(D as u32);
        let tokens_per_warp = 32 / lanes;
        let unroll_tokens = unroll(G as u32) as usize;
        let row_tokens = WARPS * tokens_per_warp;

        let split = block_idx_x();
        let kv_head = block_idx_y();
        // The KV head whose keys, values and slots this (maybe virtual) head reads.
        let split_heads = NonZeroU32::new(p.kv_head_split).unwrap_or(NonZeroU32::MIN);
        let (kv_source, kv_sources) = (kv_head / split_heads, p.kv_heads / split_heads);
        let sequence = block_idx_z();
        let warp = warp_id();
        let lane = lane_id();
        let lane_in_token = lane % lanes;
        let token_in_row = warp * tokens_per_warp + lane / lanes;
        let q_heads = p.q_heads;

        // Loaded before the layout is known so the two loads overlap.
        let q_raw = load_query::<G, D>(p.q, sequence, kv_head, q_heads, lane_in_token);
        let layout = *(p.layouts as *const SequenceLayout).add(sequence as usize);
        let Some(split_len) = NonZeroU32::new(p.split_len) else {
            return;
        };
        let filter = &p.filter;
        // Validated nonzero by the host; the fallback keeps the division panic-free.
        let chunk_size = NonZeroU32::new(filter.chunk_size).unwrap_or(NonZeroU32::MIN);
        // The filtered parts: where the sparse slots start, this head's fresh marks and misses.
        let (slot_start, slots) = if PART == ALL_TOKENS {
            (0, 0)
        } else {
            let shadow = &*(filter.sequences as *const ShadowSequence).add(sequence as usize);
            (
                shadow.sparse_start,
                slot_base(sequence, kv_source, kv_sources, filter.budget_chunks),
            )
        };
        let fresh = (filter.fresh as *const u32).add(slots);
        let misses = (filter.misses as *const Miss).add(slots);
        // The fresh part walks the misses' tokens (`count * c` of them, in miss order); the
        // others the whole valid length. It runs at least one split, so that a head without
        // misses still writes its carry to `out`.
        let (region_len, splits) = if PART == FRESH_TOKENS {
            let count = *(filter.miss_counts as *const u32)
                .add((sequence * kv_sources + kv_source) as usize);
            let len = count * filter.chunk_size;
            (len, num_splits(len, split_len).max(1))
        } else {
            (layout.len, num_splits(layout.len, split_len))
        };
        // The plain kernel's window: the region starts `window` tokens before the end.
        let first = if PART == ALL_TOKENS && p.window != 0 && layout.len > p.window {
            layout.len - p.window
        } else {
            0
        };
        let splits = if first > 0 {
            num_splits(region_len - first, split_len)
        } else {
            splits
        };
        // The host keeps `splits` within `MAX_SPLITS` (the merge's shared weights).
        if split >= splits || splits > MAX_SPLITS {
            return;
        }
        // The K/V row of position `index` of the region, and whether this launch attends to it.
        let row_of = |index: u32| -> (u32, bool) {
            match PART {
                FRESH_TOKENS => {
                    let miss = *misses.add((index / chunk_size) as usize);
                    (
                        slot_start + miss.slot * filter.chunk_size + index % chunk_size,
                        true,
                    )
                }
                RESIDENT_TOKENS => {
                    let offset = index.wrapping_sub(slot_start);
                    let slot_tokens = filter.budget_chunks * filter.chunk_size;
                    let is_fresh =
                        offset < slot_tokens && *fresh.add((offset / chunk_size) as usize) != 0;
                    (index, !is_fresh)
                }
                _ => (index, true),
            }
        };
        let q = scale_query(q_raw, p.scale_log2);
        let start = first + split * p.split_len;
        let end = if start + p.split_len < region_len {
            start + p.split_len
        } else {
            region_len
        };

        let head_base = layout.offset as usize + kv_source as usize * layout.capacity as usize * D;
        let lane_column = (lane_in_token * VECTOR) as usize;
        let k_head = (p.k as *const u16).add(head_base + lane_column);
        let v_head = (p.v as *const u16).add(head_base + lane_column);

        let mut running_max = [NO_SCORE; G];
        let mut running_sum = [0.0f32; G];
        let mut acc = [[0.0f32; 8]; G];

        // One tile: this lane's 16-byte slice of `unroll` tokens' keys and values.
        let load_tile = |base: u32| {
            let mut keys = [[0u32; 4]; 4];
            let mut values = [[0u32; 4]; 4];
            let mut valid = [false; 4];
            for u in 0..unroll_tokens {
                let index = base + u as u32 * row_tokens + token_in_row;
                let (token, wanted) = if index < end {
                    row_of(index)
                } else {
                    (0, false)
                };
                valid[u] = wanted;
                if valid[u] {
                    let row = token as usize * D;
                    keys[u] = load_stream_16(k_head.add(row) as *const Vec16);
                    values[u] = load_stream_16(v_head.add(row) as *const Vec16);
                }
            }
            (keys, values, valid)
        };
        let tile_tokens = row_tokens * unroll_tokens as u32;
        let mut next = load_tile(start);
        let mut base = start;
        while base < end {
            // Double-buffered: the next tile's loads are in flight while this one is used.
            let (keys, values, valid) = next;
            if base + tile_tokens < end {
                next = load_tile(base + tile_tokens);
            }
            let mut scores = row_dots(&q, &keys, unroll_tokens, lanes);
            let mut v = [[0.0f32; 8]; 4];
            for u in 0..unroll_tokens {
                v[u] = bf16x8_to_f32(values[u]);
            }
            for g in 0..G {
                let mut new_max = running_max[g];
                for u in 0..unroll_tokens {
                    if !valid[u] {
                        scores[g][u] = f32::NEG_INFINITY;
                    }
                    new_max = max_f32(new_max, scores[g][u]);
                }
                let correction = exp2(running_max[g] - new_max);
                running_max[g] = new_max;
                running_sum[g] *= correction;
                for j in 0..8 {
                    acc[g][j] *= correction;
                }
                for u in 0..unroll_tokens {
                    let weight = exp2(scores[g][u] - new_max);
                    running_sum[g] += weight;
                    for j in 0..8 {
                        acc[g][j] = fma(weight, v[u][j], acc[g][j]);
                    }
                }
            }
            base += tile_tokens;
        }

        // Merge the token groups of the warp (lanes that hold the same dimensions).
        let mut mask = lanes;
        while mask < 32 {
            for g in 0..G {
                let other_max = shuffle_xor_f32(running_max[g], mask);
                let other_sum = shuffle_xor_f32(running_sum[g], mask);
                let new_max = max_f32(running_max[g], other_max);
                let mine = exp2(running_max[g] - new_max);
                let theirs = exp2(other_max - new_max);
                running_max[g] = new_max;
                running_sum[g] = fma(running_sum[g], mine, other_sum * theirs);
                for j in 0..8 {
                    let other = shuffle_xor_f32(acc[g][j], mask);
                    acc[g][j] = fma(acc[g][j], mine, other * theirs);
                }
            }
            mask <<= 1;
        }

        // Merge the warps through shared memory: [warp][g][head_dim + 2].
        let stride = D + 2;
        let shared = dynamic_shared::<f32>();
        if lane < lanes {
            for g in 0..G {
                let row = shared.add((warp as usize * G + g) * stride);
                for j in 0..8 {
                    *row.add(lane_column + j) = acc[g][j];
                }
                if lane == 0 {
                    *row.add(D) = running_max[g];
                    *row.add(D + 1) = running_sum[g];
                }
            }
        }
        sync_threads();

        let mut index = thread_idx_x() as usize;
        while index < G * D {
            let g = index / D;
            let column = index % D;
            let mut block_max = NO_SCORE;
            for w in 0..WARPS as usize {
                block_max = max_f32(block_max, *shared.add((w * G + g) * stride + D));
            }
            let mut sum = 0.0f32;
            let mut value = 0.0f32;
            for w in 0..WARPS as usize {
                let row = shared.add((w * G + g) * stride);
                let weight = exp2(*row.add(D) - block_max);
                sum = fma(*row.add(D + 1), weight, sum);
                value = fma(*row.add(column), weight, value);
            }
            let q_head = kv_head * G as u32 + g as u32;
            // A filtered split may hold no wanted token: it weighs nothing in the merge.
            let (normalised, lse) = if sum > 0.0 {
                (value * reciprocal(sum), block_max + log2(sum))
            } else {
                (0.0, NO_SCORE)
            };
            if splits == 1 {
                finish::<D, PART>(p, sequence, q_head, column, normalised, lse);
            } else {
                let at = partial_index(sequence, split, q_head, p.max_splits, q_heads);
                *(p.partial_out as *mut f32).add(at * D + column) = normalised;
                if column == 0 {
                    *(p.partial_lse as *mut f32).add(at) = lse;
                }
            }
            index += THREADS as usize;
        }
        if splits == 1 {
            return;
        }

        // The last block of this (sequence, kv_head) to finish merges every split.
        fence_gpu();
        sync_threads();
        let merges = shared.add(shared_words(G as u32, D as u32) as usize) as *mut u32;
        if thread_idx_x() == 0 {
            let counter = (p.counters as *mut u32).add((sequence * p.kv_heads + kv_head) as usize);
            let finished = atomic_add_u32(counter, 1) + 1;
            let last = finished == splits;
            if last {
                // Every split has arrived: reset for the next launch.
                *counter = 0;
            }
            *merges = last as u32;
        }
        sync_threads();
        if *merges == 0 {
            return;
        }
        fence_gpu();
        let lse = p.partial_lse as *const f32;
        let lse_index = |split: u32, g: usize| {
            partial_index(
                sequence,
                split,
                kv_head * G as u32 + g as u32,
                p.max_splits,
                q_heads,
            )
        };
        // Per head of the group (warp `g`, a lane per split; warp-uniform loop): the merged
        // log-sum-exp, and each split's weight `exp2(lse - max) / sum` in shared memory, so
        // that the element loop below loads only partial outputs. A lane rewrites only the
        // entries it wrote itself, so the warp needs no barrier between the two.
        let merged_lse = shared;
        let weights = shared.add(G);
        let weight_at = |split: u32, g: usize| weights.add(split as usize * G + g);
        let mut g = warp as usize;
        while g < G {
            let mut merged = (NO_SCORE, 0.0f32);
            let mut split = lane;
            while split < splits {
                let split_lse = load_l2_f32(lse.add(lse_index(split, g)));
                *weight_at(split, g) = split_lse;
                merged = merge_softmax_stats(merged, (split_lse, 1.0));
                split += 32;
            }
            let (max_lse, sum) = warp_merge_softmax_stats(merged, 1, 32);
            let inverse_sum = reciprocal(sum);
            let mut split = lane;
            while split < splits {
                *weight_at(split, g) = exp2(*weight_at(split, g) - max_lse) * inverse_sum;
                split += 32;
            }
            if lane == 0 {
                *merged_lse.add(g) = max_lse + log2(sum);
            }
            g += WARPS as usize;
        }
        sync_threads();
        // Each thread's elements (`index = tid + e * THREADS`) summed over the splits, with
        // up to `MERGE_LOADS` partial outputs in flight per thread: one L2 round trip per
        // `splits_per_round` splits for all of a thread's elements.
        let elements = (G * D).div_ceil(THREADS as usize);
        let splits_per_round = (MERGE_LOADS / elements).clamp(1, MERGE_SPLITS);
        let partial_out = p.partial_out as *const f32;
        let tid = thread_idx_x() as usize;
        let mut value = [0.0f32; MAX_MERGE_ELEMENTS];
        // Loads are unconditional (indices clamped; an element or split past the end weighs
        // nothing), so the round is one straight run of loads, all in flight together.
        let last_index = G * D - 1;
        let last_split = splits - 1;
        let mut first = 0;
        while first < splits {
            let mut loaded = [[0.0f32; MERGE_LOADS]; MAX_MERGE_ELEMENTS];
            for e in 0..elements {
                let index = min_usize(tid + e * THREADS as usize, last_index);
                for u in 0..splits_per_round {
                    let split = min_u32(first + u as u32, last_split);
                    let at = lse_index(split, index / D) * D + index % D;
                    loaded[e][u] = load_l2_f32(partial_out.add(at));
                }
            }
            for e in 0..elements {
                let g = min_usize(tid + e * THREADS as usize, last_index) / D;
                for u in 0..splits_per_round {
                    let split = first + u as u32;
                    let weight = *weight_at(min_u32(split, last_split), g);
                    let weight = if split < splits { weight } else { 0.0 };
                    value[e] = fma(weight, loaded[e][u], value[e]);
                }
            }
            first += splits_per_round as u32;
        }
        for e in 0..elements {
            let index = tid + e * THREADS as usize;
            if index < G * D {
                let (g, column) = (index / D, index % D);
                let q_head = kv_head * G as u32 + g as u32;
                finish::<D, PART>(p, sequence, q_head, column, value[e], *merged_lse.add(g));
            }
        }
    }

    /// Writes one element of a (sequence, query head)'s result: to `out` as bf16; for the
    /// resident part to the carry instead; for the fresh part merged with the carry first.
    #[inline(always)]
    unsafe fn finish<const D: usize, const PART: u32>(
        p: &DecodeAttentionParams,
        sequence: u32,
        q_head: u32,
        column: usize,
        value: f32,
        lse: f32,
    ) {
        let filter = &p.filter;
        let row = (sequence * p.q_heads + q_head) as usize;
        let at = row * D + column;
        let mut value = value;
        if PART == RESIDENT_TOKENS {
            *(filter.carry_out as *mut f32).add(at) = value;
            if column == 0 {
                *(filter.carry_lse as *mut f32).add(row) = lse;
            }
            return;
        }
        if PART == FRESH_TOKENS {
            let carry_lse = *(filter.carry_lse as *const f32).add(row);
            let carry = *(filter.carry_out as *const f32).add(at);
            let max = max_f32(carry_lse, lse);
            let (carry_weight, weight) = (exp2(carry_lse - max), exp2(lse - max));
            value = fma(carry, carry_weight, value * weight) * reciprocal(carry_weight + weight);
        }
        *(p.out as *mut u16).add(at) = f32_to_bf16(value);
    }

    /// One `extern "ptx-kernel"` entry per (part, group, head_dim) so the group's heads live
    /// in registers indexed by constants and the plain kernel carries no filter code.
    macro_rules! entries {
        ($($name:ident = <$g:literal, $d:literal, $part:ident>),* $(,)?) => {$(
            #[no_mangle]
            pub unsafe extern "ptx-kernel" fn $name(params: DecodeAttentionParams) {
                decode_attention::<$g, $d, $part>(&params)
            }
        )*};
    }
    entries! {
        decode_attention_g1_d64 = <1, 64, ALL_TOKENS>,
        decode_attention_g2_d64 = <2, 64, ALL_TOKENS>,
        decode_attention_g3_d64 = <3, 64, ALL_TOKENS>,
        decode_attention_g4_d64 = <4, 64, ALL_TOKENS>,
        decode_attention_g5_d64 = <5, 64, ALL_TOKENS>,
        decode_attention_g6_d64 = <6, 64, ALL_TOKENS>,
        decode_attention_g7_d64 = <7, 64, ALL_TOKENS>,
        decode_attention_g8_d64 = <8, 64, ALL_TOKENS>,
        decode_attention_g1_d128 = <1, 128, ALL_TOKENS>,
        decode_attention_g2_d128 = <2, 128, ALL_TOKENS>,
        decode_attention_g3_d128 = <3, 128, ALL_TOKENS>,
        decode_attention_g4_d128 = <4, 128, ALL_TOKENS>,
        decode_attention_g5_d128 = <5, 128, ALL_TOKENS>,
        decode_attention_g6_d128 = <6, 128, ALL_TOKENS>,
        decode_attention_g7_d128 = <7, 128, ALL_TOKENS>,
        decode_attention_g8_d128 = <8, 128, ALL_TOKENS>,
        decode_attention_resident_g1_d64 = <1, 64, RESIDENT_TOKENS>,
        decode_attention_resident_g2_d64 = <2, 64, RESIDENT_TOKENS>,
        decode_attention_resident_g3_d64 = <3, 64, RESIDENT_TOKENS>,
        decode_attention_resident_g4_d64 = <4, 64, RESIDENT_TOKENS>,
        decode_attention_resident_g5_d64 = <5, 64, RESIDENT_TOKENS>,
        decode_attention_resident_g6_d64 = <6, 64, RESIDENT_TOKENS>,
        decode_attention_resident_g7_d64 = <7, 64, RESIDENT_TOKENS>,
        decode_attention_resident_g8_d64 = <8, 64, RESIDENT_TOKENS>,
        decode_attention_resident_g1_d128 = <1, 128, RESIDENT_TOKENS>,
        decode_attention_resident_g2_d128 = <2, 128, RESIDENT_TOKENS>,
        decode_attention_resident_g3_d128 = <3, 128, RESIDENT_TOKENS>,
        decode_attention_resident_g4_d128 = <4, 128, RESIDENT_TOKENS>,
        decode_attention_resident_g5_d128 = <5, 128, RESIDENT_TOKENS>,
        decode_attention_resident_g6_d128 = <6, 128, RESIDENT_TOKENS>,
        decode_attention_resident_g7_d128 = <7, 128, RESIDENT_TOKENS>,
        decode_attention_resident_g8_d128 = <8, 128, RESIDENT_TOKENS>,
        decode_attention_fresh_g1_d64 = <1, 64, FRESH_TOKENS>,
        decode_attention_fresh_g2_d64 = <2, 64, FRESH_TOKENS>,
        decode_attention_fresh_g3_d64 = <3, 64, FRESH_TOKENS>,
        decode_attention_fresh_g4_d64 = <4, 64, FRESH_TOKENS>,
        decode_attention_fresh_g5_d64 = <5, 64, FRESH_TOKENS>,
        decode_attention_fresh_g6_d64 = <6, 64, FRESH_TOKENS>,
        decode_attention_fresh_g7_d64 = <7, 64, FRESH_TOKENS>,
        decode_attention_fresh_g8_d64 = <8, 64, FRESH_TOKENS>,
        decode_attention_fresh_g1_d128 = <1, 128, FRESH_TOKENS>,
        decode_attention_fresh_g2_d128 = <2, 128, FRESH_TOKENS>,
        decode_attention_fresh_g3_d128 = <3, 128, FRESH_TOKENS>,
        decode_attention_fresh_g4_d128 = <4, 128, FRESH_TOKENS>,
        decode_attention_fresh_g5_d128 = <5, 128, FRESH_TOKENS>,
        decode_attention_fresh_g6_d128 = <6, 128, FRESH_TOKENS>,
        decode_attention_fresh_g7_d128 = <7, 128, FRESH_TOKENS>,
        decode_attention_fresh_g8_d128 = <8, 128, FRESH_TOKENS>,
    }
    // Head dimension 256: one lane per 16-byte vector of a row, so a row takes the whole
    // warp (one token per warp per step) and the registers per lane are those of d128.
    entries! {
        decode_attention_g1_d256 = <1, 256, ALL_TOKENS>,
        decode_attention_g2_d256 = <2, 256, ALL_TOKENS>,
        decode_attention_g4_d256 = <4, 256, ALL_TOKENS>,
        decode_attention_resident_g1_d256 = <1, 256, RESIDENT_TOKENS>,
        decode_attention_resident_g2_d256 = <2, 256, RESIDENT_TOKENS>,
        decode_attention_resident_g4_d256 = <4, 256, RESIDENT_TOKENS>,
        decode_attention_fresh_g1_d256 = <1, 256, FRESH_TOKENS>,
        decode_attention_fresh_g2_d256 = <2, 256, FRESH_TOKENS>,
        decode_attention_fresh_g4_d256 = <4, 256, FRESH_TOKENS>,
    }
}
