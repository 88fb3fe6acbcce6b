//! Answering one prompt in each attention mode of the grid, greedily, on the CPU reference
//! path or the GPU, with ShadowKV's diagnostics: on the CPU the per-layer hit rate between decode steps
//! and the attention recall; on the GPU the hit rate of the last layer (what the cache's
//! `StepStats` exposes).
use std::sync::Arc;

use shadowkv::cache::{CacheCapacity, ValueFormat, ValueHome};
use shadowkv_model::eval::{self, Mode, Summary};
use shadowkv_model::{CpuCache, CpuModel, GpuModel, Sampler, ShadowKvParams, Tokenizer};

use crate::args::ValueFormatArg;
use crate::prefill::{prefill, PREFILL_CHUNK};

/// The model's answer and what ShadowKV's decode steps looked like.
pub struct Answer {
    pub tokens: Vec<u32>,
    /// Per layer (empty for full attention).
    pub hit_rates: Vec<Summary>,
    /// Per layer (CPU path only).
    pub recalls: Vec<Summary>,
}

/// The loaded model on its processor.
pub enum Runner {
    Cpu(Box<CpuModel>),
    Gpu(Box<GpuModel>),
}

/// Where `mode`'s values live and how they are stored.
fn storage(mode: &Mode) -> Result<shadowkv::cache::ValueStorage, Box<dyn std::error::Error>> {
    let format: ValueFormat =
        <ValueFormatArg as clap::ValueEnum>::from_str(&mode.value_format, true)
            .map(ValueFormat::from)
            .map_err(|e| format!("value format {}: {e}", mode.value_format))?;
    let home = match mode.values.as_str() {
        "gpu" => ValueHome::Device,
        _ => ValueHome::Host,
    };
    Ok(home.with_format(format))
}

impl Runner {
    /// Greedy answers to `prompt` of at most `max_new` tokens in each of `modes`, calling
    /// `done` after each. On the CPU one prefill serves every mode (the cache is cloned after
    /// the prompt, then closed with each mode's attention).
    pub fn answers(
        &self,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        max_new: usize,
        modes: &[&Mode],
        mut done: impl FnMut(),
    ) -> Result<Vec<Answer>, Box<dyn std::error::Error>> {
        let mut answers = Vec::with_capacity(modes.len());
        match self {
            Runner::Cpu(model) => {
                let config = &model.config;
                // Any valid setting keeps the prompt's pre-RoPE keys for the shadows.
                let mut prefilled =
                    CpuCache::shadowkv(config, ShadowKvParams::default()).or_else(|_| {
                        let params = modes.iter().find_map(|m| m.shadowkv);
                        CpuCache::shadowkv(config, params.unwrap_or_default())
                    })?;
                let logits = model.prefill_piece(&mut prefilled, prompt)?;
                for mode in modes {
                    let mut cache = prefilled.clone();
                    cache.set_shadowkv(config, mode.shadowkv)?;
                    model.finish_prompt(&mut cache)?;
                    answers.push(cpu_answer(
                        model, cache, tokenizer, prompt, &logits, max_new, mode,
                    )?);
                    done();
                }
            }
            Runner::Gpu(model) => {
                for mode in modes {
                    answers.push(gpu_answer(model, tokenizer, prompt, max_new, mode)?);
                    done();
                }
            }
        }
        Ok(answers)
    }
}

/// Greedy decoding from `logits` of `prompt` (already in `cache`): the tokens, and with
/// ShadowKV the per-layer hit rates and recalls of the decode steps.
fn cpu_answer(
    model: &CpuModel,
    mut cache: CpuCache,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    logits: &[f32],
    max_new: usize,
    mode: &Mode,
) -> Result<Answer, Box<dyn std::error::Error>> {
    let shadowkv = mode.shadowkv.is_some();
    cache.record_selections(shadowkv);
    cache.record_recall(shadowkv);
    let (mut selections, mut recalls) = (Vec::new(), Vec::new());
    let mut prefilled = Some(logits.to_vec());
    let generation = shadowkv_model::generate(
        |ids| {
            if let Some(logits) = prefilled.take() {
                return Ok(logits);
            }
            let logits = model.forward(&mut cache, ids)?;
            if shadowkv {
                selections.push(cache.selections().to_vec());
                recalls.push(cache.recalls().to_vec());
            }
            Ok(logits)
        },
        prompt,
        &mut Sampler::greedy(),
        max_new,
        |id| tokenizer.is_end_of_generation(id),
        |_| Ok(()),
    )?;
    let mut answer = Answer {
        tokens: answer_tokens(tokenizer, generation.tokens),
        hit_rates: Vec::new(),
        recalls: Vec::new(),
    };
    if shadowkv {
        answer.hit_rates = eval::diagnostics::per_layer(&eval::step_hit_rates(&selections));
        answer.recalls = eval::diagnostics::per_layer(&eval::step_recalls(&recalls));
    }
    Ok(answer)
}

