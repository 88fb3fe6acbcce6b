//! `shadowkv generate`: run a Llama-family model on a prompt, streaming the tokens; several
//! prompts are served together by the continuous-batching scheduler, on the GPU or the CPU
//! reference path.
use std::io::Write;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use shadowkv::cache::{CacheCapacity, ValueFormat, ValueHome};
use shadowkv_model::{
    Backend, CacheMode, CpuBackend, CpuCache, CpuModel, Event, FinishReason, GpuBackend, GpuModel,
    GpuServeCapacity, ModelSource, Request, RequestId, Sampler, Scheduler,
};

use crate::args::{AttentionMode, ShadowKvArgs};
use crate::prefill::{prefill, prefill_bar, PREFILL_CHUNK};

mod split;

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

impl DeviceChoice {
    /// The GPU this choice runs on, or `None` for the CPU reference path (`Auto` falls back to
    /// it, with a note, when no GPU opens).
    pub fn open(self) -> Result<Option<shadowkv::Gpu>, shadowkv::Error> {
        match self {
            DeviceChoice::Cpu => Ok(None),
            DeviceChoice::Gpu => shadowkv::Gpu::new(0).map(Some),
            DeviceChoice::Auto => match shadowkv::Gpu::new(0) {
                Ok(gpu) => Ok(Some(gpu)),
                Err(reason) => {
                    eprintln!("note: no GPU ({reason}): running the CPU reference path");
                    Ok(None)
                }
            },
        }
    }
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A .gguf file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json) of
    /// a Llama (Llama 2/3/3.1, Yi, Mistral, SmolLM), Qwen2, GLM-4-9B (GGUF `chatglm`, HF
    /// `chatglm`), Phi-3 or Gemma-3 (GGUF `gemma3`, HF `gemma3_text`; `tools/setup.sh
    /// gemma3-270m` fetches Gemma-3-270M) model. Default: the built-in SmolLM2-135M-Instruct that
    /// tools/setup.sh fetches.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt text. Repeat it (or add --prompt-file, --prompts) for several prompts,
    /// served together: see --prompts.
    #[arg(long)]
    prompt: Vec<String>,
    /// Read a prompt from this file (the whole file is one prompt). Repeatable.
    #[arg(long)]
    prompt_file: Vec<PathBuf>,
    /// Read several prompts from this file, separated by blank lines (a prompt may span
    /// lines). Several prompts in all are served together by the continuous-batching
    /// scheduler (on the GPU, or on the CPU path with --device cpu): every output line
    /// starts with `[N]`, the prompt's index from 0 (the --prompt ones, then the
    /// --prompt-file ones, then these), and a summary per prompt follows on stderr. With
    /// ShadowKV, a prompt too short for the sparse budget keeps exact attention (a single
    /// prompt that short goes through the scheduler too).
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Several prompts: prompt tokens fed per scheduler step, so long prompts are prefilled
    /// a piece at a time while the others keep decoding.
    #[arg(long, default_value_t = 64)]
    prefill_budget: usize,
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
    /// Seed of the sampler (prompt N of several: this seed plus N).
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
    /// Tensor parallelism over this many GPUs of the host (one prompt; one thread per GPU,
    /// NCCL all-reduces, `NCCL_NVLS_ENABLE=0` unless set): it must divide the KV heads.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
}

/// The prompts of the command line, in order: the `--prompt` ones, the `--prompt-file` ones,
/// then those of `--prompts`.
fn prompts(args: &GenerateArgs) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut prompts = args.prompt.clone();
    for path in &args.prompt_file {
        prompts.push(
            std::fs::read_to_string(path)
                .map_err(|e| format!("--prompt-file {}: {e}", path.display()))?,
        );
    }
    if let Some(path) = &args.prompts {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--prompts {}: {e}", path.display()))?;
        prompts.extend(split_prompts(&text));
    }
    if prompts.is_empty() {
        return Err(
            "give the prompt with --prompt TEXT or --prompt-file FILE (several: --prompts FILE)"
                .into(),
        );
    }
    Ok(prompts)
}

/// Prompts separated by blank lines (lines of whitespace only), each trimmed.
fn split_prompts(text: &str) -> Vec<String> {
    let mut prompts = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in text.lines().chain([""]) {
        if line.trim().is_empty() {
            if !current.is_empty() {
                prompts.push(current.join("\n").trim().to_owned());
                current.clear();
            }
        } else {
            current.push(line);
        }
    }
    prompts
}

