//! GPU equivalence of causal GQA prefill attention against its f64 CPU reference.
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use half::bf16;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::reference::{self, relative_error};
use shadowkv::{
    DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, Error, Gpu, PrefillAttention,
    PrefillAttentionPlan, PrefillAttentionShape, QueryPlacement, SequenceLayout,
};
use shadowkv_suite::{
    poisoned, proptest_cases, proptest_runner, random_bf16, run_gpu_tests, POISON,
};

/// bf16 inputs and output: the kernel must land well inside this.
const TOLERANCE: f64 = 1e-2;

fn main() {
    run_gpu_tests(&[
        (
            "prefill_attention_matches_reference_on_random_ragged_batches",
            random_ragged_batches,
        ),
        (
            "prefill_attention_matches_reference_on_edge_lengths",
            edge_lengths,
        ),
        (
            "prefill_attention_matches_reference_at_8k_tokens",
            long_prompt,
        ),
        (
            "prefill_attention_chunked_equals_one_call",
            chunked_equals_one_call,
        ),
        (
            "prefill_attention_matches_reference_with_sliding_windows",
            sliding_windows,
        ),
        ("prefill_attention_rejects_bad_input", rejects_bad_input),
        (
            "prefill_attention_matches_reference_on_attention_sinks_per_row",
            attention_sinks,
        ),
    ])
}

/// One sequence of a case: its new queries, the tokens before them, and K/V rows past them
/// (`extra`: valid but in the queries' future; `spare`: past `len`), all NaN in the cache.
#[derive(Clone, Copy, Debug)]
struct Sequence {
    query_len: u32,
    start: u32,
    extra: u32,
    spare: u32,
}

/// One random problem.
#[derive(Clone, Debug)]
struct Case {
    kv_heads: usize,
    group: usize,
    head_dim: usize,
    sequences: Vec<Sequence>,
    /// NaN token rows between (and after) the sequences' query rows in q and out.
    gap: u32,
    /// Query rows placed in the reverse order of the sequences.
    reverse: bool,
    query_scale: f32,
    /// Warps per block (`with_warps`), else the default for the head dimension.
    warps: Option<u32>,
    /// Sliding window (`with_window`; 0: none).
    window: u32,
    seed: u64,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let query_len = prop_oneof![
        4 => prop::sample::select(vec![1u32, 2, 15, 16, 17, 31, 33, 63, 64, 65, 127, 128, 129]),
        3 => 1u32..400,
        1 => 400u32..1100,
    ];
    let start = prop_oneof![2 => Just(0u32), 1 => 1u32..70, 1 => 70u32..1500];
    let sequence =
        (query_len, start, 0u32..9, 0u32..17).prop_map(|(query_len, start, extra, spare)| {
            Sequence {
                query_len,
                start,
                extra,
                spare,
            }
        });
    (
        1usize..=3,
        1usize..=2,
        prop_oneof![8 => 1usize..=8, 1 => Just(16usize)],
        prop::sample::select(vec![64usize, 128, 256]),
    )
        .prop_flat_map(move |(batch, kv_heads, group, head_dim)| {
            (
                Just((kv_heads, group, head_dim)),
                prop::collection::vec(sequence.clone(), batch),
                0u32..3,
                any::<bool>(),
                prop::sample::select(vec![0.5f32, 2.0, 8.0]),
                prop::sample::select(vec![None, Some(4u32), Some(8)]),
                // No window, windows shorter than most prompts, and longer than any.
                prop_oneof![2 => Just(0u32), 1 => 1u32..300, 1 => 3000u32..5000],
                any::<u64>(),
            )
        })
        .prop_map(
            |(
                (kv_heads, group, head_dim),
                sequences,
                gap,
                reverse,
                query_scale,
                warps,
                window,
                seed,
            )| {
                Case {
                    kv_heads,
                    group,
                    head_dim,
                    sequences,
                    gap,
                    reverse,
                    query_scale,
                    warps,
                    window,
                    seed,
                }
            },
        )
}

/// A case laid out: shape, placements, and host buffers with NaN wherever the kernel must
/// not read (K/V rows at or past `start + query_len`, q rows between sequences).
struct Problem {
    shape: PrefillAttentionShape,
    layouts: Vec<SequenceLayout>,
    queries: Vec<QueryPlacement>,
    q: Vec<bf16>,
    k: Vec<bf16>,
    v: Vec<bf16>,
    /// The case's sliding window (0: none).
    window: u32,
}

