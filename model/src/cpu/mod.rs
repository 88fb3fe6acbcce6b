//! The CPU reference path: the whole model in f32, for small models (SmolLM2-135M in CI) and
//! as the reference the GPU model is checked against.
//!
//! Same arithmetic as the GPU path, in f32: RMSNorm, Q/K/V projections (plus Qwen2 biases),
//! rotate-half RoPE with the angle reduced in f64, causal GQA attention with an f32 softmax,
//! SwiGLU, and the (tied or untied) output head. Products are split over the machine's cores.
//! Gemma-3's additions ([`crate::block::BlockOptions`]): the embedding scale, per-head RMSNorm
//! of queries and keys before RoPE, the query scale, sliding-window attention with its own
//! RoPE on the local layers (which keep exact attention in ShadowKV mode: only global layers
//! get shadows), norms on the attention and MLP outputs, and GeGLU.
mod math;
pub mod shadowkv;

pub use math::{dot, matmul, rms_norm, rope_rows, silu, softmax_in_place, RopeTable};

use crate::config::ModelConfig;
use crate::error::{invalid_input, Error, Result};
use crate::weights::{Matrix, ModelWeights};
use math::{add_assign, add_rows};
use shadowkv::{ShadowKvParams, ShadowLayer};

/// The model on the CPU.
pub struct CpuModel {
    pub config: ModelConfig,
    pub weights: ModelWeights<Matrix>,
    rope: RopeTable,
    /// The sliding-window layers' RoPE, when the model has such layers.
    local_rope: Option<RopeTable>,
    /// The rows of the whole vocabulary that `weights.embedding` and the output head hold:
    /// all of them, or a tensor-parallel rank's slice ([`crate::tp`]).
    vocab_rows: std::ops::Range<usize>,
}

