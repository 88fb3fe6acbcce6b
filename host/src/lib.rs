//! ShadowKV long-context decode kernels for Rust LLM engines.
//!
//! The kernels are written in Rust (`kernels-gpu`), compiled to PTX by rustc's nvptx64
//! backend at build time and loaded through `cudarc`, so building needs no CUDA toolkit.
//! Every kernel family has a typed launcher here (plan, then run) and a CPU reference in
//! [`reference`].
pub mod attention;
pub mod cache;
pub mod decode_step;
pub mod error;
pub mod factorise;
pub mod fetch;
pub mod gpu;
pub mod kernels;
pub mod layer;
pub mod linear;
pub mod pinned;
pub mod plan;
pub mod prefill_attention;
pub mod random;
pub mod rebuild;
pub mod reference;
pub mod sampling;
pub mod scoring;
pub mod shadow;
pub mod shadow_prefill;
pub mod topk;

pub use attention::{DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, SequenceLayout};
pub use decode_step::{
    DecodeStep, LayerValues, Llama3Scaling, RopeConfig, ShadowLayer, StepStats, StepWorkspace,
};
pub use error::{Error, Result};
pub use gpu::{gpu_available, probe, DeviceInfo, Gpu};
pub use pinned::PinnedBuffer;
pub use prefill_attention::{
    PrefillAttention, PrefillAttentionPlan, PrefillAttentionShape, QueryPlacement,
};
pub use shadow::{Miss, ShadowBatch, ShadowConfig, ShadowSequence, EMPTY_SLOT};

/// Re-exported so users name the same types the launchers take.
pub use cudarc;
pub use half;
