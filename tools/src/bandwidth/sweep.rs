//! The sweep on the GPU: the ceilings, full attention at every (context, batch) that runs,
//! then per (home, format, context) a one-layer cache prefilled once for the cell's largest
//! batch and stepped at each of its batches and hit rates (the same allocations throughout).
use std::collections::HashMap;

use indicatif::{ProgressBar, ProgressStyle};
use shadowkv::cache::{CacheCapacity, CacheShape, SequenceId, ShadowKvCache, ShadowKvParams};
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::half::bf16;
use shadowkv::measure::{
    copy_bandwidth, pinned_copy_bandwidth, random_device_buffer, steady_ms_over,
};
use shadowkv::{DecodeAttention, DecodeAttentionPlan, Gpu, PrefillSource, SequenceLayout};
use shadowkv_model::ModelConfig;

use super::grid::{plan_batches, Batch, Cell, CellFit, Grid, HitRate};
use super::metric::{
    equivalent_bandwidth, full_attention_kv_bytes, full_layouts, unit_shape, StepSizes,
    StepTraffic, UNIT_HEAD_DIM, UNIT_KV_HEADS, UNIT_Q_HEADS,
};
use super::report::{Ceilings, Measured, Row};
use crate::plan::{cache_shape, fit, Budget};

/// The model whose whole-model fit caps the batches, and whose layer is the unit.
const MODEL: &str = "llama-3-8b";
/// Tokens each sequence may generate, as `shadowkv plan` sizes the batch.
const GENERATED: usize = 256;
/// GPU bytes left free beside full attention's K/V (its partials, the allocator's slack).
const FULL_ATTENTION_RESERVE: u64 = 2 << 30;
/// Queries cycled through the steps, so the real selection changes from step to step.
const QUERY_POOL: usize = 4;
/// Untimed steps before each hit rate is timed (the resident sets settle).
const WARM_UP_STEPS: usize = 3;

/// How long each configuration is timed, and the inputs' seed.
pub struct SweepOptions {
    pub samples: usize,
    pub steps: u32,
    pub seed: u64,
    pub host_gib: Option<f64>,
    /// Run batches past the largest the whole model fits (one layer is measured).
    pub past_fit: bool,
}

type Failure = Box<dyn std::error::Error>;
/// A batch and hit rate of a cell, and what it measured or why it did not run.
type Outcome = (usize, HitRate, Result<Measured, String>);

/// Shows what the sweep is doing: in the bar's message, or as a line on stderr where the bar
/// is hidden (stderr not a terminal, as in a logged GPU run), so a long sweep always shows
/// its progress.
fn note(bar: &ProgressBar, text: String) {
    if bar.is_hidden() {
        eprintln!("[{}/{}] {text}", bar.position(), bar.length().unwrap_or(0));
    }
    bar.set_message(text);
}

