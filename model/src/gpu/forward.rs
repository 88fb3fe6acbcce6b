//! The forward pass: every layer of one pass over a ragged batch of tokens, the attention of
//! each layer over the full cache or (a ShadowKV decode step) through the shadow cache, and
//! the logits of each sequence's last token.
use half::bf16;
use shadowkv::cache::SequenceId;
use shadowkv::cudarc::driver::{CudaSlice, CudaViewMut, DevicePtr};
use shadowkv::kernels::layer::kernel_layout::TokenPlacement;
use shadowkv::kernels::layer::{self, QkNorm, QkvInput, TokenPlan};
use shadowkv::kernels::prefill_attention::{
    kernel_layout::QueryPlacement, PrefillAttention, PrefillAttentionPlan, PrefillAttentionShape,
};
use shadowkv::{DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, SequenceLayout};

use super::kv_cache::GpuKvCache;
use super::model::GpuModel;
use super::shadow_cache::GpuShadowCache;
use super::weights::GpuLayer;
use crate::error::{invalid_input, OnGpu, Result};

/// The attention kernel of one forward pass.
pub(super) enum AttentionPass {
    Decode(DecodeAttention),
    Prefill(PrefillAttention),
}

/// What one prefill pass keeps for ShadowKV: each layer's keys before RoPE (`[prompt,
/// kv_dim]`, filled `rows_before..` by this pass) and its last query (`[layers, q_dim]`).
pub(super) struct PrefillTaps<'a> {
    pub(super) pre_rope_keys: &'a mut [CudaSlice<bf16>],
    pub(super) last_queries: &'a mut CudaSlice<bf16>,
    pub(super) rows_before: usize,
}

/// Where a pass's keys and values go and how it attends.
pub(super) enum PassCache<'a> {
    /// The full cache; with taps during a ShadowKV prefill. `local_attention` is the same
    /// attention with the model's sliding window, for its local layers.
    Full {
        cache: &'a mut GpuKvCache,
        attention: Box<AttentionPass>,
        local_attention: Option<Box<AttentionPass>>,
        taps: Option<PrefillTaps<'a>>,
    },
    /// A ShadowKV decode step: one token per live sequence.
    Shadow(&'a mut GpuShadowCache),
    /// A ShadowKV decode step of the sequences `ids`, one token each, in that order.
    ShadowSubset {
        shadow: &'a mut GpuShadowCache,
        ids: &'a [SequenceId],
    },
    /// One layer of a layer-wise prefill: `cache` and `taps` hold that layer alone (their
    /// slot 0), whichever layer runs; `attention` has that layer's window, if any.
    Layer {
        cache: &'a mut GpuKvCache,
        attention: Box<AttentionPass>,
        taps: Option<PrefillTaps<'a>>,
    },
    /// A full-attention decode step whose attention was planned once for the batch shape
    /// (reading its layouts from device memory, see `DecodeRunner`); `local_attention` is
    /// the windowed one of the sliding-window layers.
    FullDecode {
        cache: &'a mut GpuKvCache,
        attention: &'a mut DecodeAttention,
        local_attention: Option<&'a mut DecodeAttention>,
    },
}

/// The activations of a pass over `tokens` rows, allocated once per pass (or, for a decode
/// step replayed from a graph, once per batch shape).
pub(super) struct Activations {
    pub(super) x: CudaSlice<f32>,
    pub(super) normed: CudaSlice<bf16>,
    qkv: CudaSlice<f32>,
    q: CudaSlice<bf16>,
    attended: CudaSlice<bf16>,
    projected: CudaSlice<f32>,
    gate_up: CudaSlice<f32>,
    activated: CudaSlice<bf16>,
    mlp_out: CudaSlice<f32>,
}

