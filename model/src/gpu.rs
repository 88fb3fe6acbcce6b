//! The model on the GPU: bf16 weights, cuBLAS GEMMs, the `layer` kernels around them and
//! causal attention over a full KV cache, for a ragged batch of sequences.
//!
//! Every forward pass places its tokens in their sequences ([`TokenPlacement`]), appends their
//! keys and values to the cache and attends causally: a pass with one token per sequence (a
//! decode step) through the decode-attention kernel, split over the context; a pass with
//! prompts (several tokens of a sequence, side by side) through the tiled tensor-core prefill
//! kernel (or, [`GpuModel::set_tiled_prefill`], the decode kernel with one row per token).
//!
//! With ShadowKV ([`GpuShadowCache`]), a prompt prefills as above into a full cache that lives
//! only for the prefill, whose passes also keep each layer's keys before RoPE and its last
//! query; each layer's shadow (`ShadowKvCache::prefill_layer`) is then built from them. A
//! decode step rotates the new token's key into a one-row staging block per sequence,
//! appends it to the shadow cache and runs ShadowKV's sparse step (`decode_layer`).
use std::sync::Arc;

use half::bf16;
use shadowkv::cache::{
    CacheCapacity, CacheShape, MemoryReport, SequenceId, ShadowKvCache, ShadowKvParams, ValueHome,
};
use shadowkv::cudarc::driver::{CudaSlice, CudaStream};
use shadowkv::kernels::layer::kernel_layout::TokenPlacement;
use shadowkv::kernels::layer::{self, QkvShape, TokenPlan};
use shadowkv::kernels::prefill_attention::{
    kernel_layout::QueryPlacement, PrefillAttention, PrefillAttentionPlan, PrefillAttentionShape,
};
use shadowkv::kernels::shadow_prefill::PrefillSource;
use shadowkv::linear::Linear;
use shadowkv::{DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, Gpu, SequenceLayout};

use crate::config::ModelConfig;
use crate::weights::WeightFile;
use crate::{ModelFileError, Result};

/// A failure on the GPU side, as this crate's error.
fn gpu_error(error: impl std::fmt::Display) -> ModelFileError {
    ModelFileError {
        file: "GPU".into(),
        tensor: None,
        reason: error.to_string(),
    }
}

trait OrGpuError<T> {
    fn gpu(self) -> Result<T>;
}

impl<T, E: std::fmt::Display> OrGpuError<T> for std::result::Result<T, E> {
    fn gpu(self) -> Result<T> {
        self.map_err(gpu_error)
    }
}

/// One decoder block's weights on the GPU (Q/K/V and gate/up fused row-wise).
struct GpuLayer {
    attn_norm: CudaSlice<f32>,
    /// `[(heads + 2 kv_heads) * head_dim, hidden]`.
    qkv: CudaSlice<bf16>,
    qkv_bias: Option<CudaSlice<f32>>,
    o: CudaSlice<bf16>,
    ffn_norm: CudaSlice<f32>,
    /// `[2 ffn, hidden]`: gate rows, then up rows.
    gate_up: CudaSlice<bf16>,
    down: CudaSlice<bf16>,
}

/// The attention kernel of one forward pass.
enum AttentionPass {
    Decode(DecodeAttention),
    Prefill(PrefillAttention),
}

/// What one prefill pass keeps for ShadowKV: each layer's keys before RoPE (`[prompt,
/// kv_dim]`, filled `rows_before..` by this pass) and its last query (`[layers, q_dim]`).
struct PrefillTaps<'a> {
    pre_rope_keys: &'a mut [CudaSlice<bf16>],
    last_queries: &'a mut CudaSlice<bf16>,
    rows_before: usize,
}

/// Where a pass's keys and values go and how it attends.
enum PassCache<'a> {
    /// The full cache; with taps during a ShadowKV prefill.
    Full {
        cache: &'a mut GpuKvCache,
        attention: Box<AttentionPass>,
        taps: Option<PrefillTaps<'a>>,
    },
    /// A ShadowKV decode step: one token per live sequence.
    Shadow(&'a mut GpuShadowCache),
}

/// ShadowKV's cache for the GPU model: the shadow of every layer (`ShadowKvCache`), each live
/// sequence's length, and the one-row blocks that stage a decode step's new keys and values.
pub struct GpuShadowCache {
    cache: ShadowKvCache,
    /// `(sequence, tokens so far)`, in the cache's sequence order.
    lens: Vec<(SequenceId, u32)>,
    /// `[max_sequences, kv_heads, head_dim]` each.
    staged_keys: CudaSlice<bf16>,
    staged_values: CudaSlice<bf16>,
}