/// One sequence's KV cache: per layer, post-RoPE keys and values `[kv_heads, len, head_dim]`
/// grown token by token, and in ShadowKV mode each layer's shadow of the prompt.
///
/// The prompt may arrive in pieces ([`CpuModel::prefill_piece`]), each attended in full as it
/// comes; [`CpuModel::finish_prompt`] closes it. In ShadowKV mode the shadows are built then,
/// from the whole prompt, so the result does not depend on how the prompt was split.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuCache {
    /// Per layer, per KV head: `len * head_dim` keys and values.
    keys: Vec<Vec<Vec<f32>>>,
    values: Vec<Vec<Vec<f32>>>,
    len: usize,
    /// ShadowKV mode: its parameters, and per layer the shadow built from the prompt; later
    /// tokens attend through it (`None` for a sliding-window layer, which stays exact). Empty
    /// while the prompt is open, and for good when the prompt was too short for the sparse
    /// budget (the sequence then keeps exact attention).
    shadowkv: Option<ShadowKvParams>,
    shadows: Vec<Option<ShadowLayer>>,
    /// ShadowKV mode, when recording: per layer, per KV head, the chunks the latest token
    /// selected (see [`CpuCache::record_selections`]).
    selections: Option<Vec<Vec<Vec<usize>>>>,
    /// ShadowKV mode, when recording: per layer, per query head, the latest token's attention
    /// recall (see [`CpuCache::record_recall`]).
    recalls: Option<Vec<Vec<f32>>>,
    /// ShadowKV mode, while the prompt is open: per layer, the prompt's pre-RoPE keys so far
    /// (`[len, kv_dim]`), which the factorisation needs and the cache does not otherwise keep.
    pre_rope_keys: Vec<Vec<f32>>,
    /// Whether the prompt is closed: no more pieces, shadows built where they fit.
    prompt_complete: bool,
    /// ShadowKV mode: the KV heads are factorised in this many independent groups (0 or 1:
    /// one factorisation over all of them); see [`CpuCache::shadowkv_grouped`].
    factor_groups: usize,
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

    /// A cache in ShadowKV mode. The prompt comes in one [`CpuModel::forward`] call, or in
    /// pieces ([`CpuModel::prefill_piece`]) closed by [`CpuModel::finish_prompt`].
    pub fn shadowkv(config: &ModelConfig, params: ShadowKvParams) -> Result<CpuCache> {
        shadowkv::validate(&params, config)?;
        Ok(CpuCache {
            shadowkv: Some(params),
            pre_rope_keys: vec![Vec::new(); config.layers],
            ..CpuCache::new(config)
        })
    }

    /// [`CpuCache::shadowkv`] with each layer's KV heads factorised in `groups` independent
    /// groups of consecutive heads, each to `params.rank`: the unsplit model's equivalent of
    /// ShadowKV under `groups`-way tensor parallelism, where each rank factorises its own KV
    /// heads' keys.
    pub fn shadowkv_grouped(
        config: &ModelConfig,
        params: ShadowKvParams,
        groups: usize,
    ) -> Result<CpuCache> {
        shadowkv::check_groups(config, &params, groups)?;
        Ok(CpuCache {
            factor_groups: groups,
            ..CpuCache::shadowkv(config, params)?
        })
    }

    /// While a ShadowKV cache's prompt is open: the attention its tokens after the prompt
    /// get, ShadowKV with `params` or full attention (`None`). One prefill then serves several
    /// settings: run the prompt's pieces ([`CpuModel::prefill_piece`]), clone the cache per
    /// setting, set each clone's and close its prompt ([`CpuModel::finish_prompt`]).
    pub fn set_shadowkv(
        &mut self,
        config: &ModelConfig,
        params: Option<ShadowKvParams>,
    ) -> Result<()> {
        if self.prompt_complete || self.shadowkv.is_none() {
            return Err(invalid_input(
                "cache",
                "is not a ShadowKV cache with its prompt open",
                "a cache from CpuCache::shadowkv before finish_prompt",
            ));
        }
        if let Some(params) = &params {
            shadowkv::validate(params, config)?;
        }
        self.shadowkv = params;
        Ok(())
    }

    /// ShadowKV mode: with `true`, each later `forward` keeps the chunks its last token
    /// selected per layer and KV head ([`selections`](Self::selections)), to measure how many
    /// stay selected from one decode step to the next.
    pub fn record_selections(&mut self, on: bool) {
        self.selections = on.then(Vec::new);
    }

    /// Per layer, per KV head, the chunks (ids, ascending) the latest token selected, when
    /// recording (empty before the first token after the prompt, and for sliding-window
    /// layers, which have no shadow).
    pub fn selections(&self) -> &[Vec<Vec<usize>>] {
        self.selections.as_deref().unwrap_or(&[])
    }

    /// ShadowKV mode: with `true`, each later `forward` keeps, per layer and query head, its
    /// last token's attention recall ([`recalls`](Self::recalls)): the share of full
    /// attention's probability mass, over the exact keys, on the tokens ShadowKV attends.
    pub fn record_recall(&mut self, on: bool) {
        self.recalls = on.then(Vec::new);
    }

    /// Per layer, per query head, the latest token's attention recall, when recording (empty
    /// before the first token after the prompt).
    pub fn recalls(&self) -> &[Vec<f32>] {
        self.recalls.as_deref().unwrap_or(&[])
    }

    /// Layer `layer`'s shadow of the prompt, once built (none for a sliding-window layer,
    /// which stays exact).
    pub fn shadow(&self, layer: usize) -> Option<&ShadowLayer> {
        self.shadows.get(layer).and_then(Option::as_ref)
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

    /// ShadowKV's parameters, in ShadowKV mode.
    pub fn shadowkv_params(&self) -> Option<ShadowKvParams> {
        self.shadowkv
    }

    /// Whether the prompt is closed (by [`CpuModel::finish_prompt`] or a `forward` call).
    pub fn prompt_complete(&self) -> bool {
        self.prompt_complete
    }

    /// Whether tokens after the prompt attend through ShadowKV's shadows: a ShadowKV cache
    /// whose prompt is complete and was long enough for the sparse budget.
    pub fn uses_shadows(&self) -> bool {
        !self.shadows.is_empty()
    }
}

