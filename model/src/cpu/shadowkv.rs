//! ShadowKV on the CPU (`../shared/SHADOWKV.md`), written for clarity, in f32 with the
//! factorisation in f64: the reference the GPU cache is compared with, and the CPU path's
//! `shadowkv` attention mode.
//!
//! After the prompt, each layer keeps the rank-`r` factors of its pre-RoPE keys, the chunk
//! landmarks and the outlier chunks. Each later query scores the landmarks, selects the
//! `S/c` best chunks per KV head, rebuilds their keys from the factors (RoPE at their
//! positions) and attends over local window + outliers + selected chunks + generated tokens.
//! Values are read exactly (on the GPU they come from host memory).
use nalgebra::{DMatrix, SymmetricEigen};
use shadowkv_kernels::shadow::{MAX_CHUNK_SIZE, MAX_RANK, RANK_STEP};

use super::{dot, rope_rows, softmax_in_place};
use crate::config::ModelConfig;
use crate::{ModelFileError, Result};

/// ShadowKV's parameters, with the paper's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowKvParams {
    /// Tokens per chunk (`c`).
    pub chunk_size: usize,
    /// Tokens attended in selected chunks per step (`S`), a multiple of `chunk_size`.
    pub sparse_budget: usize,
    /// Rank of the key factorisation (`r`).
    pub rank: usize,
    /// Chunks at the end of the prompt kept exact (`n_local`).
    pub local_chunks: usize,
    /// Chunks per KV head kept exact because their keys stray from their landmark (`n_out`).
    pub outlier_chunks: usize,
}

impl Default for ShadowKvParams {
    fn default() -> Self {
        ShadowKvParams {
            chunk_size: 8,
            sparse_budget: 2048,
            rank: 160,
            local_chunks: 4,
            outlier_chunks: 48,
        }
    }
}

fn invalid(reason: String) -> ModelFileError {
    ModelFileError {
        file: "ShadowKV parameters".into(),
        tensor: None,
        reason,
    }
}

impl ShadowKvParams {
    /// Selected chunks per step (`S / c`).
    pub fn budget_chunks(&self) -> usize {
        self.sparse_budget / self.chunk_size.max(1)
    }

