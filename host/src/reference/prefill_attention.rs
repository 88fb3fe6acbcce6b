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
                        attend_row(
                            &query,
                            &k[base..],
                            &v[base..],
                            p.start as usize + i + 1,
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