fn problem(case: &Case) -> Problem {
    let (kv_heads, d) = (case.kv_heads, case.head_dim);
    let q_heads = kv_heads * case.group;
    let mut rng = StdRng::seed_from_u64(case.seed);
    // K/V blocks packed one after another, offsets rounded to 16-byte rows.
    let mut offset = 0u64;
    let layouts: Vec<SequenceLayout> = case
        .sequences
        .iter()
        .map(|s| {
            let len = s.start + s.query_len + s.extra;
            let layout = SequenceLayout {
                offset,
                capacity: len + s.spare,
                len,
            };
            offset += (kv_heads * (len + s.spare) as usize * d) as u64;
            offset = offset.next_multiple_of(8) + 8;
            layout
        })
        .collect();
    // Query rows, in order or reversed, `gap` NaN rows after each sequence's.
    let mut queries = vec![QueryPlacement::default(); case.sequences.len()];
    let mut order: Vec<usize> = (0..case.sequences.len()).collect();
    if case.reverse {
        order.reverse();
    }
    let mut token = case.gap;
    for &b in &order {
        let s = &case.sequences[b];
        queries[b] = QueryPlacement {
            query_offset: token,
            query_len: s.query_len,
            start: s.start,
        };
        token += s.query_len + case.gap;
    }
    let shape = PrefillAttentionShape {
        tokens: token.max(1) as usize,
        q_heads,
        kv_heads,
        head_dim: d,
    };
    let mut q = vec![POISON; shape.q_elements()];
    for p in &queries {
        let rows = p.query_offset as usize * q_heads * d
            ..(p.query_offset + p.query_len) as usize * q_heads * d;
        q[rows.clone()].copy_from_slice(&random_bf16(&mut rng, rows.len(), case.query_scale));
    }
    let mut k = vec![POISON; offset as usize];
    let mut v = vec![POISON; offset as usize];
    for (l, p) in layouts.iter().zip(&queries) {
        for head in 0..kv_heads {
            let first = l.offset as usize + head * l.capacity as usize * d;
            for i in first..first + (p.start + p.query_len) as usize * d {
                k[i] = bf16::from_f32(rng.gen_range(-1.0..1.0));
                v[i] = bf16::from_f32(rng.gen_range(-1.0..1.0));
            }
        }
    }
    Problem {
        shape,
        layouts,
        queries,
        q,
        k,
        v,
        window: case.window,
    }
}

/// Runs the kernel on a problem (output poisoned first) and returns the output's bits.
fn run_gpu(
    gpu: &Gpu,
    plan: PrefillAttentionPlan,
    problem: &Problem,
) -> shadowkv::Result<Vec<bf16>> {
    let stream = gpu.stream();
    let (q, k, v) = (
        stream.clone_htod(&problem.q)?,
        stream.clone_htod(&problem.k)?,
        stream.clone_htod(&problem.v)?,
    );
    let mut out = poisoned(gpu, problem.shape.q_elements())?;
    let mut attention = PrefillAttention::new(gpu, plan)?;
    attention.run(gpu, stream, &q, &k, &v, &mut out)?;
    Ok(stream.clone_dtoh(&out)?)
}

/// The reference output of a problem (f64).
fn expected(problem: &Problem, scale: f32) -> Vec<f64> {
    reference::prefill_attention::prefill_attention_windowed(
        &problem.shape,
        (&problem.layouts, &problem.queries),
        (&problem.q, &problem.k, &problem.v),
        scale as f64,
        problem.window as usize,
    )
}

/// The covered rows of `actual` and `expected`, widened and in token order; every other row
/// of `actual` must still be poison.
fn covered_rows(
    problem: &Problem,
    expected: &[f64],
    actual: &[bf16],
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let row = problem.shape.q_heads * problem.shape.head_dim;
    let mut covered = vec![false; problem.shape.tokens];
    for p in &problem.queries {
        covered[p.query_offset as usize..(p.query_offset + p.query_len) as usize].fill(true);
    }
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for (token, &is_covered) in covered.iter().enumerate() {
        let range = token * row..(token + 1) * row;
        if is_covered {
            if let Some(i) = actual[range.clone()].iter().position(|x| !x.is_finite()) {
                return Err(format!(
                    "token {token}, element {i} is {} (unwritten or read poison)",
                    actual[range][i]
                ));
            }
            got.extend(actual[range.clone()].iter().map(|x| x.to_f64()));
            want.extend_from_slice(&expected[range]);
        } else if actual[range]
            .iter()
            .any(|x| x.to_bits() != POISON.to_bits())
        {
            return Err(format!(
                "token {token} is covered by no query but was written"
            ));
        }
    }
    Ok((got, want))
}

/// Relative error over the rows the queries cover; every other row must still be poison.
fn compare(problem: &Problem, scale: f32, actual: &[bf16]) -> Result<f64, String> {
    let (got, want) = covered_rows(problem, &expected(problem, scale), actual)?;
    Ok(relative_error(&got, &want))
}

