//! Reference for compressed values on the host: the formats the offload writes and the fetch
//! reads back into bf16 slots, so PCIe carries 2x (fp8) or about 3.6x (int4) fewer bytes.
//!
//! - **fp8 (e4m3)**: one f32 scale per (chunk, KV head), `amax / 448` (at least the smallest
//!   normal f32, so that a tiny `amax` never gives a zero scale and 0/0); each value divided
//!   by it (IEEE f32 division) and rounded to the nearest e4m3 value, ties to even,
//!   saturating at ±448 (PTX `cvt.rn.satfinite.e4m3x2.f32`). A finite input never gives NaN.
//! - **int4**: per token, groups of [`INT4_GROUP`] channels, each with an f16 minimum and an
//!   f16 step `(max - min) / 15` (asymmetric, as KIVI quantises values); codes
//!   `round((x - min) / step)` clamped to 0..=15, two per byte, the lower channel in the low
//!   nibble. The minimum and the step are rounded to f16 before the codes are computed, so
//!   decoding with the stored pair reproduces exactly what the encoder aimed at.
//!
//! [`quantise_sequence`] writes a sequence's prompt values into the host layout the kernels
//! share (`shadowkv_kernels::values`: codes `[Hkv, chunks, code_bytes]`, then scales), and
//! [`dequantise_chunk`] reads one chunk back, as the fetch does into a slot.
use half::{bf16, f16};
pub use shadowkv_kernels::values::{packed_chunk, ValueFormat, FP8_MAX, INT4_GROUP};

use crate::kernels::shadow::{ShadowConfig, ShadowSequence};

/// The e4m3 code of NaN with the sign bit clear (`S.1111.111`).
pub const FP8_NAN: u8 = 0x7f;

/// `x` rounded half to even to an integer.
fn round_half_even(x: f64) -> f64 {
    let rounded = x.round();
    if (x - x.trunc()).abs() == 0.5 && rounded % 2.0 != 0.0 {
        rounded - x.signum()
    } else {
        rounded
    }
}

