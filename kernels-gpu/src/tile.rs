//! Register-tile primitives shared by the kernels that score keys against a GQA group's
//! queries (`scoring`, `attention`): each lane holds 8 of a row's `head_dim` dimensions (one
//! 16-byte vector), and the `lanes` lanes of a row are consecutive in the warp.
use crate::device::*;

/// This lane's 8 dimensions of each query head of the group of `kv_head`, raw bf16: query
/// `[batch, q_heads, D]` at `q`, for `sequence`, this lane at vector `lane_in_row` of a row.
/// Kept raw so the load can be issued early and converted later ([`scale_query`]).
///
/// # Safety
/// `q` holds `(sequence + 1) * q_heads * D` bf16 and `lane_in_row < D / 8`.
#[inline(always)]
pub unsafe fn load_query<const G: usize, const D: usize>(
    q: u64,
    sequence: u32,
    kv_head: u32,
    q_heads: u32,
    lane_in_row: u32,
) -> [Vec16; G] {
    let mut raw = [[0u32; 4]; G];
    for (g, slice) in raw.iter_mut().enumerate() {
        let row = query_row::<G, D>(q, sequence, kv_head, q_heads, g as u32);
        *slice = load_16(row.add((lane_in_row * 8) as usize) as *const Vec16);
    }
    raw
}

/// Query head `g` of the group of `kv_head` in `q` (`[batch, q_heads, D]` bf16), for
/// `sequence`.
#[inline(always)]
unsafe fn query_row<const G: usize, const D: usize>(
    q: u64,
    sequence: u32,
    kv_head: u32,
    q_heads: u32,
    g: u32,
) -> *const u16 {
    let q_head = kv_head * G as u32 + g;
    (q as *const u16).add((sequence * q_heads + q_head) as usize * D)
}

/// The raw query slices in f32, times `scale` (the softmax scale in the log2 domain).
#[inline(always)]
pub fn scale_query<const G: usize>(raw: [Vec16; G], scale: f32) -> [[f32; 8]; G] {
    let mut q = [[0.0f32; 8]; G];
    for g in 0..G {
        let values = bf16x8_to_f32(raw[g]);
        for j in 0..8 {
            q[g][j] = values[j] * scale;
        }
    }
    q
}

/// `q_g · key_u` for each head `g` and each of the first `used` of this lane's rows `keys`,
/// summed over the `lanes` lanes of each row (`shfl.sync.bfly` steps 1, 2, .. lanes / 2),
/// so every lane of a row holds the whole dot products. Every lane of the warp calls it.
#[inline(always)]
pub fn row_dots<const G: usize, const U: usize>(
    q: &[[f32; 8]; G],
    keys: &[Vec16; U],
    used: usize,
    lanes: u32,
) -> [[f32; U]; G] {
    let mut dots = [[0.0f32; U]; G];
    for (u, key) in keys.iter().enumerate().take(used) {
        let key = bf16x8_to_f32(*key);
        for g in 0..G {
            let mut dot = q[g][0] * key[0];
            for j in 1..8 {
                dot = fma(q[g][j], key[j], dot);
            }
            dots[g][u] = dot;
        }
    }
    let mut mask = 1;
    while mask < lanes {
        for dots_g in dots.iter_mut() {
            for dot in dots_g.iter_mut().take(used) {
                *dot += shuffle_xor_f32(*dot, mask);
            }
        }
        mask <<= 1;
    }
    dots
}

/// Rows of keys in one tensor-core group: the `n` of `mma.m16n8k16`.
pub const GROUP_ROWS: u32 = 8;
/// Most 16-byte vectors of a row that one lane holds in the tensor-core layout (head_dim 256:
/// each of the 4 lanes of a row holds 8 of its 32 vectors; smaller heads use the first
/// `D / 32`, the rest are constant zeros the compiler drops).
pub const MMA_ROW_VECTORS: usize = 8;

/// This lane's vectors of `row` (`D` bf16, `D` a multiple of 32, at most 256) in the
/// tensor-core layout: lane `t` (`lane % 4`) of the row takes vectors `t`, `t + 4`, ..; the
/// 4 lanes read each 64 bytes of the row together, so each load asks L2 for the whole
/// 256-byte block (`load_stream_16_block`; scoring at 16 x 32K went from 90.5% to 94.0% of
/// copy on the H100, `docs/EXPERIMENTS.md`). Streams past L1.
///
/// # Safety
/// `row` holds `D` bf16 and is 16-byte aligned.
#[inline(always)]
pub unsafe fn load_mma_row<const D: usize>(
    row: *const u16,
    lane_in_row: u32,
) -> [Vec16; MMA_ROW_VECTORS] {
    let mut vectors = [[0u32; 4]; MMA_ROW_VECTORS];
    for (v, vector) in vectors.iter_mut().enumerate().take(D / 32) {
        *vector = load_stream_16_block(row.add((v * 4 + lane_in_row as usize) * 8) as *const Vec16);
    }
    vectors
}

