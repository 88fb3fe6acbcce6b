//! The ShadowKV decode step and each of its kernels at Llama-3-8B shapes (32/8 heads, d 128,
//! c 8, r 160, S 2048, 48 outlier and 4 local chunks), contexts 32K and 122K, batch 1 and 16,
//! timed with CUDA events, next to ceilings measured in the same run: device-to-device copy,
//! pinned host-to-device copy and a cuBLAS bf16 GEMM. The step is compared with full attention
//! (the same attention kernel over the whole context) on the same inputs.
//!
//! `cargo bench --bench decode` (criterion statistics, then the tables).
//! For Nsight Compute: `ncu --clock-control none <bench binary> --bench --profile-time 1 b16_ctx122880`.
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use half::bf16;
use rand::{rngs::StdRng, SeedableRng};
use shadowkv::cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::{
    fetch, plan, rebuild, scoring, topk, DecodeAttention, DecodeAttentionPlan,
    DecodeAttentionShape, DecodeStep, Gpu, LayerValues, Miss, PinnedBuffer, RopeConfig,
    SequenceLayout, ShadowBatch, ShadowConfig, ShadowLayer, ShadowSequence,
};
use shadowkv_suite::bench::{copy_bandwidth, filled, median, steady_ms};
use shadowkv_suite::{random_bf16, shared_gpu};

const CONFIG: ShadowConfig = ShadowConfig::LLAMA_3_8B;
const CONTEXTS: [u32; 2] = [32_768, 122_880];
const BATCHES: [usize; 2] = [1, 16];
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

/// Pinned host-to-device copy rate (bytes/s), median of 10 copies of 512 MiB.
fn pcie_bandwidth(gpu: &Gpu) -> shadowkv::Result<f64> {
    let elements = 256 << 20;
    let source = PinnedBuffer::<bf16>::new(gpu, elements)?;
    // SAFETY: written by the copies before anything reads it.
    let mut target = unsafe { gpu.stream().alloc::<bf16>(elements)? };
    let mut times = Vec::new();
    for _ in 0..10 {
        times.push(gpu.time_ms(gpu.stream(), 1, || {
            Ok(gpu.stream().memcpy_htod(source.host_slice(), &mut target)?)
        })?);
    }
    Ok(2.0 * elements as f64 / (median(&mut times) as f64 * 1e-3))
}

/// cuBLAS bf16 GEMM rate (FLOP/s) at 8192^3, f32 accumulate.
fn gemm_rate(gpu: &Gpu) -> shadowkv::Result<f64> {
    let n = 8192usize;
    let blas = CudaBlas::new(gpu.stream().clone())
        .map_err(|e| shadowkv::error::invalid("cublas", e.to_string(), "a loadable cuBLAS"))?;
    let a = filled(gpu, n * n, 21)?;
    let b = filled(gpu, n * n, 22)?;
    let mut c = filled(gpu, n * n, 23)?;
    let config = GemmConfig {
        transa: cublasOperation_t::CUBLAS_OP_N,
        transb: cublasOperation_t::CUBLAS_OP_N,
        m: n as i32,
        n: n as i32,
        k: n as i32,
        alpha: bf16::ONE,
        lda: n as i32,
        ldb: n as i32,
        beta: bf16::ZERO,
        ldc: n as i32,
    };
    let mut times = Vec::new();
    for _ in 0..6 {
        times.push(gpu.time_ms(gpu.stream(), 1, || {
            // SAFETY: a, b and c hold n * n elements each, as the config says.
            unsafe { blas.gemm(config, &a, &b, &mut c) }
                .map_err(|e| shadowkv::error::invalid("cublas gemm", e.to_string(), "success"))
        })?);
    }
    Ok(2.0 * (n as f64).powi(3) / (median(&mut times) as f64 * 1e-3))
}

