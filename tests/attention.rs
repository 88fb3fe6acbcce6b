//! GPU equivalence of sparse GQA decode attention against its f64 CPU reference.
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use half::bf16;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::kernels::attention::kernel_layout::{
    has_kernel, shortest_split_len, tokens_per_iteration,
};
use shadowkv::reference::{self, relative_error};
use shadowkv::{
    DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, Error, Gpu, SequenceLayout,
};
use shadowkv_suite::{
    poisoned, proptest_cases, proptest_runner, random_bf16, run_gpu_tests, to_f64, POISON,
};

/// bf16 inputs and output: the kernel must land well inside this.
const TOLERANCE: f64 = 1e-2;

fn main() {
    run_gpu_tests(&[
        (
            "attention_matches_reference_on_random_ragged_batches",
            random_ragged_batches,
        ),
        (
            "attention_matches_reference_at_llama3_8b_long_context",
            llama3_long_context,
        ),
        (
            "attention_never_reads_past_a_sequence",
            never_reads_past_len,
        ),
        (
            "attention_matches_reference_at_glm4_and_gemma3_heads",
            glm4_and_gemma3_heads,
        ),
        (
            "attention_rejects_mismatched_buffers",
            rejects_mismatched_buffers,
        ),
    ])
}

/// One random problem: shape, per-sequence lengths and spare capacity, and a forced split.
#[derive(Clone, Debug)]
struct Case {
    shape: DecodeAttentionShape,
    lens: Vec<u32>,
    spare: Vec<u32>,
    /// `Some(k)`: split length `k * tokens_per_iteration` instead of the planner's choice.
    split_multiple: Option<u32>,
    query_scale: f32,
    /// Sliding window (0: none); the keys and values below it are NaN, so a read shows.
    window: u32,
    seed: u64,
}

fn case_strategy() -> impl Strategy<Value = Case> {
    let len = prop_oneof![3 => 1u32..64, 3 => 64u32..2048, 2 => 2048u32..=20_000];
    (
        1usize..=8,
        1usize..=4,
        prop::sample::select(vec![1usize, 2, 3, 4, 5, 6, 7, 8, 16]),
        prop::sample::select(vec![64usize, 128, 256]),
    )
        .prop_flat_map(move |(batch, kv_heads, group, head_dim)| {
            // At head dimension 256 only the groups of `D256_GROUPS` are compiled.
            let group = if has_kernel(group as u32, head_dim as u32) {
                group
            } else {
                [1, 2, 4][group % 3]
            };
            (
                Just(DecodeAttentionShape {
                    batch,
                    q_heads: kv_heads * group,
                    kv_heads,
                    head_dim,
                }),
                prop::collection::vec(len.clone(), batch),
                prop::collection::vec(0u32..17, batch),
                prop::option::of(1u32..6),
                prop::sample::select(vec![0.5f32, 2.0, 8.0]),
                // No window, windows shorter than most sequences, and longer than any.
                prop_oneof![2 => Just(0u32), 1 => 1u32..600, 1 => 20_001u32..40_000],
                any::<u64>(),
            )
        })
        .prop_map(
            |(shape, lens, spare, split_multiple, query_scale, window, seed)| Case {
                shape,
                lens,
                spare,
                split_multiple,
                query_scale,
                window,
                seed,
            },
        )
}

/// Sequences packed one after another, each `[kv_heads, len + spare, head_dim]`, offsets
/// rounded to 16-byte rows.
fn packed_layouts(
    shape: &DecodeAttentionShape,
    lens: &[u32],
    spare: &[u32],
) -> (Vec<SequenceLayout>, usize) {
    let mut offset = 0u64;
    let layouts = lens
        .iter()
        .zip(spare)
        .map(|(&len, &extra)| {
            let layout = SequenceLayout {
                offset,
                capacity: len + extra,
                len,
            };
            offset += (shape.kv_heads * (len + extra) as usize * shape.head_dim) as u64;
            offset = offset.next_multiple_of(8) + 8;
            layout
        })
        .collect();
    (layouts, offset as usize)
}

