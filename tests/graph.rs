//! GPU tests of decode steps replayed from CUDA graphs (`DecodeRunner`): over 64 greedy steps,
//! graph replay gives the same tokens as the same steps launched eagerly, in full attention
//! and both ShadowKV modes (values on the host, values on the GPU), on a small synthetic model
//! and on the built-in SmolLM2 if present, and with SYNTHETIC SELECTION (scripted hits); the
//! eager steps (per-step inputs in device memory) give today's tokens (`decode_shadow_greedy`;
//! full attention, whose runner plans the attention at the capacity, agrees with
//! `forward_greedy` step by step); a batch shape change captures again; a batch past the
//! captured shapes is a typed error that leaves the model and the cache usable. Without a GPU
//! every test here is reported as ignored (see `run_gpu_tests`).
use std::sync::Arc;

use shadowkv::cache::{CacheCapacity, ShadowKvParams, ValueHome};
use shadowkv::{Gpu, RopeConfig};
use shadowkv_model::gpu::step_inputs::StepLimits;
use shadowkv_model::gpu::{DecodeRunner, StepMode};
use shadowkv_model::{
    Architecture, Error, GpuKvCache, GpuModel, GpuShadowCache, ModelConfig, ModelSource, Sampler,
};
use shadowkv_suite::{run_gpu_tests, shared_gpu};

fn main() {
    run_gpu_tests(&[
        (
            "graph_replay_matches_eager_steps_full_attention",
            full_attention,
        ),
        (
            "graph_replay_matches_eager_steps_shadowkv_values_on_host",
            shadowkv_host,
        ),
        (
            "graph_replay_matches_eager_steps_shadowkv_values_on_gpu",
            shadowkv_device,
        ),
        (
            "graph_replay_matches_eager_steps_with_synthetic_selection",
            scripted_selection,
        ),
        ("graph_replay_matches_eager_steps_on_smollm2", smollm2),
        ("a_batch_shape_change_captures_again", shape_change),
        (
            "a_batch_past_the_captured_shapes_is_an_error_that_leaves_the_model_usable",
            past_captured_shapes,
        ),
    ])
}

fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

/// Greedy steps per comparison.
const STEPS: usize = 64;

/// A small Llama-shaped model: 2 layers, GQA group 2, head_dim 64.
fn small_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        layers: 2,
        hidden: 256,
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
        ffn: 512,
        vocab: 1000,
        rms_eps: 1e-5,
        rope: RopeConfig::LLAMA_3,
        context_length: 8192,
        tied_embeddings: false,
        block: shadowkv_model::BlockOptions::LLAMA,
    }
}

fn small_model() -> Result<GpuModel, String> {
    // The harness's GPU is a process-wide static; the model shares it through an Arc of its own.
    let _ = shared_gpu()?;
    let gpu = Arc::new(Gpu::new(0).map_err(s)?);
    GpuModel::synthetic(gpu, &small_config(), 7).map_err(s)
}

/// 8 chunks of 8 tokens selected per head; 4 local and 4 outlier chunks; rank 32.
fn small_params() -> ShadowKvParams {
    ShadowKvParams {
        chunk_size: 8,
        sparse_budget: 64,
        rank: 32,
        local_chunks: 4,
        outlier_chunks: 4,
    }
}

/// `count` random prompts of the given lengths (a fixed xorshift stream).
fn prompts(lengths: &[usize], vocab: usize) -> Vec<Vec<u32>> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    lengths
        .iter()
        .map(|&len| {
            (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % vocab as u64) as u32
                })
                .collect()
        })
        .collect()
}

