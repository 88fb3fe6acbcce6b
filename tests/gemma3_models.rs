//! Gemma-3 on the GPU: the tiny random checkpoint (GGUF and safetensors, heads of 64 and of
//! Gemma's 256) against the CPU path, past its sliding window in the prompt and in decoding;
//! and Gemma-3-270M (`tools/setup.sh gemma3-270m` on the GPU host, or the file in
//! `$SHADOWKV_CACHE`) finding a pass key at 8K, 16K and 30K tokens with ShadowKV at budgets
//! 512, 1024 and 2048 as full attention does. Without a GPU every test here is reported as
//! ignored (see `run_gpu_tests`).
use shadowkv::cache::{CacheCapacity, ShadowKvParams, ValueHome};
use shadowkv::Gpu;
use shadowkv_model::family_fixtures::TinyCheckpoint;
use shadowkv_model::weights::SafetensorsFiles;
use shadowkv_model::{CpuModel, GgufFile, GpuModel, ModelConfig, Sampler, Tokenizer, WeightFile};
use shadowkv_suite::run_gpu_tests;

#[path = "families/support.rs"]
mod support;

use support::*;

fn main() {
    run_gpu_tests(&[
        (
            "gpu_gemma3_matches_cpu_path_past_the_window",
            gemma3_matches_cpu_path,
        ),
        (
            "gpu_gemma3_shadowkv_with_a_whole_budget_matches_full_attention",
            gemma3_shadowkv_whole_budget,
        ),
        (
            "gpu_gemma3_270m_shadowkv_passkey_answers_as_full_attention",
            gemma3_270m_passkey,
        ),
    ])
}

/// The GPU path against the CPU path (a 24-token prompt: the tiny model's window is 5).
fn compare_with_cpu(what: &str, config: &ModelConfig, weights: &WeightFile) -> Result<(), String> {
    let cpu = CpuModel::new(config.clone(), weights.load(config, Ok).map_err(s)?);
    compare(what, config, weights, &cpu)
}

/// The tiny Gemma-3 from GGUF and from safetensors, heads of 64 and 256: the scaled
/// embedding, QK norm, the local layers' window and RoPE base, the post norms and GeGLU on the
/// GPU give the CPU path's logits, in the tiled prefill and in decode steps.
fn gemma3_matches_cpu_path(_: &Gpu) -> Result<(), String> {
    for head_dim in [64, 256] {
        let checkpoint = TinyCheckpoint::gemma3(47, head_dim);
        let name = format!("tiny-gemma3-d{head_dim}.gguf");
        let file = GgufFile::parse(name.clone(), checkpoint.gguf_bytes(&[])).map_err(s)?;
        let config = ModelConfig::from_gguf(&file).map_err(s)?;
        compare_with_cpu(&name, &config, &WeightFile::Gguf(file))?;
        let dir = std::env::temp_dir().join(format!(
            "shadowkv-gemma3-models-{}-{head_dim}",
            std::process::id()
        ));
        checkpoint.write_hf(&dir, &[]).map_err(s)?;
        let config = ModelConfig::from_hf_config(&dir.join("config.json")).map_err(s)?;
        let weights = WeightFile::Safetensors(SafetensorsFiles::open(&dir).map_err(s)?);
        let result = compare_with_cpu(&dir.display().to_string(), &config, &weights);
        let _ = std::fs::remove_dir_all(&dir);
        result?;
    }
    Ok(())
}

/// ShadowKV on the global layer with the whole budget and full rank (the local layers keep
/// their window exact, in slots of their own) against full attention over a 224-token prompt
/// and 24 steps: logits within bf16 range, the same greedy tokens up to near-ties.
fn gemma3_shadowkv_whole_budget(_: &Gpu) -> Result<(), String> {
    for head_dim in [64, 256] {
        let checkpoint = TinyCheckpoint::gemma3(53, head_dim);
        let name = format!("tiny-gemma3-d{head_dim}.gguf");
        let file = GgufFile::parse(name.clone(), checkpoint.gguf_bytes(&[])).map_err(s)?;
        let config = ModelConfig::from_gguf(&file).map_err(s)?;
        let model = gpu_model(&config, &WeightFile::Gguf(file))?;
        shadowkv_whole_budget_matches_full_attention(&name, &config, &model, 100)?;
    }
    Ok(())
}

const PASS_KEY: &str = "68231";

