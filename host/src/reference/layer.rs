//! Reference for [`crate::kernels::layer`]: the per-token decoder-layer kernels in f64.
use half::bf16;

use crate::kernels::attention::SequenceLayout;
use crate::kernels::layer::kernel_layout::TokenPlacement;
use crate::kernels::layer::QkvShape;
use crate::reference::rebuild::rope_rotary;
use shadowkv_kernels::layer::GatedActivation;
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

/// [`embedding`] times `scale`.
pub fn embedding_scaled(table: &[bf16], hidden: usize, ids: &[u32], scale: f32) -> Vec<f64> {
    let mut rows = embedding(table, hidden, ids);
    rows.iter_mut().for_each(|x| *x *= scale as f64);
    rows
}

/// Each `hidden`-wide row of `x` divided by its RMS (`sqrt(mean(x^2) + eps)`), times `weight`.
pub fn rms_normalise(x: &[f64], weight: &[f32], eps: f32) -> Vec<f64> {
    let hidden = weight.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(hidden) {
        let mean_square = row.iter().map(|x| x * x).sum::<f64>() / hidden as f64;
        let inverse = 1.0 / (mean_square + eps as f64).sqrt();
        out.extend(row.iter().zip(weight).map(|(x, &w)| x * inverse * w as f64));
    }
    out
}

/// `residual += rmsnorm(delta) * delta_weight`, then the RMSNorm of each row times `weight`
/// (both norms with `eps`); returns the new residual and the normalised rows.
pub fn rms_norm_normed_delta(
    residual: &[f32],
    delta: &[f32],
    delta_weight: &[f32],
    weight: &[f32],
    eps: f32,
) -> (Vec<f64>, Vec<f64>) {
    let delta: Vec<f64> = delta.iter().map(|&x| x as f64).collect();
    let normed_delta = rms_normalise(&delta, delta_weight, eps);
    let summed: Vec<f64> = residual
        .iter()
        .zip(&normed_delta)
        .map(|(&x, d)| x as f64 + d)
        .collect();
    let out = rms_normalise(&summed, weight, eps);
    (summed, out)
}

/// `residual += delta`, then the RMSNorm of each row times `weight`; returns the new
/// residual and the normalised rows.
pub fn rms_norm(
    residual: &[f32],
    delta: Option<&[f32]>,
    weight: &[f32],
    eps: f32,
) -> (Vec<f64>, Vec<f64>) {
    let summed: Vec<f64> = residual
        .iter()
        .enumerate()
        .map(|(i, &x)| x as f64 + delta.map_or(0.0, |d| d[i] as f64))
        .collect();
    let out = rms_normalise(&summed, weight, eps);
    (summed, out)
}

/// The rotated queries `[tokens, heads, head_dim]` and the keys before RoPE
/// (`[tokens, kv_heads * head_dim]`), and the K/V caches with each token's rotated key and
/// value written at its placement's cache row (other elements unchanged). The rotation is
/// `rotary` with its `rotary_dim / 2` `inverse_frequencies`. With `qk_norm` (the query and
/// key weights of `head_dim` and epsilon), each query and key head is RMS-normalised after
/// the bias and before RoPE, and the pre-RoPE keys are the normed ones.
#[allow(clippy::too_many_arguments)]
pub fn rope_qkv(
    shape: QkvShape,
    qkv: &[f32],
    bias: Option<&[f32]>,
    qk_norm: Option<(&[f32], &[f32], f32)>,
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
            if let Some((q_weight, _, eps)) = qk_norm {
                query = rms_normalise(&query, q_weight, eps);
            }
            rope_rotary(&mut query, position, inverse_frequencies, rotary);
            q.extend(query);
        }
        let layout = layouts[placement.sequence as usize];
        for head in 0..kv_heads {
            let mut key = row[(heads + head) * d..(heads + head + 1) * d].to_vec();
            if let Some((_, k_weight, eps)) = qk_norm {
                key = rms_normalise(&key, k_weight, eps);
            }
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
    gated_activation(gate_up, width, GatedActivation::Silu)
}

