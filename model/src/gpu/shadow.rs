//! ShadowKV on the GPU model: a cache for the model's shape, a prompt's prefill (layer-wise,
//! in `layer_prefill`; the all-layers route kept here to compare against: full attention in
//! passes, then each layer's shadow built from the full cache), a synthetic prefill for
//! throughput runs, and the decode steps through the shadow cache.
//!
//! `ShadowKvCache::prefill_layer` offloads a layer's values on the cache's copy stream, which
//! reads the source values after the compute stream has moved on. So a source buffer is
//! neither refilled nor freed until that copy has passed: a refill waits on
//! `offload_done()`, and every path out of a prefill (the error paths too) synchronises the
//! copy stream before its buffers drop.
use half::bf16;
use shadowkv::cache::{CacheCapacity, SequenceId, ShadowKvCache, ShadowKvParams, ValueStorage};
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::kernels::layer::kernel_layout::TokenPlacement;
use shadowkv::kernels::layer::TokenPlan;
use shadowkv::kernels::shadow_prefill::PrefillSource;
use shadowkv::{DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, SequenceLayout};

use super::forward::{PassCache, PrefillTaps};
use super::layer_prefill::{check_prompt, PeakSampler, PrefillPeak};
use super::model::GpuModel;
use super::shadow_cache::{GpuShadowCache, LocalLayers};
use crate::error::{invalid_input, OnGpu, Result};
use crate::prefill_memory::PrefillMemory;

/// The seeds of one layer's random buffers in [`GpuModel::prefill_shadow_synthetic`]: each
/// buffer is `shadowkv::kernels::random::fill` with its seed, scale 1 and offset 0 (so
/// `shadowkv::reference::random::fill` regenerates it on the CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyntheticLayerSeeds {
    /// Post-RoPE keys, `[kv_heads, len, head_dim]`.
    pub keys: u64,
    /// Values, `[kv_heads, len, head_dim]`.
    pub values: u64,
    /// Pre-RoPE keys, `[len, kv_heads * head_dim]` (unrelated to `keys`).
    pub pre_rope_keys: u64,
    /// The last query, `[heads, head_dim]`.
    pub query: u64,
}

impl SyntheticLayerSeeds {
    /// The seeds of `layer` in a synthetic prefill with `seed`.
    pub fn new(seed: u64, layer: usize) -> SyntheticLayerSeeds {
        let base = seed.wrapping_mul(31).wrapping_add(4 * layer as u64);
        SyntheticLayerSeeds {
            keys: base,
            values: base.wrapping_add(1),
            pre_rope_keys: base.wrapping_add(2),
            query: base.wrapping_add(3),
        }
    }
}

impl GpuModel {
    /// A ShadowKV cache for this model: `params` (checked against the model's shape), the
    /// values on the host or the GPU, in bf16 or compressed (a `ValueHome` alone is bf16),
    /// sized for `capacity` (all allocated now; the error says how much was needed and free).
    pub fn new_shadow_cache(
        &self,
        params: ShadowKvParams,
        values_home: impl Into<ValueStorage>,
        capacity: CacheCapacity,
    ) -> Result<GpuShadowCache> {
        const WHAT: &str = "creating the ShadowKV cache";
        let config = &self.config;
        let global_layers = config.global_layers();
        let shape = config.shadow_cache_shape();
        let cache =
            ShadowKvCache::new(&self.gpu, shape, params, values_home, capacity).on_gpu(WHAT)?;
        let staged = capacity.max_sequences * config.kv_dim();
        let stream = self.stream();
        // The sliding-window layers stay exact: a full block per sequence slot.
        let local = match config.layers - global_layers {
            0 => None,
            local_layers => {
                let tokens = (capacity.max_prompt_len + capacity.max_generated) as u32;
                Some(LocalLayers {
                    cache: self
                        .new_cache_of_layers(&vec![tokens; capacity.max_sequences], local_layers)?,
                    slots: vec![None; capacity.max_sequences],
                    step: None,
                })
            }
        };
        Ok(GpuShadowCache {
            id: super::next_cache_id(),
            scripted_hit_rate: None,
            cache,
            lens: Vec::new(),
            staged_keys: stream.alloc_zeros::<bf16>(staged).on_gpu(WHAT)?,
            staged_values: stream.alloc_zeros::<bf16>(staged).on_gpu(WHAT)?,
            local,
        })
    }

    /// Layer `index`'s place in the shadow cache, which holds the global layers only (the
    /// same index for a model without sliding-window layers).
    pub(super) fn shadow_layer(&self, index: usize) -> usize {
        (0..index).filter(|&l| !self.is_local_layer(l)).count()
    }

    /// Layer `index`'s place among the sliding-window layers.
    pub(super) fn local_layer(&self, index: usize) -> usize {
        (0..index).filter(|&l| self.is_local_layer(l)).count()
    }

