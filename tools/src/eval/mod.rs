//! `shadowkv eval`: a RULER-style accuracy evaluation of full attention against a grid of
//! ShadowKV settings on the same prompts, with ShadowKV's per-layer hit rates and (on the CPU
//! path) attention recall; writes `eval.md`, `eval.json` and a heatmap PNG per mode.
mod heatmap;
mod run;

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use shadowkv_model::eval::{self, Mode, Outcome, Report, Sample, Task};
use shadowkv_model::{ModelSource, ShadowKvParams};

use crate::args::ValueFormatArg;
use crate::generate::DeviceChoice;
use run::ValuesArg;

/// What `--help` says after the options.
pub const AFTER_HELP: &str = "\
Every prompt is answered greedily with full attention and with each ShadowKV setting of the \
grid (--budgets x --ranks x --chunk-sizes x --outliers x --value-formats x --values), most \
generous first. Scores are exact match (share of the expected answers named). Attention recall \
(the share of full attention's probability mass on the tokens ShadowKV attends) is measured on \
the CPU path only, per layer and decode step, beside the hit rate between steps; on the GPU \
the report has the hit rate of the last layer (the cache's step statistics) and no recall.";

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A .gguf file or a Hugging Face folder. Default: the built-in SmolLM2-135M-Instruct
    /// that tools/setup.sh fetches.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tasks, comma-separated: niah-number, niah-word, niah-uuid, multikey, multivalue,
    /// multiquery, vt (variable tracking), cwe (common words), fwe (frequent words).
    #[arg(
        long,
        default_value = "niah-number,niah-word,niah-uuid,multikey,multivalue,multiquery,vt,cwe,fwe"
    )]
    tasks: String,
    /// Context lengths in the model's tokens (each prompt fills its length, chat template
    /// included), at most the model's context.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048")]
    lengths: Vec<usize>,
    /// Needle depths in percent of the context (needle tasks).
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    depths: Vec<f64>,
    /// Prompts per (task, length, depth), each with its own keys and values.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Seed of the generators: the same seed gives the same prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// ShadowKV sparse budgets in tokens (S), each below the longest length; a prompt too
    /// short for a budget (with the outliers and local window) skips that setting.
    #[arg(long, value_delimiter = ',', default_value = "256")]
    budgets: Vec<usize>,
    /// ShadowKV ranks of the key factorisation (multiples of 16 up to 256).
    #[arg(long, value_delimiter = ',', default_value = "160")]
    ranks: Vec<usize>,
    /// ShadowKV chunk sizes in tokens.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    chunk_sizes: Vec<usize>,
    /// ShadowKV outlier chunks per KV head.
    #[arg(long, value_delimiter = ',', default_value = "48")]
    outliers: Vec<usize>,
    /// ShadowKV chunks at the end of the prompt kept exact.
    #[arg(long, default_value_t = ShadowKvParams::default().local_chunks)]
    local_chunks: usize,
    /// Value formats (GPU only for fp8 and int4).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "bf16")]
    value_formats: Vec<ValueFormatArg>,
    /// Where ShadowKV keeps the values: host (offloaded), gpu (GPU only).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "host")]
    values: Vec<ValuesArg>,
    /// Which processor runs the model.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Send the prompts without the model's chat template.
    #[arg(long)]
    raw: bool,
    /// Folder for eval.md, eval.json and the heatmaps.
    #[arg(long, default_value = "eval-out")]
    out: PathBuf,
}

fn format_name(format: ValueFormatArg) -> &'static str {
    match format {
        ValueFormatArg::Bf16 => "bf16",
        ValueFormatArg::Fp8 => "fp8",
        ValueFormatArg::Int4 => "int4",
    }
}