/// Gemma-3-270M's pass-key prompt of about `tokens` tokens, the key at `depth`: `<bos>`, then
/// plain text (the base model has no chat template).
fn passkey_prompt(tokenizer: &Tokenizer, tokens: usize, depth: f64) -> Result<Vec<u32>, String> {
    let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    let per_filler = tokenizer.encode(filler).map_err(s)?.len();
    let repeats = tokens.saturating_sub(64) / per_filler;
    let cut = (repeats as f64 * depth) as usize;
    let text = format!(
        "There is a pass key hidden in the following text. Find it and remember it.\n{}The pass key is {PASS_KEY}. Remember it. {PASS_KEY} is the pass key.\n{}\nWhat is the pass key? The pass key is",
        filler.repeat(cut),
        filler.repeat(repeats - cut)
    );
    let mut ids: Vec<u32> = tokenizer.bos_id().into_iter().collect();
    ids.extend(tokenizer.encode(&text).map_err(s)?);
    Ok(ids)
}

/// Greedy tokens with full attention on the GPU.
fn full_greedy(model: &GpuModel, prompt: &[u32], steps: usize) -> Result<Vec<u32>, String> {
    let mut cache = model
        .new_cache(&[(prompt.len() + steps) as u32])
        .map_err(s)?;
    let mut tokens = model
        .forward_greedy(&mut cache, &vec![0; prompt.len()], prompt)
        .map_err(s)?;
    for _ in 1..steps {
        let last = *tokens.last().ok_or("no token")?;
        tokens.extend(model.forward_greedy(&mut cache, &[0], &[last]).map_err(s)?);
    }
    Ok(tokens)
}

/// Greedy tokens with ShadowKV on the global layers (the local layers keep their window
/// exact), values on the host.
fn shadow_greedy(
    model: &GpuModel,
    prompt: &[u32],
    steps: usize,
    params: ShadowKvParams,
) -> Result<Vec<u32>, String> {
    let capacity = CacheCapacity::uniform(1, prompt.len(), steps);
    let mut shadow = model
        .new_shadow_cache(params, ValueHome::Host, capacity)
        .map_err(s)?;
    let (_, logits) = model
        .prefill_shadow(&mut shadow, prompt, 4096, |_| {})
        .map_err(s)?;
    let mut tokens = vec![Sampler::greedy().sample(&logits)];
    for _ in 1..steps {
        let last = *tokens.last().ok_or("no token")?;
        tokens.extend(
            model
                .decode_shadow_greedy(&mut shadow, &[last])
                .map_err(s)?,
        );
    }
    Ok(tokens)
}

/// Gemma-3-270M (32K-token context) with a pass key at 8K, 16K and 30K tokens: full attention
/// finds it, and ShadowKV at budgets 512, 1024 and 2048 answers with the key too.
fn gemma3_270m_passkey(_: &Gpu) -> Result<(), String> {
    let path = shadowkv_model::gemma3_270m_path().ok_or_else(|| {
        format!(
            "{} is not in the cache folder ({}): run tools/setup.sh gemma3-270m on this host, \
             or copy the file there (SHADOWKV_CACHE names another folder)",
            shadowkv_model::GEMMA3_270M_FILE,
            shadowkv_model::cache_dir().display()
        )
    })?;
    let file = GgufFile::open(&path).map_err(s)?;
    let config = ModelConfig::from_gguf(&file).map_err(s)?;
    let tokenizer = Tokenizer::from_gguf(&file).map_err(s)?;
    let model = gpu_model(&config, &WeightFile::Gguf(file))?;
    let steps = 8;
    for (tokens, depth) in [(8192, 0.5), (16_384, 0.3), (30_000, 0.7)] {
        let prompt = passkey_prompt(&tokenizer, tokens, depth)?;
        let full = tokenizer
            .decode(&full_greedy(&model, &prompt, steps)?)
            .map_err(s)?;
        eprintln!(
            "{} prompt tokens, key at {:.0}%: full attention {full:?}",
            prompt.len(),
            depth * 100.0
        );
        if !full.contains(PASS_KEY) {
            return Err(format!(
                "{} tokens: full attention missed the key: {full:?}",
                prompt.len()
            ));
        }
        for budget in [512, 1024, 2048] {
            let params = ShadowKvParams {
                sparse_budget: budget,
                outlier_chunks: (24 * budget / 1024).max(1),
                ..ShadowKvParams::default()
            };
            let answer = tokenizer
                .decode(&shadow_greedy(&model, &prompt, steps, params)?)
                .map_err(s)?;
            eprintln!("  ShadowKV budget {budget}: {answer:?}");
            if !answer.contains(PASS_KEY) {
                return Err(format!(
                    "{} tokens, budget {budget}: ShadowKV answered {answer:?}, full attention {full:?}",
                    prompt.len()
                ));
            }
        }
    }
    Ok(())
}