/// Runs the kernel on fresh random data, with NaN in every unused K/V element and in the
/// output, and returns the relative error against the reference.
fn run_case(gpu: &Gpu, case: &Case) -> Result<f64, String> {
    let shape = case.shape;
    let (layouts, kv_elements) = packed_layouts(&shape, &case.lens, &case.spare);
    let mut rng = StdRng::seed_from_u64(case.seed);
    let q = random_bf16(&mut rng, shape.q_elements(), case.query_scale);
    let mut k = vec![POISON; kv_elements];
    let mut v = vec![POISON; kv_elements];
    for layout in &layouts {
        for head in 0..shape.kv_heads {
            let start = layout.offset as usize + head * layout.capacity as usize * shape.head_dim;
            let below_window = match case.window {
                0 => 0,
                window => layout.len.saturating_sub(window) as usize,
            };
            let first = start + below_window * shape.head_dim;
            for i in first..start + layout.len as usize * shape.head_dim {
                k[i] = bf16::from_f32(rng.gen_range(-1.0..1.0));
                v[i] = bf16::from_f32(rng.gen_range(-1.0..1.0));
            }
        }
    }
    let plan = match case.split_multiple {
        Some(multiple) => {
            let (group, head_dim) = (shape.group() as u32, shape.head_dim as u32);
            let step = tokens_per_iteration(group, head_dim);
            // Short splits, but no more of them than the merge holds (long sequences then
            // merge close to `MAX_SPLITS` splits).
            let longest = case.lens.iter().copied().max().unwrap_or(1);
            let fewest = shortest_split_len(longest, group, head_dim);
            DecodeAttentionPlan::with_split_len(shape, &layouts, (multiple * step).max(fewest))
        }
        None => DecodeAttentionPlan::for_gpu(gpu, shape, &layouts),
    }
    .map_err(|e| e.to_string())?
    .with_window(case.window);
    let scale = plan.scale() as f64;
    let expected = reference::attention::decode_attention_windowed(
        &shape,
        &layouts,
        (&q, &k, &v),
        scale,
        case.window as usize,
    );
    let actual = run_gpu(gpu, plan, &q, &k, &v).map_err(|e| e.to_string())?;
    if let Some(index) = actual.iter().position(|x| !x.is_finite()) {
        return Err(format!(
            "output element {index} is {} (unwritten or read poison)",
            actual[index]
        ));
    }
    Ok(relative_error(&actual, &expected))
}

fn run_gpu(
    gpu: &Gpu,
    plan: DecodeAttentionPlan,
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
) -> shadowkv::Result<Vec<f64>> {
    let stream = gpu.stream();
    let elements = plan.shape().q_elements();
    let (q, k, v) = (
        stream.clone_htod(q)?,
        stream.clone_htod(k)?,
        stream.clone_htod(v)?,
    );
    let mut out = poisoned(gpu, elements)?;
    let mut attention = DecodeAttention::new(gpu, plan)?;
    attention.run(gpu, stream, &q, &k, &v, &mut out)?;
    Ok(to_f64(&stream.clone_dtoh(&out)?))
}

