//! `shadowkv bench`: decode throughput of a model for a batch size and context length.
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use shadowkv_model::gpu::step_inputs::StepLimits;
use shadowkv_model::gpu::{DecodeRunner, StepMode};
use shadowkv_model::{GpuModel, ModelConfig, ModelSource, Sampler, NAMED_SHAPES};

use shadowkv::cache::{CacheCapacity, ValueFormat};
use shadowkv_model::ShadowKvParams;

use crate::args::{AttentionMode, ShadowKvArgs};
use crate::prefill::{prefill, prefill_bar, PREFILL_CHUNK};

mod split;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A named shape with random weights generated on the GPU (llama-3-8b, llama-3-70b,
    /// llama-3.1-8b, yi-9b, qwen2-7b, glm-4-9b, phi-3-mini, smollm2-135m, gemma-3-270m,
    /// gemma-3-1b), or a .gguf file / Hugging Face folder (Llama, Yi, Mistral, Qwen2, GLM-4-9B,
    /// Phi-3, Gemma-3). A shape the GPU kernels are not
    /// built for is refused, naming why: phi-3-mini's head dimension 96 (kernels take 64 and
    /// 128), glm-4-9b's 16 query heads per KV head (kernels take up to 8).
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Sequences decoded together (default: the largest batch the mode fits, as `shadowkv
    /// plan` finds it from the GPU's free memory and the host's available memory).
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens of context per sequence before decoding starts.
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Decode steps timed (after two untimed warm-up steps).
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// SYNTHETIC CONTEXT: fill each sequence's KV cache with random keys and values instead
    /// of prefilling a prompt (no quadratic prompt attention; the decode work per step is the
    /// same). Without it, every sequence prefills a prompt of random tokens.
    #[arg(long)]
    synthetic_context: bool,
    /// Attention over the KV cache. With ShadowKV and --synthetic-context, each layer's
    /// random keys and values go through ShadowKV's normal prefill (factorisation, landmarks,
    /// outliers, offload) instead of a prompt.
    #[arg(long, value_enum, default_value_t = AttentionMode::Full)]
    attention: AttentionMode,
    #[command(flatten)]
    shadowkv: ShadowKvArgs,
    /// SYNTHETIC SELECTION (ShadowKV modes): each decode step rewrites every (sequence, KV
    /// head)'s selection on the GPU so that this share of it (0 to 1) stays resident from the
    /// step before and the rest is fetched and rebuilt. Random contexts keep only a few
    /// percent of their chunks between steps; real text keeps most (see `shadowkv hit-rates`).
    #[arg(long)]
    hit_rate: Option<f64>,
    /// The throughput table: Llama-3-8B, Llama-3.1-8B, Yi-9B and Qwen2-7B shapes (random
    /// weights, SYNTHETIC context) at 60K and 122K tokens; full attention and each ShadowKV
    /// mode at its largest batch, ShadowKV at 60% and 80% SYNTHETIC SELECTION hits, with bf16
    /// values and, beside them, the `--value-format` asked for. Writes `--out`.json and
    /// `--out`.png.
    #[arg(long)]
    table: bool,
    /// The table's output files, without extension.
    #[arg(long, default_value = "bench-table")]
    out: std::path::PathBuf,
    /// Seed of the synthetic weights, context and prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The timed steps replayed from a CUDA graph captured once per batch shape (`on`), or
    /// launched one by one (`off`, the fallback). Either way the host overhead is then
    /// measured both ways.
    #[arg(long, value_enum, default_value_t = GraphSwitch::On)]
    graph: GraphSwitch,
    /// Tensor parallelism over this many GPUs of the host (one thread per GPU, NCCL
    /// all-reduces; `NCCL_NVLS_ENABLE=0` unless set): it must divide the KV heads. The
    /// batch default is one rank's plan.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
}

/// `--graph on|off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GraphSwitch {
    /// Replay each step from a CUDA graph (falls back to eager launches if a capture fails).
    On,
    /// Launch each step's kernels one by one.
    Off,
}

