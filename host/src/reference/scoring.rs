//! Reference for [`crate::kernels::scoring`] and the scoring half of [`crate::kernels::topk`], in f64.
use half::bf16;

use crate::kernels::shadow::{ShadowConfig, ShadowSequence};

/// Base-2 logits `q_g · landmark · scale · log2(e)` of (sequence `b`, KV head `h`), one
/// vector per query head `g` of the group, over the head's landmarks.
pub fn logits(
    config: &ShadowConfig,
    sequence: &ShadowSequence,
    b: usize,
    h: usize,
    q: &[bf16],
    landmarks: &[bf16],
    scale: f64,
) -> Vec<Vec<f64>> {
    let (d, group) = (config.head_dim, config.group());
    let base = sequence.landmark_base(h as u32) as usize;
    (0..group)
        .map(|g| {
            let query = &q[(b * config.q_heads + h * group + g) * d..][..d];
            (0..sequence.landmarks as usize)
                .map(|j| {
                    let row = &landmarks[(base + j) * d..][..d];
                    let dot: f64 = query
                        .iter()
                        .zip(row)
                        .map(|(x, y)| x.to_f64() * y.to_f64())
                        .sum();
                    dot * scale * std::f64::consts::LOG2_E
                })
                .collect()
        })
        .collect()
}

/// `score_j = max over g of softmax_g(logits)_j`, the softmax taken in base 2 over the
/// head's landmarks.
pub fn scores(logits: &[Vec<f64>]) -> Vec<f64> {
    let count = logits.first().map_or(0, Vec::len);
    let mut scores = vec![0.0f64; count];
    for row in logits {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|l| (l - max).exp2()).sum();
        for (score, l) in scores.iter_mut().zip(row) {
            *score = score.max((l - max).exp2() / sum);
        }
    }
    scores
}
