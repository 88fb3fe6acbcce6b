//! Command-line arguments shared by `shadowkv generate` and `shadowkv bench`: the attention
//! mode and ShadowKV's parameters, the host value format among them.
use clap::{Args, ValueEnum};
use shadowkv::cache::{
    tier_chunks_for, CacheCapacity, CacheShape, ValueFormat, ValueHome, ValueStorage,
};
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

/// How ShadowKV stores the values (`--value-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ValueFormatArg {
    /// bf16 as computed (2 bytes a value).
    Bf16,
    /// fp8 e4m3 with one scale per chunk and KV head (about 1 byte a value).
    Fp8,
    /// int4 with an f16 minimum and step per token and 64 channels (about 0.56 bytes a value).
    Int4,
}

impl From<ValueFormatArg> for ValueFormat {
    fn from(format: ValueFormatArg) -> ValueFormat {
        match format {
            ValueFormatArg::Bf16 => ValueFormat::Bf16,
            ValueFormatArg::Fp8 => ValueFormat::Fp8,
            ValueFormatArg::Int4 => ValueFormat::Int4,
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
    /// ShadowKV: how the values are stored (quantised when offloaded, dequantised by the
    /// fetch into bf16 slots, so PCIe and memory carry 2x (fp8) or 3.6x (int4) fewer bytes).
    /// Default bf16; `plan` without it shows every format.
    #[arg(long, value_enum)]
    value_format: Option<ValueFormatArg>,
    /// ShadowKV with the values on the host: a GPU value tier of this many GiB (all layers
    /// and sequences together) holds chunks in the value format, so a miss found there is
    /// copied over HBM instead of PCIe (the chunks fetched last per entry stay).
    #[arg(long)]
    value_tier_gib: Option<f64>,
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

    /// The value format asked for (bf16 when none was).
    pub fn value_format(&self) -> ValueFormat {
        self.value_format
            .map_or(ValueFormat::Bf16, ValueFormat::from)
    }

    /// The formats `plan` shows: the one asked for, or every one.
    pub fn value_formats(&self) -> Vec<ValueFormat> {
        match self.value_format {
            Some(format) => vec![format.into()],
            None => ValueFormat::ALL.to_vec(),
        }
    }

    /// The values at `home` in the format asked for.
    pub fn storage(&self, home: ValueHome) -> ValueStorage {
        home.with_format(self.value_format())
    }
}

impl ShadowKvArgs {
    /// GPU bytes of the value tier asked for (`--value-tier-gib`), if any: an error for a size
    /// that is not positive.
    pub fn value_tier_bytes(&self) -> Result<Option<u64>, String> {
        match self.value_tier_gib {
            None => Ok(None),
            Some(g) if g.is_finite() && g > 0.0 => Ok(Some((g * (1u64 << 30) as f64) as u64)),
            Some(g) => Err(format!(
                "--value-tier-gib is {g}: a positive size in GiB (or leave it out for no tier)"
            )),
        }
    }

    /// The values at `home` in the format asked for, with the value tier asked for sized for
    /// a cache of `shape` and `capacity`: `ValueHome::Tiered` when `home` is the host. An
    /// error for a tier with the values on the GPU, or one too small for a chunk per head.
    pub fn storage_for(
        &self,
        home: ValueHome,
        shape: &CacheShape,
        capacity: &CacheCapacity,
    ) -> Result<ValueStorage, Box<dyn std::error::Error>> {
        let storage = self.storage(home);
        let Some(bytes) = self.value_tier_bytes()? else {
            return Ok(storage);
        };
        if home != ValueHome::Host {
            return Err(
                "--value-tier-gib needs the values on the host (--attention shadowkv): \
                        on the GPU they are all there already"
                    .into(),
            );
        }
        let chunks_per_head = tier_chunks_for(shape, &self.params(), storage, capacity, bytes)?;
        Ok(ValueHome::Tiered { chunks_per_head }.with_format(self.value_format()))
    }
}