pub fn run(mut args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.table {
        return crate::table::run(&args.table_options());
    }
    if args.batch == Some(0) || args.context == 0 || args.steps == 0 {
        return Err("--batch, --context and --steps must be at least 1".into());
    }
    if let Some(rate) = args.hit_rate {
        if args.attention.value_home().is_none() {
            return Err("--hit-rate scripts ShadowKV's selection: give --attention shadowkv or shadowkv-gpu".into());
        }
        shadowkv::kernels::scripted_selection::check_hit_rate(rate)?;
    }
    if args.gpus != 1 {
        return split::run(args);
    }
    let gpu = Arc::new(shadowkv::Gpu::new(0)?);
    if args.batch.is_none() {
        let config = crate::plan::model_config(&args.model)?;
        let budget = args.batch_budget(&gpu)?;
        let fit = crate::plan::fit(
            &config,
            &args.shadowkv.params(),
            args.attention,
            args.shadowkv.value_format(),
            args.context,
            args.steps + 3 + OVERHEAD_TOKENS,
            budget,
        )?;
        if fit.batch == 0 {
            return Err(format!("not even one sequence fits: {}", fit.limit).into());
        }
        eprintln!("batch {} (the largest that fits; {})", fit.batch, fit.limit);
        args.batch = Some(fit.batch);
    }
    let batch = args.batch.unwrap_or(1);
    let started = Instant::now();
    let model = load_model(&gpu, &args.model, args.seed)?;
    eprintln!(
        "weights: {:.2} GB on {} in {:.1} s",
        model.weight_bytes() as f64 / 1e9,
        gpu.info().name,
        started.elapsed().as_secs_f64()
    );
    let run = args.run_of(batch);
    if let Some(home) = args.attention.value_home() {
        let params = args.shadowkv.params();
        let shape = crate::plan::cache_shape(&model.config);
        let capacity = CacheCapacity::uniform(batch, args.context, 0);
        let storage = args.shadowkv.storage_for(home, &shape, &capacity)?;
        let results = run_shadowkv(&run, &model, params, storage, &[args.hit_rate])?;
        for (rate, per_step) in results {
            report(args.attention, rate, &run, per_step);
        }
        return Ok(());
    }
    let per_step = run_full(&run, &model)?;
    report(args.attention, None, &run, per_step);
    Ok(())
}

impl BenchArgs {
    /// The timed run these arguments ask for, with `batch` sequences.
    fn run_of(&self, batch: usize) -> Run {
        Run {
            batch,
            context: self.context,
            steps: self.steps,
            synthetic_context: self.synthetic_context,
            seed: self.seed,
            graph: self.graph == GraphSwitch::On,
            overhead: true,
        }
    }

    /// The GPU memory a batch may take on `gpu`: its budget less the value tier's bytes.
    fn batch_budget(
        &self,
        gpu: &shadowkv::Gpu,
    ) -> Result<crate::plan::Budget, Box<dyn std::error::Error>> {
        let mut budget = crate::plan::Budget::for_gpu(gpu, None)?;
        let tier = self.shadowkv.value_tier_bytes()?.unwrap_or(0);
        budget.gpu_bytes = budget.gpu_bytes.saturating_sub(tier);
        Ok(budget)
    }

    fn table_options(&self) -> crate::table::TableOptions {
        crate::table::TableOptions {
            steps: self.steps,
            params: self.shadowkv.params(),
            seed: self.seed,
            out: self.out.clone(),
            models: None,
            contexts: None,
            formats: table_formats(self.shadowkv.value_format()),
        }
    }
}

/// The table's ShadowKV value formats: bf16, and beside it the format asked for.
fn table_formats(asked: ValueFormat) -> Vec<ValueFormat> {
    if asked == ValueFormat::Bf16 {
        vec![ValueFormat::Bf16]
    } else {
        vec![ValueFormat::Bf16, asked]
    }
}

/// A named shape with random weights generated on the GPU, or a model file / folder.
pub fn load_model(
    gpu: &Arc<shadowkv::Gpu>,
    name: &str,
    seed: u64,
) -> Result<GpuModel, Box<dyn std::error::Error>> {
    Ok(if NAMED_SHAPES.contains(&name) {
        let config = ModelConfig::named(name)?;
        // Refuse a shape the kernels are not built for before any weight is generated.
        config.check_gpu_kernels(&format!("model shape `{name}`"))?;
        eprintln!(
            "model {name} (SYNTHETIC random weights), {:.2}B parameters",
            config.parameters() as f64 / 1e9
        );
        GpuModel::synthetic(gpu.clone(), &config, seed)?
    } else {
        let source = ModelSource::open(std::path::Path::new(name))?;
        GpuModel::load(gpu.clone(), &source.config, &source.weights)?
    })
}

/// One timed decode run's shape.
pub struct Run {
    pub batch: usize,
    pub context: usize,
    pub steps: usize,
    pub synthetic_context: bool,
    pub seed: u64,
    /// Timed steps replayed from CUDA graphs (else launched eagerly).
    pub graph: bool,
    /// After the timed steps, measure the host overhead with and without the graph
    /// ([`OVERHEAD_TOKENS`] more tokens per sequence).
    pub overhead: bool,
}

