//! Low-rank key rebuild with fused RoPE, for the misses only: for each missed chunk, its `c`
//! rows of `A` (`[c, r]`) times `Bm_h` (`[r, d]`) on the tensor cores (`mma.sync.m16n8k16`,
//! bf16 in, f32 accumulate), rotated at each token's absolute position (`chunk * c + t`),
//! written as bf16 keys into the chunk's slot.
//!
//! Blocks are `(split, kv_head, sequence)`. A block stages `Bm_h` in shared memory once, then
//! each warp takes 16-row tiles of the (miss, token) rows: it gathers their `A` rows with
//! `cp.async`, multiplies, rotates in registers (the accumulator layout gives each thread
//! both halves of every rotate-half pair) and stores.

pub use crate::rope::RotaryLayout;
use crate::shadow::ShadowShape;

pub const WARPS: u32 = 4;
pub const THREADS: u32 = WARPS * 32;
/// Rows of one `mma` tile.
pub const TILE_ROWS: u32 = 16;
/// Padding of each shared-memory row, in bf16: 16 bytes, so `ldmatrix` rows hit distinct banks.
pub const ROW_PAD: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct RebuildParams {
    pub shape: ShadowShape,
    /// `[batch, Hkv, budget_chunks]` misses from `plan`.
    pub misses: u64,
    /// u32 `[batch, Hkv]`.
    pub miss_counts: u64,
    /// bf16 `A` factors.
    pub a: u64,
    /// bf16 `Bm` factors.
    pub bm: u64,
    /// f64 `[rotary_dim / 2]` RoPE inverse frequencies.
    pub inverse_frequencies: u64,
    /// bf16 GPU key buffer (the K/V layout).
    pub k: u64,
    pub splits: u32,
    pub _reserved: u32,
    /// The rotated part of each head, its pairing and scale: rotate-half pairs only over the
    /// whole head (`rotary_dim == d`), adjacent pairs over any even part.
    pub rotary: RotaryLayout,
}

/// Shared memory: `Bm_h` `[r, d + pad]`, one `A` tile `[16, r + pad]` per warp (bf16), then
/// room for `d / 2` inverse frequencies (f64; the first `rotary_dim / 2` are filled).
pub const fn shared_bytes(rank: u32, head_dim: u32) -> u32 {
    let bm = rank * (head_dim + ROW_PAD) * 2;
    let a = WARPS * TILE_ROWS * (rank + ROW_PAD) * 2;
    (bm + a).next_multiple_of(8) + head_dim / 2 * 8
}

#[cfg(not(target_arch = "nvptx64"))]
pub fn kernel_name(head_dim: u32) -> String {
    format!("key_rebuild_d{head_dim}")
}

#[cfg(target_arch = "nvptx64")]
#[allow(clippy::needless_range_loop)]
mod kernel {
    use super::*;
    use crate::device::*;
    use crate::rope::{rotate, RopePairing};
    use crate::shadow::{slot_base, Miss, ShadowSequence};
    use core::num::NonZeroU32;

