//! The cache's configuration: the model's attention shape ([`CacheShape`]), ShadowKV's
//! parameters ([`ShadowKvParams`], the paper's defaults), what the cache is sized for
//! ([`CacheCapacity`]), where the values live ([`ValueHome`]) and in which format
//! ([`ValueFormat`]; the two together are a [`ValueStorage`]).
use shadowkv_kernels::shadow::{MAX_CHUNK_SIZE, MAX_RANK, RANK_STEP};
pub use shadowkv_kernels::values::ValueFormat;

use crate::decode_step::RopeConfig;
use crate::error::{invalid, Error, Result};

fn parameter_error(problem: String) -> Error {
    invalid("params", problem, "ShadowKV parameters the kernels support")
}

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

impl ShadowKvParams {
    /// Selected chunks per step (`S / c`).
    pub fn budget_chunks(&self) -> usize {
        self.sparse_budget / self.chunk_size.max(1)
    }

    /// Checks the parameters against the kernels' limits and the keys' width `kv_heads * head_dim`.
    pub fn validate(&self, kv_heads: usize, head_dim: usize) -> Result<()> {
        if !(1..=MAX_CHUNK_SIZE as usize).contains(&self.chunk_size) {
            return Err(parameter_error(format!(
                "chunk size {} is out of range: expected 1 to {MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        if self.sparse_budget == 0 || !self.sparse_budget.is_multiple_of(self.chunk_size) {
            return Err(parameter_error(format!(
                "sparse budget {} is not a positive multiple of the chunk size {}",
                self.sparse_budget, self.chunk_size
            )));
        }
        let step = RANK_STEP as usize;
        if self.rank == 0 || !self.rank.is_multiple_of(step) || self.rank > MAX_RANK as usize {
            return Err(parameter_error(format!(
                "rank {} is out of range: expected a multiple of {step} from {step} to {MAX_RANK}",
                self.rank
            )));
        }
        if self.rank > kv_heads * head_dim {
            return Err(parameter_error(format!(
                "rank {} exceeds the keys' width Hkv*d = {}",
                self.rank,
                kv_heads * head_dim
            )));
        }
        Ok(())
    }

    /// Whether a `prompt_len`-token prompt leaves at least the budget's chunks to select from.
    pub fn check_prompt(&self, prompt_len: usize) -> Result<()> {
        let chunks = self.prompt_chunks(prompt_len);
        let outliers = self.outlier_chunks.min(chunks);
        if chunks - outliers < self.budget_chunks() {
            return Err(parameter_error(format!(
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

impl ShadowKvParams {
    /// Outlier chunks per KV head of a `prompt_len`-token prompt.
    pub fn prompt_outliers(&self, prompt_len: usize) -> usize {
        self.outlier_chunks.min(self.prompt_chunks(prompt_len))
    }
}

/// The model's attention shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheShape {
    /// Layers of the model; each has its own ShadowKV buffers.
    pub layers: usize,
    /// Query heads per layer (`Hq`).
    pub q_heads: usize,
    /// KV heads per layer (`Hkv`).
    pub kv_heads: usize,
    /// Dimension of one head (`d`).
    pub head_dim: usize,
    /// The model's RoPE (keys are rebuilt before it and rotated at decode).
    pub rope: RopeConfig,
}

impl CacheShape {
    /// Llama-3-8B: 32 layers, 32/8 heads, d 128, theta 500000.
    pub const LLAMA_3_8B: CacheShape = CacheShape {
        layers: 32,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        rope: RopeConfig::LLAMA_3,
    };

    /// Width of the keys of one token: `Hkv * d`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Where the values live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueHome {
    /// Pinned, device-mapped host memory (ShadowKV's offload; misses come over PCIe).
    Host,
    /// GPU memory, when it fits (no PCIe traffic).
    Device,
    /// Pinned host memory, with a GPU value tier of `chunks_per_head` chunks per (sequence,
    /// KV head) and layer: a miss found in the tier is copied over HBM, one not found comes
    /// over PCIe and is kept there as the tier's policy says (`shadowkv_kernels::tier`).
    /// With `chunks_per_head` at the longest prompt's chunks the tier holds every value.
    /// [`tier_chunks_for`](crate::cache::tier_chunks_for)
    /// sizes it from bytes.
    Tiered {
        /// Chunks the tier holds per (sequence, KV head) and layer.
        chunks_per_head: usize,
    },
}

impl ValueHome {
    /// Whether the values themselves live in host memory (`Host` and `Tiered`).
    pub fn on_host(self) -> bool {
        !matches!(self, ValueHome::Device)
    }

    /// Chunks of the GPU value tier per (sequence, KV head) and layer: 0 without one.
    pub fn tier_chunks(self) -> usize {
        match self {
            ValueHome::Tiered { chunks_per_head } => chunks_per_head,
            _ => 0,
        }
    }

    /// The values here, stored in `format` (fp8 and int4 are quantised when offloaded and
    /// dequantised by the fetch, so PCIe carries 2x or 3.6x fewer bytes).
    pub fn with_format(self, format: ValueFormat) -> ValueStorage {
        ValueStorage { home: self, format }
    }
}

/// Where the values live and how they are stored. A [`ValueHome`] alone converts to one with
/// bf16 values, so `ShadowKvCache::new(.., ValueHome::Host, ..)` keeps them as computed and
/// `ValueHome::Host.with_format(ValueFormat::Fp8)` compresses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ValueStorage {
    /// Host or GPU memory.
    pub home: ValueHome,
    /// bf16, fp8 or int4.
    pub format: ValueFormat,
}

impl From<ValueHome> for ValueStorage {
    fn from(home: ValueHome) -> Self {
        home.with_format(ValueFormat::Bf16)
    }
}

impl ValueStorage {
    /// Bytes of one chunk of one KV head's values (scales included) for `chunk_size` and
    /// `head_dim`.
    pub fn chunk_bytes(&self, chunk_size: usize, head_dim: usize) -> usize {
        self.format.chunk_bytes(chunk_size, head_dim)
    }
}

/// What a cache is sized for; everything is allocated once for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheCapacity {
    /// Sequences decoded together.
    pub max_sequences: usize,
    /// The longest prompt.
    pub max_prompt_len: usize,
    /// Prompt tokens of all live sequences together.
    pub max_prompt_tokens: usize,
    /// Tokens each sequence may generate after its prompt.
    pub max_generated: usize,
}

impl CacheCapacity {
    /// `sequences` sequences of `prompt_len` tokens each, generating up to `max_generated`.
    pub fn uniform(sequences: usize, prompt_len: usize, max_generated: usize) -> Self {
        CacheCapacity {
            max_sequences: sequences,
            max_prompt_len: prompt_len,
            max_prompt_tokens: sequences.saturating_mul(prompt_len),
            max_generated,
        }
    }
}
