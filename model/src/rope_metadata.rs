//! A model's RoPE from its files: the base, the rotated part of each head, per-frequency
//! factors (Llama-3.1's `rope_freqs` tensor), Llama-3 scaling and LongRoPE (Phi-3), from GGUF
//! metadata and tensors or a Hugging Face `config.json`. How a family pairs dimensions
//! (rotate-half or adjacent) is the family's, so the caller passes it.
use shadowkv_kernels::rope::{
    Llama3Scaling, LongRope, RopeConfig, RopeFactors, RopePairing, MAX_ROPE_PAIRS,
};

use crate::error::ModelFileError;
use crate::gguf::GgufFile;

type Result<T, E = ModelFileError> = std::result::Result<T, E>;

/// The GGUF tensor of Llama-3.1's per-frequency factors.
pub const ROPE_FREQS_TENSOR: &str = "rope_freqs.weight";
/// The GGUF tensors of LongRoPE's factors (Phi-3).
pub const LONG_FACTORS_TENSOR: &str = "rope_factors_long.weight";
/// See [`LONG_FACTORS_TENSOR`].
pub const SHORT_FACTORS_TENSOR: &str = "rope_factors_short.weight";

fn error(file: &str, tensor: Option<&str>, reason: String) -> ModelFileError {
    ModelFileError {
        file: file.to_owned(),
        tensor: tensor.map(str::to_owned),
        reason,
    }
}

/// `values` as factors of a head with `pairs` rotated pairs.
fn factors_of(file: &str, tensor: &str, values: &[f32], pairs: usize) -> Result<RopeFactors> {
    if values.len() != pairs || values.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
        return Err(error(
            file,
            Some(tensor),
            format!(
                "has {} values; expected {pairs} positive factors (rotary dimensions / 2)",
                values.len()
            ),
        ));
    }
    RopeFactors::new(values).ok_or_else(|| {
        error(
            file,
            Some(tensor),
            format!("has more than {MAX_ROPE_PAIRS} factors"),
        )
    })
}

/// The rotated dimensions of a head of `head_dim`: `rotary_dim` if it is a proper part.
fn rotary_part(file: &str, rotary_dim: usize, head_dim: usize) -> Result<u32> {
    if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
        return Err(error(
            file,
            None,
            format!(
                "rotates {rotary_dim} dimensions of heads of {head_dim}; expected an even \
                 count from 2 to the head dimension"
            ),
        ));
    }
    // 0 keeps the whole-head default (what every kernel assumes without partial rotary).
    Ok(if rotary_dim == head_dim {
        0
    } else {
        rotary_dim as u32
    })
}

/// The RoPE of a GGUF file of architecture `architecture` (the metadata prefix) with heads
/// of `head_dim`: `{arch}.rope.freq_base`, `{arch}.rope.dimension_count` (partial rotary),
/// the `rope_freqs.weight` factors, and LongRoPE from `rope_factors_{short,long}.weight` with
/// `{arch}.rope.scaling.original_context_length` and `{arch}.rope.scaling.attn_factor`.
pub fn rope_from_gguf(
    file: &GgufFile,
    architecture: &str,
    head_dim: usize,
    pairing: RopePairing,
) -> Result<RopeConfig> {
    let key = |name: &str| format!("{architecture}.{name}");
    let number = |name: &str| file.metadata(&key(name)).and_then(|v| v.as_f64());
    let mut rope = RopeConfig::new(number("rope.freq_base").unwrap_or(10_000.0));
    rope.pairing = pairing;
    if let Some(count) = file.metadata(&key("rope.dimension_count")) {
        let count = count.as_u64().unwrap_or(0) as usize;
        rope.rotary_dim = rotary_part(&file.name, count, head_dim)?;
    }
    let pairs = rope.rotary_dim(head_dim as u32) as usize / 2;
    let factors = |tensor: &str| -> Result<Option<RopeFactors>> {
        match file.tensor(tensor) {
            None => Ok(None),
            Some(_) => {
                let values = file.dequantize(tensor)?;
                factors_of(&file.name, tensor, &values, pairs).map(Some)
            }
        }
    };
    rope.factors = factors(ROPE_FREQS_TENSOR)?;
    match (
        factors(SHORT_FACTORS_TENSOR)?,
        factors(LONG_FACTORS_TENSOR)?,
    ) {
        (None, None) => {}
        (Some(short_factors), Some(long_factors)) => {
            let original = number("rope.scaling.original_context_length").ok_or_else(|| {
                error(
                    &file.name,
                    None,
                    format!(
                        "has LongRoPE factors but no {}",
                        key("rope.scaling.original_context_length")
                    ),
                )
            })?;
            let context = number("context_length").unwrap_or(original);
            rope.long_rope = Some(LongRope {
                short_factors,
                long_factors,
                original_max_position: original,
                context_length: context,
                attention_factor: number("rope.scaling.attn_factor")
                    .unwrap_or_else(|| LongRope::default_attention_factor(context, original)),
            });
        }
        (short, _) => {
            let missing = if short.is_none() {
                SHORT_FACTORS_TENSOR
            } else {
                LONG_FACTORS_TENSOR
            };
            return Err(error(
                &file.name,
                Some(missing),
                "is missing; LongRoPE needs both the short and the long factors".into(),
            ));
        }
    }
    Ok(rope)
}

