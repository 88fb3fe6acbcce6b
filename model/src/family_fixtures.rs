//! Tiny random checkpoints of each family this driver runs (Llama, Qwen2, GLM-4, Phi-3),
//! written the way each family's files store them: GGUF bytes with the family's tensor names
//! and metadata, or a Hugging Face folder (`config.json`, `model.safetensors`). Q/K/V and
//! gate/up are fused where the family fuses them, Llama's GGUF Q/K rows are permuted as
//! llama.cpp's converter does. The same weights are kept split in memory, so a test can check
//! that loading the files gives back exactly these weights (the CPU tests) and that the GPU
//! model runs each family as the CPU path does (the GPU tests).
use std::path::Path;

use shadowkv_kernels::rope::{LongRope, RopeConfig, RopeFactors, RopePairing};

use crate::block::BlockOptions;
use crate::config::{Architecture, ModelConfig};
use crate::weights::{ExtraNorms, LayerWeights, Matrix, ModelWeights};

/// A tiny model of one family: its config and its weights, split, in the driver's layout.
#[derive(Clone, Debug)]
pub struct TinyCheckpoint {
    pub config: ModelConfig,
    pub weights: ModelWeights<Matrix>,
}

/// A tensor to write: GGUF name, shape (rows first) and values.
type Tensor = (String, Vec<usize>, Vec<f32>);