impl Run {
    /// A runner for this run's timed steps.
    fn runner(&self) -> DecodeRunner {
        let mode = if self.graph {
            StepMode::Graph
        } else {
            StepMode::Eager
        };
        let limits = StepLimits {
            max_batch: self.batch.max(1),
            max_shapes: 1,
        };
        DecodeRunner::new(mode, limits)
    }

    /// Tokens per sequence the overhead measurement adds.
    fn overhead_tokens(&self) -> usize {
        if self.overhead {
            OVERHEAD_TOKENS
        } else {
            0
        }
    }

    /// A xorshift stream of token ids below `vocab`, from the seed.
    fn tokens(&self, vocab: usize) -> impl FnMut() -> u32 {
        let mut state = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % vocab as u64) as u32
        }
    }
}

/// Full attention: the cache, the context (SYNTHETIC or prefilled) and the timed greedy steps;
/// seconds per step.
pub fn run_full(run: &Run, model: &GpuModel) -> Result<f64, Box<dyn std::error::Error>> {
    let config = model.config.clone();
    let mut random_token = run.tokens(config.vocab);
    // The context, the first token after it, two warm-up steps and the timed steps.
    let capacity = (run.context + run.steps + 3 + run.overhead_tokens()) as u32;
    let mut cache = model.new_cache(&vec![capacity; run.batch])?;
    eprintln!(
        "KV cache (full attention): {:.2} GB for {} x {} tokens",
        cache.bytes() as f64 / 1e9,
        run.batch,
        capacity
    );
    let last_logits = if run.synthetic_context {
        cache.fill_synthetic(model.gpu(), &vec![run.context as u32; run.batch], run.seed)?;
        eprintln!(
            "context: SYNTHETIC random keys and values, {} tokens per sequence",
            run.context
        );
        model.forward(
            &mut cache,
            &(0..run.batch).collect::<Vec<_>>(),
            &(0..run.batch).map(|_| random_token()).collect::<Vec<_>>(),
        )?
    } else {
        let bar = prefill_bar(run.batch * run.context);
        let started_prefill = Instant::now();
        let mut rows = Vec::new();
        for sequence in 0..run.batch {
            let prompt: Vec<u32> = (0..run.context).map(|_| random_token()).collect();
            rows.extend(prefill(model, &mut cache, sequence, &prompt, Some(&bar))?);
        }
        bar.finish_and_clear();
        eprintln!(
            "context: prefilled {} random-token prompts of {} tokens in {:.2} s ({:.0} tokens/s)",
            run.batch,
            run.context,
            started_prefill.elapsed().as_secs_f64(),
            (run.batch * run.context) as f64 / started_prefill.elapsed().as_secs_f64()
        );
        rows
    };
    let first: Vec<u32> = last_logits
        .chunks_exact(model.logit_rows())
        .map(|row| Sampler::greedy().sample(row))
        .collect();
    // Greedy decoding with the argmax on the GPU: each step returns one id per sequence.
    let mut runner = run.runner();
    let (per_step, last) = time_steps(run.steps, first, |next| {
        model.decode_full_step(&mut runner, &mut cache, next)
    })?;
    report_capture_errors(&runner);
    if run.overhead {
        let overhead = measure_overhead(model, &mut runner, last, |runner, next| {
            model.decode_full_step(runner, &mut cache, next)
        })?;
        overhead.print();
    }
    // What a step must read at least: every weight once and every cached key and value.
    let kv_bytes = kv_cache_bytes(&config, run.batch, run.context + run.steps / 2);
    let bytes = model.weight_bytes() + kv_bytes;
    eprintln!(
        "  full attention reads weights + KV at {:.0} GB/s",
        bytes as f64 / per_step / 1e9
    );
    Ok(per_step)
}

/// Bytes of the bf16 keys and values of `sequences` x `tokens` in every layer.
fn kv_cache_bytes(config: &ModelConfig, sequences: usize, tokens: usize) -> usize {
    2 * 2 * config.layers * config.kv_dim() * sequences * tokens
}

/// Two untimed warm-up steps, then `steps` timed ones; seconds per step and the last ids.
fn time_steps(
    steps: usize,
    mut next: Vec<u32>,
    mut step: impl FnMut(&[u32]) -> shadowkv_model::Result<Vec<u32>>,
) -> shadowkv_model::Result<(f64, Vec<u32>)> {
    for _ in 0..2 {
        next = step(&next)?;
    }
    let timed = Instant::now();
    for _ in 0..steps {
        next = step(&next)?;
    }
    Ok((timed.elapsed().as_secs_f64() / steps as f64, next))
}

