//! Prefill: a sequence's shadow built layer by layer from its prompt, the values offloaded on
//! the copy stream.
use cudarc::driver::{CudaEvent, DevicePtr};
use half::bf16;

use super::{offload_values, SequenceId, ShadowKvCache};
use crate::error::{check_len, Result};
use crate::gpu::Gpu;
use crate::kernels::shadow_prefill::{self, PrefillSource};

impl ShadowKvCache {
    /// Builds `layer`'s shadow of sequence `id` from its prompt: `pre_rope_keys`
    /// (`[L, Hkv*d]` bf16), the post-RoPE keys and values in `source` (`[Hkv, capacity, d]`),
    /// and `last_query` (`[q_heads, d]` bf16, post-RoPE: the last prompt token's query).
    /// Nothing waits for the GPU. The values are copied to the cache on the copy stream, so
    /// `source.values` must stay unchanged until the copy stream has passed this call (any
    /// later `decode_layer` orders after it, with the overlap on or off; other work on
    /// `gpu.stream()` does not). Other sequences may decode between the layers of a prefill
    /// (see [`decode_layer_for`](Self::decode_layer_for)); prefilling a layer again starts
    /// it over (its generated tokens are dropped).
    pub fn prefill_layer<T: DevicePtr<bf16>>(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        id: SequenceId,
        pre_rope_keys: &impl DevicePtr<bf16>,
        source: &PrefillSource<'_, T>,
        last_query: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        let result = self.enqueue_prefill(gpu, layer, id, pre_rope_keys, source, last_query);
        if result.is_err() {
            // The offload may have been queued before the failure: the caller frees the
            // source on an error, so let the copy stream finish reading it first.
            let _ = self.step.copy_stream().synchronize();
        }
        result
    }

    /// The body of [`prefill_layer`](Self::prefill_layer), which waits for the offload when
    /// it fails.
    pub(super) fn enqueue_prefill<T: DevicePtr<bf16>>(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        id: SequenceId,
        pre_rope_keys: &impl DevicePtr<bf16>,
        source: &PrefillSource<'_, T>,
        last_query: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let index = self.index_of(id)?;
        let q_width = self.shape.q_heads * self.shape.head_dim;
        check_len(
            "last_query",
            last_query.len(),
            q_width,
            "[q_heads, head_dim]",
        )?;
        let sequence = self.entries[index].layout;
        let prompt = sequence.prompt_len as usize;
        check_len(
            "pre_rope_keys",
            pre_rope_keys.len(),
            prompt * self.shape.kv_width(),
            "[prompt_len, kv_heads * head_dim]",
        )?;
        let stream = gpu.stream().clone();
        let rank = self.params.rank;
        let shadow = &mut self.layers[layer];
        // The layer's batch for the prefill: this sequence alone, with no generated tokens.
        shadow.batch.set_sequences(&stream, &[sequence])?;
        self.step.reserve(gpu, &shadow.batch)?;
        // The point the offload waits for: the source is ready once the work queued so far on
        // the compute stream has run.
        self.source_ready.record(&stream)?;
        // 1. Landmarks, outliers, empty slots; this checks the source and the layouts before
        //    any other work is queued.
        shadow_prefill::build_landmarks(
            gpu,
            &stream,
            shadow,
            0,
            source,
            &mut self.scratch,
            self.step.scratch(),
        )?;
        // From here the layer's state of the sequence is being rebuilt: not decodable until
        // the prefill completes.
        let entry = &mut self.entries[index];
        entry.prefilled[layer] = false;
        entry.generated[layer] = 0;
        // 2. The values to the cache's value buffer, on the copy stream.
        offload_values(
            gpu,
            &self.config,
            &self.source_ready,
            self.step.copy_stream(),
            source,
            &sequence,
            &mut shadow.values,
        )?;
        self.offload_done.record(self.step.copy_stream())?;
        // 3. The factors, into the sequence's rows of A and Bm.
        let a_range = sequence.a_offset as usize..sequence.a_offset as usize + prompt * rank;
        let bm_start = sequence.bm_offset as usize;
        let bm_range = bm_start..bm_start + rank * self.shape.kv_width();
        self.factoriser.run(
            gpu,
            pre_rope_keys,
            rank,
            layer,
            &mut shadow.a.slice_mut(a_range),
            &mut shadow.bm.slice_mut(bm_range),
        )?;
        // 4. The first selection with the last prompt query, its values from the prompt's
        //    (on the GPU) and its keys rebuilt, as a decode step would.
        let part = shadow.batch.whole();
        self.step.select_part(gpu, shadow, part, last_query)?;
        shadow_prefill::gather_exact(
            gpu,
            &stream,
            shadow,
            0,
            source,
            &mut self.scratch,
            self.step.scratch(),
        )?;
        self.step.rebuild_part(gpu, shadow, part)?;
        self.entries[index].prefilled[layer] = true;
        Ok(())
    }

    /// Completes once the latest [`prefill_layer`](Self::prefill_layer)'s values are in the
    /// cache's value buffer (recorded on the copy stream, with timing: an engine or a bench
    /// may measure the offload against it).
    pub fn offload_done(&self) -> &CudaEvent {
        &self.offload_done
    }

    /// Waits for every prefill so far and checks the factorisations converged.
    pub fn check_prefill(&self) -> Result<()> {
        self.step.copy_stream().synchronize()?;
        self.factoriser.check()
    }
}
