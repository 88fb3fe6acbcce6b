//! The ShadowKV decode step and each of its kernels at Llama-3-8B shapes (32/8 heads, d 128,
//! c 8, r 160, S 2048, 48 outlier and 4 local chunks), contexts 32K and 122K, batch 1 and 16,
//! timed with CUDA events, next to ceilings measured in the same run: device-to-device copy,
//! pinned host-to-device copy and a cuBLAS bf16 GEMM. The step is compared with full attention
//! (the same attention kernel over the whole context) on the same inputs.
//!
//! `cargo bench --bench decode` (criterion statistics, then the tables).
//! For Nsight Compute: `ncu --clock-control none <bench binary> --bench --profile-time 1 b16_ctx122880`.
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion};
use half::bf16;
use rand::{rngs::StdRng, SeedableRng};
use shadowkv::cudarc::driver::{CudaSlice, CudaStream};
use shadowkv::kernels::plan::PlanBuffers;
use shadowkv::kernels::{fetch, plan, rebuild, scoring, topk};
use shadowkv::{
    DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, DecodeStep, Gpu, LayerValues,
    PinnedBuffer, RopeConfig, SequenceLayout, ShadowBatch, ShadowConfig, ShadowLayer,
    ShadowSequence, StepWorkspace,
};
use shadowkv_suite::bench::{
    copy_bandwidth, copy_bandwidth_at, filled, gemm_rate, median,
    pinned_copy_bandwidth as pcie_bandwidth, pinned_copy_bandwidth_at as pcie_bandwidth_at,
    steady_ms,
};
use shadowkv_suite::{random_bf16, shared_gpu};

const CONFIG: ShadowConfig = ShadowConfig::LLAMA_3_8B;
const CONTEXTS: [u32; 2] = [32_768, 122_880];
/// Context of the top-k's long shape: about 128K landmarks per head at c = 8.
const LONG_CONTEXT: u32 = 1 << 20;
const BATCHES: [usize; 2] = [1, 16];
/// Batches run only when `SHADOWKV_BENCH_ONLY` names them (e.g. `b2_ctx122880`): where the
/// step's default arrangement changes (`DecodeStep::set_split_attention`).
const NAMED_ONLY_BATCHES: [usize; 3] = [2, 4, 8];
const LOCAL_CHUNKS: u32 = 4;
const OUTLIER_CHUNKS: u32 = 48;
const GENERATED: u32 = 64;
const HIT_RATES: [f64; 3] = [0.60, 0.80, 0.95];
/// Layers cycled through at batch 1, so one layer's landmarks are not served from L2.
const LAYERS_AT_BATCH_1: usize = 4;

fn main() {
    let gpu = match shared_gpu() {
        Ok(gpu) => gpu,
        Err(reason) => {
            println!("decode bench SKIPPED: {reason}");
            return;
        }
    };
    if let Err(error) = run(gpu) {
        eprintln!("decode bench failed: {error}");
        std::process::exit(1);
    }
}

/// The sequences of a batch at `context` tokens per sequence: 4 local and 48 outlier chunks,
/// the rest landmarks, and a K/V block of local, outliers, slots and generated tokens.
fn sequences(batch: usize, context: u32) -> Vec<ShadowSequence> {
    let (c, k, d) = (
        CONFIG.chunk_size as u32,
        CONFIG.budget_chunks as u32,
        CONFIG.head_dim,
    );
    let kv_heads = CONFIG.kv_heads;
    let chunks = ((context / c - LOCAL_CHUNKS) / 8) * 8;
    let landmarks = chunks - OUTLIER_CHUNKS;
    let local = context - chunks * c;
    let sparse_start = local + OUTLIER_CHUNKS * c;
    let len = sparse_start + k * c + GENERATED;
    (0..batch as u64)
        .map(|b| ShadowSequence {
            landmark_row: b * (kv_heads as u64 * landmarks as u64),
            a_offset: b * context as u64 * CONFIG.rank as u64,
            bm_offset: b * (CONFIG.rank * kv_heads * d) as u64,
            host_value_offset: b * (kv_heads as u64 * context as u64 * d as u64),
            landmarks,
            chunks,
            prompt_len: context,
            sparse_start,
            resident_row: b as u32,
            _reserved: 0,
            kv: SequenceLayout {
                offset: b * (kv_heads as u64 * len as u64 * d as u64),
                capacity: len,
                len,
            },
        })
        .collect()
}

