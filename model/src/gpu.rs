//! The model on the GPU: bf16 weights, cuBLAS GEMMs, the `layer` kernels around them and
//! causal attention over a full KV cache, for a ragged batch of sequences.
//!
//! Every forward pass places its tokens in their sequences ([`TokenPlacement`]), appends their
//! keys and values to the cache and attends causally: a pass with one token per sequence (a
//! decode step) through the decode-attention kernel, split over the context; a pass with
//! prompts (several tokens of a sequence, side by side) through the tiled tensor-core prefill
//! kernel (or, [`GpuModel::set_tiled_prefill`], the decode kernel with one row per token).
use std::sync::Arc;

use half::bf16;
use shadowkv::cudarc::driver::{CudaSlice, CudaStream};
use shadowkv::layer::kernel_layout::TokenPlacement;
use shadowkv::layer::{self, QkvShape, TokenPlan};
use shadowkv::linear::Linear;
use shadowkv::prefill_attention::{
    kernel_layout::QueryPlacement, PrefillAttention, PrefillAttentionPlan, PrefillAttentionShape,
};
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
            shadowkv::random::fill(
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
            shadowkv::random::fill(&gpu, &stream, &mut buffer, next_seed, scale, 0.0).gpu()?;
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
            let plan =
                DecodeAttentionPlan::new(shape, &layouts, gpu.info().multiprocessors).gpu()?;
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
        let logits = self.forward_on_device(cache, sequences, tokens)?;
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
        let logits = self.forward_on_device(cache, sequences, tokens)?;
        let stream = self.stream();
        let mut ids = stream
            .alloc_zeros::<u32>(logits.len() / self.config.vocab)
            .gpu()?;
        shadowkv::sampling::argmax(&self.gpu, stream, &logits, self.config.vocab, &mut ids)
            .gpu()?;
        stream.clone_dtoh(&ids).gpu()
    }

    /// The forward pass, leaving the logits on the GPU.
    fn forward_on_device(
        &self,
        cache: &mut GpuKvCache,
        sequences: &[usize],
        tokens: &[u32],
    ) -> Result<CudaSlice<f32>> {
        let config = &self.config;
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
            placements.push(TokenPlacement {
                sequence: sequence as u32,
                position: next[sequence],
            });
            next[sequence] += 1;
            match last_row.iter_mut().find(|(s, _)| *s == sequence) {
                Some(entry) => entry.1 = row,
                None => last_row.push((sequence, row)),
            }
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= config.vocab) {
            return Err(gpu_error(format!(
                "token id {bad} is past the vocabulary ({} tokens)",
                config.vocab
            )));
        }
        let (gpu, stream) = (&*self.gpu, self.stream());
        let count = tokens.len();
        let shape = QkvShape {
            heads: config.heads,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
        };
        let plan = TokenPlan::new(stream, shape, &placements, &cache.layouts).gpu()?;
        let mut attention = self.attention_pass(cache, &placements, &next)?;
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
            let (k_cache, v_cache) = (&mut cache.k[index], &mut cache.v[index]);
            layer::rope_qkv(
                gpu,
                stream,
                &plan,
                &qkv,
                weights.qkv_bias.as_ref(),
                &self.inverse_frequencies,
                &mut q,
                k_cache,
                v_cache,
            )
            .gpu()?;
            match &mut attention {
                AttentionPass::Decode(decode) => {
                    decode.run(gpu, stream, &q, k_cache, v_cache, &mut attended)
                }
                AttentionPass::Prefill(prefill) => {
                    prefill.run(gpu, stream, &q, k_cache, v_cache, &mut attended)
                }
            }
            .gpu()?;
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
        let rows: Vec<usize> = last_row.iter().map(|&(_, row)| row).collect();
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
        for (b, len) in next.into_iter().enumerate() {
            cache.lens[b] = len;
        }
        Ok(logits)
    }
}
