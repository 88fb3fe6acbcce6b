//! The accuracy of the compressed value formats, on the CPU: attention outputs over values
//! that went through each format (quantised into the host layout, dequantised into bf16 as
//! the fetch writes its slots) against the same attention over the bf16 values, on
//! structured synthetic keys (low rank, RoPE, a needle chunk) and values (low rank, drifting,
//! a few outlier channels). Prints the errors by kind of query.
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::cache::{CacheShape, ValueFormat};
use shadowkv::reference::attention::decode_attention;
use shadowkv::reference::relative_error;
use shadowkv::reference::values::{dequantise_chunk, quantise_sequence};
use shadowkv::{DecodeAttentionShape, RopeConfig, ShadowConfig, ShadowSequence};
use shadowkv_suite::structured::{structured_prompt, structured_values};

const SHAPE: CacheShape = CacheShape {
    layers: 1,
    q_heads: 8,
    kv_heads: 2,
    head_dim: 128,
    rope: RopeConfig::LLAMA_3,
};
const CHUNK: usize = 8;

/// The largest relative error fp8 may have. e4m3 keeps 3 mantissa bits: each value comes
/// back within 2^-4 of itself (about 2.5% RMS here, whatever the scale: a finer scale than
/// per (chunk, head) would not help), so an output that averages few tokens (a query on the
/// needle's chunk, or near one token) keeps about that error divided by the square root of
/// the tokens it averages: 1.0e-2 to 1.9e-2 on this data, against 0.6e-2 to 1.0e-2 for
/// spread attention. The bound catches a broken layout or rounding, not the 1e-2 target.
const FP8_LIMIT: f64 = 2.5e-2;
/// int4 (16 levels per token and group of 64 channels; the outlier channels widen a group's
/// range) is coarser: 4e-2 to 1e-1 here.
const INT4_LIMIT: f64 = 0.12;

/// The values of `values` (`[Hkv, capacity, d]` from `offset`) after a trip through `format`:
/// every whole chunk quantised and read back as bf16, the last partial chunk kept.
fn through_format(
    format: ValueFormat,
    values: &[bf16],
    offset: usize,
    capacity: usize,
    len: usize,
) -> Vec<bf16> {
    let config = ShadowConfig {
        q_heads: SHAPE.q_heads,
        kv_heads: SHAPE.kv_heads,
        head_dim: SHAPE.head_dim,
        chunk_size: CHUNK,
        rank: 16,
        budget_chunks: 1,
    };
    let sequence = ShadowSequence {
        chunks: (len / CHUNK) as u32,
        prompt_len: len as u32,
        ..ShadowSequence::default()
    };
    let d = SHAPE.head_dim;
    let mut bytes =
        vec![0u8; format.packed_bytes(SHAPE.kv_heads, len / CHUNK, CHUNK, SHAPE.head_dim)];
    quantise_sequence(
        format, &config, values, offset, capacity, &sequence, &mut bytes,
    );
    let mut out = values.to_vec();
    for h in 0..SHAPE.kv_heads {
        for chunk in 0..len / CHUNK {
            let back = dequantise_chunk(format, &config, &sequence, &bytes, h, chunk);
            let at = offset + (h * capacity + chunk * CHUNK) * d;
            for (slot, x) in out[at..at + CHUNK * d].iter_mut().zip(back) {
                *slot = bf16::from_f32(x);
            }
        }
    }
    out
}

#[test]
fn compressed_values_keep_attention_outputs_close() {
    let d = SHAPE.head_dim;
    let group = SHAPE.q_heads / SHAPE.kv_heads;
    for (len, seed) in [(4096, 1u64), (16384, 2), (32768, 3), (131_072, 4)] {
        let mut rng = StdRng::seed_from_u64(seed);
        let needle = len / CHUNK / 3;
        let mut prompt = structured_prompt(&mut rng, &SHAPE, len, 16, 0.1, Some(needle), CHUNK);
        let layout = prompt.layout;
        structured_values(&mut rng, &SHAPE, layout, &mut prompt.values, 8, 8.0);
        let capacity = layout.capacity as usize;
        // Queries: one like a random token's key (attention peaked near it), one like the
        // needle's (attention on one chunk), one random (attention spread).
        let key_of = |h: usize, t: usize| -> Vec<f32> {
            let at = layout.offset as usize + (h * capacity + t) * d;
            prompt.keys[at..at + d].iter().map(|x| x.to_f32()).collect()
        };
        let kinds = ["near a token", "the needle", "random"];
        let mut q = Vec::new();
        for kind in 0..kinds.len() {
            let token = rng.gen_range(0..len);
            for head in 0..SHAPE.q_heads {
                let h = head / group;
                let base = match kind {
                    0 => key_of(h, token),
                    1 => key_of(h, needle * CHUNK + 3),
                    _ => vec![0.0; d],
                };
                q.extend(
                    base.iter()
                        .map(|x| bf16::from_f32(x + rng.gen_range(-1.0f32..1.0))),
                );
            }
        }
        let shape = DecodeAttentionShape {
            batch: kinds.len(),
            q_heads: SHAPE.q_heads,
            kv_heads: SHAPE.kv_heads,
            head_dim: d,
        };
        let layouts = vec![layout; kinds.len()];
        let scale = 1.0 / (d as f64).sqrt();
        let attend =
            |values: &[bf16]| decode_attention(&shape, &layouts, &q, &prompt.keys, values, scale);
        let exact = attend(&prompt.values);
        let per_query = SHAPE.q_heads * d;
        for format in [ValueFormat::Fp8, ValueFormat::Int4] {
            let values = through_format(
                format,
                &prompt.values,
                layout.offset as usize,
                capacity,
                len,
            );
            let out = attend(&values);
            let errors: Vec<f64> = (0..kinds.len())
                .map(|b| {
                    let range = b * per_query..(b + 1) * per_query;
                    relative_error(&out[range.clone()], &exact[range])
                })
                .collect();
            let value_error = relative_error(
                &values.iter().map(|x| x.to_f64()).collect::<Vec<_>>(),
                &prompt.values.iter().map(|x| x.to_f64()).collect::<Vec<_>>(),
            );
            println!(
                "{len:>6} tokens, {}: values {value_error:.2e}; attention output {}",
                format.name(),
                kinds
                    .iter()
                    .zip(&errors)
                    .map(|(kind, e)| format!("{kind} {e:.2e}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let limit = match format {
                ValueFormat::Fp8 => FP8_LIMIT,
                _ => INT4_LIMIT,
            };
            for (kind, error) in kinds.iter().zip(&errors) {
                assert!(
                    *error < limit,
                    "{len} tokens, {}, query {kind}: relative error {error:.3e} (limit {limit:e})",
                    format.name()
                );
            }
        }
    }
}