impl CpuModel {
    pub fn new(config: ModelConfig, weights: ModelWeights<Matrix>) -> CpuModel {
        let vocab_rows = 0..config.vocab;
        CpuModel::shard(config, weights, vocab_rows)
    }

    /// A rank of a tensor-parallel split: `config` is the rank's shape (its heads, KV heads
    /// and MLP columns; the whole vocabulary), `weights` its slices, whose embedding and
    /// output head hold rows `vocab_rows` of the vocabulary.
    pub(crate) fn shard(
        config: ModelConfig,
        weights: ModelWeights<Matrix>,
        vocab_rows: std::ops::Range<usize>,
    ) -> CpuModel {
        let rope = RopeTable::new(&config);
        let local_rope = config
            .block
            .sliding_window
            .map(|window| RopeTable::of(&window.local_rope, config.head_dim));
        CpuModel {
            config,
            weights,
            rope,
            local_rope,
            vocab_rows,
        }
    }

    /// The attention window of layer `layer` (`None`: it attends to every earlier token).
    fn window(&self, layer: usize) -> Option<usize> {
        self.config
            .block
            .sliding_window
            .filter(|window| window.is_local(layer))
            .map(|window| window.window)
    }

    /// The RoPE of layer `layer`: the local table on sliding-window layers.
    fn rope_of(&self, layer: usize) -> &RopeTable {
        match (&self.local_rope, self.window(layer)) {
            (Some(local), Some(_)) => local,
            _ => &self.rope,
        }
    }

    /// Runs `tokens` (the prompt, or one generated token) after what `cache` holds, appends
    /// their keys and values, and returns the last token's logits.
    ///
    /// This closes the prompt. In ShadowKV mode the first call is the whole prompt (or, after
    /// [`CpuModel::prefill_piece`] calls, its last piece), and a prompt too short for the
    /// sparse budget is an error that leaves the cache as it was; use
    /// [`CpuModel::finish_prompt`] to keep such a sequence on exact attention instead.
    pub fn forward(&self, cache: &mut CpuCache, tokens: &[u32]) -> Result<Vec<f32>> {
        forward_shards(
            std::slice::from_ref(self),
            std::slice::from_mut(cache),
            tokens,
        )
    }

    /// Runs one piece of the prompt after what `cache` holds, with full attention, and returns
    /// its last token's logits. In ShadowKV mode the piece's pre-RoPE keys are kept for the
    /// shadows that [`CpuModel::finish_prompt`] builds. Splitting a prompt into pieces gives
    /// bit for bit the cache and logits of one call.
    pub fn prefill_piece(&self, cache: &mut CpuCache, tokens: &[u32]) -> Result<Vec<f32>> {
        prefill_piece_shards(
            std::slice::from_ref(self),
            std::slice::from_mut(cache),
            tokens,
        )
    }

    /// Closes the prompt: no more pieces. In ShadowKV mode each layer's shadow is built from
    /// the whole prompt, and later tokens attend through it; a prompt too short for the sparse
    /// budget keeps exact attention for the whole sequence instead (see
    /// [`CpuCache::uses_shadows`]). Closing a closed prompt is an error.
    pub fn finish_prompt(&self, cache: &mut CpuCache) -> Result<()> {
        if cache.prompt_complete {
            return Err(invalid_input(
                "cache",
                "holds a complete prompt",
                "a cache whose prompt is still open",
            ));
        }
        let pre_rope_keys = std::mem::take(&mut cache.pre_rope_keys);
        if let Some(params) = cache.shadowkv {
            if params.check_prompt(cache.len).is_ok() {
                let shadows = pre_rope_keys
                    .iter()
                    .zip(&cache.keys)
                    .enumerate()
                    .map(|(layer, (pre_rope, post_rope))| {
                        if self.window(layer).is_some() {
                            return Ok(None);
                        }
                        let post_rope: Vec<&[f32]> =
                            post_rope.iter().map(|k| k.as_slice()).collect();
                        ShadowLayer::build_grouped(
                            &self.config,
                            &params,
                            pre_rope,
                            &post_rope,
                            cache.factor_groups.max(1),
                        )
                        .map(Some)
                    })
                    .collect::<Result<Vec<_>>>()?;
                cache.shadows = shadows;
            }
        }
        cache.prompt_complete = true;
        Ok(())
    }

