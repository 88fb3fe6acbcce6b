//! Reference for [`crate::attention`]: exact softmax attention in f64.
use half::bf16;

use crate::attention::{DecodeAttentionShape, SequenceLayout};

/// `[batch, q_heads, head_dim]` outputs of decode attention over each sequence's valid
/// tokens, read through the same layouts as the kernel.
pub fn decode_attention(
    shape: &DecodeAttentionShape,
    layouts: &[SequenceLayout],
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    scale: f64,
) -> Vec<f64> {
    let d = shape.head_dim;
    let group = shape.group();
    let mut out = vec![0.0f64; shape.q_elements()];
    let mut scores = Vec::new();
    for (b, l) in layouts.iter().enumerate() {
        for q_head in 0..shape.q_heads {
            let kv_head = q_head / group;
            let base = l.offset as usize + kv_head * l.capacity as usize * d;
            let query = &q[(b * shape.q_heads + q_head) * d..][..d];
            scores.clear();
            for t in 0..l.len as usize {
                let key = &k[base + t * d..][..d];
                let dot: f64 = query
                    .iter()
                    .zip(key)
                    .map(|(a, b)| a.to_f64() * b.to_f64())
                    .sum();
                scores.push(dot * scale);
            }
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let row = &mut out[(b * shape.q_heads + q_head) * d..][..d];
            for (t, weight) in scores.iter().enumerate() {
                let value = &v[base + t * d..][..d];
                for (o, x) in row.iter_mut().zip(value) {
                    *o += weight / sum * x.to_f64();
                }
            }
        }
    }
    out
}
