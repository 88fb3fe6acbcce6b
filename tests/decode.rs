//! GPU equivalence of the ShadowKV decode kernels (scoring, top-k, plan, fetch, rebuild) and of
//! the whole one-layer step against their CPU references, on fresh random ragged batches.
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use half::bf16;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::kernels::plan::PlanBuffers;
use shadowkv::kernels::shadow::ShadowBatch;
use shadowkv::kernels::{plan, scoring, topk};
use shadowkv::reference::decode_step::{decode_step_rotary, HostLayer};
use shadowkv::reference::{self, relative_error};
use shadowkv::{
    DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, DecodeStep, Error, Gpu, Miss,
    RopeConfig, SequenceLayout, ShadowConfig, EMPTY_SLOT,
};
use shadowkv_suite::layers::{random_layer, small_layer, upload, SequenceSpec};
use shadowkv_suite::rope_variants::{next_variant, rope_variant, PARTIAL_HALVES};
use shadowkv_suite::{poisoned, random_bf16, run_gpu_tests, to_f64};

const TOLERANCE: f64 = 1e-2;

fn main() {
    run_gpu_tests(&[
        ("scoring_and_topk_match_reference", scoring_and_topk),
        ("topk_with_many_ties_is_exact", topk_with_ties),
        ("topk_past_shared_memory_is_exact", topk_past_shared_memory),
        ("plan_matches_reference", plan_matches_reference),
        (
            "topk_with_plan_matches_reference",
            topk_with_plan_matches_reference,
        ),
        ("step_matches_reference_over_steps", step_over_steps),
        ("step_with_full_budget_equals_full_attention", full_budget),
        ("step_rejects_bad_input", rejects_bad_input),
    ])
}

fn cases() -> u32 {
    shadowkv_suite::proptest_cases(12)
}

fn runner() -> TestRunner {
    // No shrinking: a failing case is reported as drawn (its cases are heavy, and shrinking
    // them could run for many minutes on the device).
    TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        max_shrink_iters: 0,
        ..Config::default()
    })
}

fn s<E: std::fmt::Display>(error: E) -> String {
    error.to_string()
}

/// A random config: group 1..=8 or 16 (1, 2 or 4 at d 256), d 64/128/256, c 1..=16, r a
/// multiple of 16 up to 256, budget.
fn config_strategy() -> impl Strategy<Value = ShadowConfig> {
    (
        1usize..=3,
        prop_oneof![8 => 1usize..=8, 1 => Just(16usize)],
        prop::sample::select(vec![64usize, 128, 256]),
        prop::sample::select(vec![1usize, 4, 5, 8, 16]),
        1usize..=16,
        prop::sample::select(vec![1usize, 7, 32, 64, 100]),
    )
        .prop_map(
            |(kv_heads, group, head_dim, chunk_size, rank_steps, budget_chunks)| ShadowConfig {
                q_heads: kv_heads * d256_group(group, head_dim),
                kv_heads,
                head_dim,
                chunk_size,
                rank: (16 * rank_steps).min(kv_heads * head_dim),
                budget_chunks,
            },
        )
}

/// Ragged sequences for `config`: prompts long enough for the budget, some far longer.
fn specs_strategy(config: ShadowConfig) -> impl Strategy<Value = Vec<SequenceSpec>> {
    let c = config.chunk_size as u32;
    let k = config.budget_chunks as u32;
    let spec = (0u32..3000, 0u32..4, 0u32..6, 1u32..40, 0u32..9, 0u32..7).prop_map(
        move |(extra_chunks, local, outliers, generated, spare, remainder)| SequenceSpec {
            prompt_len: (k + extra_chunks + local + outliers) * c + remainder % c.max(1),
            local_chunks: local,
            outlier_chunks: outliers,
            generated,
            spare,
        },
    );
    prop::collection::vec(spec, 1..=4)
}

/// `group`, or at head dimension 256 one of the groups compiled there.
fn d256_group(group: usize, head_dim: usize) -> usize {
    if head_dim == 256 {
        [1, 2, 4][group % 3]
    } else {
        group
    }
}

fn case_strategy() -> impl Strategy<Value = (ShadowConfig, Vec<SequenceSpec>, u64)> {
    config_strategy().prop_flat_map(|config| (Just(config), specs_strategy(config), any::<u64>()))
}

fn random_q(rng: &mut StdRng, config: &ShadowConfig, batch: usize, scale: f32) -> Vec<bf16> {
    random_bf16(rng, batch * config.q_heads * config.head_dim, scale)
}

/// The entries of a `[.., landmarks]` buffer that (sequence, head) addresses.
fn per_head<T: Copy>(layer: &HostLayer, config: &ShadowConfig, buffer: &[T]) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    for s in &layer.sequences {
        for h in 0..config.kv_heads as u32 {
            let base = s.landmark_base(h) as usize;
            out.push(buffer[base..base + s.landmarks as usize].to_vec());
        }
    }
    out
}

fn scoring_and_topk(gpu: &Gpu) -> Result<(), String> {
    let worst = std::cell::Cell::new((0.0f64, 0.0f64));
    runner()
        .run(&case_strategy(), |(config, specs, seed)| {
            let (logit_error, score_error) =
                check_scoring(gpu, &config, &specs, seed, None).map_err(TestCaseError::fail)?;
            eprintln!(
                "  scoring/topk case ok: {config:?}, {} sequences",
                specs.len()
            );
            let (a, b) = worst.get();
            worst.set((a.max(logit_error), b.max(score_error)));
            Ok(())
        })
        .map_err(s)?;
    let (logits, scores) = worst.get();
    eprintln!(
        "{} random batches: worst relative error logits {logits:.2e}, scores {scores:.2e}; selections exact",
        cases()
    );
    Ok(())
}

