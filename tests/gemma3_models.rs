//! Gemma-3 on the GPU: the tiny random checkpoint (GGUF and safetensors, heads of 64 and of
//! Gemma's 256) against the CPU path, past its sliding window in the prompt and in decoding;
//! and Gemma-3-270M (`tools/setup.sh gemma3-270m` on the GPU host, or the file in
//! `$SHADOWKV_CACHE`) finding a pass key at 8K, 16K and 30K tokens with ShadowKV at budgets
//! 512, 1024 and 2048 as full attention does. Without a GPU every test here is reported as
//! ignored (see `run_gpu_tests`).
use shadowkv::cache::{CacheCapacity, ShadowKvParams, ValueHome};
use shadowkv::reference::relative_error;
use shadowkv::Gpu;
use shadowkv_model::family_fixtures::TinyCheckpoint;
use shadowkv_model::gpu::step_inputs::StepLimits;
use shadowkv_model::gpu::{DecodeRunner, StepMode};
use shadowkv_model::weights::SafetensorsFiles;
use shadowkv_model::{
    Backend, CacheMode, CpuModel, GgufFile, GpuBackend, GpuModel, GpuServeCapacity, GpuShadowCache,
    ModelConfig, RequestId, Sampler, Tokenizer, WeightFile,
};
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
            "gpu_gemma3_shadowkv_graph_replayed_step_matches_decode_shadow",
            gemma3_shadowkv_graph_step,
        ),
        (
            "gpu_gemma3_shadowkv_subset_steps_and_the_scheduler_match_decode_shadow",
            gemma3_shadowkv_serving,
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

/// A ShadowKV cache of the tiny Gemma-3 holding `prompts` (prefilled one by one), and each
/// prompt's first greedy token.
fn gemma3_shadow_cache(
    model: &GpuModel,
    prompts: &[Vec<u32>],
    params: ShadowKvParams,
    steps: usize,
) -> Result<(GpuShadowCache, Vec<u32>), String> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = CacheCapacity {
        max_sequences: prompts.len(),
        max_prompt_len: longest,
        max_prompt_tokens: prompts.iter().map(Vec::len).sum(),
        max_generated: steps + 1,
    };
    let mut shadow = model
        .new_shadow_cache(params, ValueHome::Host, capacity)
        .map_err(s)?;
    let mut first = Vec::new();
    for prompt in prompts {
        let (_, logits) = model
            .prefill_shadow(&mut shadow, prompt, 64, |_| {})
            .map_err(s)?;
        first.push(Sampler::greedy().sample(&logits));
    }
    Ok((shadow, first))
}