    /// Rejects an empty token list and ids past the vocabulary.
    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.config.vocab;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(invalid_input(
                "tokens",
                format!("holds id {bad}"),
                format!("ids below the vocabulary size {vocab}"),
            ));
        }
        if tokens.is_empty() {
            return Err(invalid_input("tokens", "is empty", "at least one token"));
        }
        Ok(())
    }

    /// Adds the embedding rows of `tokens` that this model holds to `x` (`[tokens, hidden]`):
    /// every row when unsplit; summed over the ranks of a vocabulary split, as the all-reduce
    /// of the embedding does, each row comes from its one owner.
    fn embed_into(&self, tokens: &[u32], x: &mut [f32]) {
        let hidden = self.config.hidden;
        for (&token, out) in tokens.iter().zip(x.chunks_exact_mut(hidden)) {
            let token = token as usize;
            if self.vocab_rows.contains(&token) {
                let row = (token - self.vocab_rows.start) * hidden;
                let scale = self.config.block.embedding_scale;
                out.iter_mut()
                    .zip(&self.weights.embedding.data[row..row + hidden])
                    .for_each(|(o, &e)| *o += e * scale);
            }
        }
    }

    /// Layer `layer`'s attention block over `x` (`[count, hidden]`, positions `start..`):
    /// appends the tokens' keys and values to `cache` and returns the O projection's output,
    /// which the residual stream adds (a rank's partial sum under tensor parallelism, normed
    /// by [`CpuModel::post_attention`] once summed). Full attention while the prompt is open,
    /// when the cache has no shadows and on sliding-window layers; ShadowKV attention through
    /// the shadows otherwise.
    fn attention_block(
        &self,
        cache: &mut CpuCache,
        layer: usize,
        x: &[f32],
        start: usize,
        count: usize,
    ) -> Vec<f32> {
        let config = &self.config;
        let weights = &self.weights.layers[layer];
        let keep_pre_rope = cache.shadowkv.is_some() && !cache.prompt_complete;
        let (window, rope) = (self.window(layer), self.rope_of(layer));
        let norms = &weights.extra_norms;
        let normed = rms_norm(x, &weights.attn_norm, config.rms_eps);
        let mut q = matmul(&normed, &weights.q);
        let mut k = matmul(&normed, &weights.k);
        let mut v = matmul(&normed, &weights.v);
        if let Some([q_bias, k_bias, v_bias]) = &weights.qkv_bias {
            add_rows(&mut q, q_bias);
            add_rows(&mut k, k_bias);
            add_rows(&mut v, v_bias);
        }
        if let (Some(q_norm), Some(k_norm)) = (&norms.q_norm, &norms.k_norm) {
            q = rms_norm(&q, q_norm, config.rms_eps);
            k = rms_norm(&k, k_norm, config.rms_eps);
        }
        if keep_pre_rope && window.is_none() {
            cache.pre_rope_keys[layer].extend_from_slice(&k);
        }
        for t in 0..count {
            let position = (start + t) as u32;
            rope_rows(
                &mut q[t * config.q_dim()..(t + 1) * config.q_dim()],
                config.head_dim,
                position,
                rope,
            );
            rope_rows(
                &mut k[t * config.kv_dim()..(t + 1) * config.kv_dim()],
                config.head_dim,
                position,
                rope,
            );
        }
        if config.block.query_scale != 1.0 {
            let scale = config.block.query_scale;
            q.iter_mut().for_each(|v| *v *= scale);
        }
        for head in 0..config.kv_heads {
            for t in 0..count {
                let row = t * config.kv_dim() + head * config.head_dim;
                cache.keys[layer][head].extend_from_slice(&k[row..row + config.head_dim]);
                cache.values[layer][head].extend_from_slice(&v[row..row + config.head_dim]);
            }
        }
        // A sliding-window layer has no shadow: it records no selections, and its attention
        // is exact (recall 1 for every query head).
        if let Some(None) = cache.shadows.get(layer) {
            if let Some(selections) = cache.selections.as_mut() {
                selections.truncate(layer);
                selections.push(Vec::new());
            }
            if let Some(recalls) = cache.recalls.as_mut() {
                recalls.truncate(layer);
                recalls.push(vec![1.0; config.heads]);
            }
        }
        let shadow = cache.shadows.get(layer).and_then(Option::as_ref);
        let attended = match (cache.shadowkv, shadow) {
            (Some(params), Some(shadow)) => {
                if let Some(selections) = cache.selections.as_mut() {
                    let last = &q[(count - 1) * config.q_dim()..count * config.q_dim()];
                    let width = config.group() * config.head_dim;
                    selections.truncate(layer);
                    selections.push(
                        (0..config.kv_heads)
                            .map(|h| {
                                let queries = &last[h * width..(h + 1) * width];
                                shadow.select(config, &params, h, queries)
                            })
                            .collect(),
                    );
                }
                if cache.recalls.is_some() {
                    let last = &q[(count - 1) * config.q_dim()..count * config.q_dim()];
                    let exact = |head: usize| cache.head(layer, head);
                    let recall = shadow.recall(config, &params, last, start + count - 1, &exact);
                    if let Some(recalls) = cache.recalls.as_mut() {
                        recalls.truncate(layer);
                        recalls.push(recall);
                    }
                }
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
                        &self.rope,
                    ));
                }
                out
            }
            _ => self.attention(cache, layer, &q, start, count, window),
        };
        matmul(&attended, &weights.o)
    }

    /// The attention block's summed output as the residual stream takes it: RMS-normed where
    /// the block norms it (Gemma-3's `post_attention_norm`).
    fn post_attention(&self, layer: usize, summed: Vec<f32>) -> Vec<f32> {
        match &self.weights.layers[layer].extra_norms.post_attention_norm {
            Some(norm) => rms_norm(&summed, norm, self.config.rms_eps),
            None => summed,
        }
    }

    /// The MLP block's summed output as the residual stream takes it: RMS-normed where the
    /// block norms it (Gemma-3's `post_ffw_norm`).
    fn post_mlp(&self, layer: usize, summed: Vec<f32>) -> Vec<f32> {
        match &self.weights.layers[layer].extra_norms.post_ffn_norm {
            Some(norm) => rms_norm(&summed, norm, self.config.rms_eps),
            None => summed,
        }
    }

    /// Layer `layer`'s MLP block over `x`: the down projection's output, which the residual
    /// stream adds (a rank's partial sum under tensor parallelism).
    fn mlp_block(&self, layer: usize, x: &[f32]) -> Vec<f32> {
        let weights = &self.weights.layers[layer];
        let normed = rms_norm(x, &weights.ffn_norm, self.config.rms_eps);
        let gate = matmul(&normed, &weights.gate);
        let up = matmul(&normed, &weights.up);
        let activation = self.config.block.activation;
        let activated: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&g, &u)| activation.apply(g) * u)
            .collect();
        matmul(&activated, &weights.down)
    }

    /// The logits of the rows of the vocabulary this model holds, for the last hidden state.
    fn head_logits(&self, last: &[f32]) -> Vec<f32> {
        let normed = rms_norm(last, &self.weights.output_norm, self.config.rms_eps);
        matmul(&normed, self.weights.output_head())
    }

    /// Causal GQA attention of `count` new queries (positions `start..`) over the cache; with
    /// a `window`, each query sees only the last `window` positions up to its own.
    fn attention(
        &self,
        cache: &CpuCache,
        layer: usize,
        q: &[f32],
        start: usize,
        count: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        let config = &self.config;
        let (head_dim, q_dim) = (config.head_dim, config.q_dim());
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = vec![0.0; count * q_dim];
        let mut scores = Vec::new();
        for t in 0..count {
            let visible = start + t + 1;
            let first = window.map_or(0, |w| visible.saturating_sub(w));
            for head in 0..config.heads {
                let kv_head = head / config.group();
                let (keys, values) = cache.head(layer, kv_head);
                let query = &q[t * q_dim + head * head_dim..][..head_dim];
                scores.clear();
                scores.extend(
                    (first..visible).map(|p| dot(query, &keys[p * head_dim..][..head_dim]) * scale),
                );
                softmax_in_place(&mut scores);
                let row = &mut out[t * q_dim + head * head_dim..][..head_dim];
                for (p, &weight) in (first..).zip(scores.iter()) {
                    for (o, &value) in row.iter_mut().zip(&values[p * head_dim..][..head_dim]) {
                        *o += weight * value;
                    }
                }
            }
        }
        out
    }
}