/// A full cache with `prompts` prefilled (room for `steps` more tokens each) and each
/// sequence's first generated token.
fn full_cache(
    model: &GpuModel,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Result<(GpuKvCache, Vec<u32>), String> {
    let capacities: Vec<u32> = prompts
        .iter()
        .map(|p| (p.len() + steps + 1) as u32)
        .collect();
    let mut cache = model.new_cache(&capacities).map_err(s)?;
    let mut first = Vec::new();
    for (b, prompt) in prompts.iter().enumerate() {
        let logits = model
            .forward(&mut cache, &vec![b; prompt.len()], prompt)
            .map_err(s)?;
        first.push(Sampler::greedy().sample(&logits));
    }
    Ok((cache, first))
}

/// `steps` greedy steps from `first`; each step's tokens.
fn decode(
    steps: usize,
    first: &[u32],
    mut step: impl FnMut(&[u32]) -> shadowkv_model::Result<Vec<u32>>,
) -> Result<Vec<Vec<u32>>, String> {
    let mut next = first.to_vec();
    let mut all = Vec::new();
    for index in 0..steps {
        next = step(&next).map_err(|error| format!("step {index}: {error}"))?;
        all.push(next.clone());
    }
    Ok(all)
}

/// The first step where two runs' tokens differ, as an error.
fn same_tokens(what: &str, a: &[Vec<u32>], b: &[Vec<u32>]) -> Result<(), String> {
    if let Some(step) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
        return Err(format!(
            "{what}: step {step} gives {:?} against {:?}",
            a.get(step),
            b.get(step)
        ));
    }
    Ok(())
}

/// A runner's counts after `steps` steps of one shape in graph mode: one capture, every step
/// but the first (eager) replayed.
fn check_replayed(runner: &DecodeRunner, steps: usize) -> Result<(), String> {
    if !runner.capture_errors().is_empty() {
        return Err(format!("captures failed: {:?}", runner.capture_errors()));
    }
    if runner.captures() != 1 || runner.replays() != steps - 1 {
        return Err(format!(
            "{} captures and {} replays over {steps} steps; expected 1 and {}",
            runner.captures(),
            runner.replays(),
            steps - 1
        ));
    }
    Ok(())
}

fn full_attention(_: &Gpu) -> Result<(), String> {
    let model = small_model()?;
    let prompts = prompts(&[200, 333, 150], model.config.vocab);
    compare_full(&model, &prompts, STEPS)
}

/// Full attention: graph replay against eager steps of the runner (exactly), and the
/// runner's eager steps against `forward_greedy` fed the same tokens (the runner plans the
/// attention's splits at the capacity, so a near-tie may round the other way: at most one
/// step in 16 may differ).
fn compare_full(model: &GpuModel, prompts: &[Vec<u32>], steps: usize) -> Result<(), String> {
    let (mut graph_cache, first) = full_cache(model, prompts, steps)?;
    let (mut eager_cache, _) = full_cache(model, prompts, steps)?;
    let (mut old_cache, _) = full_cache(model, prompts, steps)?;
    let mut graph = DecodeRunner::new(StepMode::Graph, StepLimits::default());
    let mut eager = DecodeRunner::new(StepMode::Eager, StepLimits::default());
    let replayed = decode(steps, &first, |next| {
        model.decode_full_step(&mut graph, &mut graph_cache, next)
    })?;
    check_replayed(&graph, steps)?;
    let mut differ = 0;
    let sequences: Vec<usize> = (0..prompts.len()).collect();
    let launched = decode(steps, &first, |next| {
        let mine = model.decode_full_step(&mut eager, &mut eager_cache, next)?;
        let today = model.forward_greedy(&mut old_cache, &sequences, next)?;
        differ += usize::from(mine != today);
        Ok(mine)
    })?;
    same_tokens("full attention, graph against eager", &replayed, &launched)?;
    if eager.captures() != 0 || eager.replays() != 0 {
        return Err("the eager runner captured a graph".into());
    }
    if differ * 16 > steps {
        return Err(format!(
            "the runner's eager steps differ from forward_greedy at {differ} of {steps} steps"
        ));
    }
    if graph_cache.lens() != eager_cache.lens() || eager_cache.lens() != old_cache.lens() {
        return Err(format!(
            "lengths {:?}, {:?}, {:?}",
            graph_cache.lens(),
            eager_cache.lens(),
            old_cache.lens()
        ));
    }
    eprintln!(
        "full attention: {steps} steps of {} sequences equal; the runner differs from forward_greedy at {differ} steps",
        prompts.len()
    );
    Ok(())
}

