//! How each family names its tensors: the Hugging Face name of each GGUF-named tensor, and
//! where a projection the driver keeps separate (Q, K, V; gate, up) sits inside a family's
//! fused tensor, so that the loaders hand every path the same separate matrices.
use std::ops::Range;

use crate::config::{Architecture, ModelConfig};

/// A separate projection read as rows of a fused tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FusedPart {
    /// The fused tensor's GGUF name (`blk.3.attn_qkv.weight`).
    pub tensor: String,
    /// Rows of the fused tensor (all of them).
    pub rows: usize,
    /// The projection's rows within it.
    pub part: Range<usize>,
}

/// Where GGUF-named tensor `name` sits in a fused tensor of `config`'s family: Q, K and V
/// (weights and biases) in `attn_qkv`, rows in that order; gate and up in a `2 * ffn`-row
/// `ffn_up`, gate first. `None` for a tensor the family stores on its own.
pub fn fused_part(config: &ModelConfig, name: &str) -> Option<FusedPart> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let (stem, kind) = part.rsplit_once('.')?;
    let (q_dim, kv_dim, ffn) = (config.q_dim(), config.kv_dim(), config.ffn);
    let architecture = config.architecture;
    let (fused, rows, range) = match stem {
        "attn_q" if architecture.fused_qkv() => ("attn_qkv", q_dim + 2 * kv_dim, 0..q_dim),
        "attn_k" if architecture.fused_qkv() => {
            ("attn_qkv", q_dim + 2 * kv_dim, q_dim..q_dim + kv_dim)
        }
        "attn_v" if architecture.fused_qkv() => (
            "attn_qkv",
            q_dim + 2 * kv_dim,
            q_dim + kv_dim..q_dim + 2 * kv_dim,
        ),
        "ffn_gate" if architecture.fused_gate_up() => ("ffn_up", 2 * ffn, 0..ffn),
        "ffn_up" if architecture.fused_gate_up() => ("ffn_up", 2 * ffn, ffn..2 * ffn),
        _ => return None,
    };
    Some(FusedPart {
        tensor: format!("blk.{layer}.{fused}.{kind}"),
        rows,
        part: range,
    })
}

/// The Hugging Face name of GGUF-named tensor `gguf` in `architecture`'s checkpoints (a fused
/// tensor under its fused GGUF name: `attn_qkv`, and `ffn_up` for families that fuse it).
pub fn hf_name(architecture: Architecture, gguf: &str) -> Option<String> {
    if architecture == Architecture::ChatGlm {
        return chatglm_name(gguf);
    }
    let gemma = architecture == Architecture::Gemma3;
    Some(match gguf {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => {
            let (layer, stem, kind) = layer_part(gguf)?;
            let module = match stem {
                "attn_norm" => "input_layernorm",
                // Gemma's `post_attention_layernorm` is the norm on the attention output;
                // its MLP's input norm is `pre_feedforward_layernorm`.
                "ffn_norm" if gemma => "pre_feedforward_layernorm",
                "post_attention_norm" if gemma => "post_attention_layernorm",
                "post_ffw_norm" if gemma => "post_feedforward_layernorm",
                "attn_q_norm" if gemma => "self_attn.q_norm",
                "attn_k_norm" if gemma => "self_attn.k_norm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_qkv" if architecture.fused_qkv() => "self_attn.qkv_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_up" if architecture.fused_gate_up() => "mlp.gate_up_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                _ => return None,
            };
            format!("model.layers.{layer}.{module}.{kind}")
        }
    })
}

/// GLM-4-9B's names (`THUDM/glm-4-9b-chat-1m`): a `transformer.` tree of its own.
fn chatglm_name(gguf: &str) -> Option<String> {
    Some(match gguf {
        "token_embd.weight" => "transformer.embedding.word_embeddings.weight".into(),
        "output_norm.weight" => "transformer.encoder.final_layernorm.weight".into(),
        "output.weight" => "transformer.output_layer.weight".into(),
        _ => {
            let (layer, stem, kind) = layer_part(gguf)?;
            let module = match stem {
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                "attn_qkv" => "self_attention.query_key_value",
                "attn_output" => "self_attention.dense",
                "ffn_up" => "mlp.dense_h_to_4h",
                "ffn_down" => "mlp.dense_4h_to_h",
                _ => return None,
            };
            format!("transformer.encoder.layers.{layer}.{module}.{kind}")
        }
    })
}

/// `blk.{layer}.{stem}.{kind}` split into its three parts.
fn layer_part(gguf: &str) -> Option<(&str, &str, &str)> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let (stem, kind) = part.rsplit_once('.')?;
    Some((layer, stem, kind))
}
