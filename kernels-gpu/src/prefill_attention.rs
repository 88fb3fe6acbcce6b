//! Causal GQA prefill attention (flash-attention 2 style, on `mma.sync` bf16 tensor cores).
//!
//! A ragged batch of new query tokens attends causally to each sequence's KV cache, right
//! after the driver wrote the chunk's keys and values there: query `i` of sequence `b` sits at
//! absolute position `start_b + i` and sees cache positions `0..=start_b + i`. Keys and
//! values use the decode layout ([`SequenceLayout`](crate::attention::SequenceLayout));
//! queries and outputs are `[tokens, q_heads, head_dim]` bf16, each sequence's rows placed by
//! a [`QueryPlacement`].
//!
//! Work split: a block owns [`block_rows`] query rows of one (sequence, KV head). Rows pack
//! the `G` query heads of the KV head's group position by position (row `r` is position
//! `r / G`, head `r % G` of the group), so each K/V tile staged in shared memory serves the
//! whole group. Each of the [`warps`] warps owns 16 rows: it keeps its Q fragments in
//! registers, computes `S = Q·Kᵀ` for a [`KEY_TILE`]-key tile with
//! `mma.sync.m16n8k16` (bf16 in, f32 accumulate), updates the online softmax in f32 with
//! `exp2` (scores in the log2 domain), reuses the S accumulators as the bf16 A operand of
//! `O += P·V` (by default as two bf16 halves `P_hi + P_lo`, an mma each: see
//! [`DEFAULT_SPLIT_P`]), and normalises at the end. K/V tiles are copied with `cp.async` into
//! two shared-memory stages, the next tile's copies in flight while the current one is used.
//! Tiles past a block's last position are never loaded; a warp skips tiles past its own last
//! position and masks only the tiles that cross its first position (the diagonal).
//!
//! With a sliding window, a block starts at the key tile of its first row's lowest key, and
//! the tiles below a warp's highest lowest key are masked as the diagonal is.
//!
//! Blocks come from a host-built tile table ([`PrefillTile`]), heaviest (most key tiles)
//! first, each tile run for every KV head: block `x` is tile `x / kv_heads`, head
//! `x % kv_heads`, so the long causal rows start first and the short ones fill the tail.

/// Warps per block with a compiled kernel (for every head dimension).
pub const WARP_COUNTS: [u32; 2] = [4, 8];

/// Default warps per block for a head dimension, each owning 16 query rows (d 256: 4, the
/// only count compiled, see [`key_tile`]). Measured on the
/// H100 (`benches/prefill_attention.rs`, split P): d 128, 8 warps 212 TFLOP/s against 207 for
/// 4 at 32K tokens, 210 against 210 at 16K, 197 against 207 at 4K (one 8-warp block per SM
/// at 219 registers, K/V tiles shared by 128 rows); d 64, 4 warps 154 against 136 for 8 at 4K
/// (three 4-warp blocks per SM at 133 registers). With P in one bf16: 267 / 255 at 32K, 182 /
/// 152 at 4K.
pub const fn warps(head_dim: u32) -> u32 {
    if head_dim <= 64 || head_dim > 128 {
        4
    } else {
        8
    }
}

/// Threads per block.
pub const fn threads(warps: u32) -> u32 {
    warps * 32
}

/// Query rows (position x group head pairs) per block.
pub const fn block_rows(warps: u32) -> u32 {
    warps * 16
}

/// Keys per K/V tile (head dimensions up to 128).
pub const KEY_TILE: u32 = 64;

