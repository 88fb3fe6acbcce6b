//! A Llama-family model's shape: from a GGUF file's metadata, a Hugging Face `config.json`, or
//! a named shape (for synthetic models). Every count is checked, so the loaders and kernels can
//! rely on `heads = G * kv_heads`, an even `head_dim` and a positive size everywhere.
use std::path::Path;

use shadowkv_kernels::rope::{
    inverse_frequencies, Llama3Scaling, RopeConfig, RopePairing, RotaryLayout,
};

use crate::error::ModelFileError;
use crate::gguf::GgufFile;
use crate::rope_metadata::{rope_from_gguf, rope_from_hf};

/// Reading a model file fails only with a problem of the file.
type Result<T, E = ModelFileError> = std::result::Result<T, E>;

/// The decoder variants this driver runs. They differ only in details of the same block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM, Yi, Mistral: no projection biases.
    Llama,
    /// Qwen2: biases on the Q, K and V projections.
    Qwen2,
}

impl Architecture {
    /// Whether the Q, K and V projections carry a bias.
    pub fn qkv_bias(self) -> bool {
        self == Architecture::Qwen2
    }
}

/// The shape and constants of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Width of the SwiGLU MLP.
    pub ffn: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    /// The RoPE: its base, the rotated part of each head and its pairing, and the frequency
    /// adjustments (Llama-3 scaling; the per-frequency factors of a Llama-3.1 GGUF file's
    /// `rope_freqs.weight`, which carries the scaling as a tensor; LongRoPE).
    pub rope: RopeConfig,
    /// Longest context the model was trained for.
    pub context_length: usize,
    /// The output head is the token embedding (no `output.weight`).
    pub tied_embeddings: bool,
}

/// Most parameters a valid shape has (2^48, far above any real model), so that sizes derived
/// from a shape (`parameters() * bytes`, `q_dim() * tokens`) do not overflow.
pub const MAX_PARAMETERS: usize = 1 << 48;

/// The named shapes a synthetic model can take.
pub const NAMED_SHAPES: [&str; 5] = [
    "llama-3-8b",
    "llama-3.1-8b",
    "yi-9b",
    "qwen2-7b",
    "smollm2-135m",
];

impl ModelConfig {
    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The `rotary_dim / 2` RoPE inverse frequencies, with Llama-3 scaling, the file's
    /// per-frequency factors and LongRoPE's factors applied (the table every path uploads).
    pub fn inverse_frequencies(&self) -> Vec<f64> {
        inverse_frequencies(&self.rope, self.head_dim as u32)
    }

    /// This config for a run sized for `context` tokens: LongRoPE then uses its short factors
    /// if `context` fits the original context length and its long factors past it (a run's
    /// keys all use one set, so that ShadowKV's rebuilt keys match the forward pass's).
    pub fn sized_for_context(mut self, context: usize) -> ModelConfig {
        if let Some(long_rope) = &mut self.rope.long_rope {
            long_rope.context_length = context as f64;
        }
        self
    }

    /// The rotation's layout for the kernels (rotated part, pairing, attention factor).
    pub fn rotary_layout(&self) -> RotaryLayout {
        self.rope.layout(self.head_dim as u32)
    }

    /// Parameters of the model (embedding and output head counted once if tied); `usize::MAX`
    /// if the count overflows (a validated config has at most [`MAX_PARAMETERS`]).
    pub fn parameters(&self) -> usize {
        self.checked_parameters().unwrap_or(usize::MAX)
    }

    /// [`ModelConfig::parameters`], or `None` if the count overflows `usize`.
    fn checked_parameters(&self) -> Option<usize> {
        let mul = |a: usize, b: usize| a.checked_mul(b);
        let add = |a: usize, b: usize| a.checked_add(b);
        let q_dim = mul(self.heads, self.head_dim)?;
        let kv_dim = mul(self.kv_heads, self.head_dim)?;
        let attention = add(
            mul(self.hidden, add(q_dim, mul(2, kv_dim)?)?)?,
            mul(q_dim, self.hidden)?,
        )?;
        let mlp = mul(mul(3, self.hidden)?, self.ffn)?;
        let layer = add(add(attention, mlp)?, mul(2, self.hidden)?)?;
        let embedding = mul(self.vocab, self.hidden)?;
        let head = if self.tied_embeddings { 0 } else { embedding };
        add(
            add(add(mul(self.layers, layer)?, embedding)?, head)?,
            self.hidden,
        )
    }