/// A ShadowKV cache with `prompts` prefilled (room for `steps` generated tokens each) and each
/// sequence's first generated token.
fn shadow_cache(
    model: &GpuModel,
    prompts: &[Vec<u32>],
    params: ShadowKvParams,
    home: ValueHome,
    steps: usize,
) -> Result<(GpuShadowCache, Vec<u32>), String> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let capacity = CacheCapacity {
        max_sequences: prompts.len(),
        max_prompt_len: longest,
        max_prompt_tokens: prompts.iter().map(Vec::len).sum(),
        max_generated: steps + 1,
    };
    let mut shadow = model.new_shadow_cache(params, home, capacity).map_err(s)?;
    let mut first = Vec::new();
    for prompt in prompts {
        let (_, logits) = model
            .prefill_shadow(&mut shadow, prompt, 256, |_| {})
            .map_err(s)?;
        first.push(Sampler::greedy().sample(&logits));
    }
    Ok((shadow, first))
}

fn shadowkv_host(_: &Gpu) -> Result<(), String> {
    let model = small_model()?;
    let prompts = prompts(&[512, 600, 700], model.config.vocab);
    compare_shadow(&model, &prompts, small_params(), ValueHome::Host, STEPS)
}

fn shadowkv_device(_: &Gpu) -> Result<(), String> {
    let model = small_model()?;
    let prompts = prompts(&[512, 600, 700], model.config.vocab);
    compare_shadow(&model, &prompts, small_params(), ValueHome::Device, STEPS)
}

/// ShadowKV: graph replay, the runner's eager steps and `decode_shadow_greedy` all give the
/// same tokens (the same kernels with the same splits), and the statistics of a replayed step
/// are readable.
fn compare_shadow(
    model: &GpuModel,
    prompts: &[Vec<u32>],
    params: ShadowKvParams,
    home: ValueHome,
    steps: usize,
) -> Result<(), String> {
    let (mut graph_cache, first) = shadow_cache(model, prompts, params, home, steps)?;
    let (mut eager_cache, _) = shadow_cache(model, prompts, params, home, steps)?;
    let (mut old_cache, _) = shadow_cache(model, prompts, params, home, steps)?;
    let mut graph = DecodeRunner::new(StepMode::Graph, StepLimits::default());
    let mut eager = DecodeRunner::new(StepMode::Eager, StepLimits::default());
    let replayed = decode(steps, &first, |next| {
        model.decode_shadow_step(&mut graph, &mut graph_cache, next)
    })?;
    check_replayed(&graph, steps)?;
    let stats = graph_cache.cache().step_stats().map_err(s)?;
    let expected =
        (prompts.len() * model.config.kv_heads * params.sparse_budget / params.chunk_size) as u64;
    if stats.selected != expected || stats.misses > stats.selected {
        return Err(format!("replayed step's statistics {stats:?}"));
    }
    let launched = decode(steps, &first, |next| {
        model.decode_shadow_step(&mut eager, &mut eager_cache, next)
    })?;
    let today = decode(steps, &first, |next| {
        model.decode_shadow_greedy(&mut old_cache, next)
    })?;
    same_tokens(
        &format!("ShadowKV {home:?}, graph against eager"),
        &replayed,
        &launched,
    )?;
    same_tokens(
        &format!("ShadowKV {home:?}, eager against decode_shadow_greedy"),
        &launched,
        &today,
    )?;
    for cache in [&graph_cache, &eager_cache] {
        if cache.lens() != old_cache.lens() {
            return Err(format!(
                "lengths {:?} against {:?}",
                cache.lens(),
                old_cache.lens()
            ));
        }
    }
    eprintln!(
        "ShadowKV {home:?}: {steps} steps of {} sequences equal; the last replayed step's hit rate {:.1}%",
        prompts.len(),
        100.0 * stats.hit_rate()
    );
    Ok(())
}

