//! ShadowKV long-context decode kernels for Rust LLM engines.
//!
//! The kernels are written in Rust (`kernels-gpu`), compiled to PTX by rustc's nvptx64
//! backend at build time and loaded through `cudarc`, so building needs no CUDA toolkit.
//! Every kernel family has a typed launcher here (plan, then run) and a CPU reference in
//! [`reference`].
pub mod cache;
pub mod decode_step;
pub mod error;
pub mod gpu;
pub mod kernels;
pub mod linear;
pub mod pinned;
pub mod ptx;
pub mod reference;

pub use decode_step::{
    DecodeStep, Llama3Scaling, RopeConfig, ShadowLayer, StepStats, StepWorkspace,
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
pub use pinned::PinnedBuffer;

/// Re-exported so users name the same types the launchers take.
pub use cudarc;
pub use half;