    /// Copies a sliding-window layer's prompt keys and values (`len` tokens in `source`'s
    /// block of `keys` / `values`) into sequence `id`'s slot of `shadow`'s local layers.
    pub(super) fn keep_local_layer(
        &self,
        shadow: &mut GpuShadowCache,
        index: usize,
        id: SequenceId,
        (keys, values): (&CudaSlice<bf16>, &CudaSlice<bf16>),
        source: SequenceLayout,
    ) -> Result<()> {
        const WHAT: &str = "keeping a sliding-window layer's prompt";
        let local_index = self.local_layer(index);
        let local = shadow.local.as_mut().ok_or_else(|| {
            invalid_input(
                "shadow",
                "has no sliding-window layers",
                "a cache of this model",
            )
        })?;
        let slot = local
            .slot_of(id)
            .ok_or_else(|| invalid_input("id", "has no slot", "a sequence of the cache"))?;
        let target = local.cache.layouts[slot];
        let (head_dim, len) = (self.config.head_dim, source.len as usize);
        if len > target.capacity as usize {
            return Err(invalid_input(
                "prompt",
                format!("has {len} tokens"),
                format!("at most the cache's {} per sequence", target.capacity),
            ));
        }
        let stream = self.stream();
        for head in 0..self.config.kv_heads {
            let from = source.offset as usize + head * source.capacity as usize * head_dim;
            let to = target.offset as usize + head * target.capacity as usize * head_dim;
            let rows = len * head_dim;
            stream
                .memcpy_dtod(
                    &keys.slice(from..from + rows),
                    &mut local.cache.k[local_index].slice_mut(to..to + rows),
                )
                .on_gpu(WHAT)?;
            stream
                .memcpy_dtod(
                    &values.slice(from..from + rows),
                    &mut local.cache.v[local_index].slice_mut(to..to + rows),
                )
                .on_gpu(WHAT)?;
        }
        Ok(())
    }

    /// Adds `prompt` as a new sequence of `shadow` and returns it with its last token's
    /// logits. Layer-wise (`layer_prefill`): the whole prompt runs through each layer with
    /// full attention, in passes of `pass_tokens`, before the next, and each layer's shadow is
    /// built right after it, so the prefill holds one layer's keys and values
    /// ([`PrefillMemory::layerwise`] is its peak). `progress` gets the prompt tokens done so
    /// far, counted across the layers (the prompt's length at the end).
    ///
    /// [`PrefillMemory::layerwise`]: crate::PrefillMemory::layerwise
    pub fn prefill_shadow(
        &self,
        shadow: &mut GpuShadowCache,
        prompt: &[u32],
        pass_tokens: usize,
        progress: impl FnMut(usize),
    ) -> Result<(SequenceId, Vec<f32>)> {
        self.prefill_layerwise(shadow, prompt, pass_tokens, progress, None)
            .map(|(id, logits, _)| (id, logits))
    }

