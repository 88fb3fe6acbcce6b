//! The layer-wise ShadowKV prefill (`GpuModel::prefill_shadow`) against the all-layers route
//! it replaced (`prefill_shadow_all_layers`): the same last-token logits and the same later
//! greedy tokens on SmolLM2-135M-Instruct (fetched by tools/setup.sh) and on a synthetic
//! Llama-3-8B-shaped model; its measured peak GPU memory within the bound
//! (`PrefillMemory::layerwise`) and below the all-layers route's; and a prefill that fails
//! half-way leaves the cache as it was. Without a GPU every test here is reported as ignored
//! (see `run_gpu_tests`).
use std::sync::{Arc, Mutex};

use shadowkv::cache::{CacheCapacity, ShadowKvParams, ValueHome};
use shadowkv::Gpu;
use shadowkv_model::{GpuModel, GpuShadowCache, ModelConfig, ModelSource, Sampler};
use shadowkv_suite::{run_gpu_tests, shared_gpu};

fn main() {
    run_gpu_tests(&[
        (
            "gpu_layerwise_prefill_matches_all_layers_on_smollm2",
            matches_all_layers_on_smollm2,
        ),
        (
            "gpu_layerwise_prefill_matches_all_layers_on_a_synthetic_model",
            matches_all_layers_on_a_synthetic_model,
        ),
        ("gpu_layerwise_prefill_peak_within_bound", peak_within_bound),
        (
            "gpu_layerwise_prefill_failure_leaves_the_cache_usable",
            failure_leaves_the_cache_usable,
        ),
    ])
}

/// The tests measure device memory: one at a time, whatever the harness's thread count.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

fn smollm2() -> Result<(ModelSource, GpuModel), String> {
    let source = ModelSource::open(&shadowkv_model::builtin_model_path().map_err(s)?).map_err(s)?;
    // The harness's GPU is a process-wide static; the model shares it through an Arc of its own.
    let _ = shared_gpu()?;
    let gpu = Arc::new(Gpu::new(0).map_err(s)?);
    let model = GpuModel::load(gpu, &source.config, &source.weights).map_err(s)?;
    Ok((source, model))
}

/// Llama-3-8B's shape with `layers` layers and random weights (a small vocabulary keeps the
/// weights small).
fn synthetic(layers: usize) -> Result<GpuModel, String> {
    let _ = shared_gpu()?;
    let gpu = Arc::new(Gpu::new(0).map_err(s)?);
    let mut config = ModelConfig::named("llama-3-8b").map_err(s)?;
    config.layers = layers;
    config.vocab = 4096;
    GpuModel::synthetic(gpu, &config, 5).map_err(s)
}

fn text_prompt(source: &ModelSource, sentences: usize) -> Result<Vec<u32>, String> {
    let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    let text = format!(
        "Remember the number 68231.\n{}\nWhat number were you asked to remember?",
        filler.repeat(sentences)
    );
    source.prompt_tokens(&text, true).map_err(s)
}

