//! The model's weights on the GPU: bf16 matrices (Q/K/V and gate/up fused row-wise), f32
//! norms and biases, read from a model file or generated at random for throughput work.
use std::sync::Arc;

use half::bf16;
use shadowkv::cudarc::driver::{CudaSlice, CudaStream};
use shadowkv::Gpu;

use crate::config::ModelConfig;
use crate::error::{Error, OnGpu, Result};
use crate::weights::WeightFile;

/// One decoder block's weights on the GPU (Q/K/V and gate/up fused row-wise).
pub(super) struct GpuLayer {
    pub(super) attn_norm: CudaSlice<f32>,
    /// `[(heads + 2 kv_heads) * head_dim, hidden]`.
    pub(super) qkv: CudaSlice<bf16>,
    pub(super) qkv_bias: Option<CudaSlice<f32>>,
    pub(super) o: CudaSlice<bf16>,
    pub(super) ffn_norm: CudaSlice<f32>,
    /// `[2 ffn, hidden]`: gate rows, then up rows.
    pub(super) gate_up: CudaSlice<bf16>,
    pub(super) down: CudaSlice<bf16>,
    /// Gemma-3's extra norms (see [`crate::block::BlockOptions`]): the query norm's weights
    /// carry the model's query scale (the norm and RoPE are linear in them).
    pub(super) qk_norm: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    pub(super) post_attention_norm: Option<CudaSlice<f32>>,
    pub(super) post_ffn_norm: Option<CudaSlice<f32>>,
}

/// Every weight of the model on the GPU.
pub(super) struct GpuWeights {
    pub(super) embedding: CudaSlice<bf16>,
    pub(super) layers: Vec<GpuLayer>,
    pub(super) output_norm: CudaSlice<f32>,
    /// `None` when the output head is the embedding (tied).
    pub(super) output: Option<CudaSlice<bf16>>,
    pub(super) inverse_frequencies: CudaSlice<f64>,
    /// The sliding-window layers' RoPE frequencies, when the model has such layers.
    pub(super) local_inverse_frequencies: Option<CudaSlice<f64>>,
}