/// Keys per K/V tile for a head dimension. At 256 a warp's 16 x 256 f32 output takes 128
/// registers, so its Q fragments are read from shared memory at every tile instead of kept
/// in 64 more registers, and tiles are 16 keys: 32-key tiles (a 16-register S) still spilled
/// 8-16 bytes on sm_89 and sm_90 with P split. The Q tile of 4 warps and two stages of K and
/// V then take (64 + 4 x 16) rows of 528 bytes, 66 KB (64-key tiles would be 165 KB, past an
/// A100's 163 KB).
pub const fn key_tile(head_dim: u32) -> u32 {
    if head_dim > 128 {
        16
    } else {
        KEY_TILE
    }
}
/// K/V tiles in flight per block (double buffering).
pub const STAGES: u32 = 2;
/// Padding of each shared-memory row, in bf16: 16 bytes, so `ldmatrix` rows hit distinct banks.
pub const ROW_PAD: u32 = 8;
/// bf16 values per 16-byte vector: offsets of K/V blocks must be multiples of it.
pub const VECTOR: u32 = 8;
/// Largest GQA group (query heads per KV head). The group is a launch parameter (rows pack
/// each position's heads), so GLM-4's 16 needs no kernel of its own.
pub const MAX_GROUP: u32 = 16;
/// Head dimensions with a compiled kernel (256 with 4 warps per block only).
pub const HEAD_DIMS: [u32; 3] = [64, 128, 256];
/// Score of a masked key (finite, so `exp2(m_old - m_new)` never forms inf - inf).
pub const MASKED: f32 = -1.0e30;

/// Where one sequence's new query tokens are in `q`/`out`, and where they sit in its cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct QueryPlacement {
    /// First token row of this sequence in `q` and `out`.
    pub query_offset: u32,
    /// New query tokens this call (rows `query_offset..query_offset + query_len`).
    pub query_len: u32,
    /// Tokens already in the cache before these queries: query `i` is at absolute position
    /// `start + i` and attends to cache positions `0..=start + i` (needs
    /// `start + query_len <= len` of the sequence's
    /// [`SequenceLayout`](crate::attention::SequenceLayout)).
    pub start: u32,
}

/// One block's rows: [`block_rows`] rows of a sequence starting at `row_start` (in the
/// sequence's `query_len * group` packed rows).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PrefillTile {
    pub sequence: u32,
    pub row_start: u32,
}

/// The kernel's one parameter struct, passed by value. Pointers are device addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PrefillAttentionParams {
    /// `[tokens, q_heads, head_dim]` bf16, post-RoPE.
    pub q: u64,
    /// bf16 keys and values, laid out per
    /// [`SequenceLayout`](crate::attention::SequenceLayout).
    pub k: u64,
    pub v: u64,
    /// `[tokens, q_heads, head_dim]` bf16; rows no query covers are left untouched.
    pub out: u64,
    /// `[batch]` [`SequenceLayout`](crate::attention::SequenceLayout) and `[batch]`
    /// [`QueryPlacement`].
    pub layouts: u64,
    pub queries: u64,
    /// `[tile_count]` [`PrefillTile`].
    pub tiles: u64,
    pub tile_count: u32,
    pub kv_heads: u32,
    pub q_heads: u32,
    /// `q_heads / kv_heads`.
    pub group: u32,
    /// `softmax_scale * log2(e)`.
    pub scale_log2: f32,
    /// Sliding window (Gemma's local layers), 0 for none: the query at position `pos` attends
    /// only to the keys at positions `pos - window < key <= pos`.
    pub window: u32,
}

/// Dynamic shared memory: the Q tile `[block_rows, d + pad]`, then [`STAGES`] K tiles and
/// [`STAGES`] V tiles `[key_tile(d), d + pad]`, all bf16.
pub const fn shared_bytes(head_dim: u32, warps: u32) -> u32 {
    (block_rows(warps) + 2 * STAGES * key_tile(head_dim)) * (head_dim + ROW_PAD) * 2
}

/// Packed rows of a sequence: each position times the group's heads.
pub const fn rows(query_len: u32, group: u32) -> u64 {
    query_len as u64 * group as u64
}

