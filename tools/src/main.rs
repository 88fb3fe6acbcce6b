//! `shadowkv`: the command-line driver of the ShadowKV kernels.
mod args;
mod bandwidth;
mod bench;
mod eval;
mod generate;
mod hit_rates;
mod plan;
mod prefill;
mod table;

use std::time::Instant;

use clap::{Parser, Subcommand};
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::reference::{self, relative_error};
use shadowkv::{DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, Gpu, SequenceLayout};

#[derive(Parser)]
#[command(
    name = "shadowkv",
    version,
    about = "ShadowKV long-context decode kernels: demos and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Decode attention on a built-in random example: a ragged batch at Llama-3-8B head
    /// shapes, checked against the f64 CPU reference. Without a GPU it runs the reference
    /// alone and says so.
    Demo {
        /// Tokens of the longest sequence; the others are shorter (a ragged batch).
        #[arg(long, default_value_t = 4096)]
        tokens: u32,
        /// Sequences in the batch.
        #[arg(long, default_value_t = 3)]
        batch: usize,
        /// Query heads (a multiple of --kv-heads, at most 8 per KV head).
        #[arg(long, default_value_t = 32)]
        q_heads: usize,
        /// Key/value heads.
        #[arg(long, default_value_t = 8)]
        kv_heads: usize,
        /// Head dimension: 64 or 128.
        #[arg(long, default_value_t = 128)]
        head_dim: usize,
        /// Random seed of the example.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Generate text with a Llama-family model (GGUF or Hugging Face), streaming the tokens
    /// and printing prefill and decode tokens/s. Attention: full or ShadowKV.
    Generate(generate::GenerateArgs),
    /// Decode throughput (tokens/s) of a model, real or synthetic, for a batch size and a
    /// context length, on the GPU.
    Bench(bench::BenchArgs),
    /// The largest batch each attention mode fits (full attention, ShadowKV with the values
    /// on the host, ShadowKV with the values on the GPU) for a model and a context length,
    /// and what limits it. Works without a GPU given --gpu-gib and --host-gib.
    Plan(plan::PlanArgs),
    /// How many of ShadowKV's selected chunks stay selected between adjacent decode steps,
    /// per layer, on real text (CPU reference model, no GPU): the cache hit rate a real
    /// model sees, to calibrate `bench --hit-rate`.
    HitRates(hit_rates::HitRatesArgs),
    /// The peak GPU memory of a ShadowKV prefill of a random-token prompt (layer-wise, and
    /// with --all-layers the route that held every layer's K/V), against the bound weights +
    /// hidden states + 2 x one layer's K/V + workspace.
    PrefillPeak(prefill::PrefillPeakArgs),
    /// The equivalent bandwidth of one layer's ShadowKV step (full-attention K/V bytes /
    /// step time), swept over context, batch, hit rate, value format and home beside the
    /// copy ceilings and full attention; a table, CSV or JSON and a PNG chart. GPU only.
    #[command(long_about = bandwidth::ABOUT)]
    Bandwidth(bandwidth::BandwidthArgs),
    /// RULER-style accuracy: needle, multi-key/value/query, variable-tracking and word tasks
    /// at chosen context lengths and depths, full attention against a grid of ShadowKV
    /// settings, with per-layer hit rates and attention recall; markdown, JSON, heatmaps.
    #[command(after_help = eval::AFTER_HELP)]
    Eval(eval::EvalArgs),
}

fn main() {
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Demo {
            tokens,
            batch,
            q_heads,
            kv_heads,
            head_dim,
            seed,
        } => demo(
            DecodeAttentionShape {
                batch,
                q_heads,
                kv_heads,
                head_dim,
            },
            tokens,
            seed,
        )
        .map_err(|e| e.into()),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Plan(args) => plan::run(args),
        Command::HitRates(args) => hit_rates::run(args),
        Command::PrefillPeak(args) => prefill::run_peak(args),
        Command::Bandwidth(args) => bandwidth::run(args),
        Command::Eval(args) => eval::run(args),
    };
    if let Err(error) = result {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

fn demo(shape: DecodeAttentionShape, tokens: u32, seed: u64) -> shadowkv::Result<()> {
    shape.validate()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut offset = 0u64;
    let layouts: Vec<SequenceLayout> = (0..shape.batch)
        .map(|b| {
            // Halve per sequence, a little off the tile sizes; never below one token.
            let len = tokens
                .checked_shr(b as u32)
                .unwrap_or(0)
                .saturating_sub(b as u32 % 3)
                .max(1);
            let layout = SequenceLayout {
                offset,
                capacity: len,
                len,
            };
            offset += (shape.kv_heads * len as usize * shape.head_dim).next_multiple_of(8) as u64;
            layout
        })
        .collect();
    let random = |rng: &mut StdRng, n: usize| -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.gen_range(-1.0..1.0)))
            .collect()
    };
    let q = random(&mut rng, shape.q_elements());
    let k = random(&mut rng, offset as usize);
    let v = random(&mut rng, offset as usize);
    let lens: Vec<u32> = layouts.iter().map(|l| l.len).collect();
    println!(
        "decode attention: batch {} (tokens {lens:?}), {} query heads over {} KV heads, d {}",
        shape.batch, shape.q_heads, shape.kv_heads, shape.head_dim
    );

    // One plan, sized for the GPU when there is one (the CPU path only needs its scale).
    let gpu = Gpu::new(0);
    let plan = match &gpu {
        Ok(gpu) => DecodeAttentionPlan::for_gpu(gpu, shape, &layouts)?,
        Err(_) => DecodeAttentionPlan::new(shape, &layouts, 1)?,
    };
    let started = Instant::now();
    let expected =
        reference::attention::decode_attention(&shape, &layouts, &q, &k, &v, plan.scale() as f64);
    println!(
        "CPU reference (f64): {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );

    let gpu = match gpu {
        Ok(gpu) => gpu,
        Err(reason) => {
            println!("no GPU ({reason}): ran the CPU reference path only");
            println!("output[0][0][..4] = {:?}", &expected[..4]);
            return Ok(());
        }
    };
    let stream = gpu.stream();
    let (dq, dk, dv) = (
        stream.clone_htod(&q)?,
        stream.clone_htod(&k)?,
        stream.clone_htod(&v)?,
    );
    let mut out = stream.clone_htod(&vec![bf16::NAN; shape.q_elements()])?;
    let mut attention = DecodeAttention::new(&gpu, plan)?;
    attention.run(&gpu, stream, &dq, &dk, &dv, &mut out)?;
    let ms = gpu.time_ms(stream, 20, || {
        attention.run(&gpu, stream, &dq, &dk, &dv, &mut out)
    })?;
    let actual: Vec<f64> = stream
        .clone_dtoh(&out)?
        .iter()
        .map(|x| x.to_f64())
        .collect();
    let bytes = attention.plan().kv_bytes_read() as f64;
    println!(
        "GPU {}: {:.1} us per step ({} splits of {} tokens), {:.0} GB/s; relative error vs reference {:.2e}",
        gpu.info().name,
        ms * 1e3,
        attention.plan().max_splits(),
        attention.plan().split_len(),
        bytes / (ms as f64 * 1e-3) / 1e9,
        relative_error(&actual, &expected)
    );
    Ok(())
}
