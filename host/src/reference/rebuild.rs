//! Reference for [`crate::kernels::rebuild`]: `A_rows · Bm_h` in f64, then RoPE in f64.
use half::bf16;

use shadowkv_kernels::rope::{pair_columns, RotaryLayout};

use crate::kernels::shadow::{ShadowConfig, ShadowSequence};

/// Rotate-half RoPE of one whole head `row` at `position`, with the kernels' inverse
/// frequencies.
pub fn rope(row: &mut [f64], position: usize, inverse_frequencies: &[f64]) {
    rope_rotary(
        row,
        position,
        inverse_frequencies,
        &RotaryLayout::full(row.len() as u32),
    );
}

/// RoPE of one head `row` at `position` as `rotary` says (the rotated part, its pairing and
/// the attention factor), with the kernels' `rotary_dim / 2` inverse frequencies.
pub fn rope_rotary(
    row: &mut [f64],
    position: usize,
    inverse_frequencies: &[f64],
    rotary: &RotaryLayout,
) {
    let scale = rotary.attention_factor as f64;
    for (i, frequency) in inverse_frequencies.iter().enumerate() {
        let (low_column, high_column, rotated) = pair_columns(i as u32, rotary);
        let (low_column, high_column) = (low_column as usize, high_column as usize);
        if !rotated || high_column >= row.len() {
            continue;
        }
        let (sin, cos) = (position as f64 * frequency).sin_cos();
        let (sin, cos) = (sin * scale, cos * scale);
        let (low, high) = (row[low_column], row[high_column]);
        row[low_column] = low * cos - high * sin;
        row[high_column] = high * cos + low * sin;
    }
}

/// The `c` post-RoPE keys `[c, d]` of chunk `chunk` of head `h`, rebuilt from `A` and `Bm`
/// (rotate-half RoPE of whole heads).
pub fn chunk_keys(
    config: &ShadowConfig,
    sequence: &ShadowSequence,
    h: usize,
    chunk: u32,
    a: &[bf16],
    bm: &[bf16],
    inverse_frequencies: &[f64],
) -> Vec<f64> {
    let rotary = RotaryLayout::full(config.head_dim as u32);
    let factors = Factors { a, bm };
    chunk_keys_rotary(
        config,
        sequence,
        (h, chunk),
        factors,
        inverse_frequencies,
        &rotary,
    )
}

/// The factors `A` and `Bm` of a layer, as the GPU holds them.
#[derive(Clone, Copy, Debug)]
pub struct Factors<'a> {
    /// bf16 `A` of every sequence.
    pub a: &'a [bf16],
    /// bf16 `Bm` of every sequence.
    pub bm: &'a [bf16],
}

