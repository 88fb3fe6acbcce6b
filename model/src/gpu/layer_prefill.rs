//! The layer-wise ShadowKV prefill: the whole prompt through layer `l` (in passes) before
//! layer `l + 1`, each layer's shadow built right after it, so the prefill holds one layer's
//! keys and values instead of every layer's (`crate::prefill_memory` has the bound).
//!
//! Per layer `l` (slot `s = l % 2` of the pre-RoPE keys), on the compute stream:
//! 1. wait for layer `l - 1`'s value offload (the values buffer is reused), then layer `l`'s
//!    passes ([`GpuModel::layer_pass`]) over the prompt's hidden states, writing the one-layer
//!    keys and values, the pre-RoPE keys of slot `s` and the last query;
//! 2. `prefill_layer_finish` of layer `l - 1`: its factorisation on the factoriser's stream,
//!    beside layer `l`'s passes, then its key rebuild;
//! 3. `prefill_layer_start` of layer `l`: landmarks, outliers, the value offload (copy
//!    stream), the first selection and its exact gathers.
//!
//! The factorisation's cuSOLVER calls block the host until the factoriser's stream reaches
//! them. Calling `finish` for layer `l - 1` only after layer `l`'s passes are queued keeps the
//! compute stream busy while the host waits, and the factorisation itself runs on its own
//! stream beside those passes: a stream-ordered route with no worker thread (the cache's
//! buffers and the cuSOLVER handle stay on one thread). The price is a second pre-RoPE keys
//! buffer, which layer `l + 1` writes while layer `l - 1`'s is being read.
use std::ops::Range;

use half::bf16;
use shadowkv::cache::SequenceId;
use shadowkv::kernels::shadow_prefill::PrefillSource;
use shadowkv::SequenceLayout;

use super::forward::PrefillTaps;
use super::kv_cache::GpuKvCache;
use super::model::GpuModel;
use super::shadow_cache::GpuShadowCache;
use crate::error::{invalid_input, OnGpu, Result};
use crate::prefill_memory::PrefillMemory;

/// The peak GPU memory of one prefill: measured, and the layer-wise bound for its prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillPeak {
    /// The weights plus the most device memory in use (`cuMemGetInfo`, sampled after every
    /// pass and every layer's shadow) above what was in use when the prefill began.
    pub measured: u64,
    /// The layer-wise prefill's bound for this prompt, by part.
    pub expected: PrefillMemory,
}

impl std::fmt::Display for PrefillPeak {
    /// `prefill peak GPU memory: X GB (weights A, hidden states B, one layer's K/V C,
    /// workspace D; bound E GB)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = &self.expected;
        let gb = |bytes: u64| bytes as f64 / 1e9;
        write!(
            f,
            "prefill peak GPU memory: {:.2} GB (weights {:.2}, hidden states {:.2}, one layer's K/V {:.2}, workspace {:.2}; bound {:.2} GB)",
            gb(self.measured),
            gb(e.weights),
            gb(e.hidden_states),
            gb(e.layer_kv),
            gb(e.workspace),
            gb(e.bound())
        )
    }
}

/// Samples the device memory in use during a prefill.
pub(super) struct PeakSampler<'a> {
    model: &'a GpuModel,
    before: u64,
    peak: u64,
}

impl<'a> PeakSampler<'a> {
    pub(super) fn new(model: &'a GpuModel) -> Result<PeakSampler<'a>> {
        let mut sampler = PeakSampler {
            model,
            before: 0,
            peak: 0,
        };
        sampler.before = sampler.used()?;
        sampler.peak = sampler.before;
        Ok(sampler)
    }

    fn used(&self) -> Result<u64> {
        let (free, total) = self
            .model
            .gpu
            .context()
            .mem_get_info()
            .on_gpu("reading the free GPU memory")?;
        Ok(total.saturating_sub(free) as u64)
    }

    /// Records the memory in use now.
    pub(super) fn sample(&mut self) -> Result<()> {
        self.peak = self.peak.max(self.used()?);
        Ok(())
    }

    /// The weights plus the peak above the memory in use at the start.
    pub(super) fn peak(&self, expected: PrefillMemory) -> PrefillPeak {
        PrefillPeak {
            measured: self.model.weight_bytes() as u64 + (self.peak - self.before),
            expected,
        }
    }
}

impl GpuModel {
    /// [`prefill_shadow`](Self::prefill_shadow), also returning the prefill's peak GPU memory
    /// (measured, and the bound of [`PrefillMemory::layerwise`]).
    pub fn prefill_shadow_measured(
        &self,
        shadow: &mut GpuShadowCache,
        prompt: &[u32],
        pass_tokens: usize,
        progress: impl FnMut(usize),
    ) -> Result<(SequenceId, Vec<f32>, PrefillPeak)> {
        self.prefill_layerwise(shadow, prompt, pass_tokens, progress, None)
    }