/// The RoPE of a Hugging Face `config.json` (`json`, from `file`) with heads of `head_dim`:
/// `rope_theta`, `partial_rotary_factor`, and `rope_scaling` of type `llama3`, `longrope`
/// (or its old name `su`) or `default`.
pub fn rope_from_hf(
    file: &str,
    json: &serde_json::Value,
    head_dim: usize,
    pairing: RopePairing,
) -> Result<RopeConfig> {
    let number = |name: &str| json.get(name).and_then(|v| v.as_f64());
    let mut rope = RopeConfig::new(number("rope_theta").unwrap_or(10_000.0));
    rope.pairing = pairing;
    if let Some(fraction) = number("partial_rotary_factor") {
        let rotary_dim = (head_dim as f64 * fraction).round();
        let rotary_dim = if rotary_dim.is_finite() && rotary_dim >= 0.0 {
            rotary_dim as usize
        } else {
            0
        };
        rope.rotary_dim = rotary_part(file, rotary_dim, head_dim)?;
    }
    let pairs = rope.rotary_dim(head_dim as u32) as usize / 2;
    let Some(scaling) = json.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(rope);
    };
    let field = |name: &str| scaling.get(name).and_then(|v| v.as_f64());
    let kind = scaling
        .get("rope_type")
        .or_else(|| scaling.get("type"))
        .and_then(|v| v.as_str());
    let factor_list = |name: &str| -> Result<RopeFactors> {
        let values: Option<Vec<f32>> = scaling.get(name).and_then(|v| v.as_array()).and_then(|a| {
            a.iter()
                .map(|v| v.as_f64().map(|f| f as f32))
                .collect::<Option<Vec<f32>>>()
        });
        let values = values.ok_or_else(|| {
            error(
                file,
                None,
                format!("has rope_scaling without a list of numbers `{name}`"),
            )
        })?;
        factors_of(file, &format!("rope_scaling.{name}"), &values, pairs)
    };
    match (kind, field("factor")) {
        (Some("llama3"), Some(factor)) => {
            rope.scaling = Some(Llama3Scaling {
                factor,
                low_freq_factor: field("low_freq_factor").unwrap_or(1.0),
                high_freq_factor: field("high_freq_factor").unwrap_or(4.0),
                original_max_position: field("original_max_position_embeddings").unwrap_or(8192.0),
            })
        }
        (Some("longrope") | Some("su"), _) => {
            let original = number("original_max_position_embeddings")
                .or_else(|| field("original_max_position_embeddings"))
                .ok_or_else(|| {
                    error(
                        file,
                        None,
                        "has LongRoPE scaling but no original_max_position_embeddings".into(),
                    )
                })?;
            let context = number("max_position_embeddings").unwrap_or(original);
            rope.long_rope = Some(LongRope {
                short_factors: factor_list("short_factor")?,
                long_factors: factor_list("long_factor")?,
                original_max_position: original,
                context_length: context,
                attention_factor: field("attention_factor")
                    .unwrap_or_else(|| LongRope::default_attention_factor(context, original)),
            });
        }
        (Some("default"), _) => {}
        _ => {
            return Err(error(
                file,
                None,
                format!(
                    "has rope_scaling {scaling}; supported are rope_type `llama3`, `longrope` \
                     and `default`"
                ),
            ))
        }
    }
    Ok(rope)
}