/// SYNTHETIC SELECTION (the scripted top-k, scripted selection and plan kernels) replayed
/// from a graph against eager steps, each cache at 80% scripted hits, then the real selection
/// again (a new capture: the rate is part of the shape's key).
fn scripted_selection(_: &Gpu) -> Result<(), String> {
    let model = small_model()?;
    let prompts = prompts(&[512, 600], model.config.vocab);
    let (params, home, steps) = (small_params(), ValueHome::Host, 16);
    let (mut graph_cache, first) = shadow_cache(&model, &prompts, params, home, 2 * steps)?;
    let (mut eager_cache, _) = shadow_cache(&model, &prompts, params, home, 2 * steps)?;
    let mut graph = DecodeRunner::new(StepMode::Graph, StepLimits::default());
    let mut eager = DecodeRunner::new(StepMode::Eager, StepLimits::default());
    let mut runs = Vec::new();
    for (runner, cache) in [
        (&mut graph, &mut graph_cache),
        (&mut eager, &mut eager_cache),
    ] {
        cache.set_scripted_hit_rate(Some(0.8)).map_err(s)?;
        let mut tokens = decode(steps, &first, |next| {
            model.decode_shadow_step(runner, cache, next)
        })?;
        let hit_rate = cache.cache().step_stats().map_err(s)?.hit_rate();
        if !(0.75..=0.85).contains(&hit_rate) {
            return Err(format!("scripted 80% hits gave {:.1}%", 100.0 * hit_rate));
        }
        cache.set_scripted_hit_rate(None).map_err(s)?;
        let last = tokens.last().cloned().unwrap_or_default();
        tokens.extend(decode(steps, &last, |next| {
            model.decode_shadow_step(runner, cache, next)
        })?);
        runs.push(tokens);
    }
    same_tokens("ShadowKV with SYNTHETIC SELECTION", &runs[0], &runs[1])?;
    if graph.captures() != 2 || !graph.capture_errors().is_empty() {
        return Err(format!(
            "{} captures ({:?}) for two selection modes",
            graph.captures(),
            graph.capture_errors()
        ));
    }
    Ok(())
}

fn smollm2(_: &Gpu) -> Result<(), String> {
    let Ok(path) = shadowkv_model::builtin_model_path() else {
        eprintln!("the built-in SmolLM2 is not here (tools/setup.sh fetches it): skipped");
        return Ok(());
    };
    let source = ModelSource::open(&path).map_err(s)?;
    let _ = shared_gpu()?;
    let gpu = Arc::new(Gpu::new(0).map_err(s)?);
    let model = GpuModel::load(gpu, &source.config, &source.weights).map_err(s)?;
    let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. ";
    let mut prompts = Vec::new();
    for (repeats, question) in [
        (40, "What colour is the sky?"),
        (55, "What colour is the sun?"),
    ] {
        let text = format!("{}{question}", filler.repeat(repeats));
        prompts.push(source.prompt_tokens(&text, true).map_err(s)?);
    }
    compare_full(&model, &prompts, STEPS)?;
    let params = ShadowKvParams {
        sparse_budget: 256,
        outlier_chunks: 6,
        ..ShadowKvParams::default()
    };
    for home in [ValueHome::Host, ValueHome::Device] {
        compare_shadow(&model, &prompts, params, home, STEPS)?;
    }
    Ok(())
}

/// A sequence leaves (ShadowKV) and a cache of another batch comes (full attention): each
/// new shape is captured again, and the tokens stay those of eager steps.
fn shape_change(_: &Gpu) -> Result<(), String> {
    let model = small_model()?;
    let prompts = prompts(&[512, 600, 700], model.config.vocab);
    let (home, params, steps) = (ValueHome::Host, small_params(), 12);
    let (mut graph_cache, first) = shadow_cache(&model, &prompts, params, home, steps)?;
    let (mut eager_cache, _) = shadow_cache(&model, &prompts, params, home, steps)?;
    let mut graph = DecodeRunner::new(StepMode::Graph, StepLimits::default());
    let mut eager = DecodeRunner::new(StepMode::Eager, StepLimits::default());
    let mut runs = Vec::new();
    for (runner, cache) in [
        (&mut graph, &mut graph_cache),
        (&mut eager, &mut eager_cache),
    ] {
        let mut tokens = decode(steps / 2, &first, |next| {
            model.decode_shadow_step(runner, cache, next)
        })?;
        // The middle sequence leaves between steps: the batch shape changes.
        let leaving = cache.sequences()[1];
        cache.remove_sequence(model.gpu(), leaving).map_err(s)?;
        let last = tokens.last().cloned().unwrap_or_default();
        let next = vec![last[0], last[2]];
        tokens.extend(decode(steps / 2, &next, |next| {
            model.decode_shadow_step(runner, cache, next)
        })?);
        runs.push(tokens);
    }
    same_tokens("ShadowKV across a shape change", &runs[0], &runs[1])?;
    if graph.captures() != 2 || !graph.capture_errors().is_empty() {
        return Err(format!(
            "{} captures ({:?}) for two batch shapes",
            graph.captures(),
            graph.capture_errors()
        ));
    }
    // Full attention: a cache of two sequences, then one of three, through one runner.
    let mut full = DecodeRunner::new(StepMode::Graph, StepLimits::default());
    let mut reference = DecodeRunner::new(StepMode::Eager, StepLimits::default());
    for lengths in [&[120usize, 90][..], &[100, 80, 60][..]] {
        let prompts = self::prompts(lengths, model.config.vocab);
        let (mut a, first) = full_cache(&model, &prompts, 8)?;
        let (mut b, _) = full_cache(&model, &prompts, 8)?;
        let replayed = decode(8, &first, |next| {
            model.decode_full_step(&mut full, &mut a, next)
        })?;
        let launched = decode(8, &first, |next| {
            model.decode_full_step(&mut reference, &mut b, next)
        })?;
        same_tokens("full attention after a shape change", &replayed, &launched)?;
    }
    if full.captures() != 2 {
        return Err(format!("{} captures for two full caches", full.captures()));
    }
    Ok(())
}

