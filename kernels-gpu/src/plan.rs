//! Cache-aware plan: one block per (sequence, KV head) compares the new selection with the
//! chunks resident in the sparse slots. Hits keep their slots; the freed slots, in slot order,
//! go to the misses, in selection order (deterministic, so a CPU reference matches exactly).
//! Writes the miss list and count, marks the slots filled this step (`fresh`, so attention can
//! run over the other slots while the fetch is in flight) and updates the resident ids in place.
//!
//! Membership uses two bitmaps over chunk ids in shared memory (selected, hit): one bit per
//! chunk of the prompt, 16 KiB per 128K chunks (1M tokens at c = 8).
//!
//! The decode step runs the plan inside the top-k kernel, after each block's selection (one
//! launch fewer per step: `topk`); the `cache_plan` kernel runs it alone.

use crate::shadow::ShadowShape;

pub const WARPS: u32 = 8;
pub const THREADS: u32 = WARPS * 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PlanParams {
    pub shape: ShadowShape,
    /// u32 `[batch, Hkv, budget_chunks]` from `topk`.
    pub selection: u64,
    /// u32 `[rows, Hkv, budget_chunks]` chunk id per slot (`EMPTY_SLOT` if none), each
    /// sequence at its `resident_row`; updated.
    pub resident: u64,
    /// `[batch, Hkv, budget_chunks]` [`Miss`](crate::shadow::Miss) out; the first
    /// `miss_counts` entries of each (sequence, head) are valid.
    pub misses: u64,
    /// u32 `[batch, Hkv]` out.
    pub miss_counts: u64,
    /// u32 `[batch, Hkv, budget_chunks]` out: 1 for a slot that receives a miss, else 0.
    pub fresh: u64,
    /// u32 `[batch, Hkv]` copy of the counts in mapped host memory (the step's statistics,
    /// read without a device-to-host copy); 0 for none.
    pub host_miss_counts: u64,
    /// Words of each bitmap: at least `chunks / 32` rounded up, for every sequence.
    pub bitmap_words: u32,
    pub _reserved: u32,
}

/// Shared memory of a block of `threads`: two bitmaps, the freed-slot list, the flags
/// (padded to whole blocks) and the block-scan scratch.
pub const fn shared_bytes(bitmap_words: u32, budget_chunks: u32, threads: u32) -> u32 {
    (2 * bitmap_words + budget_chunks + flag_words(budget_chunks, threads) + 32) * 4
}

/// Flags of one pass: one per slot, zero up to a whole number of blocks of `threads`.
pub const fn flag_words(budget_chunks: u32, threads: u32) -> u32 {
    budget_chunks.next_multiple_of(threads)
}

/// Bitmap words that cover `chunks` chunk ids.
pub const fn bitmap_words(chunks: u32) -> u32 {
    chunks.div_ceil(32)
}

pub const KERNEL_NAME: &str = "cache_plan";