impl Activations {
    /// Zeroed activations for `rows` tokens of `model`.
    pub(super) fn new(model: &GpuModel, rows: usize) -> Result<Activations> {
        const WHAT: &str = "allocating the activations";
        let (config, stream) = (&model.config, model.stream());
        let bf16s = |n: usize| stream.alloc_zeros::<bf16>(n).on_gpu(WHAT);
        let f32s = |n: usize| stream.alloc_zeros::<f32>(n).on_gpu(WHAT);
        let (hidden, ffn) = (config.hidden, config.ffn);
        Ok(Activations {
            x: f32s(rows * hidden)?,
            normed: bf16s(rows * hidden)?,
            qkv: f32s(rows * model.qkv_shape().width())?,
            q: bf16s(rows * config.q_dim())?,
            attended: bf16s(rows * config.q_dim())?,
            projected: f32s(rows * hidden)?,
            gate_up: f32s(rows * 2 * ffn)?,
            activated: bf16s(rows * ffn)?,
            mlp_out: f32s(rows * hidden)?,
        })
    }
}

impl GpuModel {
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
        self.stream()
            .clone_dtoh(&logits)
            .on_gpu("reading the logits back")
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
    pub(super) fn argmax_rows(&self, logits: &CudaSlice<f32>) -> Result<Vec<u32>> {
        const WHAT: &str = "picking the most likely tokens";
        let stream = self.stream();
        let mut ids = stream
            .alloc_zeros::<u32>(logits.len() / self.logit_rows())
            .on_gpu(WHAT)?;
        shadowkv::kernels::sampling::argmax(&self.gpu, stream, logits, self.logit_rows(), &mut ids)
            .on_gpu(WHAT)?;
        stream.clone_dtoh(&ids).on_gpu(WHAT)
    }

    /// A pass over the full cache: places the tokens, runs the layers, advances the lengths;
    /// the logits stay on the GPU.
    pub(super) fn forward_full(
        &self,
        cache: &mut GpuKvCache,
        sequences: &[usize],
        tokens: &[u32],
        taps: Option<PrefillTaps<'_>>,
    ) -> Result<CudaSlice<f32>> {
        if sequences.len() != tokens.len() || tokens.is_empty() {
            return Err(invalid_input(
                "sequences",
                format!(
                    "holds {} indices for {} tokens",
                    sequences.len(),
                    tokens.len()
                ),
                "one sequence index per token, at least one token",
            ));
        }
        // Place every token at the next free position of its sequence.
        let mut next = cache.lens.clone();
        let mut placements = Vec::with_capacity(tokens.len());
        let mut last_row: Vec<(usize, usize)> = Vec::new();
        for (row, &sequence) in sequences.iter().enumerate() {
            let Some(layout) = cache.layouts.get(sequence) else {
                return Err(invalid_input(
                    "sequences",
                    format!("names sequence {sequence}"),
                    format!("a sequence of the cache (it holds {})", cache.layouts.len()),
                ));
            };
            if next[sequence] >= layout.capacity {
                return Err(invalid_input(
                    "tokens",
                    format!(
                        "go past the end of sequence {sequence} ({} tokens)",
                        next[sequence]
                    ),
                    format!("at most its capacity {}", layout.capacity),
                ));
            }
            placements.push(TokenPlacement::new(sequence as u32, next[sequence]));
            next[sequence] += 1;
            match last_row.iter_mut().find(|(s, _)| *s == sequence) {
                Some(entry) => entry.1 = row,
                None => last_row.push((sequence, row)),
            }
        }
        let plan = TokenPlan::new(self.stream(), self.qkv_shape(), &placements, &cache.layouts)
            .on_gpu("placing the tokens")?;
        let attention = Box::new(self.attention_pass(cache, &placements, &next, 0)?);
        let local_attention = match self.config.block.sliding_window {
            Some(window) => Some(Box::new(self.attention_pass(
                cache,
                &placements,
                &next,
                window.window as u32,
            )?)),
            None => None,
        };
        let rows: Vec<usize> = last_row.iter().map(|&(_, row)| row).collect();
        let mode = PassCache::Full {
            cache: &mut *cache,
            attention,
            local_attention,
            taps,
        };
        let logits = self.run_layers(tokens, &plan, mode, &rows)?;
        cache.lens = next;
        Ok(logits)
    }