/// Says on stderr why a capture failed, if one did (those steps ran eagerly).
fn report_capture_errors(runner: &DecodeRunner) {
    for error in runner.capture_errors() {
        eprintln!(
            "  the decode step could not be captured in a CUDA graph (launched eagerly): {error}"
        );
    }
}

/// Tokens per sequence that [`measure_overhead`] decodes: two untimed and
/// [`OVERHEAD_STEPS`] timed steps in each mode.
pub const OVERHEAD_TOKENS: usize = 2 * (OVERHEAD_STEPS + 2);

/// Timed steps per mode in [`measure_overhead`].
const OVERHEAD_STEPS: usize = 8;

/// Mean wall and GPU time per step of one mode, from the runner's timing events.
#[derive(Clone, Copy, Debug)]
struct ModeTime {
    wall: f64,
    device: f64,
}

/// The host overhead of a step with and without the graph (see [`measure_overhead`]).
struct Overhead {
    graph: Option<ModeTime>,
    eager: ModeTime,
    capture_errors: Vec<String>,
    next: Vec<u32>,
}

impl Overhead {
    fn print(&self) {
        let us = |seconds: f64| seconds * 1e6;
        let eager = self.eager;
        match self.graph {
            Some(graph) => {
                // The replay runs the kernels back to back: its GPU time is their sum.
                let kernels = graph.device;
                println!(
                    "host overhead per step (wall time minus the kernels' {:.1} us, the graph replay's GPU time): with the graph {:.1} us (wall {:.1} us), without {:.1} us (wall {:.1} us; the eager step's own GPU span {:.1} us includes launch gaps)",
                    us(kernels),
                    us(graph.wall - kernels),
                    us(graph.wall),
                    us(eager.wall - kernels),
                    us(eager.wall),
                    us(eager.device)
                );
            }
            None => println!(
                "host overhead per step without the graph: at least {:.1} us (wall {:.1} us minus the step's GPU span {:.1} us, which includes launch gaps); the graph could not be captured: {}",
                us(eager.wall - eager.device),
                us(eager.wall),
                us(eager.device),
                self.capture_errors.join("; ")
            ),
        }
    }
}

/// The host overhead of a step (its wall time minus the sum of its kernels), with the step
/// replayed from a graph and launched eagerly: per mode, two untimed steps (a capture, or the
/// switch) then [`OVERHEAD_STEPS`] steps with timing events around each. The graph replay's GPU
/// time stands for the sum of the kernels (nothing waits for the host inside a replay).
fn measure_overhead(
    model: &GpuModel,
    runner: &mut DecodeRunner,
    mut next: Vec<u32>,
    mut step: impl FnMut(&mut DecodeRunner, &[u32]) -> shadowkv_model::Result<Vec<u32>>,
) -> shadowkv_model::Result<Overhead> {
    let mode = runner.mode();
    let mut times = Vec::new();
    for measured in [StepMode::Graph, StepMode::Eager] {
        runner.set_mode(measured);
        for _ in 0..2 {
            next = step(runner, &next)?;
        }
        runner.set_timing(model, true)?;
        let (mut wall, mut device, mut replayed) = (0.0, 0.0, true);
        for _ in 0..OVERHEAD_STEPS {
            next = step(runner, &next)?;
            if let Some(timing) = runner.last_timing() {
                wall += timing.wall.as_secs_f64();
                device += timing.device.as_secs_f64();
                replayed &= timing.replayed;
            }
        }
        runner.set_timing(model, false)?;
        let time = ModeTime {
            wall: wall / OVERHEAD_STEPS as f64,
            device: device / OVERHEAD_STEPS as f64,
        };
        times.push((measured, time, replayed));
    }
    runner.set_mode(mode);
    let graph = times
        .iter()
        .find(|(mode, _, replayed)| *mode == StepMode::Graph && *replayed)
        .map(|&(_, time, _)| time);
    let eager = times
        .iter()
        .find(|(mode, _, _)| *mode == StepMode::Eager)
        .map_or(
            ModeTime {
                wall: 0.0,
                device: 0.0,
            },
            |&(_, time, _)| time,
        );
    Ok(Overhead {
        graph,
        eager,
        capture_errors: runner.capture_errors().to_vec(),
        next,
    })
}

/// The label of a ShadowKV run with a scripted hit rate.
pub fn synthetic_selection_label(rate: f64) -> String {
    format!("SYNTHETIC SELECTION ({:.0}% hits)", 100.0 * rate)
}