/// Deterministic values in `[-scale, scale)` (a linear congruential generator).
fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The tiny shape: 2 layers, hidden 256, 4 heads of 64 (a head dimension the GPU kernels
/// take) over 2 KV heads, MLP 384, vocabulary 96.
pub const TINY_VOCAB: usize = 96;

/// Head dimension of the tiny shape.
pub const TINY_HEAD_DIM: usize = 64;

/// LongRoPE factors of the tiny Phi-3 (one per rotated pair): short near 1, long up to 6.
fn phi3_factors(top: f32) -> Vec<f32> {
    let pairs = TINY_HEAD_DIM / 2;
    (0..pairs)
        .map(|i| 1.0 + (top - 1.0) * i as f32 / (pairs - 1) as f32)
        .collect()
}

/// GLM-4's `rope_ratio` in the tiny GLM checkpoint (its base is `10000 * rope_ratio`).
const GLM_ROPE_RATIO: f64 = 2.0;

/// The tiny Gemma-3: 3 layers (two local with a 5-token window and RoPE base 10^4, then a
/// global one), hidden 128, 2 query heads of 256 over 1 KV head (Gemma's head dimension), the
/// attention scale `1/sqrt(head_dim)` as GGUF files imply it.
pub const TINY_GEMMA3_WINDOW: usize = 5;
const TINY_GEMMA3_LAYERS: usize = 3;
const TINY_GEMMA3_HIDDEN: usize = 128;
const TINY_GEMMA3_HEAD_DIM: usize = 256;

impl TinyCheckpoint {
    /// A tiny model of `architecture` with weights from `seed`. Values are rounded to bf16, so
    /// the GPU's bf16 upload changes nothing and the paths differ only in their arithmetic.
    pub fn new(architecture: Architecture, seed: u64) -> TinyCheckpoint {
        TinyCheckpoint::build(architecture, seed, TINY_GEMMA3_HEAD_DIM)
    }

    /// The tiny Gemma-3 with heads of `head_dim` (the GPU test runs it at 64 too, a head
    /// dimension every kernel has).
    pub fn gemma3(seed: u64, head_dim: usize) -> TinyCheckpoint {
        TinyCheckpoint::build(Architecture::Gemma3, seed, head_dim)
    }

    /// [`TinyCheckpoint::new`], a Gemma-3 with heads of `gemma3_head_dim`.
    fn build(architecture: Architecture, seed: u64, gemma3_head_dim: usize) -> TinyCheckpoint {
        let mut rope = RopeConfig::new(10_000.0);
        match architecture {
            Architecture::ChatGlm => {
                rope.theta = 10_000.0 * GLM_ROPE_RATIO;
                rope.rotary_dim = (TINY_HEAD_DIM / 2) as u32;
                rope.pairing = RopePairing::Adjacent;
            }
            Architecture::Phi3 => {
                let factors =
                    |top| RopeFactors::new(&phi3_factors(top)).expect("32 factors fit the table");
                rope.long_rope = Some(LongRope {
                    short_factors: factors(1.5),
                    long_factors: factors(6.0),
                    original_max_position: 64.0,
                    context_length: 256.0,
                    attention_factor: LongRope::default_attention_factor(256.0, 64.0),
                });
            }
            Architecture::Gemma3 => rope.theta = 1_000_000.0,
            Architecture::Llama | Architecture::Qwen2 => {}
        }
        let config = ModelConfig {
            architecture,
            layers: 2,
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: TINY_HEAD_DIM,
            ffn: 384,
            vocab: TINY_VOCAB,
            rms_eps: 1e-5,
            rope,
            context_length: 256,
            tied_embeddings: false,
            block: BlockOptions::LLAMA,
        };
        let config = if architecture == Architecture::Gemma3 {
            ModelConfig {
                layers: TINY_GEMMA3_LAYERS,
                hidden: TINY_GEMMA3_HIDDEN,
                heads: 2,
                kv_heads: 1,
                head_dim: gemma3_head_dim,
                ffn: 192,
                rms_eps: 1e-6,
                tied_embeddings: true,
                block: BlockOptions::gemma3(
                    TINY_GEMMA3_HIDDEN,
                    gemma3_head_dim,
                    gemma3_head_dim as f64,
                    TINY_GEMMA3_WINDOW,
                    TINY_GEMMA3_LAYERS,
                    10_000.0,
                ),
                ..config
            }
        } else {
            config
        };
        let mut seed = seed.wrapping_mul(1000);
        let mut values = |n: usize, scale: f32| -> Vec<f32> {
            seed += 1;
            random(seed, n, scale)
                .into_iter()
                .map(|v| half::bf16::from_f32(v).to_f32())
                .collect()
        };
        let mut matrix = |rows: usize, cols: usize, scale: f32| Matrix {
            rows,
            cols,
            data: values(rows * cols, scale),
        };
        let (hidden, q_dim, kv_dim, ffn) =
            (config.hidden, config.q_dim(), config.kv_dim(), config.ffn);
        let norm_of = |matrix: &mut dyn FnMut(usize, usize, f32) -> Matrix, width: usize| {
            matrix(1, width, 0.2)
                .data
                .into_iter()
                .map(|v| half::bf16::from_f32(1.0 + v).to_f32())
                .collect::<Vec<f32>>()
        };
        let norm = |matrix: &mut dyn FnMut(usize, usize, f32) -> Matrix| norm_of(matrix, hidden);
        let embedding = matrix(config.vocab, hidden, 1.0);
        let block = config.block;
        let layers = (0..config.layers)
            .map(|_| {
                let qkv_bias = architecture.qkv_bias().then(|| {
                    [
                        matrix(1, q_dim, 0.2).data,
                        matrix(1, kv_dim, 0.2).data,
                        matrix(1, kv_dim, 0.2).data,
                    ]
                });
                let head_norm = |matrix: &mut dyn FnMut(usize, usize, f32) -> Matrix| {
                    block.qk_norm.then(|| norm_of(matrix, config.head_dim))
                };
                let post_norm = |matrix: &mut dyn FnMut(usize, usize, f32) -> Matrix| {
                    block.post_norms.then(|| norm(matrix))
                };
                let extra_norms = ExtraNorms {
                    q_norm: head_norm(&mut matrix),
                    k_norm: head_norm(&mut matrix),
                    post_attention_norm: post_norm(&mut matrix),
                    post_ffn_norm: post_norm(&mut matrix),
                };
                LayerWeights {
                    attn_norm: norm(&mut matrix),
                    q: matrix(q_dim, hidden, 0.4),
                    k: matrix(kv_dim, hidden, 0.4),
                    v: matrix(kv_dim, hidden, 0.3),
                    qkv_bias,
                    o: matrix(hidden, q_dim, 0.2),
                    ffn_norm: norm(&mut matrix),
                    gate: matrix(ffn, hidden, 0.2),
                    up: matrix(ffn, hidden, 0.2),
                    down: matrix(hidden, ffn, 0.2),
                    extra_norms,
                }
            })
            .collect();
        let output_norm = norm(&mut matrix);
        let output = (!config.tied_embeddings).then(|| matrix(config.vocab, hidden, 1.0));
        TinyCheckpoint {
            config,
            weights: ModelWeights {
                embedding,
                layers,
                output_norm,
                output,
            },
        }
    }

    /// Every tensor under its GGUF name, fused where the family fuses, Llama's Q/K permuted.
    fn gguf_tensors(&self) -> Vec<Tensor> {
        let config = &self.config;
        let architecture = config.architecture;
        let whole = |name: String, m: &Matrix| (name, vec![m.rows, m.cols], m.data.clone());
        let vector = |name: String, v: &[f32]| (name, vec![v.len()], v.to_vec());
        let mut out = vec![whole("token_embd.weight".into(), &self.weights.embedding)];
        for (index, layer) in self.weights.layers.iter().enumerate() {
            let name = |part: &str| format!("blk.{index}.{part}");
            out.push(vector(name("attn_norm.weight"), &layer.attn_norm));
            if architecture.fused_qkv() {
                out.push(stacked(
                    name("attn_qkv.weight"),
                    &[&layer.q, &layer.k, &layer.v],
                ));
                if let Some(biases) = &layer.qkv_bias {
                    out.push(vector(name("attn_qkv.bias"), &biases.concat()));
                }
            } else {
                let permute = architecture == Architecture::Llama;
                let rows = |m: &Matrix, heads: usize| {
                    if permute {
                        permute_rotary_rows(&m.data, heads, config.head_dim, m.cols)
                    } else {
                        m.data.clone()
                    }
                };
                let shape = |m: &Matrix| vec![m.rows, m.cols];
                out.push((
                    name("attn_q.weight"),
                    shape(&layer.q),
                    rows(&layer.q, config.heads),
                ));
                out.push((
                    name("attn_k.weight"),
                    shape(&layer.k),
                    rows(&layer.k, config.kv_heads),
                ));
                out.push(whole(name("attn_v.weight"), &layer.v));
                if let Some([q, k, v]) = &layer.qkv_bias {
                    out.push(vector(name("attn_q.bias"), q));
                    out.push(vector(name("attn_k.bias"), k));
                    out.push(vector(name("attn_v.bias"), v));
                }
            }
            out.push(whole(name("attn_output.weight"), &layer.o));
            out.push(vector(name("ffn_norm.weight"), &layer.ffn_norm));
            if architecture.fused_gate_up() {
                out.push(stacked(name("ffn_up.weight"), &[&layer.gate, &layer.up]));
            } else {
                out.push(whole(name("ffn_gate.weight"), &layer.gate));
                out.push(whole(name("ffn_up.weight"), &layer.up));
            }
            out.push(whole(name("ffn_down.weight"), &layer.down));
            let norms = &layer.extra_norms;
            for (part, norm) in [
                ("attn_q_norm", &norms.q_norm),
                ("attn_k_norm", &norms.k_norm),
                ("post_attention_norm", &norms.post_attention_norm),
                ("post_ffw_norm", &norms.post_ffn_norm),
            ] {
                if let Some(norm) = norm {
                    out.push(vector(name(&format!("{part}.weight")), norm));
                }
            }
        }
        out.push(vector(
            "output_norm.weight".into(),
            &self.weights.output_norm,
        ));
        if let Some(output) = &self.weights.output {
            out.push(whole("output.weight".into(), output));
        }
        if architecture == Architecture::Phi3 {
            out.push(vector(
                "rope_factors_short.weight".into(),
                &phi3_factors(1.5),
            ));
            out.push(vector(
                "rope_factors_long.weight".into(),
                &phi3_factors(6.0),
            ));
        }
        out
    }

    /// The GGUF `general.architecture` of the family.
    pub fn gguf_architecture(&self) -> &'static str {
        match self.config.architecture {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::ChatGlm => "chatglm",
            Architecture::Phi3 => "phi3",
            Architecture::Gemma3 => "gemma3",
        }
    }

    /// The checkpoint as a GGUF v3 file (f32 tensors), leaving out tensors `skip` names.
    pub fn gguf_bytes(&self, skip: &[&str]) -> Vec<u8> {
        let config = &self.config;
        let arch = self.gguf_architecture();
        // Every key but `general.architecture` sits under the architecture's prefix.
        let key = |name: &str, value: Metadata| (format!("{arch}.{name}"), value);
        let mut metadata = vec![
            (
                "general.architecture".to_owned(),
                Metadata::Text(arch.into()),
            ),
            key("block_count", Metadata::U32(config.layers)),
            key("embedding_length", Metadata::U32(config.hidden)),
            key("attention.head_count", Metadata::U32(config.heads)),
            key("attention.head_count_kv", Metadata::U32(config.kv_heads)),
            key("feed_forward_length", Metadata::U32(config.ffn)),
            key("context_length", Metadata::U32(config.context_length)),
            key("rope.freq_base", Metadata::F32(config.rope.theta as f32)),
            key(
                "attention.layer_norm_rms_epsilon",
                Metadata::F32(config.rms_eps),
            ),
        ];
        match config.architecture {
            Architecture::ChatGlm => metadata.push(key(
                "rope.dimension_count",
                Metadata::U32(config.rope.rotary_dim as usize),
            )),
            Architecture::Phi3 => metadata.extend([
                key("rope.dimension_count", Metadata::U32(config.head_dim)),
                key("rope.scaling.original_context_length", Metadata::U32(64)),
            ]),
            Architecture::Gemma3 => {
                let window = config.block.sliding_window.expect("Gemma-3 has a window");
                metadata.extend([
                    key("attention.key_length", Metadata::U32(config.head_dim)),
                    key("attention.value_length", Metadata::U32(config.head_dim)),
                    key("attention.sliding_window", Metadata::U32(window.window)),
                    key(
                        "attention.sliding_window_pattern",
                        Metadata::U32(window.global_every),
                    ),
                ]);
            }
            Architecture::Llama | Architecture::Qwen2 => {}
        }
        let tensors: Vec<Tensor> = self
            .gguf_tensors()
            .into_iter()
            .filter(|(name, _, _)| !skip.contains(&name.as_str()))
            .collect();
        write_gguf(&metadata, &tensors)
    }

    /// The family's Hugging Face `config.json`.
    pub fn hf_config_json(&self) -> String {
        let c = &self.config;
        match c.architecture {
            Architecture::Gemma3 => {
                let window = c.block.sliding_window.expect("Gemma-3 has a window");
                let layer_types: Vec<&str> = (0..c.layers)
                    .map(|l| {
                        if window.is_local(l) {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                format!(
                    r#"{{"model_type": "gemma3_text", "num_hidden_layers": {}, "hidden_size": {},
                    "num_attention_heads": {}, "num_key_value_heads": {}, "head_dim": {},
                    "intermediate_size": {}, "vocab_size": {}, "rms_norm_eps": {:?},
                    "max_position_embeddings": {}, "rope_theta": {:?},
                    "rope_local_base_freq": {:?}, "sliding_window": {},
                    "query_pre_attn_scalar": {},
                    "layer_types": {layer_types:?}, "hidden_activation": "gelu_pytorch_tanh",
                    "final_logit_softcapping": null, "attn_logit_softcapping": null,
                    "rope_scaling": null}}"#,
                    c.layers,
                    c.hidden,
                    c.heads,
                    c.kv_heads,
                    c.head_dim,
                    c.ffn,
                    c.vocab,
                    c.rms_eps as f64,
                    c.context_length,
                    c.rope.theta,
                    window.local_rope.theta,
                    window.window,
                    c.head_dim as f64,
                )
            }
            Architecture::ChatGlm => format!(
                r#"{{"model_type": "chatglm", "num_layers": {}, "hidden_size": {},
                "num_attention_heads": {}, "multi_query_attention": true,
                "multi_query_group_num": {}, "kv_channels": {}, "ffn_hidden_size": {},
                "padded_vocab_size": {}, "layernorm_epsilon": {:?}, "seq_length": {},
                "rope_ratio": {GLM_ROPE_RATIO:?}, "add_qkv_bias": true, "rmsnorm": true,
                "apply_residual_connection_post_layernorm": false, "post_layer_norm": true}}"#,
                c.layers,
                c.hidden,
                c.heads,
                c.kv_heads,
                c.head_dim,
                c.ffn,
                c.vocab,
                c.rms_eps as f64,
                c.context_length
            ),
            architecture => {
                let model_type = match architecture {
                    Architecture::Qwen2 => "qwen2",
                    Architecture::Phi3 => "phi3",
                    _ => "llama",
                };
                let rope_scaling = if architecture == Architecture::Phi3 {
                    format!(
                        r#", "original_max_position_embeddings": 64,
                        "rope_scaling": {{"type": "longrope", "short_factor": {:?},
                        "long_factor": {:?}}}"#,
                        phi3_factors(1.5),
                        phi3_factors(6.0)
                    )
                } else {
                    String::new()
                };
                format!(
                    r#"{{"model_type": "{model_type}", "num_hidden_layers": {}, "hidden_size": {},
                    "num_attention_heads": {}, "num_key_value_heads": {},
                    "intermediate_size": {}, "vocab_size": {}, "rms_norm_eps": {:?},
                    "max_position_embeddings": {}, "rope_theta": {:?},
                    "tie_word_embeddings": false{rope_scaling}}}"#,
                    c.layers,
                    c.hidden,
                    c.heads,
                    c.kv_heads,
                    c.ffn,
                    c.vocab,
                    c.rms_eps as f64,
                    c.context_length,
                    c.rope.theta
                )
            }
        }
    }

    /// Writes the checkpoint as a Hugging Face folder: `config.json` and `model.safetensors`
    /// (f32, the family's tensor names), leaving out tensors whose GGUF names `skip` lists.
    pub fn write_hf(&self, dir: &Path, skip: &[&str]) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("config.json"), self.hf_config_json())?;
        let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = self
            .gguf_tensors()
            .into_iter()
            .filter(|(name, _, _)| !skip.contains(&name.as_str()))
            .filter_map(|(name, shape, data)| {
                let hf = crate::tensor_names::hf_name(self.config.architecture, &name)?;
                // Hugging Face checkpoints keep Q/K in rotate-half order (no permutation).
                let data = match (self.config.architecture, name.as_str()) {
                    (Architecture::Llama, n) if n.ends_with("attn_q.weight") => {
                        self.layer_of(n).q.data.clone()
                    }
                    (Architecture::Llama, n) if n.ends_with("attn_k.weight") => {
                        self.layer_of(n).k.data.clone()
                    }
                    // Gemma checkpoints store each norm weight `w` as `w - 1`.
                    (Architecture::Gemma3, n) if n.ends_with("norm.weight") => {
                        data.iter().map(|w| w - 1.0).collect()
                    }
                    _ => data,
                };
                Some((
                    hf,
                    shape,
                    data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ))
            })
            .collect();
        let views = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
                    .map_err(std::io::Error::other)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))
            .map_err(std::io::Error::other)
    }

    /// The layer a `blk.{index}.…` name belongs to.
    fn layer_of(&self, name: &str) -> &LayerWeights<Matrix> {
        let index = name
            .split('.')
            .nth(1)
            .and_then(|i| i.parse::<usize>().ok())
            .unwrap_or(0);
        &self.weights.layers[index]
    }
}

