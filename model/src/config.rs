//! A Llama-family model's shape: from a GGUF file's metadata, a Hugging Face `config.json`, or
//! a named shape (for synthetic models). Every count is checked, so the loaders and kernels can
//! rely on `heads = G * kv_heads`, an even `head_dim` and a positive size everywhere.
use std::path::Path;

use shadowkv_kernels::rope::{
    inverse_frequencies, Llama3Scaling, RopeConfig, RopePairing, RotaryLayout,
};

use crate::block::{gemma3_from_gguf, gemma3_from_hf, BlockOptions};
use crate::error::ModelFileError;
use crate::gguf::GgufFile;
use crate::rope_metadata::{rope_from_gguf, rope_from_hf};

/// Reading a model file fails only with a problem of the file.
type Result<T, E = ModelFileError> = std::result::Result<T, E>;

/// The decoder variants this driver runs. They differ only in details of the same block
/// (RMSNorm, GQA attention, gated MLP), mostly in how their files store it; Gemma-3's
/// additions to the block are in [`ModelConfig::block`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, SmolLM, Yi, Mistral: no projection biases.
    Llama,
    /// Qwen2: biases on the Q, K and V projections.
    Qwen2,
    /// GLM-4-9B (llama.cpp's `chatglm`): one fused QKV projection with a bias, RoPE on the
    /// first part of each head with adjacent pairs, one fused gate/up projection.
    ChatGlm,
    /// Phi-3: fused QKV (no bias) and gate/up projections, LongRoPE.
    Phi3,
    /// Gemma-3 (text): query/key RMSNorm, norms after attention and after the MLP, GeGLU,
    /// scaled embeddings, sliding-window layers with their own RoPE base beside global ones.
    Gemma3,
}

impl Architecture {
    /// Whether the Q, K and V projections carry a bias.
    pub fn qkv_bias(self) -> bool {
        matches!(self, Architecture::Qwen2 | Architecture::ChatGlm)
    }

    /// Whether the files may store Q, K and V as one `[q_dim + 2 * kv_dim, hidden]` tensor
    /// (`attn_qkv`), rows in that order; the loader splits it.
    pub fn fused_qkv(self) -> bool {
        matches!(self, Architecture::ChatGlm | Architecture::Phi3)
    }

    /// Whether the files store the gate and up projections as one `[2 * ffn, hidden]` tensor
    /// (`ffn_up`), gate rows first (both families compute `silu(first half) * second half`).
    pub fn fused_gate_up(self) -> bool {
        matches!(self, Architecture::ChatGlm | Architecture::Phi3)
    }