/// Key tiles a block of `block_rows` rows starting at packed row `row_start` walks: through
/// the last position it holds (`start + last + 1` keys).
pub const fn key_tiles(
    placement: &QueryPlacement,
    group: u32,
    row_start: u32,
    block_rows: u32,
) -> u32 {
    let rows = rows(placement.query_len, group);
    let block_end = row_start as u64 + block_rows as u64;
    let end = if block_end < rows { block_end } else { rows };
    if end <= row_start as u64 || group == 0 {
        return 0;
    }
    let keys = placement.start as u64 + (end - 1) / group as u64 + 1;
    keys.div_ceil(KEY_TILE as u64) as u32
}

/// Whether the default kernels split P in two bf16 halves for `O += P·V` (see
/// [`kernel_name_for`]). P rounded once to bf16 (2^-9 relative per weight) moves each output
/// row by up to its own bf16 rounding again, coherently along the heavy keys' values (worst
/// rows 1.5-1.8x the bf16 rounding of the exact result on attention-sink inputs,
/// `tests/prefill_attention.rs`; 11-17% of outputs off the correctly rounded value), and on
/// SmolLM2-135M (37-token prompt) the prefill logits' error against the f32 CPU path was
/// 1.30e-2, against 6.4e-3 split and 3.9e-3 through the decode kernel. Split, the output is
/// the bf16 rounding of the exact result but for ~0.15% of elements (the decode kernel's:
/// ~0.1%). Cost on the H100: 22-25% more time (Llama-3-8B heads 4K-32K, SmolLM2 4K).
pub const DEFAULT_SPLIT_P: bool = true;

/// Entry-point name of the default kernel for a head dimension (with [`warps`] warps).
#[cfg(not(target_arch = "nvptx64"))]
pub fn kernel_name(head_dim: u32) -> String {
    kernel_name_for(head_dim, warps(head_dim), DEFAULT_SPLIT_P)
}

/// Entry-point name of the kernel for a head dimension and a warp count of [`WARP_COUNTS`],
/// with the default P precision ([`DEFAULT_SPLIT_P`]).
#[cfg(not(target_arch = "nvptx64"))]
pub fn kernel_name_with_warps(head_dim: u32, warps_per_block: u32) -> String {
    kernel_name_for(head_dim, warps_per_block, DEFAULT_SPLIT_P)
}

/// Entry-point name of the kernel for a head dimension, a warp count of [`WARP_COUNTS`] and
/// a P precision: `split_p` multiplies V by P as two bf16 halves `P_hi + P_lo` (two mma's,
/// P exact to about 2^-17), else by P rounded once to bf16 (2^-9).
#[cfg(not(target_arch = "nvptx64"))]
pub fn kernel_name_for(head_dim: u32, warps_per_block: u32, split_p: bool) -> String {
    let precision = if split_p { "" } else { "bf16p_" };
    if warps_per_block == warps(head_dim) {
        format!("prefill_attention_{precision}d{head_dim}")
    } else {
        format!("prefill_attention_{precision}w{warps_per_block}_d{head_dim}")
    }
}

// Register arrays are indexed by loop counters that unroll to constants.
#[cfg(target_arch = "nvptx64")]
#[allow(clippy::needless_range_loop)]
mod kernel {
    use super::*;
    use crate::attention::SequenceLayout;
    use crate::device::*;
    use core::num::NonZeroU32;

