//! `shadowkv bench`: decode throughput of a model for a batch size and context length.
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use shadowkv_model::{GpuModel, ModelConfig, ModelSource, Sampler, NAMED_SHAPES};

use shadowkv::cache::CacheCapacity;

use crate::args::{AttentionMode, ShadowKvArgs};
use crate::prefill::{prefill, prefill_bar, PREFILL_CHUNK};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A named shape with random weights generated on the GPU (llama-3-8b, llama-3.1-8b,
    /// yi-9b, qwen2-7b, smollm2-135m), or a .gguf file / Hugging Face folder.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
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
    /// Seed of the synthetic weights, context and prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.batch == 0 || args.context == 0 || args.steps == 0 {
        return Err("--batch, --context and --steps must be at least 1".into());
    }
    let gpu = Arc::new(shadowkv::Gpu::new(0)?);
    let started = Instant::now();
    let model = if NAMED_SHAPES.contains(&args.model.as_str()) {
        let config = ModelConfig::named(&args.model)?;
        eprintln!(
            "model {} (SYNTHETIC random weights), {:.2}B parameters",
            args.model,
            config.parameters() as f64 / 1e9
        );
        GpuModel::synthetic(gpu.clone(), &config, args.seed)?
    } else {
        let source = ModelSource::open(std::path::Path::new(&args.model))?;
        GpuModel::load(gpu.clone(), &source.config, &source.weights)?
    };
    let config = model.config.clone();
    eprintln!(
        "weights: {:.2} GB on {} in {:.1} s",
        model.weight_bytes() as f64 / 1e9,
        gpu.info().name,
        started.elapsed().as_secs_f64()
    );
    let mut rng_state = args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut random_token = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        (rng_state % config.vocab as u64) as u32
    };
    if let Some(home) = args.attention.value_home() {
        return run_shadowkv(&args, &model, home, &mut random_token);
    }
    // The context, the first token after it, two warm-up steps and the timed steps.
    let capacity = (args.context + args.steps + 3) as u32;
    let mut cache = model.new_cache(&vec![capacity; args.batch])?;
    eprintln!(
        "KV cache (full attention): {:.2} GB for {} x {} tokens",
        cache.bytes() as f64 / 1e9,
        args.batch,
        capacity
    );
    let last_logits = if args.synthetic_context {
        cache.fill_synthetic(
            model.gpu(),
            &vec![args.context as u32; args.batch],
            args.seed,
        )?;
        eprintln!(
            "context: SYNTHETIC random keys and values, {} tokens per sequence",
            args.context
        );
        model.forward(
            &mut cache,
            &(0..args.batch).collect::<Vec<_>>(),
            &(0..args.batch).map(|_| random_token()).collect::<Vec<_>>(),
        )?
    } else {
        let bar = prefill_bar(args.batch * args.context);
        let started_prefill = Instant::now();
        let mut rows = Vec::new();
        for sequence in 0..args.batch {
            let prompt: Vec<u32> = (0..args.context).map(|_| random_token()).collect();
            rows.extend(prefill(&model, &mut cache, sequence, &prompt, Some(&bar))?);
        }
        bar.finish_and_clear();
        eprintln!(
            "context: prefilled {} random-token prompts of {} tokens in {:.2} s ({:.0} tokens/s)",
            args.batch,
            args.context,
            started_prefill.elapsed().as_secs_f64(),
            (args.batch * args.context) as f64 / started_prefill.elapsed().as_secs_f64()
        );
        rows
    };
    let sequences: Vec<usize> = (0..args.batch).collect();
    let first: Vec<u32> = last_logits
        .chunks_exact(config.vocab)
        .map(|row| Sampler::greedy().sample(row))
        .collect();
    // Greedy decoding with the argmax on the GPU: each step returns one id per sequence.
    let per_step = time_steps(&args, first, |next| {
        model.forward_greedy(&mut cache, &sequences, next)
    })?;
    // What a step must read at least: every weight once and every cached key and value.
    let kv_bytes = kv_cache_bytes(&config, args.batch, args.context + args.steps / 2);
    let bytes = model.weight_bytes() + kv_bytes;
    report(&args, per_step);
    println!(
        "  full attention reads weights + KV at {:.0} GB/s",
        bytes as f64 / per_step / 1e9
    );
    Ok(())
}