fn bf16_of(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

impl GpuWeights {
    /// Reads every weight from `weights`, converts it to bf16 and uploads it (one tensor at a
    /// time, so host memory holds at most one f32 tensor).
    pub(super) fn load(
        stream: &Arc<CudaStream>,
        config: &ModelConfig,
        weights: &WeightFile,
    ) -> Result<GpuWeights> {
        const WHAT: &str = "uploading the weights";
        let upload_bf16 = |rows: Vec<f32>| stream.clone_htod(&bf16_of(&rows)).on_gpu(WHAT);
        let upload_f32 = |values: Vec<f32>| stream.clone_htod(&values).on_gpu(WHAT);
        let (hidden, q_dim, kv_dim, ffn) =
            (config.hidden, config.q_dim(), config.kv_dim(), config.ffn);
        let matrix =
            |name: &str, rows, cols| weights.matrix(config, name, rows, cols).map(|m| m.data);
        let vector = |name: &str, len| weights.vector(config, name, len);
        let mut layers = Vec::with_capacity(config.layers);
        for index in 0..config.layers {
            let name = |part: &str| format!("blk.{index}.{part}");
            // Row-major [out, in] matrices stack into a fused projection by concatenation.
            let mut qkv = matrix(&name("attn_q.weight"), q_dim, hidden)?;
            qkv.extend(matrix(&name("attn_k.weight"), kv_dim, hidden)?);
            qkv.extend(matrix(&name("attn_v.weight"), kv_dim, hidden)?);
            let qkv_bias = if config.architecture.qkv_bias() {
                let mut bias = vector(&name("attn_q.bias"), q_dim)?;
                bias.extend(vector(&name("attn_k.bias"), kv_dim)?);
                bias.extend(vector(&name("attn_v.bias"), kv_dim)?);
                Some(upload_f32(bias)?)
            } else {
                None
            };
            let mut gate_up = matrix(&name("ffn_gate.weight"), ffn, hidden)?;
            gate_up.extend(matrix(&name("ffn_up.weight"), ffn, hidden)?);
            let block = &config.block;
            let qk_norm = if block.qk_norm {
                let scale = block.query_scale;
                let q_norm = vector(&name("attn_q_norm.weight"), config.head_dim)?;
                Some((
                    upload_f32(q_norm.iter().map(|w| w * scale).collect())?,
                    upload_f32(vector(&name("attn_k_norm.weight"), config.head_dim)?)?,
                ))
            } else {
                None
            };
            let post_norm = |part: &str| -> Result<Option<CudaSlice<f32>>> {
                block
                    .post_norms
                    .then(|| upload_f32(vector(&name(part), hidden)?))
                    .transpose()
            };
            let post_attention_norm = post_norm("post_attention_norm.weight")?;
            let post_ffn_norm = post_norm("post_ffw_norm.weight")?;
            layers.push(GpuLayer {
                attn_norm: upload_f32(vector(&name("attn_norm.weight"), hidden)?)?,
                qkv: upload_bf16(qkv)?,
                qkv_bias,
                o: upload_bf16(matrix(&name("attn_output.weight"), hidden, q_dim)?)?,
                ffn_norm: upload_f32(vector(&name("ffn_norm.weight"), hidden)?)?,
                gate_up: upload_bf16(gate_up)?,
                down: upload_bf16(matrix(&name("ffn_down.weight"), hidden, ffn)?)?,
                qk_norm,
                post_attention_norm,
                post_ffn_norm,
            });
        }
        let output = if config.tied_embeddings {
            None
        } else {
            Some(upload_bf16(matrix("output.weight", config.vocab, hidden)?)?)
        };
        Ok(GpuWeights {
            embedding: upload_bf16(matrix("token_embd.weight", config.vocab, hidden)?)?,
            layers,
            output_norm: upload_f32(vector("output_norm.weight", hidden)?)?,
            output,
            inverse_frequencies: upload_f64(stream, config)?,
            local_inverse_frequencies: upload_local_f64(stream, config)?,
        })
    }

    /// Random weights of `config`'s shape generated on the GPU (no files): matrices uniform
    /// with variance `1 / inputs`, norms 1, so activations stay in range.
    pub(super) fn synthetic(
        gpu: &Gpu,
        stream: &Arc<CudaStream>,
        config: &ModelConfig,
        seed: u64,
    ) -> Result<GpuWeights> {
        const WHAT: &str = "generating random weights";
        let needed = config.parameters() * 2;
        let (free, _) = gpu.context().mem_get_info().on_gpu(WHAT)?;
        if needed > free {
            return Err(Error::OutOfMemory {
                what: "the bf16 weights of this shape".into(),
                needed,
                free,
            });
        }
        let mut next_seed = seed;
        let mut uniform = |elements: usize, scale: f32| -> Result<CudaSlice<bf16>> {
            let mut buffer = stream.alloc_zeros::<bf16>(elements).on_gpu(WHAT)?;
            next_seed = next_seed.wrapping_add(1);
            shadowkv::kernels::random::fill(gpu, stream, &mut buffer, next_seed, scale, 0.0)
                .on_gpu(WHAT)?;
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
        let ones = |n: usize| stream.clone_htod(&vec![1.0f32; n]).on_gpu(WHAT);
        let (hidden, q_dim, kv_dim, ffn) =
            (config.hidden, config.q_dim(), config.kv_dim(), config.ffn);
        let mut layers = Vec::with_capacity(config.layers);
        for _ in 0..config.layers {
            layers.push(GpuLayer {
                attn_norm: ones(hidden)?,
                qkv: random(q_dim + 2 * kv_dim, hidden, false)?,
                qkv_bias: if config.architecture.qkv_bias() {
                    Some(stream.alloc_zeros::<f32>(q_dim + 2 * kv_dim).on_gpu(WHAT)?)
                } else {
                    None
                },
                o: random(hidden, q_dim, false)?,
                ffn_norm: ones(hidden)?,
                gate_up: random(2 * ffn, hidden, false)?,
                down: random(hidden, ffn, false)?,
                qk_norm: if config.block.qk_norm {
                    let scaled = vec![config.block.query_scale; config.head_dim];
                    Some((
                        stream.clone_htod(&scaled).on_gpu(WHAT)?,
                        ones(config.head_dim)?,
                    ))
                } else {
                    None
                },
                post_attention_norm: config.block.post_norms.then(|| ones(hidden)).transpose()?,
                post_ffn_norm: config.block.post_norms.then(|| ones(hidden)).transpose()?,
            });
        }
        // Embedding rows uniform in [-1, 1).
        let embedding = random(config.vocab, hidden, true)?;
        let output = if config.tied_embeddings {
            None
        } else {
            Some(random(config.vocab, hidden, false)?)
        };
        Ok(GpuWeights {
            embedding,
            layers,
            output_norm: ones(hidden)?,
            output,
            inverse_frequencies: upload_f64(stream, config)?,
            local_inverse_frequencies: upload_local_f64(stream, config)?,
        })
    }

    /// Bytes of the bf16 matrices (the norms, biases and frequencies are negligible).
    pub(super) fn bytes(&self) -> usize {
        let matrices = self
            .layers
            .iter()
            .map(|l| (l.qkv.len() + l.o.len() + l.gate_up.len() + l.down.len()) * 2);
        matrices.sum::<usize>()
            + (self.embedding.len() + self.output.as_ref().map_or(0, |o| o.len())) * 2
    }

    /// The output head: its own matrix, or the embedding when tied.
    pub(super) fn head(&self) -> &CudaSlice<bf16> {
        self.output.as_ref().unwrap_or(&self.embedding)
    }
}

/// The RoPE inverse frequencies on the GPU, every adjustment folded in.
fn upload_f64(stream: &Arc<CudaStream>, config: &ModelConfig) -> Result<CudaSlice<f64>> {
    stream
        .clone_htod(&config.inverse_frequencies())
        .on_gpu("uploading the RoPE frequencies")
}

/// The sliding-window layers' RoPE inverse frequencies on the GPU, if the model has such layers.
fn upload_local_f64(
    stream: &Arc<CudaStream>,
    config: &ModelConfig,
) -> Result<Option<CudaSlice<f64>>> {
    config
        .block
        .sliding_window
        .map(|window| {
            let table = shadowkv_kernels::rope::inverse_frequencies(
                &window.local_rope,
                config.head_dim as u32,
            );
            stream
                .clone_htod(&table)
                .on_gpu("uploading the local layers' RoPE frequencies")
        })
        .transpose()
}
