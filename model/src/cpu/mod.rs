//! The CPU reference path: the whole model in f32, for small models (SmolLM2-135M in CI) and
//! as the reference the GPU model is checked against.
//!
//! Same arithmetic as the GPU path, in f32: RMSNorm, Q/K/V projections (plus Qwen2 biases),
//! rotate-half RoPE with the angle reduced in f64, causal GQA attention with an f32 softmax,
//! SwiGLU, and the (tied or untied) output head. Products are split over the machine's cores.
pub mod shadowkv;

use crate::config::ModelConfig;
use crate::weights::{Matrix, ModelWeights};
use shadowkv::{ShadowKvParams, ShadowLayer};

/// The model on the CPU.
pub struct CpuModel {
    pub config: ModelConfig,
    pub weights: ModelWeights<Matrix>,
    inverse_frequencies: Vec<f64>,
}

/// One sequence's KV cache: per layer, post-RoPE keys and values `[kv_heads, len, head_dim]`
/// grown token by token, and in ShadowKV mode each layer's shadow of the prompt.
#[derive(Clone, Debug, Default)]
pub struct CpuCache {
    /// Per layer, per KV head: `len * head_dim` keys and values.
    keys: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
    len: usize,
    /// ShadowKV mode: its parameters, and per layer the shadow built from the prompt (the
    /// first `forward` call); later tokens attend through it.
    shadowkv: Option<ShadowKvParams>,
    shadows: Vec<ShadowLayer>,
}

impl CpuCache {
    /// A cache with full attention.
    pub fn new(config: &ModelConfig) -> CpuCache {
        let heads = || vec![vec![Vec::new(); config.kv_heads]; config.layers];
        CpuCache {
            keys: heads(),
            values: heads(),
            ..CpuCache::default()
        }
    }

    /// A cache in ShadowKV mode; the prompt must come in one `forward` call.
    pub fn shadowkv(config: &ModelConfig, params: ShadowKvParams) -> crate::Result<CpuCache> {
        shadowkv::validate(&params, config)?;
        Ok(CpuCache {
            shadowkv: Some(params),
            ..CpuCache::new(config)
        })
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Layer `layer`, KV head `head`: its `len * head_dim` post-RoPE keys and values.
    pub fn head(&self, layer: usize, head: usize) -> (&[f32], &[f32]) {
        (&self.keys[layer][head], &self.values[layer][head])
    }
}

impl CpuModel {
    pub fn new(config: ModelConfig, weights: ModelWeights<Matrix>) -> CpuModel {
        let inverse_frequencies = config.inverse_frequencies();
        CpuModel {
            config,
            weights,
            inverse_frequencies,
        }
    }

    /// Runs `tokens` (the prompt, or one generated token) after what `cache` holds, appends
    /// their keys and values, and returns the last token's logits.
    pub fn forward(&self, cache: &mut CpuCache, tokens: &[u32]) -> crate::Result<Vec<f32>> {
        let config = &self.config;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= config.vocab) {
            return Err(crate::ModelFileError {
                file: "input".into(),
                tensor: None,
                reason: format!(
                    "token id {bad} is past the vocabulary ({} tokens)",
                    config.vocab
                ),
            });
        }
        let (count, hidden) = (tokens.len(), config.hidden);
        let start = cache.len;
        if count == 0 {
            return Err(crate::ModelFileError {
                file: "input".into(),
                tensor: None,
                reason: "no tokens to run".into(),
            });
        }
        // ShadowKV: the first call is the prompt, attended in full, from which each layer's
        // shadow is built; every later token attends through the shadows.
        let build_shadows = match cache.shadowkv {
            Some(params) if cache.shadows.is_empty() => {
                params
                    .check_prompt(start + count)
                    .map_err(shadowkv::invalid)?;
                Some(params)
            }
            _ => None,
        };
        let mut x: Vec<f32> = tokens
            .iter()
            .flat_map(|&t| {
                let row = t as usize * hidden;
                self.weights.embedding.data[row..row + hidden]
                    .iter()
                    .copied()
            })
            .collect();
        for (layer, weights) in self.weights.layers.iter().enumerate() {
            let normed = rms_norm(&x, &weights.attn_norm, config.rms_eps);
            let mut q = matmul(&normed, &weights.q);
            let mut k = matmul(&normed, &weights.k);
            let mut v = matmul(&normed, &weights.v);
            if let Some([q_bias, k_bias, v_bias]) = &weights.qkv_bias {
                add_rows(&mut q, q_bias);
                add_rows(&mut k, k_bias);
                add_rows(&mut v, v_bias);
            }
            let pre_rope_keys = build_shadows.map(|_| k.clone());
            for t in 0..count {
                let position = (start + t) as u32;
                rope_rows(
                    &mut q[t * config.q_dim()..(t + 1) * config.q_dim()],
                    config.head_dim,
                    position,
                    &self.inverse_frequencies,
                );
                rope_rows(
                    &mut k[t * config.kv_dim()..(t + 1) * config.kv_dim()],
                    config.head_dim,
                    position,
                    &self.inverse_frequencies,
                );
            }
            for head in 0..config.kv_heads {
                for t in 0..count {
                    let row = t * config.kv_dim() + head * config.head_dim;
                    cache.keys[layer][head].extend_from_slice(&k[row..row + config.head_dim]);
                    cache.values[layer][head].extend_from_slice(&v[row..row + config.head_dim]);
                }
            }
            if let (Some(params), Some(pre_rope_keys)) = (build_shadows, pre_rope_keys) {
                let post_rope: Vec<&[f32]> =
                    cache.keys[layer].iter().map(|k| k.as_slice()).collect();
                let shadow = ShadowLayer::build(config, &params, &pre_rope_keys, &post_rope)?;
                cache.shadows.push(shadow);
            }
            let attended = match (cache.shadowkv, cache.shadows.get(layer)) {
                (Some(params), Some(shadow)) if build_shadows.is_none() => {
                    let mut out = Vec::with_capacity(count * config.q_dim());
                    for t in 0..count {
                        let query = &q[t * config.q_dim()..(t + 1) * config.q_dim()];
                        let exact = |head: usize| cache.head(layer, head);
                        out.extend(shadow.attend(
                            config,
                            &params,
                            query,
                            start + t,
                            &exact,
                            &self.inverse_frequencies,
                        ));
                    }
                    out
                }
                _ => self.attention(cache, layer, &q, start, count),
            };
            let projected = matmul(&attended, &weights.o);
            add_assign(&mut x, &projected);
            let normed = rms_norm(&x, &weights.ffn_norm, config.rms_eps);
            let gate = matmul(&normed, &weights.gate);
            let up = matmul(&normed, &weights.up);
            let activated: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect();
            let down = matmul(&activated, &weights.down);
            add_assign(&mut x, &down);
        }
        cache.len += count;
        let last = &x[(count - 1) * hidden..];
        let normed = rms_norm(last, &self.weights.output_norm, config.rms_eps);
        Ok(matmul(&normed, self.weights.output_head()))
    }