fn random_ragged_batches(gpu: &Gpu) -> Result<(), String> {
    let cases = proptest_cases(40);
    let mut runner = proptest_runner(40);
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

fn llama3_long_context(gpu: &Gpu) -> Result<(), String> {
    // Llama-3-8B: 32 query heads over 8 KV heads, d = 128, one sequence of 122K tokens and a
    // second, shorter one that ends mid-tile.
    let case = Case {
        shape: DecodeAttentionShape {
            batch: 2,
            q_heads: 32,
            kv_heads: 8,
            head_dim: 128,
        },
        lens: vec![122_880, 3_001],
        spare: vec![8, 5],
        split_multiple: None,
        query_scale: 4.0,
        window: 0,
        seed: 7,
    };
    let error = run_case(gpu, &case)?;
    eprintln!("Llama-3-8B shape at 122,880 + 3,001 tokens: relative error {error:.3e}");
    if error < TOLERANCE {
        Ok(())
    } else {
        Err(format!("relative error {error:.3e}"))
    }
}

/// GLM-4-9B's heads (32 over 2 KV heads of 128: group 16, run as two virtual heads of 8 per
/// KV head) and Gemma-3-270M's (4 over 1 of 256), with and without its 512-token window,
/// planned and with forced short splits.
fn glm4_and_gemma3_heads(gpu: &Gpu) -> Result<(), String> {
    for (q_heads, kv_heads, head_dim, window) in [
        (32usize, 2usize, 128usize, 0u32),
        (4, 1, 256, 0),
        (4, 1, 256, 512),
    ] {
        for split_multiple in [None, Some(1), Some(3)] {
            let case = Case {
                shape: DecodeAttentionShape {
                    batch: 3,
                    q_heads,
                    kv_heads,
                    head_dim,
                },
                lens: vec![20_001, 513, 7],
                spare: vec![3, 0, 9],
                split_multiple,
                query_scale: 4.0,
                window,
                seed: q_heads as u64 + u64::from(window),
            };
            let error = run_case(gpu, &case)?;
            eprintln!(
                "{q_heads}/{kv_heads} heads of {head_dim}, window {window}, splits \
                 {split_multiple:?}: relative error {error:.3e}"
            );
            if error >= TOLERANCE {
                return Err(format!("relative error {error:.3e} for {case:?}"));
            }
        }
    }
    Ok(())
}

fn never_reads_past_len(gpu: &Gpu) -> Result<(), String> {
    // Lengths one past and one short of every tile boundary; the spare rows hold NaN, and
    // with a window so do the rows below it.
    for len in [1u32, 31, 33, 127, 129, 255, 257, 1023, 1025] {
        for (split_multiple, window) in [(None, 0), (Some(1), 0), (None, 100), (Some(1), 129)] {
            let case = Case {
                shape: DecodeAttentionShape {
                    batch: 3,
                    q_heads: 8,
                    kv_heads: 2,
                    head_dim: 128,
                },
                lens: vec![len, len + 1, len.saturating_sub(1).max(1)],
                spare: vec![16, 9, 1],
                split_multiple,
                query_scale: 2.0,
                window,
                seed: u64::from(len),
            };
            let error = run_case(gpu, &case)?;
            if error >= TOLERANCE {
                return Err(format!(
                    "len {len}, window {window}: relative error {error:.3e}"
                ));
            }
        }
    }
    Ok(())
}

fn rejects_mismatched_buffers(gpu: &Gpu) -> Result<(), String> {
    let shape = DecodeAttentionShape {
        batch: 2,
        q_heads: 8,
        kv_heads: 2,
        head_dim: 64,
    };
    let (layouts, kv_elements) = packed_layouts(&shape, &[100, 50], &[0, 0]);
    let plan = DecodeAttentionPlan::for_gpu(gpu, shape, &layouts).map_err(|e| e.to_string())?;
    let mut attention = DecodeAttention::new(gpu, plan).map_err(|e| e.to_string())?;
    let stream = gpu.stream();
    let buffer = |n: usize| poisoned(gpu, n).map_err(|e| e.to_string());
    let (q, k, v, mut out) = (
        buffer(shape.q_elements())?,
        buffer(kv_elements)?,
        buffer(kv_elements)?,
        buffer(shape.q_elements())?,
    );
    let (short_q, short_k) = (buffer(shape.q_elements() - 1)?, buffer(kv_elements - 9)?);
    let mut short_out = buffer(shape.q_elements() + 1)?;
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
    expect_invalid(
        attention.run(gpu, stream, &q, &k, &v, &mut short_out),
        "out",
    )?;
    attention
        .run(gpu, stream, &q, &k, &v, &mut out)
        .map_err(|e| e.to_string())
}
