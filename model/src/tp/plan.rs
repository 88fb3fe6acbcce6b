//! The sharding arithmetic of tensor parallelism over `N` ranks: which query heads, KV heads,
//! MLP columns and vocabulary rows each rank owns, and the per-rank shape that lets the
//! single-device per-layer code run on a shard.
//!
//! Attention splits by KV head (each rank keeps whole GQA groups, so its queries only read its
//! own keys and values), the MLP by columns of gate/up (rows of down), and the vocabulary into
//! contiguous row ranges (the last ranges one row shorter when `N` does not divide it).
use std::ops::Range;

use crate::config::ModelConfig;

/// Why a model cannot be split over the ranks asked for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TensorParallelError {
    /// Zero ranks.
    #[error("tensor parallelism over 0 GPUs: at least 1 is needed")]
    NoRanks,
    /// A count of the shape that the ranks do not divide.
    #[error(
        "{count} {what} cannot be split evenly over {ranks} GPUs; the GPU count must divide \
         them (it may be one of {divisors:?})"
    )]
    Indivisible {
        /// What is split ("KV heads", "heads", "MLP columns").
        what: &'static str,
        /// How many there are.
        count: usize,
        /// The GPUs asked for.
        ranks: usize,
        /// The GPU counts that divide every split count of the shape.
        divisors: Vec<usize>,
    },
    /// Fewer GPUs on the host than ranks asked for.
    #[error("{ranks} GPUs asked for, {present} present")]
    FewerGpus {
        /// The GPUs asked for.
        ranks: usize,
        /// The GPUs the driver reports.
        present: usize,
    },
    /// NCCL could not be loaded or used.
    #[error("NCCL {what}: {reason}")]
    Nccl {
        /// What was being done ("loading libnccl", "all-reduce").
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// A rank's thread ended without a result (it panicked).
    #[error("rank {rank}'s thread ended without a result")]
    RankLost {
        /// The rank.
        rank: usize,
    },
}

/// What one rank owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankShard {
    /// The rank, `0..ranks`.
    pub rank: usize,
    /// Its query heads.
    pub heads: Range<usize>,
    /// Its KV heads (the query heads of these GQA groups are `heads`).
    pub kv_heads: Range<usize>,
    /// Its columns of gate/up (rows of down).
    pub ffn: Range<usize>,
    /// Its rows of the embedding and the output head.
    pub vocab: Range<usize>,
}

impl RankShard {
    /// Its rows of the Q projection (columns of O): `heads * head_dim`.
    pub fn q_rows(&self, head_dim: usize) -> Range<usize> {
        self.heads.start * head_dim..self.heads.end * head_dim
    }

    /// Its rows of the K and V projections: `kv_heads * head_dim`.
    pub fn kv_rows(&self, head_dim: usize) -> Range<usize> {
        self.kv_heads.start * head_dim..self.kv_heads.end * head_dim
    }
}

/// A model split over `ranks` ranks.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardPlan {
    /// The whole model's shape.
    pub config: ModelConfig,
    /// How many ranks.
    pub ranks: usize,
}

impl ShardPlan {
    /// Checks that `ranks` divides the KV heads (hence the heads, whole GQA groups) and the
    /// MLP width.
    pub fn new(config: &ModelConfig, ranks: usize) -> Result<ShardPlan, TensorParallelError> {
        if ranks == 0 {
            return Err(TensorParallelError::NoRanks);
        }
        let divisors = divisors(config);
        for (what, count) in [
            ("KV heads", config.kv_heads),
            ("heads", config.heads),
            ("MLP columns", config.ffn),
        ] {
            if !count.is_multiple_of(ranks) {
                return Err(TensorParallelError::Indivisible {
                    what,
                    count,
                    ranks,
                    divisors,
                });
            }
        }
        Ok(ShardPlan {
            config: config.clone(),
            ranks,
        })
    }

    /// What rank `rank` owns (`rank < ranks`).
    pub fn shard(&self, rank: usize) -> RankShard {
        let config = &self.config;
        let even = |count: usize| {
            let per = count / self.ranks;
            rank * per..(rank + 1) * per
        };
        RankShard {
            rank,
            heads: even(config.heads),
            kv_heads: even(config.kv_heads),
            ffn: even(config.ffn),
            vocab: vocab_rows(config.vocab, self.ranks, rank),
        }
    }

    /// Every rank's shard, in rank order.
    pub fn shards(&self) -> Vec<RankShard> {
        (0..self.ranks).map(|rank| self.shard(rank)).collect()
    }

    /// The shape one rank's per-layer code runs: `heads / N`, `kv_heads / N`, `ffn / N`, the
    /// vocabulary of the whole model (a rank embeds any token and its output head's rows are
    /// given by [`RankShard::vocab`]); everything else as the model.
    pub fn rank_config(&self) -> ModelConfig {
        let config = &self.config;
        ModelConfig {
            heads: config.heads / self.ranks,
            kv_heads: config.kv_heads / self.ranks,
            ffn: config.ffn / self.ranks,
            ..config.clone()
        }
    }

