//! ShadowKV on the CPU (`docs/ARCHITECTURE.md`), written for clarity, in f32 with the
//! factorisation in f64: the reference the GPU cache is compared with, and the CPU path's
//! `shadowkv` attention mode.
//!
//! After the prompt, each layer keeps the rank-`r` factors of its pre-RoPE keys, the chunk
//! landmarks and the outlier chunks. Each later query scores the landmarks, selects the
//! `S/c` best chunks per KV head, rebuilds their keys from the factors (RoPE at their
//! positions) and attends over local window + outliers + selected chunks + generated tokens.
//! Values are read exactly (on the GPU they come from host memory).
pub use shadowkv::cache::ShadowKvParams;
use shadowkv::reference::factorise::factorise;

use super::math::{dot, rope_rows, softmax_in_place, RopeTable};
use crate::config::ModelConfig;
use crate::error::{invalid_input, Error, Result};

/// Checks `params` against the kernels' limits and the model's key width.
pub fn validate(params: &ShadowKvParams, config: &ModelConfig) -> Result<()> {
    params
        .validate(config.kv_heads, config.head_dim)
        .map_err(Error::Parameters)
}

/// Checks that `groups` factor groups split the KV heads evenly and that each group's keys
/// (`kv_dim / groups` wide) are at least `params.rank` wide.
pub fn check_groups(config: &ModelConfig, params: &ShadowKvParams, groups: usize) -> Result<()> {
    if groups == 0 || !config.kv_heads.is_multiple_of(groups) {
        return Err(invalid_input(
            "groups",
            format!("is {groups} for {} KV heads", config.kv_heads),
            "a positive divisor of the KV heads",
        ));
    }
    let width = config.kv_dim() / groups;
    if params.rank > width {
        return Err(invalid_input(
            "groups",
            format!("is {groups}: each group's keys are {width} wide"),
            format!("groups at least as wide as the rank {}", params.rank),
        ));
    }
    Ok(())
}

/// One layer's shadow of one sequence's prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct ShadowLayer {
    prompt_len: usize,
    /// Chunks outside the local window (`n_chunks`).
    chunks: usize,
    /// Per factor group (KV heads `g * width / head_dim..`, see [`ShadowLayer::build_grouped`]):
    /// `[prompt_len, rank]` and `[rank, width]`, the group's pre-RoPE keys ≈ `a · bm`.
    factors: Vec<(Vec<f32>, Vec<f32>)>,
    /// Columns of each factor group (`kv_dim / groups`).
    group_width: usize,
    /// Per KV head: the outlier chunk ids, then the remaining chunk ids and their landmarks.
    outliers: Vec<Vec<usize>>,
    chunk_ids: Vec<Vec<usize>>,
    landmarks: Vec<Vec<f32>>,
}

impl ShadowLayer {
    /// Builds the shadow of a prompt from its pre-RoPE keys (`[len, kv_dim]`) and post-RoPE
    /// keys per KV head (`[len, head_dim]` each).
    pub fn build(
        config: &ModelConfig,
        params: &ShadowKvParams,
        pre_rope_keys: &[f32],
        post_rope_keys: &[&[f32]],
    ) -> Result<ShadowLayer> {
        ShadowLayer::build_grouped(config, params, pre_rope_keys, post_rope_keys, 1)
    }

