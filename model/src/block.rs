//! The parts of a decoder block that some families add to the Llama block: a scale on the
//! token embeddings, RMSNorm on each query and key head, norms on the attention and MLP
//! outputs before their residual adds, a GELU-gated MLP, a query scale of the family's own,
//! and sliding-window attention on some layers with a RoPE of their own (Gemma-3 has them all).
//! Also the Gemma-3 shape from its GGUF metadata and its Hugging Face `config.json`.
use shadowkv_kernels::rope::{RopeConfig, RopePairing};

use crate::config::{file_error, json_count, Architecture, ModelConfig};
use crate::error::ModelFileError;
use crate::gguf::GgufFile;
use crate::rope_metadata::{rope_from_gguf, rope_from_hf};

type Result<T, E = ModelFileError> = std::result::Result<T, E>;

/// The gate activation of the gated MLP, `act(gate x) * (up x)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Qwen2, GLM-4, Phi-3.
    Silu,
    /// GELU with the tanh approximation (GeGLU): Gemma.
    GeluTanh,
}

impl Activation {
    /// The activation of `x`.
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::GeluTanh => gelu_tanh(x),
        }
    }
}

/// GELU's tanh approximation, `x/2 (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`.
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// Sliding-window attention on the local layers: all layers but every `global_every`-th one
/// (layer `l` is global when `l % global_every == global_every - 1`, llama.cpp's and Hugging
/// Face's pattern for Gemma-3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlidingWindow {
    /// Keys a local layer's query attends to, its own included: positions `p - window + 1..=p`.
    pub window: usize,
    /// The period of the layer pattern (Gemma-3: 6, five local layers then a global one).
    pub global_every: usize,
    /// The local layers' RoPE (Gemma-3: base 10^4; the global layers use the model's).
    pub local_rope: RopeConfig,
}

impl SlidingWindow {
    /// Whether layer `layer` attends through the window.
    pub fn is_local(&self, layer: usize) -> bool {
        layer % self.global_every != self.global_every - 1
    }
}

/// The block's additions to the Llama block; [`BlockOptions::LLAMA`] has none.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockOptions {
    /// Token embeddings are multiplied by this (Gemma: `sqrt(hidden)`).
    pub embedding_scale: f32,
    /// Each query and key head is RMS-normed (weights `attn_q_norm`, `attn_k_norm`, one per
    /// head dimension) before RoPE.
    pub qk_norm: bool,
    /// The attention output and the MLP output are RMS-normed (`post_attention_norm`,
    /// `post_ffw_norm`) before they are added to the residual.
    pub post_norms: bool,
    pub activation: Activation,
    /// Queries are multiplied by this after RoPE, so that attention's `1/sqrt(head_dim)` gives
    /// the family's own scale (Gemma-3: `sqrt(head_dim / query_pre_attn_scalar)`); 1 otherwise.
    pub query_scale: f32,
    pub sliding_window: Option<SlidingWindow>,
}

impl BlockOptions {
    /// The Llama block: nothing added.
    pub const LLAMA: BlockOptions = BlockOptions {
        embedding_scale: 1.0,
        qk_norm: false,
        post_norms: false,
        activation: Activation::Silu,
        query_scale: 1.0,
        sliding_window: None,
    };

    /// Gemma-3's block for a model of `hidden` width and heads of `head_dim`, attention scaled
    /// by `1/sqrt(query_pre_attn_scalar)`, with a `window` over five of every six layers whose
    /// RoPE has base `local_base`.
    pub fn gemma3(
        hidden: usize,
        head_dim: usize,
        query_pre_attn_scalar: f64,
        window: usize,
        global_every: usize,
        local_base: f64,
    ) -> BlockOptions {
        BlockOptions {
            embedding_scale: (hidden as f32).sqrt(),
            qk_norm: true,
            post_norms: true,
            activation: Activation::GeluTanh,
            query_scale: (head_dim as f64 / query_pre_attn_scalar).sqrt() as f32,
            sliding_window: Some(SlidingWindow {
                window,
                global_every,
                local_rope: RopeConfig::new(local_base),
            }),
        }
    }
}

impl Default for BlockOptions {
    fn default() -> Self {
        BlockOptions::LLAMA
    }
}

/// Gemma-3's period of local and global layers, when a file does not give it.
pub const GEMMA3_GLOBAL_EVERY: usize = 6;
/// Gemma-3's RoPE base on its local layers, when a file does not give it.
pub const GEMMA3_LOCAL_ROPE_BASE: f64 = 10_000.0;