/// [`CpuModel::forward`] over the ranks of a tensor-parallel split (one model: unsplit), each
/// with its own cache; the caches move in step.
pub(crate) fn forward_shards(
    shards: &[CpuModel],
    caches: &mut [CpuCache],
    tokens: &[u32],
) -> Result<Vec<f32>> {
    let lead = &caches[0];
    match lead.shadowkv {
        Some(params) if !lead.prompt_complete => {
            shards[0].check_tokens(tokens)?;
            params
                .check_prompt(lead.len + tokens.len())
                .map_err(Error::Parameters)?;
            let logits = run_shards(shards, caches, tokens)?;
            finish_prompt_shards(shards, caches)?;
            Ok(logits)
        }
        _ => {
            let logits = run_shards(shards, caches, tokens)?;
            caches.iter_mut().for_each(|c| c.prompt_complete = true);
            Ok(logits)
        }
    }
}

/// [`CpuModel::prefill_piece`] over the ranks of a tensor-parallel split.
pub(crate) fn prefill_piece_shards(
    shards: &[CpuModel],
    caches: &mut [CpuCache],
    tokens: &[u32],
) -> Result<Vec<f32>> {
    if caches[0].prompt_complete {
        return Err(invalid_input(
            "cache",
            "holds a complete prompt",
            "a cache whose prompt is still open for another piece",
        ));
    }
    run_shards(shards, caches, tokens)
}

