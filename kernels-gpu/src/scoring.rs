//! Landmark scoring, pass one: `q_i · landmarkᵀ · scale` for the `G` query heads of each KV
//! head, over every landmark, in one pass over the landmarks (the largest thing a decode step
//! reads). Writes base-2 logits and, per block and query head, the (max, sum of `exp2`) of its
//! tile; `topk` merges those into each head's softmax normaliser, so the softmax needs no
//! second pass over the landmarks.
//!
//! Blocks are `(tile, kv_head, sequence)`; a tile is `tile_len` landmarks (see [`tile_len`]),
//! a quarter per warp. The products run on the tensor cores (`tile::group_dots`: the group's
//! queries against 8 landmarks per `mma.m16n8k16`), [`UNROLL`] groups of 8 loaded ahead
//! (double-buffered, as in `attention`). With the products on the CUDA cores (16 lanes per
//! landmark, shuffle reductions) scoring was bound by its instructions (2.5 instructions per
//! cycle at 16 x 32K in Nsight Compute); on the tensor cores 1 x 122K issues in 16% of the
//! cycles and waits on its loads (the two compared in `docs/EXPERIMENTS.md`, Scoring).

use crate::shadow::ShadowShape;

use core::num::NonZeroU32;

pub const WARPS: u32 = 4;
pub const THREADS: u32 = WARPS * 32;
/// Landmarks per block, longest first: [`tile_len`] picks one per batch. (64 helped 1 x 32K
/// but slowed 1 x 122K, which then picks it too: `docs/EXPERIMENTS.md`.)
pub const TILE_LENS: [u32; 3] = [512, 256, 128];
/// Blocks a scoring launch aims for at least (about 8 per multiprocessor on an H100): each
/// warp walks its rows one load latency at a time, so a small batch needs shorter tiles (more
/// warps) to keep enough loads in flight (b1 x 122K: 240 blocks of 512 reached 53% of copy).
/// (Tiles sized for exactly one wave were 22% slower at 16 x 122K: `docs/EXPERIMENTS.md`.)
pub const MIN_BLOCKS: usize = 1024;
/// Groups of 8 landmarks each warp loads before using them (each lane holds 4 vectors of
/// every group at head_dim 128): 2 (116 registers) kept more loads in flight than 1 (82),
/// 91.6% of copy against 87.8% at 16 x 32K on the H100. Other ways to hide the loads (a
/// bulk-copy ring through shared memory, an L2 prefetch of each tile) were slower at the
/// shapes that matter: `docs/EXPERIMENTS.md`, Scoring.
pub const UNROLL: u32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ScoringParams {
    pub shape: ShadowShape,
    /// `[batch, Hkv * G, d]` bf16 post-RoPE queries.
    pub q: u64,
    /// bf16 landmarks (see `shadow`).
    pub landmarks: u64,
    /// f32 base-2 logits `[.., Hkv, G, landmarks]` (see `shadow`).
    pub logits: u64,
    /// f32 `[batch, Hkv, max_tiles, G, 2]`: (max, sum of exp2(logit - max)) per tile and head.
    pub tile_stats: u64,
    /// Tiles of the sequence with the most landmarks (grid x).
    pub max_tiles: u32,
    /// Landmarks per tile: one of [`TILE_LENS`].
    pub tile_len: u32,
    /// `softmax_scale * log2(e)`.
    pub scale_log2: f32,
    pub _reserved: u32,
}

/// The tile length for a batch of `landmark_rows` landmarks (over every sequence and KV
/// head): the longest of [`TILE_LENS`] that still gives [`MIN_BLOCKS`] blocks.
pub const fn tile_len(landmark_rows: usize) -> u32 {
    let mut i = 0;
    while i + 1 < TILE_LENS.len() {
        if landmark_rows / TILE_LENS[i] as usize >= MIN_BLOCKS {
            return TILE_LENS[i];
        }
        i += 1;
    }
    TILE_LENS[TILE_LENS.len() - 1]
}

/// Tiles of `tile_len` that cover `landmarks` landmarks.
pub fn tiles(landmarks: u32, tile_len: NonZeroU32) -> u32 {
    landmarks / tile_len + (landmarks % tile_len != 0) as u32
}