/// Full attention, then the ShadowKV grid, most generous first (largest budget, rank,
/// outliers; smallest chunk), each checked against the model; ranks past the keys' width are
/// left out, with a note (so one grid serves models of different widths).
fn modes(
    args: &EvalArgs,
    config: &shadowkv_model::ModelConfig,
) -> Result<(Vec<Mode>, Vec<String>), Box<dyn std::error::Error>> {
    let mut notes = Vec::new();
    let sorted = |values: &[usize], descending: bool| {
        let mut v = values.to_vec();
        v.sort_unstable();
        v.dedup();
        if descending {
            v.reverse();
        }
        v
    };
    let mut modes = vec![Mode::full()];
    for &sparse_budget in &sorted(&args.budgets, true) {
        for &rank in &sorted(&args.ranks, true) {
            if rank > config.kv_dim() {
                let note = format!(
                    "rank {rank} left out: past the keys' width {} (KV heads x head dimension)",
                    config.kv_dim()
                );
                if !notes.contains(&note) {
                    notes.push(note);
                }
                continue;
            }
            for &chunk_size in &sorted(&args.chunk_sizes, false) {
                for &outlier_chunks in &sorted(&args.outliers, true) {
                    let params = ShadowKvParams {
                        chunk_size,
                        sparse_budget,
                        rank,
                        local_chunks: args.local_chunks,
                        outlier_chunks,
                    };
                    shadowkv_model::cpu::shadowkv::validate(&params, config)?;
                    for &format in &args.value_formats {
                        for &values in &args.values {
                            modes.push(Mode {
                                shadowkv: Some(params),
                                value_format: format_name(format).into(),
                                values: values.name().into(),
                            });
                        }
                    }
                }
            }
        }
    }
    if modes.len() == 1 {
        return Err(format!("no ShadowKV setting is left to run: {}", notes.join("; ")).into());
    }
    Ok((modes, notes))
}

