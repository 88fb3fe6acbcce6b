//! Choosing the next token from logits: greedy, or temperature with nucleus (top-p) sampling
//! from a seeded generator, so a run can be repeated.
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::error::{invalid_input, Result};

/// How to pick the next token.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// 0 is greedy.
    temperature: f32,
    top_p: f32,
    rng: StdRng,
}

impl Sampler {
    /// Always the most likely token (the lowest id among equal logits).
    pub fn greedy() -> Sampler {
        Sampler {
            temperature: 0.0,
            top_p: 1.0,
            rng: StdRng::seed_from_u64(0),
        }
    }

    /// Softmax at `temperature` (0 means greedy), keeping the most likely tokens whose
    /// probabilities add up to `top_p` (in (0, 1]).
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Result<Sampler> {
        if !(temperature >= 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid_input(
                "sampling",
                format!("temperature {temperature}, top-p {top_p}"),
                "a temperature >= 0 and a top-p in (0, 1]",
            ));
        }
        Ok(Sampler {
            temperature,
            top_p,
            rng: StdRng::seed_from_u64(seed),
        })
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// The next token for `logits` (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(id, &l)| (id as u32, ((l - max) / self.temperature).exp()))
            .collect();
        let total: f32 = candidates.iter().map(|c| c.1).sum();
        candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // The nucleus: the shortest prefix whose probability reaches top_p.
        let mut kept = 0.0;
        let mut nucleus = candidates.len();
        for (i, c) in candidates.iter().enumerate() {
            kept += c.1 / total;
            if kept >= self.top_p {
                nucleus = i + 1;
                break;
            }
        }
        let candidates = &candidates[..nucleus];
        let mass: f32 = candidates.iter().map(|c| c.1).sum();
        let mut draw = self.rng.gen::<f32>() * mass;
        for &(id, weight) in candidates {
            if draw < weight {
                return id;
            }
            draw -= weight;
        }
        candidates.last().map_or(0, |c| c.0)
    }
}

/// Index of the largest value (the first among equals).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}