/// [`CpuModel::finish_prompt`] over the ranks of a tensor-parallel split: each rank builds
/// the shadows of its own KV heads.
pub(crate) fn finish_prompt_shards(shards: &[CpuModel], caches: &mut [CpuCache]) -> Result<()> {
    shards
        .iter()
        .zip(caches)
        .try_for_each(|(shard, cache)| shard.finish_prompt(cache))
}

/// Runs `tokens` through every rank of a split (one model: unsplit) after what the caches
/// hold, adding the ranks' partial outputs of each block before the residual stream takes
/// them, as the all-reduce does; returns the last token's logits, the ranks' vocabulary
/// slices in rank order.
fn run_shards(shards: &[CpuModel], caches: &mut [CpuCache], tokens: &[u32]) -> Result<Vec<f32>> {
    let config = &shards[0].config;
    shards[0].check_tokens(tokens)?;
    let (count, hidden) = (tokens.len(), config.hidden);
    let start = caches[0].len;
    let mut x = vec![0.0f32; count * hidden];
    for shard in shards {
        shard.embed_into(tokens, &mut x);
    }
    for layer in 0..config.layers {
        let mut reduced = vec![0.0f32; count * hidden];
        for (shard, cache) in shards.iter().zip(caches.iter_mut()) {
            add_assign(
                &mut reduced,
                &shard.attention_block(cache, layer, &x, start, count),
            );
        }
        add_assign(&mut x, &shards[0].post_attention(layer, reduced));
        let mut reduced = vec![0.0f32; count * hidden];
        for shard in shards {
            add_assign(&mut reduced, &shard.mlp_block(layer, &x));
        }
        add_assign(&mut x, &shards[0].post_mlp(layer, reduced));
    }
    caches.iter_mut().for_each(|c| c.len += count);
    let last = &x[(count - 1) * hidden..];
    Ok(shards
        .iter()
        .flat_map(|shard| shard.head_logits(last))
        .collect())
}