/// Chunk ids of every landmark row of `sequences`: landmark j of every head is chunk
/// `OUTLIER_CHUNKS + j` (the first chunks are the outliers).
fn chunk_ids(sequences: &[ShadowSequence]) -> Vec<u32> {
    sequences
        .iter()
        .flat_map(|s| {
            (0..CONFIG.kv_heads as u32 * s.landmarks).map(|row| OUTLIER_CHUNKS + row % s.landmarks)
        })
        .collect()
}

/// One layer of a batch at `context` tokens per sequence, on the device (random contents).
fn layer(gpu: &Gpu, batch: usize, context: u32, seed: u64) -> shadowkv::Result<ShadowLayer> {
    let (k, d) = (CONFIG.budget_chunks as u32, CONFIG.head_dim);
    let kv_heads = CONFIG.kv_heads;
    let sequences = sequences(batch, context);
    let len = sequences[0].kv.capacity;
    let stream = gpu.stream();
    let rows = batch * kv_heads * sequences[0].landmarks as usize;
    let chunk_ids = chunk_ids(&sequences);
    let value_elements = batch * kv_heads * context as usize * d;
    let mut values = PinnedBuffer::<bf16>::new(gpu, value_elements)?;
    let block = random_bf16(&mut StdRng::seed_from_u64(seed), 1 << 20, 1.0);
    for piece in values.as_mut_slice()?.chunks_mut(block.len()) {
        piece.copy_from_slice(&block[..piece.len()]);
    }
    let kv_elements = batch * kv_heads * len as usize * d;
    Ok(ShadowLayer {
        batch: ShadowBatch::new(stream, CONFIG, &sequences)?,
        landmarks: filled(gpu, rows * d, seed + 1)?,
        chunk_ids: stream.clone_htod(&chunk_ids)?,
        a: filled(gpu, batch * context as usize * CONFIG.rank, seed + 2)?,
        bm: filled(gpu, batch * CONFIG.rank * kv_heads * d, seed + 3)?,
        k: filled(gpu, kv_elements, seed + 4)?,
        v: filled(gpu, kv_elements, seed + 5)?,
        values: LayerValues::Host(values),
        tier: None,
        resident: stream.alloc_zeros(batch * kv_heads * k as usize)?,
    })
}

/// Resident sets that hit `hit_rate` of the selection: the selection itself with the first
/// `(1 - hit_rate) * k` slots of every head given to chunks it did not select.
/// `scoring` over every sequence of `layer`, into the workspace.
fn score(
    gpu: &Gpu,
    stream: &CudaStream,
    layer: &ShadowLayer,
    q: &CudaSlice<bf16>,
    w: &mut StepWorkspace,
    scale: f32,
) -> shadowkv::Result<()> {
    let batch = &layer.batch;
    scoring::run(
        gpu,
        stream,
        batch,
        batch.whole(),
        q,
        &layer.landmarks,
        &mut w.logits,
        &mut w.tile_stats,
        scale,
    )
}

/// Cluster sizes the batch-1 top-k is also timed at, with their rows' names.
const CLUSTER_SWEEP: [(u32, &str); 4] = [
    (1, "topk, 1 block per head"),
    (2, "topk, clusters of 2"),
    (4, "topk, clusters of 4"),
    (8, "topk, clusters of 8"),
];

