//! Reference for [`crate::kernels::attention`]: exact softmax attention in f64.
use half::bf16;

use crate::kernels::attention::{DecodeAttentionShape, SequenceLayout};

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
    decode_attention_windowed(shape, layouts, (q, k, v), scale, 0)
}

/// [`decode_attention`] with a sliding window (0: none): the query at position `len - 1`
/// attends only to the keys at positions `> len - 1 - window`.
pub fn decode_attention_windowed(
    shape: &DecodeAttentionShape,
    layouts: &[SequenceLayout],
    (q, k, v): (&[bf16], &[bf16], &[bf16]),
    scale: f64,
    window: usize,
) -> Vec<f64> {
    let d = shape.head_dim;
    let group = shape.group();
    let mut out = vec![0.0f64; shape.q_elements()];
    let (mut query, mut scores) = (vec![0.0f64; d], Vec::new());
    for (b, l) in layouts.iter().enumerate() {
        for q_head in 0..shape.q_heads {
            let kv_head = q_head / group;
            let len = l.len as usize;
            let first = if window > 0 {
                len.saturating_sub(window)
            } else {
                0
            };
            let base = l.offset as usize + (kv_head * l.capacity as usize + first) * d;
            let row = (b * shape.q_heads + q_head) * d;
            for (x, value) in query.iter_mut().zip(&q[row..row + d]) {
                *x = value.to_f64();
            }
            attend_row(
                &query,
                &k[base..],
                &v[base..],
                len - first,
                scale,
                &mut scores,
                &mut out[row..row + d],
            );
        }
    }
    out
}

/// `out = softmax(query · keysᵀ · scale) · values` over the first `len` rows of `d = query.len()`
/// values of `keys` and `values` (one KV head's block); `scores` is scratch.
pub(crate) fn attend_row(
    query: &[f64],
    keys: &[bf16],
    values: &[bf16],
    len: usize,
    scale: f64,
    scores: &mut Vec<f64>,
    out: &mut [f64],
) {
    let d = query.len();
    scores.clear();
    for key in keys[..len * d].chunks_exact(d) {
        let dot: f64 = query.iter().zip(key).map(|(a, b)| a * b.to_f64()).sum();
        scores.push(dot * scale);
    }
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (weight, value) in scores.iter().zip(values[..len * d].chunks_exact(d)) {
        for (o, x) in out.iter_mut().zip(value) {
            *o += weight / sum * x.to_f64();
        }
    }
}
