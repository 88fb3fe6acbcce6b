//! GPU equivalence of the decoder-layer kernels (`layer`) and greedy sampling (`sampling`)
//! against their f64 CPU references, on random shapes with poisoned outputs.
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use half::bf16;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::decode_step::inverse_frequencies;
use shadowkv::kernels::layer::kernel_layout::TokenPlacement;
use shadowkv::kernels::layer::{self, GatedActivation, QkvShape, TokenPlan};
use shadowkv::linear::Linear;
use shadowkv::reference::{self, relative_error};
use shadowkv::{Error, Gpu, RotaryLayout, SequenceLayout};
use shadowkv_suite::rope_variants::{next_variant, rope_variant};
use shadowkv_suite::{poisoned, proptest_runner, random_bf16, run_gpu_tests, to_f64, POISON};

/// bf16 outputs of f32 arithmetic.
const TOLERANCE: f64 = 1e-2;

fn main() {
    run_gpu_tests(&[
        ("embedding_and_rms_norm_match_reference", embedding_and_norm),
        (
            "rope_qkv_matches_reference_on_ragged_batches",
            rope_qkv_cases,
        ),
        (
            "gated_activations_and_linear_match_reference",
            gated_activations_and_linear,
        ),
        ("argmax_matches_reference_with_ties", argmax_cases),
        ("random_fill_matches_reference", random_fill),
        ("layer_kernels_reject_bad_input", rejects_bad_input),
    ])
}

fn runner() -> TestRunner {
    proptest_runner(24)
}

fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

fn fail(error: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(error.to_string())
}