fn random_prompt(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    // A fixed linear congruential sequence: the same prompt on every run.
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Which route a prefill takes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Route {
    Layerwise,
    AllLayers,
}

/// A prefill through `route` in a fresh cache, then `steps` greedy decode steps: the prefill's
/// logits and the greedy tokens.
fn prefill_and_decode(
    model: &GpuModel,
    route: Route,
    prompt: &[u32],
    pass_tokens: usize,
    params: ShadowKvParams,
    home: ValueHome,
    steps: usize,
) -> Result<(Vec<f32>, Vec<u32>), String> {
    let capacity = CacheCapacity::uniform(1, prompt.len(), steps);
    let mut shadow = model.new_shadow_cache(params, home, capacity).map_err(s)?;
    let logits = prefill(model, &mut shadow, route, prompt, pass_tokens)?;
    let mut token = Sampler::greedy().sample(&logits);
    let mut tokens = vec![token];
    for _ in 1..steps {
        token = model
            .decode_shadow_greedy(&mut shadow, &[token])
            .map_err(s)?[0];
        tokens.push(token);
    }
    Ok((logits, tokens))
}

fn prefill(
    model: &GpuModel,
    shadow: &mut GpuShadowCache,
    route: Route,
    prompt: &[u32],
    pass_tokens: usize,
) -> Result<Vec<f32>, String> {
    Ok(match route {
        Route::Layerwise => {
            model
                .prefill_shadow(shadow, prompt, pass_tokens, |_| {})
                .map_err(s)?
                .1
        }
        Route::AllLayers => {
            model
                .prefill_shadow_all_layers(shadow, prompt, pass_tokens, |_| {})
                .map_err(s)?
                .1
        }
    })
}

/// The two routes run the same kernels on the same passes, only in another order: their
/// logits must agree bit for bit, and so must the greedy tokens after them.
fn compare_routes(
    what: &str,
    model: &GpuModel,
    prompt: &[u32],
    pass_tokens: usize,
    params: ShadowKvParams,
    home: ValueHome,
    steps: usize,
) -> Result<(), String> {
    let run = |route| prefill_and_decode(model, route, prompt, pass_tokens, params, home, steps);
    let (layerwise_logits, layerwise_tokens) = run(Route::Layerwise)?;
    let (all_logits, all_tokens) = run(Route::AllLayers)?;
    let differ = layerwise_logits
        .iter()
        .zip(&all_logits)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    let largest = layerwise_logits
        .iter()
        .zip(&all_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "{what}: {} prompt tokens in passes of {pass_tokens}, values {home:?}: {differ} of {} logits differ (largest difference {largest}); greedy tokens layer-wise {layerwise_tokens:?}, all layers {all_tokens:?}",
        prompt.len(),
        all_logits.len()
    );
    if layerwise_logits.len() != all_logits.len() || differ > 0 {
        return Err(format!(
            "{what}: {differ} logits differ between the routes (largest difference {largest})"
        ));
    }
    if layerwise_tokens != all_tokens {
        return Err(format!(
            "{what}: greedy tokens {layerwise_tokens:?} after the layer-wise prefill, {all_tokens:?} after the all-layers one"
        ));
    }
    Ok(())
}

fn matches_all_layers_on_smollm2(_: &Gpu) -> Result<(), String> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (source, model) = smollm2()?;
    let prompt = text_prompt(&source, 60)?;
    let params = ShadowKvParams {
        sparse_budget: 256,
        outlier_chunks: 6,
        ..ShadowKvParams::default()
    };
    // Several passes (the last one shorter), and one pass over the whole prompt.
    for (pass_tokens, home) in [(500, ValueHome::Host), (prompt.len(), ValueHome::Device)] {
        compare_routes("SmolLM2", &model, &prompt, pass_tokens, params, home, 16)?;
    }
    Ok(())
}

fn matches_all_layers_on_a_synthetic_model(_: &Gpu) -> Result<(), String> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let model = synthetic(5)?;
    let prompt = random_prompt(6000, model.config.vocab, 1);
    compare_routes(
        "synthetic Llama-3-8B shape, 5 layers",
        &model,
        &prompt,
        2048,
        ShadowKvParams::default(),
        ValueHome::Host,
        8,
    )
}

/// A 16K-token prompt over 8 layers of Llama-3-8B's shape: the layer-wise prefill's measured
/// peak (cuMemGetInfo after every pass) stays within its bound; the all-layers route, run
/// after it, needs more.
fn peak_within_bound(_: &Gpu) -> Result<(), String> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let model = synthetic(8)?;
    let len = 16 * 1024;
    let prompt = random_prompt(len, model.config.vocab, 2);
    let capacity = CacheCapacity::uniform(1, len, 1);
    let mut shadow = model
        .new_shadow_cache(ShadowKvParams::default(), ValueHome::Host, capacity)
        .map_err(s)?;
    // A first, shorter prefill loads the kernels and grows the libraries' workspaces, which
    // then stay: the measured one sees only what a prefill holds.
    let (warm, _) = model
        .prefill_shadow(&mut shadow, &prompt[..4096], 2048, |_| {})
        .map_err(s)?;
    shadow.remove_sequence(model.gpu(), warm).map_err(s)?;
    let (id, _, layerwise) = model
        .prefill_shadow_measured(&mut shadow, &prompt, 2048, |_| {})
        .map_err(s)?;
    shadow.remove_sequence(model.gpu(), id).map_err(s)?;
    let (_, _, all_layers) = model
        .prefill_shadow_all_layers(&mut shadow, &prompt, 2048, |_| {})
        .map_err(s)?;
    eprintln!("layer-wise: {layerwise}\nall layers: {all_layers}");
    if layerwise.measured > layerwise.expected.bound() {
        return Err(format!(
            "the layer-wise prefill's peak {} is past its bound {}",
            layerwise.measured,
            layerwise.expected.bound()
        ));
    }
    // 8 layers' K/V and pre-RoPE keys at 16K tokens: 0.8 GB, against 0.13 GB of hidden
    // states and two layers' K/V.
    if all_layers.measured <= layerwise.measured {
        return Err(format!(
            "the all-layers route's peak {} is not above the layer-wise {}",
            all_layers.measured, layerwise.measured
        ));
    }
    Ok(())
}