    /// [`prefill_shadow`](Self::prefill_shadow) that fails on purpose once layer
    /// `fail_at_layer`'s passes are queued (with the layer before it pending): for tests of
    /// the cleanup after a failure in the middle of a prefill.
    #[doc(hidden)]
    pub fn prefill_shadow_failing_at_layer(
        &self,
        shadow: &mut GpuShadowCache,
        prompt: &[u32],
        pass_tokens: usize,
        fail_at_layer: usize,
    ) -> Result<(SequenceId, Vec<f32>)> {
        self.prefill_layerwise(shadow, prompt, pass_tokens, |_| {}, Some(fail_at_layer))
            .map(|(id, logits, _)| (id, logits))
    }

    pub(super) fn prefill_layerwise(
        &self,
        shadow: &mut GpuShadowCache,
        prompt: &[u32],
        pass_tokens: usize,
        mut progress: impl FnMut(usize),
        fail_at_layer: Option<usize>,
    ) -> Result<(SequenceId, Vec<f32>, PrefillPeak)> {
        check_prompt(self, prompt, pass_tokens)?;
        let expected = PrefillMemory::layerwise(
            &self.config,
            self.weight_bytes() as u64,
            prompt.len(),
            pass_tokens,
        );
        let mut sampler = PeakSampler::new(self)?;
        let (id, logits) = shadow.add_built(self.gpu(), prompt.len(), |shadow, id| {
            self.build_layerwise(
                shadow,
                id,
                prompt,
                pass_tokens,
                &mut progress,
                &mut sampler,
                fail_at_layer,
            )
        })?;
        Ok((id, logits, sampler.peak(expected)))
    }