    /// The all-layers route [`prefill_shadow`](Self::prefill_shadow) replaced, kept to compare
    /// against (the same logits; about 1.5 full caches at its peak): every pass runs every
    /// layer into a full cache of the prompt, then every layer's shadow is built from it.
    /// Returns the sequence, its last token's logits and the measured peak (against the
    /// layer-wise bound).
    pub fn prefill_shadow_all_layers(
        &self,
        shadow: &mut GpuShadowCache,
        prompt: &[u32],
        pass_tokens: usize,
        mut progress: impl FnMut(usize),
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
            self.build_shadow(shadow, id, prompt, pass_tokens, &mut progress, &mut sampler)
        })?;
        Ok((id, logits, sampler.peak(expected)))
    }

    /// The prompt through full attention into a full cache of its own (keeping each layer's
    /// pre-RoPE keys and last query), then each layer's shadow built from that cache.
    fn build_shadow(
        &self,
        shadow: &mut GpuShadowCache,
        id: SequenceId,
        prompt: &[u32],
        pass_tokens: usize,
        progress: &mut impl FnMut(usize),
        sampler: &mut PeakSampler<'_>,
    ) -> Result<Vec<f32>> {
        const WHAT: &str = "building the ShadowKV prefill";
        let (config, gpu, stream) = (&self.config, &*self.gpu, self.stream());
        let mut full = self.new_cache(&[prompt.len() as u32])?;
        let mut pre_rope_keys = (0..config.layers)
            .map(|_| {
                stream
                    .alloc_zeros::<bf16>(prompt.len() * config.kv_dim())
                    .on_gpu(WHAT)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut last_queries = stream
            .alloc_zeros::<bf16>(config.layers * config.q_dim())
            .on_gpu(WHAT)?;
        let mut logits = None;
        let mut done = 0;
        for pass in prompt.chunks(pass_tokens) {
            let taps = PrefillTaps {
                pre_rope_keys: &mut pre_rope_keys,
                last_queries: &mut last_queries,
                rows_before: done,
            };
            logits = Some(self.forward_full(&mut full, &vec![0; pass.len()], pass, Some(taps))?);
            sampler.sample()?;
            done += pass.len();
            progress(done);
        }
        let layout = SequenceLayout {
            len: prompt.len() as u32,
            ..full.layouts[0]
        };
        let q_dim = config.q_dim();
        // Every layer has buffers of its own in `full`, so no layer waits for another's
        // offload; only dropping `full` must wait for all of them.
        let queued = (|| -> Result<()> {
            let layers = full.k.iter().zip(&full.v).zip(&pre_rope_keys).enumerate();
            for (layer, ((keys, values), pre_rope)) in layers {
                if self.is_local_layer(layer) {
                    self.keep_local_layer(shadow, layer, id, (keys, values), layout)?;
                    continue;
                }
                let source = PrefillSource {
                    keys,
                    values,
                    layout,
                };
                let last_query = last_queries.slice(layer * q_dim..(layer + 1) * q_dim);
                shadow
                    .cache
                    .prefill_layer(
                        gpu,
                        self.shadow_layer(layer),
                        id,
                        pre_rope,
                        &source,
                        &last_query,
                    )
                    .on_gpu(WHAT)?;
                sampler.sample()?;
            }
            Ok(())
        })();
        // The offload reads `full` on the copy stream: wait for it before `full` drops,
        // whether or not every layer was queued, and check the factorisations.
        let finished = shadow.cache.check_prefill().on_gpu(WHAT);
        queued.and(finished)?;
        let logits = logits.ok_or_else(|| invalid_input("prompt", "is empty", "one token"))?;
        stream.clone_dtoh(&logits).on_gpu("reading the logits back")
    }

    /// One ShadowKV decode step: `tokens[b]` is the next token of live sequence `b` (in
    /// [`GpuShadowCache::sequences`] order); returns the logits `[sequences, vocab]`.
    pub fn decode_shadow(&self, shadow: &mut GpuShadowCache, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.decode_shadow_on_device(shadow, tokens)?;
        self.stream()
            .clone_dtoh(&logits)
            .on_gpu("reading the logits back")
    }

    /// [`decode_shadow`](Self::decode_shadow) with greedy sampling on the GPU.
    pub fn decode_shadow_greedy(
        &self,
        shadow: &mut GpuShadowCache,
        tokens: &[u32],
    ) -> Result<Vec<u32>> {
        let logits = self.decode_shadow_on_device(shadow, tokens)?;
        self.argmax_rows(&logits)
    }

    /// Adds a sequence of `len` tokens whose every layer is SYNTHETIC: random keys (before
    /// and after RoPE, unrelated), values and last query ([`SyntheticLayerSeeds`]), sent
    /// through the normal ShadowKV prefill (factorisation, landmarks, outliers, offload,
    /// first selection) without running the model over a prompt: for decode-throughput runs
    /// at long context. One layer's buffers at a time.
    pub fn prefill_shadow_synthetic(
        &self,
        shadow: &mut GpuShadowCache,
        len: usize,
        seed: u64,
    ) -> Result<SequenceId> {
        const WHAT: &str = "the synthetic ShadowKV prefill";
        let (config, gpu, stream) = (&self.config, &*self.gpu, self.stream());
        let built = shadow.add_built(gpu, len, |shadow, id| {
            let (kv_dim, q_dim) = (config.kv_dim(), config.q_dim());
            let alloc = |n: usize| stream.alloc_zeros::<bf16>(n).on_gpu(WHAT);
            let (mut keys, mut values) = (alloc(len * kv_dim)?, alloc(len * kv_dim)?);
            let (mut pre_rope, mut query) = (alloc(len * kv_dim)?, alloc(q_dim)?);
            let layout = SequenceLayout {
                offset: 0,
                capacity: len as u32,
                len: len as u32,
            };
            let fill = |buffer: &mut CudaSlice<bf16>, seed: u64| {
                shadowkv::kernels::random::fill(gpu, stream, buffer, seed, 1.0, 0.0).on_gpu(WHAT)
            };
            let queued = (|| -> Result<()> {
                for layer in 0..config.layers {
                    if self.is_local_layer(layer) {
                        // A sliding-window layer keeps the zeros of its new slot.
                        continue;
                    }
                    let seeds = SyntheticLayerSeeds::new(seed, layer);
                    fill(&mut keys, seeds.keys)?;
                    fill(&mut pre_rope, seeds.pre_rope_keys)?;
                    fill(&mut query, seeds.query)?;
                    if self.shadow_layer(layer) > 0 {
                        // The previous layer's values are still being copied out of `values`
                        // on the copy stream: the refill waits for that copy (the fills above
                        // and the previous layer's factorisation still overlap it).
                        stream.wait(shadow.cache.offload_done()).on_gpu(WHAT)?;
                    }
                    fill(&mut values, seeds.values)?;
                    let source = PrefillSource {
                        keys: &keys,
                        values: &values,
                        layout,
                    };
                    shadow
                        .cache
                        .prefill_layer(
                            gpu,
                            self.shadow_layer(layer),
                            id,
                            &pre_rope,
                            &source,
                            &query,
                        )
                        .on_gpu(WHAT)?;
                }
                Ok(())
            })();
            // The last offload still reads `values`: wait for it before the buffers drop,
            // whether or not every layer was queued, and check the factorisations.
            let finished = shadow.cache.check_prefill().on_gpu(WHAT);
            queued.and(finished)
        });
        built.map(|(id, ())| id)
    }

    /// A decode step's placement of the token of each of `sequences` (`(sequence, tokens so
    /// far)`, in the step's order) in its slot of the sliding-window layers, at its position,
    /// and their windowed attention over the slot.
    pub(super) fn plan_local_step(
        &self,
        shadow: &mut GpuShadowCache,
        sequences: &[(SequenceId, u32)],
    ) -> Result<()> {
        const WHAT: &str = "planning the sliding-window layers' step";
        let Some(window) = self.config.block.sliding_window else {
            return Ok(());
        };
        let Some(local) = &mut shadow.local else {
            return Ok(());
        };
        let (gpu, stream) = (&*self.gpu, self.stream());
        let mut placements = Vec::with_capacity(sequences.len());
        let mut attention_layouts = Vec::with_capacity(sequences.len());
        for &(id, len) in sequences {
            let (slot, layout) = local.slot_for_next_token(id, len)?;
            placements.push(TokenPlacement::new(slot as u32, len));
            attention_layouts.push(SequenceLayout {
                len: len + 1,
                ..layout
            });
        }
        let plan = TokenPlan::new(stream, self.qkv_shape(), &placements, &local.cache.layouts)
            .on_gpu(WHAT)?;
        let shape = DecodeAttentionShape {
            batch: placements.len(),
            q_heads: self.config.heads,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        };
        let attention_plan = DecodeAttentionPlan::for_gpu(gpu, shape, &attention_layouts)
            .on_gpu(WHAT)?
            .with_window(window.window as u32);
        let attention = DecodeAttention::new(gpu, attention_plan).on_gpu(WHAT)?;
        local.step = Some((plan, attention));
        Ok(())
    }

    /// A decode step's layers through the shadow cache; the logits stay on the GPU.
    fn decode_shadow_on_device(
        &self,
        shadow: &mut GpuShadowCache,
        tokens: &[u32],
    ) -> Result<CudaSlice<f32>> {
        let (config, stream) = (&self.config, self.stream());
        if tokens.len() != shadow.lens.len() || tokens.is_empty() {
            return Err(invalid_input(
                "tokens",
                format!(
                    "holds {} tokens for {} live sequences",
                    tokens.len(),
                    shadow.lens.len()
                ),
                "one token per live sequence, at least one sequence",
            ));
        }
        // This path uploads the layouts itself (a `DecodeRunner` may have pointed the cache
        // at its own device copies, which only its steps keep current).
        // SAFETY: `None` points at nothing.
        unsafe { shadow.cache.read_step_layouts_from(None) };
        // Each token's RoPE position is its sequence's length; its key and value go to the
        // one row of the sequence's staging block, `[b, kv_heads, head_dim]`.
        let kv_dim = config.kv_dim();
        let layouts: Vec<SequenceLayout> = (0..tokens.len())
            .map(|b| SequenceLayout {
                offset: (b * kv_dim) as u64,
                capacity: 1,
                len: 1,
            })
            .collect();
        let placements: Vec<TokenPlacement> = shadow
            .lens
            .iter()
            .enumerate()
            .map(|(b, &(_, len))| TokenPlacement::new(b as u32, len).with_cache_row(0))
            .collect();
        let plan = TokenPlan::new(stream, self.qkv_shape(), &placements, &layouts)
            .on_gpu("placing the tokens")?;
        let live = shadow.lens.clone();
        self.plan_local_step(shadow, &live)?;
        let rows: Vec<usize> = (0..tokens.len()).collect();
        let result = self.run_layers(tokens, &plan, PassCache::Shadow(&mut *shadow), &rows);
        if let Some(local) = &mut shadow.local {
            local.step = None;
        }
        let logits = result?;
        for entry in &mut shadow.lens {
            entry.1 += 1;
        }
        Ok(logits)
    }
}
