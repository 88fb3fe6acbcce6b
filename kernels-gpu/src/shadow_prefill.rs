//! ShadowKV prefill for one sequence of one layer (`docs/ARCHITECTURE.md`, "Prefill"): from
//! the prompt's post-RoPE keys and values (`[Hkv, L, d]`, laid out as a [`SequenceLayout`]),
//! build what the decode kernels read (see `shadow`):
//!
//! 1. [`chunk_statistics`](kernel): a warp per (chunk, KV head): the chunk's landmark (the mean
//!    of its `c` keys, in f32, stored bf16) and the minimum cosine similarity between that mean
//!    and each of its keys.
//! 2. `outlier_select`: a block per KV head: the `n_out` chunks with the smallest minimum
//!    cosine (a block radix select on an order-preserving key; ties: lowest chunk id first),
//!    then one ordered compaction writes the outlier list and the remaining chunk ids (both
//!    ascending) and resets the sequence's resident slots to empty.
//! 3. `landmark_gather`: copies the remaining chunks' landmarks into the landmark rows.
//! 4. `exact_gather`: copies the exact keys and values of the local window and of the outlier
//!    chunks into the front of the sequence's GPU K/V block, and the values of the first
//!    selection's chunks into their slots, from the prompt's values on the GPU (so the first
//!    selection needs no PCIe traffic and does not wait for the offload).
//!
//! The first selection itself (the last prompt query's scoring, top-k and plan) and its keys
//! (`rebuild`) are the decode kernels; the value offload is a copy engine's. The host runs them.

use crate::attention::SequenceLayout;
use crate::shadow::ShadowSequence;

/// Warps per block of every kernel of the family.
pub const WARPS: u32 = 8;
pub const THREADS: u32 = WARPS * 32;
/// Bits of each radix pass of the outlier select, over all 32 bits of the key.
pub const DIGIT_BITS: [u32; 3] = [11, 11, 10];
/// Bins of the largest histogram.
pub const MAX_BINS: u32 = 1 << 11;

/// The one parameter struct of the family. Pointers are device addresses; element offsets are
/// those of `sequence` (the destination) and `source`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ShadowPrefillParams {
    /// Where the sequence's decode state goes (`landmarks`, `chunks` and `sparse_start` set).
    pub sequence: ShadowSequence,
    /// The prompt's keys and values: `[Hkv, capacity, d]` from `offset`, `len` = prompt length.
    pub source: SequenceLayout,
    /// bf16 post-RoPE keys and values of the prompt.
    pub keys: u64,
    pub values: u64,
    /// bf16 `[Hkv, chunks, d]` scratch: every chunk's landmark.
    pub chunk_means: u64,
    /// f32 `[Hkv, chunks]` scratch: every chunk's minimum cosine.
    pub min_cosine: u64,
    /// u32 `[Hkv, outlier_chunks]`: the outlier chunk ids, ascending.
    pub outliers: u64,
    /// bf16 landmarks and u32 chunk ids of the layer (rows from `sequence.landmark_row`).
    pub landmarks: u64,
    pub chunk_ids: u64,
    /// u32 `[rows, Hkv, budget_chunks]` resident ids of the layer (the sequence's at its
    /// `resident_row`).
    pub resident: u64,
    /// bf16 GPU K/V buffers of the layer (the sequence's block at `sequence.kv`).
    pub k: u64,
    pub v: u64,
    /// `[batch, Hkv, budget_chunks]` misses and u32 `[batch, Hkv]` counts of the first
    /// selection (`plan`): `exact_gather` copies their values from the prompt's.
    pub misses: u64,
    pub miss_counts: u64,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub chunk_size: u32,
    /// Outlier chunks per head: `chunks - landmarks`.
    pub outlier_chunks: u32,
    pub budget_chunks: u32,
    /// The sequence's index in the batch of the first selection (its rows of `misses` and
    /// `miss_counts`).
    pub sequence_index: u32,
}

/// Tokens of the local window: the prompt past the chunks.
pub const fn local_len(prompt_len: u32, chunks: u32, chunk_size: u32) -> u32 {
    prompt_len - chunks * chunk_size
}

