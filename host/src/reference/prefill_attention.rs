//! Reference for [`crate::kernels::prefill_attention`]: exact causal softmax attention in f64.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use half::bf16;

use crate::kernels::prefill_attention::{PrefillAttentionShape, QueryPlacement, SequenceLayout};
use crate::reference::attention::attend_row;

/// Positions one work item of the reference covers.
const POSITIONS_PER_ITEM: usize = 32;

/// `[tokens, q_heads, head_dim]` outputs of causal prefill attention: query `i` of sequence
/// `b` (row `query_offset + i`) attends to cache positions `0..=start + i` of its KV head,
/// read through the same layouts as the kernel. Rows no sequence's queries cover are 0.
/// Runs on every available core (the long-prompt checks are quadratic).
pub fn prefill_attention(
    shape: &PrefillAttentionShape,
    layouts: &[SequenceLayout],
    queries: &[QueryPlacement],
    q: &[bf16],
    k: &[bf16],
    v: &[bf16],
    scale: f64,
) -> Vec<f64> {
    prefill_attention_windowed(shape, (layouts, queries), (q, k, v), scale, 0)
}

/// [`prefill_attention`] with a sliding window (0: none): the query at position `pos`
/// attends only to the cache positions `pos - window < key <= pos`.
pub fn prefill_attention_windowed(
    shape: &PrefillAttentionShape,
    (layouts, queries): (&[SequenceLayout], &[QueryPlacement]),
    (q, k, v): (&[bf16], &[bf16], &[bf16]),
    scale: f64,
    window: usize,
) -> Vec<f64> {
    let d = shape.head_dim;
    let group = shape.group();
    // Work items: (sequence, q head, first position), POSITIONS_PER_ITEM positions each.
    let mut items = Vec::new();
    for (b, p) in queries.iter().enumerate() {
        for q_head in 0..shape.q_heads {
            for first in (0..p.query_len as usize).step_by(POSITIONS_PER_ITEM) {
                items.push((b, q_head, first));
            }
        }
    }
    let out = Mutex::new(vec![0.0f64; shape.q_elements()]);
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(items.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let (mut query, mut rows, mut scores) = (vec![0.0f64; d], Vec::new(), Vec::new());
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(b, q_head, first)) = items.get(index) else {
                        break;
                    };
                    let (l, p) = (&layouts[b], &queries[b]);
                    let base = l.offset as usize + (q_head / group) * l.capacity as usize * d;
                    let last = (first + POSITIONS_PER_ITEM).min(p.query_len as usize);
                    rows.clear();
                    for i in first..last {
                        let token = p.query_offset as usize + i;
                        let row = &q[(token * shape.q_heads + q_head) * d..][..d];
                        for (x, value) in query.iter_mut().zip(row) {
                            *x = value.to_f64();
                        }
                        let mut row = vec![0.0f64; d];
                        let keys = p.start as usize + i + 1;
                        let lowest = if window > 0 {
                            keys.saturating_sub(window)
                        } else {
                            0
                        };
                        attend_row(
                            &query,
                            &k[base + lowest * d..],
                            &v[base + lowest * d..],
                            keys - lowest,
                            scale,
                            &mut scores,
                            &mut row,
                        );
                        rows.push((token, row));
                    }
                    let mut out = out.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    for (token, row) in rows.drain(..) {
                        out[(token * shape.q_heads + q_head) * d..][..d].copy_from_slice(&row);
                    }
                }
            });
        }
    });
    out.into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::attention::DecodeAttentionShape;
    use crate::reference::attention::decode_attention_windowed;

    /// `n` values in [-1, 1) from a 64-bit linear congruential sequence.
    fn random(state: &mut u64, n: usize) -> Vec<bf16> {
        (0..n)
            .map(|_| {
                *state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                bf16::from_f64((*state >> 11) as f64 / (1u64 << 52) as f64 - 1.0)
            })
            .collect()
    }

    /// Windowed prefill: wider than the prompt it is causal attention, one key it returns
    /// each query's own value, and its last query is the windowed decode's query.
    #[test]
    fn sliding_window_bounds_the_keys() {
        let mut rng = 3u64;
        let (q_heads, kv_heads, d, len) = (6usize, 2usize, 16usize, 37u32);
        let shape = PrefillAttentionShape {
            tokens: len as usize,
            q_heads,
            kv_heads,
            head_dim: d,
        };
        let layouts = [SequenceLayout {
            offset: 0,
            capacity: len,
            len,
        }];
        let queries = [QueryPlacement {
            query_offset: 0,
            query_len: len,
            start: 0,
        }];
        let q = random(&mut rng, shape.q_elements());
        let (k, v) = (
            random(&mut rng, kv_heads * len as usize * d),
            random(&mut rng, kv_heads * len as usize * d),
        );
        let run = |window| {
            prefill_attention_windowed(&shape, (&layouts, &queries), (&q, &k, &v), 0.3, window)
        };
        assert_eq!(run(0), run(len as usize));
        assert_ne!(run(0), run(5));
        let own = run(1);
        for token in 0..len as usize {
            for head in 0..q_heads {
                let row = &own[(token * q_heads + head) * d..][..d];
                let value = &v[((head / 3) * len as usize + token) * d..][..d];
                for (got, want) in row.iter().zip(value) {
                    assert!((got - want.to_f64()).abs() < 1e-12);
                }
            }
        }
        let decode_shape = DecodeAttentionShape {
            batch: 1,
            q_heads,
            kv_heads,
            head_dim: d,
        };
        let last_query = &q[(len as usize - 1) * q_heads * d..];
        for window in [1usize, 5, 36, 37, 100] {
            let decode = decode_attention_windowed(
                &decode_shape,
                &layouts,
                (last_query, &k, &v),
                0.3,
                window,
            );
            let prefill = run(window);
            let last = &prefill[(len as usize - 1) * q_heads * d..];
            for (a, b) in decode.iter().zip(last) {
                assert!((a - b).abs() < 1e-12, "window {window}");
            }
        }
    }
}