/// A runner that keeps batches of at most 2: a cache of 3 sequences is refused with
/// `Error::PastCapturedShapes`, nothing changes (the old path and a larger runner then give the
/// same tokens as a fresh cache), and a wrong token count is refused the same way.
fn past_captured_shapes(_: &Gpu) -> Result<(), String> {
    let model = small_model()?;
    let prompts = prompts(&[512, 600, 700], model.config.vocab);
    let (home, params, steps) = (ValueHome::Host, small_params(), 6);
    let limits = StepLimits {
        max_batch: 2,
        max_shapes: 1,
    };
    let mut small = DecodeRunner::new(StepMode::Graph, limits);
    let (mut shadow, first) = shadow_cache(&model, &prompts, params, home, steps)?;
    let (mut fresh, _) = shadow_cache(&model, &prompts, params, home, steps)?;
    match model.decode_shadow_step(&mut small, &mut shadow, &first) {
        Err(Error::PastCapturedShapes {
            batch: 3,
            max_batch: 2,
        }) => {}
        other => return Err(format!("a batch of 3 past 2 gave {other:?}")),
    }
    match model.decode_shadow_step(&mut small, &mut shadow, &first[..2]) {
        Err(Error::PastCapturedShapes { .. }) => {}
        other => return Err(format!("2 tokens for 3 sequences gave {other:?}")),
    }
    let mut large = DecodeRunner::new(StepMode::Graph, StepLimits::default());
    let after = decode(steps, &first, |next| {
        model.decode_shadow_step(&mut large, &mut shadow, next)
    })?;
    let expected = decode(steps, &first, |next| {
        model.decode_shadow_greedy(&mut fresh, next)
    })?;
    same_tokens("ShadowKV after a refused step", &after, &expected)?;
    // Full attention: the same refusal, then the old path on the same cache.
    let (mut cache, first) = full_cache(&model, &prompts[..3], steps)?;
    let (mut fresh, _) = full_cache(&model, &prompts[..3], steps)?;
    match model.decode_full_step(&mut small, &mut cache, &first) {
        Err(Error::PastCapturedShapes { batch: 3, .. }) => {}
        other => return Err(format!("a full batch of 3 past 2 gave {other:?}")),
    }
    let sequences = [0, 1, 2];
    let after = decode(steps, &first, |next| {
        model.forward_greedy(&mut cache, &sequences, next)
    })?;
    let expected = decode(steps, &first, |next| {
        model.forward_greedy(&mut fresh, &sequences, next)
    })?;
    same_tokens("full attention after a refused step", &after, &expected)?;
    // The small runner still serves a batch it keeps.
    let (mut two, first) = full_cache(&model, &prompts[..2], steps)?;
    decode(steps, &first, |next| {
        model.decode_full_step(&mut small, &mut two, next)
    })?;
    Ok(())
}
