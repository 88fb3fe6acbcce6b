//! Prefill: a sequence's shadow built layer by layer from its prompt, the values offloaded on
//! the copy stream and the keys factorised on the factoriser's own stream.
//!
//! A layer's prefill is two halves. [`prefill_layer_start`](ShadowKvCache::prefill_layer_start)
//! queues everything that reads the layer's post-RoPE keys and values (landmarks, outliers,
//! the first selection and its exact gathers, the value offload); after it the caller may
//! reuse the keys buffer (the values once [`offload_done`](ShadowKvCache::offload_done) has
//! passed). [`prefill_layer_finish`](ShadowKvCache::prefill_layer_finish) factorises the
//! pre-RoPE keys on the factoriser's stream and rebuilds the first selection's keys. The
//! factorisation's cuSOLVER calls block the calling thread until its stream reaches them; a
//! layer-wise prefill calls `finish` after queuing the next layer's forward pass on the compute
//! stream, so the GPU works through that pass while the host waits, and the factorisation
//! runs beside it.
use cudarc::driver::{CudaEvent, DevicePtr};
use half::bf16;

use super::{offload_values, SequenceId, ShadowKvCache};
use crate::error::{check_len, invalid, Result};
use crate::gpu::Gpu;
use crate::kernels::shadow_prefill::{self, PrefillSource};

/// A layer's prefill between [`ShadowKvCache::prefill_layer_start`] and
/// [`ShadowKvCache::prefill_layer_finish`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingPrefill {
    /// The layer being prefilled.
    pub layer: usize,
    /// The sequence being prefilled.
    pub id: SequenceId,
    /// The device address of the pre-RoPE keys `start` was given (`finish` must get the same).
    keys_address: u64,
}

impl ShadowKvCache {
    /// Builds `layer`'s shadow of sequence `id` from its prompt: `pre_rope_keys`
    /// (`[L, Hkv*d]` bf16), the post-RoPE keys and values in `source` (`[Hkv, capacity, d]`),
    /// and `last_query` (`[q_heads, d]` bf16, post-RoPE: the last prompt token's query).
    /// Nothing waits for the GPU except the factorisation's solver calls, which block this
    /// thread until the factoriser's stream reaches them. The values are copied to the cache
    /// on the copy stream, so `source.values` must stay unchanged until the copy stream has
    /// passed this call (any later `decode_layer` orders after it, with the overlap on or
    /// off; other work on `gpu.stream()` does not). Other sequences may decode between the
    /// layers of a prefill (see [`decode_layer_for`](Self::decode_layer_for)); prefilling a
    /// layer again starts it over (its generated tokens are dropped). The same as
    /// [`prefill_layer_start`](Self::prefill_layer_start) then
    /// [`prefill_layer_finish`](Self::prefill_layer_finish).
    pub fn prefill_layer<T: DevicePtr<bf16>>(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        id: SequenceId,
        pre_rope_keys: &impl DevicePtr<bf16>,
        source: &PrefillSource<'_, T>,
        last_query: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        self.prefill_layer_start(gpu, layer, id, pre_rope_keys, source, last_query)?;
        self.prefill_layer_finish(gpu, pre_rope_keys)
    }

    /// The first half of [`prefill_layer`](Self::prefill_layer): checks every argument, then
    /// queues the landmarks, outliers, the value offload (copy stream), the first selection
    /// with `last_query` and its exact gathers. Once it returns, `source.keys` and
    /// `last_query` may be reused by later work on `gpu.stream()`; `source.values` once
    /// [`offload_done`](Self::offload_done) has passed; `pre_rope_keys` must stay unchanged
    /// until [`prefill_layer_finish`](Self::prefill_layer_finish) (with the same buffer) has
    /// returned and the factoriser's stream has passed it (work on `gpu.stream()` queued
    /// after `finish` is ordered after it). Until `finish`, no other layer may be prefilled
    /// and no decode step runs (each is refused): the first selection's miss list waits in
    /// the step's scratch for `finish`'s key rebuild. On an error nothing is left pending.
    pub fn prefill_layer_start<T: DevicePtr<bf16>>(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        id: SequenceId,
        pre_rope_keys: &impl DevicePtr<bf16>,
        source: &PrefillSource<'_, T>,
        last_query: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        if let Some(pending) = self.pending_prefill {
            return Err(invalid(
                "layer",
                format!(
                    "{layer} of {id:?} started while layer {} of {:?} is pending",
                    pending.layer, pending.id
                ),
                "prefill_layer_finish for the pending layer first",
            ));
        }
        // A prefill's batch is the one sequence it builds: its launches read uploaded
        // layouts, not a replayed step's device copies.
        // SAFETY: `None` points at nothing.
        unsafe { self.read_step_layouts_from(None) };
        let result = self.enqueue_prefill_start(gpu, layer, id, pre_rope_keys, source, last_query);
        if result.is_err() {
            // The offload may have been queued before the failure: the caller frees the
            // source on an error, so let the copy stream finish reading it first.
            let _ = self.step.copy_stream().synchronize();
        }
        result
    }

