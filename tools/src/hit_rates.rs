//! `shadowkv hit-rates`: how many of ShadowKV's selected chunks stay selected from one decode
//! step to the next, per layer, on real text, through the CPU reference model (no GPU). A
//! decode step's cache hit rate is exactly that share: the plan keeps the previous step's
//! selection resident.
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use shadowkv_model::eval::step_hit_rates;
use shadowkv_model::{CpuCache, CpuModel, ModelSource};

use crate::args::ShadowKvArgs;

#[derive(Args, Debug)]
pub struct HitRatesArgs {
    /// A .gguf file or a Hugging Face folder. Default: the built-in SmolLM2-135M-Instruct
    /// that tools/setup.sh fetches.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text: its first --prompt-tokens tokens are the prompt, the next --tokens are fed
    /// one per decode step (the text's own tokens, not generated ones).
    #[arg(long)]
    prompt_file: PathBuf,
    /// Tokens of the text that form the prompt.
    #[arg(long, default_value_t = 1536)]
    prompt_tokens: usize,
    /// Decode steps measured after the prompt.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    #[command(flatten)]
    shadowkv: ShadowKvArgs,
}

/// Mean and standard deviation.
fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len().max(1) as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

pub fn run(args: HitRatesArgs) -> Result<(), Box<dyn std::error::Error>> {
    let path = match args.model {
        Some(path) => path,
        None => shadowkv_model::builtin_model_path()?,
    };
    let text = std::fs::read_to_string(&args.prompt_file)
        .map_err(|e| format!("--prompt-file {}: {e}", args.prompt_file.display()))?;
    let source = ModelSource::open(&path)?;
    let config = source.config.clone();
    let params = args.shadowkv.params();
    if args.shadowkv.value_format() != shadowkv::cache::ValueFormat::Bf16 {
        return Err("--value-format: hit-rates runs the CPU path, which keeps bf16 values".into());
    }
    let mut tokens = source.tokenizer.encode(&text)?;
    if let (true, Some(bos)) = (source.tokenizer.add_bos(), source.tokenizer.bos_id()) {
        tokens.insert(0, bos);
    }
    let needed = args.prompt_tokens + args.tokens;
    if tokens.len() < needed || args.tokens < 2 {
        return Err(format!(
            "the text has {} tokens: --prompt-tokens {} and --tokens {} (at least 2) need {needed}",
            tokens.len(),
            args.prompt_tokens,
            args.tokens
        )
        .into());
    }
    let weights = source.weights.load(&config, Ok)?;
    let model = CpuModel::new(config.clone(), weights);
    let mut cache = CpuCache::shadowkv(&config, params)?;
    cache.record_selections(true);
    let started = Instant::now();
    model.forward(&mut cache, &tokens[..args.prompt_tokens])?;
    eprintln!(
        "prompt: {} tokens in {:.1} s",
        args.prompt_tokens,
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let mut steps = Vec::new();
    for &token in &tokens[args.prompt_tokens..needed] {
        model.forward(&mut cache, &[token])?;
        steps.push(cache.selections().to_vec());
    }
    eprintln!(
        "{} decode steps in {:.1} s",
        args.tokens,
        started.elapsed().as_secs_f64()
    );
    let per_layer = step_hit_rates(&steps);
    println!(
        "hit rate between adjacent decode steps ({}, {} prompt tokens of {}, then {} of its tokens; {params:?}: {} chunks selected per KV head)",
        path.file_name().map_or(path.display().to_string(), |n| n.to_string_lossy().into_owned()),
        args.prompt_tokens,
        args.prompt_file.display(),
        args.tokens,
        params.budget_chunks()
    );
    println!(
        "{:>5} {:>8} {:>8} {:>9}",
        "layer", "mean %", "std %", "min step %"
    );
    let mut means = Vec::new();
    for (layer, rates) in per_layer.iter().enumerate() {
        let (mean, std) = mean_std(rates);
        let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "{layer:>5} {:>8.1} {:>8.1} {:>9.1}",
            100.0 * mean,
            100.0 * std,
            100.0 * min
        );
        means.push(mean);
    }
    let (mean, std) = mean_std(&means);
    let (worst, worst_rate) =
        means
            .iter()
            .copied()
            .enumerate()
            .fold(
                (0, f64::INFINITY),
                |a, (l, m)| if m < a.1 { (l, m) } else { a },
            );
    let best = means.iter().copied().fold(0.0f64, f64::max);
    println!(
        "all layers: mean {:.1}%, spread across layers {:.1}% (std), best {:.1}%, worst layer {worst} at {:.1}%",
        100.0 * mean,
        100.0 * std,
        100.0 * best,
        100.0 * worst_rate
    );
    Ok(())
}