/// Exact rows at the front of a K/V block: the local window, then the outlier chunks.
pub const fn exact_rows(prompt_len: u32, chunks: u32, chunk_size: u32, outliers: u32) -> u32 {
    local_len(prompt_len, chunks, chunk_size) + outliers * chunk_size
}

/// Rows `exact_gather` covers per head: the exact rows, then every slot's (values only).
pub const fn gather_rows(exact_rows: u32, budget_chunks: u32, chunk_size: u32) -> u32 {
    exact_rows + budget_chunks * chunk_size
}

/// Orders f32 values as unsigned integers, reversed: the smallest value gets the largest key,
/// so a select of the largest keys takes the smallest values.
pub const fn smallest_first_key(value: f32) -> u32 {
    let bits = value.to_bits();
    let ascending = if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    };
    !ascending
}

/// Shared memory of `outlier_select`: the histogram, the scan scratch and the select state.
pub const fn outlier_shared_bytes() -> u32 {
    (MAX_BINS + 32 + 4) * 4
}

#[cfg(not(target_arch = "nvptx64"))]
pub fn chunk_statistics_name(head_dim: u32) -> String {
    format!("chunk_statistics_d{head_dim}")
}

pub const OUTLIER_SELECT: &str = "outlier_select";
pub const LANDMARK_GATHER: &str = "landmark_gather";
pub const EXACT_GATHER: &str = "exact_gather";

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::block::{clear_u32, exclusive_sum, radix_select, warp_sum_f32, Cluster, MAX_WARPS};
    use crate::device::*;
    use crate::shadow::{slot_base, Miss, EMPTY_SLOT};
    use core::num::NonZeroU32;

    /// First element of token `token` of head `head` in the prompt's keys or values.
    #[inline(always)]
    fn source_row(p: &ShadowPrefillParams, head: u32, token: u32) -> usize {
        (p.source.offset
            + (head as u64 * p.source.capacity as u64 + token as u64) * p.head_dim as u64)
            as usize
    }

    /// # Safety
    /// The host validated the layouts against the buffers, `head_dim == D`, and launched
    /// `(ceil(chunks / WARPS), kv_heads)` blocks of [`THREADS`].
    #[inline(always)]
    unsafe fn chunk_statistics<const D: usize>(p: &ShadowPrefillParams) {
        // Each lane holds `D / 32` dimensions of a row, as bf16 pairs.
        let words = D / 64;
        let chunk = block_idx_x() * WARPS + warp_id();
        let head = block_idx_y();
        let chunks = p.sequence.chunks;
        if chunk >= chunks {
            return;
        }
        let c = p.chunk_size;
        let keys = (p.keys as *const u16).add(lane_id() as usize * D / 32);
        let row = |t: u32| keys.add(source_row(p, head, chunk * c + t)) as *const u32;
        let mut mean = [0.0f32; 8];
        for t in 0..c {
            let r = row(t);
            for w in 0..words {
                let [lo, hi] = bf16x2_to_f32(*r.add(w));
                mean[2 * w] += lo;
                mean[2 * w + 1] += hi;
            }
        }
        let inverse = 1.0 / c as f32;
        let mut mean_norm = 0.0f32;
        for m in mean.iter_mut().take(2 * words) {
            *m *= inverse;
            mean_norm += *m * *m;
        }
        let mean_norm = sqrt(warp_sum_f32(mean_norm));
        let mut min_cosine = f32::INFINITY;
        for t in 0..c {
            let r = row(t);
            let (mut dot, mut norm) = (0.0f32, 0.0f32);
            for w in 0..words {
                let [lo, hi] = bf16x2_to_f32(*r.add(w));
                dot += lo * mean[2 * w] + hi * mean[2 * w + 1];
                norm += lo * lo + hi * hi;
            }
            let (dot, norm) = (warp_sum_f32(dot), sqrt(warp_sum_f32(norm)));
            let denominator = max_f32(mean_norm * norm, f32::MIN_POSITIVE);
            let cosine = dot / denominator;
            if cosine < min_cosine {
                min_cosine = cosine;
            }
        }
        let at = head as usize * chunks as usize + chunk as usize;
        let out = (p.chunk_means as *mut u32).add((at * D + lane_id() as usize * D / 32) / 2);
        for w in 0..words {
            *out.add(w) = f32x2_to_bf16x2(mean[2 * w], mean[2 * w + 1]);
        }
        if lane_id() == 0 {
            *(p.min_cosine as *mut f32).add(at) = min_cosine;
        }
    }

    /// # Safety
    /// The host validated the layouts, `outlier_chunks <= chunks`, and launched `(kv_heads)`
    /// blocks of [`THREADS`] with [`outlier_shared_bytes`].
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn outlier_select(p: ShadowPrefillParams) {
        let head = block_idx_x();
        let tid = thread_idx_x();
        let sequence = &p.sequence;
        let count = sequence.chunks;
        let wanted = p.outlier_chunks;
        let histogram = dynamic_shared::<u32>();
        let scratch = histogram.add(MAX_BINS as usize);
        let state = scratch.add(MAX_WARPS);

        // The sequence starts with empty slots: the first selection fetches every chunk.
        let resident =
            (p.resident as *mut u32).add(sequence.resident_base(head, p.kv_heads, p.budget_chunks));
        let mut slot = tid;
        while slot < p.budget_chunks {
            *resident.add(slot as usize) = EMPTY_SLOT;
            slot += THREADS;
        }

        let min_cosine = (p.min_cosine as *const f32).add(head as usize * count as usize);
        let key = |j: u32| smallest_first_key(*min_cosine.add(j as usize));
        // With no outliers, nothing is above the largest key and nothing equal is taken.
        let (threshold, needed_equal) = if wanted == 0 {
            (u32::MAX, 0)
        } else {
            clear_u32(histogram, MAX_BINS);
            sync_threads();
            let first_shift = 32 - DIGIT_BITS[0];
            let mut j = tid;
            while j < count {
                atomic_add_shared_u32(histogram.add((key(j) >> first_shift) as usize), 1);
                j += THREADS;
            }
            sync_threads();
            radix_select(
                key,
                count,
                wanted,
                &DIGIT_BITS,
                histogram,
                scratch,
                state,
                Cluster::SINGLE,
            )
        };

        // Ordered compaction over each thread's contiguous run: outliers (keys above the
        // threshold and the first `needed_equal` equal to it) to `outliers`, the rest to the
        // chunk ids, both in chunk order.
        let per_thread = count.div_ceil(THREADS);
        let first = min_u32(tid * per_thread, count);
        let last = min_u32(first + per_thread, count);
        let (mut above, mut equal) = (0u32, 0u32);
        for j in first..last {
            let bits = key(j);
            above += (bits > threshold) as u32;
            equal += (bits == threshold) as u32;
        }
        let (mut above_before, _) = exclusive_sum(above, scratch);
        let (mut equal_before, _) = exclusive_sum(equal, scratch);
        let outliers = (p.outliers as *mut u32).add(head as usize * wanted as usize);
        let chunk_ids = (p.chunk_ids as *mut u32).add(sequence.landmark_base(head) as usize);
        for j in first..last {
            let bits = key(j);
            let outliers_before = above_before + min_u32(equal_before, needed_equal);
            let is_outlier = bits > threshold || (bits == threshold && equal_before < needed_equal);
            if is_outlier {
                if outliers_before < wanted {
                    *outliers.add(outliers_before as usize) = j;
                }
            } else if j - outliers_before < sequence.landmarks {
                *chunk_ids.add((j - outliers_before) as usize) = j;
            }
            above_before += (bits > threshold) as u32;
            equal_before += (bits == threshold) as u32;
        }
    }

    /// # Safety
    /// The host validated the layouts and launched `(ceil(landmarks * d / 8 / THREADS),
    /// kv_heads)` blocks of [`THREADS`], after `outlier_select` wrote the chunk ids.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn landmark_gather(p: ShadowPrefillParams) {
        let head = block_idx_y();
        let sequence = &p.sequence;
        let Some(vectors_per_row) = NonZeroU32::new(p.head_dim / 8) else {
            return;
        };
        let index = block_idx_x() * THREADS + thread_idx_x();
        let row = index / vectors_per_row;
        if row >= sequence.landmarks {
            return;
        }
        let base = sequence.landmark_base(head) as usize + row as usize;
        let chunk = *(p.chunk_ids as *const u32).add(base);
        if chunk >= sequence.chunks {
            return;
        }
        let vector = (index % vectors_per_row) as usize;
        let vectors_per_row = vectors_per_row.get() as usize;
        let source = (p.chunk_means as *const Vec16).add(
            (head as usize * sequence.chunks as usize + chunk as usize) * vectors_per_row + vector,
        );
        let target = (p.landmarks as *mut Vec16).add(base * vectors_per_row + vector);
        store_16(target, load_16(source));
    }

    /// # Safety
    /// The host validated the layouts (the block holds the exact rows before `sparse_start`)
    /// and launched `(ceil(gather_rows * d / 8 / THREADS), kv_heads)` blocks of [`THREADS`],
    /// after `outlier_select` wrote the outliers and `plan` the misses.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn exact_gather(p: ShadowPrefillParams) {
        let head = block_idx_y();
        let sequence = &p.sequence;
        let (Some(c), Some(vectors_per_row)) = (
            NonZeroU32::new(p.chunk_size),
            NonZeroU32::new(p.head_dim / 8),
        ) else {
            return;
        };
        let index = block_idx_x() * THREADS + thread_idx_x();
        let row = index / vectors_per_row;
        let local = local_len(sequence.prompt_len, sequence.chunks, c.get());
        let exact = exact_rows(
            sequence.prompt_len,
            sequence.chunks,
            c.get(),
            p.outlier_chunks,
        );
        let last_chunk = sequence.chunks - 1;
        // (prompt token, K/V block row, whether the key is copied too).
        let (token, target_row, with_key) = if row < local {
            (sequence.chunks * c.get() + row, row, true)
        } else if row < exact {
            let outlier = (row - local) / c;
            let chunk = *(p.outliers as *const u32)
                .add(head as usize * p.outlier_chunks as usize + outlier as usize);
            (
                min_u32(chunk, last_chunk) * c.get() + (row - local) % c,
                row,
                true,
            )
        } else {
            // The first selection's slots: values only (their keys are rebuilt).
            let miss_index = (row - exact) / c;
            let slots = slot_base(p.sequence_index, head, p.kv_heads, p.budget_chunks);
            let count =
                *(p.miss_counts as *const u32).add((p.sequence_index * p.kv_heads + head) as usize);
            if miss_index >= min_u32(count, p.budget_chunks) {
                return;
            }
            let miss = *(p.misses as *const Miss).add(slots + miss_index as usize);
            if miss.slot >= p.budget_chunks {
                return;
            }
            let offset = (row - exact) % c;
            (
                min_u32(miss.chunk, last_chunk) * c.get() + offset,
                sequence.sparse_start + miss.slot * c.get() + offset,
                false,
            )
        };
        let vector = (index % vectors_per_row) as usize;
        let source = source_row(&p, head, token) / 8 + vector;
        let target = (sequence.kv_row(head, target_row, p.head_dim) / 8) as usize + vector;
        if with_key {
            let keys = load_16((p.keys as *const Vec16).add(source));
            store_16((p.k as *mut Vec16).add(target), keys);
        }
        let values = load_16((p.values as *const Vec16).add(source));
        store_16((p.v as *mut Vec16).add(target), values);
    }

    macro_rules! entries {
        ($($name:ident = $d:literal),* $(,)?) => {$(
            #[no_mangle]
            pub unsafe extern "ptx-kernel" fn $name(params: ShadowPrefillParams) {
                chunk_statistics::<$d>(&params)
            }
        )*};
    }
    entries! {
        chunk_statistics_d64 = 64,
        chunk_statistics_d128 = 128,
        chunk_statistics_d256 = 256,
    }
}
