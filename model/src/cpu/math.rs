//! The CPU path's arithmetic: norms, RoPE, softmax, dot products and the threaded matrix
//! product, shared by the full-attention model and ShadowKV's reference.
use shadowkv::RotaryLayout;
use shadowkv_kernels::rope::{inverse_frequencies, pair_columns, RopeConfig};

use crate::config::ModelConfig;
use crate::weights::Matrix;

/// SiLU, `x * sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// RMSNorm of each `weight.len()`-long row of `x`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let width = weight.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(width) {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / width as f32;
        let inverse = 1.0 / (mean_square + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| v * inverse * w));
    }
    out
}

/// A model's RoPE as the CPU path applies it: the frequency table with every adjustment
/// folded in (the one the GPU uploads) and the rotation's layout.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeTable {
    /// The `rotary_dim / 2` inverse frequencies.
    pub inverse_frequencies: Vec<f64>,
    /// The rotated part of each head, its pairing and the attention factor.
    pub rotary: RotaryLayout,
}

impl RopeTable {
    /// The table of `config`'s RoPE.
    pub fn new(config: &ModelConfig) -> RopeTable {
        RopeTable {
            inverse_frequencies: config.inverse_frequencies(),
            rotary: config.rotary_layout(),
        }
    }

    /// The table of `rope` on heads of `head_dim` (the local layers' RoPE of a model with
    /// sliding-window layers).
    pub fn of(rope: &RopeConfig, head_dim: usize) -> RopeTable {
        RopeTable {
            inverse_frequencies: inverse_frequencies(rope, head_dim as u32),
            rotary: rope.layout(head_dim as u32),
        }
    }
}

/// RoPE of every `head_dim`-long head in `row`, at `position`: each rotated pair (see
/// `shadowkv_kernels::rope::pair_columns`) turned by `position * frequency` and scaled by the
/// attention factor, the other dimensions unchanged.
pub fn rope_rows(row: &mut [f32], head_dim: usize, position: u32, rope: &RopeTable) {
    let scale = rope.rotary.attention_factor;
    for head in row.chunks_exact_mut(head_dim) {
        for (i, &frequency) in rope.inverse_frequencies.iter().enumerate() {
            let (low_column, high_column, rotated) = pair_columns(i as u32, &rope.rotary);
            let (low_column, high_column) = (low_column as usize, high_column as usize);
            if !rotated || high_column >= head_dim {
                continue;
            }
            let (sin, cos) = (position as f64 * frequency).sin_cos();
            let (sin, cos) = (sin as f32 * scale, cos as f32 * scale);
            let (low, high) = (head[low_column], head[high_column]);
            head[low_column] = low * cos - high * sin;
            head[high_column] = high * cos + low * sin;
        }
    }
}

/// Softmax of `scores`, in place.
pub fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

/// `x += y`, element-wise.
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// Adds `bias` to every `bias.len()`-long row of `x`.
pub(crate) fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_assign(row, bias);
    }
}

/// Dot product with eight independent sums, which the compiler vectorises.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0.0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// `x [n, in] · Wᵀ` for `W [out, in]`: `[n, out]`, the output rows split over the cores.
pub fn matmul(x: &[f32], weight: &Matrix) -> Vec<f32> {
    let (inner, outputs) = (weight.cols, weight.rows);
    let count = x.len() / inner;
    let mut out = vec![0.0; count * outputs];
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(outputs.div_ceil(64));
    let per_thread = outputs.div_ceil(threads.max(1));
    // Each thread owns a range of output columns; gather them into column-major scratch and
    // scatter afterwards so no two threads write the same memory.
    let columns: Vec<Vec<f32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..outputs)
            .step_by(per_thread.max(1))
            .map(|first| {
                let last = (first + per_thread).min(outputs);
                scope.spawn(move || {
                    let mut part = Vec::with_capacity((last - first) * count);
                    for o in first..last {
                        let w = &weight.data[o * inner..(o + 1) * inner];
                        part.extend(x.chunks_exact(inner).map(|row| dot(row, w)));
                    }
                    part
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut o = 0;
    for part in columns {
        for column in part.chunks_exact(count.max(1)) {
            for (t, &v) in column.iter().enumerate() {
                out[t * outputs + o] = v;
            }
            o += 1;
        }
    }
    out
}