/// The group's query heads as the tensor cores' A operand: lane `4 g + t` holds head
/// `first_head + g`'s vectors in the layout of [`load_mma_row`] (zero past the group: rows of
/// A past the group). `first_head` is 0 for the rows 0..8 of A, 8 for rows 8..16 (groups past
/// 8, see [`group_dots_16`]).
///
/// # Safety
/// As [`load_query`]; `G <= 16`.
#[inline(always)]
pub unsafe fn load_group_query<const G: usize, const D: usize>(
    q: u64,
    sequence: u32,
    kv_head: u32,
    q_heads: u32,
    first_head: u32,
) -> [Vec16; MMA_ROW_VECTORS] {
    let lane = lane_id();
    let head = first_head + lane / 4;
    if head as usize >= G {
        return [[0u32; 4]; MMA_ROW_VECTORS];
    }
    let row = query_row::<G, D>(q, sequence, kv_head, q_heads, head);
    let mut vectors = [[0u32; 4]; MMA_ROW_VECTORS];
    for (v, vector) in vectors.iter_mut().enumerate().take(D / 32) {
        *vector = load_16(row.add((v * 4 + (lane % 4) as usize) * 8) as *const Vec16);
    }
    vectors
}

/// `q_g · row_n` for a group's query heads against 8 rows on the tensor cores
/// (`mma.m16n8k16`, bf16 in, f32 accumulate): A is the queries (head `g` in row `g`, rows
/// 8..16 zero), B the rows (`n = lane / 4`). Both take the K dimension in the same permuted
/// order (lane `t` holds vectors `t`, `t + 4`, ..), which a dot product does not see. Returns
/// this lane's two products: head `lane / 4` against rows `2 t` and `2 t + 1`. Every lane of
/// the warp calls it.
#[inline(always)]
pub fn group_dots<const D: usize>(
    q: &[Vec16; MMA_ROW_VECTORS],
    rows: &[Vec16; MMA_ROW_VECTORS],
) -> [f32; 2] {
    let mut c = [0.0f32; 4];
    for v in 0..D / 32 {
        for half in 0..2 {
            c = mma_bf16_m16n8k16(
                [q[v][2 * half], 0, q[v][2 * half + 1], 0],
                [rows[v][2 * half], rows[v][2 * half + 1]],
                c,
            );
        }
    }
    [c[0], c[1]]
}

/// [`group_dots`] for groups past 8: heads `lane / 4` (`low`) and `8 + lane / 4` (`high`) in
/// rows 0..8 and 8..16 of A. Returns this lane's four products: the low head against rows
/// `2 t` and `2 t + 1`, then the high head against the same rows.
#[inline(always)]
pub fn group_dots_16<const D: usize>(
    low: &[Vec16; MMA_ROW_VECTORS],
    high: &[Vec16; MMA_ROW_VECTORS],
    rows: &[Vec16; MMA_ROW_VECTORS],
) -> [f32; 4] {
    let mut c = [0.0f32; 4];
    for v in 0..D / 32 {
        for half in 0..2 {
            c = mma_bf16_m16n8k16(
                [
                    low[v][2 * half],
                    high[v][2 * half],
                    low[v][2 * half + 1],
                    high[v][2 * half + 1],
                ],
                [rows[v][2 * half], rows[v][2 * half + 1]],
                c,
            );
        }
    }
    c
}

/// Merges two online-softmax statistics `(max, sum of exp2(x - max))` into one.
#[inline(always)]
pub fn merge_softmax_stats(a: (f32, f32), b: (f32, f32)) -> (f32, f32) {
    let max = max_f32(a.0, b.0);
    (max, a.1 * exp2(a.0 - max) + b.1 * exp2(b.0 - max))
}

/// Merges each lane's softmax statistics with those of the lanes `lane ^ mask`, for mask
/// `first_mask`, `2 * first_mask`, .. below `end_mask`: every lane ends with the merge over
/// its lane set (the whole warp for 1 and 32). All 32 lanes must call it.
///
/// Never inlined, as `block::exclusive_count` and for the same reason: its shuffles must not
/// be cloned into the divergent loops that compute `stats`.
#[inline(never)]
pub fn warp_merge_softmax_stats(stats: (f32, f32), first_mask: u32, end_mask: u32) -> (f32, f32) {
    let mut merged = stats;
    let mut mask = first_mask;
    while mask < end_mask {
        let other = (
            shuffle_xor_f32(merged.0, mask),
            shuffle_xor_f32(merged.1, mask),
        );
        merged = merge_softmax_stats(merged, other);
        mask <<= 1;
    }
    merged
}