/// A random layer and query, scored on the GPU: what the top-k reads.
struct Scored {
    host: HostLayer,
    q: Vec<bf16>,
    batch: ShadowBatch,
    chunk_ids: CudaSlice<u32>,
    logits: CudaSlice<f32>,
    tile_stats: CudaSlice<f32>,
    scale: f32,
}

/// Draws a layer and query from `rng` and runs `scoring` over it into poisoned buffers.
fn scored(
    gpu: &Gpu,
    config: &ShadowConfig,
    specs: &[SequenceSpec],
    rng: &mut StdRng,
    tied_rows: Option<usize>,
) -> Result<Scored, String> {
    let stream = gpu.stream();
    let mut host = random_layer(rng, config, specs);
    if let Some(rows) = tied_rows {
        tie_landmarks(rng, config, &mut host, rows);
    }
    let q = random_q(rng, config, specs.len(), 2.0);
    let batch = ShadowBatch::new(stream, *config, &host.sequences).map_err(s)?;
    let (dq, landmarks, chunk_ids) = (
        stream.clone_htod(&q).map_err(s)?,
        stream.clone_htod(&host.landmarks).map_err(s)?,
        stream.clone_htod(&host.chunk_ids).map_err(s)?,
    );
    let nan = |n: usize| stream.clone_htod(&vec![f32::NAN; n]).map_err(s);
    let mut logits = nan(scoring::logits_len(&batch))?;
    let mut tile_stats = nan(scoring::tile_stats_len(&batch))?;
    let scale = 1.0 / (config.head_dim as f32).sqrt();
    scoring::run(
        gpu,
        stream,
        &batch,
        batch.whole(),
        &dq,
        &landmarks,
        &mut logits,
        &mut tile_stats,
        scale,
    )
    .map_err(s)?;
    Ok(Scored {
        host,
        q,
        batch,
        chunk_ids,
        logits,
        tile_stats,
        scale,
    })
}

/// Poisoned top-k outputs for `batch`: NaN scores, and selection entries no chunk id has.
fn poisoned_topk_outputs(
    gpu: &Gpu,
    batch: &ShadowBatch,
) -> Result<(CudaSlice<f32>, CudaSlice<u32>), String> {
    let stream = gpu.stream();
    Ok((
        stream
            .clone_htod(&vec![f32::NAN; batch.extents().landmark_rows])
            .map_err(s)?,
        stream
            .clone_htod(&vec![u32::MAX - 1; batch.slot_entries()])
            .map_err(s)?,
    ))
}

/// The top-k alone over `scored`'s logits, in clusters of `cluster_blocks` (as `topk::run`
/// takes it), on poisoned outputs: the scores and the selection it wrote.
fn topk_alone(
    gpu: &Gpu,
    scored: &Scored,
    cluster_blocks: Option<u32>,
) -> Result<(Vec<f32>, Vec<u32>), String> {
    let stream = gpu.stream();
    let batch = &scored.batch;
    let (mut scores, mut selection) = poisoned_topk_outputs(gpu, batch)?;
    topk::run(
        gpu,
        stream,
        batch,
        batch.whole(),
        &scored.logits,
        &scored.tile_stats,
        &scored.chunk_ids,
        &mut scores,
        &mut selection,
        cluster_blocks,
    )
    .map_err(s)?;
    Ok((
        stream.clone_dtoh(&scores).map_err(s)?,
        stream.clone_dtoh(&selection).map_err(s)?,
    ))
}

/// Whether two score buffers hold the same floats, bit for bit.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.iter()
        .map(|x| x.to_bits())
        .eq(b.iter().map(|x| x.to_bits()))
}

/// Landmarks drawn from `rows` distinct random rows only: most scores tie, and the k-th
/// falls inside a tie.
fn tie_landmarks(rng: &mut StdRng, config: &ShadowConfig, host: &mut HostLayer, rows: usize) {
    let d = config.head_dim;
    let rows: Vec<Vec<bf16>> = (0..rows).map(|_| random_bf16(rng, d, 1.0)).collect();
    for (i, landmark) in host.landmarks.chunks_mut(d).enumerate() {
        landmark.copy_from_slice(&rows[(i * 7 + i / 5) % rows.len()]);
    }
}

/// Scoring and top-k against the reference: logits and scores by relative error, the
/// selection exactly (the reference selects from the GPU's own scores). `tied_rows`: see
/// [`tie_landmarks`].
fn check_scoring(
    gpu: &Gpu,
    config: &ShadowConfig,
    specs: &[SequenceSpec],
    seed: u64,
    tied_rows: Option<usize>,
) -> Result<(f64, f64), String> {
    let scored = scored(
        gpu,
        config,
        specs,
        &mut StdRng::seed_from_u64(seed),
        tied_rows,
    )?;
    let stream = gpu.stream();
    // The top-k as `run` picks it, then in clusters of 1, 3 and 8 blocks per head: the
    // same scores and the same selection, each run on poisoned outputs.
    let mut outputs = Vec::new();
    for cluster_blocks in [None, Some(1), Some(3), Some(8)] {
        if cluster_blocks.is_some_and(|blocks| blocks > 1) && !gpu.has_clusters() {
            continue;
        }
        let blocks = cluster_blocks
            .unwrap_or_else(|| topk::cluster_blocks(gpu, &scored.batch, scored.batch.whole()));
        let (scores, selection) = topk_alone(gpu, &scored, cluster_blocks)?;
        outputs.push((blocks, scores, selection));
    }
    let (_, first_scores, _) = &outputs[0];
    for (blocks, scores, _) in &outputs {
        if !same_bits(scores, first_scores) {
            return Err(format!(
                "top-k in clusters of {blocks} wrote other scores than in clusters of {}",
                outputs[0].0
            ));
        }
    }
    let Scored {
        host,
        q,
        logits,
        scale,
        ..
    } = &scored;
    let (q, scale) = (q.as_slice(), *scale);
    let gpu_logits = stream.clone_dtoh(logits).map_err(s)?;
    let gpu_scores = per_head(host, config, first_scores);
    let (mut logit_error, mut score_error) = (0.0f64, 0.0f64);
    let k = config.budget_chunks;
    for (b, sequence) in host.sequences.iter().enumerate() {
        for h in 0..config.kv_heads {
            let index = b * config.kv_heads + h;
            let expected = reference::scoring::logits(
                config,
                sequence,
                b,
                h,
                q,
                &host.landmarks,
                scale as f64,
            );
            for (g, row) in expected.iter().enumerate() {
                let at = sequence.logit_base(h as u32, config.group() as u32, g as u32) as usize;
                let actual: Vec<f64> = gpu_logits[at..at + row.len()]
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                logit_error = logit_error.max(relative_error(&actual, row));
            }
            let expected_scores = reference::scoring::scores(&expected);
            let actual: Vec<f64> = gpu_scores[index].iter().map(|&x| x as f64).collect();
            score_error = score_error.max(relative_error(&actual, &expected_scores));
            let base = sequence.landmark_base(h as u32) as usize;
            let ids = &host.chunk_ids[base..base + sequence.landmarks as usize];
            let want = reference::topk::select(&gpu_scores[index], ids, k);
            for (blocks, _, selection) in &outputs {
                if selection[index * k..(index + 1) * k] != want[..] {
                    return Err(format!(
                        "sequence {b} head {h}: selection in clusters of {blocks} differs from the top-{k} of the GPU's scores ({} landmarks)",
                        sequence.landmarks
                    ));
                }
            }
        }
    }
    if logit_error > 1e-3 || score_error > TOLERANCE {
        return Err(format!(
            "relative error logits {logit_error:.2e}, scores {score_error:.2e} for {config:?}"
        ));
    }
    Ok((logit_error, score_error))
}