    /// [`ShadowLayer::build`] with the KV heads factorised in `groups` independent groups of
    /// `kv_heads / groups` consecutive heads, each to rank `params.rank`: what `groups` ranks
    /// of a tensor-parallel split compute, each over its own KV heads' keys.
    pub fn build_grouped(
        config: &ModelConfig,
        params: &ShadowKvParams,
        pre_rope_keys: &[f32],
        post_rope_keys: &[&[f32]],
        groups: usize,
    ) -> Result<ShadowLayer> {
        let (kv_dim, head_dim, c) = (config.kv_dim(), config.head_dim, params.chunk_size);
        check_groups(config, params, groups)?;
        let prompt_len = pre_rope_keys.len() / kv_dim;
        params.check_prompt(prompt_len).map_err(Error::Parameters)?;
        let chunks = params.prompt_chunks(prompt_len);
        let outliers_per_head = params.outlier_chunks.min(chunks);
        let group_width = kv_dim / groups;
        let factors = (0..groups)
            .map(|g| {
                let columns: Vec<f32> = pre_rope_keys
                    .chunks_exact(kv_dim)
                    .flat_map(|row| row[g * group_width..(g + 1) * group_width].iter().copied())
                    .collect();
                factorise(&columns, group_width, params.rank)
            })
            .collect();
        let mut layer = ShadowLayer {
            prompt_len,
            chunks,
            factors,
            group_width,
            outliers: Vec::new(),
            chunk_ids: Vec::new(),
            landmarks: Vec::new(),
        };
        for keys in post_rope_keys {
            let mut means = vec![0.0f32; chunks * head_dim];
            let mut min_cosine = vec![0.0f32; chunks];
            for chunk in 0..chunks {
                let mean = &mut means[chunk * head_dim..(chunk + 1) * head_dim];
                let rows = &keys[chunk * c * head_dim..(chunk + 1) * c * head_dim];
                for row in rows.chunks_exact(head_dim) {
                    mean.iter_mut()
                        .zip(row)
                        .for_each(|(m, k)| *m += k / c as f32);
                }
                let mean_norm = dot(mean, mean).sqrt();
                min_cosine[chunk] = rows
                    .chunks_exact(head_dim)
                    .map(|row| {
                        dot(mean, row) / (mean_norm * dot(row, row).sqrt()).max(f32::MIN_POSITIVE)
                    })
                    .fold(f32::INFINITY, f32::min);
            }
            // Outliers: the chunks whose keys stray furthest from their landmark.
            let mut order: Vec<usize> = (0..chunks).collect();
            order.sort_by(|&x, &y| min_cosine[x].total_cmp(&min_cosine[y]).then(x.cmp(&y)));
            let mut outliers = order[..outliers_per_head].to_vec();
            outliers.sort_unstable();
            let kept: Vec<usize> = (0..chunks)
                .filter(|j| outliers.binary_search(j).is_err())
                .collect();
            layer.landmarks.push(
                kept.iter()
                    .flat_map(|&j| means[j * head_dim..(j + 1) * head_dim].iter().copied())
                    .collect(),
            );
            layer.chunk_ids.push(kept);
            layer.outliers.push(outliers);
        }
        Ok(layer)
    }