/// One layer of a batch at `context` tokens per sequence, on the device (random contents).
fn layer(gpu: &Gpu, batch: usize, context: u32, seed: u64) -> shadowkv::Result<ShadowLayer> {
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
    let sequences: Vec<ShadowSequence> = (0..batch as u64)
        .map(|b| ShadowSequence {
            landmark_row: b * (kv_heads as u64 * landmarks as u64),
            a_offset: b * context as u64 * CONFIG.rank as u64,
            bm_offset: b * (CONFIG.rank * kv_heads * d) as u64,
            host_value_offset: b * (kv_heads as u64 * context as u64 * d as u64),
            landmarks,
            chunks,
            prompt_len: context,
            sparse_start,
            kv: SequenceLayout {
                offset: b * (kv_heads as u64 * len as u64 * d as u64),
                capacity: len,
                len,
            },
        })
        .collect();
    let stream = gpu.stream();
    let rows = batch * kv_heads * landmarks as usize;
    // Landmark j of every head is chunk OUTLIER_CHUNKS + j (the first chunks are the outliers).
    let chunk_ids: Vec<u32> = (0..rows as u32)
        .map(|row| OUTLIER_CHUNKS + row % landmarks)
        .collect();
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
        resident: stream.alloc_zeros(batch * kv_heads * k as usize)?,
    })
}

/// Scratch of the kernels timed one at a time.
struct Scratch {
    logits: CudaSlice<f32>,
    tile_stats: CudaSlice<f32>,
    scores: CudaSlice<f32>,
    selection: CudaSlice<u32>,
    misses: CudaSlice<Miss>,
    counts: CudaSlice<u32>,
}