/// A prefill stopped after a later layer's passes (the layer before it half-built) leaves the
/// cache as it was: the sequence gone, nothing pending, the other sequence decoding the tokens
/// it decodes alone, and the same prompt then prefilled to the logits a fresh cache gives.
fn failure_leaves_the_cache_usable(_: &Gpu) -> Result<(), String> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (source, model) = smollm2()?;
    let params = ShadowKvParams {
        sparse_budget: 256,
        outlier_chunks: 6,
        ..ShadowKvParams::default()
    };
    let (first, second) = (text_prompt(&source, 40)?, text_prompt(&source, 55)?);
    let steps = 8;
    let home = ValueHome::Host;
    let (_, alone) =
        prefill_and_decode(&model, Route::Layerwise, &first, 500, params, home, steps)?;
    let (second_logits, _) =
        prefill_and_decode(&model, Route::Layerwise, &second, 500, params, home, 1)?;
    let capacity = CacheCapacity {
        max_sequences: 2,
        max_prompt_len: first.len().max(second.len()),
        max_prompt_tokens: first.len() + second.len(),
        max_generated: steps,
    };
    let mut shadow = model.new_shadow_cache(params, home, capacity).map_err(s)?;
    let (_, logits) = model
        .prefill_shadow(&mut shadow, &first, 500, |_| {})
        .map_err(s)?;
    let mut tokens = vec![Sampler::greedy().sample(&logits)];
    let layers = model.config.layers;
    for (step, fail_at) in [0, layers / 2, layers - 1].into_iter().enumerate() {
        match model.prefill_shadow_failing_at_layer(&mut shadow, &second, 500, fail_at) {
            Ok(_) => return Err(format!("the prefill stopped at layer {fail_at} succeeded")),
            Err(error) => eprintln!("stopped at layer {fail_at}: {error}"),
        }
        if shadow.sequences().len() != 1 || shadow.cache().pending_prefill().is_some() {
            return Err(format!(
                "after a prefill stopped at layer {fail_at}: sequences {:?}, pending {:?}",
                shadow.sequences(),
                shadow.cache().pending_prefill()
            ));
        }
        if step + 1 < steps {
            let next = model
                .decode_shadow_greedy(&mut shadow, &[tokens[step]])
                .map_err(s)?;
            tokens.push(next[0]);
        }
    }
    // A token past the vocabulary is refused before anything is queued.
    let mut bad = second.clone();
    bad[10] = model.config.vocab as u32;
    if model.prefill_shadow(&mut shadow, &bad, 500, |_| {}).is_ok() {
        return Err("a token past the vocabulary was accepted".into());
    }
    let (_, logits) = model
        .prefill_shadow(&mut shadow, &second, 500, |_| {})
        .map_err(s)?;
    if logits
        .iter()
        .zip(&second_logits)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        return Err(
            "the second prompt's logits after the failures differ from a fresh cache's".into(),
        );
    }
    // Both sequences decode together; the first keeps the tokens it decodes alone.
    let mut next = vec![tokens[tokens.len() - 1], Sampler::greedy().sample(&logits)];
    while tokens.len() < steps {
        next = model.decode_shadow_greedy(&mut shadow, &next).map_err(s)?;
        tokens.push(next[0]);
    }
    if tokens != alone {
        return Err(format!(
            "the first sequence decoded {tokens:?} beside the failed prefills, {alone:?} alone"
        ));
    }
    Ok(())
}