/// Matrices of one width stacked by rows, as one tensor.
fn stacked(name: String, parts: &[&Matrix]) -> Tensor {
    let rows = parts.iter().map(|m| m.rows).sum();
    let data = parts.iter().flat_map(|m| m.data.iter().copied()).collect();
    (name, vec![rows, parts[0].cols], data)
}

/// llama.cpp's Q/K row permutation (the inverse of
/// [`unpermute_rotary_rows`](crate::weights::unpermute_rotary_rows)).
fn permute_rotary_rows(data: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0; data.len()];
    for head in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let from = (head * head_dim + s * half + i) * cols;
                let to = (head * head_dim + 2 * i + s) * cols;
                out[to..to + cols].copy_from_slice(&data[from..from + cols]);
            }
        }
    }
    out
}

/// A GGUF metadata value of the kinds the fixtures write.
pub enum Metadata {
    Text(String),
    U32(usize),
    F32(f32),
}

/// Writes a GGUF v3 file: the metadata, then f32 tensors (shapes rows first).
pub fn write_gguf(metadata: &[(String, Metadata)], tensors: &[Tensor]) -> Vec<u8> {
    let string = |s: &str| {
        [
            (s.len() as u64).to_le_bytes().to_vec(),
            s.as_bytes().to_vec(),
        ]
        .concat()
    };
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        out.extend(string(key));
        match value {
            Metadata::Text(text) => {
                out.extend(8u32.to_le_bytes());
                out.extend(string(text));
            }
            Metadata::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend((*v as u32).to_le_bytes());
            }
            Metadata::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
        }
    }
    let mut offset = 0u64;
    for (name, shape, values) in tensors {
        out.extend(string(name));
        out.extend((shape.len() as u32).to_le_bytes());
        // GGML lists the fastest-varying dimension first.
        shape
            .iter()
            .rev()
            .for_each(|&d| out.extend((d as u64).to_le_bytes()));
        out.extend(0u32.to_le_bytes()); // f32
        out.extend(offset.to_le_bytes());
        offset = (offset + 4 * values.len() as u64).next_multiple_of(32);
    }
    for (_, _, values) in tensors {
        out.resize(out.len().next_multiple_of(32), 0);
        values.iter().for_each(|v| out.extend(v.to_le_bytes()));
    }
    out
}