/// The generated tokens without the end-of-generation ones.
fn answer_tokens(tokenizer: &Tokenizer, tokens: Vec<u32>) -> Vec<u32> {
    tokens
        .into_iter()
        .filter(|&t| !tokenizer.is_end_of_generation(t))
        .collect()
}

/// Greedy answer on the GPU in `mode`: a fresh cache for the prompt, then decoding; with
/// ShadowKV the last layer's hit rate per step.
fn gpu_answer(
    model: &GpuModel,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    max_new: usize,
    mode: &Mode,
) -> Result<Answer, Box<dyn std::error::Error>> {
    let mut sampler = Sampler::greedy();
    let is_end = |id: u32| tokenizer.is_end_of_generation(id);
    let mut hit_rates = Vec::new();
    let generation = match mode.shadowkv {
        None => {
            let mut cache = model.new_cache(&[(prompt.len() + max_new + 1) as u32])?;
            shadowkv_model::generate(
                |ids| prefill(model, &mut cache, 0, ids, None),
                prompt,
                &mut sampler,
                max_new,
                is_end,
                |_| Ok(()),
            )?
        }
        Some(params) => {
            let capacity = CacheCapacity::uniform(1, prompt.len(), max_new + 1);
            let mut shadow = model.new_shadow_cache(params, storage(mode)?, capacity)?;
            let mut hits = Vec::new();
            let generation = shadowkv_model::generate(
                |ids| {
                    if shadow.sequences().is_empty() {
                        let (_, logits) =
                            model.prefill_shadow(&mut shadow, ids, PREFILL_CHUNK, |_| {})?;
                        return Ok(logits);
                    }
                    let logits = model.decode_shadow(&mut shadow, ids)?;
                    if let Ok(stats) = shadow.cache().step_stats() {
                        hits.push(stats.hit_rate());
                    }
                    Ok(logits)
                },
                prompt,
                &mut sampler,
                max_new,
                is_end,
                |_| Ok(()),
            )?;
            // StepStats covers the last layer decoded: the other layers stay unmeasured.
            let layers = model.config.layers;
            hit_rates = vec![Summary::default(); layers];
            hit_rates[layers - 1] = Summary::of(&hits);
            generation
        }
    };
    Ok(Answer {
        tokens: answer_tokens(tokenizer, generation.tokens),
        hit_rates,
        recalls: Vec::new(),
    })
}

/// Loads the model for `gpu` (the GPU when given, else the CPU reference path).
pub fn load(
    source: &shadowkv_model::ModelSource,
    gpu: Option<shadowkv::Gpu>,
) -> Result<Runner, Box<dyn std::error::Error>> {
    Ok(match gpu {
        Some(gpu) => Runner::Gpu(Box::new(GpuModel::load(
            Arc::new(gpu),
            &source.config,
            &source.weights,
        )?)),
        None => {
            let weights = source.weights.load(&source.config, Ok)?;
            Runner::Cpu(Box::new(CpuModel::new(source.config.clone(), weights)))
        }
    })
}

/// Where ShadowKV keeps the values (`--values`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ValuesArg {
    /// Pinned host memory (ShadowKV's offload).
    Host,
    /// GPU memory.
    Gpu,
}

impl ValuesArg {
    pub fn name(self) -> &'static str {
        match self {
            ValuesArg::Host => "host",
            ValuesArg::Gpu => "gpu",
        }
    }
}