    /// One of [`NAMED_SHAPES`], for synthetic models with random weights.
    pub fn named(name: &str) -> Result<ModelConfig> {
        let llama_3 = ModelConfig {
            architecture: Architecture::Llama,
            layers: 32,
            hidden: 4096,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            ffn: 14336,
            vocab: 128_256,
            rms_eps: 1e-5,
            rope: RopeConfig::LLAMA_3,
            context_length: 8192,
            tied_embeddings: false,
        };
        let config = match name {
            "llama-3-8b" => llama_3,
            // Llama-3.1's scaling as its GGUF files carry it: a rope_freqs factor table.
            "llama-3.1-8b" => ModelConfig {
                rope: RopeConfig {
                    factors: Some(Llama3Scaling::LLAMA_3_1.factors(500_000.0, 128)),
                    ..RopeConfig::LLAMA_3
                },
                context_length: 131_072,
                ..llama_3
            },
            // Yi-9B-200K, the long-context variant ShadowKV evaluates.
            "yi-9b" => ModelConfig {
                layers: 48,
                kv_heads: 4,
                ffn: 11008,
                vocab: 64_000,
                rms_eps: 1e-6,
                rope: RopeConfig::new(10_000_000.0),
                context_length: 262_144,
                ..llama_3
            },
            "qwen2-7b" => ModelConfig {
                architecture: Architecture::Qwen2,
                layers: 28,
                hidden: 3584,
                heads: 28,
                kv_heads: 4,
                ffn: 18944,
                vocab: 152_064,
                rms_eps: 1e-6,
                rope: RopeConfig::new(1_000_000.0),
                context_length: 32_768,
                ..llama_3
            },
            "smollm2-135m" => ModelConfig {
                layers: 30,
                hidden: 576,
                heads: 9,
                kv_heads: 3,
                head_dim: 64,
                ffn: 1536,
                vocab: 49_152,
                rope: RopeConfig::new(100_000.0),
                tied_embeddings: true,
                ..llama_3
            },
            _ => {
                return Err(ModelFileError {
                    file: format!("model shape `{name}`"),
                    tensor: None,
                    reason: format!("is not a known shape; one of {NAMED_SHAPES:?}"),
                })
            }
        };
        config.validated(name)
    }