/// Resident sets that hit `hit_rate` of the selection: the selection itself with the first
/// `(1 - hit_rate) * k` slots of every head given to chunks it did not select.
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
    let mut rows = Vec::new();
    let mut steps = Vec::new();
    let mut q_rng = StdRng::seed_from_u64(9);
    for context in CONTEXTS {
        for batch in BATCHES {
            let layer_count = if batch == 1 { LAYERS_AT_BATCH_1 } else { 1 };
            let mut layers = (0..layer_count)
                .map(|i| layer(gpu, batch, context, 100 * i as u64))
                .collect::<shadowkv::Result<Vec<_>>>()?;
            let shape = DecodeAttentionShape {
                batch,
                q_heads: CONFIG.q_heads,
                kv_heads: CONFIG.kv_heads,
                head_dim: CONFIG.head_dim,
            };
            let q_elements = batch * CONFIG.q_heads * CONFIG.head_dim;
            let q = stream.clone_htod(&random_bf16(&mut q_rng, q_elements, 2.0))?;
            let mut out = filled(gpu, q_elements, 7)?;
            let first = &layers[0];
            let mut scratch = Scratch {
                logits: stream.alloc_zeros(scoring::logits_len(&first.batch))?,
                tile_stats: stream.alloc_zeros(scoring::tile_stats_len(&first.batch))?,
                scores: stream.alloc_zeros(first.batch.extents().landmark_rows)?,
                selection: stream.alloc_zeros(first.batch.slot_entries())?,
                misses: stream.alloc_zeros(first.batch.slot_entries())?,
                counts: stream.alloc_zeros(batch * CONFIG.kv_heads)?,
            };
            let scale = 1.0 / (CONFIG.head_dim as f32).sqrt();
            let landmarks = first.batch.sequences()[0].landmarks;
            let label = format!("b{batch}_ctx{context}");
            let mut next = 0usize;

            // Kernels one at a time (cycling through the layers at batch 1).
            let landmark_bytes = (first.batch.extents().landmark_rows * CONFIG.head_dim * 2) as f64;
            let mut group = criterion.benchmark_group("decode_kernels");
            let ms = steady_ms(gpu, &stream, || {
                next = (next + 1) % layers.len();
                let l = &layers[next];
                scoring::run(
                    gpu,
                    &stream,
                    &l.batch,
                    &q,
                    &l.landmarks,
                    &mut scratch.logits,
                    &mut scratch.tile_stats,
                    scale,
                )
            })?;
            group.bench_function(BenchmarkId::new("scoring", &label), |b| {
                b.iter_custom(|n| {
                    let l = &layers[0];
                    let ms = gpu
                        .time_ms(&stream, n as u32, || {
                            scoring::run(
                                gpu,
                                &stream,
                                &l.batch,
                                &q,
                                &l.landmarks,
                                &mut scratch.logits,
                                &mut scratch.tile_stats,
                                scale,
                            )
                        })
                        .expect("timed");
                    Duration::from_secs_f64(ms as f64 * 1e-3 * n as f64)
                })
            });
            rows.push(Row {
                batch,
                context,
                name: "scoring",
                us: ms * 1e3,
                rate: format!("{:.0} GB/s", landmark_bytes / (ms * 1e-3) / 1e9),
                of_ceiling: format!(
                    "{:.1}% of copy",
                    100.0 * landmark_bytes / (ms * 1e-3) / copy
                ),
            });
            let l = &layers[0];
            let topk_ms = steady_ms(gpu, &stream, || {
                topk::run(
                    gpu,
                    &stream,
                    &l.batch,
                    &scratch.logits,
                    &scratch.tile_stats,
                    &l.chunk_ids,
                    &mut scratch.scores,
                    &mut scratch.selection,
                )
            })?;
            rows.push(Row {
                batch,
                context,
                name: "topk",
                us: topk_ms * 1e3,
                rate: format!("k {} of {landmarks}", CONFIG.budget_chunks),
                of_ceiling: String::new(),
            });
            // Per layer and hit rate, a resident set that hits exactly that share of the
            // layer's selection for this query.
            let mut templates: Vec<Vec<CudaSlice<u32>>> = Vec::new();
            for l in &layers {
                scoring::run(
                    gpu,
                    &stream,
                    &l.batch,
                    &q,
                    &l.landmarks,
                    &mut scratch.logits,
                    &mut scratch.tile_stats,
                    scale,
                )?;
                topk::run(
                    gpu,
                    &stream,
                    &l.batch,
                    &scratch.logits,
                    &scratch.tile_stats,
                    &l.chunk_ids,
                    &mut scratch.scores,
                    &mut scratch.selection,
                )?;
                let selection = stream.clone_dtoh(&scratch.selection)?;
                templates.push(
                    HIT_RATES
                        .iter()
                        .map(|&h| stream.clone_htod(&resident_for(&selection, landmarks, h)))
                        .collect::<Result<_, _>>()?,
                );
            }
            let restore_ms = steady_ms(gpu, &stream, || {
                Ok(stream.memcpy_dtod(&templates[0][1], &mut layers[0].resident)?)
            })?;
            let plan_ms = steady_ms(gpu, &stream, || {
                stream.memcpy_dtod(&templates[0][1], &mut layers[0].resident)?;
                let l = &mut layers[0];
                plan::run(
                    gpu,
                    &stream,
                    &l.batch,
                    &scratch.selection,
                    &mut l.resident,
                    &mut scratch.misses,
                    &mut scratch.counts,
                    0,
                )
            })? - restore_ms;
            rows.push(Row {
                batch,
                context,
                name: "plan (80% hits)",
                us: plan_ms * 1e3,
                rate: String::new(),
                of_ceiling: String::new(),
            });
            // Fetch and rebuild of the 80%-hit miss list (20% of the budget).
            let misses = ((1.0 - HIT_RATES[1]) * CONFIG.budget_chunks as f64).round() as usize
                * batch
                * CONFIG.kv_heads;
            let fetch_bytes = (misses * CONFIG.chunk_size * CONFIG.head_dim * 2) as f64;
            let l = &mut layers[0];
            let fetch_ms = steady_ms(gpu, &stream, || {
                fetch::run(
                    gpu,
                    &stream,
                    &l.batch,
                    &scratch.misses,
                    &scratch.counts,
                    &l.values.source(),
                    &mut l.v,
                )
            })?;
            rows.push(Row {
                batch,
                context,
                name: "fetch (80% hits)",
                us: fetch_ms * 1e3,
                rate: format!("{:.1} GB/s", fetch_bytes / (fetch_ms * 1e-3) / 1e9),
                of_ceiling: format!(
                    "{:.1}% of PCIe",
                    100.0 * fetch_bytes / (fetch_ms * 1e-3) / pcie
                ),
            });
            let frequencies = stream.clone_htod(&shadowkv::decode_step::inverse_frequencies(
                &RopeConfig::LLAMA_3,
                CONFIG.head_dim as u32,
            ))?;
            let rebuild_ms = steady_ms(gpu, &stream, || {
                rebuild::run(
                    gpu,
                    &stream,
                    &l.batch,
                    &scratch.misses,
                    &scratch.counts,
                    &l.a,
                    &l.bm,
                    &frequencies,
                    &mut l.k,
                )
            })?;
            let flops = (misses * CONFIG.chunk_size * CONFIG.rank * CONFIG.head_dim * 2) as f64;
            rows.push(Row {
                batch,
                context,
                name: "rebuild (80% hits)",
                us: rebuild_ms * 1e3,
                rate: format!("{:.1} TFLOP/s", flops / (rebuild_ms * 1e-3) / 1e12),
                of_ceiling: format!(
                    "{:.1}% of cuBLAS",
                    100.0 * flops / (rebuild_ms * 1e-3) / gemm
                ),
            });
            let sparse_layouts: Vec<SequenceLayout> =
                l.batch.sequences().iter().map(|s| s.kv).collect();
            let mut sparse = DecodeAttention::new(
                gpu,
                DecodeAttentionPlan::new(shape, &sparse_layouts, gpu.info().multiprocessors)?,
            )?;
            let sparse_ms = steady_ms(gpu, &stream, || {
                sparse.run(gpu, &stream, &q, &l.k, &l.v, &mut out)
            })?;
            let sparse_bytes = sparse.plan().kv_bytes_read() as f64;
            rows.push(Row {
                batch,
                context,
                name: "sparse attention",
                us: sparse_ms * 1e3,
                rate: format!("{:.0} GB/s", sparse_bytes / (sparse_ms * 1e-3) / 1e9),
                of_ceiling: format!(
                    "{:.1}% of copy",
                    100.0 * sparse_bytes / (sparse_ms * 1e-3) / copy
                ),
            });

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
                DecodeAttentionPlan::new(shape, &full_layouts, gpu.info().multiprocessors)?,
            )?;
            let full_ms = steady_ms(gpu, &stream, || {
                full.run(gpu, &stream, &q, &full_k, &full_v, &mut out)
            })?;
            let full_bytes = full.plan().kv_bytes_read() as f64;
            rows.push(Row {
                batch,
                context,
                name: "full attention",
                us: full_ms * 1e3,
                rate: format!("{:.0} GB/s", full_bytes / (full_ms * 1e-3) / 1e9),
                of_ceiling: format!(
                    "{:.1}% of copy",
                    100.0 * full_bytes / (full_ms * 1e-3) / copy
                ),
            });
            drop((full_k, full_v));
            group.finish();

            // The whole step at steady hit rates: restore the resident set, then one step.
            let mut step = DecodeStep::new(gpu, RopeConfig::LLAMA_3, &layers[0].batch)?;
            for (rate_index, &hit_rate) in HIT_RATES.iter().enumerate() {
                for overlap in [true, false] {
                    if !overlap && hit_rate != HIT_RATES[1] {
                        continue;
                    }
                    step.set_overlap(overlap);
                    let ms = steady_ms(gpu, &stream, || {
                        next = (next + 1) % layers.len();
                        let l = &mut layers[next];
                        stream.memcpy_dtod(&templates[next][rate_index], &mut l.resident)?;
                        step.run(gpu, l, &q, &mut out)
                    })? - restore_ms;
                    let stats = step.stats(&layers[next].batch)?;
                    steps.push((
                        batch,
                        context,
                        hit_rate,
                        stats.hit_rate(),
                        overlap,
                        ms,
                        full_ms,
                        full_bytes,
                        topk_ms + plan_ms,
                    ));
                }
            }
            let mut group = criterion.benchmark_group("decode_step");
            group.bench_function(BenchmarkId::new("hits80", &label), |b| {
                b.iter_custom(|n| {
                    let ms = gpu
                        .time_ms(&stream, n as u32, || {
                            stream.memcpy_dtod(&templates[0][1], &mut layers[0].resident)?;
                            step.run(gpu, &mut layers[0], &q, &mut out)
                        })
                        .expect("timed");
                    Duration::from_secs_f64(ms as f64 * 1e-3 * n as f64)
                })
            });
            group.finish();
        }
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
    println!("\nwhole step vs full attention (equivalent bandwidth = full-attention K/V bytes / step time)");
    println!(
        "{:>5} {:>8} {:>6} {:>7} {:>8} {:>10} {:>10} {:>9} {:>10} {:>12}",
        "batch",
        "context",
        "hits",
        "actual",
        "overlap",
        "step us",
        "full us",
        "speed-up",
        "equiv TB/s",
        "topk+plan %"
    );
    for (batch, context, hit_rate, actual, overlap, ms, full_ms, full_bytes, select_ms) in &steps {
        println!(
            "{batch:>5} {context:>8} {:>5.0}% {:>6.1}% {:>8} {:>10.1} {:>10.1} {:>8.2}x {:>10.2} {:>11.1}%",
            hit_rate * 100.0,
            actual * 100.0,
            if *overlap { "yes" } else { "no" },
            ms * 1e3,
            full_ms * 1e3,
            full_ms / ms,
            full_bytes / (ms * 1e-3) / 1e12,
            100.0 * select_ms / ms
        );
    }
    Ok(())
}