/// Bytes of the bf16 keys and values of `sequences` x `tokens` in every layer.
fn kv_cache_bytes(config: &ModelConfig, sequences: usize, tokens: usize) -> usize {
    2 * 2 * config.layers * config.kv_dim() * sequences * tokens
}

/// Two untimed warm-up steps, then `args.steps` timed ones; seconds per step.
fn time_steps(
    args: &BenchArgs,
    mut next: Vec<u32>,
    mut step: impl FnMut(&[u32]) -> shadowkv_model::Result<Vec<u32>>,
) -> shadowkv_model::Result<f64> {
    for _ in 0..2 {
        next = step(&next)?;
    }
    let timed = Instant::now();
    for _ in 0..args.steps {
        next = step(&next)?;
    }
    Ok(timed.elapsed().as_secs_f64() / args.steps as f64)
}

fn report(args: &BenchArgs, per_step: f64) {
    println!(
        "decode ({:?}): batch {} at {} tokens of context: {:.3} ms per step, {:.1} tokens/s ({:.1} per sequence)",
        args.attention,
        args.batch,
        args.context,
        per_step * 1e3,
        args.batch as f64 / per_step,
        1.0 / per_step,
    );
}

/// The ShadowKV decode: a cache for the batch, each sequence prefilled (a random-token prompt,
/// or SYNTHETIC layers through ShadowKV's prefill), then timed greedy steps.
fn run_shadowkv(
    args: &BenchArgs,
    model: &GpuModel,
    home: shadowkv::cache::ValueHome,
    random_token: &mut impl FnMut() -> u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = &model.config;
    let params = args.shadowkv.params();
    shadowkv_model::cpu::shadowkv::validate(&params, config)?;
    let capacity = CacheCapacity::uniform(args.batch, args.context, args.steps + 3);
    let mut shadow = model.new_shadow_cache(params, home, capacity)?;
    let memory = shadow.memory_report()?;
    eprintln!(
        "ShadowKV cache ({params:?}, values {home:?}): {:.2} GB on the GPU, {:.2} GB pinned on the host; the full KV cache would be {:.2} GB",
        memory.gpu_bytes() as f64 / 1e9,
        memory.host_bytes() as f64 / 1e9,
        kv_cache_bytes(config, args.batch, args.context + args.steps + 3) as f64
            / 1e9
    );
    let started = Instant::now();
    let mut first = Vec::new();
    if args.synthetic_context {
        for sequence in 0..args.batch {
            model.prefill_shadow_synthetic(
                &mut shadow,
                args.context,
                args.seed + sequence as u64,
            )?;
            first.push(random_token());
        }
        eprintln!(
            "context: SYNTHETIC random keys and values through ShadowKV's prefill, {} x {} tokens in {:.2} s",
            args.batch,
            args.context,
            started.elapsed().as_secs_f64()
        );
    } else {
        let bar = prefill_bar(args.batch * args.context);
        for sequence in 0..args.batch {
            let prompt: Vec<u32> = (0..args.context).map(|_| random_token()).collect();
            let done = sequence * args.context;
            let (_, logits) = model.prefill_shadow(&mut shadow, &prompt, PREFILL_CHUNK, |n| {
                bar.set_position((done + n) as u64)
            })?;
            first.push(Sampler::greedy().sample(&logits));
        }
        bar.finish_and_clear();
        eprintln!(
            "context: prefilled {} random-token prompts of {} tokens in {:.2} s",
            args.batch,
            args.context,
            started.elapsed().as_secs_f64()
        );
    }
    let per_step = time_steps(args, first, |next| {
        model.decode_shadow_greedy(&mut shadow, next)
    })?;
    report(args, per_step);
    let stats = shadow.cache().step_stats()?;
    println!(
        "  ShadowKV: the last step's hit rate (last layer) {:.1}%, {} chunks fetched and rebuilt",
        100.0 * stats.hit_rate(),
        stats.misses
    );
    Ok(())
}