    /// Checks the parameters against the kernels' limits and the model's key width.
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        if !(1..=MAX_CHUNK_SIZE as usize).contains(&self.chunk_size) {
            return Err(invalid(format!(
                "chunk size {} is out of range: expected 1 to {MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        if self.sparse_budget == 0 || !self.sparse_budget.is_multiple_of(self.chunk_size) {
            return Err(invalid(format!(
                "sparse budget {} is not a positive multiple of the chunk size {}",
                self.sparse_budget, self.chunk_size
            )));
        }
        let step = RANK_STEP as usize;
        if self.rank == 0 || !self.rank.is_multiple_of(step) || self.rank > MAX_RANK as usize {
            return Err(invalid(format!(
                "rank {} is out of range: expected a multiple of {step} from {step} to {MAX_RANK}",
                self.rank
            )));
        }
        if self.rank > config.kv_dim() {
            return Err(invalid(format!(
                "rank {} exceeds the keys' width Hkv*d = {}",
                self.rank,
                config.kv_dim()
            )));
        }
        Ok(())
    }

    /// Whether a `prompt_len`-token prompt leaves at least the budget's chunks to select from.
    pub fn check_prompt(&self, prompt_len: usize) -> Result<()> {
        let chunks = self.prompt_chunks(prompt_len);
        let outliers = self.outlier_chunks.min(chunks);
        if chunks - outliers < self.budget_chunks() {
            return Err(invalid(format!(
                "a {prompt_len}-token prompt leaves {} selectable chunks per KV head ({chunks} chunks \
                 outside the local window, {outliers} outliers); the sparse budget needs {} chunks of \
                 {}: use a longer prompt or a smaller budget",
                chunks - outliers,
                self.budget_chunks(),
                self.chunk_size
            )));
        }
        Ok(())
    }

    /// Chunks of a `prompt_len`-token prompt outside the local window: `floor(L/c) - n_local`,
    /// rounded down to a multiple of 8.
    pub fn prompt_chunks(&self, prompt_len: usize) -> usize {
        ((prompt_len / self.chunk_size).saturating_sub(self.local_chunks) / 8) * 8
    }
}

/// One layer's shadow of one sequence's prompt.
#[derive(Clone, Debug)]
pub struct ShadowLayer {
    prompt_len: usize,
    /// Chunks outside the local window (`n_chunks`).
    chunks: usize,
    /// `[prompt_len, rank]` and `[rank, kv_dim]`: pre-RoPE keys ≈ `a · bm`.
    a: Vec<f32>,
    bm: Vec<f32>,
    /// Per KV head: the outlier chunk ids, then the remaining chunk ids and their landmarks.
    outliers: Vec<Vec<usize>>,
    chunk_ids: Vec<Vec<usize>>,
    landmarks: Vec<Vec<f32>>,
}

/// The rank-`rank` factors of `keys` (`[len, width]`, row-major): `a = U_r` (`[len, rank]`) and
/// `bm = Σ_r V_rᵀ` (`[rank, width]`), from the eigenvectors of the Gram matrix `keysᵀ keys`
/// (`width²`, never `len²`).
pub fn factorise(keys: &[f32], width: usize, rank: usize) -> (Vec<f32>, Vec<f32>) {
    let len = keys.len() / width;
    let mut gram = DMatrix::<f64>::zeros(width, width);
    for row in keys.chunks_exact(width) {
        for i in 0..width {
            let ki = row[i] as f64;
            for j in 0..=i {
                gram[(i, j)] += ki * row[j] as f64;
            }
        }
    }
    for i in 0..width {
        for j in 0..i {
            gram[(j, i)] = gram[(i, j)];
        }
    }
    let eigen = SymmetricEigen::new(gram);
    let mut order: Vec<usize> = (0..width).collect();
    order.sort_by(|&x, &y| eigen.eigenvalues[y].total_cmp(&eigen.eigenvalues[x]));
    let largest = eigen.eigenvalues[order[0]].max(0.0);
    let mut a = vec![0.0f32; len * rank];
    let mut bm = vec![0.0f32; rank * width];
    for (component, &index) in order.iter().take(rank).enumerate() {
        let sigma = eigen.eigenvalues[index].max(0.0).sqrt();
        let vector = eigen.eigenvectors.column(index);
        for j in 0..width {
            bm[component * width + j] = (sigma * vector[j]) as f32;
        }
        // Directions with no energy carry nothing: leave their column of A at zero rather
        // than divide by a vanishing singular value.
        if sigma * sigma <= largest * 1e-24 || sigma == 0.0 {
            continue;
        }
        for (t, row) in keys.chunks_exact(width).enumerate() {
            let projection: f64 = row
                .iter()
                .zip(vector.iter())
                .map(|(&k, &v)| k as f64 * v)
                .sum();
            a[t * rank + component] = (projection / sigma) as f32;
        }
    }
    (a, bm)
}

/// `‖K - a·bm‖ / ‖K‖` of [`factorise`]'s factors (a check, not part of the prefill).
pub fn factorisation_error(keys: &[f32], width: usize, rank: usize, a: &[f32], bm: &[f32]) -> f64 {
    let (mut error, mut norm) = (0.0f64, 0.0f64);
    for (t, row) in keys.chunks_exact(width).enumerate() {
        for (j, &k) in row.iter().enumerate() {
            let rebuilt: f64 = (0..rank)
                .map(|c| a[t * rank + c] as f64 * bm[c * width + j] as f64)
                .sum();
            error += (k as f64 - rebuilt).powi(2);
            norm += (k as f64).powi(2);
        }
    }
    (error / norm.max(f64::MIN_POSITIVE)).sqrt()
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
        let (kv_dim, head_dim, c) = (config.kv_dim(), config.head_dim, params.chunk_size);
        let prompt_len = pre_rope_keys.len() / kv_dim;
        params.check_prompt(prompt_len)?;
        let chunks = params.prompt_chunks(prompt_len);
        let outliers_per_head = params.outlier_chunks.min(chunks);
        let (a, bm) = factorise(pre_rope_keys, kv_dim, params.rank);
        let mut layer = ShadowLayer {
            prompt_len,
            chunks,
            a,
            bm,
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
        inverse_frequencies: &[f64],
    ) -> Vec<f32> {
        let (head_dim, kv_dim, rank) = (config.head_dim, config.kv_dim(), params.rank);
        let mut keys = vec![0.0f32; params.chunk_size * head_dim];
        for (i, key) in keys.chunks_exact_mut(head_dim).enumerate() {
            let position = chunk * params.chunk_size + i;
            let a_row = &self.a[position * rank..(position + 1) * rank];
            for (component, &a) in a_row.iter().enumerate() {
                let b_row = &self.bm[component * kv_dim + kv_head * head_dim..][..head_dim];
                key.iter_mut().zip(b_row).for_each(|(k, b)| *k += a * b);
            }
            rope_rows(key, head_dim, position as u32, inverse_frequencies);
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
        inverse_frequencies: &[f64],
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
                let rebuilt =
                    self.rebuild_chunk(config, params, kv_head, chunk, inverse_frequencies);
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
}

#[cfg(test)]
mod tests {
    use super::{factorisation_error, factorise};

    /// Deterministic values in [-1, 1).
    fn noise(seed: u64, n: usize) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    #[test]
    fn factorisation_recovers_a_low_rank_matrix_and_bounds_the_rest() {
        let (len, width, rank) = (301, 48, 16);
        let left = noise(1, len * rank);
        let right = noise(2, rank * width);
        let mut keys = vec![0.0f32; len * width];
        for t in 0..len {
            for j in 0..width {
                keys[t * width + j] = (0..rank)
                    .map(|c| left[t * rank + c] * right[c * width + j])
                    .sum();
            }
        }
        let (a, bm) = factorise(&keys, width, rank);
        let error = factorisation_error(&keys, width, rank, &a, &bm);
        assert_eq!((a.len(), bm.len()), (len * rank, rank * width));
        assert!(error < 1e-5, "exactly rank {rank}: error {error}");
        // With noise on top, a lower rank leaves more error, and the full rank none.
        let noisy: Vec<f32> = keys
            .iter()
            .zip(noise(3, len * width))
            .map(|(k, n)| k + 0.05 * n)
            .collect();
        let error_at = |rank| {
            let (a, bm) = factorise(&noisy, width, rank);
            factorisation_error(&noisy, width, rank, &a, &bm)
        };
        let (at_rank, below, full) = (error_at(rank), error_at(rank / 2), error_at(width));
        assert!(
            full < 1e-5 && at_rank < below && at_rank < 0.05,
            "{full} {at_rank} {below}"
        );
    }
}
