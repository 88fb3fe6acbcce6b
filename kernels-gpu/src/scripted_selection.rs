//! SYNTHETIC SELECTION for benchmarks: rewrites each (sequence, KV head)'s selection, after the
//! real scoring and top-k, so that a scripted number of its chunks are resident from the
//! previous step (hits) and the rest are not (misses); the plan then runs on it as usual.
//! Random keys and queries keep only a few percent of the chunks between steps where real
//! models keep most of them, so a throughput bench on random data scripts the hit rate here,
//! on the GPU, without a host synchronisation.
//!
//! One block per (sequence, KV head). With `hits` the scripted hit count:
//! - hits: the resident chunks the real top-k picked (in selection order), then the other
//!   resident chunks (in slot order), up to `hits`;
//! - misses: the real top-k's picks that are not resident (in selection order), then the
//!   landmarks' chunk ids that are neither resident nor picked (in landmark order), up to
//!   `budget_chunks - hits`;
//! - if the landmarks run out of non-resident chunks (a sequence with barely more landmarks
//!   than the budget), more resident chunks fill the rest: the selection always has
//!   `budget_chunks` distinct chunk ids, each `< chunks` and a landmark's or a resident one.
//!
//! The new selection is the hits, then the misses. Membership uses two bitmaps over chunk ids
//! in shared memory (resident, picked by the top-k), as in `plan`; every list is an ordered
//! compaction, so the output is deterministic and a CPU reference matches it exactly.
//! Resident ids are distinct (as the plan keeps them); an id `>= chunks` (`EMPTY_SLOT`) is no
//! chunk.

use crate::shadow::ShadowShape;

pub const WARPS: u32 = 8;
pub const THREADS: u32 = WARPS * 32;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ScriptedSelectionParams {
    pub shape: ShadowShape,
    /// u32 chunk id of each landmark (see `shadow`).
    pub chunk_ids: u64,
    /// u32 `[batch, Hkv, budget_chunks]` chunk id per slot from the previous step (read only).
    pub resident: u64,
    /// u32 `[batch, Hkv, budget_chunks]` the top-k's selection, rewritten in place.
    pub selection: u64,
    /// Hits per (sequence, KV head): the hit rate times `budget_chunks`, rounded.
    pub hits: u32,
    /// Words of each bitmap: at least `chunks / 32` rounded up, for every sequence.
    pub bitmap_words: u32,
}

/// Shared memory of a block: two bitmaps, the hit and miss lists (`budget_chunks` each), a
/// window's flags and values (`THREADS` each) and the block-scan scratch.
pub const fn shared_bytes(bitmap_words: u32, budget_chunks: u32) -> u32 {
    (2 * bitmap_words + 2 * budget_chunks + 2 * THREADS + 32) * 4
}

/// Bitmap words that cover `chunks` chunk ids.
pub const fn bitmap_words(chunks: u32) -> u32 {
    chunks.div_ceil(32)
}

/// Hits per (sequence, KV head) for a hit rate in `[0, 1]`: `rate * budget_chunks`, rounded
/// half away from zero.
pub fn hits_for(rate: f64, budget_chunks: u32) -> u32 {
    let hits = rate * budget_chunks as f64 + 0.5;
    if hits <= 0.0 {
        0
    } else if hits >= budget_chunks as f64 {
        budget_chunks
    } else {
        hits as u32
    }
}