fn run_case(gpu: &Gpu, case: &Case) -> Result<f64, String> {
    let problem = problem(case);
    let mut plan = PrefillAttentionPlan::new(problem.shape, &problem.layouts, &problem.queries)
        .map_err(|e| e.to_string())?
        .with_window(case.window);
    // Heads of 256 have one warp count (4).
    if let Some(warps) = case.warps.filter(|_| case.head_dim <= 128) {
        plan = plan.with_warps(warps).map_err(|e| e.to_string())?;
    }
    let scale = plan.scale();
    let actual = run_gpu(gpu, plan, &problem).map_err(|e| e.to_string())?;
    compare(&problem, scale, &actual)
}

fn check(label: &str, case: &Case, gpu: &Gpu) -> Result<(), String> {
    let error = run_case(gpu, case)?;
    eprintln!("{label}: relative error {error:.3e}");
    if error < TOLERANCE {
        Ok(())
    } else {
        Err(format!("{label}: relative error {error:.3e} for {case:?}"))
    }
}

fn random_ragged_batches(gpu: &Gpu) -> Result<(), String> {
    let cases = proptest_cases(32);
    let mut runner = proptest_runner(32);
    let worst = std::cell::Cell::new(0.0f64);
    runner
        .run(&case_strategy(), |case| {
            let error = run_case(gpu, &case).map_err(TestCaseError::fail)?;
            worst.set(worst.get().max(error));
            prop_assert!(error < TOLERANCE, "relative error {error:.3e} for {case:?}");
            Ok(())
        })
        .map_err(|failure| failure.to_string())?;
    eprintln!(
        "{cases} random ragged batches: worst relative error {:.3e}",
        worst.get()
    );
    Ok(())
}

fn sequence(query_len: u32, start: u32) -> Sequence {
    Sequence {
        query_len,
        start,
        extra: 3,
        spare: 5,
    }
}

fn edge_lengths(gpu: &Gpu) -> Result<(), String> {
    let case = |kv_heads, group, head_dim, sequences: Vec<Sequence>, seed| Case {
        kv_heads,
        group,
        head_dim,
        sequences,
        gap: 1,
        reverse: false,
        query_scale: 4.0,
        warps: None,
        window: 0,
        seed,
    };
    // Llama-3-8B heads: a 1000-token prompt and a 129-token chunk after 1000 cached tokens.
    check(
        "Llama-3-8B heads, 1000 + 129 (start 1000)",
        &case(8, 4, 128, vec![sequence(1000, 0), sequence(129, 1000)], 1),
        gpu,
    )?;
    // GLM-4-9B heads (32/2, d 128: group 16) and Gemma-3-270M heads (4/1, d 256).
    check(
        "GLM-4-9B heads, 1000 + 129 (start 1000)",
        &case(2, 16, 128, vec![sequence(1000, 0), sequence(129, 1000)], 4),
        gpu,
    )?;
    check(
        "Gemma-3-270M heads, 1000 + 129 (start 1000) + 17",
        &case(
            1,
            4,
            256,
            vec![sequence(1000, 0), sequence(129, 1000), sequence(17, 3)],
            5,
        ),
        gpu,
    )?;
    // SmolLM2 heads (9/3, d 64): lengths around the tile sizes, some chunked.
    check(
        "SmolLM2 heads, 1 / 15 / 17 / 63 / 1025",
        &case(
            3,
            3,
            64,
            vec![
                sequence(1, 0),
                sequence(15, 5),
                sequence(17, 100),
                sequence(63, 0),
                sequence(1025, 7),
            ],
            2,
        ),
        gpu,
    )?;
    // Every group size at every head dim and warp count, odd and even lengths.
    for group in 1..=8 {
        for head_dim in [64, 128, 256] {
            for warps in [4, 8] {
                if head_dim == 256 && warps == 8 {
                    continue;
                }
                let sequences = vec![sequence(16, 0), sequence(33, 1), sequence(129, 64)];
                let seed = group as u64 * 7 + head_dim as u64;
                check(
                    &format!(
                        "group {group}, d {head_dim}, {warps} warps, 16 / 33 / 129 (start 64)"
                    ),
                    &Case {
                        warps: Some(warps),
                        ..case(1, group, head_dim, sequences, seed)
                    },
                    gpu,
                )?;
            }
        }
    }
    // A sequence with no new tokens beside others, and a single decode-like query deep in
    // its cache.
    check(
        "empty sequence and one query at position 4000",
        &case(
            2,
            2,
            128,
            vec![sequence(0, 10), sequence(1, 4000), sequence(70, 0)],
            3,
        ),
        gpu,
    )?;
    Ok(())
}