/// Runs the sweep; rows in grid order (home, format, context, batch, hit rate).
pub fn run(
    gpu: &Gpu,
    grid: &Grid,
    options: &SweepOptions,
) -> Result<(Vec<Row>, Ceilings), Failure> {
    // The batches are sized before this process allocates anything.
    let budget = Budget::for_gpu(gpu, options.host_gib)?;
    let config = ModelConfig::named(MODEL)?;
    let params = ShadowKvParams::default();
    let mut plans = Vec::new();
    for cell in grid.cells() {
        let fitted = fit(
            &config,
            &params,
            cell.home.attention_mode(),
            cell.format,
            cell.context,
            GENERATED,
            budget,
        )?;
        let cell_fit = CellFit {
            largest: fitted.batch,
            limit: fitted.limit,
        };
        let (runs, skipped) = plan_batches(&grid.batches, &cell_fit, options.past_fit);
        plans.push((cell, cell_fit.largest, runs, skipped));
    }
    let mut full_shapes: Vec<(usize, usize)> = plans
        .iter()
        .flat_map(|(cell, _, runs, _)| runs.iter().map(|&b| (cell.context, b)))
        .collect();
    full_shapes.sort_unstable();
    full_shapes.dedup();
    let steps: usize = plans
        .iter()
        .map(|(_, _, runs, _)| runs.len())
        .sum::<usize>()
        * grid.hit_rates.len()
        + full_shapes.len();
    let bar = ProgressBar::new(steps as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {elapsed} eta {eta}: {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    note(
        &bar,
        "ceilings: device copy, pinned host-to-device copy".to_owned(),
    );
    let ceilings = Ceilings {
        device_copy: copy_bandwidth(gpu)?,
        pinned_copy: pinned_copy_bandwidth(gpu)?,
    };
    let full = measure_full_attention(gpu, &full_shapes, options, &bar)?;

    let mut rows = Vec::new();
    let shape = CacheShape {
        layers: 1,
        ..cache_shape(&config)
    };
    for (cell, largest, runs, skipped) in plans {
        let asked = |batch: usize| {
            if grid.batches.contains(&Batch::Sequences(batch)) {
                Batch::Sequences(batch)
            } else {
                Batch::Largest
            }
        };
        let measured = if runs.is_empty() {
            Vec::new()
        } else {
            match measure_cell(gpu, shape, params, cell, &runs, grid, options, &full, &bar) {
                Ok(measured) => measured,
                Err(error) => {
                    let reason = format!("the one-layer measurement failed: {error}");
                    bar.inc((runs.len() * grid.hit_rates.len()) as u64);
                    runs.iter()
                        .flat_map(|&b| grid.hit_rates.iter().map(move |&h| (b, h)))
                        .map(|(b, h)| (b, h, Err(reason.clone())))
                        .collect()
                }
            }
        };
        for (batch, hit_rate, outcome) in measured {
            rows.push(Row {
                home: cell.home,
                format: cell.format,
                context: cell.context,
                asked: asked(batch),
                batch,
                hit_rate,
                past_model_fit: batch > largest,
                outcome,
            });
        }
        for (batch, reason) in skipped {
            for &hit_rate in &grid.hit_rates {
                rows.push(Row {
                    home: cell.home,
                    format: cell.format,
                    context: cell.context,
                    asked: batch,
                    batch: match batch {
                        Batch::Sequences(count) => count,
                        Batch::Largest => 0,
                    },
                    hit_rate,
                    past_model_fit: false,
                    outcome: Err(reason.clone()),
                });
            }
        }
    }
    bar.finish_and_clear();
    Ok((rows, ceilings))
}

/// Full attention's device time (ms) at each (context, batch) of `shapes` that fits in the
/// GPU's free memory: per context one K/V buffer for the largest batch that fits, the
/// smaller batches over its first sequences.
fn measure_full_attention(
    gpu: &Gpu,
    shapes: &[(usize, usize)],
    options: &SweepOptions,
    bar: &ProgressBar,
) -> Result<HashMap<(usize, usize), f64>, Failure> {
    let mut times = HashMap::new();
    let stream = gpu.stream();
    let mut contexts: Vec<usize> = shapes.iter().map(|&(c, _)| c).collect();
    contexts.dedup();
    for context in contexts {
        let (free, _) = gpu.context().mem_get_info()?;
        let room = (free as u64).saturating_sub(FULL_ATTENTION_RESERVE);
        let batches: Vec<usize> = shapes
            .iter()
            .filter(|&&(c, _)| c == context)
            .map(|&(_, b)| b)
            .collect();
        let fits = |b: usize| full_attention_kv_bytes(&unit_shape(b), context) <= room;
        let Some(&largest) = batches.iter().filter(|&&b| fits(b)).max() else {
            bar.inc(batches.len() as u64);
            continue;
        };
        note(bar, format!("full attention at {context} tokens"));
        let elements = largest * UNIT_KV_HEADS * context * UNIT_HEAD_DIM;
        let k = random_device_buffer(gpu, elements, options.seed + 11)?;
        let v = random_device_buffer(gpu, elements, options.seed + 12)?;
        for &batch in &batches {
            if fits(batch) {
                let shape = unit_shape(batch);
                let layouts = full_layouts(&shape, context);
                let plan = DecodeAttentionPlan::for_gpu(gpu, shape, &layouts)?;
                let mut attention = DecodeAttention::new(gpu, plan)?;
                let q = random_device_buffer(gpu, shape.q_elements(), options.seed + 13)?;
                // SAFETY: written by the attention before anything reads it.
                let mut out = unsafe { stream.alloc::<bf16>(shape.q_elements())? };
                attention.run(gpu, stream, &q, &k, &v, &mut out)?;
                let ms = steady_ms_over(gpu, stream, options.samples, options.steps, || {
                    attention.run(gpu, stream, &q, &k, &v, &mut out)
                })?;
                times.insert((context, batch), ms);
            }
            bar.inc(1);
        }
    }
    Ok(times)
}

/// One cell: a one-layer cache for its largest batch, every sequence prefilled from one
/// synthetic prompt, then each batch (the first sequences) at each hit rate.
#[allow(clippy::too_many_arguments)]
fn measure_cell(
    gpu: &Gpu,
    shape: CacheShape,
    params: ShadowKvParams,
    cell: Cell,
    runs: &[usize],
    grid: &Grid,
    options: &SweepOptions,
    full: &HashMap<(usize, usize), f64>,
    bar: &ProgressBar,
) -> Result<Vec<Outcome>, Failure> {
    let largest = runs.iter().copied().max().unwrap_or(1);
    let context = cell.context;
    let name = format!(
        "values on {}, {}, {context} tokens",
        cell.home.name(),
        cell.format.name()
    );
    let storage = cell
        .home
        .value_home(params.prompt_chunks(context))
        .with_format(cell.format);
    let capacity = CacheCapacity::uniform(largest, context, GENERATED);
    let mut cache = ShadowKvCache::new(gpu, shape, params, storage, capacity)?;
    let ids = prefill(gpu, &mut cache, largest, options.seed, bar, &name)?;
    let stream = gpu.stream();
    let mut results = Vec::new();
    for &batch in runs {
        let ids = &ids[..batch];
        let elements = batch * UNIT_Q_HEADS * UNIT_HEAD_DIM;
        let queries: Vec<CudaSlice<bf16>> = (0..QUERY_POOL as u64)
            .map(|i| random_device_buffer(gpu, elements, options.seed + 100 + i))
            .collect::<shadowkv::Result<_>>()?;
        // SAFETY: written by each step before anything reads it.
        let mut out = unsafe { stream.alloc::<bf16>(elements)? };
        let mut sizes = StepSizes {
            landmark_rows: 0,
            kv_tokens: 0,
            misses: 0,
            pcie_misses: 0,
            chunk_size: params.chunk_size,
            rank: params.rank,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
        };
        for &id in ids {
            let layout = cache.layout(0, id)?;
            sizes.landmark_rows += (shape.kv_heads * layout.landmarks as usize) as u64;
            sizes.kv_tokens += layout.kv.len as u64;
        }
        let full_kv_bytes = full_attention_kv_bytes(&unit_shape(batch), context);
        for &hit_rate in &grid.hit_rates {
            note(bar, format!("{name}: batch {batch}, {hit_rate} hits"));
            cache
                .decode_step()
                .set_scripted_hit_rate(hit_rate.scripted())?;
            let mut next = 0;
            let mut step = |cache: &mut ShadowKvCache| {
                next = (next + 1) % QUERY_POOL;
                cache.decode_layer_for(gpu, 0, ids, &queries[next], &mut out)
            };
            for _ in 0..WARM_UP_STEPS {
                step(&mut cache)?;
            }
            let step_ms = steady_ms_over(gpu, stream, options.samples, options.steps, || {
                step(&mut cache)
            })?;
            let stats = cache.step_stats()?;
            // One more step with the stage timeline on (its events are not in the timing).
            cache.decode_step().set_timeline(gpu, true)?;
            step(&mut cache)?;
            let stages = cache
                .decode_step()
                .timeline()?
                .into_iter()
                .map(|(stage, end_ms)| (stage.to_owned(), end_ms as f64 * 1e3))
                .collect();
            cache.decode_step().set_timeline(gpu, false)?;
            sizes.misses = stats.misses;
            sizes.pcie_misses = stats.pcie_fetches;
            results.push((
                batch,
                hit_rate,
                Ok(Measured {
                    step_ms,
                    actual_hit_rate: stats.hit_rate(),
                    equivalent_bandwidth: equivalent_bandwidth(full_kv_bytes, step_ms),
                    full_kv_bytes,
                    full_ms: full.get(&(context, batch)).copied(),
                    traffic: StepTraffic::of(&sizes, cell.format),
                    stages,
                }),
            ));
            bar.inc(1);
        }
    }
    cache.decode_step().set_scripted_hit_rate(None)?;
    Ok(results)
}

/// Adds `count` sequences of the cell's context and prefills each from the same synthetic
/// prompt (random keys before and after RoPE, values and last query), through the normal
/// prefill: factorisation, landmarks, outliers, the value offload in the cell's format.
fn prefill(
    gpu: &Gpu,
    cache: &mut ShadowKvCache,
    count: usize,
    seed: u64,
    bar: &ProgressBar,
    name: &str,
) -> Result<Vec<SequenceId>, Failure> {
    let shape = *cache.shape();
    let context = cache.capacity().max_prompt_len;
    let elements = context * shape.kv_width();
    let keys = random_device_buffer(gpu, elements, seed + 1)?;
    let values = random_device_buffer(gpu, elements, seed + 2)?;
    let pre_rope_keys = random_device_buffer(gpu, elements, seed + 3)?;
    let query = random_device_buffer(gpu, shape.q_heads * shape.head_dim, seed + 4)?;
    let source = PrefillSource {
        keys: &keys,
        values: &values,
        layout: SequenceLayout {
            offset: 0,
            capacity: context as u32,
            len: context as u32,
        },
    };
    let mut ids = Vec::with_capacity(count);
    for index in 0..count {
        if index == 0 || index + 1 == count || !bar.is_hidden() {
            note(bar, format!("{name}: prefill {}/{count}", index + 1));
        }
        let id = cache.add_sequence(gpu, context)?;
        cache.prefill_layer(gpu, 0, id, &pre_rope_keys, &source, &query)?;
        ids.push(id);
    }
    // The offloads still read `values`: wait for them (and check the factorisations)
    // before the inputs drop.
    cache.check_prefill()?;
    Ok(ids)
}