    /// # Safety
    /// The host launcher validated the layouts against `A`, `Bm` and the key buffer, `rank`
    /// (a multiple of 16, at most `MAX_RANK`) and `head_dim == D`, and launched
    /// `(splits, kv_heads, sequences)` blocks of [`THREADS`] with [`shared_bytes`].
    #[inline(always)]
    pub unsafe fn key_rebuild<const D: usize, const N_TILES: usize, const PASS_TILES: usize>(
        p: &RebuildParams,
    ) {
        let shape = &p.shape;
        let (split, kv_head) = (block_idx_x(), block_idx_y());
        let sequence_index = shape.first_sequence + block_idx_z();
        let (warp, lane, tid) = (warp_id(), lane_id(), thread_idx_x());
        let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
        let (k, rank) = (shape.budget_chunks, shape.rank);
        // Non-zero divisors keep the kernel free of panic paths (validated on the host).
        let (Some(c), Some(a_vectors)) =
            (NonZeroU32::new(shape.chunk_size), NonZeroU32::new(rank / 8))
        else {
            return;
        };
        let count = min_u32(
            *(p.miss_counts as *const u32)
                .add((sequence_index * shape.kv_heads + kv_head) as usize),
            k,
        );
        let rows = count * c.get();
        let tiles = rows.div_ceil(TILE_ROWS);
        if split * WARPS >= tiles {
            return;
        }
        let misses =
            (p.misses as *const Miss).add(slot_base(sequence_index, kv_head, shape.kv_heads, k));

        // Bm_h into shared memory, once per block.
        let bm_stride = D + ROW_PAD as usize;
        let a_stride = (rank + ROW_PAD) as usize;
        let bm_shared = dynamic_shared::<u16>();
        let a_shared = bm_shared
            .add(rank as usize * bm_stride + warp as usize * TILE_ROWS as usize * a_stride);
        let frequencies = dynamic_shared::<u8>().add(
            ((rank as usize * bm_stride + WARPS as usize * TILE_ROWS as usize * a_stride) * 2)
                .next_multiple_of(8),
        ) as *mut f64;
        let bm_row_stride = (shape.kv_heads * D as u32) as usize;
        let bm_head = (p.bm as *const u16).add(sequence.bm_offset as usize + kv_head as usize * D);
        let vectors_per_row = D as u32 / 8;
        let mut index = tid;
        while index < rank * vectors_per_row {
            let (row, vector) = (
                (index / vectors_per_row) as usize,
                (index % vectors_per_row) as usize,
            );
            copy_async_16(
                shared_address(bm_shared.add(row * bm_stride + vector * 8)),
                bm_head.add(row * bm_row_stride + vector * 8) as *const Vec16,
            );
            index += THREADS;
        }
        copy_async_commit();
        let rotated_pairs = min_u32(p.rotary.rotary_dim / 2, D as u32 / 2) as usize;
        let adjacent = p.rotary.pairing == RopePairing::Adjacent as u32;
        let attention_factor = p.rotary.attention_factor;
        let mut i = tid as usize;
        while i < rotated_pairs {
            *frequencies.add(i) = *(p.inverse_frequencies as *const f64).add(i);
            i += THREADS as usize;
        }
        copy_async_wait::<0>();
        sync_threads();

        let a_base = (p.a as *const u16).add(sequence.a_offset as usize);
        let mut tile = split * WARPS + warp;
        while tile < tiles {
            // Gather the tile's 16 rows of A (zeros past the last miss or for a bad chunk id).
            let mut index = lane;
            while index < TILE_ROWS * a_vectors.get() {
                let (row_in_tile, vector) = (index / a_vectors, index % a_vectors);
                let row = tile * TILE_ROWS + row_in_tile;
                let target = a_shared.add(row_in_tile as usize * a_stride + vector as usize * 8);
                let chunk = if row < rows {
                    (*misses.add((row / c) as usize)).chunk
                } else {
                    u32::MAX
                };
                if chunk < sequence.chunks {
                    let a_row = chunk * c.get() + row % c;
                    copy_async_16(
                        shared_address(target),
                        a_base.add(a_row as usize * rank as usize + vector as usize * 8)
                            as *const Vec16,
                    );
                } else {
                    *(target as *mut Vec16) = [0; 4];
                }
                index += 32;
            }
            copy_async_commit();
            copy_async_wait::<0>();
            sync_warp();

            // N_TILES == D / 8: the output's 8-column tiles, computed PASS_TILES at a time:
            // pass `pass` holds tiles `pass * h..(pass + 1) * h` and the same past `N_TILES / 2`
            // (h = PASS_TILES / 2), so each pass has both halves of its rotate-half pairs.
            let half_tiles = PASS_TILES / 2;
            let global = |pass: usize, i: usize| {
                if i < half_tiles {
                    pass * half_tiles + i
                } else {
                    N_TILES / 2 + pass * half_tiles + (i - half_tiles)
                }
            };
            let a_row = a_shared.add((lane % 16) as usize * a_stride + (lane / 16) as usize * 8);
            for pass in 0..N_TILES / PASS_TILES {
                let mut acc = [[0.0f32; 4]; PASS_TILES];
                let mut k_step = 0;
                while k_step < rank / 16 {
                    let a_fragment =
                        load_matrix_x4(shared_address(a_row.add(k_step as usize * 16)));
                    let b_row = bm_shared.add(
                        (k_step * 16 + lane % 16) as usize * bm_stride + (lane / 16) as usize * 8,
                    );
                    for i in (0..PASS_TILES).step_by(2) {
                        let b = load_matrix_x4_transposed(shared_address(
                            b_row.add(global(pass, i) * 8),
                        ));
                        acc[i] = mma_bf16_m16n8k16(a_fragment, [b[0], b[1]], acc[i]);
                        acc[i + 1] = mma_bf16_m16n8k16(a_fragment, [b[2], b[3]], acc[i + 1]);
                    }
                    k_step += 1;
                }
                // RoPE and store: this thread holds rows lane/4 and lane/4 + 8, columns
                // 8n + 2(lane%4) + {0, 1} of each tile n; adjacent pairs are those two
                // columns, rotate-half pairs column j with j + d/2 (tile i + half_tiles).
                for half in 0..2 {
                    let row = tile * TILE_ROWS + lane / 4 + 8 * half as u32;
                    if row >= rows {
                        continue;
                    }
                    let miss = *misses.add((row / c) as usize);
                    if miss.chunk >= sequence.chunks || miss.slot >= k {
                        continue;
                    }
                    let token = row % c;
                    let position = miss.chunk * c.get() + token;
                    let target = (p.k as *mut u16).add(sequence.kv_row(
                        kv_head,
                        sequence.sparse_start + miss.slot * c.get() + token,
                        D as u32,
                    ) as usize);
                    if adjacent {
                        // Columns (2i, 2i + 1) are this thread's pair of a tile: rotated by
                        // frequency i within the rotary part, passed through past it.
                        for i in 0..PASS_TILES {
                            let column = global(pass, i) * 8 + 2 * (lane % 4) as usize;
                            let (low, high) = (acc[i][2 * half], acc[i][2 * half + 1]);
                            let (low, high) = if column / 2 < rotated_pairs {
                                let frequency = *frequencies.add(column / 2);
                                rotate(low, high, position, frequency, attention_factor)
                            } else {
                                (low, high)
                            };
                            *(target.add(column) as *mut u32) = f32x2_to_bf16x2(low, high);
                        }
                        continue;
                    }
                    for i in 0..half_tiles {
                        let column = global(pass, i) * 8 + 2 * (lane % 4) as usize;
                        let mut low = [0.0f32; 2];
                        let mut high = [0.0f32; 2];
                        for e in 0..2 {
                            let (l, h) = rotate(
                                acc[i][2 * half + e],
                                acc[i + half_tiles][2 * half + e],
                                position,
                                *frequencies.add(column + e),
                                attention_factor,
                            );
                            low[e] = l;
                            high[e] = h;
                        }
                        *(target.add(column) as *mut u32) = f32x2_to_bf16x2(low[0], low[1]);
                        *(target.add(column + D / 2) as *mut u32) =
                            f32x2_to_bf16x2(high[0], high[1]);
                    }
                }
            }
            sync_warp();

            tile += p.splits * WARPS;
        }
    }

    macro_rules! entries {
        ($($name:ident = <$d:literal, $n:literal, $pass:literal>),* $(,)?) => {$(
            #[no_mangle]
            pub unsafe extern "ptx-kernel" fn $name(params: RebuildParams) {
                key_rebuild::<$d, $n, $pass>(&params)
            }
        )*};
    }
    // d256: the 32 output tiles in two passes of 16 (64 accumulator registers each; all 32
    // at once took 255 registers and a 520-byte stack on sm_80). `Bm_h` at rank 160 takes
    // 84 KB of shared memory (rank 240 is the most an A100's 163 KB holds).
    entries! {
        key_rebuild_d64 = <64, 8, 8>,
        key_rebuild_d128 = <128, 16, 16>,
        key_rebuild_d256 = <256, 32, 16>,
    }
}
