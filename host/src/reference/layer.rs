//! Reference for [`crate::kernels::layer`]: the per-token decoder-layer kernels in f64.
use half::bf16;

use crate::kernels::attention::SequenceLayout;
use crate::kernels::layer::kernel_layout::TokenPlacement;
use crate::kernels::layer::QkvShape;
use crate::reference::rebuild::rope_rotary;
use shadowkv_kernels::rope::RotaryLayout;

/// Rows of the `[vocab, hidden]` table for each id.
pub fn embedding(table: &[bf16], hidden: usize, ids: &[u32]) -> Vec<f64> {
    ids.iter()
        .flat_map(|&id| {
            table[id as usize * hidden..(id as usize + 1) * hidden]
                .iter()
                .map(|v| v.to_f64())
        })
        .collect()
}

/// `residual += delta`, then the RMSNorm of each row times `weight`; returns the new
/// residual and the normalised rows.
pub fn rms_norm(
    residual: &[f32],
    delta: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
) -> (Vec<f64>, Vec<f64>) {
    let hidden = weight.len();
    let summed: Vec<f64> = residual
        .iter()
        .enumerate()
        .map(|(i, &x)| x as f64 + delta.map_or(0.0, |d| d[i] as f64))
        .collect();
    let mut out = Vec::with_capacity(summed.len());
    for row in summed.chunks_exact(hidden) {
        let mean_square = row.iter().map(|x| x * x).sum::<f64>() / hidden as f64;
        let inverse = 1.0 / (mean_square + eps as f64).sqrt();
        out.extend(row.iter().zip(weight).map(|(x, &w)| x * inverse * w as f64));
    }
    (summed, out)
}

/// The rotated queries `[tokens, heads, head_dim]` and the keys before RoPE
/// (`[tokens, kv_heads * head_dim]`), and the K/V caches with each token's rotated key and
/// value written at its placement's cache row (other elements unchanged). The rotation is
/// `rotary` with its `rotary_dim / 2` `inverse_frequencies`.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv(
    shape: QkvShape,
    qkv: &[f32],
    bias: Option<&[f32]>,
    (inverse_frequencies, rotary): (&[f64], &RotaryLayout),
    placements: &[TokenPlacement],
    layouts: &[SequenceLayout],
    k_cache: &mut [f64],
    v_cache: &mut [f64],
) -> (Vec<f64>, Vec<f64>) {
    let (heads, kv_heads, d) = (shape.heads, shape.kv_heads, shape.head_dim);
    let width = shape.width();
    let mut q = Vec::with_capacity(placements.len() * heads * d);
    let mut pre_rope_keys = Vec::with_capacity(placements.len() * kv_heads * d);
    for (t, placement) in placements.iter().enumerate() {
        let row: Vec<f64> = (0..width)
            .map(|c| qkv[t * width + c] as f64 + bias.map_or(0.0, |b| b[c] as f64))
            .collect();
        let position = placement.position as usize;
        for head in 0..heads {
            let mut query = row[head * d..(head + 1) * d].to_vec();
            rope_rotary(&mut query, position, inverse_frequencies, rotary);
            q.extend(query);
        }
        let layout = layouts[placement.sequence as usize];
        for head in 0..kv_heads {
            let mut key = row[(heads + head) * d..(heads + head + 1) * d].to_vec();
            pre_rope_keys.extend_from_slice(&key);
            rope_rotary(&mut key, position, inverse_frequencies, rotary);
            let cache_row = placement.cache_row as usize;
            let at = layout.offset as usize + (head * layout.capacity as usize + cache_row) * d;
            k_cache[at..at + d].copy_from_slice(&key);
            let value = &row[(heads + kv_heads + head) * d..(heads + kv_heads + head + 1) * d];
            v_cache[at..at + d].copy_from_slice(value);
        }
    }
    (q, pre_rope_keys)
}

/// `silu(gate) * up` of each row of the fused `[rows, 2 * width]` projection.
pub fn silu_mul(gate_up: &[f32], width: usize) -> Vec<f64> {
    gate_up
        .chunks_exact(2 * width)
        .flat_map(|row| {
            (0..width).map(move |i| {
                let (gate, up) = (row[i] as f64, row[width + i] as f64);
                gate / (1.0 + (-gate).exp()) * up
            })
        })
        .collect()
}