/// Windows of 1 key, below, at and above the key tile, Gemma-3's 512 at its heads (4 / 1 of
/// 256), and longer than the prompt; one-call prompts and chunks deep in the cache.
fn sliding_windows(gpu: &Gpu) -> Result<(), String> {
    for (window, kv_heads, group, head_dim) in [
        (1u32, 1usize, 4usize, 64usize),
        (63, 2, 3, 128),
        (64, 1, 8, 64),
        (65, 1, 1, 128),
        (512, 1, 4, 256),
        (17, 2, 2, 256),
        (700, 2, 2, 64),
        (5000, 1, 5, 128),
    ] {
        for warps in [None, Some(4), Some(8)] {
            let case = Case {
                kv_heads,
                group,
                head_dim,
                sequences: vec![sequence(1500, 0), sequence(129, 2000), sequence(1, 3000)],
                gap: 1,
                reverse: false,
                query_scale: 4.0,
                warps,
                window,
                seed: u64::from(window) + kv_heads as u64,
            };
            check(
                &format!(
                    "window {window}, {kv_heads} x {group} heads, d {head_dim}, {warps:?} warps"
                ),
                &case,
                gpu,
            )?;
        }
    }
    Ok(())
}

fn long_prompt(gpu: &Gpu) -> Result<(), String> {
    // One prompt of 8191 tokens in one call, and the same length reached by a 4191-token
    // chunk after 4000 cached tokens, in one batch.
    check(
        "8191 tokens, and 4000 + 4191 chunked (3/1 heads, d 64)",
        &Case {
            kv_heads: 1,
            group: 3,
            head_dim: 64,
            sequences: vec![sequence(8191, 0), sequence(4191, 4000)],
            gap: 0,
            reverse: true,
            query_scale: 4.0,
            warps: None,
            window: 0,
            seed: 8191,
        },
        gpu,
    )
}

/// A prompt run in three chunks through one `PrefillAttention` (`update` between them) gives
/// the same output as one call over the whole prompt.
fn chunked_equals_one_call(gpu: &Gpu) -> Result<(), String> {
    let whole = Case {
        kv_heads: 2,
        group: 4,
        head_dim: 128,
        sequences: vec![sequence(700, 0)],
        gap: 0,
        reverse: false,
        query_scale: 4.0,
        warps: None,
        window: 0,
        seed: 700,
    };
    let problem = problem(&whole);
    let shape = problem.shape;
    let layouts = problem.layouts.clone();
    let plan =
        PrefillAttentionPlan::new(shape, &layouts, &problem.queries).map_err(|e| e.to_string())?;
    let one_call = run_gpu(gpu, plan.clone(), &problem).map_err(|e| e.to_string())?;

    let stream = gpu.stream();
    let run = || -> shadowkv::Result<Vec<bf16>> {
        let (k, v) = (
            stream.clone_htod(&problem.k)?,
            stream.clone_htod(&problem.v)?,
        );
        let mut attention = PrefillAttention::new(gpu, plan.clone())?;
        let row = shape.q_heads * shape.head_dim;
        let mut chunks = Vec::new();
        for (first, len) in [(0u32, 1u32), (1, 300), (301, 399)] {
            // The chunk's queries alone, at rows 0..len of their own q and out.
            let chunk_shape = PrefillAttentionShape {
                tokens: len as usize,
                ..shape
            };
            let queries = [QueryPlacement {
                query_offset: 0,
                query_len: len,
                start: first,
            }];
            // The cache as the driver has it after writing this chunk.
            let chunk_layouts = [SequenceLayout {
                len: first + len,
                ..layouts[0]
            }];
            attention.update(
                stream,
                PrefillAttentionPlan::new(chunk_shape, &chunk_layouts, &queries)?,
            )?;
            let q = stream
                .clone_htod(&problem.q[first as usize * row..(first + len) as usize * row])?;
            let mut out = poisoned(gpu, len as usize * row)?;
            attention.run(gpu, stream, &q, &k, &v, &mut out)?;
            chunks.extend(stream.clone_dtoh(&out)?);
        }
        Ok(chunks)
    };
    let chunked = run().map_err(|e| e.to_string())?;
    if chunked.len() != one_call.len() {
        return Err(format!(
            "{} outputs against {}",
            chunked.len(),
            one_call.len()
        ));
    }
    // Same kernel, same keys per row: tiles a row does not see add exact zeros, so the two
    // agree to the last bit or nearly so.
    let identical = chunked
        .iter()
        .zip(&one_call)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    let error = relative_error(
        &shadowkv_suite::to_f64(&chunked),
        &shadowkv_suite::to_f64(&one_call),
    );
    eprintln!(
        "3 chunks against one call: {identical} of {} outputs bit-identical, relative difference {error:.3e}",
        chunked.len()
    );
    if error < 1e-3 {
        Ok(())
    } else {
        Err(format!(
            "chunked and one-call outputs differ by {error:.3e}"
        ))
    }
}