    /// The body of [`prefill_layerwise`](Self::prefill_layerwise) for the sequence `id`
    /// already added to `shadow` (removed by the caller on an error).
    #[allow(clippy::too_many_arguments)]
    fn build_layerwise(
        &self,
        shadow: &mut GpuShadowCache,
        id: SequenceId,
        prompt: &[u32],
        pass_tokens: usize,
        progress: &mut impl FnMut(usize),
        sampler: &mut PeakSampler<'_>,
        fail_at_layer: Option<usize>,
    ) -> Result<Vec<f32>> {
        const WHAT: &str = "the layer-wise ShadowKV prefill";
        let (config, gpu, stream) = (&self.config, &*self.gpu, self.stream());
        let (len, hidden) = (prompt.len(), config.hidden);
        let kv_len = (len * config.kv_dim()).next_multiple_of(8);
        let alloc = |n: usize| stream.alloc_zeros::<bf16>(n).on_gpu(WHAT);
        let mut states = stream.alloc_zeros::<f32>(len * hidden).on_gpu(WHAT)?;
        let passes: Vec<Range<usize>> = (0..len)
            .step_by(pass_tokens)
            .map(|start| start..(start + pass_tokens).min(len))
            .collect();
        for pass in &passes {
            let ids = stream.clone_htod(&prompt[pass.clone()]).on_gpu(WHAT)?;
            // Scaled as the all-layers route and the decode steps scale it (Gemma-3).
            self.embed(
                &prompt[pass.clone()],
                &ids,
                &mut states.slice_mut(pass.start * hidden..pass.end * hidden),
            )?;
        }
        // One layer's keys and values, laid out as the all-layers route's full cache of this
        // one sequence (so the same attention plans and the same prefill source).
        let layout = SequenceLayout {
            offset: 0,
            capacity: len as u32,
            len: 1,
        };
        let mut layer_cache = GpuKvCache {
            id: super::next_cache_id(),
            layouts: vec![layout],
            lens: vec![0],
            k: vec![alloc(kv_len)?],
            v: vec![alloc(kv_len)?],
        };
        let kv_rows = len * config.kv_dim();
        let mut pre_rope = [alloc(kv_rows)?, alloc(kv_rows)?];
        let mut last_query = alloc(config.q_dim())?;
        let mut logits = stream.alloc_zeros::<f32>(self.logit_rows()).on_gpu(WHAT)?;
        sampler.sample()?;
        let queued = (|| -> Result<()> {
            // The pre-RoPE buffer of the global layer whose factorisation is still pending
            // (a sliding-window layer builds no shadow and leaves it pending).
            let mut pending: Option<usize> = None;
            for layer in 0..config.layers {
                let slot = match pending {
                    Some(busy) => 1 - busy,
                    None => 0,
                };
                if layer > 0 {
                    // The previous layer's values are still being copied out of the values
                    // buffer on the copy stream: this layer's first write waits for it.
                    stream.wait(shadow.cache.offload_done()).on_gpu(WHAT)?;
                }
                layer_cache.lens[0] = 0;
                for pass in &passes {
                    let taps = PrefillTaps {
                        pre_rope_keys: std::slice::from_mut(&mut pre_rope[slot]),
                        last_queries: &mut last_query,
                        rows_before: pass.start,
                    };
                    let mut x = states.slice_mut(pass.start * hidden..pass.end * hidden);
                    let normed = self.layer_pass(layer, &mut x, &mut layer_cache, taps)?;
                    if layer + 1 == config.layers && pass.end == len {
                        // The output norm of the prompt's last token.
                        let row = pass.len() - 1;
                        self.linear
                            .forward(
                                &normed.slice(row * hidden..(row + 1) * hidden),
                                self.weights.head(),
                                hidden,
                                &mut logits,
                            )
                            .on_gpu(WHAT)?;
                    }
                    sampler.sample()?;
                    progress((layer * len + pass.end) / config.layers);
                }
                if fail_at_layer == Some(layer) {
                    return Err(invalid_input(
                        "fail_at_layer",
                        format!("stopped the prefill at layer {layer}"),
                        "a prefill left to finish (a test of the cleanup)",
                    ));
                }
                let full_layout = SequenceLayout {
                    len: len as u32,
                    ..layout
                };
                if self.is_local_layer(layer) {
                    let buffers = (&layer_cache.k[0], &layer_cache.v[0]);
                    self.keep_local_layer(shadow, layer, id, buffers, full_layout)?;
                    sampler.sample()?;
                    continue;
                }
                if let Some(busy) = pending {
                    // The previous global layer's factorisation, beside this layer's passes.
                    shadow
                        .cache
                        .prefill_layer_finish(gpu, &pre_rope[busy])
                        .on_gpu(WHAT)?;
                }
                let source = PrefillSource {
                    keys: &layer_cache.k[0],
                    values: &layer_cache.v[0],
                    layout: full_layout,
                };
                shadow
                    .cache
                    .prefill_layer_start(
                        gpu,
                        self.shadow_layer(layer),
                        id,
                        &pre_rope[slot],
                        &source,
                        &last_query,
                    )
                    .on_gpu(WHAT)?;
                pending = Some(slot);
                sampler.sample()?;
            }
            match pending {
                Some(busy) => shadow
                    .cache
                    .prefill_layer_finish(gpu, &pre_rope[busy])
                    .on_gpu(WHAT),
                None => Ok(()),
            }
        })();
        // The offload and the factorisation read these buffers on their own streams: wait
        // for both before the buffers drop, whether or not every layer was queued, and check
        // the factorisations.
        let finished = shadow.cache.check_prefill().on_gpu(WHAT);
        queued.and(finished)?;
        sampler.sample()?;
        stream.clone_dtoh(&logits).on_gpu("reading the logits back")
    }
}

/// The prompt and the pass size, checked before anything is allocated.
pub(super) fn check_prompt(model: &GpuModel, prompt: &[u32], pass_tokens: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(invalid_input("prompt", "is empty", "at least one token"));
    }
    if pass_tokens == 0 {
        return Err(invalid_input(
            "pass_tokens",
            "is 0",
            "at least one token per pass",
        ));
    }
    let vocab = model.config.vocab;
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(invalid_input(
            "prompt",
            format!("holds id {bad}"),
            format!("ids below the vocabulary size {vocab}"),
        ));
    }
    Ok(())
}
