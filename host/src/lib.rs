//! ShadowKV long-context decode kernels for Rust LLM engines.
//!
//! The engine API is at the crate root: a [`Gpu`] (the crate's own context and stream, or
//! the engine's through [`Gpu::from_stream`] / [`Gpu::from_raw`]), and a [`ShadowKvCache`]
//! shaped by [`CacheShape`] and [`ShadowKvParams`] and sized by [`CacheCapacity`], into which
//! sequences ([`SequenceId`]) are added, prefilled layer by layer and decoded with
//! [`ShadowKvCache::attend`]. Engine buffers the crate did not allocate come in as
//! [`DeviceView`]s. Every failure is an [`Error`] that says what went wrong and what was
//! needed.
//!
//! The kernels are written in Rust (`kernels-gpu`), compiled to PTX by rustc's nvptx64
//! backend at build time and loaded through `cudarc`, so building needs no CUDA toolkit.
//! Every kernel family has a typed launcher under [`kernels`] (plan, then run), for engines
//! that compose their own step, and a CPU reference under [`reference`](mod@reference).
//!
//! The README follows; its examples are compiled as doctests.
#![doc = include_str!("../../README.md")]
#![deny(missing_docs)]

pub mod cache;
pub mod decode_step;
pub mod error;
pub mod gpu;
pub mod kernels;
pub mod linear;
pub mod measure;
pub mod pinned;
pub mod ptx;
pub mod reference;
pub mod step_stats;
pub mod view;

pub use cache::{
    CacheCapacity, CacheShape, MemoryReport, SequenceId, ShadowKvCache, ShadowKvParams,
    ValueFormat, ValueHome, ValueStorage,
};
pub use decode_step::{
    DecodeStep, Llama3Scaling, LongRope, RopeConfig, RopeFactors, RopePairing, RotaryLayout,
    ShadowLayer, StepStats, StepWorkspace,
};
pub use error::{Error, Result};
pub use gpu::{gpu_available, probe, DeviceInfo, Gpu};
pub use kernels::attention::{
    DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, SequenceLayout,
};
pub use kernels::fetch::LayerValues;
pub use kernels::prefill_attention::{
    PrefillAttention, PrefillAttentionPlan, PrefillAttentionShape, QueryPlacement,
};
pub use kernels::shadow::{Miss, ShadowBatch, ShadowConfig, ShadowSequence, EMPTY_SLOT};
pub use kernels::shadow_prefill::PrefillSource;
pub use pinned::PinnedBuffer;
pub use ptx::PtxTarget;
pub use view::{DeviceView, DeviceViewMut};

/// Re-exported so users name the same types the launchers take.
pub use cudarc;
pub use half;