fn random_f32(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

fn widen_f32(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

fn embedding_and_norm(gpu: &Gpu) -> Result<(), String> {
    let stream = gpu.stream();
    let worst = std::cell::Cell::new(0.0f64);
    runner()
        .run(
            &(
                1usize..40,
                1usize..3000,
                2usize..600,
                any::<u64>(),
                any::<bool>(),
            ),
            |(tokens, hidden, vocab, seed, with_delta)| {
                let mut rng = StdRng::seed_from_u64(seed);
                let table = random_bf16(&mut rng, vocab * hidden, 2.0);
                let ids: Vec<u32> = (0..tokens)
                    .map(|_| rng.gen_range(0..vocab as u32))
                    .collect();
                let d_table = stream.clone_htod(&table).map_err(fail)?;
                let d_ids = stream.clone_htod(&ids).map_err(fail)?;
                let mut d_x = stream
                    .clone_htod(&vec![f32::NAN; tokens * hidden])
                    .map_err(fail)?;
                // Half the cases scale the rows (Gemma's sqrt(hidden), a power of two or not).
                let scale = if seed % 2 == 0 {
                    1.0
                } else {
                    (hidden as f32).sqrt()
                };
                layer::embedding_scaled(
                    gpu,
                    stream,
                    &d_table,
                    hidden,
                    (&ids, &d_ids),
                    scale,
                    &mut d_x,
                )
                .map_err(fail)?;
                let x = stream.clone_dtoh(&d_x).map_err(fail)?;
                let expected = reference::layer::embedding_scaled(&table, hidden, &ids, scale);
                let embedding_error = relative_error(&widen_f32(&x), &expected);
                prop_assert!(
                    embedding_error < 1e-7,
                    "embedding (scale {scale}) {embedding_error:.3e}"
                );

                let delta = random_f32(&mut rng, tokens * hidden, 1.0);
                let weight = random_f32(&mut rng, hidden, 1.5);
                let d_delta = stream.clone_htod(&delta).map_err(fail)?;
                let d_weight = stream.clone_htod(&weight).map_err(fail)?;
                let delta_weight = random_f32(&mut rng, hidden, 1.5);
                let d_delta_weight = stream.clone_htod(&delta_weight).map_err(fail)?;
                let mut d_out = poisoned(gpu, tokens * hidden).map_err(fail)?;
                let eps = 1e-5;
                // With a delta, a third of the cases normalise it first (Gemma's post-norms).
                let normed_delta = with_delta && seed % 3 == 0;
                if normed_delta {
                    layer::rms_norm_normed_delta(
                        gpu,
                        stream,
                        &mut d_x,
                        &d_delta,
                        &d_delta_weight,
                        &d_weight,
                        eps,
                        &mut d_out,
                    )
                } else {
                    layer::rms_norm(
                        gpu,
                        stream,
                        &mut d_x,
                        with_delta.then_some(&d_delta),
                        &d_weight,
                        eps,
                        &mut d_out,
                    )
                }
                .map_err(fail)?;
                let (residual, normed) = if normed_delta {
                    reference::layer::rms_norm_normed_delta(&x, &delta, &delta_weight, &weight, eps)
                } else {
                    reference::layer::rms_norm(
                        &x,
                        with_delta.then_some(delta.as_slice()),
                        &weight,
                        eps,
                    )
                };
                let residual_error = relative_error(
                    &widen_f32(&stream.clone_dtoh(&d_x).map_err(fail)?),
                    &residual,
                );
                let norm_error =
                    relative_error(&to_f64(&stream.clone_dtoh(&d_out).map_err(fail)?), &normed);
                worst.set(worst.get().max(norm_error));
                prop_assert!(
                    residual_error < 1e-6,
                    "residual {residual_error:.3e} (normed delta {normed_delta})"
                );
                prop_assert!(
                    norm_error < TOLERANCE,
                    "rms_norm {norm_error:.3e} ({tokens} x {hidden})"
                );
                Ok(())
            },
        )
        .map_err(|f| f.to_string())?;
    eprintln!(
        "embedding exact; rms_norm worst relative error {:.3e}",
        worst.get()
    );
    Ok(())
}

/// A ragged batch: per sequence a KV block with spare rows, and tokens placed at random
/// positions (a prefill chunk for one, single decode tokens for the others).
fn rope_qkv_cases(gpu: &Gpu) -> Result<(), String> {
    let stream = gpu.stream();
    let worst = std::cell::Cell::new(0.0f64);
    let strategy = (
        1usize..5,
        prop::sample::select(vec![1usize, 2, 3, 4, 8]),
        1usize..4,
        prop::sample::select(vec![64usize, 128, 256, 32, 2]),
        any::<u64>(),
        any::<bool>(),
    );
    runner()
        .run(
            &strategy,
            |(sequences, group, kv_heads, head_dim, seed, with_bias)| {
                let mut rng = StdRng::seed_from_u64(seed);
                let shape = QkvShape {
                    heads: group * kv_heads,
                    kv_heads,
                    head_dim,
                };
                let mut layouts = Vec::new();
                let mut offset = 0u64;
                for _ in 0..sequences {
                    let capacity = rng.gen_range(1..3000u32);
                    layouts.push(SequenceLayout {
                        offset,
                        capacity,
                        len: capacity,
                    });
                    offset += (kv_heads * capacity as usize * head_dim) as u64 + 8;
                }
                let mut placements = Vec::new();
                for (b, l) in layouts.iter().enumerate() {
                    let count = if b == 0 {
                        rng.gen_range(1..=l.capacity.min(300))
                    } else {
                        1
                    };
                    let first = rng.gen_range(0..=l.capacity - count);
                    placements.extend(
                        (first..first + count)
                            .map(|position| TokenPlacement::new(b as u32, position)),
                    );
                    // A staged token: its RoPE position past the block, its row inside.
                    if b > 0 && rng.gen_bool(0.5) {
                        let position = l.capacity + rng.gen_range(0..5000);
                        placements.push(
                            TokenPlacement::new(b as u32, position)
                                .with_cache_row(rng.gen_range(0..l.capacity)),
                        );
                        placements.swap_remove(placements.len() - 2);
                    }
                }
                let tokens = placements.len();
                let qkv = random_f32(&mut rng, tokens * shape.width(), 2.0);
                let bias = random_f32(&mut rng, shape.width(), 0.5);
                // Every RoPE variant: scaled, rope_freqs factors, partial rotary with either
                // pairing, LongRoPE with its attention factor.
                let rope = rope_variant(&mut rng, head_dim, next_variant());
                let frequencies = inverse_frequencies(&rope, head_dim as u32);
                let rotary = rope.layout(head_dim as u32);
                let cache = vec![POISON; offset as usize];
                let plan = TokenPlan::new(stream, shape, &placements, &layouts).map_err(fail)?;
                let d_qkv = stream.clone_htod(&qkv).map_err(fail)?;
                let d_bias = stream.clone_htod(&bias).map_err(fail)?;
                let d_frequencies = stream.clone_htod(&frequencies).map_err(fail)?;
                let mut d_q = poisoned(gpu, tokens * shape.heads * head_dim).map_err(fail)?;
                let mut d_k = stream.clone_htod(&cache).map_err(fail)?;
                let mut d_v = stream.clone_htod(&cache).map_err(fail)?;
                let mut d_pre = poisoned(gpu, tokens * kv_heads * head_dim).map_err(fail)?;
                let with_pre_rope = seed % 3 != 0;
                // Half the cases norm the query and key heads first (Gemma-3's QK norm).
                let with_qk_norm = seed % 4 < 2;
                let q_weight = random_f32(&mut rng, head_dim, 1.5);
                let k_weight = random_f32(&mut rng, head_dim, 1.5);
                let norm_eps = 1e-6;
                let (d_q_weight, d_k_weight) = (
                    stream.clone_htod(&q_weight).map_err(fail)?,
                    stream.clone_htod(&k_weight).map_err(fail)?,
                );
                let input = layer::QkvInput {
                    qkv: &d_qkv,
                    bias: with_bias.then_some(&d_bias),
                    qk_norm: with_qk_norm.then_some(layer::QkNorm {
                        q_weight: &d_q_weight,
                        k_weight: &d_k_weight,
                        eps: norm_eps,
                    }),
                };
                layer::rope_qkv_normed(
                    gpu,
                    stream,
                    &plan,
                    input,
                    (&d_frequencies, rotary),
                    &mut d_q,
                    (&mut d_k, &mut d_v),
                    with_pre_rope.then_some(&mut d_pre.slice_mut(..)),
                )
                .map_err(fail)?;
                let (mut k_ref, mut v_ref) = (to_f64(&cache), to_f64(&cache));
                let (q_ref, pre_ref) = reference::layer::rope_qkv(
                    shape,
                    &qkv,
                    with_bias.then_some(bias.as_slice()),
                    with_qk_norm.then_some((q_weight.as_slice(), k_weight.as_slice(), norm_eps)),
                    (&frequencies, &rotary),
                    &placements,
                    &layouts,
                    &mut k_ref,
                    &mut v_ref,
                );
                let q_error =
                    relative_error(&to_f64(&stream.clone_dtoh(&d_q).map_err(fail)?), &q_ref);
                // Compare the written rows (NaN poison elsewhere must stay NaN: untouched).
                let (k, v) = (
                    to_f64(&stream.clone_dtoh(&d_k).map_err(fail)?),
                    to_f64(&stream.clone_dtoh(&d_v).map_err(fail)?),
                );
                let written: Vec<usize> =
                    (0..k_ref.len()).filter(|&i| !k_ref[i].is_nan()).collect();
                prop_assert!(
                    (0..k.len()).all(|i| k_ref[i].is_nan() == k[i].is_nan()
                        && v_ref[i].is_nan() == v[i].is_nan()),
                    "wrote outside the placed rows"
                );
                let pick = |x: &[f64]| written.iter().map(|&i| x[i]).collect::<Vec<_>>();
                let k_error = relative_error(&pick(&k), &pick(&k_ref));
                let v_error = relative_error(&pick(&v), &pick(&v_ref));
                let pre = to_f64(&stream.clone_dtoh(&d_pre).map_err(fail)?);
                let pre_error = if with_pre_rope {
                    relative_error(&pre, &pre_ref)
                } else {
                    // Not asked for: left untouched (still the poison).
                    prop_assert!(pre.iter().all(|x| x.is_nan()), "wrote unasked pre-RoPE keys");
                    0.0
                };
                let error = q_error.max(k_error).max(v_error).max(pre_error);
                worst.set(worst.get().max(error));
                prop_assert!(
                    error < TOLERANCE,
                    "q {q_error:.3e} k {k_error:.3e} v {v_error:.3e} pre-RoPE k {pre_error:.3e} ({shape:?}, {tokens} tokens, QK norm {with_qk_norm}, {rope:?})"
                );
                Ok(())
            },
        )
        .map_err(|f| f.to_string())?;
    eprintln!("rope_qkv worst relative error {:.3e}", worst.get());
    Ok(())
}

fn gated_activations_and_linear(gpu: &Gpu) -> Result<(), String> {
    let stream = gpu.stream();
    let linear = Linear::new(stream.clone()).map_err(s)?;
    let worst = std::cell::Cell::new(0.0f64);
    runner()
        .run(
            &(1usize..70, 1usize..700, 1usize..500, any::<u64>()),
            |(rows, inputs, outputs, seed)| {
                let mut rng = StdRng::seed_from_u64(seed);
                let gate_up = random_f32(&mut rng, rows * 2 * outputs, 4.0);
                let d_gate_up = stream.clone_htod(&gate_up).map_err(fail)?;
                let mut d_out = poisoned(gpu, rows * outputs).map_err(fail)?;
                let activation = if seed % 2 == 0 {
                    GatedActivation::Silu
                } else {
                    GatedActivation::GeluTanh
                };
                layer::gated_activation(gpu, stream, &d_gate_up, &mut d_out, outputs, activation)
                    .map_err(fail)?;
                let silu_error = relative_error(
                    &to_f64(&stream.clone_dtoh(&d_out).map_err(fail)?),
                    &reference::layer::gated_activation(&gate_up, outputs, activation),
                );

                let x = random_bf16(&mut rng, rows * inputs, 1.0);
                let w = random_bf16(&mut rng, outputs * inputs, 1.0);
                let (d_x, d_w) = (
                    stream.clone_htod(&x).map_err(fail)?,
                    stream.clone_htod(&w).map_err(fail)?,
                );
                let mut d_y = stream
                    .clone_htod(&vec![f32::NAN; rows * outputs])
                    .map_err(fail)?;
                linear.forward(&d_x, &d_w, inputs, &mut d_y).map_err(fail)?;
                let expected: Vec<f64> = (0..rows * outputs)
                    .map(|e| {
                        let (r, o) = (e / outputs, e % outputs);
                        (0..inputs)
                            .map(|i| x[r * inputs + i].to_f64() * w[o * inputs + i].to_f64())
                            .sum()
                    })
                    .collect();
                let linear_error = relative_error(
                    &widen_f32(&stream.clone_dtoh(&d_y).map_err(fail)?),
                    &expected,
                );
                worst.set(worst.get().max(silu_error).max(linear_error));
                prop_assert!(
                    silu_error < TOLERANCE && linear_error < 1e-4,
                    "{activation:?} {silu_error:.3e}, linear (f32 out) {linear_error:.3e}"
                );
                Ok(())
            },
        )
        .map_err(|f| f.to_string())?;
    eprintln!(
        "gated activations (SiLU, tanh-GELU) and cuBLAS linear worst relative error {:.3e}",
        worst.get()
    );
    Ok(())
}

fn argmax_cases(gpu: &Gpu) -> Result<(), String> {
    let stream = gpu.stream();
    runner()
        .run(
            &(1usize..9, 1usize..160_000, any::<u64>()),
            |(rows, vocab, seed)| {
                let mut rng = StdRng::seed_from_u64(seed);
                // Few distinct values, so the maximum is tied across many indices.
                let mut logits: Vec<f32> = (0..rows * vocab)
                    .map(|_| rng.gen_range(-20..20) as f32 * 0.5)
                    .collect();
                if vocab > 3 {
                    logits[1] = f32::NAN;
                }
                let d_logits = stream.clone_htod(&logits).map_err(fail)?;
                let mut d_out = stream.clone_htod(&vec![u32::MAX; rows]).map_err(fail)?;
                shadowkv::kernels::sampling::argmax(gpu, stream, &d_logits, vocab, &mut d_out)
                    .map_err(fail)?;
                prop_assert_eq!(
                    stream.clone_dtoh(&d_out).map_err(fail)?,
                    reference::sampling::argmax(&logits, vocab)
                );
                Ok(())
            },
        )
        .map_err(|f| f.to_string())?;
    eprintln!("argmax exact on tied rows");
    Ok(())
}

/// The synthetic-weight fill: the same bf16 values as the CPU computes, whatever the length.
fn random_fill(gpu: &Gpu) -> Result<(), String> {
    let stream = gpu.stream();
    for (len, seed, scale, offset) in [
        (1usize, 0u64, 1.0f32, 0.0f32),
        (1000, 7, 0.02, 0.0),
        (3_000_001, 99, 2.5, 1.0),
    ] {
        let mut out = poisoned(gpu, len).map_err(s)?;
        shadowkv::kernels::random::fill(gpu, stream, &mut out, seed, scale, offset).map_err(s)?;
        let values = stream.clone_dtoh(&out).map_err(s)?;
        let expected = reference::random::fill(0, len, seed, scale, offset);
        if values
            .iter()
            .zip(&expected)
            .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            return Err(format!(
                "fill of {len} (seed {seed}) differs from the reference"
            ));
        }
        let mean = values.iter().map(|v| v.to_f64()).sum::<f64>() / len as f64;
        if len > 1000 && (mean - offset as f64).abs() > 0.01 * scale as f64 {
            return Err(format!(
                "fill of {len} has mean {mean}, expected about {offset}"
            ));
        }
    }
    Ok(())
}

fn rejects_bad_input(gpu: &Gpu) -> Result<(), String> {
    let stream = gpu.stream();
    let expect_invalid = |what: &str, result: shadowkv::Result<()>| match result {
        Err(Error::InvalidArgument { .. }) => Ok(()),
        other => Err(format!(
            "{what}: expected an invalid-argument error, got {other:?}"
        )),
    };
    let table = stream.clone_htod(&vec![bf16::ONE; 10 * 4]).map_err(s)?;
    let ids = stream.clone_htod(&[3u32, 10]).map_err(s)?;
    let mut x = stream.clone_htod(&[0.0f32; 8]).map_err(s)?;
    expect_invalid(
        "id past the vocabulary",
        layer::embedding(gpu, stream, &table, 4, &[3, 10], &ids, &mut x),
    )?;
    let weight = stream.clone_htod(&[1.0f32; 3]).map_err(s)?;
    let mut out = poisoned(gpu, 8).map_err(s)?;
    expect_invalid(
        "rows not a multiple of the weight",
        layer::rms_norm(gpu, stream, &mut x, None, &weight, 1e-5, &mut out),
    )?;
    let shape = QkvShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
    };
    let layouts = [SequenceLayout {
        offset: 0,
        capacity: 16,
        len: 16,
    }];
    for (what, placement) in [
        ("row past the capacity", TokenPlacement::new(0, 16)),
        (
            "staged row past the capacity",
            TokenPlacement::new(0, 3).with_cache_row(16),
        ),
        ("sequence past the layouts", TokenPlacement::new(1, 0)),
    ] {
        expect_invalid(
            what,
            TokenPlan::new(stream, shape, &[placement], &layouts).map(|_| ()),
        )?;
    }
    expect_invalid(
        "odd head_dim",
        TokenPlan::new(
            stream,
            QkvShape {
                head_dim: 7,
                ..shape
            },
            &[TokenPlacement::default()],
            &layouts,
        )
        .map(|_| ()),
    )?;
    let plan = TokenPlan::new(stream, shape, &[TokenPlacement::default()], &layouts).map_err(s)?;
    let qkv = stream
        .clone_htod(&vec![f32::NAN; shape.width()])
        .map_err(s)?;
    let frequencies = stream.clone_htod(&[1.0f64; 4]).map_err(s)?;
    let mut q = poisoned(gpu, 32).map_err(s)?;
    let mut small_cache = poisoned(gpu, 2 * 16 * 8 - 1).map_err(s)?;
    let mut cache = poisoned(gpu, 2 * 16 * 8).map_err(s)?;
    expect_invalid(
        "cache shorter than the layout",
        layer::rope_qkv(
            gpu,
            stream,
            &plan,
            &qkv,
            None,
            (&frequencies, RotaryLayout::full(8)),
            &mut q,
            (&mut small_cache, &mut cache),
            None,
        ),
    )?;
    let mut cache_v = poisoned(gpu, 2 * 16 * 8).map_err(s)?;
    let mut short_pre_rope = poisoned(gpu, 2 * 8 - 1).map_err(s)?;
    expect_invalid(
        "pre-RoPE keys not [tokens, kv_heads * head_dim]",
        layer::rope_qkv(
            gpu,
            stream,
            &plan,
            &qkv,
            None,
            (&frequencies, RotaryLayout::full(8)),
            &mut q,
            (&mut cache, &mut cache_v),
            Some(&mut short_pre_rope.slice_mut(..)),
        ),
    )?;
    let short_norm = stream.clone_htod(&[1.0f32; 7]).map_err(s)?;
    let input = layer::QkvInput {
        qkv: &qkv,
        bias: None,
        qk_norm: Some(layer::QkNorm {
            q_weight: &short_norm,
            k_weight: &short_norm,
            eps: 1e-6,
        }),
    };
    expect_invalid(
        "QK norm weights not head_dim long",
        layer::rope_qkv_normed(
            gpu,
            stream,
            &plan,
            input,
            (&frequencies, RotaryLayout::full(8)),
            &mut q,
            (&mut cache, &mut cache_v),
            None,
        ),
    )?;
    let gate_up = stream.clone_htod(&[f32::NAN; 10]).map_err(s)?;
    let mut silu_out = poisoned(gpu, 6).map_err(s)?;
    expect_invalid(
        "gate_up not twice the output",
        layer::silu_mul(gpu, stream, &gate_up, &mut silu_out, 3),
    )?;
    let logits = stream.clone_htod(&[0.0f32; 10]).map_err(s)?;
    let mut ids_out = stream.clone_htod(&[0u32; 3]).map_err(s)?;
    expect_invalid(
        "logits not rows x vocab",
        shadowkv::kernels::sampling::argmax(gpu, stream, &logits, 4, &mut ids_out),
    )?;
    let linear = Linear::new(stream.clone()).map_err(s)?;
    let mut y = stream.clone_htod(&[0.0f32; 5]).map_err(s)?;
    expect_invalid(
        "linear output of the wrong size",
        linear.forward(&table, &table, 4, &mut y),
    )?;
    Ok(())
}