/// [`chunk_keys`] of `(head, chunk)` with the RoPE variant `rotary` (partial rotary, adjacent
/// pairs, an attention factor).
pub fn chunk_keys_rotary(
    config: &ShadowConfig,
    sequence: &ShadowSequence,
    (h, chunk): (usize, u32),
    Factors { a, bm }: Factors<'_>,
    inverse_frequencies: &[f64],
    rotary: &RotaryLayout,
) -> Vec<f64> {
    let (c, d, r) = (config.chunk_size, config.head_dim, config.rank);
    let bm_stride = config.kv_heads * d;
    let mut keys = vec![0.0f64; c * d];
    for t in 0..c {
        let token = chunk as usize * c + t;
        let a_row = &a[sequence.a_offset as usize + token * r..][..r];
        let row = &mut keys[t * d..][..d];
        for (j, out) in row.iter_mut().enumerate() {
            *out = (0..r)
                .map(|i| {
                    a_row[i].to_f64()
                        * bm[sequence.bm_offset as usize + i * bm_stride + h * d + j].to_f64()
                })
                .sum();
        }
        rope_rotary(row, token, inverse_frequencies, rotary);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowkv_kernels::rope::{
        inverse_frequencies, Llama3Scaling, LongRope, RopeConfig, RopeFactors, RopePairing,
    };

    const THETA: f64 = 10_000.0;
    const HEAD_DIM: usize = 16;

    fn row(seed: usize) -> Vec<f64> {
        (0..HEAD_DIM)
            .map(|i| ((i * 37 + seed * 11) % 29) as f64 / 7.0 - 2.0)
            .collect()
    }

    fn factors(values: &[f32]) -> RopeFactors {
        RopeFactors::new(values).unwrap()
    }

    /// Rotates `(x[a], x[b])` by `angle`, scaled by `scale`: the textbook formula.
    fn turn(x: &mut [f64], (a, b): (usize, usize), angle: f64, scale: f64) {
        let (low, high) = (x[a], x[b]);
        x[a] = scale * (low * angle.cos() - high * angle.sin());
        x[b] = scale * (high * angle.cos() + low * angle.sin());
    }

    fn through_reference(config: &RopeConfig, x: &[f64], position: usize) -> Vec<f64> {
        let mut out = x.to_vec();
        let table = inverse_frequencies(config, HEAD_DIM as u32);
        rope_rotary(&mut out, position, &table, &config.layout(HEAD_DIM as u32));
        out
    }

    fn assert_close(actual: &[f64], expected: &[f64], what: &str) {
        for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
            assert!((a - e).abs() < 1e-9, "{what}: element {i}: {a} against {e}");
        }
    }

    const POSITIONS: [usize; 4] = [0, 1, 977, 131_071];

    /// Llama-3.1's `rope_freqs`: frequency `theta^(-2i/d) / factor[i]`, rotate-half.
    #[test]
    fn rope_freqs_factors_match_the_direct_formula() {
        let values: Vec<f32> = (0..HEAD_DIM / 2).map(|i| 1.0 + i as f32 * 0.75).collect();
        let config = RopeConfig {
            factors: Some(factors(&values)),
            ..RopeConfig::new(THETA)
        };
        for (seed, position) in POSITIONS.into_iter().enumerate() {
            let x = row(seed);
            let mut expected = x.clone();
            for (i, factor) in values.iter().enumerate() {
                let frequency = THETA.powf(-2.0 * i as f64 / HEAD_DIM as f64) / *factor as f64;
                turn(
                    &mut expected,
                    (i, i + HEAD_DIM / 2),
                    position as f64 * frequency,
                    1.0,
                );
            }
            assert_close(
                &through_reference(&config, &x, position),
                &expected,
                "rope_freqs",
            );
        }
    }

    /// GLM-4: the first half of the head rotated in adjacent pairs `(2i, 2i + 1)` with
    /// frequencies `theta^(-2i / rotary_dim)`, the second half unchanged.
    #[test]
    fn partial_rotary_adjacent_pairs_match_the_direct_formula() {
        let rotary_dim = HEAD_DIM / 2;
        let config = RopeConfig {
            rotary_dim: rotary_dim as u32,
            pairing: RopePairing::Adjacent,
            ..RopeConfig::new(THETA)
        };
        for (seed, position) in POSITIONS.into_iter().enumerate() {
            let x = row(seed);
            let mut expected = x.clone();
            for i in 0..rotary_dim / 2 {
                let frequency = THETA.powf(-2.0 * i as f64 / rotary_dim as f64);
                turn(
                    &mut expected,
                    (2 * i, 2 * i + 1),
                    position as f64 * frequency,
                    1.0,
                );
            }
            let actual = through_reference(&config, &x, position);
            assert_close(&actual, &expected, "partial adjacent");
            assert_eq!(
                actual[rotary_dim..],
                x[rotary_dim..],
                "the pass-through half"
            );
        }
    }

    /// Partial rotary with rotate-half pairs `(i, i + rotary_dim / 2)` (NeoX style).
    #[test]
    fn partial_rotary_halves_match_the_direct_formula() {
        let rotary_dim = HEAD_DIM / 2;
        let config = RopeConfig {
            rotary_dim: rotary_dim as u32,
            ..RopeConfig::new(THETA)
        };
        for (seed, position) in POSITIONS.into_iter().enumerate() {
            let x = row(seed);
            let mut expected = x.clone();
            for i in 0..rotary_dim / 2 {
                let frequency = THETA.powf(-2.0 * i as f64 / rotary_dim as f64);
                turn(
                    &mut expected,
                    (i, i + rotary_dim / 2),
                    position as f64 * frequency,
                    1.0,
                );
            }
            assert_close(
                &through_reference(&config, &x, position),
                &expected,
                "partial halves",
            );
        }
    }

    /// Phi-3's LongRoPE: the short factors up to the original context, the long past it, and
    /// every rotated pair scaled by the attention factor.
    #[test]
    fn long_rope_matches_the_direct_formula_on_both_sides_of_the_switch() {
        let short: Vec<f32> = (0..HEAD_DIM / 2).map(|i| 1.0 + i as f32 * 0.1).collect();
        let long: Vec<f32> = (0..HEAD_DIM / 2).map(|i| 1.5 + i as f32 * 3.0).collect();
        let attention_factor = LongRope::default_attention_factor(131_072.0, 4096.0);
        assert!((attention_factor - (1.0 + 32f64.ln() / 4096f64.ln()).sqrt()).abs() < 1e-15);
        for (context, expected_factors) in [(4096.0, &short), (131_072.0, &long)] {
            let config = RopeConfig {
                long_rope: Some(LongRope {
                    short_factors: factors(&short),
                    long_factors: factors(&long),
                    original_max_position: 4096.0,
                    context_length: context,
                    attention_factor,
                }),
                ..RopeConfig::new(THETA)
            };
            for (seed, position) in POSITIONS.into_iter().enumerate() {
                let x = row(seed);
                let mut expected = x.clone();
                for (i, factor) in expected_factors.iter().enumerate() {
                    let frequency = THETA.powf(-2.0 * i as f64 / HEAD_DIM as f64) / *factor as f64;
                    let angle = position as f64 * frequency;
                    turn(
                        &mut expected,
                        (i, i + HEAD_DIM / 2),
                        angle,
                        attention_factor,
                    );
                }
                let actual = through_reference(&config, &x, position);
                // The attention factor is carried to the kernels in f32.
                for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
                    assert!(
                        (a - e).abs() < 1e-6 * e.abs().max(1.0),
                        "LongRoPE at context {context}: element {i}: {a} against {e}"
                    );
                }
            }
        }
    }

    /// Llama-3.1 GGUF files carry the llama3 scaling as a `rope_freqs` table: the same
    /// frequencies up to the factors' f32 rounding, 1 for high and 8 for low frequencies.
    #[test]
    fn llama3_scaling_and_its_factor_table_agree() {
        let (theta, head_dim) = (500_000.0, 128);
        let scaled = RopeConfig {
            scaling: Some(Llama3Scaling::LLAMA_3_1),
            ..RopeConfig::new(theta)
        };
        let table = Llama3Scaling::LLAMA_3_1.factors(theta, head_dim);
        let as_factors = RopeConfig {
            factors: Some(table),
            ..RopeConfig::new(theta)
        };
        let (a, b) = (
            inverse_frequencies(&scaled, head_dim),
            inverse_frequencies(&as_factors, head_dim),
        );
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= 1e-7 * x, "frequency {i}: {x} against {y}");
        }
        let values = table.as_slice();
        assert_eq!(values.len(), 64);
        assert_eq!(values[0], 1.0);
        assert_eq!(values[63], 8.0);
        assert!(values.windows(2).all(|w| w[0] <= w[1]));
    }

    /// Bad configurations are refused with the reason.
    #[test]
    fn bad_rope_configurations_are_refused() {
        let odd = RopeConfig {
            rotary_dim: 7,
            ..RopeConfig::new(THETA)
        };
        assert!(odd.check(16).unwrap_err().contains("rotates 7"));
        let short_table = RopeConfig {
            factors: Some(factors(&[1.0; 4])),
            ..RopeConfig::new(THETA)
        };
        assert!(short_table.check(16).unwrap_err().contains("expected 8"));
        assert!(RopeConfig::new(0.5).check(16).is_err());
        assert!(RopeFactors::new(&[1.0; 129]).is_none());
    }

    /// A rank-full factorisation (`A` the keys, `Bm` the identity) rebuilds each chunk's keys
    /// exactly, so rebuild-then-rotate equals rotating the original keys, for every variant.
    #[test]
    fn rank_full_rebuild_equals_rotating_the_keys_for_every_variant() {
        let (kv_heads, c, chunks) = (2usize, 4usize, 5usize);
        let width = kv_heads * HEAD_DIM;
        let config = ShadowConfig {
            q_heads: 2 * kv_heads,
            kv_heads,
            head_dim: HEAD_DIM,
            chunk_size: c,
            rank: width,
            budget_chunks: 2,
        };
        let sequence = ShadowSequence {
            a_offset: 3,
            bm_offset: 5,
            chunks: chunks as u32,
            prompt_len: (chunks * c) as u32,
            ..ShadowSequence::default()
        };
        let keys: Vec<bf16> = (0..chunks * c * width)
            .map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 17.0))
            .collect();
        let mut a = vec![bf16::ZERO; 3];
        a.extend_from_slice(&keys);
        let mut bm = vec![bf16::ZERO; 5];
        bm.extend(
            (0..width * width).map(|i| bf16::from_f32((i / width == i % width) as u8 as f32)),
        );
        let long = factors(
            &(0..HEAD_DIM / 2)
                .map(|i| 1.0 + i as f32)
                .collect::<Vec<_>>(),
        );
        let variants = [
            RopeConfig::new(THETA),
            RopeConfig {
                factors: Some(Llama3Scaling::LLAMA_3_1.factors(THETA, HEAD_DIM as u32)),
                ..RopeConfig::new(THETA)
            },
            RopeConfig {
                rotary_dim: HEAD_DIM as u32 / 2,
                pairing: RopePairing::Adjacent,
                ..RopeConfig::new(THETA)
            },
            RopeConfig {
                long_rope: Some(LongRope {
                    short_factors: long,
                    long_factors: long,
                    original_max_position: 16.0,
                    context_length: 64.0,
                    attention_factor: 1.25,
                }),
                ..RopeConfig::new(THETA)
            },
        ];
        for rope in variants {
            let table = inverse_frequencies(&rope, HEAD_DIM as u32);
            let rotary = rope.layout(HEAD_DIM as u32);
            for h in 0..kv_heads {
                for chunk in 0..chunks as u32 {
                    let rebuilt = chunk_keys_rotary(
                        &config,
                        &sequence,
                        (h, chunk),
                        Factors { a: &a, bm: &bm },
                        &table,
                        &rotary,
                    );
                    for t in 0..c {
                        let token = chunk as usize * c + t;
                        let mut expected: Vec<f64> = keys[token * width + h * HEAD_DIM..]
                            [..HEAD_DIM]
                            .iter()
                            .map(|k| k.to_f64())
                            .collect();
                        rope_rotary(&mut expected, token, &table, &rotary);
                        assert_close(
                            &rebuilt[t * HEAD_DIM..][..HEAD_DIM],
                            &expected,
                            &format!("{rope:?} head {h} chunk {chunk}"),
                        );
                    }
                }
            }
        }
    }
}