pub fn run(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let mut prompts = prompts(&args)?;
    let params = args.shadowkv.params();
    let path = match args.model.clone() {
        Some(path) => path,
        None => shadowkv_model::builtin_model_path()?,
    };
    let source = ModelSource::open(&path)?;
    let config = source.config.clone();
    if args.gpus != 1 {
        return split::run(&args, &path, &source, &prompts);
    }
    if args.attention != AttentionMode::Full {
        shadowkv_model::cpu::shadowkv::validate(&params, &config)?;
    }
    let gpu = args.device.open()?;
    let format = args.shadowkv.value_format();
    if format != ValueFormat::Bf16 && (gpu.is_none() || args.attention == AttentionMode::Full) {
        return Err(format!(
            "--value-format {}: compressed values are ShadowKV's on the GPU (--attention \
             shadowkv or shadowkv-gpu with a GPU); the CPU path and full attention keep bf16 \
             values",
            format.name()
        )
        .into());
    }
    let tier = args.shadowkv.value_tier_bytes()?;
    if tier.is_some() && (gpu.is_none() || args.attention != AttentionMode::Shadowkv) {
        return Err(
            "--value-tier-gib: the value tier is ShadowKV's on the GPU with the values \
                    on the host (--attention shadowkv with a GPU)"
                .into(),
        );
    }
    if prompts.len() > 1 {
        return run_many(&args, &path, &source, &prompts, gpu);
    }
    let prompt = prompts.remove(0);
    if gpu.is_none() && args.attention == AttentionMode::ShadowkvGpu {
        eprintln!(
            "note: on the CPU path every value is in memory, so shadowkv-gpu runs as shadowkv"
        );
    }
    let tokens = source.prompt_tokens(&prompt, !args.raw)?;
    if args.attention != AttentionMode::Full && params.check_prompt(tokens.len()).is_err() {
        // The single-sequence ShadowKV paths need the budget's chunks; the scheduler serves a
        // prompt that short with exact attention instead.
        eprintln!(
            "note: the prompt ({} tokens) is too short for the sparse budget: served with exact \
             attention by the scheduler",
            tokens.len()
        );
        return run_many(&args, &path, &source, &[prompt], gpu);
    }
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
                    let shape = crate::plan::cache_shape(&model.config);
                    let storage = args.shadowkv.storage_for(home, &shape, &capacity)?;
                    let mut shadow = model.new_shadow_cache(params, storage, capacity)?;
                    let mut hit_rates = Vec::new();
                    let generation = shadowkv_model::generate(
                        |ids| {
                            if shadow.sequences().is_empty() {
                                let progress = |done: usize| {
                                    if let Some(bar) = bar.as_ref() {
                                        bar.set_position(done as u64);
                                    }
                                };
                                let (_, logits, peak) = model.prefill_shadow_measured(
                                    &mut shadow,
                                    ids,
                                    PREFILL_CHUNK,
                                    progress,
                                )?;
                                if let Some(bar) = bar.as_ref() {
                                    bar.finish_and_clear();
                                }
                                eprintln!("{peak}");
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

/// Several prompts served together by the continuous-batching scheduler, on the GPU when
/// there is one (a [`GpuBackend`] in the chosen mode) or on the CPU reference path: each
/// request's text streams as `[N] text` lines, then a summary per request.
fn run_many(
    args: &GenerateArgs,
    path: &std::path::Path,
    source: &ModelSource,
    prompts: &[String],
    gpu: Option<shadowkv::Gpu>,
) -> Result<(), Box<dyn std::error::Error>> {
    let config = &source.config;
    let mode = match args.attention {
        AttentionMode::Full => CacheMode::Full,
        _ => CacheMode::ShadowKv(args.shadowkv.params()),
    };
    let tokenizer = &source.tokenizer;
    let mut requests = Vec::with_capacity(prompts.len());
    for (index, prompt) in prompts.iter().enumerate() {
        let tokens = source.prompt_tokens(prompt, !args.raw)?;
        let sampler = Sampler::new(args.temperature, args.top_p, args.seed + index as u64)?;
        requests.push(
            Request::new(tokens, args.max_tokens)
                .with_sampler(sampler)
                .with_end_ids(tokenizer.end_of_generation_ids().iter().copied())
                .with_mode(mode),
        );
    }
    let path_name = match &gpu {
        Some(gpu) => format!("GPU {} (bf16)", gpu.info().name),
        None => "CPU reference path (f32)".to_owned(),
    };
    eprintln!(
        "model {} ({:.0}M parameters); {} prompts ({} tokens in all); attention {:?}; {path_name}, \
         continuous batching with {} prompt tokens per step",
        path.display(),
        config.parameters() as f64 / 1e6,
        prompts.len(),
        requests.iter().map(|r| r.prompt.len()).sum::<usize>(),
        args.attention,
        args.prefill_budget,
    );
    match gpu {
        Some(gpu) => {
            if args.shadowkv.value_tier_bytes()?.is_some() {
                return Err(
                    "--value-tier-gib applies to one prompt; several prompts are \
                            served without a value tier"
                        .into(),
                );
            }
            let model = GpuModel::load(std::sync::Arc::new(gpu), config, &source.weights)?;
            // Every prompt is served at once; a block holds its prompt and its tokens.
            let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
            let capacity = GpuServeCapacity {
                max_sequences: requests.len(),
                max_tokens: longest + args.max_tokens,
                max_generated: args.max_tokens,
            };
            let shadowkv = match mode {
                CacheMode::Full => None,
                CacheMode::ShadowKv(params) => Some((
                    params,
                    args.attention.value_home().unwrap_or(ValueHome::Host),
                )),
            };
            let backend = GpuBackend::new(&model, capacity, shadowkv)?;
            let scheduler = Scheduler::new(backend, args.prefill_budget);
            serve(scheduler, source, requests, mode, &path_name)
        }
        None => {
            let weights = source.weights.load(config, Ok)?;
            let model = CpuModel::new(config.clone(), weights);
            let scheduler = Scheduler::new(CpuBackend::new(&model), args.prefill_budget);
            serve(scheduler, source, requests, mode, &path_name)
        }
    }
}

/// Runs `requests` on `scheduler` to the end, streaming each one's text and then a summary
/// per request and one for the whole run.
fn serve<B: Backend>(
    mut scheduler: Scheduler<B>,
    source: &ModelSource,
    requests: Vec<Request>,
    mode: CacheMode,
    path_name: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let tokenizer = &source.tokenizer;
    let count = requests.len();
    let started = std::time::Instant::now();
    let mut index = std::collections::HashMap::<RequestId, usize>::new();
    for (i, request) in requests.into_iter().enumerate() {
        index.insert(scheduler.submit(request)?, i);
    }
    let mut streams: Vec<_> = (0..count).map(|_| tokenizer.stream()).collect();
    let mut pending = vec![String::new(); count];
    let mut summaries = vec![None; count];
    let mut stdout = std::io::stdout();
    while !scheduler.is_idle() {
        for event in scheduler.step()? {
            match event {
                Event::Token { id, token } => {
                    let i = index[&id];
                    if tokenizer.is_end_of_generation(token) {
                        continue;
                    }
                    if let Some(text) = streams[i].push(token)? {
                        pending[i].push_str(&text);
                        print_ready(&mut stdout, i, &mut pending[i], false);
                    }
                }
                Event::Finished { id, reason, stats } => {
                    let i = index[&id];
                    let stream = std::mem::replace(&mut streams[i], tokenizer.stream());
                    pending[i].push_str(&stream.finish()?);
                    print_ready(&mut stdout, i, &mut pending[i], true);
                    summaries[i] = Some((reason, stats));
                }
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut generated = 0;
    for (i, summary) in summaries.iter().enumerate() {
        let Some((reason, stats)) = summary else {
            continue;
        };
        generated += stats.generated_tokens;
        let exact = match mode {
            CacheMode::ShadowKv(params) if params.check_prompt(stats.prompt_tokens).is_err() => {
                "; exact attention, the prompt being too short for the sparse budget"
            }
            _ => "",
        };
        let decode_seconds = (stats.total_time - stats.time_to_first_token).as_secs_f64();
        eprintln!(
            "[{i}] prompt {} tokens; generated {} tokens ({}); first token after {:.3} s, done \
             after {:.3} s ({:.1} tokens/s after the first){exact}",
            stats.prompt_tokens,
            stats.generated_tokens,
            match reason {
                FinishReason::EndOfGeneration => "end of generation",
                FinishReason::MaxTokens => "token limit",
            },
            stats.time_to_first_token.as_secs_f64(),
            stats.total_time.as_secs_f64(),
            stats.generated_tokens.saturating_sub(1) as f64 / decode_seconds.max(1e-9)
        );
    }
    eprintln!(
        "{path_name}: {count} prompts, {generated} tokens generated in {elapsed:.3} s \
         ({:.1} tokens/s over all prompts)",
        generated as f64 / elapsed.max(1e-9)
    );
    Ok(())
}

/// Prints request `index`'s buffered text as `[index] ...` lines: every complete line, and
/// when the rest has grown long (or `all`) the rest up to its last space (or all of it), so
/// the text streams without splitting words.
fn print_ready(out: &mut impl Write, index: usize, text: &mut String, all: bool) {
    const LONG: usize = 48;
    let mut cut = text.rfind('\n').map(|newline| newline + 1);
    if all {
        cut = Some(text.len());
    } else if text.len() - cut.unwrap_or(0) >= LONG {
        cut = cut.max(text.rfind(' ').map(|space| space + 1));
    }
    let Some(cut) = cut else {
        return;
    };
    let ready: String = text.drain(..cut).collect();
    for line in ready.lines() {
        let line = line.trim_end();
        if !line.is_empty() {
            let _ = writeln!(out, "[{index}] {line}");
        }
    }
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::split_prompts;

    #[test]
    fn prompts_are_separated_by_blank_lines() {
        let text = "First prompt,\non two lines.\n\n  \nSecond.\nThird line of it.\n\n\nLast";
        assert_eq!(
            split_prompts(text),
            [
                "First prompt,\non two lines.",
                "Second.\nThird line of it.",
                "Last"
            ]
        );
        assert!(split_prompts("\n \n").is_empty());
    }
}
