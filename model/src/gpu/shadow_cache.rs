//! [`GpuShadowCache`]: ShadowKV's cache as the GPU model holds it. How a prompt gets into it
//! and how a decode step reads it is in `shadow` and `forward`.
use half::bf16;
use shadowkv::cache::{MemoryReport, SequenceId, ShadowKvCache};
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::kernels::layer::TokenPlan;
use shadowkv::{DecodeAttention, Gpu, SequenceLayout};

use super::kv_cache::GpuKvCache;
use crate::error::{invalid_input, OnGpu, Result};

/// The sliding-window layers of a ShadowKV cache (Gemma-3's local layers), kept exact: their
/// full keys and values on the GPU, one block per sequence slot, attended through the window.
pub(super) struct LocalLayers {
    /// Slot `i` of every local layer's buffers (in layer order among the local layers).
    pub(super) cache: GpuKvCache,
    /// The sequence in each slot.
    pub(super) slots: Vec<Option<SequenceId>>,
    /// A decode step's placement of its tokens in the slots and its windowed attention, set
    /// by the step before its layers run.
    pub(super) step: Option<(TokenPlan, DecodeAttention)>,
}

impl LocalLayers {
    /// The slot of sequence `id`.
    pub(super) fn slot_of(&self, id: SequenceId) -> Option<usize> {
        self.slots.iter().position(|&s| s == Some(id))
    }

    /// The slot of sequence `id`, `len` tokens long, and its layout, when the slot has room
    /// for one more token.
    pub(super) fn slot_for_next_token(
        &self,
        id: SequenceId,
        len: u32,
    ) -> Result<(usize, SequenceLayout)> {
        let slot = self.slot_of(id).ok_or_else(|| {
            invalid_input(
                "shadow",
                "has a sequence without a slot in its sliding-window layers",
                "a slot per live sequence",
            )
        })?;
        let layout = self.cache.layouts[slot];
        if len >= layout.capacity {
            return Err(invalid_input(
                "tokens",
                format!("go past sequence {id:?}'s {} tokens", layout.capacity),
                "at most the capacity the cache was made for",
            ));
        }
        Ok((slot, layout))
    }
}

/// ShadowKV's cache for the GPU model: the shadow of every layer (`ShadowKvCache`), each live
/// sequence's length, and the one-row blocks that stage a decode step's new keys and values.
pub struct GpuShadowCache {
    /// This cache's number (see `next_cache_id`).
    pub(super) id: u64,
    pub(super) cache: ShadowKvCache,
    /// The scripted hit rate set last (part of a captured step's key).
    pub(super) scripted_hit_rate: Option<f64>,
    /// `(sequence, tokens so far)`, in the cache's sequence order.
    pub(super) lens: Vec<(SequenceId, u32)>,
    /// `[max_sequences, kv_heads, head_dim]` each.
    pub(super) staged_keys: CudaSlice<bf16>,
    pub(super) staged_values: CudaSlice<bf16>,
    /// The model's sliding-window layers, if it has any (`cache` then holds the global
    /// layers only, in their order).
    pub(super) local: Option<LocalLayers>,
}

impl GpuShadowCache {
    /// The live sequences, in the order [`GpuModel::decode_shadow`] takes their tokens.
    ///
    /// [`GpuModel::decode_shadow`]: super::GpuModel::decode_shadow
    pub fn sequences(&self) -> Vec<SequenceId> {
        self.lens.iter().map(|&(id, _)| id).collect()
    }

    /// Tokens so far (prompt and generated) of each live sequence, in the same order.
    pub fn lens(&self) -> Vec<u32> {
        self.lens.iter().map(|&(_, len)| len).collect()
    }

    /// Adds a sequence of `len` tokens and runs `build` on it; keeps it only if `build`
    /// succeeds (otherwise the cache is left as it was). The cache appends new sequences
    /// last, so `lens` stays in its order.
    pub(super) fn add_built<T>(
        &mut self,
        gpu: &Gpu,
        len: usize,
        build: impl FnOnce(&mut Self, SequenceId) -> Result<T>,
    ) -> Result<(SequenceId, T)> {
        let id = self
            .cache
            .add_sequence(gpu, len)
            .on_gpu("adding a sequence to the ShadowKV cache")?;
        if let Some(local) = &mut self.local {
            let free = local.slots.iter().position(Option::is_none);
            match free {
                Some(slot) => local.slots[slot] = Some(id),
                None => {
                    let _ = self.cache.remove_sequence(gpu, id);
                    return Err(invalid_input(
                        "shadow",
                        format!("holds {} sequences", local.slots.len()),
                        "a free place for another sequence in the sliding-window layers",
                    ));
                }
            }
        }
        match build(self, id) {
            Ok(value) => {
                self.lens.push((id, len as u32));
                Ok((id, value))
            }
            Err(error) => {
                // The build's error is the one to report; a failed removal leaves nothing
                // more to undo.
                let _ = self.cache.remove_sequence(gpu, id);
                self.free_local_slot(id);
                Err(error)
            }
        }
    }

    /// Frees a finished sequence's place.
    pub fn remove_sequence(&mut self, gpu: &Gpu, id: SequenceId) -> Result<()> {
        self.cache
            .remove_sequence(gpu, id)
            .on_gpu("removing a sequence from the ShadowKV cache")?;
        self.lens.retain(|&(live, _)| live != id);
        self.free_local_slot(id);
        Ok(())
    }

    /// Frees sequence `id`'s slot in the sliding-window layers, if it has one.
    fn free_local_slot(&mut self, id: SequenceId) {
        if let Some(local) = &mut self.local {
            if let Some(slot) = local.slot_of(id) {
                local.slots[slot] = None;
            }
        }
    }

    /// GPU and host bytes of the cache, by part (the sliding-window layers' slots too).
    pub fn memory_report(&self) -> Result<MemoryReport> {
        let mut report = self
            .cache
            .memory_report()
            .on_gpu("sizing the ShadowKV cache")?;
        if let Some(local) = &self.local {
            report
                .gpu
                .push(("sliding-window layers' K/V", local.cache.bytes() as u64));
        }
        Ok(report)
    }

    /// SYNTHETIC SELECTION, for throughput benchmarks on random data: every later decode
    /// step keeps `rate` of each (sequence, KV head)'s selected chunks resident from the step
    /// before and fetches the rest (`DecodeStep::set_scripted_hit_rate`); the outputs are then
    /// no longer ShadowKV's. `None` selects as usual. A rate outside `[0, 1]` is an error.
    pub fn set_scripted_hit_rate(&mut self, rate: Option<f64>) -> Result<()> {
        self.cache
            .decode_step()
            .set_scripted_hit_rate(rate)
            .on_gpu("setting the scripted hit rate")?;
        self.scripted_hit_rate = rate;
        Ok(())
    }

    /// The shadow cache itself (its last step's statistics, layouts).
    pub fn cache(&self) -> &ShadowKvCache {
        &self.cache
    }
}