    /// # Safety
    /// The host launcher validated the layouts, query placements and tile table against the
    /// buffers (every tile's rows lie in its sequence's query rows, `start + query_len <= len
    /// <= capacity`, K/V blocks and q/out rows inside their buffers, 16-byte aligned),
    /// `group` in 1..=MAX_GROUP with `q_heads = group * kv_heads`, `head_dim == D`, `N == D / 8`,
    /// `KS == D / 16`, a tile table of [`block_rows`]`(W)` rows per tile, and launched
    /// `tile_count * kv_heads` blocks of [`threads`]`(W)` threads with [`shared_bytes`] of
    /// dynamic shared memory.
    ///
    /// `KEY_N_TILES` is `key_tile(D) / 8`, the key n-tiles (8 keys each) of a K/V tile;
    /// `Q_IN_REGISTERS` keeps the warp's Q fragments in registers, else they are read from
    /// the staged Q tile at every K/V tile.
    #[inline(always)]
    pub unsafe fn prefill_attention<
        const D: usize,
        const N: usize,
        const KS: usize,
        const W: u32,
        const SPLIT_P: bool,
        const KEY_N_TILES: usize,
        const Q_IN_REGISTERS: bool,
    >(
        p: &PrefillAttentionParams,
    ) {
        const { assert!(KEY_N_TILES * 8 == key_tile(D as u32) as usize) };
        let key_tile_len = (KEY_N_TILES * 8) as u32;
        let (block_rows, threads) = (block_rows(W), threads(W));
        // Non-zero divisors keep the kernel free of panic paths (validated on the host).
        let (Some(kv_heads), Some(group)) = (NonZeroU32::new(p.kv_heads), NonZeroU32::new(p.group))
        else {
            return;
        };
        let block = block_idx_x();
        let (tile_index, kv_head) = (block / kv_heads, block % kv_heads);
        if tile_index >= p.tile_count {
            return;
        }
        let (warp, lane, tid) = (warp_id(), lane_id(), thread_idx_x());
        let tile = *(p.tiles as *const PrefillTile).add(tile_index as usize);
        let layout = *(p.layouts as *const SequenceLayout).add(tile.sequence as usize);
        let queries = *(p.queries as *const QueryPlacement).add(tile.sequence as usize);
        let rows = queries.query_len * group.get();
        let row_start = tile.row_start;
        let row_end = min_u32(row_start.saturating_add(block_rows), rows);
        if row_start >= row_end {
            return;
        }
        // Keys the block needs: through its last position (<= len, validated).
        let key_limit = queries.start + (row_end - 1) / group + 1;
        let key_tiles = key_limit.div_ceil(key_tile_len);
        // The lowest key the row at packed row `packed` sees: `position + 1 - window`.
        let window = p.window;
        let lowest_key = |packed: u32| {
            if window == 0 {
                0
            } else {
                (queries.start + packed / group + 1).saturating_sub(window)
            }
        };
        let first_tile = lowest_key(row_start) / key_tile_len;

        let stride = D + ROW_PAD as usize;
        let vectors = (D / 8) as u32;
        let q_shared = dynamic_shared::<u16>();
        let k_shared = q_shared.add(block_rows as usize * stride);
        let v_shared = k_shared.add((STAGES * key_tile_len) as usize * stride);
        let first_head = (kv_head * group.get()) as usize;
        let q_heads = p.q_heads as usize;

        // The block's Q rows (zeros past the last row).
        let mut index = tid;
        while index < block_rows * vectors {
            let (row, vector) = (index / vectors, (index % vectors) as usize);
            let target = q_shared.add(row as usize * stride + vector * 8);
            let packed = row_start + row;
            if packed < row_end {
                let token = (queries.query_offset + packed / group) as usize;
                let head = first_head + (packed % group) as usize;
                let source = (p.q as *const u16).add((token * q_heads + head) * D + vector * 8);
                copy_async_16(shared_address(target), source as *const Vec16);
            } else {
                *(target as *mut Vec16) = [0; 4];
            }
            index += threads;
        }
        copy_async_commit();

        // One K/V tile into a stage (zeros past the block's last key, so that P·V never
        // multiplies a zero weight by a NaN of an unwritten row).
        let head_base = layout.offset as usize + kv_head as usize * layout.capacity as usize * D;
        let k_head = (p.k as *const u16).add(head_base);
        let v_head = (p.v as *const u16).add(head_base);
        let load_tile = |key_tile: u32, stage: u32| {
            let mut index = tid;
            while index < key_tile_len * vectors {
                let (row, vector) = (index / vectors, (index % vectors) as usize);
                let key = key_tile * key_tile_len + row;
                let offset = (stage * key_tile_len + row) as usize * stride + vector * 8;
                let (k_target, v_target) = (k_shared.add(offset), v_shared.add(offset));
                if key < key_limit {
                    let source = key as usize * D + vector * 8;
                    copy_async_16(shared_address(k_target), k_head.add(source) as *const Vec16);
                    copy_async_16(shared_address(v_target), v_head.add(source) as *const Vec16);
                } else {
                    *(k_target as *mut Vec16) = [0; 4];
                    *(v_target as *mut Vec16) = [0; 4];
                }
                index += threads;
            }
            copy_async_commit();
        };
        load_tile(first_tile, first_tile & 1);

        // This warp's rows: packed rows warp_row.., positions and causal limits.
        let warp_row = row_start + warp * 16;
        let active = warp_row < row_end;
        let warp_last = min_u32(warp_row + 15, row_end - 1);
        // Keys every row of the warp sees (tiles below it need no mask), and keys any sees.
        let open_keys = queries.start + warp_row / group + 1;
        let warp_keys = queries.start + warp_last / group + 1;
        // The last key each of this thread's two rows (lane / 4 and lane / 4 + 8) sees.
        let row_limit = [
            queries.start + (warp_row + lane / 4) / group,
            queries.start + (warp_row + lane / 4 + 8) / group,
        ];
        let key_column = 2 * (lane % 4);
        // With a window: the lowest key of each of the two rows, and the highest lowest key
        // of the warp (tiles starting below it need the window's mask).
        let row_lowest = [
            lowest_key(warp_row + lane / 4),
            lowest_key(warp_row + lane / 4 + 8),
        ];
        let warp_lowest_last = lowest_key(warp_last);
        let warp_lowest_first = lowest_key(warp_row);

        // Q fragments (A operands, one per 16 dimensions), once the Q copies have landed.
        copy_async_wait::<1>();
        sync_threads();
        let mut q_fragments = [[0u32; 4]; KS];
        let q_lane = shared_address(
            q_shared
                .add((warp as usize * 16 + (lane % 16) as usize) * stride)
                .add((lane / 16) as usize * 8),
        );
        if Q_IN_REGISTERS {
            for ks in 0..KS {
                q_fragments[ks] = load_matrix_x4(q_lane + (ks * 32) as u32);
            }
        }
        // ldmatrix row addresses: K as the (column-major) B operand of Q·Kᵀ, V as the
        // row-major B operand of P·V (transposed load).
        let k_lane = shared_address(
            k_shared
                .add(((lane % 8) + (lane / 16) * 8) as usize * stride)
                .add(((lane / 8) % 2) as usize * 8),
        );
        let v_lane = shared_address(
            v_shared
                .add((lane % 16) as usize * stride)
                .add((lane / 16) as usize * 8),
        );
        let row_bytes = (stride * 2) as u32;

        let scale = p.scale_log2;
        let mut running_max = [MASKED; 2];
        let mut running_sum = [0.0f32; 2];
        let mut o = [[0.0f32; 4]; N];
        let mut key_tile = first_tile;
        while key_tile < key_tiles {
            let stage = key_tile & 1;
            if key_tile + 1 < key_tiles {
                load_tile(key_tile + 1, stage ^ 1);
                copy_async_wait::<1>();
            } else {
                copy_async_wait::<0>();
            }
            sync_threads();
            let first_key = key_tile * key_tile_len;
            // Tiles past the warp's last key, or wholly below its first row's window, are
            // skipped (the window's lowest keys rise with the rows).
            if active && first_key < warp_keys && first_key + key_tile_len > warp_lowest_first {
                let stage_offset = stage * key_tile_len * row_bytes;
                // S = Q·Kᵀ: 16 rows x 64 keys.
                let mut s = [[0.0f32; 4]; KEY_N_TILES];
                for ks in 0..KS {
                    let q_fragment = if Q_IN_REGISTERS {
                        q_fragments[ks]
                    } else {
                        load_matrix_x4(q_lane + (ks * 32) as u32)
                    };
                    for np in 0..KEY_N_TILES / 2 {
                        let b = load_matrix_x4(
                            k_lane + stage_offset + (np as u32 * 16) * row_bytes + (ks * 32) as u32,
                        );
                        s[2 * np] = mma_bf16_m16n8k16(q_fragment, [b[0], b[1]], s[2 * np]);
                        s[2 * np + 1] = mma_bf16_m16n8k16(q_fragment, [b[2], b[3]], s[2 * np + 1]);
                    }
                }
                // Mask keys past each row's position where the tile crosses the warp's
                // first position. Maxima are taken on the raw scores (the scale is
                // positive) and kept in the log2 domain: exp2(s * scale - max) is one fma.
                let masked = first_key + key_tile_len > open_keys;
                // Keys below a row's window weigh exactly 0 (-inf, never the running max:
                // that starts finite), so a tile wholly below one row's window adds nothing.
                let below_window = first_key < warp_lowest_last;
                let mut tile_max = [MASKED; 2];
                for n in 0..KEY_N_TILES {
                    for e in 0..4 {
                        let mut x = s[n][e];
                        if masked || below_window {
                            let key = first_key + (n * 8) as u32 + key_column + (e & 1) as u32;
                            if key > row_limit[e >> 1] {
                                x = MASKED;
                            }
                            if key < row_lowest[e >> 1] {
                                x = f32::NEG_INFINITY;
                            }
                        }
                        s[n][e] = x;
                        tile_max[e >> 1] = max_f32(tile_max[e >> 1], x);
                    }
                }
                // The four lanes of a row hold its 64 keys between them.
                let mut correction = [0.0f32; 2];
                for h in 0..2 {
                    tile_max[h] = max_f32(tile_max[h], shuffle_xor_f32(tile_max[h], 1));
                    tile_max[h] = max_f32(tile_max[h], shuffle_xor_f32(tile_max[h], 2));
                    let new_max = max_f32(running_max[h], tile_max[h] * scale);
                    correction[h] = exp2(running_max[h] - new_max);
                    running_max[h] = new_max;
                }
                // P = exp2(S - max); this thread's share of the row sums (the four lanes of a
                // row are summed at the end: their corrections are the same).
                let mut tile_sum = [0.0f32; 2];
                for n in 0..KEY_N_TILES {
                    for e in 0..4 {
                        let weight = exp2(s[n][e] * scale - running_max[e >> 1]);
                        s[n][e] = weight;
                        tile_sum[e >> 1] += weight;
                    }
                }
                for h in 0..2 {
                    running_sum[h] = running_sum[h] * correction[h] + tile_sum[h];
                }
                for n in 0..N {
                    for e in 0..4 {
                        o[n][e] *= correction[e >> 1];
                    }
                }
                // O += P·V: the S accumulators of 16 keys are the A fragment of one k-step.
                // With SPLIT_P, P = P_hi + P_lo with P_hi its top 16 bits (bf16 truncated: two
                // integer ops, no conversion) and P_lo = bf16(P - P_hi), the subtraction exact;
                // each half gets its mma, so P carries 2^-17 relative instead of bf16's 2^-9.
                for kk in 0..KEY_N_TILES / 2 {
                    let pairs = [
                        (s[2 * kk][0], s[2 * kk][1]),
                        (s[2 * kk][2], s[2 * kk][3]),
                        (s[2 * kk + 1][0], s[2 * kk + 1][1]),
                        (s[2 * kk + 1][2], s[2 * kk + 1][3]),
                    ];
                    let mut a = [0u32; 4];
                    let mut a_lo = [0u32; 4];
                    for i in 0..4 {
                        let (x, y) = pairs[i];
                        if SPLIT_P {
                            let (x_hi, y_hi) = (bf16_truncate(x), bf16_truncate(y));
                            a[i] = (x_hi.to_bits() >> 16) | y_hi.to_bits();
                            a_lo[i] = f32x2_to_bf16x2(x - x_hi, y - y_hi);
                        } else {
                            a[i] = f32x2_to_bf16x2(x, y);
                        }
                    }
                    let v_row = v_lane + stage_offset + (kk as u32 * 16) * row_bytes;
                    for n in (0..N).step_by(2) {
                        let b = load_matrix_x4_transposed(v_row + (n * 16) as u32);
                        o[n] = mma_bf16_m16n8k16(a, [b[0], b[1]], o[n]);
                        o[n + 1] = mma_bf16_m16n8k16(a, [b[2], b[3]], o[n + 1]);
                        if SPLIT_P {
                            o[n] = mma_bf16_m16n8k16(a_lo, [b[0], b[1]], o[n]);
                            o[n + 1] = mma_bf16_m16n8k16(a_lo, [b[2], b[3]], o[n + 1]);
                        }
                    }
                }
            }
            // The next iteration's copies overwrite the stage this one read.
            sync_threads();
            key_tile += 1;
        }

        // Normalise and store: this thread holds rows lane / 4 and lane / 4 + 8, columns
        // 8n + 2 (lane % 4) + {0, 1}.
        for h in 0..2 {
            running_sum[h] += shuffle_xor_f32(running_sum[h], 1);
            running_sum[h] += shuffle_xor_f32(running_sum[h], 2);
        }
        if !active {
            return;
        }
        for h in 0..2 {
            let packed = warp_row + lane / 4 + 8 * h as u32;
            if packed >= row_end {
                continue;
            }
            let token = (queries.query_offset + packed / group) as usize;
            let head = first_head + (packed % group) as usize;
            let target = (p.out as *mut u16).add((token * q_heads + head) * D);
            let inverse = 1.0 / running_sum[h];
            for n in 0..N {
                let column = n * 8 + key_column as usize;
                *(target.add(column) as *mut u32) =
                    f32x2_to_bf16x2(o[n][2 * h] * inverse, o[n][2 * h + 1] * inverse);
            }
        }
    }

