//! Model files for the ShadowKV model driver (issue 5): GGUF reading and dequantisation to
//! f32/bf16 on the CPU. Every failure names the file, the tensor where there is one, and why.
pub mod gguf;
pub mod quant;

pub use gguf::{GgufFile, MetadataValue, TensorInfo};
pub use quant::GgmlType;

/// A model file that cannot be used, with where and why.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{file}{}: {reason}", tensor.as_ref().map(|t| format!(", tensor `{t}`")).unwrap_or_default())]
pub struct ModelFileError {
    pub file: String,
    pub tensor: Option<String>,
    pub reason: String,
}

pub type Result<T> = std::result::Result<T, ModelFileError>;
