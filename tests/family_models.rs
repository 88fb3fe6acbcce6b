//! Each family's GPU model (Llama, Qwen2 with QKV bias, GLM-4 with fused QKV and bias, RoPE
//! on half of each head in adjacent pairs, Phi-3 with fused QKV and gate/up and LongRoPE)
//! against its CPU path, on the tiny random checkpoints of `family_fixtures` loaded through
//! the family's own files (GGUF, and Hugging Face safetensors for GLM-4 and Phi-3).
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use std::sync::Arc;

use shadowkv::cache::{CacheCapacity, ShadowKvParams, ValueHome};
use shadowkv::reference::relative_error;
use shadowkv::Gpu;
use shadowkv_model::family_fixtures::TinyCheckpoint;
use shadowkv_model::weights::SafetensorsFiles;
use shadowkv_model::{
    Architecture, CpuCache, CpuModel, GgufFile, GpuModel, ModelConfig, Sampler, WeightFile,
};
use shadowkv_suite::{run_gpu_tests, shared_gpu};

fn main() {
    run_gpu_tests(&[
        (
            "gpu_family_models_match_cpu_path_from_gguf",
            families_from_gguf,
        ),
        (
            "gpu_family_models_match_cpu_path_from_safetensors",
            families_from_safetensors,
        ),
        (
            "gpu_family_shadowkv_with_a_whole_budget_matches_full_attention",
            families_shadowkv_whole_budget,
        ),
    ])
}

fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

const FAMILIES: [Architecture; 4] = [
    Architecture::Llama,
    Architecture::Qwen2,
    Architecture::ChatGlm,
    Architecture::Phi3,
];

/// Most logits relative error per step: the bf16 activations of the GPU path against the CPU
/// path's f32 on the same (bf16-exact) weights.
const LOGIT_TOLERANCE: f64 = 2e-2;

/// Two candidates closer than this (in logits) on the CPU path may swap on the GPU path.
const NEAR_TIE: f32 = 0.05;

fn gpu_model(config: &ModelConfig, weights: &WeightFile) -> Result<GpuModel, String> {
    // The harness's GPU is a process-wide static; the model shares it through an Arc of its own.
    let _ = shared_gpu()?;
    let gpu = Arc::new(Gpu::new(0).map_err(s)?);
    GpuModel::load(gpu, config, weights).map_err(s)
}

/// 32 greedy steps after a prompt, both paths fed the CPU path's tokens: each step's logits
/// within [`LOGIT_TOLERANCE`], the same greedy token unless the CPU path's top two are a
/// near-tie; errors if more than 2 of the 32 steps are near-ties (the test would then show
/// little).
fn compare(
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

fn families_from_gguf(_: &Gpu) -> Result<(), String> {
    for family in FAMILIES {
        let checkpoint = TinyCheckpoint::new(family, 41);
        let name = format!("tiny-{}.gguf", checkpoint.gguf_architecture());
        let file = GgufFile::parse(name.clone(), checkpoint.gguf_bytes(&[])).map_err(s)?;
        let config = ModelConfig::from_gguf(&file).map_err(s)?;
        let weights = WeightFile::Gguf(file);
        let cpu = CpuModel::new(config.clone(), weights.load(&config, Ok).map_err(s)?);
        compare(&name, &config, &weights, &cpu)?;
    }
    Ok(())
}

fn families_from_safetensors(_: &Gpu) -> Result<(), String> {
    for family in [Architecture::ChatGlm, Architecture::Phi3] {
        let checkpoint = TinyCheckpoint::new(family, 43);
        let dir = std::env::temp_dir().join(format!(
            "shadowkv-family-models-{}-{family:?}",
            std::process::id()
        ));
        checkpoint.write_hf(&dir, &[]).map_err(s)?;
        let config = ModelConfig::from_hf_config(&dir.join("config.json")).map_err(s)?;
        let weights = WeightFile::Safetensors(SafetensorsFiles::open(&dir).map_err(s)?);
        let cpu = CpuModel::new(config.clone(), weights.load(&config, Ok).map_err(s)?);
        let result = compare(&format!("{family:?} safetensors"), &config, &weights, &cpu);
        let _ = std::fs::remove_dir_all(&dir);
        result?;
    }
    Ok(())
}

/// In each family, ShadowKV on the GPU with every chunk selected and the whole key width as
/// the rank against the GPU's full attention, both fed full attention's greedy tokens: each
/// step's logits within [`LOGIT_TOLERANCE`] and the same greedy token unless a near-tie (the
/// key rebuild and landmark scoring apply GLM-4's partial adjacent rotary and Phi-3's
/// LongRoPE as the forward pass does; the CPU test of the same name checks the reference).
fn families_shadowkv_whole_budget(_: &Gpu) -> Result<(), String> {
    for family in FAMILIES {
        let checkpoint = TinyCheckpoint::new(family, 47);
        let name = format!("tiny-{}.gguf", checkpoint.gguf_architecture());
        let file = GgufFile::parse(name.clone(), checkpoint.gguf_bytes(&[])).map_err(s)?;
        let config = ModelConfig::from_gguf(&file).map_err(s)?;
        let model = gpu_model(&config, &WeightFile::Gguf(file))?;
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
            .prefill_shadow(&mut shadow, &prompt, 1000, |_| {})
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
    }
    Ok(())
}