fn report(mode: AttentionMode, hit_rate: Option<f64>, run: &Run, per_step: f64) {
    let selection = hit_rate
        .map(|rate| format!(", {}", synthetic_selection_label(rate)))
        .unwrap_or_default();
    println!(
        "decode ({mode:?}{selection}): batch {} at {} tokens of context: {:.3} ms per step, {:.1} tokens/s ({:.1} per sequence)",
        run.batch,
        run.context,
        per_step * 1e3,
        run.batch as f64 / per_step,
        1.0 / per_step,
    );
}

/// A scripted hit rate (`None`: the real selection) and the seconds per step it gave.
pub type RateTime = (Option<f64>, f64);

/// The ShadowKV decode: a cache for the batch, each sequence prefilled (a random-token prompt,
/// or SYNTHETIC layers through ShadowKV's prefill), then timed greedy steps for each of
/// `hit_rates` in turn (`None`: the real selection; `Some`: SYNTHETIC SELECTION) on the same
/// cache. Seconds per step for each.
pub fn run_shadowkv(
    run: &Run,
    model: &GpuModel,
    params: ShadowKvParams,
    values: shadowkv::cache::ValueStorage,
    hit_rates: &[Option<f64>],
) -> Result<Vec<RateTime>, Box<dyn std::error::Error>> {
    let config = &model.config;
    let mut random_token = run.tokens(config.vocab);
    shadowkv_model::cpu::shadowkv::validate(&params, config)?;
    let generated = hit_rates.len() * (run.steps + 2) + 1 + run.overhead_tokens();
    let capacity = CacheCapacity::uniform(run.batch, run.context, generated);
    let mut shadow = model.new_shadow_cache(params, values, capacity)?;
    let memory = shadow.memory_report()?;
    eprintln!(
        "ShadowKV cache ({params:?}, values {:?} in {}): {:.2} GB on the GPU, {:.2} GB pinned on the host; the full KV cache would be {:.2} GB",
        values.home,
        values.format.name(),
        memory.gpu_bytes() as f64 / 1e9,
        memory.host_bytes() as f64 / 1e9,
        kv_cache_bytes(config, run.batch, run.context + generated) as f64 / 1e9
    );
    let started = Instant::now();
    let mut next = Vec::new();
    if run.synthetic_context {
        for sequence in 0..run.batch {
            model.prefill_shadow_synthetic(&mut shadow, run.context, run.seed + sequence as u64)?;
            next.push(random_token());
        }
        eprintln!(
            "context: SYNTHETIC random keys and values through ShadowKV's prefill, {} x {} tokens in {:.2} s",
            run.batch,
            run.context,
            started.elapsed().as_secs_f64()
        );
    } else {
        let bar = prefill_bar(run.batch * run.context);
        for sequence in 0..run.batch {
            let prompt: Vec<u32> = (0..run.context).map(|_| random_token()).collect();
            let done = sequence * run.context;
            let (_, logits, peak) =
                model.prefill_shadow_measured(&mut shadow, &prompt, PREFILL_CHUNK, |n| {
                    bar.set_position((done + n) as u64)
                })?;
            if sequence == 0 {
                bar.suspend(|| eprintln!("{peak}"));
            }
            next.push(Sampler::greedy().sample(&logits));
        }
        bar.finish_and_clear();
        eprintln!(
            "context: prefilled {} random-token prompts of {} tokens in {:.2} s",
            run.batch,
            run.context,
            started.elapsed().as_secs_f64()
        );
    }
    let mut results = Vec::new();
    let mut runner = run.runner();
    for &rate in hit_rates {
        shadow.set_scripted_hit_rate(rate)?;
        let (per_step, last) = time_steps(run.steps, next, |tokens| {
            model.decode_shadow_step(&mut runner, &mut shadow, tokens)
        })?;
        next = last;
        report_capture_errors(&runner);
        if run.overhead && results.is_empty() {
            let overhead = measure_overhead(model, &mut runner, next, |runner, tokens| {
                model.decode_shadow_step(runner, &mut shadow, tokens)
            })?;
            next = overhead.next.clone();
            overhead.print();
        }
        let stats = shadow.cache().step_stats()?;
        let label = rate.map_or("real selection".to_owned(), synthetic_selection_label);
        eprintln!(
            "  ShadowKV ({label}): the last step's hit rate (last layer) {:.1}%, {} chunks fetched and rebuilt ({} from GPU memory, {} over PCIe)",
            100.0 * stats.hit_rate(),
            stats.misses,
            stats.tier_hits,
            stats.pcie_fetches
        );
        results.push((rate, per_step));
    }
    Ok(results)
}