#[cfg(target_arch = "nvptx64")]
pub use kernel::plan_head;

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::block::exclusive_count;
    use crate::device::*;
    use crate::shadow::{slot_base, Miss, ShadowSequence};

    #[inline(always)]
    unsafe fn contains(bitmap: *const u32, chunk: u32, chunks: u32) -> bool {
        chunk < chunks && (*bitmap.add((chunk / 32) as usize) >> (chunk % 32)) & 1 != 0
    }

    /// # Safety
    /// The host launcher validated the layouts (`bitmap_words` covers every sequence's
    /// chunks; the resident rows are distinct and within `resident`) and launched `(kv_heads, sequences)` blocks of [`THREADS`] with [`shared_bytes`].
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn cache_plan(p: PlanParams) {
        plan_head(
            &p,
            p.shape.first_sequence + block_idx_y(),
            block_idx_x(),
            dynamic_shared::<u32>(),
        );
    }

    /// The plan of one (sequence, KV head), by the whole block; `shared` holds
    /// [`shared_bytes`] for the block's size. The selection in global memory is complete and
    /// visible to the block (a block barrier after the block's own writes will do).
    ///
    /// # Safety
    /// As for [`cache_plan`], for this one (sequence, KV head); every thread of the block
    /// calls it.
    pub unsafe fn plan_head(p: &PlanParams, sequence_index: u32, kv_head: u32, shared: *mut u32) {
        let shape = &p.shape;
        let tid = thread_idx_x();
        let threads = block_dim_x();
        let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
        let chunks = sequence.chunks;
        let k = shape.budget_chunks;
        let words = bitmap_words(chunks);
        let padded_flags = flag_words(k, threads);

        let selected = shared;
        let hit = selected.add(p.bitmap_words as usize);
        let freed = hit.add(p.bitmap_words as usize);
        let flags = freed.add(k as usize);
        let scratch = flags.add(padded_flags as usize);
        let mut w = tid;
        while w < words {
            *selected.add(w as usize) = 0;
            *hit.add(w as usize) = 0;
            w += threads;
        }
        sync_threads();

        let base = slot_base(sequence_index, kv_head, shape.kv_heads, k);
        let selection = (p.selection as *const u32).add(base);
        let resident =
            (p.resident as *mut u32).add(sequence.resident_base(kv_head, shape.kv_heads, k));
        let fresh = (p.fresh as *mut u32).add(base);
        let mut i = tid;
        while i < k {
            let chunk = *selection.add(i as usize);
            if chunk < chunks {
                atomic_or_shared_u32(selected.add((chunk / 32) as usize), 1 << (chunk % 32));
            }
            i += threads;
        }
        sync_threads();

        // Each pass first writes its flags to shared memory (branching as it likes), then
        // counts them in a loop with no divergent code before `exclusive_count`: the flags
        // are padded with zeros to whole blocks and read unconditionally.
        // Pass 1: slots whose chunk stays are hits; the rest are freed, listed in slot order.
        let mut slot = tid;
        while slot < padded_flags {
            let mut is_freed = 0;
            if slot < k {
                *fresh.add(slot as usize) = 0;
                let chunk = *resident.add(slot as usize);
                if contains(selected, chunk, chunks) {
                    atomic_or_shared_u32(hit.add((chunk / 32) as usize), 1 << (chunk % 32));
                } else {
                    is_freed = 1;
                }
            }
            *flags.add(slot as usize) = is_freed;
            slot += threads;
        }
        sync_threads();
        let mut freed_count = 0;
        let mut start = 0;
        while start < k {
            let slot = start + tid;
            let is_freed = *flags.add(slot as usize) != 0;
            let (rank, total) = exclusive_count(is_freed, scratch);
            if is_freed {
                *freed.add((freed_count + rank) as usize) = slot;
            }
            freed_count += total;
            start += threads;
        }

        // Pass 2: selected chunks that were not hits are misses, in selection order. (The
        // barriers in `exclusive_count` order every read of `resident` above before the
        // updates below.)
        let mut i = tid;
        while i < padded_flags {
            let is_miss = i < k && !contains(hit, *selection.add(i as usize), chunks);
            *flags.add(i as usize) = is_miss as u32;
            i += threads;
        }
        sync_threads();
        let misses = (p.misses as *mut Miss).add(base);
        let mut miss_count = 0;
        let mut start = 0;
        while start < k {
            let i = start + tid;
            let is_miss = *flags.add(i as usize) != 0;
            let (rank, total) = exclusive_count(is_miss, scratch);
            let m = miss_count + rank;
            if is_miss && m < freed_count {
                let chunk = *selection.add(i as usize);
                let slot = *freed.add(m as usize);
                *misses.add(m as usize) = Miss { chunk, slot };
                *resident.add(slot as usize) = chunk;
                // After the zero above: the barriers in `exclusive_count` order the two.
                *fresh.add(slot as usize) = 1;
            }
            miss_count += total;
            start += threads;
        }
        if tid == 0 {
            let at = (sequence_index * shape.kv_heads + kv_head) as usize;
            let count = min_u32(miss_count, freed_count);
            *(p.miss_counts as *mut u32).add(at) = count;
            if p.host_miss_counts != 0 {
                *(p.host_miss_counts as *mut u32).add(at) = count;
            }
        }
    }
}
