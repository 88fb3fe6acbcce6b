//! `shadowkv generate`: run a Llama-family model on a prompt, streaming the tokens.
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use shadowkv::cache::{CacheCapacity, ValueHome};
use shadowkv_model::{CpuCache, CpuModel, GpuModel, ModelSource, Sampler};

use crate::args::{AttentionMode, ShadowKvArgs};
use crate::prefill::{prefill, prefill_bar, PREFILL_CHUNK};

/// Which processor runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// The GPU if there is one and the model runs there, else the CPU reference path.
    Auto,
    /// The f32 CPU reference path (small models).
    Cpu,
    /// The GPU.
    Gpu,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A .gguf file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    /// Default: the built-in SmolLM2-135M-Instruct that tools/setup.sh fetches.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    /// Read the prompt from this file instead.
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Send the prompt as is, without the model's chat template.
    #[arg(long)]
    raw: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens whose probabilities add up to this.
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Attention over the KV cache.
    #[arg(long, value_enum, default_value_t = AttentionMode::Full)]
    attention: AttentionMode,
    /// Which processor runs the model.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    #[command(flatten)]
    shadowkv: ShadowKvArgs,
}

pub fn run(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let prompt = match (&args.prompt, &args.prompt_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| format!("--prompt-file {}: {e}", path.display()))?,
        (None, None) => {
            return Err("give the prompt with --prompt TEXT or --prompt-file FILE".into())
        }
    };
    let params = args.shadowkv.params();
    let path = match args.model {
        Some(path) => path,
        None => shadowkv_model::builtin_model_path()?,
    };
    let source = ModelSource::open(&path)?;
    let config = source.config.clone();
    if args.attention != AttentionMode::Full {
        shadowkv_model::cpu::shadowkv::validate(&params, &config)?;
    }
    let gpu = match args.device {
        DeviceChoice::Cpu => None,
        DeviceChoice::Gpu => Some(shadowkv::Gpu::new(0)?),
        DeviceChoice::Auto => match shadowkv::Gpu::new(0) {
            Ok(gpu) => Some(gpu),
            Err(reason) => {
                eprintln!("note: no GPU ({reason}): running the CPU reference path");
                None
            }
        },
    };
    if gpu.is_none() && args.attention == AttentionMode::ShadowkvGpu {
        eprintln!(
            "note: on the CPU path every value is in memory, so shadowkv-gpu runs as shadowkv"
        );
    }
    let tokens = source.prompt_tokens(&prompt, !args.raw)?;
    eprintln!(
        "model {}: {} layers, {} heads / {} KV heads, d {}, {:.0}M parameters; prompt {} tokens; attention {:?}",
        path.display(),
        config.layers,
        config.heads,
        config.kv_heads,
        config.head_dim,
        config.parameters() as f64 / 1e6,
        tokens.len(),
        args.attention
    );
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed)?;
    let tokenizer = &source.tokenizer;
    let mut stream = tokenizer.stream();
    let mut stdout = std::io::stdout();
    let on_token = |id: u32| -> shadowkv_model::Result<()> {
        if tokenizer.is_end_of_generation(id) {
            return Ok(());
        }
        if let Some(text) = stream.push(id)? {
            print!("{text}");
            let _ = stdout.flush();
        }
        Ok(())
    };
    let is_end = |id: u32| tokenizer.is_end_of_generation(id);
    let (generation, path_name) = match gpu {
        Some(gpu) => {
            let name = format!(
                "GPU {} (bf16, attention {:?})",
                gpu.info().name,
                args.attention
            );
            let loading = std::time::Instant::now();
            let model = GpuModel::load(std::sync::Arc::new(gpu), &config, &source.weights)?;
            eprintln!(
                "weights: {:.0} MB on the GPU in {:.1} s",
                model.weight_bytes() as f64 / 1e6,
                loading.elapsed().as_secs_f64()
            );
            // Long prompts prefill in passes, with a progress bar.
            let bar = (tokens.len() > PREFILL_CHUNK).then(|| prefill_bar(tokens.len()));
            let generation = match args.attention {
                AttentionMode::Full => {
                    let mut cache = model.new_cache(&[(tokens.len() + args.max_tokens) as u32])?;
                    shadowkv_model::generate(
                        |ids| {
                            let logits = prefill(&model, &mut cache, 0, ids, bar.as_ref());
                            if let Some(bar) = bar.as_ref().filter(|_| ids.len() > 1) {
                                bar.finish_and_clear();
                            }
                            logits
                        },
                        &tokens,
                        &mut sampler,
                        args.max_tokens,
                        is_end,
                        on_token,
                    )?
                }
                AttentionMode::Shadowkv | AttentionMode::ShadowkvGpu => {
                    let home = args.attention.value_home().unwrap_or(ValueHome::Host);
                    let capacity = CacheCapacity::uniform(1, tokens.len(), args.max_tokens);
                    let mut shadow = model.new_shadow_cache(params, home, capacity)?;
                    let mut hit_rates = Vec::new();
                    let generation = shadowkv_model::generate(
                        |ids| {
                            if shadow.sequences().is_empty() {
                                let progress = |done: usize| {
                                    if let Some(bar) = bar.as_ref() {
                                        bar.set_position(done as u64);
                                    }
                                };
                                let (_, logits) = model.prefill_shadow(
                                    &mut shadow,
                                    ids,
                                    PREFILL_CHUNK,
                                    progress,
                                )?;
                                if let Some(bar) = bar.as_ref() {
                                    bar.finish_and_clear();
                                }
                                return Ok(logits);
                            }
                            let logits = model.decode_shadow(&mut shadow, ids)?;
                            if let Ok(stats) = shadow.cache().step_stats() {
                                hit_rates.push(stats.hit_rate());
                            }
                            Ok(logits)
                        },
                        &tokens,
                        &mut sampler,
                        args.max_tokens,
                        is_end,
                        on_token,
                    )?;
                    if !hit_rates.is_empty() {
                        eprintln!(
                            "\nShadowKV: mean hit rate of the sparse slots (last layer) {:.1}% over {} steps",
                            100.0 * hit_rates.iter().sum::<f64>() / hit_rates.len() as f64,
                            hit_rates.len()
                        );
                    }
                    generation
                }
            };
            (generation, name)
        }
        None => {
            let weights = source.weights.load(&config, Ok)?;
            let model = CpuModel::new(config.clone(), weights);
            let mut cache = match args.attention {
                AttentionMode::Full => CpuCache::new(&config),
                _ => CpuCache::shadowkv(&config, params)?,
            };
            let generation = shadowkv_model::generate(
                |ids| model.forward(&mut cache, ids),
                &tokens,
                &mut sampler,
                args.max_tokens,
                is_end,
                on_token,
            )?;
            (generation, "CPU reference path (f32)".to_owned())
        }
    };
    print!("{}", stream.finish()?);
    println!();
    eprintln!(
        "{path_name}: prefill {} tokens in {:.3} s ({:.1} tokens/s); decode {} tokens, {:.1} tokens/s",
        generation.prompt_tokens,
        generation.prefill_seconds,
        generation.prefill_tokens_per_second(),
        generation.tokens.len(),
        generation.decode_tokens_per_second()
    );
    Ok(())
}