pub const KERNEL_NAME: &str = "scripted_selection";

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::block::exclusive_count;
    use crate::device::*;
    use crate::shadow::{slot_base, ShadowSequence};

    #[inline(always)]
    unsafe fn contains(bitmap: *const u32, chunk: u32, chunks: u32) -> bool {
        chunk < chunks && (*bitmap.add((chunk / 32) as usize) >> (chunk % 32)) & 1 != 0
    }

    /// An ordered compaction into `out` (shared memory), in windows of the block's threads.
    struct Compaction {
        out: *mut u32,
        taken: u32,
        limit: u32,
        flags: *mut u32,
        values: *mut u32,
        scratch: *mut u32,
    }

    impl Compaction {
        /// Appends the picks of indices `0..count` (`pick(i)`: the value to take, if any), in
        /// index order, until `limit` are taken. Every thread of the block calls it.
        ///
        /// Each window first writes its flags to shared memory (branching as it likes), then
        /// reads them back after a barrier and counts them with no divergent code before
        /// `exclusive_count` (see its note on convergence).
        #[inline(always)]
        unsafe fn append(&mut self, count: u32, pick: impl Fn(u32) -> Option<u32>) {
            let tid = thread_idx_x();
            let threads = block_dim_x();
            let mut start = 0;
            // Block-uniform: `taken` is the same in every thread.
            while start < count && self.taken < self.limit {
                let i = start + tid;
                let picked = if i < count { pick(i) } else { None };
                *self.flags.add(tid as usize) = picked.is_some() as u32;
                *self.values.add(tid as usize) = picked.unwrap_or(0);
                sync_threads();
                let flag = *self.flags.add(tid as usize) != 0;
                let value = *self.values.add(tid as usize);
                let (rank, total) = exclusive_count(flag, self.scratch);
                let at = self.taken + rank;
                if flag && at < self.limit {
                    *self.out.add(at as usize) = value;
                }
                self.taken = min_u32(self.taken + total, self.limit);
                start += threads;
            }
        }
    }

    /// # Safety
    /// The host launcher validated the layouts (`bitmap_words` covers every sequence's chunks,
    /// `hits <= budget_chunks`, every sequence has at least `budget_chunks` landmarks) and
    /// launched `(kv_heads, sequences)` blocks of [`THREADS`] with [`shared_bytes`].
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn scripted_selection(p: ScriptedSelectionParams) {
        let shape = &p.shape;
        let sequence_index = shape.first_sequence + block_idx_y();
        let kv_head = block_idx_x();
        let tid = thread_idx_x();
        let threads = block_dim_x();
        let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
        let chunks = sequence.chunks;
        let k = shape.budget_chunks;
        let words = bitmap_words(chunks);

        let shared = dynamic_shared::<u32>();
        let is_resident = shared;
        let picked = is_resident.add(p.bitmap_words as usize);
        let hit_list = picked.add(p.bitmap_words as usize);
        let miss_list = hit_list.add(k as usize);
        let flags = miss_list.add(k as usize);
        let values = flags.add(THREADS as usize);
        let scratch = values.add(THREADS as usize);
        let mut w = tid;
        while w < words {
            *is_resident.add(w as usize) = 0;
            *picked.add(w as usize) = 0;
            w += threads;
        }
        sync_threads();

        let base = slot_base(sequence_index, kv_head, shape.kv_heads, k);
        let selection = (p.selection as *mut u32).add(base);
        let resident = (p.resident as *const u32).add(base);
        let ids = (p.chunk_ids as *const u32).add(sequence.landmark_base(kv_head) as usize);
        let mut i = tid;
        while i < k {
            let chunk = *selection.add(i as usize);
            if chunk < chunks {
                atomic_or_shared_u32(picked.add((chunk / 32) as usize), 1 << (chunk % 32));
            }
            let chunk = *resident.add(i as usize);
            if chunk < chunks {
                atomic_or_shared_u32(is_resident.add((chunk / 32) as usize), 1 << (chunk % 32));
            }
            i += threads;
        }
        sync_threads();

        let picked_hit = |i: u32| {
            let chunk = *selection.add(i as usize);
            contains(is_resident, chunk, chunks).then_some(chunk)
        };
        let other_resident = |slot: u32| {
            let chunk = *resident.add(slot as usize);
            (chunk < chunks && !contains(picked, chunk, chunks)).then_some(chunk)
        };
        let mut hits = Compaction {
            out: hit_list,
            taken: 0,
            limit: p.hits,
            flags,
            values,
            scratch,
        };
        hits.append(k, picked_hit);
        hits.append(k, other_resident);

        let mut misses = Compaction {
            out: miss_list,
            taken: 0,
            limit: k - hits.taken,
            flags,
            values,
            scratch,
        };
        misses.append(k, |i| {
            let chunk = *selection.add(i as usize);
            (chunk < chunks && !contains(is_resident, chunk, chunks)).then_some(chunk)
        });
        misses.append(sequence.landmarks, |j| {
            let chunk = *ids.add(j as usize);
            (chunk < chunks
                && !contains(is_resident, chunk, chunks)
                && !contains(picked, chunk, chunks))
            .then_some(chunk)
        });

        // Too few chunks outside the cache: more hits fill the budget (the same lists again,
        // to a higher limit; block-uniform).
        let hit_count = k - misses.taken;
        if hit_count > hits.taken {
            hits.taken = 0;
            hits.limit = hit_count;
            hits.append(k, picked_hit);
            hits.append(k, other_resident);
        }

        // Every read of the old selection is behind the barriers of the compactions.
        sync_threads();
        let mut i = tid;
        while i < k {
            *selection.add(i as usize) = if i < hit_count {
                *hit_list.add(i as usize)
            } else {
                *miss_list.add((i - hit_count) as usize)
            };
            i += threads;
        }
    }
}