pub fn run(args: EvalArgs) -> Result<(), Box<dyn std::error::Error>> {
    let tasks = Task::parse_list(&args.tasks)?;
    if tasks.is_empty() {
        return Err("--tasks names no task".into());
    }
    if args.lengths.is_empty() || args.samples == 0 {
        return Err("give at least one --lengths value and --samples 1 or more".into());
    }
    if let Some(bad) = args.depths.iter().find(|d| !(0.0..=100.0).contains(*d)) {
        return Err(eval::EvalError::BadDepth(*bad).into());
    }
    let path = match args.model.clone() {
        Some(path) => path,
        None => shadowkv_model::builtin_model_path()?,
    };
    let source = ModelSource::open(&path)?;
    let config = source.config.clone();
    eval::check_grid(&args.lengths, config.context_length, &args.budgets)?;
    let (modes, mode_notes) = modes(&args, &config)?;
    let gpu = args.device.open()?;
    if gpu.is_none() {
        let gpu_only = modes
            .iter()
            .find(|m| m.shadowkv.is_some() && (m.value_format != "bf16" || m.values == "gpu"));
        if let Some(mode) = gpu_only {
            return Err(format!(
                "{}: compressed values (--value-formats fp8, int4) and --values gpu are \
                 ShadowKV's on the GPU; the CPU path keeps bf16 values in memory (--value-formats \
                 bf16 --values host)",
                mode.label()
            )
            .into());
        }
    }
    let device = match &gpu {
        Some(gpu) => format!("GPU {}", gpu.info().name),
        None => "CPU reference path (f32)".to_owned(),
    };

    // The prompts, generated and fitted to their lengths before anything runs.
    let chat = !args.raw;
    let mut measure = |s: &Sample| -> Result<usize, eval::EvalError> {
        Ok(eval::prompt_tokens(&source, s, chat)?.len())
    };
    let started = std::time::Instant::now();
    let mut prompts: Vec<(Sample, usize, Vec<u32>)> = Vec::new();
    for &task in &tasks {
        for &length in &args.lengths {
            let depths: Vec<Option<f64>> = if task.uses_depth() {
                args.depths.iter().map(|d| Some(d / 100.0)).collect()
            } else {
                vec![None]
            };
            for &depth in &depths {
                for index in 0..args.samples {
                    let seed = args.seed.wrapping_mul(1_000_003).wrapping_add(index as u64);
                    let sample =
                        eval::generate(task, length, depth.unwrap_or(0.0), seed, &mut measure)?;
                    let tokens = eval::prompt_tokens(&source, &sample, chat)?;
                    prompts.push((sample, index, tokens));
                }
            }
        }
    }
    // A mode runs on the prompts long enough for its budget; the others skip it, and the
    // report compares it with full attention on the prompts it answered.
    let runs = |tokens: &[u32], mode: &Mode| {
        mode.shadowkv
            .is_none_or(|params| params.check_prompt(tokens.len()).is_ok())
    };
    let mut skipped = vec![Vec::new(); modes.len()];
    for (sample, _, tokens) in &prompts {
        for (m, mode) in modes.iter().enumerate() {
            if !runs(tokens, mode) && !skipped[m].contains(&sample.target_tokens) {
                skipped[m].push(sample.target_tokens);
            }
        }
    }
    if let Some(m) = (0..modes.len()).find(|&m| {
        prompts
            .iter()
            .all(|(_, _, tokens)| !runs(tokens, &modes[m]))
    }) {
        let longest = prompts.iter().map(|(_, _, t)| t.len()).max().unwrap_or(0);
        let error = modes[m]
            .shadowkv
            .map(|p| p.check_prompt(longest))
            .and_then(Result::err)
            .map_or(String::new(), |e| e.to_string());
        return Err(format!(
            "{}: every prompt is too short for it (the longest has {longest} tokens): {error}",
            modes[m].label()
        )
        .into());
    }
    let answers: usize = prompts
        .iter()
        .map(|(_, _, tokens)| modes.iter().filter(|m| runs(tokens, m)).count())
        .sum();
    eprintln!(
        "model {}: {} prompts (generated in {:.1} s) x {} modes on the {device}",
        path.display(),
        prompts.len(),
        started.elapsed().as_secs_f64(),
        modes.len()
    );
    let runner = run::load(&source, gpu)?;
    let started = std::time::Instant::now();
    let bar = ProgressBar::new(answers as u64).with_style(
        ProgressStyle::with_template("eval {bar:40} {pos}/{len} answers, eta {eta} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut report = Report {
        model: path.file_name().map_or(path.display().to_string(), |n| {
            n.to_string_lossy().into_owned()
        }),
        device,
        notes: mode_notes,
        modes: modes.clone(),
        outcomes: Vec::new(),
    };
    report.notes.push(match runner {
        run::Runner::Cpu(_) => "Hit rate and recall per layer and decode step (CPU path).".into(),
        run::Runner::Gpu(_) => "GPU: hit rate of the last layer only (the cache's step \
                                statistics); attention recall is measured on the CPU path only."
            .into(),
    });
    for (m, lengths) in skipped.iter().enumerate().filter(|(_, l)| !l.is_empty()) {
        report.notes.push(format!(
            "{} skipped at {lengths:?} tokens: those prompts are too short for its budget, \
             outliers and local window.",
            modes[m].label()
        ));
    }
    report.notes.push(format!(
        "Chat template: {}.",
        if chat && source.chat_template.is_some() {
            "yes"
        } else {
            "no (plain text)"
        }
    ));
    for (sample, index, tokens) in &prompts {
        bar.set_message(format!(
            "{} at {} tokens",
            sample.task.name(),
            sample.target_tokens
        ));
        let chosen: Vec<usize> = (0..modes.len())
            .filter(|&m| runs(tokens, &modes[m]))
            .collect();
        let chosen_modes: Vec<&Mode> = chosen.iter().map(|&m| &modes[m]).collect();
        let answers = runner.answers(
            &source.tokenizer,
            tokens,
            sample.task.max_new_tokens(),
            &chosen_modes,
            || bar.inc(1),
        )?;
        for (&m, answer) in chosen.iter().zip(answers) {
            let text = source.tokenizer.decode(&answer.tokens)?;
            report.outcomes.push(Outcome {
                task: sample.task,
                length: sample.target_tokens,
                prompt_tokens: tokens.len(),
                depth: sample.depth,
                sample: *index,
                mode: m,
                score: eval::score(&sample.answers, &text),
                answer: text,
                hit_rates: answer.hit_rates,
                recalls: answer.recalls,
            });
        }
    }
    bar.finish_and_clear();
    eprintln!(
        "{} answers in {:.1} s",
        report.outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    std::fs::create_dir_all(&args.out).map_err(|e| format!("--out {}: {e}", args.out.display()))?;
    let markdown = report.markdown();
    let write = |name: &str, text: &str| {
        let file = args.out.join(name);
        std::fs::write(&file, text).map_err(|e| format!("{}: {e}", file.display()))
    };
    write("eval.md", &markdown)?;
    write("eval.json", &serde_json::to_string_pretty(&report.json())?)?;
    let mut heatmaps = 0;
    for (m, mode) in modes.iter().enumerate() {
        let name: String = mode
            .label()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        if heatmap::render(&report, m, &args.out.join(format!("heatmap-{name}.png")))? {
            heatmaps += 1;
        }
    }
    print!("{markdown}");
    eprintln!(
        "wrote eval.md, eval.json and {heatmaps} heatmaps to {}",
        args.out.display()
    );
    Ok(())
}