/// `topk` over every sequence of `layer`, from the workspace's logits, in clusters of
/// `cluster_blocks` (`None`: the launcher's pick).
fn select(
    gpu: &Gpu,
    stream: &CudaStream,
    layer: &ShadowLayer,
    w: &mut StepWorkspace,
    cluster_blocks: Option<u32>,
) -> shadowkv::Result<()> {
    let batch = &layer.batch;
    topk::run(
        gpu,
        stream,
        batch,
        batch.whole(),
        &w.logits,
        &w.tile_stats,
        &layer.chunk_ids,
        &mut w.scores,
        &mut w.selection,
        cluster_blocks,
    )
}

/// Where a step's time goes at 80% hits: when each stage ended (µs after the step began,
/// median of 9 steps), in each arrangement of the step (see the step table's modes).
fn step_timelines(
    gpu: &Gpu,
    step: &mut DecodeStep,
    layers: &mut [ShadowLayer],
    templates: &[Vec<CudaSlice<u32>>],
    q: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
) -> shadowkv::Result<String> {
    let stream = gpu.stream();
    let batch = layers[0].batch.batch();
    let context = layers[0].batch.sequences()[0].prompt_len;
    let mut text = format!(
        "\nstep timeline at batch {batch}, {context} tokens, 80% hits (µs after the step began when each stage ended; median of 9 steps)\n"
    );
    step.set_timeline(gpu, true)?;
    for (mode, overlap, split) in [
        ("split", true, Some(true)),
        ("joined", true, Some(false)),
        ("serial", false, None),
    ] {
        step.set_overlap(overlap);
        step.set_split_attention(split);
        let mut samples = Vec::new();
        for _ in 0..9 {
            stream.memcpy_dtod(&templates[0][1], &mut layers[0].resident)?;
            step.run(gpu, &mut layers[0], q, out)?;
            samples.push(step.timeline()?);
        }
        text += &format!("  {mode:<7}");
        for (stage, (name, _)) in samples[0].iter().enumerate() {
            let mut ends: Vec<f32> = samples.iter().map(|s| s[stage].1).collect();
            text += &format!(" | {name} {:.1}", median(&mut ends) * 1e3);
        }
        text += "\n";
    }
    step.set_timeline(gpu, false)?;
    step.set_overlap(true);
    step.set_split_attention(None);
    Ok(text)
}

fn resident_for(selection: &[u32], landmarks: u32, hit_rate: f64) -> Vec<u32> {
    let k = CONFIG.budget_chunks;
    let replaced = ((1.0 - hit_rate) * k as f64).round() as usize;
    let mut resident = selection.to_vec();
    for head in resident.chunks_mut(k) {
        let chosen: std::collections::HashSet<u32> = head.iter().copied().collect();
        let mut others =
            (OUTLIER_CHUNKS..OUTLIER_CHUNKS + landmarks).filter(|c| !chosen.contains(c));
        for slot in head.iter_mut().take(replaced) {
            *slot = others.next().expect("enough unselected chunks");
        }
    }
    resident
}

struct Row {
    batch: usize,
    context: u32,
    name: &'static str,
    us: f64,
    rate: String,
    of_ceiling: String,
}

/// A rate and its share of a ceiling, as table columns: `amount` per `ms`, shown in `unit`
/// (`scale` per unit), against `ceiling` (same measure per second) named `of`.
/// [`rate_columns`] for a kernel that reads `bytes` from device memory: against the copy
/// ceiling, and against a copy of the same size (the ceiling once launch and ramp count).
fn read_columns(gpu: &Gpu, bytes: f64, ms: f64, copy: f64) -> shadowkv::Result<(String, String)> {
    let (rate, of_copy) = rate_columns(bytes, ms, "GB/s", 1e9, copy, "copy");
    let same_size = copy_bandwidth_at(gpu, bytes as usize)?;
    let achieved = bytes / (ms * 1e-3);
    Ok((
        rate,
        format!(
            "{of_copy} ({:.1}% of a same-size copy)",
            100.0 * achieved / same_size
        ),
    ))
}