fn topk_with_ties(gpu: &Gpu) -> Result<(), String> {
    // Landmarks from three distinct rows: most scores tie, and the k-th falls inside a tie.
    let config = ShadowConfig {
        budget_chunks: 50,
        ..ShadowConfig::LLAMA_3_8B
    };
    let specs = [SequenceSpec {
        prompt_len: 8 * 3000 + 5,
        local_chunks: 4,
        outlier_chunks: 8,
        generated: 3,
        spare: 1,
    }];
    let mut rng = StdRng::seed_from_u64(11);
    let mut host = random_layer(&mut rng, &config, &specs);
    tie_landmarks(&mut rng, &config, &mut host, 3);
    let q = random_q(&mut rng, &config, 1, 2.0);
    let mut layer = upload(gpu, &config, &host, false).map_err(s)?;
    let mut step = DecodeStep::new(gpu, RopeConfig::LLAMA_3, &layer.batch).map_err(s)?;
    let dq = gpu.stream().clone_htod(&q).map_err(s)?;
    let mut out = poisoned(gpu, q.len()).map_err(s)?;
    step.run(gpu, &mut layer, &dq, &mut out).map_err(s)?;
    let stream = gpu.stream();
    let scores = per_head(
        &host,
        &config,
        &stream.clone_dtoh(&step.scratch().scores).map_err(s)?,
    );
    let selection = stream.clone_dtoh(&step.scratch().selection).map_err(s)?;
    let k = config.budget_chunks;
    let sequence = &host.sequences[0];
    for h in 0..config.kv_heads {
        let base = sequence.landmark_base(h as u32) as usize;
        let ids = &host.chunk_ids[base..base + sequence.landmarks as usize];
        let want = reference::topk::select(&scores[h], ids, k);
        if selection[h * k..(h + 1) * k] != want[..] {
            return Err(format!("head {h}: tie-breaking selection differs"));
        }
    }
    // A longer sequence of the same kind through the top-k alone, in one block per head
    // too: a warp's segment then holds more ties than its list (`topk::WARP_LIST`), and it
    // walks the segment a second time.
    let config = ShadowConfig {
        q_heads: 8,
        kv_heads: 2,
        budget_chunks: 300,
        ..config
    };
    let long = SequenceSpec {
        prompt_len: 8 * 20_000 + 3,
        ..specs[0]
    };
    check_scoring(gpu, &config, &[long], 12, Some(3))?;
    Ok(())
}

/// A sequence with more landmarks than the top-k kernel stages in shared memory: the whole
/// batch selects from `scores` in global memory, still exactly.
fn topk_past_shared_memory(gpu: &Gpu) -> Result<(), String> {
    let config = ShadowConfig {
        q_heads: 4,
        kv_heads: 2,
        head_dim: 64,
        chunk_size: 1,
        rank: 16,
        budget_chunks: 256,
    };
    // Past what shared memory stages (the passes run over `scores`), and long enough for
    // every scoring tile length (`scoring::tile_len` grows with the batch's landmarks).
    let past = topk::kernel_layout::MAX_SHARED_SCORES + 4_321;
    for (seed, landmarks) in [(0u64, past), (1, 140_003), (2, 270_001)] {
        let specs = [
            SequenceSpec {
                prompt_len: landmarks + 9,
                local_chunks: 4,
                outlier_chunks: 5,
                generated: 2,
                spare: 0,
            },
            SequenceSpec {
                prompt_len: 3_001,
                local_chunks: 1,
                outlier_chunks: 0,
                generated: 1,
                spare: 3,
            },
        ];
        let (logits, scores) = check_scoring(gpu, &config, &specs, 100 + seed, None)?;
        eprintln!(
            "  {landmarks} landmarks (over {} in shared memory), 2 KV heads: logits {logits:.2e}, scores {scores:.2e}; selection exact",
            topk::kernel_layout::MAX_SHARED_SCORES
        );
    }
    Ok(())
}

fn plan_matches_reference(gpu: &Gpu) -> Result<(), String> {
    runner()
        .run(&case_strategy(), |(config, specs, seed)| {
            check_plan(gpu, &config, &specs, seed).map_err(TestCaseError::fail)
        })
        .map_err(s)
}

