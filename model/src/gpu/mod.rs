//! The model on the GPU: bf16 weights, cuBLAS GEMMs, the `layer` kernels around them and
//! causal attention over a full KV cache, for a ragged batch of sequences.
//!
//! Every forward pass places its tokens in their sequences ([`TokenPlacement`]), appends their
//! keys and values to the cache and attends causally: a pass with one token per sequence (a
//! decode step) through the decode-attention kernel, split over the context; a pass with
//! prompts (several tokens of a sequence, side by side) through the tiled tensor-core prefill
//! kernel (or, [`GpuModel::set_tiled_prefill`], the decode kernel with one row per token).
//!
//! With ShadowKV ([`GpuShadowCache`]), a prompt prefills as above into a full cache that lives
//! only for the prefill, whose passes also keep each layer's keys before RoPE and its last
//! query; each layer's shadow (`ShadowKvCache::prefill_layer`) is then built from them. A
//! decode step rotates the new token's key into a one-row staging block per sequence,
//! appends it to the shadow cache and runs ShadowKV's sparse step (`decode_layer`).
//!
//! The files, by concern: `weights` (the weights on the GPU), `model` ([`GpuModel`] and its
//! loaders), `kv_cache` (the full KV cache), `shadow_cache` and `shadow` (ShadowKV's cache,
//! its prefills and decode steps), `forward` (the layers of a pass and their attention),
//! `step_inputs` and `decode_runner` (decode steps with per-step inputs in device memory,
//! captured per batch shape in CUDA graphs and replayed: [`DecodeRunner`]).
//!
//! [`TokenPlacement`]: shadowkv::kernels::layer::kernel_layout::TokenPlacement
mod decode_runner;
mod forward;
mod kv_cache;
mod model;
mod shadow;
mod shadow_cache;
pub mod step_inputs;
mod weights;

pub use decode_runner::{DecodeRunner, StepMode, StepTiming};
pub use kv_cache::GpuKvCache;
pub use model::GpuModel;
pub use shadow::SyntheticLayerSeeds;
pub use shadow_cache::GpuShadowCache;

/// A number no other cache of this process has: what a captured decode step is keyed by
/// (its launches hold the addresses of one cache's buffers).
pub(crate) fn next_cache_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