    /// The second half of [`prefill_layer`](Self::prefill_layer): factorises the pending
    /// layer's `pre_rope_keys` (the buffer [`prefill_layer_start`](Self::prefill_layer_start)
    /// got) into the sequence's `A` and `Bm` on the factoriser's stream, once the keys are
    /// ready (ordered after the work queued before `start`), then rebuilds the first
    /// selection's keys on `gpu.stream()` after the factorisation. Work queued on
    /// `gpu.stream()` between `start` and `finish` (the next layer's forward pass) runs beside
    /// the factorisation. The layer is decodable once this returns. On an error the layer
    /// stays unprefilled and nothing is pending, except when `pre_rope_keys` is not the
    /// pending buffer (nothing was queued; call again with the right one).
    pub fn prefill_layer_finish(
        &mut self,
        gpu: &Gpu,
        pre_rope_keys: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        let Some(pending) = self.pending_prefill else {
            return Err(invalid(
                "prefill",
                "has no layer pending",
                "prefill_layer_start first",
            ));
        };
        let stream = gpu.stream().clone();
        let (address, used) = pre_rope_keys.device_ptr(&stream);
        drop(used);
        if address != pending.keys_address {
            return Err(invalid(
                "pre_rope_keys",
                format!(
                    "is not the buffer layer {} of {:?} was started with",
                    pending.layer, pending.id
                ),
                "the pre_rope_keys given to prefill_layer_start",
            ));
        }
        self.pending_prefill = None;
        let result = self.enqueue_prefill_finish(gpu, pending, pre_rope_keys);
        if result.is_err() {
            // The factorisation may be reading the keys: the caller frees them on an error.
            let _ = self.factoriser.stream().synchronize();
            let _ = self.step.copy_stream().synchronize();
        }
        result
    }

    /// The layer whose prefill is between `start` and `finish`, if any.
    pub fn pending_prefill(&self) -> Option<PendingPrefill> {
        self.pending_prefill
    }

    /// An error while a layer's prefill is pending (a decode step would overwrite the first
    /// selection's miss list in the step's scratch before the pending key rebuild reads it).
    pub(super) fn check_no_pending_prefill(&self) -> Result<()> {
        match self.pending_prefill {
            None => Ok(()),
            Some(pending) => Err(invalid(
                "cache",
                format!(
                    "has layer {} of {:?} between prefill_layer_start and prefill_layer_finish",
                    pending.layer, pending.id
                ),
                "prefill_layer_finish before a decode step",
            )),
        }
    }

    /// The body of [`prefill_layer_start`](Self::prefill_layer_start), which waits for the
    /// offload when it fails.
    fn enqueue_prefill_start<T: DevicePtr<bf16>>(
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
        let shadow = &mut self.layers[layer];
        // The layer's batch for the prefill: this sequence alone, with no generated tokens.
        shadow.batch.set_sequences(&stream, &[sequence])?;
        self.step.reserve(gpu, &shadow.batch)?;
        // The point the offload and the factorisation wait for: the source and the pre-RoPE
        // keys are ready once the work queued so far on the compute stream has run.
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
        // The sequence's row of the value tier named another sequence's chunks: empty it, on
        // the copy stream (after the compute stream's work so far, as the offload) before any
        // fetch of this sequence.
        if let Some(tier) = &mut shadow.tier {
            tier.clear_row(self.step.copy_stream(), sequence.resident_row)?;
        }
        self.offload_done.record(self.step.copy_stream())?;
        // 3. The first selection with the last prompt query, its values from the prompt's
        //    (on the GPU); its keys are rebuilt in `finish`, once the factors exist.
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
        let (keys_address, used) = pre_rope_keys.device_ptr(&stream);
        drop(used);
        self.pending_prefill = Some(PendingPrefill {
            layer,
            id,
            keys_address,
        });
        Ok(())
    }

    /// The body of [`prefill_layer_finish`](Self::prefill_layer_finish).
    fn enqueue_prefill_finish(
        &mut self,
        gpu: &Gpu,
        pending: PendingPrefill,
        pre_rope_keys: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        let PendingPrefill { layer, id, .. } = pending;
        let index = self.index_of(id)?;
        let sequence = self.entries[index].layout;
        let prompt = sequence.prompt_len as usize;
        let rank = self.params.rank;
        let stream = gpu.stream().clone();
        let factor_stream = self.factoriser.stream().clone();
        let shadow = &mut self.layers[layer];
        // 4. The factors, into the sequence's rows of A and Bm, on the factoriser's stream
        //    once the keys are ready.
        factor_stream.wait(&self.source_ready)?;
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
        self.factor_done.record(&factor_stream)?;
        // 5. The first selection's keys rebuilt from the factors, as a decode step would.
        stream.wait(&self.factor_done)?;
        let part = shadow.batch.whole();
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

    /// Completes once the latest finished prefill's factorisation has run (recorded on the
    /// factoriser's stream): after it the pre-RoPE keys it read may be reused.
    pub fn factor_done(&self) -> &CudaEvent {
        &self.factor_done
    }

    /// Waits for every prefill so far (the offloads and the factorisations) and checks the
    /// factorisations converged.
    pub fn check_prefill(&self) -> Result<()> {
        self.step.copy_stream().synchronize()?;
        self.factoriser.check()
    }
}