fn rate_columns(
    amount: f64,
    ms: f64,
    unit: &str,
    scale: f64,
    ceiling: f64,
    of: &str,
) -> (String, String) {
    let per_second = amount / (ms * 1e-3);
    (
        format!("{:.1} {unit}", per_second / scale),
        format!("{:.1}% of {of}", 100.0 * per_second / ceiling),
    )
}

/// Times `work` twice over: as a criterion benchmark `id` (CUDA events around `n` calls) and
/// as the tables' steady-state median.
fn measure(
    gpu: &Gpu,
    stream: &CudaStream,
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: BenchmarkId,
    mut work: impl FnMut() -> shadowkv::Result<()>,
) -> shadowkv::Result<f64> {
    group.bench_function(id, |bencher| {
        bencher.iter_custom(|iterations| {
            let ms = gpu
                .time_ms(stream, iterations as u32, &mut work)
                .expect("timed run");
            Duration::from_secs_f64(ms as f64 * 1e-3 * iterations as f64)
        })
    });
    steady_ms(gpu, stream, work)
}

fn run(gpu: &Gpu) -> shadowkv::Result<()> {
    let copy = copy_bandwidth(gpu)?;
    let pcie = pcie_bandwidth(gpu)?;
    let gemm = gemm_rate(gpu)?;
    println!(
        "device: {} ({} SMs); ceilings measured now: device copy {:.0} GB/s (read + write), pinned host->device {:.1} GB/s, cuBLAS bf16 GEMM {:.0} TFLOP/s",
        gpu.info().name,
        gpu.info().multiprocessors,
        copy / 1e9,
        pcie / 1e9,
        gemm / 1e12
    );
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(500))
        .configure_from_args();
    let stream = gpu.stream().clone();
    let (mut rows, mut steps, mut timelines) = (Vec::new(), Vec::new(), Vec::new());
    let mut q_rng = StdRng::seed_from_u64(9);
    // SHADOWKV_BENCH_ONLY=b16_ctx122880 runs one shape (e.g. under Nsight Compute).
    let only = std::env::var("SHADOWKV_BENCH_ONLY").ok();
    for context in CONTEXTS {
        for batch in BATCHES.into_iter().chain(NAMED_ONLY_BATCHES) {
            let label = format!("b{batch}_ctx{context}");
            let named = only.as_ref().is_some_and(|only| *only == label);
            if !named && (only.is_some() || NAMED_ONLY_BATCHES.contains(&batch)) {
                continue;
            }
            let id = |name: &str| BenchmarkId::new(name.to_owned(), &label);
            let layer_count = if batch == 1 { LAYERS_AT_BATCH_1 } else { 1 };
            let mut layers = (0..layer_count)
                .map(|i| layer(gpu, batch, context, 100 * i as u64))
                .collect::<shadowkv::Result<Vec<_>>>()?;
            let last = layers.len() - 1;
            let shape = DecodeAttentionShape {
                batch,
                q_heads: CONFIG.q_heads,
                kv_heads: CONFIG.kv_heads,
                head_dim: CONFIG.head_dim,
            };
            let q_elements = batch * CONFIG.q_heads * CONFIG.head_dim;
            let q = stream.clone_htod(&random_bf16(&mut q_rng, q_elements, 2.0))?;
            let mut out = filled(gpu, q_elements, 7)?;
            let mut w = StepWorkspace::new(gpu, &stream, &layers[0].batch)?;
            let scale = 1.0 / (CONFIG.head_dim as f32).sqrt();
            let landmarks = layers[0].batch.sequences()[0].landmarks;
            let mut row = |name: &'static str, ms: f64, (rate, of_ceiling): (String, String)| {
                rows.push(Row {
                    batch,
                    context,
                    name,
                    us: ms * 1e3,
                    rate,
                    of_ceiling,
                })
            };
            let mut group = criterion.benchmark_group("decode_kernels");

            // Kernels one at a time; scoring cycles through the layers (at batch 1, one
            // layer's landmarks would fit in L2).
            let mut next = 0usize;
            let scoring_ms = measure(gpu, &stream, &mut group, id("scoring"), || {
                next = (next + 1) % layers.len();
                let l = &layers[next];
                score(gpu, &stream, l, &q, &mut w, scale)
            })?;
            let landmark_bytes =
                (layers[0].batch.extents().landmark_rows * CONFIG.head_dim * 2) as f64;
            row(
                "scoring",
                scoring_ms,
                read_columns(gpu, landmark_bytes, scoring_ms, copy)?,
            );
            // Per layer and hit rate, a resident set that hits exactly that share of the
            // layer's selection for this query (the last layer's logits stay in `w`).
            let mut templates: Vec<Vec<CudaSlice<u32>>> = Vec::new();
            for l in &layers {
                score(gpu, &stream, l, &q, &mut w, scale)?;
                select(gpu, &stream, l, &mut w, None)?;
                let selection = stream.clone_dtoh(&w.selection)?;
                templates.push(
                    HIT_RATES
                        .iter()
                        .map(|&h| stream.clone_htod(&resident_for(&selection, landmarks, h)))
                        .collect::<Result<_, _>>()?,
                );
            }
            let l = &mut layers[last];
            let topk_ms = measure(gpu, &stream, &mut group, id("topk"), || {
                select(gpu, &stream, l, &mut w, None)
            })?;
            let picked = topk::cluster_blocks(gpu, &l.batch, l.batch.whole());
            row(
                "topk",
                topk_ms,
                (
                    format!("k {} of {landmarks}", CONFIG.budget_chunks),
                    format!("{picked} block(s) per head"),
                ),
            );
            // At batch 1 the heads leave most SMs idle: each cluster size, to show the pick.
            if batch == 1 && gpu.has_clusters() {
                for (blocks, name) in CLUSTER_SWEEP {
                    let ms = steady_ms(gpu, &stream, || {
                        select(gpu, &stream, l, &mut w, Some(blocks))
                    })?;
                    row(name, ms, (String::new(), String::new()));
                }
            }
            let restore = &templates[last][1];
            let restore_ms = steady_ms(gpu, &stream, || {
                Ok(stream.memcpy_dtod(restore, &mut l.resident)?)
            })?;
            let plan_ms = measure(gpu, &stream, &mut group, id("plan_hits80"), || {
                stream.memcpy_dtod(restore, &mut l.resident)?;
                plan::run(
                    gpu,
                    &stream,
                    &l.batch,
                    l.batch.whole(),
                    &w.selection,
                    PlanBuffers::new(
                        &mut l.resident,
                        &mut w.misses,
                        &mut w.miss_counts,
                        &mut w.fresh,
                    ),
                )
            })? - restore_ms;
            row("plan (80% hits)", plan_ms, (String::new(), String::new()));
            // The two in one launch, as the step runs them.
            let select_ms = measure(gpu, &stream, &mut group, id("topk_and_plan_hits80"), || {
                stream.memcpy_dtod(restore, &mut l.resident)?;
                topk::run_and_plan(
                    gpu,
                    &stream,
                    &l.batch,
                    l.batch.whole(),
                    &w.logits,
                    &w.tile_stats,
                    &l.chunk_ids,
                    &mut w.scores,
                    &mut w.selection,
                    PlanBuffers::new(
                        &mut l.resident,
                        &mut w.misses,
                        &mut w.miss_counts,
                        &mut w.fresh,
                    ),
                    None,
                )
            })? - restore_ms;
            row(
                "topk + plan (80%)",
                select_ms,
                ("one launch".to_owned(), String::new()),
            );
            // Fetch and rebuild of the 80%-hit miss list (20% of the budget).
            let misses = ((1.0 - HIT_RATES[1]) * CONFIG.budget_chunks as f64).round() as usize
                * batch
                * CONFIG.kv_heads;
            let fetch_ms = measure(gpu, &stream, &mut group, id("fetch_hits80"), || {
                fetch::run(
                    gpu,
                    &stream,
                    &l.batch,
                    l.batch.whole(),
                    &w.misses,
                    &w.miss_counts,
                    &l.values,
                    &mut l.v,
                )
            })?;
            let fetch_bytes = (misses * CONFIG.chunk_size * CONFIG.head_dim * 2) as f64;
            let (rate, of_pcie) = rate_columns(fetch_bytes, fetch_ms, "GB/s", 1e9, pcie, "PCIe");
            let same_size = pcie_bandwidth_at(gpu, fetch_bytes as usize)?;
            let of_same_size = 100.0 * fetch_bytes / (fetch_ms * 1e-3) / same_size;
            row(
                "fetch (80% hits)",
                fetch_ms,
                (
                    rate,
                    format!("{of_pcie} ({of_same_size:.1}% of a same-size copy)"),
                ),
            );
            let frequencies = stream.clone_htod(&shadowkv::decode_step::inverse_frequencies(
                &RopeConfig::LLAMA_3,
                CONFIG.head_dim as u32,
            ))?;
            let rebuild_ms = measure(gpu, &stream, &mut group, id("rebuild_hits80"), || {
                rebuild::run(
                    gpu,
                    &stream,
                    &l.batch,
                    l.batch.whole(),
                    &w.misses,
                    &w.miss_counts,
                    &l.a,
                    &l.bm,
                    (
                        &frequencies,
                        RopeConfig::LLAMA_3.layout(CONFIG.head_dim as u32),
                    ),
                    &mut l.k,
                )
            })?;
            let flops = (misses * CONFIG.chunk_size * CONFIG.rank * CONFIG.head_dim * 2) as f64;
            row(
                "rebuild (80% hits)",
                rebuild_ms,
                rate_columns(flops, rebuild_ms, "TFLOP/s", 1e12, gemm, "cuBLAS"),
            );
            let sparse_layouts: Vec<SequenceLayout> =
                l.batch.sequences().iter().map(|s| s.kv).collect();
            let mut sparse = DecodeAttention::new(
                gpu,
                DecodeAttentionPlan::for_gpu(gpu, shape, &sparse_layouts)?,
            )?;
            let sparse_bytes = sparse.plan().kv_bytes_read() as f64;
            let sparse_ms = measure(gpu, &stream, &mut group, id("sparse_attention"), || {
                sparse.run(gpu, &stream, &q, &l.k, &l.v, &mut out)
            })?;
            row(
                "sparse attention",
                sparse_ms,
                read_columns(gpu, sparse_bytes, sparse_ms, copy)?,
            );

            // Full attention over the whole context (prompt + generated) on the same heads.
            let full_len = context + GENERATED;
            let full_layouts: Vec<SequenceLayout> = (0..batch as u64)
                .map(|b| SequenceLayout {
                    offset: b * (CONFIG.kv_heads as u64 * full_len as u64 * CONFIG.head_dim as u64),
                    capacity: full_len,
                    len: full_len,
                })
                .collect();
            let full_elements = batch * CONFIG.kv_heads * full_len as usize * CONFIG.head_dim;
            let (full_k, full_v) = (
                filled(gpu, full_elements, 31)?,
                filled(gpu, full_elements, 32)?,
            );
            let mut full = DecodeAttention::new(
                gpu,
                DecodeAttentionPlan::for_gpu(gpu, shape, &full_layouts)?,
            )?;
            let full_bytes = full.plan().kv_bytes_read() as f64;
            let full_ms = measure(gpu, &stream, &mut group, id("full_attention"), || {
                full.run(gpu, &stream, &q, &full_k, &full_v, &mut out)
            })?;
            row(
                "full attention",
                full_ms,
                read_columns(gpu, full_bytes, full_ms, copy)?,
            );
            drop((full_k, full_v));

            // The whole step at steady hit rates: restore the resident set, then one step.
            let mut step = DecodeStep::new(gpu, RopeConfig::LLAMA_3, &layers[0].batch)?;
            let default_split = step.splits_attention(&layers[0].batch);
            for (rate_index, &hit_rate) in HIT_RATES.iter().enumerate() {
                // The default arrangement at every hit rate; at 80% also the other split
                // choice and the overlap off.
                for (overlap, split) in [(true, None), (true, Some(!default_split)), (false, None)]
                {
                    if (split.is_some() || !overlap) && hit_rate != HIT_RATES[1] {
                        continue;
                    }
                    step.set_overlap(overlap);
                    step.set_split_attention(split);
                    let mode = match (overlap, step.splits_attention(&layers[0].batch)) {
                        (false, _) => "serial",
                        (true, true) => "split",
                        (true, false) => "joined",
                    };
                    let name = format!(
                        "step_hits{:.0}{}",
                        hit_rate * 100.0,
                        if split.is_some() || !overlap {
                            format!("_{mode}")
                        } else {
                            String::new()
                        }
                    );
                    let ms = measure(gpu, &stream, &mut group, id(&name), || {
                        next = (next + 1) % layers.len();
                        let l = &mut layers[next];
                        stream.memcpy_dtod(&templates[next][rate_index], &mut l.resident)?;
                        step.run(gpu, l, &q, &mut out)
                    })? - restore_ms;
                    step.set_split_attention(None);
                    let stats = step.stats()?;
                    steps.push((
                        batch,
                        context,
                        hit_rate,
                        stats.hit_rate(),
                        if split.is_none() && overlap {
                            format!("{mode}*")
                        } else {
                            mode.to_owned()
                        },
                        ms,
                        full_ms,
                        full_bytes,
                        select_ms,
                    ));
                }
            }
            if batch > 1 && context == CONTEXTS[CONTEXTS.len() - 1] {
                // How many parts the batch runs in (the fetch of one beside the selection of
                // the next), at 80% hits, in the default arrangement.
                let mut sweep = format!("\nparts of the batch at batch {batch}, 80% hits: step µs");
                for parts in [1, 2, 4, 8].into_iter().filter(|&parts| parts <= batch) {
                    step.set_parts(Some(parts));
                    let ms = steady_ms(gpu, &stream, || {
                        stream.memcpy_dtod(&templates[0][1], &mut layers[0].resident)?;
                        step.run(gpu, &mut layers[0], &q, &mut out)
                    })? - restore_ms;
                    sweep += &format!(" | {parts}: {:.1}", ms * 1e3);
                }
                step.set_parts(None);
                timelines.push(sweep + "\n");
            }
            if context == CONTEXTS[CONTEXTS.len() - 1] {
                timelines.push(step_timelines(
                    gpu,
                    &mut step,
                    &mut layers,
                    &templates,
                    &q,
                    &mut out,
                )?);
            }
            group.finish();
        }
    }

    // The top-k's other shape: k = 256 of about 128K landmarks per head (a 1M-token context
    // at c = 8; the scores no longer fit shared memory). Only what scoring and the top-k read
    // is built.
    for batch in BATCHES {
        let label = format!("b{batch}_ctx{LONG_CONTEXT}");
        if only.as_ref().is_some_and(|only| *only != label) {
            continue;
        }
        let sequences = sequences(batch, LONG_CONTEXT);
        let layer_batch = ShadowBatch::new(&stream, CONFIG, &sequences)?;
        let landmark_rows = layer_batch.extents().landmark_rows;
        let landmarks = filled(gpu, landmark_rows * CONFIG.head_dim, 77)?;
        let ids = stream.clone_htod(&chunk_ids(&sequences))?;
        let q_elements = batch * CONFIG.q_heads * CONFIG.head_dim;
        let q = stream.clone_htod(&random_bf16(&mut q_rng, q_elements, 2.0))?;
        let mut w = StepWorkspace::new(gpu, &stream, &layer_batch)?;
        let scale = 1.0 / (CONFIG.head_dim as f32).sqrt();
        let whole = layer_batch.whole();
        let mut group = criterion.benchmark_group("decode_kernels");
        let scoring_ms = measure(
            gpu,
            &stream,
            &mut group,
            BenchmarkId::new("scoring", &label),
            || {
                scoring::run(
                    gpu,
                    &stream,
                    &layer_batch,
                    whole,
                    &q,
                    &landmarks,
                    &mut w.logits,
                    &mut w.tile_stats,
                    scale,
                )
            },
        )?;
        let (rate, of_ceiling) = read_columns(
            gpu,
            (landmark_rows * CONFIG.head_dim * 2) as f64,
            scoring_ms,
            copy,
        )?;
        rows.push(Row {
            batch,
            context: LONG_CONTEXT,
            name: "scoring",
            us: scoring_ms * 1e3,
            rate,
            of_ceiling,
        });
        let topk_ms = measure(
            gpu,
            &stream,
            &mut group,
            BenchmarkId::new("topk", &label),
            || {
                topk::run(
                    gpu,
                    &stream,
                    &layer_batch,
                    whole,
                    &w.logits,
                    &w.tile_stats,
                    &ids,
                    &mut w.scores,
                    &mut w.selection,
                    None,
                )
            },
        )?;
        rows.push(Row {
            batch,
            context: LONG_CONTEXT,
            name: "topk",
            us: topk_ms * 1e3,
            rate: format!("k {} of {}", CONFIG.budget_chunks, sequences[0].landmarks),
            of_ceiling: String::new(),
        });
        group.finish();
    }

    println!("\nkernels (CUDA-event medians of 20 back-to-back launches; Llama-3-8B heads, c 8, r 160, S 2048)");
    println!(
        "{:>5} {:>8} {:<20} {:>10} {:>16} {:>18}",
        "batch", "context", "kernel", "time us", "rate", "of ceiling"
    );
    for r in &rows {
        println!(
            "{:>5} {:>8} {:<20} {:>10.1} {:>16} {:>18}",
            r.batch, r.context, r.name, r.us, r.rate, r.of_ceiling
        );
    }
    for timeline in &timelines {
        print!("{timeline}");
    }
    println!("\nwhole step vs full attention (equivalent bandwidth = full-attention K/V bytes / step time)");
    println!("mode: split = resident-slot attention and rebuild beside the fetch, fresh slots after it; joined = rebuild beside the fetch, one attention after it; serial = no copy stream; * = the step's default for the batch");
    println!(
        "{:>5} {:>8} {:>6} {:>7} {:>8} {:>10} {:>10} {:>9} {:>10} {:>12}",
        "batch",
        "context",
        "hits",
        "actual",
        "mode",
        "step us",
        "full us",
        "speed-up",
        "equiv TB/s",
        "topk+plan %"
    );
    for (batch, context, hit_rate, actual, mode, ms, full_ms, full_bytes, select_ms) in &steps {
        println!(
            "{batch:>5} {context:>8} {:>5.0}% {:>6.1}% {:>8} {:>10.1} {:>10.1} {:>8.2}x {:>10.2} {:>11.1}%",
            hit_rate * 100.0,
            actual * 100.0,
            mode,
            ms * 1e3,
            full_ms * 1e3,
            full_ms / ms,
            full_bytes / (ms * 1e-3) / 1e12,
            100.0 * select_ms / ms
        );
    }
    Ok(())
}