    /// Parameters one GPU rank holds: its share of every layer's matrices, the norms and the
    /// embedding whole (its lookup is a gather, kept on every rank), and the largest
    /// vocabulary slice of the output head (the embedding's, when tied).
    pub fn rank_parameters(&self) -> usize {
        let config = &self.config;
        let rank = self.rank_config();
        let (q_dim, kv_dim) = (rank.q_dim(), rank.kv_dim());
        let attention = config.hidden * (q_dim + 2 * kv_dim) + q_dim * config.hidden;
        let mlp = 3 * config.hidden * rank.ffn;
        let layer = attention + mlp + 2 * config.hidden;
        let head_rows = vocab_rows(config.vocab, self.ranks, 0).len();
        let embedding = config.vocab * config.hidden;
        // One rank keeps a tied head as the embedding itself.
        let head = match (self.ranks, config.tied_embeddings) {
            (1, true) => 0,
            _ => head_rows * config.hidden,
        };
        config.layers * layer + embedding + head + config.hidden
    }
}

/// Rank `rank`'s rows of a `vocab`-row table split over `ranks`: contiguous, the first
/// `vocab % ranks` ranges one row longer.
pub fn vocab_rows(vocab: usize, ranks: usize, rank: usize) -> Range<usize> {
    let (per, extra) = (vocab / ranks, vocab % ranks);
    let start = rank * per + rank.min(extra);
    start..start + per + usize::from(rank < extra)
}

/// The GPU counts that split `config`'s KV heads, heads and MLP width evenly.
pub fn divisors(config: &ModelConfig) -> Vec<usize> {
    (1..=config.kv_heads)
        .filter(|n| {
            config.kv_heads.is_multiple_of(*n)
                && config.heads.is_multiple_of(*n)
                && config.ffn.is_multiple_of(*n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(name: &str) -> ModelConfig {
        ModelConfig::named(name).unwrap()
    }

    #[test]
    fn llama_3_70b_splits_over_8() {
        let plan = ShardPlan::new(&named("llama-3-70b"), 8).unwrap();
        let rank = plan.rank_config();
        assert_eq!((rank.heads, rank.kv_heads, rank.ffn), (8, 1, 3584));
        let shards = plan.shards();
        assert_eq!(shards[3].heads, 24..32);
        assert_eq!(shards[3].kv_heads, 3..4);
        assert_eq!(shards[3].q_rows(128), 3072..4096);
        assert_eq!(shards[7].ffn, 25088..28672);
        assert_eq!(shards[7].vocab, 112_224..128_256);
        // Every query head stays with its KV head.
        for shard in &shards {
            for head in shard.heads.clone() {
                assert!(shard.kv_heads.contains(&(head / plan.config.group())));
            }
        }
        // About 70.6e9 parameters in all; each rank holds an eighth of every layer matrix and
        // of the output head, and a whole copy of the norms and the embedding.
        let whole = plan.config.parameters();
        assert!((70_000_000_000..71_000_000_000).contains(&whole), "{whole}");
        let norms = 80 * 2 * 8192 + 8192;
        let embedding = 128_256 * 8192;
        assert_eq!(plan.rank_parameters() * 8, whole + 7 * (norms + embedding));
        for name in ["llama-3-8b", "smollm2-135m"] {
            let config = named(name);
            let one = ShardPlan::new(&config, 1).unwrap();
            assert_eq!(one.rank_parameters(), config.parameters(), "{name}");
        }
    }

    #[test]
    fn vocabulary_ranges_cover_every_row_once() {
        for (vocab, ranks) in [(49_152, 3), (128_256, 8), (97, 4), (5, 8)] {
            let ranges: Vec<_> = (0..ranks).map(|r| vocab_rows(vocab, ranks, r)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[ranks - 1].end, vocab);
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert!(pair[0].len() >= pair[1].len());
                assert!(pair[0].len() - pair[1].len() <= 1);
            }
        }
    }

    #[test]
    fn counts_the_ranks_do_not_divide_are_errors() {
        let smollm = named("smollm2-135m");
        assert_eq!(
            ShardPlan::new(&smollm, 0),
            Err(TensorParallelError::NoRanks)
        );
        let error = ShardPlan::new(&smollm, 2).unwrap_err();
        assert_eq!(
            error,
            TensorParallelError::Indivisible {
                what: "KV heads",
                count: 3,
                ranks: 2,
                divisors: vec![1, 3],
            }
        );
        assert!(error.to_string().contains("3 KV heads"), "{error}");
        let plan = ShardPlan::new(&smollm, 3).unwrap();
        assert_eq!(plan.rank_config().heads, 3);
        assert_eq!(plan.shard(2).vocab, 32_768..49_152);
        assert!(matches!(
            ShardPlan::new(&named("llama-3-8b"), 16),
            Err(TensorParallelError::Indivisible {
                what: "KV heads",
                ..
            })
        ));
        // Heads divide by 8 and 4 but this MLP width does not divide by 8.
        let odd_ffn = ModelConfig {
            ffn: 1540,
            ..named("llama-3-8b")
        };
        assert!(matches!(
            ShardPlan::new(&odd_ffn, 8),
            Err(TensorParallelError::Indivisible {
                what: "MLP columns",
                ..
            })
        ));
        assert_eq!(divisors(&odd_ffn), vec![1, 2, 4]);
    }
}