fn topk_with_plan_matches_reference(gpu: &Gpu) -> Result<(), String> {
    runner()
        .run(&case_strategy(), |(config, specs, seed)| {
            check_topk_with_plan(gpu, &config, &specs, seed).map_err(TestCaseError::fail)
        })
        .map_err(s)
}

/// A resident set for one head: a random share of `selected` (hits), then other chunk ids
/// (`others`, misses' freed slots) and empty slots, shuffled.
fn random_resident(rng: &mut StdRng, selected: &[u32], others: &[u32], k: usize) -> Vec<u32> {
    let keep = rng.gen_range(0..=k);
    let mut slots: Vec<u32> = selected[..keep].to_vec();
    slots.extend(others.iter().take(k - keep));
    while slots.len() < k {
        slots.push(EMPTY_SLOT);
    }
    slots.shuffle(rng);
    slots
}

/// Poisoned plan outputs: misses, counts and fresh marks.
type PlanOutputs = (CudaSlice<Miss>, CudaSlice<u32>, CudaSlice<u32>);

fn poisoned_plan_outputs(gpu: &Gpu, batch: &ShadowBatch) -> Result<PlanOutputs, String> {
    let stream = gpu.stream();
    let heads = batch.batch() * batch.config().kv_heads;
    Ok((
        stream
            .clone_htod(&vec![Miss { chunk: 7, slot: 7 }; batch.slot_entries()])
            .map_err(s)?,
        stream.clone_htod(&vec![u32::MAX; heads]).map_err(s)?,
        stream
            .clone_htod(&vec![7u32; batch.slot_entries()])
            .map_err(s)?,
    ))
}

/// A plan's buffers: `resident` and `outputs`, no mapped host counts.
fn plan_buffers<'a>(
    resident: &'a mut CudaSlice<u32>,
    (misses, miss_counts, fresh): &'a mut PlanOutputs,
) -> PlanBuffers<'a> {
    PlanBuffers::new(resident, misses, miss_counts, fresh)
}

/// The GPU's plan (`resident` after it, and `outputs`) against the reference plan of
/// `selection` over `resident_before`, exactly.
fn compare_plan(
    gpu: &Gpu,
    batch: &ShadowBatch,
    selection: &[u32],
    resident_before: &[u32],
    resident: &CudaSlice<u32>,
    (misses, counts, fresh): &PlanOutputs,
) -> Result<(), String> {
    let stream = gpu.stream();
    let config = batch.config();
    let k = config.budget_chunks;
    let gpu_resident = stream.clone_dtoh(resident).map_err(s)?;
    let gpu_misses = stream.clone_dtoh(misses).map_err(s)?;
    let gpu_counts = stream.clone_dtoh(counts).map_err(s)?;
    let gpu_fresh = stream.clone_dtoh(fresh).map_err(s)?;
    for index in 0..batch.batch() * config.kv_heads {
        let range = index * k..(index + 1) * k;
        let mut want_resident = resident_before[range.clone()].to_vec();
        let want = reference::plan::plan(&selection[range.clone()], &mut want_resident);
        let count = gpu_counts[index] as usize;
        if count != want.len()
            || gpu_misses[index * k..index * k + count] != want[..]
            || gpu_resident[range.clone()] != want_resident[..]
            || gpu_fresh[range] != reference::plan::fresh_slots(&want, k)[..]
        {
            return Err(format!(
                "head {index}: plan differs ({count} misses, reference {}) for {config:?}",
                want.len()
            ));
        }
    }
    Ok(())
}

/// The plan on random selections and resident sets (a random share of hits, other chunks and
/// empty slots) against the reference: miss lists, counts, fresh marks and resident ids exactly.
fn check_plan(
    gpu: &Gpu,
    config: &ShadowConfig,
    specs: &[SequenceSpec],
    seed: u64,
) -> Result<(), String> {
    let stream = gpu.stream();
    let mut rng = StdRng::seed_from_u64(seed);
    let host = random_layer(&mut rng, config, specs);
    let batch = ShadowBatch::new(stream, *config, &host.sequences).map_err(s)?;
    let k = config.budget_chunks;
    let mut selection = Vec::new();
    let mut resident = Vec::new();
    for sequence in &host.sequences {
        for h in 0..config.kv_heads as u32 {
            let base = sequence.landmark_base(h) as usize;
            let mut ids = host.chunk_ids[base..base + sequence.landmarks as usize].to_vec();
            ids.shuffle(&mut rng);
            selection.extend_from_slice(&ids[..k]);
            resident.extend(random_resident(&mut rng, &ids[..k], &ids[k..], k));
        }
    }
    let d_selection = stream.clone_htod(&selection).map_err(s)?;
    let mut d_resident = stream.clone_htod(&resident).map_err(s)?;
    let mut outputs = poisoned_plan_outputs(gpu, &batch)?;
    plan::run(
        gpu,
        stream,
        &batch,
        batch.whole(),
        &d_selection,
        plan_buffers(&mut d_resident, &mut outputs),
    )
    .map_err(s)?;
    compare_plan(gpu, &batch, &selection, &resident, &d_resident, &outputs)
}