    /// Causal GQA attention of `count` new queries (positions `start..`) over the cache.
    fn attention(
        &self,
        cache: &CpuCache,
        layer: usize,
        q: &[f32],
        start: usize,
        count: usize,
    ) -> Vec<f32> {
        let config = &self.config;
        let (head_dim, q_dim) = (config.head_dim, config.q_dim());
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = vec![0.0; count * q_dim];
        let mut scores = Vec::new();
        for t in 0..count {
            let visible = start + t + 1;
            for head in 0..config.heads {
                let kv_head = head / config.group();
                let (keys, values) = cache.head(layer, kv_head);
                let query = &q[t * q_dim + head * head_dim..][..head_dim];
                scores.clear();
                scores.extend(
                    (0..visible).map(|p| dot(query, &keys[p * head_dim..][..head_dim]) * scale),
                );
                softmax_in_place(&mut scores);
                let row = &mut out[t * q_dim + head * head_dim..][..head_dim];
                for (p, &weight) in scores.iter().enumerate() {
                    for (o, &value) in row.iter_mut().zip(&values[p * head_dim..][..head_dim]) {
                        *o += weight * value;
                    }
                }
            }
        }
        out
    }
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// RMSNorm of each `weight.len()`-long row of `x`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let width = weight.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(width) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inverse = 1.0 / (mean_square + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| v * inverse * w));
    }
    out
}

/// Rotate-half RoPE of every `head_dim`-long head in `row`, at `position`.
pub fn rope_rows(row: &mut [f32], head_dim: usize, position: u32, inverse_frequencies: &[f64]) {
    let half = head_dim / 2;
    for head in row.chunks_exact_mut(head_dim) {
        for (i, &frequency) in inverse_frequencies.iter().enumerate().take(half) {
            let (sin, cos) = (position as f64 * frequency).sin_cos();
            let (sin, cos) = (sin as f32, cos as f32);
            let (low, high) = (head[i], head[i + half]);
            head[i] = low * cos - high * sin;
            head[i + half] = high * cos + low * sin;
        }
    }
}

pub fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_assign(row, bias);
    }
}

/// Dot product with eight independent sums, which the compiler vectorises.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// `x [n, in] · Wᵀ` for `W [out, in]`: `[n, out]`, the output rows split over the cores.
pub fn matmul(x: &[f32], weight: &Matrix) -> Vec<f32> {
    let (inner, outputs) = (weight.cols, weight.rows);
    let count = x.len() / inner;
    let mut out = vec![0.0; count * outputs];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(outputs.div_ceil(64));
    let per_thread = outputs.div_ceil(threads.max(1));
    // Each thread owns a range of output columns; gather them into column-major scratch and
    // scatter afterwards so no two threads write the same memory.
    let columns: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..outputs)
            .step_by(per_thread.max(1))
            .map(|first| {
                let last = (first + per_thread).min(outputs);
                scope.spawn(move || {
                    let mut part = Vec::with_capacity((last - first) * count);
                    for o in first..last {
                        let w = &weight.data[o * inner..(o + 1) * inner];
                        part.extend(x.chunks_exact(inner).map(|row| dot(row, w)));
                    }
                    part
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut o = 0;
    for part in columns {
        for column in part.chunks_exact(count.max(1)) {
            for (t, &v) in column.iter().enumerate() {
                out[t * outputs + o] = v;
            }
            o += 1;
        }
    }
    out
}