    macro_rules! entries {
        ($($name:ident = <$d:literal, $n:literal, $ks:literal, $w:tt, $split:literal, $kn:literal, $q_reg:literal>),* $(,)?) => {$(
            #[no_mangle]
            pub unsafe extern "ptx-kernel" fn $name(params: PrefillAttentionParams) {
                prefill_attention::<$d, $n, $ks, $w, $split, $kn, $q_reg>(&params)
            }
        )*};
    }
    entries! {
        prefill_attention_d64 = <64, 8, 4, { warps(64) }, true, 8, true>,
        prefill_attention_d128 = <128, 16, 8, { warps(128) }, true, 8, true>,
        prefill_attention_w8_d64 = <64, 8, 4, 8, true, 8, true>,
        prefill_attention_w4_d128 = <128, 16, 8, 4, true, 8, true>,
        prefill_attention_bf16p_d64 = <64, 8, 4, { warps(64) }, false, 8, true>,
        prefill_attention_bf16p_d128 = <128, 16, 8, { warps(128) }, false, 8, true>,
        prefill_attention_bf16p_w8_d64 = <64, 8, 4, 8, false, 8, true>,
        prefill_attention_bf16p_w4_d128 = <128, 16, 8, 4, false, 8, true>,
        // d256: 4 warps only (registers: 128 for the output alone), 16-key tiles, Q
        // fragments from shared memory (see `key_tile`).
        prefill_attention_d256 = <256, 32, 16, { warps(256) }, true, 2, false>,
        prefill_attention_bf16p_d256 = <256, 32, 16, { warps(256) }, false, 2, false>,
    }
}