    /// How the family pairs the rotated dimensions. GLM rotates adjacent pairs in its own
    /// code and its converters keep that order; the others rotate halves (llama.cpp's
    /// Llama rows are permuted at load to match).
    pub fn rope_pairing(self) -> RopePairing {
        match self {
            Architecture::ChatGlm => RopePairing::Adjacent,
            _ => RopePairing::Halves,
        }
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
    /// What the block adds to the Llama block (Gemma-3's norms, GeGLU, sliding windows).
    pub block: BlockOptions,
}

/// The head dimensions the GPU attention kernels are built for.
pub const GPU_HEAD_DIMS: [u32; 3] = shadowkv_kernels::attention::HEAD_DIMS;

/// The most query heads per KV head the GPU attention kernels take.
pub const GPU_MAX_GROUP: u32 = shadowkv_kernels::attention::MAX_GROUP;

/// The `general.architecture` values [`ModelConfig::from_gguf`] reads.
pub const GGUF_ARCHITECTURES: &str =
    "`llama` (Llama, Yi, Mistral), `qwen2`, `chatglm` (GLM-4-9B), `phi3` and `gemma3`";

/// The `model_type` values [`ModelConfig::from_hf_config`] reads.
pub const HF_MODEL_TYPES: &str =
    "llama, mistral, qwen2, chatglm (GLM-4-9B), phi3 and gemma3_text (Gemma-3)";

/// Most parameters a valid shape has (2^48, far above any real model), so that sizes derived
/// from a shape (`parameters() * bytes`, `q_dim() * tokens`) do not overflow.
pub const MAX_PARAMETERS: usize = 1 << 48;

/// The named shapes a synthetic model can take.
pub const NAMED_SHAPES: [&str; 10] = [
    "llama-3-8b",
    "llama-3-70b",
    "llama-3.1-8b",
    "yi-9b",
    "qwen2-7b",
    "glm-4-9b",
    "phi-3-mini",
    "smollm2-135m",
    "gemma-3-270m",
    "gemma-3-1b",
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

    /// Layers with sliding-window attention (Gemma-3's local layers; 0 for most families).
    pub fn local_layers(&self) -> usize {
        match self.block.sliding_window {
            Some(window) => (0..self.layers).filter(|&l| window.is_local(l)).count(),
            None => 0,
        }
    }

    /// Layers that attend over the whole context: what a ShadowKV cache holds a shadow of.
    pub fn global_layers(&self) -> usize {
        self.layers - self.local_layers()
    }

    /// ShadowKV's cache shape for this model: its global layers (the sliding-window layers
    /// keep their full keys and values beside it, [`local_kv_bytes`](Self::local_kv_bytes)).
    pub fn shadow_cache_shape(&self) -> shadowkv::cache::CacheShape {
        shadowkv::cache::CacheShape {
            layers: self.global_layers(),
            q_heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            rope: self.rope,
        }
    }

    /// GPU bytes of the full keys and values the sliding-window layers keep for one sequence
    /// of up to `tokens` tokens in ShadowKV mode (bf16, each block rounded to 8 elements as
    /// the GPU cache lays it out); 0 for a model without such layers.
    pub fn local_kv_bytes(&self, tokens: usize) -> u64 {
        let block = (self.kv_dim() as u64 * tokens as u64).next_multiple_of(8);
        self.local_layers() as u64 * 2 * block * 2
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
        let mut norms = mul(2, self.hidden)?;
        if self.block.qk_norm {
            norms = add(norms, mul(2, self.head_dim)?)?;
        }
        if self.block.post_norms {
            norms = add(norms, mul(2, self.hidden)?)?;
        }
        let layer = add(add(attention, mlp)?, norms)?;
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
            block: BlockOptions::LLAMA,
        };
        // Gemma-3 270M and 1B: one KV head of 256, a 512-token window on five of every six
        // layers (RoPE base 10^4 there, 10^6 on the global ones), a 262K vocabulary.
        let gemma_3 = |layers: usize, hidden: usize, heads: usize, ffn: usize| ModelConfig {
            architecture: Architecture::Gemma3,
            layers,
            hidden,
            heads,
            kv_heads: 1,
            head_dim: 256,
            ffn,
            vocab: 262_144,
            rms_eps: 1e-6,
            rope: RopeConfig::new(1_000_000.0),
            context_length: 32_768,
            tied_embeddings: true,
            block: BlockOptions::gemma3(
                hidden,
                256,
                256.0,
                512,
                crate::block::GEMMA3_GLOBAL_EVERY,
                crate::block::GEMMA3_LOCAL_ROPE_BASE,
            ),
        };
        let config = match name {
            "llama-3-8b" => llama_3,
            // The 70B shape, for tensor-parallel runs: it does not fit one GPU in bf16.
            "llama-3-70b" => ModelConfig {
                layers: 80,
                hidden: 8192,
                heads: 64,
                ffn: 28672,
                ..llama_3
            },
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
            // GLM-4-9B-Chat-1M: 2 KV heads, RoPE on the first 64 of 128 dimensions in adjacent
            // pairs, base 10^4 times its rope_ratio of 10^4.
            "glm-4-9b" => ModelConfig {
                architecture: Architecture::ChatGlm,
                layers: 40,
                kv_heads: 2,
                ffn: 13696,
                vocab: 151_552,
                rms_eps: 1.5625e-7,
                rope: RopeConfig {
                    rotary_dim: 64,
                    pairing: RopePairing::Adjacent,
                    ..RopeConfig::new(1e8)
                },
                context_length: 1_048_576,
                ..llama_3
            },
            // Phi-3-mini-128k: heads of 96, LongRoPE from 4K to 128K. The factors here are a
            // smooth stand-in for the checkpoint's lists (a synthetic model's timing does not
            // depend on them).
            "phi-3-mini" => {
                let pairs = 48;
                let ramp = |top: f32| -> Vec<f32> {
                    (0..pairs)
                        .map(|i| 1.0 + (top - 1.0) * i as f32 / (pairs - 1) as f32)
                        .collect()
                };
                let factors = |top| {
                    shadowkv_kernels::rope::RopeFactors::new(&ramp(top))
                        .expect("48 factors fit the table")
                };
                let (original, context) = (4096.0, 131_072.0);
                ModelConfig {
                    architecture: Architecture::Phi3,
                    layers: 32,
                    hidden: 3072,
                    heads: 32,
                    kv_heads: 32,
                    head_dim: 96,
                    ffn: 8192,
                    vocab: 32_064,
                    rope: RopeConfig {
                        long_rope: Some(shadowkv_kernels::rope::LongRope {
                            short_factors: factors(1.1),
                            long_factors: factors(40.0),
                            original_max_position: original,
                            context_length: context,
                            attention_factor:
                                shadowkv_kernels::rope::LongRope::default_attention_factor(
                                    context, original,
                                ),
                        }),
                        ..RopeConfig::new(10_000.0)
                    },
                    context_length: 131_072,
                    ..llama_3
                }
            }
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
            "gemma-3-270m" => gemma_3(18, 640, 4, 2048),
            "gemma-3-1b" => gemma_3(26, 1152, 4, 6912),
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
        let architecture =
            match architecture_name {
                "llama" => Architecture::Llama,
                "qwen2" => Architecture::Qwen2,
                "chatglm" => Architecture::ChatGlm,
                "phi3" => Architecture::Phi3,
                "gemma3" => return gemma3_from_gguf(file),
                "glm4" => return Err(fail(
                    "has architecture `glm4` (GLM-4-0414, with norms after attention and after \
                     the MLP), which this driver does not run; GLM-4-9B files (`chatglm`) load"
                        .into(),
                )),
                other => {
                    return Err(fail(format!(
                        "has architecture `{other}`; this driver runs {GGUF_ARCHITECTURES}"
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
        // Phi-3 files may carry `phi3.attention.sliding_window`; Phi-3-mini-128k's window is
        // its whole context, so every layer attends fully here and the key is not read.
        let rope = rope_from_gguf(
            file,
            architecture_name,
            head_dim,
            architecture.rope_pairing(),
        )?;
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
            block: BlockOptions::LLAMA,
        };
        config.validated(&file.name)
    }

    /// The shape a Hugging Face `config.json` gives (`model_type` llama, mistral or qwen2).
    pub fn from_hf_config(path: &Path) -> Result<ModelConfig> {
        let file = path.display().to_string();
        let fail = file_error(&file);
        let text =
            std::fs::read_to_string(path).map_err(|e| fail(format!("cannot be read: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fail(format!("is not valid JSON: {e}")))?;
        let count = |name: &str| json_count(&file, &json, name);
        let number = |name: &str| json.get(name).and_then(|v| v.as_f64());
        let architecture =
            match json.get("model_type").and_then(|v| v.as_str()) {
                Some("llama") | Some("mistral") => Architecture::Llama,
                Some("qwen2") => Architecture::Qwen2,
                Some("phi3") => Architecture::Phi3,
                Some("chatglm") => return chatglm_from_hf(&file, &json),
                Some("gemma3_text") => return gemma3_from_hf(&file, &json),
                Some("gemma3") => return Err(fail(
                    "has model_type \"gemma3\" (the multimodal checkpoint, its text model under \
                     `text_config`); this driver runs text checkpoints (model_type \
                     \"gemma3_text\")"
                        .into(),
                )),
                Some("glm4") => return Err(fail(
                    "has model_type \"glm4\" (GLM-4-0414, with norms after attention and after \
                     the MLP), which this driver does not run; GLM-4-9B checkpoints \
                     (model_type \"chatglm\") load"
                        .into(),
                )),
                other => {
                    return Err(fail(format!(
                        "has model_type {other:?}; this driver runs {HF_MODEL_TYPES}"
                    )))
                }
            };
        let hidden = count("hidden_size")?;
        let heads = count("num_attention_heads")?;
        let head_dim = count("head_dim").unwrap_or(hidden / heads.max(1));
        // Phi-3's `sliding_window` is not read: Phi-3-mini-128k's covers its whole context.
        let rope = rope_from_hf(&file, &json, head_dim, architecture.rope_pairing())?;
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
            block: BlockOptions::LLAMA,
        };
        config.validated(&file)
    }

    /// Whether the GPU kernels run this shape (the CPU path runs any valid one): a head
    /// dimension of [`GPU_HEAD_DIMS`] and at most [`GPU_MAX_GROUP`] query heads per KV head.
    /// `source` names the file or shape in the error.
    pub fn check_gpu_kernels(&self, source: &str) -> Result<()> {
        let fail = |reason: String| {
            Err(ModelFileError {
                file: source.to_owned(),
                tensor: None,
                reason,
            })
        };
        if !GPU_HEAD_DIMS.contains(&(self.head_dim as u32)) {
            return fail(format!(
                "has head dimension {}; the GPU kernels are built for head dimensions \
                 {GPU_HEAD_DIMS:?} (the CPU path runs it)",
                self.head_dim
            ));
        }
        if self.group() > GPU_MAX_GROUP as usize {
            return fail(format!(
                "has {} query heads per KV head ({} heads, {} KV heads); the GPU kernels take \
                 at most {GPU_MAX_GROUP} (the CPU path runs it)",
                self.group(),
                self.heads,
                self.kv_heads
            ));
        }
        if !shadowkv_kernels::attention::has_kernel(self.group() as u32, self.head_dim as u32) {
            return fail(format!(
                "has {} query heads per KV head at head dimension {}; the GPU kernels take                  groups {:?} at that size (the CPU path runs it)",
                self.group(),
                self.head_dim,
                shadowkv_kernels::attention::D256_GROUPS
            ));
        }
        Ok(())
    }

    /// Checks the counts every loader and kernel relies on.
    pub(crate) fn validated(self, source: &str) -> Result<ModelConfig> {
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
        if let Some(window) = &self.block.sliding_window {
            if window.window == 0 || window.global_every == 0 {
                return fail(format!(
                    "has a sliding window of {} tokens over layers with period {}; both must \
                     be positive",
                    window.window, window.global_every
                ));
            }
            if let Err(problem) = window.local_rope.check(self.head_dim as u32) {
                return fail(format!("local layers' RoPE: {problem}"));
            }
        }
        if !(self.block.embedding_scale.is_finite() && self.block.query_scale.is_finite())
            || self.block.query_scale <= 0.0
        {
            return fail(format!(
                "has embedding scale {} and query scale {}; expected finite, positive scales",
                self.block.embedding_scale, self.block.query_scale
            ));
        }
        if self.rms_eps.is_nan() || self.rms_eps < 0.0 {
            return fail(format!("has RMSNorm epsilon {}", self.rms_eps));
        }
        Ok(self)
    }
}

/// Makes errors about `file` as a whole (no one tensor) from their reasons.
pub(crate) fn file_error(file: &str) -> impl Fn(String) -> ModelFileError + '_ {
    move |reason| ModelFileError {
        file: file.to_owned(),
        tensor: None,
        reason,
    }
}

/// The unsigned integer `name` of a `config.json`, or an error naming the file and the key.
pub(crate) fn json_count(file: &str, json: &serde_json::Value, name: &str) -> Result<usize> {
    json.get(name)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .ok_or_else(|| file_error(file)(format!("has no unsigned integer `{name}`")))
}

/// The shape of a GLM-4-9B `config.json` (`model_type` chatglm, from `file`): its own key
/// names (`num_layers`, `multi_query_group_num`, `kv_channels`, `ffn_hidden_size`,
/// `padded_vocab_size`, `seq_length`), RoPE on the first half of each head in adjacent pairs
/// with base `10000 * rope_ratio`. Variants this driver does not compute (no QKV bias,
/// LayerNorm, the residual after the norm) are refused by name.
fn chatglm_from_hf(file: &str, json: &serde_json::Value) -> Result<ModelConfig> {
    let fail = file_error(file);
    let count = |name: &str| json_count(file, json, name);
    let flag =
        |name: &str, default: bool| json.get(name).and_then(|v| v.as_bool()).unwrap_or(default);
    for (name, needed, default) in [
        ("add_qkv_bias", true, true),
        ("rmsnorm", true, true),
        ("apply_residual_connection_post_layernorm", false, false),
        ("post_layer_norm", true, true),
    ] {
        if flag(name, default) != needed {
            return Err(fail(format!(
                "sets `{name}` to {}; this driver runs GLM-4 with it {needed}",
                !needed
            )));
        }
    }
    let hidden = count("hidden_size")?;
    let heads = count("num_attention_heads")?;
    let head_dim = count("kv_channels").unwrap_or(hidden / heads.max(1));
    let kv_heads = if flag("multi_query_attention", false) {
        count("multi_query_group_num")?
    } else {
        heads
    };
    let rope_ratio = json
        .get("rope_ratio")
        .and_then(|v| v.as_f64())
        .unwrap_or(1.0);
    let rope = RopeConfig {
        // GLM rotates the first `head_dim / 2` dimensions of each head.
        rotary_dim: (head_dim / 2) as u32,
        pairing: RopePairing::Adjacent,
        ..RopeConfig::new(10_000.0 * rope_ratio)
    };
    let config = ModelConfig {
        architecture: Architecture::ChatGlm,
        layers: count("num_layers")?,
        hidden,
        heads,
        kv_heads,
        head_dim,
        ffn: count("ffn_hidden_size")?,
        vocab: count("padded_vocab_size")?,
        rms_eps: json
            .get("layernorm_epsilon")
            .and_then(|v| v.as_f64())
            .unwrap_or(1e-5) as f32,
        rope,
        context_length: count("seq_length").unwrap_or(8192),
        tied_embeddings: false,
        block: BlockOptions::LLAMA,
    };
    config.validated(file)
}