impl GpuShadowCache {
    /// The live sequences, in the order [`GpuModel::decode_shadow`] takes their tokens.
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
    fn add_built<T>(
        &mut self,
        gpu: &Gpu,
        len: usize,
        build: impl FnOnce(&mut Self, SequenceId) -> Result<T>,
    ) -> Result<(SequenceId, T)> {
        let id = self.cache.add_sequence(gpu, len).gpu()?;
        match build(self, id) {
            Ok(value) => {
                self.lens.push((id, len as u32));
                Ok((id, value))
            }
            Err(error) => {
                let _ = self.cache.remove_sequence(gpu, id);
                Err(error)
            }
        }
    }

    /// Frees a finished sequence's place.
    pub fn remove_sequence(&mut self, gpu: &Gpu, id: SequenceId) -> Result<()> {
        self.cache.remove_sequence(gpu, id).gpu()?;
        self.lens.retain(|&(live, _)| live != id);
        Ok(())
    }

    /// GPU and host bytes of the cache, by part.
    pub fn memory_report(&self) -> Result<MemoryReport> {
        self.cache.memory_report().gpu()
    }

    /// The shadow cache itself (its last step's statistics, layouts).
    pub fn cache(&self) -> &ShadowKvCache {
        &self.cache
    }
}

/// The model's weights on one GPU.
pub struct GpuModel {
    pub config: ModelConfig,
    gpu: Arc<Gpu>,
    linear: Linear,
    embedding: CudaSlice<bf16>,
    layers: Vec<GpuLayer>,
    output_norm: CudaSlice<f32>,
    output: Option<CudaSlice<bf16>>,
    inverse_frequencies: CudaSlice<f64>,
    /// Prompts through the tiled prefill kernel (the default; its P·V runs as two bf16 mma's
    /// on a split P, so the probabilities keep about 16 bits), or through the decode kernel
    /// with one row per query token.
    tiled_prefill: bool,
}

/// The full KV cache of a batch of sequences: per layer one K and one V buffer, each sequence
/// a `[kv_heads, capacity, head_dim]` block in both.
pub struct GpuKvCache {
    layouts: Vec<SequenceLayout>,
    /// Tokens cached per sequence.
    lens: Vec<u32>,
    k: Vec<CudaSlice<bf16>>,
    v: Vec<CudaSlice<bf16>>,
}

impl GpuKvCache {
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }

    /// Fills every sequence's block with random keys and values and marks `lens[b]` tokens of
    /// sequence `b` cached: a synthetic context for decode-throughput runs, in place of a
    /// prompt (labelled as such wherever it is used).
    pub fn fill_synthetic(&mut self, gpu: &Gpu, lens: &[u32], seed: u64) -> Result<()> {
        if lens.len() != self.layouts.len() {
            return Err(gpu_error(format!(
                "{} lengths for {} sequences",
                lens.len(),
                self.layouts.len()
            )));
        }
        if let Some((b, (len, layout))) = lens
            .iter()
            .zip(&self.layouts)
            .enumerate()
            .find(|(_, (len, l))| **len > l.capacity)
        {
            return Err(gpu_error(format!(
                "sequence {b}: {len} tokens past its capacity {}",
                layout.capacity
            )));
        }
        for (index, buffer) in self.k.iter_mut().chain(self.v.iter_mut()).enumerate() {
            shadowkv::kernels::random::fill(
                gpu,
                gpu.stream(),
                buffer,
                seed.wrapping_add(index as u64),
                1.0,
                0.0,
            )
            .gpu()?;
        }
        self.lens.copy_from_slice(lens);
        Ok(())
    }

    /// Bytes of the cache on the GPU.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|b| b.len() * 2).sum()
    }
}