/// The shape of a `gemma3` GGUF file. Its local layers' pattern and RoPE base are not in the
/// metadata (llama.cpp fixes them: every sixth layer global, base 10^4 on the others) unless
/// the file has `gemma3.attention.sliding_window_pattern`; the attention scale is
/// `1/sqrt(head_dim)` except on the 62-layer 27B model (`1/sqrt(hidden / heads)`).
pub fn gemma3_from_gguf(file: &GgufFile) -> Result<ModelConfig> {
    let fail = |reason: String| ModelFileError {
        file: file.name.clone(),
        tensor: None,
        reason,
    };
    let count = |name: &str| -> Result<usize> {
        file.metadata(&format!("gemma3.{name}"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| fail(format!("has no unsigned integer gemma3.{name}")))
    };
    let number = |name: &str| {
        file.metadata(&format!("gemma3.{name}"))
            .and_then(|v| v.as_f64())
    };
    if let Some(kind) = file
        .metadata("gemma3.rope.scaling.type")
        .and_then(|v| v.as_str())
    {
        let factor = number("rope.scaling.factor").unwrap_or(1.0);
        if kind != "none" && factor != 1.0 {
            return Err(fail(format!(
                "scales its RoPE (`{kind}`, factor {factor}); this driver runs Gemma-3 \
                 without RoPE scaling (the 270M and 1B models)"
            )));
        }
    }
    let hidden = count("embedding_length")?;
    let heads = count("attention.head_count")?;
    let layers = count("block_count")?;
    let head_dim = count("attention.key_length")?;
    let embedding = file
        .tensor("token_embd.weight")
        .ok_or_else(|| fail("has no tensor token_embd.weight".into()))?;
    let query_pre_attn_scalar = if layers == 62 {
        (hidden / heads.max(1)) as f64
    } else {
        head_dim as f64
    };
    let global_every = match file.metadata("gemma3.attention.sliding_window_pattern") {
        Some(_) => count("attention.sliding_window_pattern")?,
        None => GEMMA3_GLOBAL_EVERY,
    };
    let config = ModelConfig {
        architecture: Architecture::Gemma3,
        layers,
        hidden,
        heads,
        kv_heads: count("attention.head_count_kv").unwrap_or(heads),
        head_dim,
        ffn: count("feed_forward_length")?,
        vocab: embedding.dims.get(1).copied().unwrap_or(0) as usize,
        rms_eps: number("attention.layer_norm_rms_epsilon").unwrap_or(1e-6) as f32,
        rope: rope_from_gguf(file, "gemma3", head_dim, RopePairing::Halves)?,
        context_length: count("context_length").unwrap_or(32_768),
        tied_embeddings: file.tensor("output.weight").is_none(),
        block: BlockOptions::gemma3(
            hidden,
            head_dim,
            query_pre_attn_scalar,
            count("attention.sliding_window")?,
            global_every,
            GEMMA3_LOCAL_ROPE_BASE,
        ),
    };
    config.validated(&file.name)
}

/// The shape of a Hugging Face Gemma-3 text `config.json` (`model_type` `gemma3_text`):
/// `query_pre_attn_scalar`, `sliding_window`, `rope_local_base_freq`, and the local/global
/// pattern from `layer_types` or `sliding_window_pattern`. Softcapping and RoPE scaling,
/// which this driver does not compute, are refused by name.
pub fn gemma3_from_hf(file: &str, json: &serde_json::Value) -> Result<ModelConfig> {
    let fail = file_error(file);
    let count = |name: &str| json_count(file, json, name);
    let number = |name: &str| json.get(name).and_then(|v| v.as_f64());
    for name in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if json.get(name).is_some_and(|v| !v.is_null()) {
            return Err(fail(format!(
                "sets `{name}`; this driver runs Gemma-3 without softcapping"
            )));
        }
    }
    if let Some(activation) = json.get("hidden_activation").and_then(|v| v.as_str()) {
        if activation != "gelu_pytorch_tanh" {
            return Err(fail(format!(
                "has hidden_activation `{activation}`; Gemma-3 uses gelu_pytorch_tanh"
            )));
        }
    }
    let hidden = count("hidden_size")?;
    let heads = count("num_attention_heads")?;
    let head_dim = count("head_dim").unwrap_or(256);
    let layers = count("num_hidden_layers")?;
    let global_every = match json.get("layer_types").and_then(|v| v.as_array()) {
        Some(types) => layer_pattern(types).ok_or_else(|| {
            fail(
                "has `layer_types` that are not a repeating run of sliding_attention layers \
                 closed by one full_attention layer"
                    .into(),
            )
        })?,
        None => count("sliding_window_pattern").unwrap_or(GEMMA3_GLOBAL_EVERY),
    };
    let config = ModelConfig {
        architecture: Architecture::Gemma3,
        layers,
        hidden,
        heads,
        kv_heads: count("num_key_value_heads").unwrap_or(heads),
        head_dim,
        ffn: count("intermediate_size")?,
        vocab: count("vocab_size")?,
        rms_eps: number("rms_norm_eps").unwrap_or(1e-6) as f32,
        rope: RopeConfig {
            theta: number("rope_theta").unwrap_or(1_000_000.0),
            ..rope_from_hf(file, json, head_dim, RopePairing::Halves)?
        },
        context_length: count("max_position_embeddings").unwrap_or(32_768),
        tied_embeddings: json
            .get("tie_word_embeddings")
            .and_then(|v| v.as_bool())
            .unwrap_or(true),
        block: BlockOptions::gemma3(
            hidden,
            head_dim,
            number("query_pre_attn_scalar").unwrap_or(head_dim as f64),
            count("sliding_window").unwrap_or(512),
            global_every,
            number("rope_local_base_freq").unwrap_or(GEMMA3_LOCAL_ROPE_BASE),
        ),
    };
    config.validated(file)
}

/// The period of `layer_types` if it repeats `n - 1` sliding layers then one full layer.
fn layer_pattern(types: &[serde_json::Value]) -> Option<usize> {
    let period = types
        .iter()
        .position(|t| t.as_str() == Some("full_attention"))?
        + 1;
    types
        .iter()
        .enumerate()
        .all(|(layer, t)| {
            let expected = if layer % period == period - 1 {
                "full_attention"
            } else {
                "sliding_attention"
            };
            t.as_str() == Some(expected)
        })
        .then_some(period)
}
