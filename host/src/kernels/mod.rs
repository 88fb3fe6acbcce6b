//! The kernel families, one module each, named as in `shadowkv_kernels` (the device side) and
//! [`crate::reference`] (the CPU references). Each has a typed launcher: its plan is checked
//! on the CPU against the buffers, then its run enqueues on the stream it is given. An engine
//! that composes its own step uses these; [`crate::cache::ShadowKvCache`] composes them for the
//! common loop.
pub mod attention;
pub mod factorise;
pub mod fetch;
pub mod layer;
pub mod plan;
pub mod prefill_attention;
pub mod random;
pub mod rebuild;
pub mod sampling;
pub mod scoring;
pub mod scripted_selection;
pub mod shadow;
pub mod shadow_prefill;
pub mod tier;
pub mod topk;
pub mod values;
