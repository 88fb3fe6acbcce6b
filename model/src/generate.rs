//! The generation loop shared by every backend (CPU reference, GPU): prefill the prompt in
//! one call, then sample and feed back one token at a time until an end-of-generation token
//! or the token limit, timing both phases.
use std::time::Instant;

use crate::error::Result;
use crate::sampling::Sampler;

/// What a run produced and how fast.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// The generated ids (the end-of-generation token, if reached, is the last).
    pub tokens: Vec<u32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl Generation {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Decode rate over the tokens after the first (the first comes from the prefill).
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

/// Runs `forward` (tokens in, last position's logits out) over `prompt`, then generates up to
/// `max_new_tokens`, calling `on_token` with each new id as soon as it is chosen.
pub fn generate(
    mut forward: impl FnMut(&[u32]) -> Result<Vec<f32>>,
    prompt: &[u32],
    sampler: &mut Sampler,
    max_new_tokens: usize,
    is_end: impl Fn(u32) -> bool,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let started = Instant::now();
    let mut logits = forward(prompt)?;
    let prefill_seconds = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut tokens = Vec::new();
    while tokens.len() < max_new_tokens {
        let token = sampler.sample(&logits);
        tokens.push(token);
        on_token(token)?;
        if is_end(token) || tokens.len() == max_new_tokens {
            break;
        }
        logits = forward(&[token])?;
    }
    Ok(Generation {
        prompt_tokens: prompt.len(),
        tokens,
        prefill_seconds,
        decode_seconds: started.elapsed().as_secs_f64(),
    })
}