/// The e4m3 code nearest `x` (ties to even), saturating at ±[`FP8_MAX`]; NaN gives
/// [`FP8_NAN`].
pub fn fp8_encode(x: f32) -> u8 {
    if x.is_nan() {
        return FP8_NAN;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let magnitude = f64::from(x.abs());
    if magnitude >= f64::from(FP8_MAX) {
        return sign | 0x7e;
    }
    let smallest_normal = 2f64.powi(-6);
    if magnitude < smallest_normal {
        // Subnormals are multiples of 2^-9; 8 of them is the smallest normal, whose code is 8.
        return sign | round_half_even(magnitude * 512.0) as u8;
    }
    let mut exponent = magnitude.log2().floor() as i32;
    // log2 can land one off at exact powers of two in floating point.
    if 2f64.powi(exponent) > magnitude {
        exponent -= 1;
    } else if 2f64.powi(exponent + 1) <= magnitude {
        exponent += 1;
    }
    let mut mantissa = round_half_even((magnitude / 2f64.powi(exponent) - 1.0) * 8.0) as i32;
    if mantissa == 8 {
        exponent += 1;
        mantissa = 0;
    }
    // Below 448 the largest exponent (8) never rounds to mantissa 7 (480, the NaN code).
    sign | (((exponent + 7) as u8) << 3) | mantissa as u8
}

/// The value of e4m3 code `code` (NaN for `S.1111.111`).
pub fn fp8_decode(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((code >> 3) & 0xf);
    let mantissa = f64::from(code & 0x7);
    if exponent == 15 && mantissa == 7.0 {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        mantissa / 8.0 * 2f64.powi(-6)
    } else {
        (1.0 + mantissa / 8.0) * 2f64.powi(exponent - 7)
    };
    (sign * magnitude) as f32
}

/// One (chunk, KV head)'s values in fp8: the codes and the scale.
pub fn fp8_quantise(values: &[f32]) -> (Vec<u8>, f32) {
    let amax = values
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = if amax > 0.0 {
        (amax / FP8_MAX).max(f32::MIN_POSITIVE)
    } else {
        1.0
    };
    let codes = values.iter().map(|&x| fp8_encode(x / scale)).collect();
    (codes, scale)
}

/// The values `fp8_quantise` encoded.
pub fn fp8_dequantise(codes: &[u8], scale: f32) -> Vec<f32> {
    codes.iter().map(|&c| fp8_decode(c) * scale).collect()
}

/// One token's values (`head_dim` of them, a multiple of 2) in int4: the packed codes and, per
/// group of [`INT4_GROUP`] channels (the last may be shorter), its f16 minimum and step.
pub fn int4_quantise(values: &[f32]) -> (Vec<u8>, Vec<(f16, f16)>) {
    let mut codes = vec![0u8; values.len().div_ceil(2)];
    let mut groups = Vec::new();
    for (g, group) in values.chunks(INT4_GROUP).enumerate() {
        // Strict comparisons, first value kept on ties (so -0 and +0 pick as the kernel does).
        let finite = || group.iter().copied().filter(|x| x.is_finite());
        let min = finite().fold(f32::INFINITY, |m, x| if x < m { x } else { m });
        let max = finite().fold(f32::NEG_INFINITY, |m, x| if x > m { x } else { m });
        let (min, max) = if min.is_finite() {
            (min, max)
        } else {
            (0.0, 0.0)
        };
        let min = f16::from_f32(min);
        let step = f16::from_f32((max - min.to_f32()) / 15.0);
        let divisor = if step.to_f32() > 0.0 {
            step.to_f32()
        } else {
            1.0
        };
        for (i, &x) in group.iter().enumerate() {
            let level = round_half_even(f64::from((x - min.to_f32()) / divisor));
            let code = if level.is_nan() {
                0
            } else {
                level.clamp(0.0, 15.0) as u8
            };
            let at = g * INT4_GROUP + i;
            codes[at / 2] |= code << (4 * (at % 2));
        }
        groups.push((min, step));
    }
    (codes, groups)
}

/// The `len` values `int4_quantise` encoded.
pub fn int4_dequantise(codes: &[u8], groups: &[(f16, f16)], len: usize) -> Vec<f32> {
    (0..len)
        .map(|at| {
            let code = (codes[at / 2] >> (4 * (at % 2))) & 0xf;
            let (min, step) = groups[at / INT4_GROUP];
            min.to_f32() + f32::from(code) * step.to_f32()
        })
        .collect()
}

/// Writes the prompt values of `sequence` (bf16 `[Hkv, capacity, d]` of `source`, from
/// element `source_offset`) into its compressed range of `target` (bytes, from
/// `sequence.host_value_offset`): the chunks a miss may name, `sequence.chunks` per head.
/// (Bf16 here is the same layout with no scales; the cache keeps bf16 values as
/// `[Hkv, prompt_len, d]` elements instead.)
pub fn quantise_sequence(
    format: ValueFormat,
    config: &ShadowConfig,
    source: &[bf16],
    source_offset: usize,
    capacity: usize,
    sequence: &ShadowSequence,
    target: &mut [u8],
) {
    let (heads, c, d) = (config.kv_heads, config.chunk_size, config.head_dim);
    for h in 0..heads {
        for chunk in 0..sequence.chunks as usize {
            let first = source_offset + (h * capacity + chunk * c) * d;
            let values: Vec<f32> = source[first..first + c * d]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let place = packed_chunk(
                format,
                sequence,
                heads as u32,
                h as u32,
                chunk as u32,
                c as u32,
                d as u32,
            );
            let (codes, scales) = (place.codes as usize, place.scales as usize);
            match format {
                ValueFormat::Bf16 => {
                    for (i, x) in source[first..first + c * d].iter().enumerate() {
                        target[codes + 2 * i..codes + 2 * i + 2]
                            .copy_from_slice(&x.to_bits().to_le_bytes());
                    }
                }
                ValueFormat::Fp8 => {
                    let (chunk_codes, scale) = fp8_quantise(&values);
                    target[codes..codes + c * d].copy_from_slice(&chunk_codes);
                    target[scales..scales + 4].copy_from_slice(&scale.to_le_bytes());
                }
                ValueFormat::Int4 => {
                    let groups = d.div_ceil(INT4_GROUP);
                    for (t, token) in values.chunks(d).enumerate() {
                        let (token_codes, pairs) = int4_quantise(token);
                        let at = codes + t * d / 2;
                        target[at..at + d / 2].copy_from_slice(&token_codes);
                        for (g, (min, step)) in pairs.iter().enumerate() {
                            let at = scales + (t * groups + g) * 4;
                            target[at..at + 2].copy_from_slice(&min.to_bits().to_le_bytes());
                            target[at + 2..at + 4].copy_from_slice(&step.to_bits().to_le_bytes());
                        }
                    }
                }
            }
        }
    }
}

/// The `c * d` values of chunk `chunk` of head `h` of `sequence` read back from its
/// compressed range of `bytes` (as f32, before the slot's bf16 rounding).
pub fn dequantise_chunk(
    format: ValueFormat,
    config: &ShadowConfig,
    sequence: &ShadowSequence,
    bytes: &[u8],
    h: usize,
    chunk: usize,
) -> Vec<f32> {
    let (heads, c, d) = (config.kv_heads, config.chunk_size, config.head_dim);
    let place = packed_chunk(
        format,
        sequence,
        heads as u32,
        h as u32,
        chunk as u32,
        c as u32,
        d as u32,
    );
    let (codes, scales) = (place.codes as usize, place.scales as usize);
    match format {
        ValueFormat::Bf16 => bytes[codes..codes + 2 * c * d]
            .chunks(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        ValueFormat::Fp8 => {
            let scale = f32::from_le_bytes(bytes[scales..scales + 4].try_into().unwrap());
            fp8_dequantise(&bytes[codes..codes + c * d], scale)
        }
        ValueFormat::Int4 => {
            let groups = d.div_ceil(INT4_GROUP);
            let half = |at: usize| f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
            (0..c)
                .flat_map(|t| {
                    let pairs: Vec<(f16, f16)> = (0..groups)
                        .map(|g| {
                            let at = scales + (t * groups + g) * 4;
                            (half(at), half(at + 2))
                        })
                        .collect();
                    let at = codes + t * d / 2;
                    int4_dequantise(&bytes[at..at + d / 2], &pairs, d)
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fp8_codes_decode_to_the_e4m3_values() {
        assert_eq!(fp8_decode(0x00), 0.0);
        assert_eq!(fp8_decode(0x01), 2f32.powi(-9));
        assert_eq!(fp8_decode(0x08), 2f32.powi(-6));
        assert_eq!(fp8_decode(0x38), 1.0);
        assert_eq!(fp8_decode(0x7e), 448.0);
        assert_eq!(fp8_decode(0xfe), -448.0);
        assert!(fp8_decode(FP8_NAN).is_nan() && fp8_decode(0xff).is_nan());
    }

    #[test]
    fn every_finite_code_round_trips() {
        for code in 0..=255u8 {
            let value = fp8_decode(code);
            if value.is_nan() {
                continue;
            }
            let back = fp8_encode(value);
            // Zero's two codes both decode to zero.
            assert!(
                back == code || value == 0.0,
                "code {code:#x}: {value} -> {back:#x}"
            );
        }
    }

    /// Codes that ml_dtypes' `float8_e4m3fn` gives for the same inputs (inside the range,
    /// where its conversion and the saturating one agree).
    #[test]
    fn fp8_matches_an_independent_encoder() {
        let cases = [
            (1.0625f32, 0x38u8),
            (1.1875, 0x3a),
            (1.5 * 2f32.powi(-9), 0x02),
            (447.9, 0x7e),
            (0.3, 0x2a),
            (-0.0137, 0x87),
            (2f32.powi(-10), 0x00),
            (3.0 * 2f32.powi(-11), 0x01),
        ];
        for (x, code) in cases {
            assert_eq!(fp8_encode(x), code, "{x}");
        }
    }

    #[test]
    fn fp8_rounds_ties_to_even_and_saturates() {
        // 1 + 1/16 lies halfway between 1 (mantissa 0) and 1.125 (mantissa 1): even is 0.
        assert_eq!(fp8_decode(fp8_encode(1.0625)), 1.0);
        // 1.1875 lies halfway between 1.125 (1) and 1.25 (2): even is 2.
        assert_eq!(fp8_decode(fp8_encode(1.1875)), 1.25);
        // Halfway between subnormals 2^-9 and 2 * 2^-9: even is 2.
        assert_eq!(fp8_encode(1.5 * 2f32.powi(-9)), 0x02);
        assert_eq!(fp8_decode(fp8_encode(460.0)), 448.0);
        assert_eq!(fp8_decode(fp8_encode(1e30)), 448.0);
        assert_eq!(fp8_decode(fp8_encode(f32::INFINITY)), 448.0);
        assert_eq!(fp8_decode(fp8_encode(-1e30)), -448.0);
        assert!(fp8_decode(fp8_encode(f32::NAN)).is_nan());
    }

    #[test]
    fn chunk_bytes_count_the_scales() {
        assert_eq!(ValueFormat::Bf16.chunk_bytes(8, 128), 2048);
        assert_eq!(ValueFormat::Fp8.chunk_bytes(8, 128), 1028);
        assert_eq!(ValueFormat::Int4.chunk_bytes(8, 128), 512 + 64);
        // A head_dim of 80: one group of 64 and one of 16 per token.
        assert_eq!(ValueFormat::Int4.chunk_bytes(5, 80), 200 + 5 * 2 * 4);
        assert_eq!(ValueFormat::Fp8.chunk_bytes(5, 80), 404);
        // A sequence's range is rounded up to 16 bytes: 3 * 7 * 404 = 8484 -> 8496.
        assert_eq!(ValueFormat::Fp8.packed_bytes(3, 7, 5, 80), 8496);
        assert_eq!(ValueFormat::Int4.packed_bytes(8, 10, 8, 128), 8 * 10 * 576);
    }

    /// The sm_80 kernels' integer conversions give the reference's codes and values: every
    /// code, every midpoint between neighbouring e4m3 values and one f32 step either side,
    /// the saturation edge, subnormals, and a sweep over the f32 bit patterns.
    #[test]
    fn the_software_fp8_conversion_matches_the_reference() {
        use shadowkv_kernels::values::{fp8_decode_bits, fp8_encode_bits};
        for code in 0..=255u8 {
            let (reference, software) = (fp8_decode(code), fp8_decode_bits(code));
            assert!(
                reference.to_bits() == software.to_bits()
                    || (reference.is_nan() && software.is_nan()),
                "code {code:#x}: {reference} against {software}"
            );
        }
        let finite: Vec<f32> = (0..=0x7eu8).map(fp8_decode).collect();
        let step = |x: f32, by: i32| f32::from_bits((x.to_bits() as i32 + by) as u32);
        let mut probes = vec![
            0.0,
            448.0,
            step(448.0, -1),
            step(448.0, 1),
            464.0,
            480.0,
            1e30,
            f32::MAX,
            f32::INFINITY,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
        ];
        for pair in finite.windows(2) {
            let middle = (pair[0] + pair[1]) / 2.0;
            probes.extend([pair[0], middle, step(middle, -1), step(middle, 1)]);
        }
        probes.extend((0..0x7f80_0000u32).step_by(4099).map(f32::from_bits));
        for x in probes {
            for signed in [x, -x] {
                assert_eq!(
                    fp8_encode_bits(signed),
                    fp8_encode(signed),
                    "{signed:e} ({:#x})",
                    signed.to_bits()
                );
            }
        }
        assert_eq!(fp8_encode_bits(f32::NAN), FP8_NAN);
    }

    /// A chunk's largest magnitude saturates to ±448 exactly, and no finite chunk gives NaN:
    /// not one whose largest magnitude is subnormal (its scale would underflow to 0).
    #[test]
    fn fp8_chunks_saturate_at_their_largest_value_and_never_give_nan() {
        let (codes, scale) = fp8_quantise(&[0.5, -3.0, 1.0, f32::INFINITY, 2.0]);
        assert_eq!(scale, 3.0 / 448.0);
        assert_eq!(codes[1], 0xfe);
        assert_eq!(fp8_decode(codes[3]), 448.0);
        for tiny in [f32::from_bits(1), 1e-40, 1e-38] {
            let (codes, scale) = fp8_quantise(&[tiny, -tiny / 2.0, 0.0]);
            assert!(scale > 0.0, "{tiny:e}");
            let back = fp8_dequantise(&codes, scale);
            assert!(back.iter().all(|x| x.is_finite()), "{tiny:e}: {back:?}");
        }
    }

    /// A small layer's sequence for the layout tests: 3 KV heads, d 80 (int4 groups of 64
    /// and 16), chunks of 5 tokens, a source with a spare row and an offset.
    fn layout_case(seed: u64) -> (ShadowConfig, ShadowSequence, Vec<bf16>, usize, usize) {
        let config = ShadowConfig {
            q_heads: 6,
            kv_heads: 3,
            head_dim: 80,
            chunk_size: 5,
            rank: 16,
            budget_chunks: 2,
        };
        let sequence = ShadowSequence {
            host_value_offset: 48,
            chunks: 7,
            prompt_len: 38,
            ..ShadowSequence::default()
        };
        let (source_offset, capacity) = (16, 39);
        let len = source_offset + config.kv_heads * capacity * config.head_dim;
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        // Channels of different scales, as real values have.
        let source = (0..len)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let unit = (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                let scale = if i % config.head_dim % 17 == 3 {
                    6.0
                } else {
                    0.7
                };
                bf16::from_f32(unit * scale)
            })
            .collect();
        (config, sequence, source, source_offset, capacity)
    }

    /// The layer quantisation writes each chunk's codes and scales where the layout says
    /// (codes `[Hkv, chunks, code_bytes]` then scales), exactly what the per-chunk and
    /// per-token quantisers give, and nothing outside the sequence's range.
    #[test]
    fn quantised_sequences_land_in_their_layout() {
        for format in [ValueFormat::Fp8, ValueFormat::Int4] {
            let (config, sequence, source, source_offset, capacity) = layout_case(7);
            let (heads, c, d) = (config.kv_heads, config.chunk_size, config.head_dim);
            let start = sequence.host_value_offset as usize;
            let packed = format.packed_bytes(heads, sequence.chunks as usize, c, d);
            assert_eq!(packed % 16, 0);
            let poison = 0xa5u8;
            let mut target = vec![poison; start + packed + 32];
            quantise_sequence(
                format,
                &config,
                &source,
                source_offset,
                capacity,
                &sequence,
                &mut target,
            );
            assert!(target[..start].iter().all(|&b| b == poison));
            assert!(target[start + packed..].iter().all(|&b| b == poison));
            let code_bytes = format.code_bytes(c, d);
            let scales_start = start + heads * sequence.chunks as usize * code_bytes;
            for h in 0..heads {
                for chunk in 0..sequence.chunks as usize {
                    let index = h * sequence.chunks as usize + chunk;
                    let first = source_offset + (h * capacity + chunk * c) * d;
                    let values: Vec<f32> = source[first..first + c * d]
                        .iter()
                        .map(|x| x.to_f32())
                        .collect();
                    let codes = &target[start + index * code_bytes..][..code_bytes];
                    let back = dequantise_chunk(format, &config, &sequence, &target, h, chunk);
                    match format {
                        ValueFormat::Fp8 => {
                            let (expected, scale) = fp8_quantise(&values);
                            assert_eq!(codes, &expected[..]);
                            let stored = &target[scales_start + index * 4..][..4];
                            assert_eq!(stored, &scale.to_le_bytes());
                            assert_eq!(back, fp8_dequantise(&expected, scale));
                        }
                        _ => {
                            let scale_bytes = format.scale_bytes(c, d);
                            let scales = &target[scales_start + index * scale_bytes..];
                            for (t, token) in values.chunks(d).enumerate() {
                                let (expected, groups) = int4_quantise(token);
                                assert_eq!(&codes[t * d / 2..(t + 1) * d / 2], &expected[..]);
                                for (g, (min, step)) in groups.iter().enumerate() {
                                    let at = (t * 2 + g) * 4;
                                    assert_eq!(&scales[at..at + 2], &min.to_bits().to_le_bytes());
                                    assert_eq!(
                                        &scales[at + 2..at + 4],
                                        &step.to_bits().to_le_bytes()
                                    );
                                }
                                assert_eq!(
                                    &back[t * d..(t + 1) * d],
                                    &int4_dequantise(&expected, &groups, d)[..]
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    proptest! {
        /// The nearest e4m3 value: no other finite code is closer to the input.
        #[test]
        fn fp8_picks_the_nearest_value(x in -500.0f32..500.0) {
            let chosen = fp8_decode(fp8_encode(x));
            prop_assert!(chosen.is_finite());
            let distance = (f64::from(chosen) - f64::from(x.clamp(-FP8_MAX, FP8_MAX))).abs();
            for code in 0..=255u8 {
                let other = fp8_decode(code);
                if other.is_finite() {
                    let clamped = f64::from(x.clamp(-FP8_MAX, FP8_MAX));
                    prop_assert!((f64::from(other) - clamped).abs() >= distance);
                }
            }
        }

        /// A chunk's values come back within half an e4m3 step of their magnitude (relative
        /// 2^-4 for normals, 2^-10 of the scale below them), and never as NaN.
        #[test]
        fn fp8_chunks_round_trip(values in prop::collection::vec(-1e4f32..1e4, 1..1024)) {
            let (codes, scale) = fp8_quantise(&values);
            for (x, y) in values.iter().zip(fp8_dequantise(&codes, scale)) {
                prop_assert!(y.is_finite());
                let bound = x.abs() / 16.0 + scale * 2f32.powi(-10);
                prop_assert!((x - y).abs() <= bound * 1.0001, "{x} -> {y}, scale {scale}");
            }
        }

        /// A token's values come back within half a step, plus the f16 rounding of the
        /// minimum and the step.
        #[test]
        fn int4_tokens_round_trip(values in prop::collection::vec(-8.0f32..8.0, 128)) {
            let (codes, groups) = int4_quantise(&values);
            prop_assert_eq!(codes.len(), 64);
            prop_assert_eq!(groups.len(), 128 / INT4_GROUP);
            let back = int4_dequantise(&codes, &groups, values.len());
            for (at, (x, y)) in values.iter().zip(&back).enumerate() {
                let (_, step) = groups[at / INT4_GROUP];
                // f16 rounding: the minimum by up to 2^-8 here, the step by 2^-11 of it.
                let bound = step.to_f32() / 2.0 + 1.5 * 2f32.powi(-7);
                prop_assert!((x - y).abs() <= bound, "{x} -> {y}, step {step}");
            }
        }
    }
}
