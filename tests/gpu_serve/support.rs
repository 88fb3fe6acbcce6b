//! What the continuous-batching GPU tests share: the models, the parameters, the prompts, a
//! scripted driver of a `GpuBackend`, and each sequence's greedy tokens alone.
use std::sync::Arc;

use shadowkv::cache::{CacheCapacity, ShadowKvParams, ValueHome};
use shadowkv::Gpu;
use shadowkv_model::{
    Backend, CacheMode, GpuBackend, GpuModel, GpuServeCapacity, ModelConfig, ModelSource,
    RequestId, Sampler,
};
use shadowkv_suite::shared_gpu;

pub fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

pub fn source() -> Result<ModelSource, String> {
    ModelSource::open(&shadowkv_model::builtin_model_path().map_err(s)?).map_err(s)
}

pub fn new_gpu() -> Result<Arc<Gpu>, String> {
    // The harness's GPU is a process-wide static; a model shares a GPU through an Arc of its own.
    let _ = shared_gpu()?;
    Ok(Arc::new(Gpu::new(0).map_err(s)?))
}

pub fn smollm2(source: &ModelSource) -> Result<GpuModel, String> {
    GpuModel::load(new_gpu()?, &source.config, &source.weights).map_err(s)
}

/// SmolLM2's shape with 2 layers and random weights: for the tests that need many steps or
/// exact repeatability, not meaningful text.
pub fn small_synthetic() -> Result<GpuModel, String> {
    let config = ModelConfig {
        layers: 2,
        ..ModelConfig::named("smollm2-135m").map_err(s)?
    };
    GpuModel::synthetic(new_gpu()?, &config, 7).map_err(s)
}

/// Prompt tokens per piece: a prompt arrives in pieces of this size (the last shorter), and
/// the sequences alone prefill in passes of the same size, so both run the same passes.
pub const PIECE: usize = 128;

/// SmolLM2's ShadowKV parameters in these tests: a prompt needs 352 tokens for the budget.
pub const SMOLLM2_SPARSE: ShadowKvParams = ShadowKvParams {
    chunk_size: 8,
    sparse_budget: 256,
    rank: 160,
    local_chunks: 4,
    outlier_chunks: 6,
};

/// The synthetic model's ShadowKV parameters: a prompt needs 160 tokens for the budget.
pub const SMALL_SPARSE: ShadowKvParams = ShadowKvParams {
    chunk_size: 8,
    sparse_budget: 64,
    rank: 32,
    local_chunks: 4,
    outlier_chunks: 4,
};

/// Two candidates closer than this may swap between two GPU runs that sum in different orders
/// (the attention's split follows the batch's longest sequence; the GEMMs' algorithms follow
/// the batch's rows): as in the model tests.
pub const NEAR_TIE: f32 = 0.15;

/// A prompt of `repeats` filler sentences around a fact and a question about it.
pub fn filler_prompt(source: &ModelSource, repeats: usize, fact: &str) -> Result<Vec<u32>, String> {
    let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    let half = repeats / 2;
    let text = format!(
        "Read the text and answer the question.\n{}{fact}\n{}\nWhat was the fact in the text?",
        filler.repeat(half),
        filler.repeat(repeats - half)
    );
    source.prompt_tokens(&text, true).map_err(s)
}

/// One sequence driven through a backend: its prompt, how much of it was fed, the last
/// piece's logits, and the greedy tokens it generated.
pub struct Served {
    pub prompt: Vec<u32>,
    pub fed: usize,
    pub logits: Option<Vec<f32>>,
    pub tokens: Vec<u32>,
}

/// A scripted run over a [`GpuBackend`]: sequence `i` is request `i`.
pub struct Driver<'m> {
    pub backend: GpuBackend<'m>,
    pub mode: CacheMode,
    pub sequences: Vec<Served>,
}

impl<'m> Driver<'m> {
    pub fn new(model: &'m GpuModel, mode: CacheMode, home: ValueHome) -> Result<Self, String> {
        let shadowkv = match mode {
            CacheMode::Full => None,
            CacheMode::ShadowKv(params) => Some((params, home)),
        };
        let capacity = GpuServeCapacity {
            max_sequences: 4,
            max_tokens: 2048,
            max_generated: 64,
        };
        Ok(Driver {
            backend: GpuBackend::new(model, capacity, shadowkv).map_err(s)?,
            mode,
            sequences: Vec::new(),
        })
    }

    /// A new sequence of `prompt` in `mode` (the driver's when `None`); returns its index.
    pub fn add(&mut self, prompt: &[u32], mode: Option<CacheMode>) -> Result<usize, String> {
        let i = self.sequences.len();
        self.backend
            .add_sequence(RequestId(i as u64), mode.unwrap_or(self.mode), None)
            .map_err(s)?;
        self.sequences.push(Served {
            prompt: prompt.to_vec(),
            fed: 0,
            logits: None,
            tokens: Vec::new(),
        });
        Ok(i)
    }