fn bf16_of(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

impl GpuModel {
    /// Reads every weight from `weights`, converts it to bf16 and uploads it (one tensor at a
    /// time, so host memory holds at most one f32 tensor).
    pub fn load(gpu: Arc<Gpu>, config: &ModelConfig, weights: &WeightFile) -> Result<GpuModel> {
        let stream = gpu.stream().clone();
        let upload_bf16 = |rows: Vec<f32>| stream.clone_htod(&bf16_of(&rows)).gpu();
        let upload_f32 = |values: Vec<f32>| stream.clone_htod(&values).gpu();
        let (hidden, q_dim, kv_dim, ffn) =
            (config.hidden, config.q_dim(), config.kv_dim(), config.ffn);
        let matrix =
            |name: &str, rows, cols| weights.matrix(config, name, rows, cols).map(|m| m.data);
        let mut layers = Vec::with_capacity(config.layers);
        for index in 0..config.layers {
            let name = |part: &str| format!("blk.{index}.{part}");
            // Row-major [out, in] matrices stack into a fused projection by concatenation.
            let mut qkv = matrix(&name("attn_q.weight"), q_dim, hidden)?;
            qkv.extend(matrix(&name("attn_k.weight"), kv_dim, hidden)?);
            qkv.extend(matrix(&name("attn_v.weight"), kv_dim, hidden)?);
            let qkv_bias = if config.architecture.qkv_bias() {
                let mut bias = weights.vector(config, &name("attn_q.bias"), q_dim)?;
                bias.extend(weights.vector(config, &name("attn_k.bias"), kv_dim)?);
                bias.extend(weights.vector(config, &name("attn_v.bias"), kv_dim)?);
                Some(upload_f32(bias)?)
            } else {
                None
            };
            let mut gate_up = matrix(&name("ffn_gate.weight"), ffn, hidden)?;
            gate_up.extend(matrix(&name("ffn_up.weight"), ffn, hidden)?);
            layers.push(GpuLayer {
                attn_norm: upload_f32(weights.vector(
                    config,
                    &name("attn_norm.weight"),
                    hidden,
                )?)?,
                qkv: upload_bf16(qkv)?,
                qkv_bias,
                o: upload_bf16(matrix(&name("attn_output.weight"), hidden, q_dim)?)?,
                ffn_norm: upload_f32(weights.vector(config, &name("ffn_norm.weight"), hidden)?)?,
                gate_up: upload_bf16(gate_up)?,
                down: upload_bf16(matrix(&name("ffn_down.weight"), hidden, ffn)?)?,
            });
        }
        let output = if config.tied_embeddings {
            None
        } else {
            Some(upload_bf16(matrix("output.weight", config.vocab, hidden)?)?)
        };
        Ok(GpuModel {
            config: config.clone(),
            linear: Linear::new(stream.clone()).gpu()?,
            embedding: upload_bf16(matrix("token_embd.weight", config.vocab, hidden)?)?,
            layers,
            output_norm: upload_f32(weights.vector(config, "output_norm.weight", hidden)?)?,
            output,
            inverse_frequencies: stream.clone_htod(&config.inverse_frequencies()).gpu()?,
            tiled_prefill: true,
            gpu,
        })
    }

    /// A model of `config`'s shape with random weights generated on the GPU (no files): for
    /// throughput work. Matrices are uniform with variance `1 / inputs`, norms are 1, so
    /// activations stay in range; the text it generates is meaningless.
    pub fn synthetic(gpu: Arc<Gpu>, config: &ModelConfig, seed: u64) -> Result<GpuModel> {
        let stream = gpu.stream().clone();
        let needed = config.parameters() * 2;
        let (free, _) = gpu.context().mem_get_info().gpu()?;
        if needed > free {
            return Err(gpu_error(format!(
                "the {needed}-byte bf16 weights of this shape do not fit: {free} bytes of GPU memory are free"
            )));
        }
        let mut next_seed = seed;
        let mut uniform = |elements: usize, scale: f32| -> Result<CudaSlice<bf16>> {
            let mut buffer = stream.alloc_zeros::<bf16>(elements).gpu()?;
            next_seed = next_seed.wrapping_add(1);
            shadowkv::kernels::random::fill(&gpu, &stream, &mut buffer, next_seed, scale, 0.0)
                .gpu()?;
            Ok(buffer)
        };
        // Uniform on [-a, a) has variance a^2 / 3: a = sqrt(3 / inputs) gives 1 / inputs.
        let mut random = |rows: usize, inputs: usize, unit: bool| {
            uniform(
                rows * inputs,
                if unit {
                    1.0
                } else {
                    (3.0 / inputs as f32).sqrt()
                },
            )
        };
        let ones = |n: usize| stream.clone_htod(&vec![1.0f32; n]).gpu();
        let (hidden, q_dim, kv_dim, ffn) =
            (config.hidden, config.q_dim(), config.kv_dim(), config.ffn);
        let mut layers = Vec::with_capacity(config.layers);
        for _ in 0..config.layers {
            layers.push(GpuLayer {
                attn_norm: ones(hidden)?,
                qkv: random(q_dim + 2 * kv_dim, hidden, false)?,
                qkv_bias: if config.architecture.qkv_bias() {
                    Some(stream.alloc_zeros::<f32>(q_dim + 2 * kv_dim).gpu()?)
                } else {
                    None
                },
                o: random(hidden, q_dim, false)?,
                ffn_norm: ones(hidden)?,
                gate_up: random(2 * ffn, hidden, false)?,
                down: random(hidden, ffn, false)?,
            });
        }
        // Embedding rows uniform in [-1, 1).
        let embedding = random(config.vocab, hidden, true)?;
        let output = if config.tied_embeddings {
            None
        } else {
            Some(random(config.vocab, hidden, false)?)
        };
        Ok(GpuModel {
            config: config.clone(),
            linear: Linear::new(stream.clone()).gpu()?,
            embedding,
            layers,
            output_norm: ones(hidden)?,
            output,
            inverse_frequencies: stream.clone_htod(&config.inverse_frequencies()).gpu()?,
            tiled_prefill: true,
            gpu,
        })
    }

    /// Sends prompts through the tiled tensor-core prefill kernel (`true`, the default) or
    /// through the decode kernel, one row per query token (`false`: quadratic reads, slow
    /// for long prompts; P·V in f32).
    pub fn set_tiled_prefill(&mut self, tiled: bool) {
        self.tiled_prefill = tiled;
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.gpu.stream()
    }

    /// Bytes of the weights on the GPU.
    pub fn weight_bytes(&self) -> usize {
        let matrices = self
            .layers
            .iter()
            .map(|l| (l.qkv.len() + l.o.len() + l.gate_up.len() + l.down.len()) * 2);
        matrices.sum::<usize>()
            + (self.embedding.len() + self.output.as_ref().map_or(0, |o| o.len())) * 2
    }

    /// An empty cache for sequences of at most `capacities[b]` tokens each.
    pub fn new_cache(&self, capacities: &[u32]) -> Result<GpuKvCache> {
        let (kv_heads, head_dim) = (self.config.kv_heads as u64, self.config.head_dim as u64);
        let mut layouts = Vec::with_capacity(capacities.len());
        let mut offset = 0u64;
        for &capacity in capacities {
            if capacity == 0 {
                return Err(gpu_error(
                    "a sequence's capacity is 0 tokens; expected at least 1",
                ));
            }
            layouts.push(SequenceLayout {
                offset,
                capacity,
                len: 1,
            });
            // Offsets stay multiples of 8 elements (16-byte rows for the attention kernel).
            offset += (kv_heads * capacity as u64 * head_dim).next_multiple_of(8);
        }
        let needed = offset as usize * 2 * 2 * self.config.layers;
        let (free, _) = self.gpu.context().mem_get_info().gpu()?;
        if needed > free {
            return Err(gpu_error(format!(
                "the full KV cache of {} sequences ({:?} tokens) needs {needed} bytes; {free} bytes of GPU memory are free",
                capacities.len(),
                capacities
            )));
        }
        let stream = self.stream();
        let buffers = || -> Result<Vec<CudaSlice<bf16>>> {
            (0..self.config.layers)
                .map(|_| stream.alloc_zeros::<bf16>(offset as usize).gpu())
                .collect()
        };
        Ok(GpuKvCache {
            lens: vec![0; capacities.len()],
            k: buffers()?,
            v: buffers()?,
            layouts,
        })
    }

    /// The causal attention of a pass: the decode kernel (split over the context) when every
    /// token is the only one of its sequence, else the tiled prefill kernel, which needs each
    /// sequence's tokens side by side.
    fn attention_pass(
        &self,
        cache: &GpuKvCache,
        placements: &[TokenPlacement],
        next: &[u32],
    ) -> Result<AttentionPass> {
        let (config, gpu) = (&self.config, &*self.gpu);
        // One new token per sequence (a decode step): `next` counts each sequence's tokens.
        let single = next
            .iter()
            .zip(&cache.lens)
            .all(|(&after, &before)| after - before <= 1);
        if single || !self.tiled_prefill {
            // Each query row attends over its sequence's block up to itself.
            let layouts: Vec<SequenceLayout> = placements
                .iter()
                .map(|p| SequenceLayout {
                    len: p.position + 1,
                    ..cache.layouts[p.sequence as usize]
                })
                .collect();
            let shape = DecodeAttentionShape {
                batch: placements.len(),
                q_heads: config.heads,
                kv_heads: config.kv_heads,
                head_dim: config.head_dim,
            };
            let plan = DecodeAttentionPlan::for_gpu(gpu, shape, &layouts).gpu()?;
            return Ok(AttentionPass::Decode(
                DecodeAttention::new(gpu, plan).gpu()?,
            ));
        }
        let mut queries = vec![QueryPlacement::default(); cache.layouts.len()];
        for (row, p) in placements.iter().enumerate() {
            let query = &mut queries[p.sequence as usize];
            if query.query_len == 0 {
                *query = QueryPlacement {
                    query_offset: row as u32,
                    query_len: 0,
                    start: p.position,
                };
            }
            if query.query_offset + query.query_len != row as u32 {
                return Err(gpu_error(format!(
                    "token {row} of sequence {} is apart from the sequence's earlier tokens; give each sequence's tokens side by side",
                    p.sequence
                )));
            }
            query.query_len += 1;
        }
        let layouts: Vec<SequenceLayout> = cache
            .layouts
            .iter()
            .zip(next)
            .map(|(layout, &len)| SequenceLayout {
                len: len.max(1),
                ..*layout
            })
            .collect();
        let shape = PrefillAttentionShape {
            tokens: placements.len(),
            q_heads: config.heads,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
        };
        let plan = PrefillAttentionPlan::new(shape, &layouts, &queries).gpu()?;
        Ok(AttentionPass::Prefill(
            PrefillAttention::new(gpu, plan).gpu()?,
        ))
    }

    /// Runs `tokens[i]` of `sequences[i]` (each sequence's tokens in order, after what the cache
    /// holds), appends their keys and values, and returns the f32 logits `[rows, vocab]` of the
    /// last token of each sequence named, in the order of first appearance.
    pub fn forward(
        &self,
        cache: &mut GpuKvCache,
        sequences: &[usize],
        tokens: &[u32],
    ) -> Result<Vec<f32>> {
        let logits = self.forward_full(cache, sequences, tokens, None)?;
        self.stream().clone_dtoh(&logits).gpu()
    }

    /// [`forward`](Self::forward) with greedy sampling on the GPU: the most likely next token
    /// of each sequence named (4 bytes each come back instead of a vocabulary of logits).
    pub fn forward_greedy(
        &self,
        cache: &mut GpuKvCache,
        sequences: &[usize],
        tokens: &[u32],
    ) -> Result<Vec<u32>> {
        let logits = self.forward_full(cache, sequences, tokens, None)?;
        self.argmax_rows(&logits)
    }

    /// The most likely token of each row of `logits` (`[rows, vocab]`), picked on the GPU.
    fn argmax_rows(&self, logits: &CudaSlice<f32>) -> Result<Vec<u32>> {
        let stream = self.stream();
        let mut ids = stream
            .alloc_zeros::<u32>(logits.len() / self.config.vocab)
            .gpu()?;
        shadowkv::kernels::sampling::argmax(&self.gpu, stream, logits, self.config.vocab, &mut ids)
            .gpu()?;
        stream.clone_dtoh(&ids).gpu()
    }

    /// A ShadowKV cache for this model: `params` (checked against the model's shape), the
    /// values on the host or the GPU, sized for `capacity` (all allocated now; the error says
    /// how much was needed and free).
    pub fn new_shadow_cache(
        &self,
        params: ShadowKvParams,
        values_home: ValueHome,
        capacity: CacheCapacity,
    ) -> Result<GpuShadowCache> {
        let config = &self.config;
        if config.rope_factors.is_some() {
            return Err(gpu_error(
                "this model scales RoPE by a rope_freqs tensor, which the ShadowKV key rebuild does not apply yet; use --attention full",
            ));
        }
        let shape = CacheShape {
            layers: config.layers,
            q_heads: config.heads,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
            rope: config.rope,
        };
        let cache = ShadowKvCache::new(&self.gpu, shape, params, values_home, capacity).gpu()?;
        let staged = capacity.max_sequences * config.kv_dim();
        let stream = self.stream();
        Ok(GpuShadowCache {
            cache,
            lens: Vec::new(),
            staged_keys: stream.alloc_zeros::<bf16>(staged).gpu()?,
            staged_values: stream.alloc_zeros::<bf16>(staged).gpu()?,
        })
    }

    /// Adds `prompt` as a new sequence of `shadow`: runs it with full attention in passes of
    /// `pass_tokens` (calling `progress` with the tokens done after each), then builds every
    /// layer's shadow. Returns the sequence and its last token's logits.
    pub fn prefill_shadow(
        &self,
        shadow: &mut GpuShadowCache,
        prompt: &[u32],
        pass_tokens: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<(SequenceId, Vec<f32>)> {
        let gpu = &*self.gpu;
        if prompt.is_empty() || pass_tokens == 0 {
            return Err(gpu_error(format!(
                "a prompt of {} tokens in passes of {pass_tokens}; expected at least one token and one per pass",
                prompt.len()
            )));
        }
        shadow.add_built(gpu, prompt.len(), |shadow, id| {
            self.build_shadow(shadow, id, prompt, pass_tokens, &mut progress)
        })
    }

    fn build_shadow(
        &self,
        shadow: &mut GpuShadowCache,
        id: SequenceId,
        prompt: &[u32],
        pass_tokens: usize,
        progress: &mut impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        let (config, gpu, stream) = (&self.config, &*self.gpu, self.stream());
        let mut full = self.new_cache(&[prompt.len() as u32])?;
        let mut pre_rope_keys = (0..config.layers)
            .map(|_| {
                stream
                    .alloc_zeros::<bf16>(prompt.len() * config.kv_dim())
                    .gpu()
            })
            .collect::<Result<Vec<_>>>()?;
        let mut last_queries = stream
            .alloc_zeros::<bf16>(config.layers * config.q_dim())
            .gpu()?;
        let mut logits = None;
        let mut done = 0;
        for pass in prompt.chunks(pass_tokens) {
            let taps = PrefillTaps {
                pre_rope_keys: &mut pre_rope_keys,
                last_queries: &mut last_queries,
                rows_before: done,
            };
            logits = Some(self.forward_full(&mut full, &vec![0; pass.len()], pass, Some(taps))?);
            done += pass.len();
            progress(done);
        }
        let layout = SequenceLayout {
            len: prompt.len() as u32,
            ..full.layouts[0]
        };
        let q_dim = config.q_dim();
        let layers = full.k.iter().zip(&full.v).zip(&pre_rope_keys).enumerate();
        for (layer, ((keys, values), pre_rope)) in layers {
            let source = PrefillSource {
                keys,
                values,
                layout,
            };
            shadow
                .cache
                .prefill_layer(
                    gpu,
                    layer,
                    id,
                    pre_rope,
                    &source,
                    &last_queries.slice(layer * q_dim..(layer + 1) * q_dim),
                )
                .gpu()?;
        }
        // The offload reads the full cache: wait for it before the cache is dropped, and
        // check the factorisations.
        shadow.cache.check_prefill().gpu()?;
        let logits = logits.ok_or_else(|| gpu_error("no prefill pass ran"))?;
        stream.clone_dtoh(&logits).gpu()
    }

    /// One ShadowKV decode step: `tokens[b]` is the next token of live sequence `b` (in
    /// [`GpuShadowCache::sequences`] order); returns the logits `[sequences, vocab]`.
    pub fn decode_shadow(&self, shadow: &mut GpuShadowCache, tokens: &[u32]) -> Result<Vec<f32>> {
        let logits = self.decode_shadow_on_device(shadow, tokens)?;
        self.stream().clone_dtoh(&logits).gpu()
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
    /// and after RoPE, unrelated), values and last query, sent through the normal ShadowKV
    /// prefill (factorisation, landmarks, outliers, offload, first selection) without running
    /// the model over a prompt: for decode-throughput runs at long context. One layer's
    /// buffers at a time.
    pub fn prefill_shadow_synthetic(
        &self,
        shadow: &mut GpuShadowCache,
        len: usize,
        seed: u64,
    ) -> Result<SequenceId> {
        let (config, gpu, stream) = (&self.config, &*self.gpu, self.stream());
        let built = shadow.add_built(gpu, len, |shadow, id| {
            let (kv_dim, q_dim) = (config.kv_dim(), config.q_dim());
            let alloc = |n: usize| stream.alloc_zeros::<bf16>(n).gpu();
            let (mut keys, mut values) = (alloc(len * kv_dim)?, alloc(len * kv_dim)?);
            let (mut pre_rope, mut query) = (alloc(len * kv_dim)?, alloc(q_dim)?);
            let layout = SequenceLayout {
                offset: 0,
                capacity: len as u32,
                len: len as u32,
            };
            for layer in 0..config.layers {
                let layer_seed = seed.wrapping_mul(31).wrapping_add(4 * layer as u64);
                for (i, buffer) in [&mut keys, &mut values, &mut pre_rope, &mut query]
                    .into_iter()
                    .enumerate()
                {
                    shadowkv::kernels::random::fill(
                        gpu,
                        stream,
                        buffer,
                        layer_seed + i as u64,
                        1.0,
                        0.0,
                    )
                    .gpu()?;
                }
                let source = PrefillSource {
                    keys: &keys,
                    values: &values,
                    layout,
                };
                shadow
                    .cache
                    .prefill_layer(gpu, layer, id, &pre_rope, &source, &query)
                    .gpu()?;
            }
            shadow.cache.check_prefill().gpu()
        });
        built.map(|(id, ())| id)
    }

    fn decode_shadow_on_device(
        &self,
        shadow: &mut GpuShadowCache,
        tokens: &[u32],
    ) -> Result<CudaSlice<f32>> {
        let (config, stream) = (&self.config, self.stream());
        if tokens.len() != shadow.lens.len() || tokens.is_empty() {
            return Err(gpu_error(format!(
                "{} tokens for {} live sequences; expected one token per live sequence",
                tokens.len(),
                shadow.lens.len()
            )));
        }
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
        let plan = TokenPlan::new(stream, self.qkv_shape(), &placements, &layouts).gpu()?;
        let rows: Vec<usize> = (0..tokens.len()).collect();
        let logits = self.run_layers(tokens, &plan, PassCache::Shadow(shadow), &rows)?;
        for entry in &mut shadow.lens {
            entry.1 += 1;
        }
        Ok(logits)
    }

    fn qkv_shape(&self) -> QkvShape {
        QkvShape {
            heads: self.config.heads,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// A pass over the full cache: places the tokens, runs the layers, advances the lengths;
    /// the logits stay on the GPU.
    fn forward_full(
        &self,
        cache: &mut GpuKvCache,
        sequences: &[usize],
        tokens: &[u32],
        taps: Option<PrefillTaps<'_>>,
    ) -> Result<CudaSlice<f32>> {
        if sequences.len() != tokens.len() || tokens.is_empty() {
            return Err(gpu_error(format!(
                "{} tokens for {} sequence indices; expected one index per token, at least one",
                tokens.len(),
                sequences.len()
            )));
        }
        // Place every token at the next free position of its sequence.
        let mut next = cache.lens.clone();
        let mut placements = Vec::with_capacity(tokens.len());
        let mut last_row: Vec<(usize, usize)> = Vec::new();
        for (row, &sequence) in sequences.iter().enumerate() {
            let Some(layout) = cache.layouts.get(sequence) else {
                return Err(gpu_error(format!(
                    "sequence {sequence} is not in the cache ({} sequences)",
                    cache.layouts.len()
                )));
            };
            if next[sequence] >= layout.capacity {
                return Err(gpu_error(format!(
                    "sequence {sequence} is full: {} tokens of capacity {}",
                    next[sequence], layout.capacity
                )));
            }
            placements.push(TokenPlacement::new(sequence as u32, next[sequence]));
            next[sequence] += 1;
            match last_row.iter_mut().find(|(s, _)| *s == sequence) {
                Some(entry) => entry.1 = row,
                None => last_row.push((sequence, row)),
            }
        }
        let plan =
            TokenPlan::new(self.stream(), self.qkv_shape(), &placements, &cache.layouts).gpu()?;
        let attention = Box::new(self.attention_pass(cache, &placements, &next)?);
        let rows: Vec<usize> = last_row.iter().map(|&(_, row)| row).collect();
        let mode = PassCache::Full {
            cache: &mut *cache,
            attention,
            taps,
        };
        let logits = self.run_layers(tokens, &plan, mode, &rows)?;
        cache.lens = next;
        Ok(logits)
    }

    /// The layers of one pass over `tokens` (placed by `plan`), attending through `mode`;
    /// returns the f32 logits of `rows` (each sequence's last token), left on the GPU.
    fn run_layers(
        &self,
        tokens: &[u32],
        plan: &TokenPlan,
        mut mode: PassCache<'_>,
        rows: &[usize],
    ) -> Result<CudaSlice<f32>> {
        let config = &self.config;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= config.vocab) {
            return Err(gpu_error(format!(
                "token id {bad} is past the vocabulary ({} tokens)",
                config.vocab
            )));
        }
        let (gpu, stream) = (&*self.gpu, self.stream());
        let count = tokens.len();
        let shape = self.qkv_shape();
        let alloc_bf16 = |n: usize| stream.alloc_zeros::<bf16>(n).gpu();
        let alloc_f32 = |n: usize| stream.alloc_zeros::<f32>(n).gpu();
        let (hidden, ffn) = (config.hidden, config.ffn);
        let ids = stream.clone_htod(tokens).gpu()?;
        let mut x = alloc_f32(count * hidden)?;
        let mut normed = alloc_bf16(count * hidden)?;
        let mut qkv = alloc_f32(count * shape.width())?;
        let mut q = alloc_bf16(count * config.q_dim())?;
        let mut attended = alloc_bf16(count * config.q_dim())?;
        let mut projected = alloc_f32(count * hidden)?;
        let mut gate_up = alloc_f32(count * 2 * ffn)?;
        let mut activated = alloc_bf16(count * ffn)?;
        let mut mlp_out = alloc_f32(count * hidden)?;

        layer::embedding(gpu, stream, &self.embedding, hidden, tokens, &ids, &mut x).gpu()?;
        for (index, weights) in self.layers.iter().enumerate() {
            // The previous block's MLP output joins the residual stream here.
            let delta = (index > 0).then_some(&mlp_out);
            layer::rms_norm(
                gpu,
                stream,
                &mut x,
                delta,
                &weights.attn_norm,
                config.rms_eps,
                &mut normed,
            )
            .gpu()?;
            self.linear
                .forward(&normed, &weights.qkv, hidden, &mut qkv)
                .gpu()?;
            self.attend(&mut mode, index, plan, &qkv, &mut q, &mut attended)?;
            self.linear
                .forward(&attended, &weights.o, config.q_dim(), &mut projected)
                .gpu()?;
            layer::rms_norm(
                gpu,
                stream,
                &mut x,
                Some(&projected),
                &weights.ffn_norm,
                config.rms_eps,
                &mut normed,
            )
            .gpu()?;
            self.linear
                .forward(&normed, &weights.gate_up, hidden, &mut gate_up)
                .gpu()?;
            layer::silu_mul(gpu, stream, &gate_up, &mut activated, ffn).gpu()?;
            self.linear
                .forward(&activated, &weights.down, ffn, &mut mlp_out)
                .gpu()?;
        }
        layer::rms_norm(
            gpu,
            stream,
            &mut x,
            Some(&mlp_out),
            &self.output_norm,
            config.rms_eps,
            &mut normed,
        )
        .gpu()?;
        // Logits only for each sequence's last token.
        let head = self.output.as_ref().unwrap_or(&self.embedding);
        let mut logits = stream.alloc_zeros::<f32>(rows.len() * config.vocab).gpu()?;
        if let [row] = rows[..] {
            let last = normed.slice(row * hidden..(row + 1) * hidden);
            self.linear
                .forward(&last, head, hidden, &mut logits)
                .gpu()?;
        } else if rows.iter().enumerate().all(|(i, &r)| i == r) && rows.len() == count {
            self.linear
                .forward(&normed, head, hidden, &mut logits)
                .gpu()?;
        } else {
            // Several sequences' prompts in one pass: gather their last rows on the device.
            let mut last_rows = alloc_bf16(rows.len() * hidden)?;
            for (i, &row) in rows.iter().enumerate() {
                stream
                    .memcpy_dtod(
                        &normed.slice(row * hidden..(row + 1) * hidden),
                        &mut last_rows.slice_mut(i * hidden..(i + 1) * hidden),
                    )
                    .gpu()?;
            }
            self.linear
                .forward(&last_rows, head, hidden, &mut logits)
                .gpu()?;
        }
        Ok(logits)
    }

    /// Layer `index`'s attention in a pass: rotates `qkv` into `q` and the keys and values
    /// into `mode`'s cache, then attends into `attended`.
    fn attend(
        &self,
        mode: &mut PassCache<'_>,
        index: usize,
        plan: &TokenPlan,
        qkv: &CudaSlice<f32>,
        q: &mut CudaSlice<bf16>,
        attended: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        let (gpu, stream) = (&*self.gpu, self.stream());
        let bias = self.layers[index].qkv_bias.as_ref();
        let frequencies = &self.inverse_frequencies;
        match mode {
            PassCache::Full {
                cache,
                attention,
                taps,
            } => {
                let (k_cache, v_cache) = (&mut cache.k[index], &mut cache.v[index]);
                let (kv_dim, q_dim) = (self.config.kv_dim(), self.config.q_dim());
                let tokens = plan.tokens();
                {
                    let mut pre_rope = taps.as_mut().map(|taps| {
                        let rows = taps.rows_before..taps.rows_before + tokens;
                        taps.pre_rope_keys[index].slice_mut(rows.start * kv_dim..rows.end * kv_dim)
                    });
                    layer::rope_qkv(
                        gpu,
                        stream,
                        plan,
                        qkv,
                        bias,
                        frequencies,
                        q,
                        (&mut *k_cache, &mut *v_cache),
                        pre_rope.as_mut(),
                    )
                    .gpu()?;
                }
                if let Some(taps) = taps {
                    // The pass's last token is the prompt's last so far.
                    stream
                        .memcpy_dtod(
                            &q.slice((tokens - 1) * q_dim..tokens * q_dim),
                            &mut taps
                                .last_queries
                                .slice_mut(index * q_dim..(index + 1) * q_dim),
                        )
                        .gpu()?;
                }
                match &mut **attention {
                    AttentionPass::Decode(decode) => {
                        decode.run(gpu, stream, q, k_cache, v_cache, attended)
                    }
                    AttentionPass::Prefill(prefill) => {
                        prefill.run(gpu, stream, q, k_cache, v_cache, attended)
                    }
                }
                .gpu()
            }
            PassCache::Shadow(shadow) => {
                let staged = plan.tokens() * self.config.kv_dim();
                layer::rope_qkv(
                    gpu,
                    stream,
                    plan,
                    qkv,
                    bias,
                    frequencies,
                    q,
                    (&mut shadow.staged_keys, &mut shadow.staged_values),
                    None,
                )
                .gpu()?;
                shadow
                    .cache
                    .append(
                        gpu,
                        index,
                        &shadow.staged_keys.slice(..staged),
                        &shadow.staged_values.slice(..staged),
                    )
                    .gpu()?;
                shadow.cache.decode_layer(gpu, index, q, attended).gpu()
            }
        }
    }
}