/// The top-k with the plan in the same launch (as the step runs them): the same scores and
/// selection as the top-k alone, and the plan of that selection over a random resident set
/// (a random share of it resident) against the reference, exactly.
fn check_topk_with_plan(
    gpu: &Gpu,
    config: &ShadowConfig,
    specs: &[SequenceSpec],
    seed: u64,
) -> Result<(), String> {
    let stream = gpu.stream();
    let mut rng = StdRng::seed_from_u64(seed);
    let scored = scored(gpu, config, specs, &mut rng, None)?;
    let alone = topk_alone(gpu, &scored, None)?;
    let Scored {
        host,
        batch,
        chunk_ids,
        logits,
        tile_stats,
        ..
    } = &scored;
    let k = config.budget_chunks;
    let mut resident = Vec::new();
    for (index, chosen) in alone.1.chunks(k).enumerate() {
        let sequence = &host.sequences[index / config.kv_heads];
        let base = sequence.landmark_base((index % config.kv_heads) as u32) as usize;
        let mut chosen = chosen.to_vec();
        chosen.shuffle(&mut rng);
        let others: Vec<u32> = host.chunk_ids[base..base + sequence.landmarks as usize]
            .iter()
            .copied()
            .filter(|id| !chosen.contains(id))
            .collect();
        resident.extend(random_resident(&mut rng, &chosen, &others, k));
    }
    // As `run_and_plan` picks, and in clusters of 3 blocks per head.
    for cluster_blocks in [None, Some(3)] {
        if cluster_blocks.is_some() && !gpu.has_clusters() {
            continue;
        }
        let mut d_resident = stream.clone_htod(&resident).map_err(s)?;
        let mut outputs = poisoned_plan_outputs(gpu, batch)?;
        let (mut scores, mut selection) = poisoned_topk_outputs(gpu, batch)?;
        topk::run_and_plan(
            gpu,
            stream,
            batch,
            batch.whole(),
            logits,
            tile_stats,
            chunk_ids,
            &mut scores,
            &mut selection,
            plan_buffers(&mut d_resident, &mut outputs),
            cluster_blocks,
        )
        .map_err(s)?;
        let with_plan = (
            stream.clone_dtoh(&scores).map_err(s)?,
            stream.clone_dtoh(&selection).map_err(s)?,
        );
        if !same_bits(&with_plan.0, &alone.0) || with_plan.1 != alone.1 {
            return Err(format!(
                "top-k with the plan (clusters {cluster_blocks:?}) wrote other scores or another selection than alone for {config:?}"
            ));
        }
        compare_plan(gpu, batch, &alone.1, &resident, &d_resident, &outputs)?;
    }
    Ok(())
}

/// Runs `steps` decode steps on the GPU and the reference, with a query that drifts (so
/// later steps hit part of the cache), comparing everything each step.
fn run_steps(
    gpu: &Gpu,
    config: &ShadowConfig,
    specs: &[SequenceSpec],
    seed: u64,
    steps: usize,
    values_on_gpu: bool,
) -> Result<(f64, f64), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut host = random_layer(&mut rng, config, specs);
    let mut layer = upload(gpu, config, &host, values_on_gpu).map_err(s)?;
    // Every RoPE variant the rebuild supports: scaled, rope_freqs factors, partial rotary with
    // adjacent pairs, LongRoPE with its attention factor.
    let variant = match next_variant() {
        PARTIAL_HALVES => 0,
        variant => variant,
    };
    let rope = rope_variant(&mut rng, config.head_dim, variant);
    let frequencies = shadowkv::decode_step::inverse_frequencies(&rope, config.head_dim as u32);
    let rotary = rope.layout(config.head_dim as u32);
    let mut step = DecodeStep::new(gpu, rope, &layer.batch).map_err(s)?;
    let stream = gpu.stream();
    let mut q = random_q(&mut rng, config, specs.len(), 2.0);
    let (mut worst, mut hit_rate) = (0.0f64, 0.0f64);
    for index in 0..steps {
        let dq = stream.clone_htod(&q).map_err(s)?;
        let mut out = poisoned(gpu, q.len()).map_err(s)?;
        // Every arrangement: the resident-slot attention beside the fetch and the fresh
        // slots after it, one attention after the fetch (rebuild beside it), and all in order.
        let (overlap, split) = [(true, Some(true)), (true, Some(false)), (false, None)][index % 3];
        step.set_overlap(overlap);
        step.set_split_attention(split);
        step.run(gpu, &mut layer, &dq, &mut out).map_err(s)?;
        let stats = step.stats().map_err(s)?;
        let actual = to_f64(&stream.clone_dtoh(&out).map_err(s)?);
        let scratch = step.scratch();
        let device_scores = per_head(
            &host,
            config,
            &stream.clone_dtoh(&scratch.scores).map_err(s)?,
        );
        let selection = stream.clone_dtoh(&scratch.selection).map_err(s)?;
        let misses = stream.clone_dtoh(&scratch.misses).map_err(s)?;
        let counts = stream.clone_dtoh(&scratch.miss_counts).map_err(s)?;
        let expected = decode_step_rotary(
            config,
            (&frequencies, &rotary),
            &mut host,
            &q,
            Some(&device_scores),
        );
        let k = config.budget_chunks;
        for index in 0..specs.len() * config.kv_heads {
            if selection[index * k..(index + 1) * k] != expected.selection[index][..] {
                return Err(format!("head {index}: selection differs"));
            }
            let count = counts[index] as usize;
            if misses[index * k..index * k + count] != expected.misses[index][..] {
                return Err(format!("head {index}: miss list differs"));
            }
            if stats.misses_per_head[index] as usize != count {
                return Err("statistics disagree with the miss counts".into());
            }
            let score_error = relative_error(
                &device_scores[index]
                    .iter()
                    .map(|&x| x as f64)
                    .collect::<Vec<_>>(),
                &expected.scores[index],
            );
            if score_error > TOLERANCE {
                return Err(format!(
                    "head {index}: scores relative error {score_error:.2e}"
                ));
            }
        }
        let resident = stream.clone_dtoh(&layer.resident).map_err(s)?;
        if resident != host.resident {
            return Err("resident ids differ from the reference".into());
        }
        let keys = stream.clone_dtoh(&layer.k).map_err(s)?;
        let values = stream.clone_dtoh(&layer.v).map_err(s)?;
        let key_error = relative_error(
            &to_f64(&keys_in_slots(&host, config, &keys)),
            &to_f64(&keys_in_slots(&host, config, &host.k)),
        );
        if key_error > TOLERANCE {
            return Err(format!("rebuilt keys: relative error {key_error:.2e}"));
        }
        if keys_in_slots(&host, config, &values) != keys_in_slots(&host, config, &host.v) {
            return Err("fetched values differ from the host values".into());
        }
        if let Some(i) = actual.iter().position(|x| !x.is_finite()) {
            return Err(format!("output element {i} is {}", actual[i]));
        }
        let error = relative_error(&actual, &expected.out);
        if error > TOLERANCE {
            return Err(format!("step output: relative error {error:.2e}"));
        }
        worst = worst.max(error.max(key_error));
        hit_rate = stats.hit_rate();
        // Drift the query a little: most of the selection stays.
        for x in q.iter_mut() {
            *x = bf16::from_f32(x.to_f32() + rng.gen_range(-0.3..0.3));
        }
    }
    Ok((worst, hit_rate))
}