/// The graph-replayed ShadowKV step (`decode_shadow_step`, local layers in slots of their own
/// read through the step's input block) on the tiny Gemma-3, three prompts of different
/// lengths with a budget below the prompts (a sparse step), 24 steps fed the same tokens as
/// the single-prompt path (`decode_shadow`): graph replay and the runner's eager steps give
/// the same tokens, and those are `decode_shadow`'s greedy tokens up to near-ties (the
/// runner plans the windowed attention at the slots' capacities, so its sums split
/// differently).
fn gemma3_shadowkv_graph_step(_: &Gpu) -> Result<(), String> {
    for head_dim in [64, 256] {
        let checkpoint = TinyCheckpoint::gemma3(59, head_dim);
        let name = format!("tiny-gemma3-d{head_dim}.gguf");
        let file = GgufFile::parse(name.clone(), checkpoint.gguf_bytes(&[])).map_err(s)?;
        let config = ModelConfig::from_gguf(&file).map_err(s)?;
        let model = gpu_model(&config, &WeightFile::Gguf(file))?;
        let params = ShadowKvParams {
            chunk_size: 8,
            sparse_budget: 64,
            rank: config.kv_dim().min(256) / 16 * 16,
            local_chunks: 2,
            outlier_chunks: 4,
        };
        let prompts: Vec<Vec<u32>> = [200u32, 233, 264]
            .iter()
            .map(|&len| {
                (0..len)
                    .map(|i| (i * 37 + len) % config.vocab as u32)
                    .collect()
            })
            .collect();
        let steps = 24;
        let (mut graph_cache, first) = gemma3_shadow_cache(&model, &prompts, params, steps)?;
        let (mut eager_cache, _) = gemma3_shadow_cache(&model, &prompts, params, steps)?;
        let (mut reference, _) = gemma3_shadow_cache(&model, &prompts, params, steps)?;
        let mut graph = DecodeRunner::new(StepMode::Graph, StepLimits::default());
        let mut eager = DecodeRunner::new(StepMode::Eager, StepLimits::default());
        let (mut input, mut near_ties) = (first, 0);
        let vocab = config.vocab;
        for step in 0..steps {
            let replayed = model
                .decode_shadow_step(&mut graph, &mut graph_cache, &input)
                .map_err(|e| format!("{name}, step {step}, graph: {e}"))?;
            let launched = model
                .decode_shadow_step(&mut eager, &mut eager_cache, &input)
                .map_err(|e| format!("{name}, step {step}, eager: {e}"))?;
            if replayed != launched {
                return Err(format!(
                    "{name}, step {step}: graph replay gives {replayed:?}, eager steps {launched:?}"
                ));
            }
            let logits = model
                .decode_shadow(&mut reference, &input)
                .map_err(|e| format!("{name}, step {step}, decode_shadow: {e}"))?;
            let mut next = Vec::new();
            for (b, row) in logits.chunks(vocab).enumerate() {
                let expected = Sampler::greedy().sample(row);
                let got = replayed[b];
                if got != expected {
                    let margin = row[expected as usize] - row[got as usize];
                    if margin > NEAR_TIE {
                        return Err(format!(
                            "{name}, step {step}, sequence {b}: the graph-replayed step picked {got}, decode_shadow {expected}, {margin:.3} apart"
                        ));
                    }
                    near_ties += 1;
                }
                next.push(expected);
            }
            input = next;
        }
        if !graph.capture_errors().is_empty() {
            return Err(format!(
                "{name}: captures failed: {:?}",
                graph.capture_errors()
            ));
        }
        if graph.captures() != 1 || graph.replays() != steps - 1 {
            return Err(format!(
                "{name}: {} captures and {} replays over {steps} steps; expected 1 and {}",
                graph.captures(),
                graph.replays(),
                steps - 1
            ));
        }
        eprintln!(
            "{name}: graph-replayed ShadowKV steps against decode_shadow over {steps} steps of 3 sequences: {near_ties} near-ties"
        );
        if near_ties > 3 {
            return Err(format!("{name}: {near_ties} near-ties in {steps} steps"));
        }
    }
    Ok(())
}

/// The worst relative error between two rows of logits.
fn logits_error(a: &[f32], b: &[f32]) -> f64 {
    let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    relative_error(&widen(a), &widen(b))
}

