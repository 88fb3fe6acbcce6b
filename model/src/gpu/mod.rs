//! The model on the GPU: bf16 weights, cuBLAS GEMMs, the `layer` kernels around them and
//! causal attention over a full KV cache, for a ragged batch of sequences.
//!
//! Every forward pass places its tokens in their sequences ([`TokenPlacement`]), appends their
//! keys and values to the cache and attends causally: a pass with one token per sequence (a
//! decode step) through the decode-attention kernel, split over the context; a pass with
//! prompts (several tokens of a sequence, side by side) through the tiled tensor-core prefill
//! kernel (or, [`GpuModel::set_tiled_prefill`], the decode kernel with one row per token).
//!
//! With ShadowKV ([`GpuShadowCache`]), a prompt prefills layer by layer: the whole prompt
//! runs through one layer (in passes, its hidden states in one buffer) into a one-layer cache
//! whose passes also keep the layer's keys before RoPE and its last query, and that layer's
//! shadow (`ShadowKvCache::prefill_layer_start` / `_finish`) is built before the next layer
//! runs (`layer_prefill`; [`PrefillPeak`] measures the peak). A decode step rotates the new
//! token's key into a one-row staging block per sequence,
//! appends it to the shadow cache and runs ShadowKV's sparse step (`decode_layer`).
//!
//! [`GpuBackend`] serves many sequences at once (continuous batching, `crate::serve`): any
//! subset of the live sequences decodes in one step (`GpuModel::forward` over the full
//! cache, `GpuModel::decode_shadow_for` through the shadow cache) while others prefill.
//!
//! The files, by concern: `weights` (the weights on the GPU), `model` ([`GpuModel`] and its
//! loaders), `kv_cache` (the full KV cache), `shadow_cache` and `shadow` (ShadowKV's cache,
//! its prefills and decode steps), `layer_prefill` (the layer-wise prefill), `shadow_subset`
//! (ShadowKV steps of any subset of the sequences), `backend` ([`GpuBackend`]), `forward` (the
//! layers of a pass and their attention), `step_inputs` and `decode_runner` (decode steps with
//! per-step inputs in device memory, captured per batch shape in CUDA graphs and replayed:
//! [`DecodeRunner`]; `local_step` adds the sliding-window layers of a ShadowKV step).
//!
//! [`TokenPlacement`]: shadowkv::kernels::layer::kernel_layout::TokenPlacement
mod backend;
mod block_parts;
mod decode_runner;
mod forward;
mod kv_cache;
mod layer_prefill;
mod local_step;
mod model;
mod shadow;
mod shadow_cache;
mod shadow_subset;
mod shard;
pub mod step_inputs;
mod weights;

pub use backend::{GpuBackend, GpuServeCapacity};
pub use decode_runner::{DecodeRunner, StepMode, StepTiming};
pub use kv_cache::GpuKvCache;
pub use layer_prefill::PrefillPeak;
pub use model::{GpuModel, PartialSums};
pub use shadow::SyntheticLayerSeeds;
pub use shadow_cache::GpuShadowCache;

/// A number no other cache of this process has: what a captured decode step is keyed by
/// (its launches hold the addresses of one cache's buffers).
pub(crate) fn next_cache_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