/// The slot rows of every (sequence, head) of a K or V buffer.
fn keys_in_slots(host: &HostLayer, config: &ShadowConfig, buffer: &[bf16]) -> Vec<bf16> {
    let mut out = Vec::new();
    for s in &host.sequences {
        for h in 0..config.kv_heads as u32 {
            let start = s.kv_row(h, s.sparse_start, config.head_dim as u32) as usize;
            out.extend_from_slice(&buffer[start..start + config.sparse_budget() * config.head_dim]);
        }
    }
    out
}

fn step_over_steps(gpu: &Gpu) -> Result<(), String> {
    let worst = std::cell::Cell::new((0.0f64, 1.0f64));
    runner()
        .run(
            &(case_strategy(), any::<bool>()),
            |((config, specs, seed), on_gpu)| {
                let (error, hits) = run_steps(gpu, &config, &specs, seed, 3, on_gpu)
                    .map_err(TestCaseError::fail)?;
                eprintln!(
                    "  step case ok: {config:?}, {} sequences, error {error:.2e}, hits {hits:.2}",
                    specs.len()
                );
                let (e, h) = worst.get();
                worst.set((e.max(error), h.min(hits)));
                Ok(())
            },
        )
        .map_err(s)?;
    // Llama-3-8B shape at the defaults, a ragged batch of long prompts.
    let specs: Vec<SequenceSpec> = [32_768u32 + 5, 9_001, 20_000]
        .iter()
        .map(|&prompt_len| SequenceSpec {
            prompt_len,
            local_chunks: 4,
            outlier_chunks: 48,
            generated: 17,
            spare: 5,
        })
        .collect();
    let (error, hits) = run_steps(gpu, &ShadowConfig::LLAMA_3_8B, &specs, 5, 4, false)?;
    let (e, _) = worst.get();
    eprintln!(
        "{} random ragged batches x 3 steps: worst relative error {e:.2e}; Llama-3-8B defaults (32K/9K/20K) x 4 steps: {error:.2e}, last hit rate {hits:.2}",
        cases()
    );
    Ok(())
}

/// The layer's factors as the reference rebuild reads them.
fn factors_of(host: &HostLayer) -> reference::rebuild::Factors<'_> {
    reference::rebuild::Factors {
        a: &host.a,
        bm: &host.bm,
    }
}

