//! GPU equivalence of causal GQA prefill attention against its f64 CPU reference.
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use half::bf16;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::reference::{self, relative_error};
use shadowkv::{
    Error, Gpu, PrefillAttention, PrefillAttentionPlan, PrefillAttentionShape, QueryPlacement,
    SequenceLayout,
};
use shadowkv_suite::{poisoned, random_bf16, run_gpu_tests, POISON};

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
        ("prefill_attention_rejects_bad_input", rejects_bad_input),
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
        1usize..=8,
        prop::sample::select(vec![64usize, 128]),
    )
        .prop_flat_map(move |(batch, kv_heads, group, head_dim)| {
            (
                Just((kv_heads, group, head_dim)),
                prop::collection::vec(sequence.clone(), batch),
                0u32..3,
                any::<bool>(),
                prop::sample::select(vec![0.5f32, 2.0, 8.0]),
                prop::sample::select(vec![None, Some(4u32), Some(8)]),
                any::<u64>(),
            )
        })
        .prop_map(
            |((kv_heads, group, head_dim), sequences, gap, reverse, query_scale, warps, seed)| {
                Case {
                    kv_heads,
                    group,
                    head_dim,
                    sequences,
                    gap,
                    reverse,
                    query_scale,
                    warps,
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

/// Relative error over the rows the queries cover; every other row must still be poison.
fn compare(problem: &Problem, scale: f32, actual: &[bf16]) -> Result<f64, String> {
    let expected = reference::prefill_attention::prefill_attention(
        &problem.shape,
        &problem.layouts,
        &problem.queries,
        &problem.q,
        &problem.k,
        &problem.v,
        scale as f64,
    );
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
    Ok(relative_error(&got, &want))
}

fn run_case(gpu: &Gpu, case: &Case) -> Result<f64, String> {
    let problem = problem(case);
    let mut plan = PrefillAttentionPlan::new(problem.shape, &problem.layouts, &problem.queries)
        .map_err(|e| e.to_string())?;
    if let Some(warps) = case.warps {
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
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(32);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
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
        seed,
    };
    // Llama-3-8B heads: a 1000-token prompt and a 129-token chunk after 1000 cached tokens.
    check(
        "Llama-3-8B heads, 1000 + 129 (start 1000)",
        &case(8, 4, 128, vec![sequence(1000, 0), sequence(129, 1000)], 1),
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
    // Every group size at both head dims and both warp counts, odd and even lengths.
    for group in 1..=8 {
        for head_dim in [64, 128] {
            for warps in [4, 8] {
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