/// Index of (sequence, kv_head, tile, g) in `tile_stats`, in (max, sum) pairs.
pub const fn tile_stat_index(
    sequence: u32,
    kv_head: u32,
    tile: u32,
    g: u32,
    kv_heads: u32,
    max_tiles: u32,
    group: u32,
) -> usize {
    (((sequence as usize * kv_heads as usize + kv_head as usize) * max_tiles as usize
        + tile as usize)
        * group as usize
        + g as usize)
        * 2
}

/// Dynamic shared memory: per warp and head, the (max, sum) of the warp.
pub const fn shared_bytes(group: u32) -> u32 {
    WARPS * group * 2 * 4
}

#[cfg(not(target_arch = "nvptx64"))]
pub fn kernel_name(group: u32, head_dim: u32) -> String {
    format!("landmark_scoring_g{group}_d{head_dim}")
}

#[cfg(target_arch = "nvptx64")]
#[allow(clippy::needless_range_loop)]
mod kernel {
    use super::*;
    use crate::attention::NO_SCORE;
    use crate::device::*;
    use crate::shadow::ShadowSequence;
    use crate::tile::{
        group_dots, group_dots_16, load_group_query, load_mma_row, merge_softmax_stats,
        warp_merge_softmax_stats, GROUP_ROWS, MMA_ROW_VECTORS,
    };

    /// # Safety
    /// The host launcher validated every layout against the buffers and launched
    /// `(max_tiles, kv_heads, sequences)` blocks of [`THREADS`] with [`shared_bytes`].
    #[inline(always)]
    pub unsafe fn landmark_scoring<const G: usize, const D: usize>(p: &ScoringParams) {
        let tile = block_idx_x();
        let kv_head = block_idx_y();
        let shape = &p.shape;
        let sequence_index = shape.first_sequence + block_idx_z();
        let (warp, lane) = (warp_id(), lane_id());
        // Tensor-core layout (see `tile::group_dots`): this lane loads row `lane / 4` of each
        // group of 8 landmarks, and holds head `lane / 4`'s logits of rows `2 t`, `2 t + 1`.
        let (row_in_group, lane_in_row) = (lane / 4, lane % 4);
        // Groups past 8 (GLM-4's 16) fill rows 8..16 of A too: this lane also holds head
        // `lane / 4 + 8` (`heads_per_lane`; the second is compiled out below 9).
        const { assert!(G <= 16) };
        let heads_per_lane = if G > 8 { 2 } else { 1 };
        let lane_heads = [row_in_group, row_in_group + 8];
        let q_heads = shape.kv_heads * G as u32;

        let q = load_group_query::<G, D>(p.q, sequence_index, kv_head, q_heads, 0);
        let q_high = if G > 8 {
            load_group_query::<G, D>(p.q, sequence_index, kv_head, q_heads, 8)
        } else {
            [[0u32; 4]; MMA_ROW_VECTORS]
        };
        let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
        let count = sequence.landmarks;
        let start = tile * p.tile_len;
        if start >= count {
            return;
        }
        // This warp's contiguous quarter of the tile.
        let warp_len = p.tile_len / WARPS;
        let warp_start = start + warp * warp_len;
        let warp_end = min_u32(warp_start + warp_len, count);
        let base = sequence.landmark_base(kv_head);
        let landmarks = (p.landmarks as *const u16).add(base as usize * D);
        // Each of this lane's heads' logits (lanes of heads past the group write none).
        let logit_rows = lane_heads.map(|head| {
            (p.logits as *mut f32).add(sequence.logit_base(
                kv_head,
                G as u32,
                min_u32(head, G as u32 - 1),
            ) as usize)
        });
        let keeps_head = lane_heads.map(|head| (head as usize) < G);

        let mut running = [(NO_SCORE, 0.0f32); 2];
        let step = GROUP_ROWS * UNROLL;
        let load = |first: u32| {
            let mut rows = [[[0u32; 4]; MMA_ROW_VECTORS]; UNROLL as usize];
            for u in 0..UNROLL as usize {
                let landmark = first + u as u32 * GROUP_ROWS + row_in_group;
                if landmark < warp_end {
                    rows[u] = load_mma_row::<D>(landmarks.add(landmark as usize * D), lane_in_row);
                }
            }
            rows
        };
        let mut next = load(warp_start);
        let mut first = warp_start;
        while first < warp_end {
            let rows = next;
            if first + step < warp_end {
                next = load(first + step);
            }
            let mut step_max = [NO_SCORE; 2];
            let mut mine = [[[NO_SCORE; 2]; UNROLL as usize]; 2];
            for u in 0..UNROLL as usize {
                let dots = if G > 8 {
                    group_dots_16::<D>(&q, &q_high, &rows[u])
                } else {
                    let [low, high] = group_dots::<D>(&q, &rows[u]);
                    [low, high, 0.0, 0.0]
                };
                for h in 0..heads_per_lane {
                    for half in 0..2 {
                        let landmark =
                            first + u as u32 * GROUP_ROWS + 2 * lane_in_row + half as u32;
                        if keeps_head[h] && landmark < warp_end {
                            let logit = dots[2 * h + half] * p.scale_log2;
                            *logit_rows[h].add(landmark as usize) = logit;
                            mine[h][u][half] = logit;
                            step_max[h] = max_f32(step_max[h], logit);
                        }
                    }
                }
            }
            for h in 0..heads_per_lane {
                if step_max[h] > NO_SCORE {
                    let max = max_f32(running[h].0, step_max[h]);
                    let mut sum = running[h].1 * exp2(running[h].0 - max);
                    for pair in mine[h] {
                        for x in pair {
                            if x > NO_SCORE {
                                sum += exp2(x - max);
                            }
                        }
                    }
                    running[h] = (max, sum);
                }
            }
            first += step;
        }

        // Merge the 4 lanes of each head, then the warps: lane 4 g holds head g's (and
        // g + 8's) statistics of the warp.
        let shared = dynamic_shared::<f32>();
        for h in 0..heads_per_lane {
            running[h] = warp_merge_softmax_stats(running[h], 1, 4);
            let head = lane_heads[h] as usize;
            if keeps_head[h] && lane_in_row == 0 {
                *shared.add((warp as usize * G + head) * 2) = running[h].0;
                *shared.add((warp as usize * G + head) * 2 + 1) = running[h].1;
            }
        }
        sync_threads();
        let g = thread_idx_x() as usize;
        if g < G {
            let mut block = (NO_SCORE, 0.0f32);
            for w in 0..WARPS as usize {
                let at = (w * G + g) * 2;
                block = merge_softmax_stats(block, (*shared.add(at), *shared.add(at + 1)));
            }
            let (block_max, sum) = block;
            let at = tile_stat_index(
                sequence_index,
                kv_head,
                tile,
                g as u32,
                shape.kv_heads,
                p.max_tiles,
                G as u32,
            );
            *(p.tile_stats as *mut f32).add(at) = block_max;
            *(p.tile_stats as *mut f32).add(at + 1) = sum;
        }
    }

