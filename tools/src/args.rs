//! Command-line arguments shared by `shadowkv generate` and `shadowkv bench`: the attention
//! mode and ShadowKV's parameters.
use clap::{Args, ValueEnum};
use shadowkv::cache::ValueHome;
use shadowkv_model::ShadowKvParams;

/// Where attention reads the KV cache from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AttentionMode {
    /// The whole KV cache on the GPU, every token attended.
    Full,
    /// ShadowKV: low-rank keys on the GPU, values in pinned host memory, sparse attention.
    Shadowkv,
    /// ShadowKV with the values kept on the GPU (no PCIe traffic).
    ShadowkvGpu,
}

impl AttentionMode {
    /// Where ShadowKV keeps the values; `None` for full attention.
    pub fn value_home(self) -> Option<ValueHome> {
        match self {
            AttentionMode::Full => None,
            AttentionMode::Shadowkv => Some(ValueHome::Host),
            AttentionMode::ShadowkvGpu => Some(ValueHome::Device),
        }
    }
}

/// ShadowKV's parameters on the command line (defaults: the paper's).
#[derive(Args, Debug, Clone)]
pub struct ShadowKvArgs {
    /// ShadowKV: tokens per chunk (c).
    #[arg(long, default_value_t = ShadowKvParams::default().chunk_size)]
    chunk_size: usize,
    /// ShadowKV: tokens of selected chunks attended per step (S), a multiple of --chunk-size.
    #[arg(long, default_value_t = ShadowKvParams::default().sparse_budget)]
    sparse_budget: usize,
    /// ShadowKV: rank of the pre-RoPE key factorisation (r), a multiple of 16 up to 256.
    #[arg(long, default_value_t = ShadowKvParams::default().rank)]
    rank: usize,
    /// ShadowKV: chunks at the end of the prompt kept exact.
    #[arg(long, default_value_t = ShadowKvParams::default().local_chunks)]
    local_chunks: usize,
    /// ShadowKV: outlier chunks per KV head kept exact.
    #[arg(long, default_value_t = ShadowKvParams::default().outlier_chunks)]
    outlier_chunks: usize,
}

impl ShadowKvArgs {
    /// The parameters as the cache takes them (checked later, against the model).
    pub fn params(&self) -> ShadowKvParams {
        ShadowKvParams {
            chunk_size: self.chunk_size,
            sparse_budget: self.sparse_budget,
            rank: self.rank,
            local_chunks: self.local_chunks,
            outlier_chunks: self.outlier_chunks,
        }
    }
}