/// `act(gate) * up` of each row of the fused `[rows, 2 * width]` projection: SiLU, or GELU
/// with the tanh approximation.
pub fn gated_activation(gate_up: &[f32], width: usize, activation: GatedActivation) -> Vec<f64> {
    gate_up
        .chunks_exact(2 * width)
        .flat_map(|row| {
            (0..width).map(move |i| {
                let (gate, up) = (row[i] as f64, row[width + i] as f64);
                activate(gate, activation) * up
            })
        })
        .collect()
}

/// The activation itself, in f64 (the tanh-GELU with `tanh` directly).
pub fn activate(x: f64, activation: GatedActivation) -> f64 {
    match activation {
        GatedActivation::Silu => x / (1.0 + (-x).exp()),
        GatedActivation::GeluTanh => {
            let inner = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            0.5 * x * (1.0 + inner.tanh())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tanh_gelu_matches_known_values() {
        // 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) at a few points, computed apart.
        for (x, expected) in [
            (0.0, 0.0),
            (1.0, 0.841_191_990_608_276_8),
            (-1.0, -0.158_808_009_391_723_24),
            (3.0, 2.996_362_607_918_227),
        ] {
            let got = activate(x, GatedActivation::GeluTanh);
            assert!((got - expected).abs() < 1e-12, "gelu({x}) = {got}");
        }
        let silu = activate(2.0, GatedActivation::Silu);
        assert!((silu - 2.0 / (1.0 + (-2.0f64).exp())).abs() < 1e-15);
    }

    #[test]
    fn normed_delta_norms_the_delta_then_the_sum() {
        let residual = [1.0f32, -2.0, 0.5, 3.0];
        let delta = [4.0f32, 0.0, -4.0, 0.0];
        let delta_weight = [0.5f32, 1.0, 2.0, 1.0];
        let weight = [1.0f32; 4];
        let (summed, out) = rms_norm_normed_delta(&residual, &delta, &delta_weight, &weight, 0.0);
        // rms(delta) = sqrt(32 / 4) = 2.83: the normed delta is [0.707, 0, -2.83, 0] weighted.
        let scale = 1.0 / 8.0f64.sqrt();
        let expected = [1.0 + 4.0 * scale * 0.5, -2.0, 0.5 - 4.0 * scale * 2.0, 3.0];
        for (got, want) in summed.iter().zip(expected) {
            assert!((got - want).abs() < 1e-12);
        }
        let rms = (expected.iter().map(|x| x * x).sum::<f64>() / 4.0).sqrt();
        assert!((out[3] - 3.0 / rms).abs() < 1e-12);
    }

    #[test]
    fn qk_norm_normalises_each_head_before_rope() {
        let shape = QkvShape {
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
        };
        let qkv: Vec<f32> = (0..shape.width()).map(|i| i as f32 - 6.5).collect();
        let q_weight = [1.0f32, 2.0, 0.5, 1.0];
        let k_weight = [0.25f32, 1.0, 1.0, 3.0];
        let layouts = [SequenceLayout {
            offset: 0,
            capacity: 1,
            len: 1,
        }];
        let placements = [TokenPlacement::new(0, 0)];
        let rotary = RotaryLayout::full(4);
        let (mut k, mut v) = (vec![0.0; 4], vec![0.0; 4]);
        // Position 0: RoPE is the identity, so the outputs are the normed heads.
        let (q, pre) = rope_qkv(
            shape,
            &qkv,
            None,
            Some((&q_weight, &k_weight, 1e-6)),
            (&[1.0, 0.1], &rotary),
            &placements,
            &layouts,
            &mut k,
            &mut v,
        );
        let norm = |x: &[f32], w: &[f32]| {
            let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 4.0 + 1e-6).sqrt();
            x.iter()
                .zip(w)
                .map(|(&v, &w)| v as f64 / rms * w as f64)
                .collect::<Vec<_>>()
        };
        let expected_q: Vec<f64> =
            [norm(&qkv[0..4], &q_weight), norm(&qkv[4..8], &q_weight)].concat();
        let expected_k = norm(&qkv[8..12], &k_weight);
        for (got, want) in q
            .iter()
            .chain(&pre)
            .chain(&k)
            .zip(expected_q.iter().chain(&expected_k).chain(&expected_k))
        {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
        let expected_v: Vec<f64> = qkv[12..16].iter().map(|&x| x as f64).collect();
        assert_eq!(v, expected_v);
    }
}