fn full_budget(gpu: &Gpu) -> Result<(), String> {
    // Every landmark selected: ShadowKV's buffer holds every prompt token (local, outliers,
    // all chunks rebuilt) plus the generated ones, so it must equal full attention over the
    // whole context when the prompt's chunk keys are exactly RoPE(A · Bm).
    // RoPE variants: plain, rope_freqs factors, then partial adjacent with factors and LongRoPE.
    for (seed, head_dim, group, variant) in
        [(1u64, 128usize, 4usize, 0), (2, 64, 3, 2), (3, 128, 1, 6)]
    {
        let landmarks = 300u32;
        let config = ShadowConfig {
            q_heads: 2 * group,
            kv_heads: 2,
            head_dim,
            chunk_size: 8,
            rank: 64,
            budget_chunks: landmarks as usize,
        };
        let specs: Vec<SequenceSpec> = [(4u32, 7u32, 3u32, 9u32), (6, 2, 7, 0)]
            .iter()
            // remainder < c: every chunk is a landmark, an outlier or local.
            .map(|&(local, outliers, remainder, generated)| SequenceSpec {
                prompt_len: (landmarks + local + outliers) * 8 + remainder,
                local_chunks: local,
                outlier_chunks: outliers,
                generated,
                spare: 3,
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut host = random_layer(&mut rng, &config, &specs);
        let rope = rope_variant(&mut rng, head_dim, variant);
        let frequencies = shadowkv::decode_step::inverse_frequencies(&rope, head_dim as u32);
        let rotary = rope.layout(head_dim as u32);
        // Outlier rows: the exact keys RoPE(A · Bm) and values of their chunks.
        for sequence in &host.sequences {
            for h in 0..config.kv_heads as u32 {
                let base = sequence.landmark_base(h) as usize;
                let mut outliers: Vec<u32> = (0..sequence.chunks)
                    .filter(|c| !host.chunk_ids[base..base + landmarks as usize].contains(c))
                    .collect();
                outliers.sort();
                let local = sequence.prompt_len - sequence.chunks * 8;
                for (i, &chunk) in outliers.iter().enumerate() {
                    let keys = reference::rebuild::chunk_keys_rotary(
                        &config,
                        sequence,
                        (h as usize, chunk),
                        factors_of(&host),
                        &frequencies,
                        &rotary,
                    );
                    let row = sequence.kv_row(h, local + 8 * i as u32, head_dim as u32) as usize;
                    let source = sequence.host_value_chunk(h, chunk, 8, head_dim as u32) as usize;
                    for (j, key) in keys.iter().enumerate() {
                        host.k[row + j] = bf16::from_f64(*key);
                        host.v[row + j] = host.values[source + j];
                    }
                }
            }
        }
        // Full attention's buffers: [Hkv, prompt + generated, d] per sequence, in order.
        let mut full_k = Vec::new();
        let mut full_v = Vec::new();
        let mut layouts = Vec::new();
        for sequence in &host.sequences {
            let local = sequence.prompt_len - sequence.chunks * 8;
            let generated = sequence.kv.len - sequence.sparse_start - config.sparse_budget() as u32;
            let len = sequence.prompt_len + generated;
            layouts.push(SequenceLayout {
                offset: full_k.len() as u64,
                capacity: len,
                len,
            });
            for h in 0..config.kv_heads as u32 {
                for chunk in 0..sequence.chunks {
                    let keys = reference::rebuild::chunk_keys_rotary(
                        &config,
                        sequence,
                        (h as usize, chunk),
                        factors_of(&host),
                        &frequencies,
                        &rotary,
                    );
                    full_k.extend(keys.iter().map(|&x| bf16::from_f64(x)));
                    let source = sequence.host_value_chunk(h, chunk, 8, head_dim as u32) as usize;
                    full_v.extend_from_slice(&host.values[source..source + 8 * head_dim]);
                }
                let local_rows = sequence.kv_row(h, 0, head_dim as u32) as usize;
                full_k
                    .extend_from_slice(&host.k[local_rows..local_rows + local as usize * head_dim]);
                full_v
                    .extend_from_slice(&host.v[local_rows..local_rows + local as usize * head_dim]);
                let generated_rows = sequence.kv_row(
                    h,
                    sequence.sparse_start + config.sparse_budget() as u32,
                    head_dim as u32,
                ) as usize;
                full_k.extend_from_slice(
                    &host.k[generated_rows..generated_rows + generated as usize * head_dim],
                );
                full_v.extend_from_slice(
                    &host.v[generated_rows..generated_rows + generated as usize * head_dim],
                );
            }
        }
        let q = random_q(&mut rng, &config, specs.len(), 2.0);
        let mut layer = upload(gpu, &config, &host, false).map_err(s)?;
        let mut step = DecodeStep::new(gpu, rope, &layer.batch).map_err(s)?;
        let stream = gpu.stream();
        let dq = stream.clone_htod(&q).map_err(s)?;
        let mut out = poisoned(gpu, q.len()).map_err(s)?;
        step.run(gpu, &mut layer, &dq, &mut out).map_err(s)?;
        let shadow = to_f64(&stream.clone_dtoh(&out).map_err(s)?);
        let shape = DecodeAttentionShape {
            batch: specs.len(),
            q_heads: config.q_heads,
            kv_heads: 2,
            head_dim,
        };
        let scale = 1.0 / (head_dim as f64).sqrt();
        let expected =
            reference::attention::decode_attention(&shape, &layouts, &q, &full_k, &full_v, scale);
        let plan = DecodeAttentionPlan::for_gpu(gpu, shape, &layouts).map_err(s)?;
        let mut attention = DecodeAttention::new(gpu, plan).map_err(s)?;
        let (dk, dv) = (
            stream.clone_htod(&full_k).map_err(s)?,
            stream.clone_htod(&full_v).map_err(s)?,
        );
        let mut full_out = poisoned(gpu, q.len()).map_err(s)?;
        attention
            .run(gpu, stream, &dq, &dk, &dv, &mut full_out)
            .map_err(s)?;
        let full = to_f64(&stream.clone_dtoh(&full_out).map_err(s)?);
        let reference_step = decode_step_rotary(
            &config,
            (&frequencies, &rotary),
            &mut host.clone(),
            &q,
            None,
        );
        eprintln!(
            "  reference step vs full-attention reference {:.2e}; GPU step vs reference step {:.2e}",
            relative_error(&reference_step.out, &expected),
            relative_error(&shadow, &reference_step.out)
        );
        let (versus_reference, versus_full) = (
            relative_error(&shadow, &expected),
            relative_error(&shadow, &full),
        );
        eprintln!(
            "full budget (d {head_dim}, G {group}): ShadowKV vs full-attention reference {versus_reference:.2e}, vs GPU full attention {versus_full:.2e}"
        );
        if versus_reference > 5e-3 || versus_full > 5e-3 {
            return Err(format!("full budget differs from full attention: {versus_reference:.2e} / {versus_full:.2e}"));
        }
    }
    Ok(())
}

fn rejects_bad_input(gpu: &Gpu) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(3);
    let (config, host) = small_layer(&mut rng);
    let stream = gpu.stream();
    let expect_invalid = |result: shadowkv::Result<ShadowBatch>, argument: &str| match result {
        Err(Error::InvalidArgument {
            argument: named, ..
        }) if named == argument => Ok(()),
        Err(other) => Err(format!(
            "expected an error naming `{argument}`, got {other}"
        )),
        Ok(_) => Err(format!("expected an error naming `{argument}`, got Ok")),
    };
    for (bad, argument) in [
        (ShadowConfig { rank: 24, ..config }, "rank"),
        (
            ShadowConfig {
                rank: 272,
                ..config
            },
            "rank",
        ),
        (
            ShadowConfig {
                chunk_size: 0,
                ..config
            },
            "chunk_size",
        ),
        (
            ShadowConfig {
                chunk_size: 65,
                ..config
            },
            "chunk_size",
        ),
        (
            ShadowConfig {
                q_heads: 30,
                ..config
            },
            "q_heads",
        ),
        (
            ShadowConfig {
                head_dim: 96,
                ..config
            },
            "head_dim",
        ),
        (
            ShadowConfig {
                budget_chunks: 0,
                ..config
            },
            "budget_chunks",
        ),
    ] {
        expect_invalid(ShadowBatch::new(stream, bad, &host.sequences), argument)?;
    }
    let mut sequence = host.sequences[0];
    for broken in [
        // Too short for the budget.
        shadowkv::ShadowSequence {
            landmarks: 15,
            ..sequence
        },
        // Chunks past the prompt.
        shadowkv::ShadowSequence {
            prompt_len: sequence.chunks * 8 - 1,
            ..sequence
        },
        // Slots past the K/V length.
        shadowkv::ShadowSequence {
            sparse_start: sequence.kv.len,
            ..sequence
        },
        // Length past the capacity.
        shadowkv::ShadowSequence {
            kv: SequenceLayout {
                len: sequence.kv.capacity + 1,
                ..sequence.kv
            },
            ..sequence
        },
        // Misaligned A.
        shadowkv::ShadowSequence {
            a_offset: 4,
            ..sequence
        },
    ] {
        expect_invalid(ShadowBatch::new(stream, config, &[broken]), "sequences")?;
    }
    // Buffers shorter than the layouts, a q of the wrong batch, a layer of another config,
    // parts of the batch that are empty or reach past it.
    let mut layer = upload(gpu, &config, &host, false).map_err(s)?;
    for range in [0..0, 0..2, 1..2] {
        match layer.batch.part(range.clone()) {
            Err(Error::InvalidArgument {
                argument: "sequences",
                ..
            }) => {}
            other => {
                return Err(format!(
                    "part {range:?} of a batch of one: expected an error naming `sequences`, got {other:?}"
                ))
            }
        }
    }
    // RoPE the rebuild cannot apply (rotate-half pairs over part of the head) or that does not
    // fit the head (factors for another head dimension).
    let partial_halves = RopeConfig {
        rotary_dim: (config.head_dim / 2) as u32,
        ..RopeConfig::LLAMA_3
    };
    let wrong_factors = RopeConfig {
        factors: shadowkv::RopeFactors::new(&[1.0; 3]),
        ..RopeConfig::LLAMA_3
    };
    for (rope, argument) in [
        (partial_halves, "rotary.rotary_dim"),
        (wrong_factors, "rope"),
    ] {
        match DecodeStep::new(gpu, rope, &layer.batch) {
            Err(Error::InvalidArgument { argument: a, .. }) if a == argument => {}
            Err(other) => {
                return Err(format!(
                    "{rope:?}: expected `{argument}` refused, got {other}"
                ))
            }
            Ok(_) => return Err(format!("{rope:?}: accepted")),
        }
    }
    // Top-k clusters of 0 or more than 8 blocks per head.
    let step_scratch = DecodeStep::new(gpu, RopeConfig::LLAMA_3, &layer.batch).map_err(s)?;
    let w = step_scratch.scratch();
    let (mut scores, mut selection) = (w.scores.clone(), w.selection.clone());
    for blocks in [0, topk::MAX_CLUSTER_BLOCKS + 1] {
        match topk::run(
            gpu,
            stream,
            &layer.batch,
            layer.batch.whole(),
            &w.logits,
            &w.tile_stats,
            &layer.chunk_ids,
            &mut scores,
            &mut selection,
            Some(blocks),
        ) {
            Err(Error::InvalidArgument {
                argument: "cluster_blocks",
                ..
            }) => {}
            other => {
                return Err(format!(
                    "a top-k cluster of {blocks} blocks: expected an error naming `cluster_blocks`, got {other:?}"
                ))
            }
        }
    }
    let mut step = DecodeStep::new(gpu, RopeConfig::LLAMA_3, &layer.batch).map_err(s)?;
    let q = stream
        .clone_htod(&random_q(&mut rng, &config, 2, 1.0))
        .map_err(s)?;
    let mut out = poisoned(gpu, q.len()).map_err(s)?;
    match step.run(gpu, &mut layer, &q, &mut out) {
        Err(Error::InvalidArgument { argument: "q", .. }) => {}
        other => {
            return Err(format!(
                "a q for two sequences: expected an error naming `q`, got {other:?}"
            ))
        }
    }
    // A resident row past the layer's resident ids (one row here), and two sequences on one
    // row: refused by the plan, naming the sequence.
    let beyond = shadowkv::ShadowSequence {
        resident_row: 1,
        ..sequence
    };
    for (layouts, what) in [
        (vec![beyond], "a resident row past the buffer"),
        (
            vec![sequence, sequence],
            "two sequences on one resident row",
        ),
    ] {
        layer.batch.set_sequences(stream, &layouts).map_err(s)?;
        let q = stream
            .clone_htod(&random_q(&mut rng, &config, layouts.len(), 1.0))
            .map_err(s)?;
        let mut out = poisoned(gpu, q.len()).map_err(s)?;
        match step.run(gpu, &mut layer, &q, &mut out) {
            Err(Error::InvalidArgument {
                argument: "sequences",
                problem,
                ..
            }) if problem.contains("resident_row") && problem.contains("sequence") => {}
            other => {
                return Err(format!(
                    "{what}: expected an error naming `sequences` and the row, got {other:?}"
                ))
            }
        }
    }
    layer.batch.set_sequences(stream, &[sequence]).map_err(s)?;
    let needed = layer.batch.extents().a;
    layer.a = stream.clone_htod(&host.a[..needed - 1]).map_err(s)?;
    let q = stream
        .clone_htod(&random_q(&mut rng, &config, 1, 1.0))
        .map_err(s)?;
    let mut out = poisoned(gpu, q.len()).map_err(s)?;
    match step.run(gpu, &mut layer, &q, &mut out) {
        Err(Error::InvalidArgument { argument: "a", .. }) => {}
        other => {
            return Err(format!(
                "a short A: expected an error naming `a`, got {other:?}"
            ))
        }
    }
    sequence.landmarks = 16;
    let other = ShadowConfig {
        budget_chunks: 8,
        ..config
    };
    layer.batch = ShadowBatch::new(stream, other, &[sequence]).map_err(s)?;
    match step.run(gpu, &mut layer, &q, &mut out) {
        Err(Error::InvalidArgument {
            argument: "layer", ..
        }) => Ok(()),
        other => Err(format!(
            "a layer of another config: expected an error naming `layer`, got {other:?}"
        )),
    }
}