    /// The chunks a query selects for KV head `kv_head`: the `S/c` highest scores, where a
    /// chunk's score is the max over the group's heads of the softmax over the landmarks.
    pub fn select(
        &self,
        config: &ModelConfig,
        params: &ShadowKvParams,
        kv_head: usize,
        group_queries: &[f32],
    ) -> Vec<usize> {
        let head_dim = config.head_dim;
        let landmarks = &self.landmarks[kv_head];
        let count = landmarks.len() / head_dim;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut scores = vec![0.0f32; count];
        let mut logits = vec![0.0f32; count];
        for query in group_queries.chunks_exact(head_dim) {
            for (logit, landmark) in logits.iter_mut().zip(landmarks.chunks_exact(head_dim)) {
                *logit = dot(query, landmark) * scale;
            }
            softmax_in_place(&mut logits);
            scores
                .iter_mut()
                .zip(&logits)
                .for_each(|(s, &p)| *s = s.max(p));
        }
        let mut order: Vec<usize> = (0..count).collect();
        order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]).then(x.cmp(&y)));
        let mut selected: Vec<usize> = order[..params.budget_chunks()]
            .iter()
            .map(|&i| self.chunk_ids[kv_head][i])
            .collect();
        selected.sort_unstable();
        selected
    }

    /// The keys of chunk `chunk` for KV head `kv_head`, rebuilt from the factors with RoPE at
    /// their positions: `[chunk_size, head_dim]`.
    pub fn rebuild_chunk(
        &self,
        config: &ModelConfig,
        params: &ShadowKvParams,
        kv_head: usize,
        chunk: usize,
        rope: &RopeTable,
    ) -> Vec<f32> {
        let (head_dim, width, rank) = (config.head_dim, self.group_width, params.rank);
        let heads_per_group = width / head_dim;
        let (a, bm) = &self.factors[kv_head / heads_per_group];
        let column = (kv_head % heads_per_group) * head_dim;
        let mut keys = vec![0.0f32; params.chunk_size * head_dim];
        for (i, key) in keys.chunks_exact_mut(head_dim).enumerate() {
            let position = chunk * params.chunk_size + i;
            let a_row = &a[position * rank..(position + 1) * rank];
            for (component, &a) in a_row.iter().enumerate() {
                let b_row = &bm[component * width + column..][..head_dim];
                key.iter_mut().zip(b_row).for_each(|(k, b)| *k += a * b);
            }
            rope_rows(key, head_dim, position as u32, rope);
        }
        keys
    }

    /// ShadowKV attention of one query position (`position >= prompt_len`) for all heads:
    /// `query` is `[heads, head_dim]` post-RoPE; `keys`/`values` give each KV head's exact
    /// post-RoPE keys and values for positions `0..=position`.
    pub fn attend<'k>(
        &self,
        config: &ModelConfig,
        params: &ShadowKvParams,
        query: &[f32],
        position: usize,
        exact: &dyn Fn(usize) -> (&'k [f32], &'k [f32]),
        rope: &RopeTable,
    ) -> Vec<f32> {
        let (head_dim, group, c) = (config.head_dim, config.group(), params.chunk_size);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut out = vec![0.0f32; config.q_dim()];
        for kv_head in 0..config.kv_heads {
            let (keys, values) = exact(kv_head);
            let group_queries =
                &query[kv_head * group * head_dim..(kv_head + 1) * group * head_dim];
            // Every attended token: (position, key). Exact keys for the outliers, the local
            // window and the generated tokens; rebuilt keys for the selected chunks.
            let mut tokens: Vec<(usize, Vec<f32>)> = Vec::new();
            let exact_key = |p: usize| keys[p * head_dim..(p + 1) * head_dim].to_vec();
            for &chunk in &self.outliers[kv_head] {
                tokens.extend((chunk * c..(chunk + 1) * c).map(|p| (p, exact_key(p))));
            }
            for chunk in self.select(config, params, kv_head, group_queries) {
                let rebuilt = self.rebuild_chunk(config, params, kv_head, chunk, rope);
                tokens.extend(
                    rebuilt
                        .chunks_exact(head_dim)
                        .enumerate()
                        .map(|(i, k)| (chunk * c + i, k.to_vec())),
                );
            }
            tokens.extend((self.chunks * c..=position).map(|p| (p, exact_key(p))));
            for (i, query) in group_queries.chunks_exact(head_dim).enumerate() {
                let mut weights: Vec<f32> =
                    tokens.iter().map(|(_, k)| dot(query, k) * scale).collect();
                softmax_in_place(&mut weights);
                let row = &mut out[(kv_head * group + i) * head_dim..][..head_dim];
                for ((p, _), &w) in tokens.iter().zip(&weights) {
                    row.iter_mut()
                        .zip(&values[p * head_dim..(p + 1) * head_dim])
                        .for_each(|(o, v)| *o += w * v);
                }
            }
        }
        out
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Chunks of the prompt outside the local window; later positions are attended exactly.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// The outlier chunks of KV head `kv_head` (ids, ascending), always attended exactly.
    pub fn outliers(&self, kv_head: usize) -> &[usize] {
        &self.outliers[kv_head]
    }

    /// Which of positions `0..=position` ShadowKV attends for KV head `kv_head` when its
    /// group's queries are `group_queries`: outliers, selected chunks, and every position
    /// past the prompt's chunks (local window and generated tokens).
    pub fn attended_positions(
        &self,
        config: &ModelConfig,
        params: &ShadowKvParams,
        kv_head: usize,
        group_queries: &[f32],
        position: usize,
    ) -> Vec<bool> {
        let c = params.chunk_size;
        let mut attended = vec![false; position + 1];
        let selected = self.select(config, params, kv_head, group_queries);
        for &chunk in self.outliers[kv_head].iter().chain(&selected) {
            attended[chunk * c..(chunk + 1) * c].fill(true);
        }
        attended[(self.chunks * c).min(position + 1)..].fill(true);
        attended
    }

    /// Attention recall of one query position: per query head, the share of full attention's
    /// probability mass (softmax over the exact keys of positions `0..=position`) that falls
    /// on the positions ShadowKV attends. 1 means the sparse attention lost nothing.
    pub fn recall<'k>(
        &self,
        config: &ModelConfig,
        params: &ShadowKvParams,
        query: &[f32],
        position: usize,
        exact: &dyn Fn(usize) -> (&'k [f32], &'k [f32]),
    ) -> Vec<f32> {
        let (head_dim, group) = (config.head_dim, config.group());
        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut recalls = Vec::with_capacity(config.heads);
        for kv_head in 0..config.kv_heads {
            let (keys, _) = exact(kv_head);
            let group_queries =
                &query[kv_head * group * head_dim..(kv_head + 1) * group * head_dim];
            let attended =
                self.attended_positions(config, params, kv_head, group_queries, position);
            for query in group_queries.chunks_exact(head_dim) {
                let mut weights: Vec<f32> = keys[..(position + 1) * head_dim]
                    .chunks_exact(head_dim)
                    .map(|k| dot(query, k) * scale)
                    .collect();
                softmax_in_place(&mut weights);
                let kept: f64 = weights
                    .iter()
                    .zip(&attended)
                    .filter(|(_, &a)| a)
                    .map(|(&w, _)| w as f64)
                    .sum();
                recalls.push(kept as f32);
            }
        }
        recalls
    }
}
