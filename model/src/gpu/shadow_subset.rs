//! ShadowKV decode steps over any subset of a [`GpuShadowCache`]'s live sequences, in any
//! order (continuous batching): the others may be idle, or be prefilled between the steps.
//! Each layer's attention goes through `ShadowKvCache::attend_for`, which addresses the state
//! that outlives a step by each sequence's resident row, never by its place in the batch.
use shadowkv::cache::SequenceId;
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::kernels::layer::kernel_layout::TokenPlacement;
use shadowkv::kernels::layer::TokenPlan;
use shadowkv::SequenceLayout;

use super::forward::PassCache;
use super::model::GpuModel;
use super::shadow_cache::GpuShadowCache;
use crate::error::{invalid_input, OnGpu, Result};

impl GpuShadowCache {
    /// Tokens so far of live sequence `id`, or `None` if it is not live.
    pub fn len_of(&self, id: SequenceId) -> Option<u32> {
        self.lens
            .iter()
            .find(|&&(live, _)| live == id)
            .map(|&(_, len)| len)
    }
}

impl GpuModel {
    /// One ShadowKV decode step of the sequences named in `batch`, each `(sequence, its next
    /// token)`, in that order; the other live sequences are left as they are. Returns the
    /// logits `[batch.len(), vocab]` in `batch` order. An empty batch, a sequence that is not
    /// live or is named twice, or a token past the vocabulary is an error that changes
    /// nothing.
    pub fn decode_shadow_for(
        &self,
        shadow: &mut GpuShadowCache,
        batch: &[(SequenceId, u32)],
    ) -> Result<Vec<f32>> {
        let logits = self.decode_shadow_for_on_device(shadow, batch)?;
        self.stream()
            .clone_dtoh(&logits)
            .on_gpu("reading the logits back")
    }

    /// [`decode_shadow_for`](Self::decode_shadow_for) with greedy sampling on the GPU.
    pub fn decode_shadow_for_greedy(
        &self,
        shadow: &mut GpuShadowCache,
        batch: &[(SequenceId, u32)],
    ) -> Result<Vec<u32>> {
        let logits = self.decode_shadow_for_on_device(shadow, batch)?;
        self.argmax_rows(&logits)
    }

    /// The subset step's layers; the logits stay on the GPU.
    fn decode_shadow_for_on_device(
        &self,
        shadow: &mut GpuShadowCache,
        batch: &[(SequenceId, u32)],
    ) -> Result<CudaSlice<f32>> {
        if batch.is_empty() {
            return Err(invalid_input(
                "batch",
                "is empty",
                "at least one live sequence",
            ));
        }
        let mut positions = Vec::with_capacity(batch.len());
        for (row, &(id, _)) in batch.iter().enumerate() {
            let Some(len) = shadow.len_of(id) else {
                return Err(invalid_input(
                    "batch",
                    format!("names {id:?}, which is not live"),
                    "live sequences of the ShadowKV cache",
                ));
            };
            if batch[..row].iter().any(|&(named, _)| named == id) {
                return Err(invalid_input(
                    "batch",
                    format!("names {id:?} twice"),
                    "each sequence at most once",
                ));
            }
            positions.push(len);
        }
        let ids: Vec<SequenceId> = batch.iter().map(|&(id, _)| id).collect();
        let tokens: Vec<u32> = batch.iter().map(|&(_, token)| token).collect();
        // Each token's RoPE position is its sequence's length; its key and value go to row
        // `b` of the staging blocks, `[b, kv_heads, head_dim]` (the batch has at most the
        // cache's sequences, which is the staging blocks' size).
        let kv_dim = self.config.kv_dim();
        let layouts: Vec<SequenceLayout> = (0..batch.len())
            .map(|b| SequenceLayout {
                offset: (b * kv_dim) as u64,
                capacity: 1,
                len: 1,
            })
            .collect();
        let placements: Vec<TokenPlacement> = positions
            .iter()
            .enumerate()
            .map(|(b, &len)| TokenPlacement::new(b as u32, len).with_cache_row(0))
            .collect();
        let plan = TokenPlan::new(self.stream(), self.qkv_shape(), &placements, &layouts)
            .on_gpu("placing the tokens")?;
        // The sliding-window layers (if any) place the same tokens in the sequences' slots.
        let sequences: Vec<(SequenceId, u32)> = ids.iter().copied().zip(positions).collect();
        self.plan_local_step(shadow, &sequences)?;
        let rows: Vec<usize> = (0..batch.len()).collect();
        let mode = PassCache::ShadowSubset {
            shadow: &mut *shadow,
            ids: &ids,
        };
        let result = self.run_layers(&tokens, &plan, mode, &rows);
        if let Some(local) = &mut shadow.local {
            local.step = None;
        }
        let logits = result?;
        for entry in &mut shadow.lens {
            if ids.contains(&entry.0) {
                entry.1 += 1;
            }
        }
        Ok(logits)
    }
}