fn rejects_bad_input(gpu: &Gpu) -> Result<(), String> {
    let problem = problem(&Case {
        kv_heads: 2,
        group: 3,
        head_dim: 64,
        sequences: vec![sequence(40, 10), sequence(9, 0)],
        gap: 0,
        reverse: false,
        query_scale: 1.0,
        warps: None,
        window: 0,
        seed: 5,
    });
    let plan = PrefillAttentionPlan::new(problem.shape, &problem.layouts, &problem.queries)
        .map_err(|e| e.to_string())?;
    let mut attention = PrefillAttention::new(gpu, plan).map_err(|e| e.to_string())?;
    let stream = gpu.stream();
    let buffer = |n: usize| poisoned(gpu, n).map_err(|e| e.to_string());
    let (q_elements, kv_elements) = (problem.shape.q_elements(), problem.k.len());
    let (q, k, v, mut out) = (
        buffer(q_elements)?,
        buffer(kv_elements)?,
        buffer(kv_elements)?,
        buffer(q_elements)?,
    );
    let (short_q, short_k) = (buffer(q_elements - 1)?, buffer(kv_elements - 17)?);
    let mut long_out = buffer(q_elements + 1)?;
    let wide = buffer(q_elements + 8)?;
    let expect_invalid = |result: shadowkv::Result<()>, argument: &str| match result {
        Err(Error::InvalidArgument {
            argument: named, ..
        }) if named == argument => Ok(()),
        other => Err(format!(
            "expected an error naming `{argument}`, got {other:?}"
        )),
    };
    expect_invalid(attention.run(gpu, stream, &short_q, &k, &v, &mut out), "q")?;
    expect_invalid(attention.run(gpu, stream, &q, &short_k, &v, &mut out), "k")?;
    expect_invalid(attention.run(gpu, stream, &q, &k, &short_k, &mut out), "v")?;
    expect_invalid(attention.run(gpu, stream, &q, &k, &v, &mut long_out), "out")?;
    // A view one element in: the right length but not 16-byte aligned.
    let misaligned = wide.slice(1..q_elements + 1);
    expect_invalid(
        attention.run(gpu, stream, &misaligned, &k, &v, &mut out),
        "q",
    )?;
    // A plan whose queries need keys the cache does not hold yet.
    let mut layouts = problem.layouts.clone();
    layouts[0].len = problem.queries[0].start + problem.queries[0].query_len - 1;
    match PrefillAttentionPlan::new(problem.shape, &layouts, &problem.queries) {
        Err(Error::InvalidArgument {
            argument: "queries",
            ..
        }) => {}
        other => return Err(format!("expected an error naming `queries`, got {other:?}")),
    }
    attention
        .run(gpu, stream, &q, &k, &v, &mut out)
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------------------
// Attention-sink inputs: the structure of a real model's attention, which uniform random
// inputs lack.
// ---------------------------------------------------------------------------------------

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut StdRng) -> f64 {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    let v: f64 = rng.gen_range(0.0..1.0);
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// A random unit vector of `d` elements, orthogonal to `against` (if given).
fn unit(rng: &mut StdRng, d: usize, against: Option<&[f64]>) -> Vec<f64> {
    let mut x: Vec<f64> = (0..d).map(|_| normal(rng)).collect();
    if let Some(a) = against {
        let dot: f64 = x.iter().zip(a).map(|(x, a)| x * a).sum();
        x.iter_mut().zip(a).for_each(|(x, a)| *x -= dot * a);
    }
    let norm = x.iter().map(|x| x * x).sum::<f64>().sqrt();
    x.iter_mut().for_each(|x| *x /= norm);
    x
}

/// The problem of `case` (its layouts, placements and NaN rows) with q, K and V shaped like a
/// real model's attention, per (sequence, KV head):
/// - every query has a large component `a` (6..14) along a direction `u`, and every key one
///   of `b - margin` with `b` 10..20: raw scores of 60 to 280 before the `1/sqrt(d)` scale;
/// - position 0 is an attention sink: its margin is 0, the other keys' 1.5 to 4 (1/2 to 5
///   nats below the sink after scaling, head by head), so the sink takes from nearly all to
///   a few percent of the weight depending on the length;
/// - three random keys score about as high as the sink (margin -0.5..1);
/// - a second direction `w` and noise spread the scores per query by a few raw units;
/// - value norms are log-uniform over 100x (0.03..3), the sink's small (0.02..0.05), with a
///   shared mean direction;
/// - half the heads have two massive dimensions (q 32..64 in both, k +-16..32 in every key)
///   whose products (up to 2048) cancel exactly: the scores' accumulation must hold them.
fn sink_problem(case: &Case) -> Problem {
    let mut problem = problem(case);
    let mut rng = StdRng::seed_from_u64(case.seed ^ 0x5eed_5124);
    let (d, group, q_heads) = (case.head_dim, case.group, problem.shape.q_heads);
    let round = |x: f64| bf16::from_f64(x);
    for (l, p) in problem.layouts.iter().zip(&problem.queries) {
        let keys = (p.start + p.query_len) as usize;
        for head in 0..case.kv_heads {
            let u = unit(&mut rng, d, None);
            let w = unit(&mut rng, d, Some(&u));
            let mean = unit(&mut rng, d, None);
            let b: f64 = rng.gen_range(10.0..20.0);
            let (margin_low, margin_high) = {
                let low: f64 = rng.gen_range(1.5..3.0);
                (low, low + rng.gen_range(0.0..1.0))
            };
            let peaks: Vec<usize> = (0..3).map(|_| rng.gen_range(0..keys)).collect();
            // Two massive dimensions (or none), their q and k magnitudes (bf16-exact).
            let massive = rng.gen_bool(0.5).then(|| {
                let first = rng.gen_range(0..d);
                let second = (first + rng.gen_range(1..d)) % d;
                let q_big = [32.0, 48.0, 64.0][rng.gen_range(0..3)];
                let k_big = [16.0, 24.0, 32.0][rng.gen_range(0..3)];
                (first, second, q_big, k_big)
            });
            let base = l.offset as usize + head * l.capacity as usize * d;
            for t in 0..keys {
                let along_u = if t == 0 {
                    b
                } else if peaks.contains(&t) {
                    b - rng.gen_range(-0.5..1.0)
                } else {
                    b - rng.gen_range(margin_low..margin_high)
                };
                let along_w = 2.0 * normal(&mut rng);
                let value_norm = if t == 0 {
                    rng.gen_range(0.02..0.05)
                } else {
                    0.03 * 100f64.powf(rng.gen_range(0.0..1.0))
                };
                let direction = unit(&mut rng, d, None);
                for j in 0..d {
                    let mut key = along_u * u[j] + along_w * w[j] + 0.5 * normal(&mut rng);
                    if let Some((first, second, _, k_big)) = massive {
                        if j == first {
                            key = k_big;
                        } else if j == second {
                            key = -k_big;
                        }
                    }
                    problem.k[base + t * d + j] = round(key);
                    let value =
                        value_norm * (0.8 * direction[j] + 0.6 * mean[j]) * (d as f64).sqrt();
                    problem.v[base + t * d + j] = round(value);
                }
            }
            for i in 0..p.query_len as usize {
                let token = p.query_offset as usize + i;
                for g in 0..group {
                    let q_head = head * group + g;
                    let a: f64 = rng.gen_range(6.0..14.0);
                    let along_w = 2.0 * normal(&mut rng);
                    let row = (token * q_heads + q_head) * d;
                    for j in 0..d {
                        problem.q[row + j] =
                            round(a * u[j] + along_w * w[j] + 0.5 * normal(&mut rng));
                    }
                    if let Some((first, second, q_big, _)) = massive {
                        problem.q[row + first] = round(q_big);
                        problem.q[row + second] = round(q_big);
                    }
                }
            }
        }
    }
    problem
}

/// Global and per-row errors of one output against the reference.
#[derive(Clone, Copy, Debug, Default)]
struct Errors {
    /// `|got - want| / |want|` over every covered row.
    global: f64,
    /// The largest of the same per (token, q head) row, and that row's index.
    worst_row: f64,
    worst_at: usize,
    /// The mean of the per-row errors.
    mean_row: f64,
    /// `|got - bf16(want)| / |want|`: the error beyond rounding the exact result to bf16.
    excess: f64,
    /// The fraction of elements that differ from `bf16(want)`.
    mismatched: f64,
}

fn errors(got: &[f64], want: &[f64], head_dim: usize) -> Errors {
    let rounded: Vec<f64> = want.iter().map(|&x| bf16::from_f64(x).to_f64()).collect();
    let (mut excess, mut norm) = (0.0f64, 0.0f64);
    for ((g, r), w) in got.iter().zip(&rounded).zip(want) {
        excess += (g - r) * (g - r);
        norm += w * w;
    }
    let mismatched = got.iter().zip(&rounded).filter(|(g, r)| g != r).count();
    let mut errors = Errors {
        global: relative_error(got, want),
        excess: excess.sqrt() / norm.sqrt(),
        mismatched: mismatched as f64 / want.len() as f64,
        ..Errors::default()
    };
    let rows = want.len() / head_dim;
    for (index, (g, w)) in got.chunks(head_dim).zip(want.chunks(head_dim)).enumerate() {
        let error = relative_error(g, w);
        errors.mean_row += error / rows as f64;
        if error > errors.worst_row {
            (errors.worst_row, errors.worst_at) = (error, index);
        }
    }
    errors
}

/// Causal prefill through the decode kernel: one "sequence" per query token, each pointing at
/// its sequence's K/V block with `len = position + 1`; returns `[tokens, q_heads, head_dim]`
/// like the prefill kernel (poison where no query is).
fn run_decode(gpu: &Gpu, problem: &Problem, scale: f32) -> shadowkv::Result<Vec<bf16>> {
    let (q_heads, d) = (problem.shape.q_heads, problem.shape.head_dim);
    let row = q_heads * d;
    let (mut layouts, mut rows, mut q) = (Vec::new(), Vec::new(), Vec::new());
    for (l, p) in problem.layouts.iter().zip(&problem.queries) {
        for i in 0..p.query_len {
            layouts.push(SequenceLayout {
                len: p.start + i + 1,
                ..*l
            });
            let token = (p.query_offset + i) as usize;
            rows.push(token);
            q.extend_from_slice(&problem.q[token * row..(token + 1) * row]);
        }
    }
    let shape = DecodeAttentionShape {
        batch: layouts.len(),
        q_heads,
        kv_heads: problem.shape.kv_heads,
        head_dim: d,
    };
    let plan = DecodeAttentionPlan::for_gpu(gpu, shape, &layouts)?.with_scale(scale)?;
    let stream = gpu.stream();
    let (q, k, v) = (
        stream.clone_htod(&q)?,
        stream.clone_htod(&problem.k)?,
        stream.clone_htod(&problem.v)?,
    );
    let mut out = poisoned(gpu, shape.q_elements())?;
    DecodeAttention::new(gpu, plan)?.run(gpu, stream, &q, &k, &v, &mut out)?;
    let out = stream.clone_dtoh(&out)?;
    let mut full = vec![POISON; problem.shape.q_elements()];
    for (b, &token) in rows.iter().enumerate() {
        full[token * row..(token + 1) * row].copy_from_slice(&out[b * row..(b + 1) * row]);
    }
    Ok(full)
}

/// The position and head of covered row `index` (rows in token order, heads within).
fn row_name(problem: &Problem, index: usize) -> String {
    let q_heads = problem.shape.q_heads;
    let (mut token_rank, head) = (index / q_heads, index % q_heads);
    let mut placements: Vec<&QueryPlacement> = problem.queries.iter().collect();
    placements.sort_by_key(|p| p.query_offset);
    for p in placements {
        if token_rank < p.query_len as usize {
            return format!(
                "position {} of {}..{} head {head}",
                p.start as usize + token_rank,
                p.start,
                p.start + p.query_len
            );
        }
        token_rank -= p.query_len as usize;
    }
    format!("row {index}")
}

/// Prefill (split P and P in one bf16), the decode kernel run as prefill, and the reference
/// rounded to bf16 (the best a bf16 output can do), all against the f64 reference, on
/// attention-sink inputs ([`sink_problem`]): global, mean-row and worst-row relative errors.
/// Split P must match the rounded reference globally and on every row; P in one bf16 only
/// the usual tolerance.
fn attention_sinks(gpu: &Gpu) -> Result<(), String> {
    let case = |kv_heads, group, head_dim, sequences: Vec<(u32, u32)>, seed| Case {
        kv_heads,
        group,
        head_dim,
        sequences: sequences
            .into_iter()
            .map(|(query_len, start)| sequence(query_len, start))
            .collect(),
        gap: 1,
        reverse: false,
        query_scale: 1.0,
        warps: None,
        window: 0,
        seed,
    };
    let cases = [
        (
            "SmolLM2 heads (9/3, d 64), 10..200 tokens",
            case(
                3,
                3,
                64,
                vec![(10, 0), (37, 0), (42, 0), (77, 0), (200, 0), (150, 500)],
                11,
            ),
        ),
        (
            "SmolLM2 heads (9/3, d 64), 1000 tokens",
            case(3, 3, 64, vec![(1000, 0), (300, 700)], 12),
        ),
        (
            "G 4, d 128 (8/2 heads), 10..200 tokens",
            case(
                2,
                4,
                128,
                vec![(10, 0), (37, 0), (129, 0), (200, 64), (31, 1000)],
                13,
            ),
        ),
        (
            "G 4, d 128 (8/2 heads), 1000 tokens",
            case(2, 4, 128, vec![(1000, 0), (990, 10)], 14),
        ),
    ];
    let mut failures = Vec::new();
    for (label, case) in &cases {
        let problem = sink_problem(case);
        let plan = PrefillAttentionPlan::new(problem.shape, &problem.layouts, &problem.queries)
            .map_err(|e| e.to_string())?;
        let scale = plan.scale();
        let want_all = expected(&problem, scale);
        let d = case.head_dim;
        let measure = |actual: &[bf16]| -> Result<Errors, String> {
            let (got, want) = covered_rows(&problem, &want_all, actual)?;
            Ok(errors(&got, &want, d))
        };
        let default = run_gpu(gpu, plan.clone(), &problem).map_err(|e| e.to_string())?;
        let other = plan
            .clone()
            .with_split_p(!plan.split_p())
            .map_err(|e| e.to_string())?;
        let other = run_gpu(gpu, other, &problem).map_err(|e| e.to_string())?;
        let (split, single) = if plan.split_p() {
            (measure(&default)?, measure(&other)?)
        } else {
            (measure(&other)?, measure(&default)?)
        };
        let decode = measure(&run_decode(gpu, &problem, scale).map_err(|e| e.to_string())?)?;
        // The exact result rounded to bf16 on the covered rows, poison elsewhere.
        let row = problem.shape.q_heads * d;
        let mut rounded = vec![POISON; want_all.len()];
        for p in &problem.queries {
            let rows = p.query_offset as usize * row..(p.query_offset + p.query_len) as usize * row;
            for (r, &x) in rounded[rows.clone()].iter_mut().zip(&want_all[rows]) {
                *r = bf16::from_f64(x);
            }
        }
        let floor = measure(&rounded)?;
        eprintln!("{label}: {}", describe(&problem, scale));
        eprintln!(
            "  global / mean row / worst row relative error; beyond bf16(reference), elements off it"
        );
        for (name, e) in [
            ("prefill, P split", split),
            ("prefill, P bf16", single),
            ("decode kernel", decode),
            ("bf16(reference)", floor),
        ] {
            eprintln!(
                "  {name:>17}: {:.3e} / {:.3e} / {:.3e} at {}; {:.2e}, {:.2}%",
                e.global,
                e.mean_row,
                e.worst_row,
                row_name(&problem, e.worst_at),
                e.excess,
                100.0 * e.mismatched
            );
        }
        // Split P: the bf16 rounding of the exact result but for elements within ~2^-17 of a
        // rounding boundary. Globally within 1.1x of that rounding's own error, every row
        // within 1.25x of its worst row, and the distance to it under 0.4x of its error (P in
        // one bf16 lands at 1.5-1.8x on the worst rows).
        let within = |e: &Errors| {
            e.global <= 1.1 * floor.global
                && e.worst_row <= 1.25 * floor.worst_row
                && e.excess <= 0.4 * floor.global
        };
        eprintln!(
            "  within the bounds: P split {}, P bf16 {}",
            within(&split),
            within(&single)
        );
        if !within(&split) {
            failures.push(format!(
                "{label}: P split: global {:.3e} (bf16 floor {:.3e}), worst row {:.3e} at {} (floor {:.3e}), beyond bf16(reference) {:.3e}",
                split.global,
                floor.global,
                split.worst_row,
                row_name(&problem, split.worst_at),
                floor.worst_row,
                split.excess
            ));
        }
        if single.global > TOLERANCE {
            failures.push(format!("{label}: P in bf16, global {:.3e}", single.global));
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// What a sink problem looks like: the range of raw scores, the sink's mean softmax weight,
/// and how often a row's largest weight is the sink's.
fn describe(problem: &Problem, scale: f32) -> String {
    let (q_heads, d, group) = (
        problem.shape.q_heads,
        problem.shape.head_dim,
        problem.shape.group(),
    );
    let (mut low, mut high, mut sink_weight, mut sink_top, mut rows) =
        (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0usize, 0usize);
    for (l, p) in problem.layouts.iter().zip(&problem.queries) {
        for i in 0..p.query_len as usize {
            let token = p.query_offset as usize + i;
            for q_head in 0..q_heads {
                let query = &problem.q[(token * q_heads + q_head) * d..][..d];
                let base = l.offset as usize + (q_head / group) * l.capacity as usize * d;
                let scores: Vec<f64> = (0..=p.start as usize + i)
                    .map(|t| {
                        let key = &problem.k[base + t * d..][..d];
                        query
                            .iter()
                            .zip(key)
                            .map(|(a, b)| a.to_f64() * b.to_f64())
                            .sum()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                low = low.min(scores.iter().cloned().fold(f64::INFINITY, f64::min));
                high = high.max(max);
                let sum: f64 = scores
                    .iter()
                    .map(|s| ((s - max) * scale as f64).exp())
                    .sum();
                sink_weight += ((scores[0] - max) * scale as f64).exp() / sum;
                sink_top += (scores[0] == max) as usize;
                rows += 1;
            }
        }
    }
    format!(
        "raw scores {low:.0}..{high:.0}, mean sink weight {:.2}, sink on top in {:.0}% of rows",
        sink_weight / rows as f64,
        100.0 * sink_top as f64 / rows as f64
    )
}