/// Serving the tiny Gemma-3 in ShadowKV mode, against `decode_shadow` over a cache built from
/// the same prompts: subset steps (`decode_shadow_for`, the two sequences in reversed order,
/// then one alone) with a sparse budget give its logits row for row; the scheduler's backend
/// (each prompt through the full cache, the shadows and the local layers' slots built from
/// the block) with a whole budget gives its logits within bf16 range over 6 steps.
fn gemma3_shadowkv_serving(_: &Gpu) -> Result<(), String> {
    for head_dim in [64, 256] {
        let checkpoint = TinyCheckpoint::gemma3(61, head_dim);
        let name = format!("tiny-gemma3-d{head_dim}.gguf");
        let file = GgufFile::parse(name.clone(), checkpoint.gguf_bytes(&[])).map_err(s)?;
        let config = ModelConfig::from_gguf(&file).map_err(s)?;
        let model = gpu_model(&config, &WeightFile::Gguf(file))?;
        let vocab = config.vocab;
        let rank = config.kv_dim().min(256) / 16 * 16;
        let prompts: Vec<Vec<u32>> = [224u32, 237]
            .iter()
            .map(|&len| (0..len).map(|i| (i * 41 + len) % vocab as u32).collect())
            .collect();
        let steps = 6;
        let capacity = CacheCapacity {
            max_sequences: 2,
            max_prompt_len: 237,
            max_prompt_tokens: 224 + 237,
            max_generated: steps + 2,
        };
        // Subset steps with a sparse budget.
        let sparse = ShadowKvParams {
            chunk_size: 8,
            sparse_budget: 64,
            rank,
            local_chunks: 2,
            outlier_chunks: 4,
        };
        let cache = || {
            model
                .new_shadow_cache(sparse, ValueHome::Host, capacity)
                .map_err(s)
        };
        let (mut whole, mut subset) = (cache()?, cache()?);
        let (mut ids, mut next) = (Vec::new(), Vec::new());
        for prompt in &prompts {
            let (_, logits) = model
                .prefill_shadow(&mut whole, prompt, 64, |_| {})
                .map_err(s)?;
            let (id, _) = model
                .prefill_shadow(&mut subset, prompt, 64, |_| {})
                .map_err(s)?;
            ids.push(id);
            next.push(Sampler::greedy().sample(&logits));
        }
        let mut worst = 0.0f64;
        for step in 0..steps {
            let together = model.decode_shadow(&mut whole, &next).map_err(s)?;
            let reversed = model
                .decode_shadow_for(&mut subset, &[(ids[1], next[1]), (ids[0], next[0])])
                .map_err(|e| format!("{name}, subset step {step}: {e}"))?;
            for b in 0..2 {
                let mine = &reversed[(1 - b) * vocab..(2 - b) * vocab];
                let error = logits_error(mine, &together[b * vocab..(b + 1) * vocab]);
                worst = worst.max(error);
                if error > 1e-2 {
                    return Err(format!(
                        "{name}, subset step {step}, sequence {b}: relative error {error:.3e} against decode_shadow"
                    ));
                }
            }
            next = together
                .chunks_exact(vocab)
                .map(|row| Sampler::greedy().sample(row))
                .collect();
        }
        // One sequence alone: its slot advances, the other's stays.
        let before = subset.lens();
        model
            .decode_shadow_for(&mut subset, &[(ids[0], next[0])])
            .map_err(s)?;
        if subset.lens() != [before[0] + 1, before[1]] {
            return Err(format!(
                "{name}: a step of the first sequence moved the lengths from {before:?} to {:?}",
                subset.lens()
            ));
        }
        eprintln!("{name}: subset steps against decode_shadow: worst relative error {worst:.3e}");

        // The scheduler's backend with a whole budget (24 chunks: 8 outliers and 16 selected).
        let whole_budget = ShadowKvParams {
            chunk_size: 8,
            sparse_budget: 128,
            rank,
            local_chunks: 4,
            outlier_chunks: 8,
        };
        let mut reference = model
            .new_shadow_cache(whole_budget, ValueHome::Host, capacity)
            .map_err(s)?;
        let serve_capacity = GpuServeCapacity {
            max_sequences: 2,
            max_tokens: 237 + steps + 2,
            max_generated: steps + 2,
        };
        let mut backend = GpuBackend::new(
            &model,
            serve_capacity,
            Some((whole_budget, ValueHome::Host)),
        )
        .map_err(s)?;
        let mut next = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            let (_, expected) = model
                .prefill_shadow(&mut reference, prompt, 64, |_| {})
                .map_err(s)?;
            let id = RequestId(i as u64);
            backend
                .add_sequence(id, CacheMode::ShadowKv(whole_budget), None)
                .map_err(s)?;
            let logits = backend.prefill(id, prompt).map_err(s)?;
            backend
                .finish_prompt(id)
                .map_err(|e| format!("{name}, building sequence {i}'s shadow: {e}"))?;
            let error = logits_error(&logits, &expected);
            if error > LOGIT_TOLERANCE {
                return Err(format!(
                    "{name}, prompt {i}: the backend's prefill logits {error:.3e} from prefill_shadow's"
                ));
            }
            next.push(Sampler::greedy().sample(&expected));
        }
        let mut worst = 0.0f64;
        for step in 0..steps {
            let expected = model.decode_shadow(&mut reference, &next).map_err(s)?;
            let batch = [(RequestId(1), next[1]), (RequestId(0), next[0])];
            let served = backend
                .decode(&batch)
                .map_err(|e| format!("{name}, served step {step}: {e}"))?;
            for (row, &(RequestId(i), _)) in served.iter().zip(&batch) {
                let i = i as usize;
                let error = logits_error(row, &expected[i * vocab..(i + 1) * vocab]);
                worst = worst.max(error);
                if error > LOGIT_TOLERANCE {
                    return Err(format!(
                        "{name}, served step {step}, sequence {i}: relative error {error:.3e} against decode_shadow"
                    ));
                }
            }
            next = expected
                .chunks_exact(vocab)
                .map(|row| Sampler::greedy().sample(row))
                .collect();
        }
        eprintln!(
            "{name}: the scheduler's ShadowKV steps against decode_shadow: worst relative error {worst:.3e}"
        );
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