    /// The shape a GGUF file's metadata gives (architectures `llama` and `qwen2`).
    pub fn from_gguf(file: &GgufFile) -> Result<ModelConfig> {
        let fail = |reason: String| ModelFileError {
            file: file.name.clone(),
            tensor: None,
            reason,
        };
        let architecture_name = file
            .metadata("general.architecture")
            .and_then(|v| v.as_str())
            .ok_or_else(|| fail("has no general.architecture".into()))?;
        let architecture = match architecture_name {
            "llama" => Architecture::Llama,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(fail(format!(
                    "has architecture `{other}`; this driver runs `llama` and `qwen2`"
                )))
            }
        };
        let key = |name: &str| format!("{architecture_name}.{name}");
        let count = |name: &str| -> Result<usize> {
            file.metadata(&key(name))
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| fail(format!("has no unsigned integer {}", key(name))))
        };
        let number = |name: &str| file.metadata(&key(name)).and_then(|v| v.as_f64());
        let hidden = count("embedding_length")?;
        let heads = count("attention.head_count")?;
        let kv_heads = match file.metadata(&key("attention.head_count_kv")) {
            None => heads,
            Some(_) => count("attention.head_count_kv")?,
        };
        let head_dim = match file.metadata(&key("attention.key_length")) {
            Some(v) => v.as_u64().map(|v| v as usize).unwrap_or(0),
            None => hidden / heads.max(1),
        };
        let embedding = file
            .tensor("token_embd.weight")
            .ok_or_else(|| fail("has no tensor token_embd.weight".into()))?;
        let vocab = match file.metadata(&key("vocab_size")) {
            Some(v) => v.as_u64().unwrap_or(0) as usize,
            None => embedding.dims.get(1).copied().unwrap_or(0) as usize,
        };
        let rope = rope_from_gguf(file, architecture_name, head_dim, RopePairing::Halves)?;
        let config = ModelConfig {
            architecture,
            layers: count("block_count")?,
            hidden,
            heads,
            kv_heads,
            head_dim,
            ffn: count("feed_forward_length")?,
            vocab,
            rms_eps: number("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f32,
            rope,
            context_length: count("context_length").unwrap_or(4096),
            tied_embeddings: file.tensor("output.weight").is_none(),
        };
        config.validated(&file.name)
    }

    /// The shape a Hugging Face `config.json` gives (`model_type` llama, mistral or qwen2).
    pub fn from_hf_config(path: &Path) -> Result<ModelConfig> {
        let file = path.display().to_string();
        let fail = |reason: String| ModelFileError {
            file: file.clone(),
            tensor: None,
            reason,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot be read: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fail(format!("is not valid JSON: {e}")))?;
        let count = |name: &str| -> Result<usize> {
            json.get(name)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or_else(|| fail(format!("has no unsigned integer `{name}`")))
        };
        let number = |name: &str| json.get(name).and_then(|v| v.as_f64());
        let architecture = match json.get("model_type").and_then(|v| v.as_str()) {
            Some("llama") | Some("mistral") => Architecture::Llama,
            Some("qwen2") => Architecture::Qwen2,
            other => {
                return Err(fail(format!(
                    "has model_type {other:?}; this driver runs llama, mistral and qwen2"
                )))
            }
        };
        let hidden = count("hidden_size")?;
        let heads = count("num_attention_heads")?;
        let head_dim = count("head_dim").unwrap_or(hidden / heads.max(1));
        let rope = rope_from_hf(&file, &json, head_dim, RopePairing::Halves)?;
        let config = ModelConfig {
            architecture,
            layers: count("num_hidden_layers")?,
            hidden,
            heads,
            kv_heads: count("num_key_value_heads").unwrap_or(heads),
            head_dim,
            ffn: count("intermediate_size")?,
            vocab: count("vocab_size")?,
            rms_eps: number("rms_norm_eps").unwrap_or(1e-5) as f32,
            rope,
            context_length: count("max_position_embeddings").unwrap_or(4096),
            tied_embeddings: json
                .get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        };
        config.validated(&file)
    }

    /// Checks the counts every loader and kernel relies on.
    fn validated(self, source: &str) -> Result<ModelConfig> {
        let fail = |reason: String| {
            Err(ModelFileError {
                file: source.to_owned(),
                tensor: None,
                reason,
            })
        };
        let sizes = [
            ("layers", self.layers),
            ("hidden size", self.hidden),
            ("heads", self.heads),
            ("KV heads", self.kv_heads),
            ("head dimension", self.head_dim),
            ("MLP width", self.ffn),
            ("vocabulary", self.vocab),
        ];
        if let Some((what, _)) = sizes.iter().find(|(_, n)| *n == 0 || *n > 1 << 24) {
            return fail(format!("gives {what} out of range: {sizes:?}"));
        }
        // Each count alone may be in range while their products overflow (a hostile file).
        match self.checked_parameters() {
            Some(parameters) if parameters <= MAX_PARAMETERS => {}
            _ => {
                return fail(format!(
                    "has more than {MAX_PARAMETERS} parameters: {sizes:?}"
                ))
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return fail(format!(
                "has {} heads, not a multiple of its {} KV heads",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return fail(format!(
                "has head dimension {}; RoPE needs an even one",
                self.head_dim
            ));
        }
        if let Err(problem) = self.rope.check(self.head_dim as u32) {
            return fail(problem);
        }
        if self.rms_eps.is_nan() || self.rms_eps < 0.0 {
            return fail(format!("has RMSNorm epsilon {}", self.rms_eps));
        }
        Ok(self)
    }
}
