//! The CPU reference of tensor parallelism: the model's weights sliced into `N` in-process
//! ranks that run the single-device layer code on their shards, their partial sums added as
//! the all-reduce adds them. Its logits match the unsplit model's up to the order of the
//! additions.
use crate::config::ModelConfig;
use crate::cpu::shadowkv::{self, ShadowKvParams};
use crate::cpu::{finish_prompt_shards, forward_shards, prefill_piece_shards, CpuCache, CpuModel};
use crate::error::Result;
use crate::tp::plan::{RankShard, ShardPlan};
use crate::weights::{LayerWeights, Matrix, ModelWeights};

/// Rows `rows` of `matrix`.
pub fn matrix_rows(matrix: &Matrix, rows: std::ops::Range<usize>) -> Matrix {
    Matrix {
        rows: rows.len(),
        cols: matrix.cols,
        data: matrix.data[rows.start * matrix.cols..rows.end * matrix.cols].to_vec(),
    }
}

/// Columns `cols` of `matrix`.
pub fn matrix_columns(matrix: &Matrix, cols: std::ops::Range<usize>) -> Matrix {
    Matrix {
        rows: matrix.rows,
        cols: cols.len(),
        data: matrix
            .data
            .chunks_exact(matrix.cols)
            .flat_map(|row| row[cols.clone()].iter().copied())
            .collect(),
    }
}

/// Rank `shard`'s slice of one layer: Q, K, V (and their biases) and gate/up by output rows,
/// O and down by input columns, the norms whole.
pub fn shard_layer(
    config: &ModelConfig,
    layer: &LayerWeights<Matrix>,
    shard: &RankShard,
) -> LayerWeights<Matrix> {
    let (q_rows, kv_rows) = (
        shard.q_rows(config.head_dim),
        shard.kv_rows(config.head_dim),
    );
    LayerWeights {
        attn_norm: layer.attn_norm.clone(),
        q: matrix_rows(&layer.q, q_rows.clone()),
        k: matrix_rows(&layer.k, kv_rows.clone()),
        v: matrix_rows(&layer.v, kv_rows.clone()),
        qkv_bias: layer.qkv_bias.as_ref().map(|[q, k, v]| {
            [
                q[q_rows.clone()].to_vec(),
                k[kv_rows.clone()].to_vec(),
                v[kv_rows.clone()].to_vec(),
            ]
        }),
        o: matrix_columns(&layer.o, q_rows),
        ffn_norm: layer.ffn_norm.clone(),
        gate: matrix_rows(&layer.gate, shard.ffn.clone()),
        up: matrix_rows(&layer.up, shard.ffn.clone()),
        down: matrix_columns(&layer.down, shard.ffn.clone()),
        // Per-head (QK) and per-hidden (post) norms: every rank needs them whole.
        extra_norms: layer.extra_norms.clone(),
    }
}

/// Rank `shard`'s slice of every weight: its layers' slices and its vocabulary rows of the
/// embedding and (untied) output head.
pub fn shard_weights(
    config: &ModelConfig,
    weights: &ModelWeights<Matrix>,
    shard: &RankShard,
) -> ModelWeights<Matrix> {
    ModelWeights {
        embedding: matrix_rows(&weights.embedding, shard.vocab.clone()),
        layers: weights
            .layers
            .iter()
            .map(|layer| shard_layer(config, layer, shard))
            .collect(),
        output_norm: weights.output_norm.clone(),
        output: weights
            .output
            .as_ref()
            .map(|output| matrix_rows(output, shard.vocab.clone())),
    }
}

/// The model split over `N` in-process ranks.
pub struct TensorParallelCpu {
    pub plan: ShardPlan,
    ranks: Vec<CpuModel>,
}

/// One sequence's caches, one per rank, moving in step.
#[derive(Clone, Debug)]
pub struct TensorParallelCpuCache {
    ranks: Vec<CpuCache>,
}

impl TensorParallelCpuCache {
    /// Rank `rank`'s cache (its KV heads; in ShadowKV mode its shadows).
    pub fn rank(&self, rank: usize) -> &CpuCache {
        &self.ranks[rank]
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.ranks[0].len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl TensorParallelCpu {
    /// Splits `weights` (of shape `config`) over `ranks` ranks; an error when `ranks` does not
    /// divide the KV heads, heads or MLP width.
    pub fn split(
        config: &ModelConfig,
        weights: &ModelWeights<Matrix>,
        ranks: usize,
    ) -> Result<TensorParallelCpu> {
        let plan = ShardPlan::new(config, ranks)?;
        let rank_config = plan.rank_config();
        let ranks = plan
            .shards()
            .iter()
            .map(|shard| {
                CpuModel::shard(
                    rank_config.clone(),
                    shard_weights(config, weights, shard),
                    shard.vocab.clone(),
                )
            })
            .collect();
        Ok(TensorParallelCpu { plan, ranks })
    }

    /// Caches with full attention.
    pub fn cache(&self) -> TensorParallelCpuCache {
        TensorParallelCpuCache {
            ranks: self
                .ranks
                .iter()
                .map(|m| CpuCache::new(&m.config))
                .collect(),
        }
    }

    /// Caches in ShadowKV mode: each rank factorises its own KV heads' keys to `params.rank`.
    pub fn shadowkv_cache(&self, params: ShadowKvParams) -> Result<TensorParallelCpuCache> {
        let ranks = self
            .ranks
            .iter()
            .map(|m| {
                shadowkv::validate(&params, &m.config)?;
                CpuCache::shadowkv(&m.config, params)
            })
            .collect::<Result<_>>()?;
        Ok(TensorParallelCpuCache { ranks })
    }

    /// [`CpuModel::forward`] over the ranks: the last token's logits over the whole
    /// vocabulary (the ranks' slices gathered in rank order).
    pub fn forward(&self, cache: &mut TensorParallelCpuCache, tokens: &[u32]) -> Result<Vec<f32>> {
        forward_shards(&self.ranks, &mut cache.ranks, tokens)
    }

    /// [`CpuModel::prefill_piece`] over the ranks.
    pub fn prefill_piece(
        &self,
        cache: &mut TensorParallelCpuCache,
        tokens: &[u32],
    ) -> Result<Vec<f32>> {
        prefill_piece_shards(&self.ranks, &mut cache.ranks, tokens)
    }

    /// [`CpuModel::finish_prompt`] over the ranks: each builds its own KV heads' shadows.
    pub fn finish_prompt(&self, cache: &mut TensorParallelCpuCache) -> Result<()> {
        finish_prompt_shards(&self.ranks, &mut cache.ranks)
    }
}
