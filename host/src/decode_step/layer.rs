//! The state a decode step reads and writes: a layer's ShadowKV buffers for a batch
//! ([`ShadowLayer`]) and the step's scratch ([`StepWorkspace`]).
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;

use crate::error::Result;
use crate::gpu::Gpu;
use crate::kernels::fetch::LayerValues;
use crate::kernels::scoring;
use crate::kernels::shadow::{Miss, ShadowBatch};
use crate::kernels::tier::ValueTier;
use crate::pinned::PinnedBuffer;
use crate::step_stats::MissSource;

/// The ShadowKV state of one layer for a batch (layouts in `shadowkv_kernels::shadow`).
pub struct ShadowLayer {
    /// The config and each sequence's layout
    /// ([`ShadowSequence`](crate::kernels::shadow::ShadowSequence)): where every sequence lies
    /// in the buffers below.
    pub batch: ShadowBatch,
    /// bf16 landmarks (mean post-RoPE key of each non-outlier, non-local chunk).
    pub landmarks: CudaSlice<bf16>,
    /// The chunk id of each landmark.
    pub chunk_ids: CudaSlice<u32>,
    /// bf16 `A` (`[prompt_len, r]` per sequence) and `Bm` (`[r, Hkv*d]` per sequence).
    pub a: CudaSlice<bf16>,
    /// bf16 `Bm` (`[r, Hkv*d]` per sequence, from its `bm_offset`): with [`a`](Self::a), the
    /// rank-`r` factors of the pre-RoPE keys that the rebuild multiplies out for each miss.
    pub bm: CudaSlice<bf16>,
    /// The GPU K/V blocks: local window, outliers, sparse slots, generated tokens.
    pub k: CudaSlice<bf16>,
    /// bf16 values, laid out as [`k`](Self::k); the fetch copies each miss's values into its
    /// sparse slot.
    pub v: CudaSlice<bf16>,
    /// Every prompt value of the layer (bf16 `[Hkv, prompt_len, d]` per sequence, from its
    /// `host_value_offset`), in pinned host or device memory: what the fetch copies misses from.
    pub values: LayerValues,
    /// The GPU value tier of the layer (`ValueHome::Tiered`), if any: the fetch looks each
    /// miss up there first and keeps chunks fetched over PCIe in it.
    pub tier: Option<ValueTier>,
    /// `[rows, Hkv, budget_chunks]` chunk id held by each slot ([`EMPTY_SLOT`](crate::kernels::shadow::EMPTY_SLOT) if none), each sequence's at its `resident_row`.
    pub resident: CudaSlice<u32>,
}

/// The scratch of a step: what each kernel writes for the next one. [`DecodeStep`](super::DecodeStep) keeps one,
/// sized for the largest batch seen so far; the per-kernel launchers take its buffers too.
pub struct StepWorkspace {
    /// f32 base-2 logits of the scoring, `G` per landmark row
    /// ([`logits_len`](crate::kernels::scoring::logits_len)).
    pub logits: CudaSlice<f32>,
    /// f32 softmax statistics of the scoring: (max, sum) per tile, query head and sequence
    /// ([`tile_stats_len`](crate::kernels::scoring::tile_stats_len)).
    pub tile_stats: CudaSlice<f32>,
    /// f32 score of each landmark row (the max over the group of its softmax weight), written by
    /// the top-k.
    pub scores: CudaSlice<f32>,
    /// `[batch, Hkv, budget_chunks]` chunk ids the top-k selected, in landmark order.
    pub selection: CudaSlice<u32>,
    /// `[batch, Hkv, budget_chunks]` miss list written by the plan: for each (sequence, KV head),
    /// its first [`miss_counts`](Self::miss_counts) entries name a chunk to fetch and rebuild and
    /// the slot it goes to.
    pub misses: CudaSlice<Miss>,
    /// `[batch, Hkv]` misses of each (sequence, KV head), written by the plan.
    pub miss_counts: CudaSlice<u32>,
    /// `[batch, Hkv, budget_chunks]`: 1 for a slot filled this step (written by the plan).
    pub fresh: CudaSlice<u32>,
    /// Mapped host copy of the miss counts (written by the plan).
    pub host_miss_counts: PinnedBuffer<u32>,
    /// `[batch, Hkv, budget_chunks]` in mapped host memory: what the tiered fetch did with
    /// each miss (`tier::kernel_layout::OUTCOME_*`; the first `miss_counts` of each head).
    pub host_tier_outcomes: PinnedBuffer<u32>,
}

impl StepWorkspace {
    /// Allocates the scratch for `batch` on `stream` (uninitialised, but for the miss list and
    /// counts, which start zeroed) and the mapped host counts on `gpu`. Errors if an allocation
    /// fails.
    pub fn new(gpu: &Gpu, stream: &Arc<CudaStream>, batch: &ShadowBatch) -> Result<Self> {
        let heads = batch.batch() * batch.config().kv_heads;
        // SAFETY (all four): scratch that each kernel writes before the next one reads it.
        unsafe {
            Ok(StepWorkspace {
                logits: stream.alloc(scoring::logits_len(batch).max(1))?,
                tile_stats: stream.alloc(scoring::tile_stats_len(batch).max(1))?,
                scores: stream.alloc(batch.extents().landmark_rows.max(1))?,
                selection: stream.alloc(batch.slot_entries())?,
                misses: stream.alloc_zeros(batch.slot_entries())?,
                miss_counts: stream.alloc_zeros(heads)?,
                fresh: stream.alloc(batch.slot_entries())?,
                host_miss_counts: PinnedBuffer::new(gpu, heads)?,
                host_tier_outcomes: PinnedBuffer::new(gpu, batch.slot_entries())?,
            })
        }
    }

    /// Whether every buffer reaches what `batch` needs.
    pub fn fits(&self, batch: &ShadowBatch) -> bool {
        self.logits.len() >= scoring::logits_len(batch)
            && self.tile_stats.len() >= scoring::tile_stats_len(batch)
            && self.scores.len() >= batch.extents().landmark_rows
            && self.selection.len() >= batch.slot_entries()
            && self.fresh.len() >= batch.slot_entries()
            && self.miss_counts.len() >= batch.heads()
            && self.host_tier_outcomes.len() >= batch.slot_entries()
    }
}

impl MissSource {
    pub(super) fn of(layer: &ShadowLayer) -> Self {
        match (&layer.tier, layer.values.on_host()) {
            (Some(_), _) => MissSource::Tiered,
            (None, true) => MissSource::Host,
            (None, false) => MissSource::Device,
        }
    }
}