    macro_rules! entries {
        ($($name:ident = <$g:literal, $d:literal>),* $(,)?) => {$(
            #[no_mangle]
            pub unsafe extern "ptx-kernel" fn $name(params: ScoringParams) {
                landmark_scoring::<$g, $d>(&params)
            }
        )*};
    }
    entries! {
        landmark_scoring_g1_d64 = <1, 64>, landmark_scoring_g2_d64 = <2, 64>,
        landmark_scoring_g3_d64 = <3, 64>, landmark_scoring_g4_d64 = <4, 64>,
        landmark_scoring_g5_d64 = <5, 64>, landmark_scoring_g6_d64 = <6, 64>,
        landmark_scoring_g7_d64 = <7, 64>, landmark_scoring_g8_d64 = <8, 64>,
        landmark_scoring_g1_d128 = <1, 128>, landmark_scoring_g2_d128 = <2, 128>,
        landmark_scoring_g3_d128 = <3, 128>, landmark_scoring_g4_d128 = <4, 128>,
        landmark_scoring_g5_d128 = <5, 128>, landmark_scoring_g6_d128 = <6, 128>,
        landmark_scoring_g7_d128 = <7, 128>, landmark_scoring_g8_d128 = <8, 128>,
    }
    // GLM-4's group 16 (rows 8..16 of the tensor cores' A operand; see `tile::group_dots_16`).
    entries! {
        landmark_scoring_g16_d64 = <16, 64>, landmark_scoring_g16_d128 = <16, 128>,
    }
    // Head dimension 256: the groups of `attention::D256_GROUPS`.
    entries! {
        landmark_scoring_g1_d256 = <1, 256>, landmark_scoring_g2_d256 = <2, 256>,
        landmark_scoring_g4_d256 = <4, 256>,
    }
}