    /// The causal attention of a pass: the decode kernel (split over the context) when every
    /// token is the only one of its sequence, else the tiled prefill kernel, which needs each
    /// sequence's tokens side by side. A `window` above 0 limits each query to that many
    /// latest keys (its own included).
    fn attention_pass(
        &self,
        cache: &GpuKvCache,
        placements: &[TokenPlacement],
        next: &[u32],
        window: u32,
    ) -> Result<AttentionPass> {
        const WHAT: &str = "planning the attention";
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
            let plan = DecodeAttentionPlan::for_gpu(gpu, shape, &layouts)
                .on_gpu(WHAT)?
                .with_window(window);
            return Ok(AttentionPass::Decode(
                DecodeAttention::new(gpu, plan).on_gpu(WHAT)?,
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
                return Err(invalid_input(
                    "sequences",
                    format!(
                        "places token {row} of sequence {} apart from the sequence's earlier tokens",
                        p.sequence
                    ),
                    "each sequence's tokens side by side",
                ));
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
        let plan = PrefillAttentionPlan::new(shape, &layouts, &queries)
            .on_gpu(WHAT)?
            .with_window(window);
        Ok(AttentionPass::Prefill(
            PrefillAttention::new(gpu, plan).on_gpu(WHAT)?,
        ))
    }

    /// The layers of one pass over `tokens` (placed by `plan`), attending through `mode`;
    /// returns the f32 logits of `rows` (each sequence's last token), left on the GPU.
    pub(super) fn run_layers(
        &self,
        tokens: &[u32],
        plan: &TokenPlan,
        mut mode: PassCache<'_>,
        rows: &[usize],
    ) -> Result<CudaSlice<f32>> {
        let config = &self.config;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= config.vocab) {
            return Err(invalid_input(
                "tokens",
                format!("holds id {bad}"),
                format!("ids below the vocabulary size {}", config.vocab),
            ));
        }
        const WHAT: &str = "running the layers";
        let stream = self.stream();
        let count = tokens.len();
        let hidden = config.hidden;
        let alloc_bf16 = |n: usize| stream.alloc_zeros::<bf16>(n).on_gpu(WHAT);
        let ids = stream.clone_htod(tokens).on_gpu(WHAT)?;
        let mut activations = Activations::new(self, count)?;
        self.layer_stack(tokens, &ids, plan, &mut mode, &mut activations)?;
        let normed = &activations.normed;
        // Logits only for each sequence's last token.
        let head = self.weights.head();
        let mut logits = stream
            .alloc_zeros::<f32>(rows.len() * self.logit_rows())
            .on_gpu(WHAT)?;
        if let [row] = rows[..] {
            let last = normed.slice(row * hidden..(row + 1) * hidden);
            self.linear
                .forward(&last, head, hidden, &mut logits)
                .on_gpu(WHAT)?;
        } else if rows.iter().enumerate().all(|(i, &r)| i == r) && rows.len() == count {
            self.linear
                .forward(normed, head, hidden, &mut logits)
                .on_gpu(WHAT)?;
        } else {
            // Several sequences' prompts in one pass: gather their last rows on the device.
            let mut last_rows = alloc_bf16(rows.len() * hidden)?;
            for (i, &row) in rows.iter().enumerate() {
                stream
                    .memcpy_dtod(
                        &normed.slice(row * hidden..(row + 1) * hidden),
                        &mut last_rows.slice_mut(i * hidden..(i + 1) * hidden),
                    )
                    .on_gpu(WHAT)?;
            }
            self.linear
                .forward(&last_rows, head, hidden, &mut logits)
                .on_gpu(WHAT)?;
        }
        Ok(logits)
    }

    /// Every layer of a pass over `tokens` (their ids also on the device in `ids`, placed by
    /// `plan`), attending through `mode`, into `activations` (sized for the tokens): the
    /// final norm's output is left in `activations.normed`. Launches only: no allocation,
    /// upload or read-back, so a decode step can be captured in a CUDA graph.
    pub(super) fn layer_stack(
        &self,
        tokens: &[u32],
        ids: &impl DevicePtr<u32>,
        plan: &TokenPlan,
        mode: &mut PassCache<'_>,
        activations: &mut Activations,
    ) -> Result<()> {
        const WHAT: &str = "running the layers";
        let (config, gpu, stream) = (&self.config, &*self.gpu, self.stream());
        let (hidden, ffn) = (config.hidden, config.ffn);
        let Activations {
            x,
            normed,
            qkv,
            q,
            attended,
            projected,
            gate_up,
            activated,
            mlp_out,
        } = activations;
        self.embed(tokens, ids, x)?;
        let mut previous: Option<&GpuLayer> = None;
        for (index, weights) in self.weights.layers.iter().enumerate() {
            // The previous block's MLP output joins the residual stream here.
            let delta = previous.map(|p| (&*mlp_out, p.post_ffn_norm.as_ref()));
            self.add_and_norm(x, delta, &weights.attn_norm, normed)?;
            self.linear
                .forward(&*normed, &weights.qkv, hidden, qkv)
                .on_gpu(WHAT)?;
            self.attend(mode, index, plan, qkv, q, attended)?;
            self.linear
                .forward(&*attended, &weights.o, config.q_dim(), projected)
                .on_gpu(WHAT)?;
            self.reduce_partial_sums(projected)?;
            let delta = (&*projected, weights.post_attention_norm.as_ref());
            self.add_and_norm(x, Some(delta), &weights.ffn_norm, normed)?;
            self.linear
                .forward(&*normed, &weights.gate_up, hidden, gate_up)
                .on_gpu(WHAT)?;
            layer::gated_activation(gpu, stream, &*gate_up, activated, ffn, self.activation())
                .on_gpu(WHAT)?;
            self.linear
                .forward(&*activated, &weights.down, ffn, mlp_out)
                .on_gpu(WHAT)?;
            self.reduce_partial_sums(mlp_out)?;
            previous = Some(weights);
        }
        let delta = previous.map(|p| (&*mlp_out, p.post_ffn_norm.as_ref()));
        self.add_and_norm(x, delta, &self.weights.output_norm, normed)
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
        let gpu = &*self.gpu;
        let weights = &self.weights.layers[index];
        let local = self.is_local_layer(index);
        let frequencies = match (
            &self.weights.local_inverse_frequencies,
            &self.config.block.sliding_window,
        ) {
            (Some(table), Some(window)) if local => {
                (table, window.local_rope.layout(self.config.head_dim as u32))
            }
            _ => (
                &self.weights.inverse_frequencies,
                self.config.rotary_layout(),
            ),
        };
        let input = QkvInput {
            qkv,
            bias: weights.qkv_bias.as_ref(),
            qk_norm: weights.qk_norm.as_ref().map(|(q_weight, k_weight)| QkNorm {
                q_weight,
                k_weight,
                eps: self.config.rms_eps,
            }),
        };
        const WHAT: &str = "attending over the full KV cache";
        const SHADOW: &str = "a ShadowKV decode step";
        // The cache's and the taps' buffers of this layer: a one-layer cache has only slot 0.
        let slot = match mode {
            PassCache::Layer { .. } => 0,
            _ => index,
        };
        match mode {
            PassCache::Full {
                cache,
                local_attention: Some(attention),
                taps,
                ..
            } if local => self.attend_full(
                slot,
                plan,
                input,
                frequencies,
                q,
                cache,
                attention,
                taps,
                attended,
            ),
            PassCache::Full {
                cache,
                attention,
                taps,
                ..
            }
            | PassCache::Layer {
                cache,
                attention,
                taps,
            } => self.attend_full(
                slot,
                plan,
                input,
                frequencies,
                q,
                cache,
                attention,
                taps,
                attended,
            ),
            PassCache::FullDecode {
                cache,
                attention,
                local_attention,
            } => {
                let attention = match local_attention {
                    Some(local_attention) if local => &mut **local_attention,
                    _ => &mut **attention,
                };
                self.rope_then_decode(
                    plan,
                    input,
                    frequencies,
                    q,
                    (&mut cache.k[index], &mut cache.v[index]),
                    attention,
                    attended,
                    WHAT,
                )
            }
            PassCache::Shadow(shadow) | PassCache::ShadowSubset { shadow, .. } if local => {
                // A sliding-window layer stays exact: its slot of the local layers' cache.
                let local_index = self.local_layer(index);
                let local_layers = shadow.local.as_mut().ok_or_else(|| {
                    invalid_input(
                        "shadow",
                        "has no sliding-window layers",
                        "a cache of this model",
                    )
                })?;
                let (local_plan, attention) = local_layers.step.as_mut().ok_or_else(|| {
                    invalid_input(
                        "shadow",
                        "has no planned step for its sliding-window layers",
                        "a step from decode_shadow or decode_shadow_for",
                    )
                })?;
                self.rope_then_decode(
                    local_plan,
                    input,
                    frequencies,
                    q,
                    (
                        &mut local_layers.cache.k[local_index],
                        &mut local_layers.cache.v[local_index],
                    ),
                    attention,
                    attended,
                    SHADOW,
                )
            }
            PassCache::Shadow(shadow) => {
                let shadow_index = self.shadow_layer(index);
                let staged = self.rope_into_staged(plan, input, frequencies, q, shadow)?;
                shadow
                    .cache
                    .append(
                        gpu,
                        shadow_index,
                        &shadow.staged_keys.slice(..staged),
                        &shadow.staged_values.slice(..staged),
                    )
                    .on_gpu(SHADOW)?;
                shadow
                    .cache
                    .decode_layer(gpu, shadow_index, q, attended)
                    .on_gpu(SHADOW)
            }
            PassCache::ShadowSubset { shadow, ids } => {
                let staged = self.rope_into_staged(plan, input, frequencies, q, shadow)?;
                shadow
                    .cache
                    .attend_for(
                        gpu,
                        self.shadow_layer(index),
                        ids,
                        &*q,
                        &shadow.staged_keys.slice(..staged),
                        &shadow.staged_values.slice(..staged),
                        attended,
                    )
                    .on_gpu(SHADOW)
            }
        }
    }

    /// [`attend`](Self::attend) into a decode cache's layer: RoPE writes the pass's keys and
    /// values into `(k_cache, v_cache)`, then `attention` runs over them.
    #[allow(clippy::too_many_arguments)]
    fn rope_then_decode(
        &self,
        plan: &TokenPlan,
        input: QkvInput<'_, CudaSlice<f32>>,
        frequencies: (&CudaSlice<f64>, shadowkv::RotaryLayout),
        q: &mut CudaSlice<bf16>,
        (k_cache, v_cache): (&mut CudaSlice<bf16>, &mut CudaSlice<bf16>),
        attention: &mut DecodeAttention,
        attended: &mut CudaSlice<bf16>,
        what: &'static str,
    ) -> Result<()> {
        let (gpu, stream) = (&*self.gpu, self.stream());
        layer::rope_qkv_normed(
            gpu,
            stream,
            plan,
            input,
            frequencies,
            q,
            (&mut *k_cache, &mut *v_cache),
            None,
        )
        .on_gpu(what)?;
        attention
            .run(gpu, stream, q, k_cache, v_cache, attended)
            .on_gpu(what)
    }

    /// RoPE of a ShadowKV pass: the pass's keys and values go to `shadow`'s staging buffers;
    /// returns how many of their elements the pass filled.
    fn rope_into_staged(
        &self,
        plan: &TokenPlan,
        input: QkvInput<'_, CudaSlice<f32>>,
        frequencies: (&CudaSlice<f64>, shadowkv::RotaryLayout),
        q: &mut CudaSlice<bf16>,
        shadow: &mut GpuShadowCache,
    ) -> Result<usize> {
        layer::rope_qkv_normed(
            &self.gpu,
            self.stream(),
            plan,
            input,
            frequencies,
            q,
            (&mut shadow.staged_keys, &mut shadow.staged_values),
            None,
        )
        .on_gpu("a ShadowKV decode step")?;
        Ok(plan.tokens() * self.config.kv_dim())
    }

    /// [`attend`](Self::attend) over a full cache (slot `slot` of `cache` and `taps`).
    #[allow(clippy::too_many_arguments)]
    fn attend_full(
        &self,
        slot: usize,
        plan: &TokenPlan,
        input: QkvInput<'_, CudaSlice<f32>>,
        frequencies: (&CudaSlice<f64>, shadowkv::RotaryLayout),
        q: &mut CudaSlice<bf16>,
        cache: &mut GpuKvCache,
        attention: &mut AttentionPass,
        taps: &mut Option<PrefillTaps<'_>>,
        attended: &mut CudaSlice<bf16>,
    ) -> Result<()> {
        const WHAT: &str = "attending over the full KV cache";
        let (gpu, stream) = (&*self.gpu, self.stream());
        let (k_cache, v_cache) = (&mut cache.k[slot], &mut cache.v[slot]);
        let (kv_dim, q_dim) = (self.config.kv_dim(), self.config.q_dim());
        let tokens = plan.tokens();
        {
            let mut pre_rope = taps.as_mut().map(|taps| {
                let rows = taps.rows_before..taps.rows_before + tokens;
                taps.pre_rope_keys[slot].slice_mut(rows.start * kv_dim..rows.end * kv_dim)
            });
            layer::rope_qkv_normed(
                gpu,
                stream,
                plan,
                input,
                frequencies,
                q,
                (&mut *k_cache, &mut *v_cache),
                pre_rope.as_mut(),
            )
            .on_gpu(WHAT)?;
        }
        if let Some(taps) = taps {
            // The pass's last token is the prompt's last so far.
            stream
                .memcpy_dtod(
                    &q.slice((tokens - 1) * q_dim..tokens * q_dim),
                    &mut taps
                        .last_queries
                        .slice_mut(slot * q_dim..(slot + 1) * q_dim),
                )
                .on_gpu(WHAT)?;
        }
        match attention {
            AttentionPass::Decode(decode) => decode.run(gpu, stream, q, k_cache, v_cache, attended),
            AttentionPass::Prefill(prefill) => {
                prefill.run(gpu, stream, q, k_cache, v_cache, attended)
            }
        }
        .on_gpu(WHAT)
    }

    /// Layer `index` over one pass of a prompt, for a layer-wise prefill: `x` holds the pass's
    /// rows of the prompt's f32 hidden states (`[tokens, hidden]`, layer `index`'s input, the
    /// residual stream with every earlier layer's output added) and becomes layer `index + 1`'s
    /// input. The pass's keys and values go after the `cache.lens[0]` tokens already in
    /// `cache`, a one-sequence cache of this layer alone; `taps` keep the pre-RoPE keys and
    /// the pass's last query. Returns the next norm of the new `x` (layer `index + 1`'s input
    /// norm, or the output norm after the last layer), `[tokens, hidden]` bf16. The same
    /// kernels and GEMM shapes as [`run_layers`](Self::run_layers) on the same pass, so the
    /// same numbers; only the order of the work differs.
    pub(super) fn layer_pass(
        &self,
        index: usize,
        x: &mut CudaViewMut<'_, f32>,
        cache: &mut GpuKvCache,
        taps: PrefillTaps<'_>,
    ) -> Result<CudaSlice<bf16>> {
        const WHAT: &str = "running a layer of a layer-wise prefill";
        let config = &self.config;
        let (hidden, ffn) = (config.hidden, config.ffn);
        let Some(weights) = self.weights.layers.get(index) else {
            return Err(invalid_input(
                "index",
                format!("is {index}"),
                format!("a layer below {}", config.layers),
            ));
        };
        if cache.layouts.len() != 1 || cache.k.len() != 1 || cache.v.len() != 1 {
            return Err(invalid_input(
                "cache",
                format!(
                    "holds {} sequences and {} layers",
                    cache.layouts.len(),
                    cache.k.len()
                ),
                "one sequence of one layer",
            ));
        }
        let count = x.len() / hidden;
        if count == 0 || count * hidden != x.len() {
            return Err(invalid_input(
                "x",
                format!("has {} elements", x.len()),
                format!("whole rows of hidden = {hidden}, at least one"),
            ));
        }
        let (gpu, stream) = (&*self.gpu, self.stream());
        let before = cache.lens[0];
        if before as usize + count > cache.layouts[0].capacity as usize {
            return Err(invalid_input(
                "x",
                format!("holds {count} tokens after {before}"),
                format!("at most the cache's capacity {}", cache.layouts[0].capacity),
            ));
        }
        let placements: Vec<TokenPlacement> = (0..count as u32)
            .map(|i| TokenPlacement::new(0, before + i))
            .collect();
        let next = [before + count as u32];
        let plan = TokenPlan::new(stream, self.qkv_shape(), &placements, &cache.layouts)
            .on_gpu("placing the tokens")?;
        let window = match self.config.block.sliding_window {
            Some(window) if window.is_local(index) => window.window as u32,
            _ => 0,
        };
        let attention = Box::new(self.attention_pass(cache, &placements, &next, window)?);
        let alloc_bf16 = |n: usize| stream.alloc_zeros::<bf16>(n).on_gpu(WHAT);
        let alloc_f32 = |n: usize| stream.alloc_zeros::<f32>(n).on_gpu(WHAT);
        let mut normed = alloc_bf16(count * hidden)?;
        let mut qkv = alloc_f32(count * self.qkv_shape().width())?;
        let mut q = alloc_bf16(count * config.q_dim())?;
        let mut attended = alloc_bf16(count * config.q_dim())?;
        let mut projected = alloc_f32(count * hidden)?;
        let mut gate_up = alloc_f32(count * 2 * ffn)?;
        let mut activated = alloc_bf16(count * ffn)?;
        let mut mlp_out = alloc_f32(count * hidden)?;
        self.add_and_norm(x, None, &weights.attn_norm, &mut normed)?;
        self.linear
            .forward(&normed, &weights.qkv, hidden, &mut qkv)
            .on_gpu(WHAT)?;
        let mut mode = PassCache::Layer {
            cache: &mut *cache,
            attention,
            taps: Some(taps),
        };
        self.attend(&mut mode, index, &plan, &qkv, &mut q, &mut attended)?;
        self.linear
            .forward(&attended, &weights.o, config.q_dim(), &mut projected)
            .on_gpu(WHAT)?;
        self.reduce_partial_sums(&mut projected)?;
        let delta = (&projected, weights.post_attention_norm.as_ref());
        self.add_and_norm(x, Some(delta), &weights.ffn_norm, &mut normed)?;
        self.linear
            .forward(&normed, &weights.gate_up, hidden, &mut gate_up)
            .on_gpu(WHAT)?;
        layer::gated_activation(
            gpu,
            stream,
            &gate_up,
            &mut activated,
            ffn,
            self.activation(),
        )
        .on_gpu(WHAT)?;
        self.linear
            .forward(&activated, &weights.down, ffn, &mut mlp_out)
            .on_gpu(WHAT)?;
        self.reduce_partial_sums(&mut mlp_out)?;
        // The MLP output joins the residual stream now (the all-layers pass adds it at the
        // next layer's input norm, with the same kernel and the same norm weight).
        let next_norm = match self.weights.layers.get(index + 1) {
            Some(next) => &next.attn_norm,
            None => &self.weights.output_norm,
        };
        let delta = (&mlp_out, weights.post_ffn_norm.as_ref());
        self.add_and_norm(x, Some(delta), next_norm, &mut normed)?;
        cache.lens[0] = next[0];
        Ok(normed)
    }
}