    /// Feeds sequence `i`'s next piece; closes the prompt (and picks the first token) when
    /// that was the last.
    pub fn piece(&mut self, i: usize) -> Result<(), String> {
        let sequence = &mut self.sequences[i];
        let end = (sequence.fed + PIECE).min(sequence.prompt.len());
        let logits = self
            .backend
            .prefill(RequestId(i as u64), &sequence.prompt[sequence.fed..end])
            .map_err(s)?;
        sequence.fed = end;
        sequence.logits = Some(logits);
        if end == sequence.prompt.len() {
            self.backend.finish_prompt(RequestId(i as u64)).map_err(s)?;
            let sequence = &mut self.sequences[i];
            let logits = sequence.logits.take().expect("set above");
            sequence.tokens.push(Sampler::greedy().sample(&logits));
        }
        Ok(())
    }

    /// Feeds the rest of sequence `i`'s prompt.
    pub fn prefill(&mut self, i: usize) -> Result<(), String> {
        while self.sequences[i].fed < self.sequences[i].prompt.len() {
            self.piece(i)?;
        }
        Ok(())
    }

    /// One decode step of the sequences `ids`, in that order.
    pub fn decode(&mut self, ids: &[usize]) -> Result<(), String> {
        let batch: Vec<(RequestId, u32)> = ids
            .iter()
            .map(|&i| {
                (
                    RequestId(i as u64),
                    *self.sequences[i].tokens.last().unwrap(),
                )
            })
            .collect();
        let logits = self.backend.decode(&batch).map_err(s)?;
        for (&i, logits) in ids.iter().zip(logits) {
            let sequence = &mut self.sequences[i];
            sequence.tokens.push(Sampler::greedy().sample(&logits));
        }
        Ok(())
    }

    pub fn remove(&mut self, i: usize) {
        self.backend.remove_sequence(RequestId(i as u64));
    }
}

/// Greedy tokens of `prompt` alone with full attention (the model's own cache, the prompt in
/// passes of [`PIECE`]), and the logits each was picked from.
pub fn full_alone(
    model: &GpuModel,
    prompt: &[u32],
    tokens: usize,
) -> Result<(Vec<u32>, Vec<Vec<f32>>), String> {
    let mut cache = model
        .new_cache(&[(prompt.len() + tokens) as u32])
        .map_err(s)?;
    let mut logits = Vec::new();
    for pass in prompt.chunks(PIECE) {
        logits = model
            .forward(&mut cache, &vec![0; pass.len()], pass)
            .map_err(s)?;
    }
    let (mut picked, mut picked_from) = (Vec::new(), Vec::new());
    for step in 0..tokens {
        let token = Sampler::greedy().sample(&logits);
        picked.push(token);
        if step + 1 < tokens {
            let next = model.forward(&mut cache, &[0], &[token]).map_err(s)?;
            picked_from.push(std::mem::replace(&mut logits, next));
        } else {
            picked_from.push(std::mem::take(&mut logits));
        }
    }
    Ok((picked, picked_from))
}

/// Greedy tokens of `prompt` alone with ShadowKV (the model's own shadow prefill in passes of
/// [`PIECE`], then its whole-cache decode steps), and the logits each was picked from.
pub fn shadow_alone(
    model: &GpuModel,
    prompt: &[u32],
    tokens: usize,
    params: ShadowKvParams,
    home: ValueHome,
) -> Result<(Vec<u32>, Vec<Vec<f32>>), String> {
    let capacity = CacheCapacity::uniform(1, prompt.len(), tokens);
    let mut shadow = model.new_shadow_cache(params, home, capacity).map_err(s)?;
    let (_, mut logits) = model
        .prefill_shadow(&mut shadow, prompt, PIECE, |_| {})
        .map_err(s)?;
    let (mut picked, mut picked_from) = (Vec::new(), Vec::new());
    for step in 0..tokens {
        let token = Sampler::greedy().sample(&logits);
        picked.push(token);
        if step + 1 < tokens {
            let next = model.decode_shadow(&mut shadow, &[token]).map_err(s)?;
            picked_from.push(std::mem::replace(&mut logits, next));
        } else {
            picked_from.push(std::mem::take(&mut logits));
        }
    }
    Ok((picked, picked_from))
}

/// Sequence `name`'s tokens in the batch against alone: equal, or equal up to a step where
/// the two picks were a near-tie alone (from there on they may differ).
pub fn compare(
    name: &str,
    together: &[u32],
    alone: &[u32],
    alone_logits: &[Vec<f32>],
) -> Result<(), String> {
    for (step, (&mine, &theirs)) in together.iter().zip(alone).enumerate() {
        if mine == theirs {
            continue;
        }
        let logits = &alone_logits[step];
        let margin = logits[theirs as usize] - logits[mine as usize];
        if margin <= NEAR_TIE {
            eprintln!(
                "{name}: step {step} picks {mine} in the batch, {theirs} alone: a near-tie \
                 ({margin:.3}); the rest is not compared"
            );
            return Ok(());
        }
        return Err(format!(
            "{name}: step {step} picks {mine} in the batch, {theirs} alone (margin {margin:.3}); \
             batch {together:?}, alone {alone:?}"
        ));
    }
    eprintln!("{name}: {} tokens as alone", together.len());
    Ok(())
}
