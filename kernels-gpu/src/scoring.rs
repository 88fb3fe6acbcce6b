//! Landmark scoring, pass one: `q_i · landmarkᵀ · scale` for the `G` query heads of each KV
//! head, over every landmark, in one pass over the landmarks (the largest thing a decode step
//! reads). Writes base-2 logits and, per block and query head, the (max, sum of `exp2`) of its
//! tile; `topk` merges those into each head's softmax normaliser, so the softmax needs no
//! second pass over the landmarks.
//!
//! Blocks are `(tile, kv_head, sequence)`; a tile is `tile_len` landmarks (see [`tile_len`]),
//! a quarter per warp, `32 / lanes_per_row` landmarks per warp row and [`UNROLL`] rows loaded
//! ahead (double-buffered, as in `attention`).

use crate::shadow::ShadowShape;

use core::num::NonZeroU32;

pub const WARPS: u32 = 4;
pub const THREADS: u32 = WARPS * 32;
/// Landmarks per block, longest first: [`tile_len`] picks one per batch. (64 as well: 1 x 32K
/// took 7.1 µs against 7.4, but 1 x 122K then picks it too and went 16.3 -> 17.8 µs; H100,
/// 2026-11-24.)
pub const TILE_LENS: [u32; 3] = [512, 256, 128];
/// Blocks a scoring launch aims for at least (about 8 per multiprocessor on an H100): each
/// warp walks its rows one load latency at a time, so a small batch needs shorter tiles (more
/// warps) to keep enough loads in flight (b1 x 122K: 240 blocks of 512 reached 53% of copy).
/// (Tiles sized for exactly one wave, 528 blocks, measured 3% faster at 1 x 122K and 22%
/// slower at 16 x 122K: `docs/scoring-one-wave-tiles-h100.log`.)
pub const MIN_BLOCKS: usize = 1024;
/// Rows of landmarks each lane group loads before using them. Measured on the H100 at batch
/// 16 x 122K, before each lane kept one head's statistics (`docs/scoring-unroll*-h100.log`):
/// 2 gave 75.8% of copy, 4 gave 79.1%, 8 gave
/// 65.1% (its registers leave fewer blocks per SM). Streaming the rows through a 4-step
/// `cp.async` ring per warp instead (`docs/experiments/scoring-cp-async.diff`, 104 registers)
/// gave 79.3% there and 68.2% at 16 x 32K (`docs/scoring-cp-async-h100.log`): bytes in
/// flight are not what holds it below copy speed.
pub const UNROLL: u32 = 4;
/// bf16 values per 16-byte vector.
pub const VECTOR: u32 = 8;

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
        load_query, merge_softmax_stats, row_dots, scale_query, warp_merge_softmax_stats,
    };

    /// # Safety
    /// The host launcher validated every layout against the buffers and launched
    /// `(max_tiles, kv_heads, sequences)` blocks of [`THREADS`] with [`shared_bytes`].
    #[inline(always)]
    pub unsafe fn landmark_scoring<const G: usize, const D: usize>(p: &ScoringParams) {
        let lanes = (D as u32) / VECTOR;
        let rows_per_warp = 32 / lanes;
        let tile = block_idx_x();
        let kv_head = block_idx_y();
        let shape = &p.shape;
        let sequence_index = shape.first_sequence + block_idx_z();
        let (warp, lane) = (warp_id(), lane_id());
        let lane_in_row = lane % lanes;
        let row_in_warp = lane / lanes;
        let q_heads = shape.kv_heads * G as u32;

        let q_raw = load_query::<G, D>(p.q, sequence_index, kv_head, q_heads, lane_in_row);
        let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
        let count = sequence.landmarks;
        let start = tile * p.tile_len;
        if start >= count {
            return;
        }
        let q = scale_query(q_raw, p.scale_log2);
        // This warp's contiguous quarter of the tile.
        let warp_len = p.tile_len / WARPS;
        let warp_start = start + warp * warp_len;
        let warp_end = min_u32(warp_start + warp_len, count);
        let base = sequence.landmark_base(kv_head);
        let column = (lane_in_row * VECTOR) as usize;
        let landmarks = (p.landmarks as *const u16).add(base as usize * D + column);
        let mut logit_rows = [core::ptr::null_mut::<f32>(); G];
        for g in 0..G {
            logit_rows[g] = (p.logits as *mut f32)
                .add(sequence.logit_base(kv_head, G as u32, g as u32) as usize);
        }

        // Lane g of each row group keeps head g's softmax statistics (lanes >= G keep none):
        // one head per lane instead of every head in every lane, which made scoring
        // issue-bound (Nsight Compute: 0.82 warps issued per scheduler and cycle).
        let mut running = (NO_SCORE, 0.0f32);
        let step = rows_per_warp * UNROLL;
        let load = |first: u32| {
            let mut rows = [[0u32; 4]; UNROLL as usize];
            for u in 0..UNROLL as usize {
                let landmark = first + u as u32 * rows_per_warp + row_in_warp;
                if landmark < warp_end {
                    rows[u] = load_stream_16(landmarks.add(landmark as usize * D) as *const Vec16);
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
            let logits = row_dots(&q, &rows, UNROLL as usize, lanes);
            // This lane's head's logit of each row (NO_SCORE past the warp's rows).
            let mut mine = [NO_SCORE; UNROLL as usize];
            let mut step_max = NO_SCORE;
            for u in 0..UNROLL as usize {
                let landmark = first + u as u32 * rows_per_warp + row_in_warp;
                if landmark < warp_end {
                    for g in 0..G {
                        // Lane g of the row's lane group writes and keeps head g's logit.
                        if lane_in_row == g as u32 {
                            *logit_rows[g].add(landmark as usize) = logits[g][u];
                            mine[u] = logits[g][u];
                        }
                    }
                    step_max = max_f32(step_max, mine[u]);
                }
            }
            if (lane_in_row as usize) < G && step_max > NO_SCORE {
                let max = max_f32(running.0, step_max);
                let mut sum = running.1 * exp2(running.0 - max);
                for x in mine {
                    if x > NO_SCORE {
                        sum += exp2(x - max);
                    }
                }
                running = (max, sum);
            }
            first += step;
        }

        // Merge the warp's rows (the lanes of the same head in the other row groups), then
        // the warps: lane g (row group 0) holds head g's statistics of the warp.
        running = warp_merge_softmax_stats(running, lanes);
        let shared = dynamic_shared::<f32>();
        if (lane as usize) < G {
            *shared.add((warp as usize * G + lane as usize) * 2) = running.0;
            *shared.add((warp as usize * G + lane as usize) * 2 + 1) = running.1;
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
}
