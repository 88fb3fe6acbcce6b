//! What the model-family GPU tests share: the GPU model of a checkpoint, the GPU path against
//! the CPU path, and ShadowKV with a whole budget against full attention.
use std::sync::Arc;

use shadowkv::cache::{CacheCapacity, ShadowKvParams, ValueHome};
use shadowkv::reference::relative_error;
use shadowkv::Gpu;
use shadowkv_model::{CpuCache, CpuModel, GpuModel, ModelConfig, Sampler, WeightFile};
use shadowkv_suite::shared_gpu;

pub fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

/// Most logits relative error per step: the bf16 activations of the GPU path against the CPU
/// path's f32 on the same (bf16-exact) weights.
pub const LOGIT_TOLERANCE: f64 = 2e-2;

/// Two candidates closer than this (in logits) on the CPU path may swap on the GPU path.
pub const NEAR_TIE: f32 = 0.05;

pub fn gpu_model(config: &ModelConfig, weights: &WeightFile) -> Result<GpuModel, String> {
    // The harness's GPU is a process-wide static; the model shares it through an Arc of its own.
    let _ = shared_gpu()?;
    let gpu = Arc::new(Gpu::new(0).map_err(s)?);
    GpuModel::load(gpu, config, weights).map_err(s)
}

/// 32 greedy steps after a prompt, both paths fed the CPU path's tokens: each step's logits
/// within [`LOGIT_TOLERANCE`], the same greedy token unless the CPU path's top two are a
/// near-tie; errors if more than 2 of the 32 steps are near-ties (the test would then show
/// little).
pub fn compare(
    what: &str,
    config: &ModelConfig,
    weights: &WeightFile,
    cpu: &CpuModel,
) -> Result<(), String> {
    let model = gpu_model(config, weights)?;
    let prompt: Vec<u32> = (0..24)
        .map(|i| (i * 37 + 5) % config.vocab as u32)
        .collect();
    let steps = 32;
    let mut cache = model
        .new_cache(&[(prompt.len() + steps) as u32])
        .map_err(s)?;
    let mut cpu_cache = CpuCache::new(config);
    let (mut input, mut worst, mut near_ties) = (prompt.clone(), 0.0f64, 0);
    let mut tokens = Vec::new();
    for step in 0..steps {
        let gpu_logits = model
            .forward(&mut cache, &vec![0; input.len()], &input)
            .map_err(s)?;
        let cpu_logits = cpu.forward(&mut cpu_cache, &input).map_err(s)?;
        let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let error = relative_error(&widen(&gpu_logits), &widen(&cpu_logits));
        worst = worst.max(error);
        if error > LOGIT_TOLERANCE {
            return Err(format!(
                "{what}, step {step}: logits relative error {error:.3e} (at most {LOGIT_TOLERANCE:.0e})"
            ));
        }
        let (g, c) = (
            Sampler::greedy().sample(&gpu_logits),
            Sampler::greedy().sample(&cpu_logits),
        );
        if g != c {
            let margin = cpu_logits[c as usize] - cpu_logits[g as usize];
            if margin > NEAR_TIE {
                return Err(format!(
                    "{what}, step {step}: GPU picked {g}, CPU {c}, {margin:.3} apart on the CPU path (not a near-tie)"
                ));
            }
            near_ties += 1;
        }
        tokens.push(c);
        input = vec![c];
    }
    eprintln!(
        "{what}: {steps} greedy steps, worst logits relative error {worst:.3e}, {near_ties} near-ties; tokens {tokens:?}"
    );
    if near_ties > 2 {
        return Err(format!("{what}: {near_ties} near-ties in {steps} steps"));
    }
    Ok(())
}

/// ShadowKV on the GPU with every chunk selected and the whole key width as the rank against
/// the GPU's full attention over a 224-token prompt, both fed full attention's greedy tokens
/// for 24 steps: each step's logits within [`LOGIT_TOLERANCE`] and the same greedy token
/// unless a near-tie (at most 2); the prompt is prefilled in pieces of `prefill_chunk`.
pub fn shadowkv_whole_budget_matches_full_attention(
    name: &str,
    config: &ModelConfig,
    model: &GpuModel,
    prefill_chunk: usize,
) -> Result<(), String> {
    // 28 chunks of 8: 4 local, 8 outliers and a budget of the other 16.
    let (chunk_size, local_chunks, outlier_chunks) = (8, 4, 8);
    let prompt: Vec<u32> = (0..224u32)
        .map(|i| (i * 37 + 11) % config.vocab as u32)
        .collect();
    let chunks = (prompt.len() / chunk_size - local_chunks) / 8 * 8;
    let params = ShadowKvParams {
        chunk_size,
        sparse_budget: (chunks - outlier_chunks) * chunk_size,
        rank: config.kv_dim().min(256) / 16 * 16,
        local_chunks,
        outlier_chunks,
    };
    let steps = 24;
    let mut full = model
        .new_cache(&[(prompt.len() + steps) as u32])
        .map_err(s)?;
    let mut full_logits = model
        .forward(&mut full, &vec![0; prompt.len()], &prompt)
        .map_err(s)?;
    let capacity = CacheCapacity::uniform(1, prompt.len(), steps);
    let mut shadow = model
        .new_shadow_cache(params, ValueHome::Device, capacity)
        .map_err(s)?;
    let (_, mut shadow_logits) = model
        .prefill_shadow(&mut shadow, &prompt, prefill_chunk, |_| {})
        .map_err(s)?;
    let (mut worst, mut near_ties) = (0.0f64, 0);
    for step in 0..steps {
        let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let error = relative_error(&widen(&shadow_logits), &widen(&full_logits));
        worst = worst.max(error);
        if error > LOGIT_TOLERANCE {
            return Err(format!(
                "{name}, step {step}: ShadowKV's logits {error:.3e} from full attention's"
            ));
        }
        let (full_token, shadow_token) = (
            Sampler::greedy().sample(&full_logits),
            Sampler::greedy().sample(&shadow_logits),
        );
        if full_token != shadow_token {
            let margin = full_logits[full_token as usize] - full_logits[shadow_token as usize];
            if margin > NEAR_TIE {
                return Err(format!(
                    "{name}, step {step}: ShadowKV picked {shadow_token}, full attention {full_token}, {margin:.3} apart"
                ));
            }
            near_ties += 1;
        }
        full_logits = model.forward(&mut full, &[0], &[full_token]).map_err(s)?;
        shadow_logits = model.decode_shadow(&mut shadow, &[full_token]).map_err(s)?;
    }
    eprintln!(
        "{name}: ShadowKV ({params:?}) against full attention over {steps} steps: worst logits relative error {worst:.3e}, {near_ties} near-ties"
    );
    if near_ties > 2 {
        return Err(format!("{name}: {near_ties} near-ties in {steps} steps"));
    }
    Ok(())
}
