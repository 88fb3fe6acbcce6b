//! Reference for [`crate::kernels::rebuild`]: `A_rows · Bm_h` in f64, then RoPE in f64.
use half::bf16;

use crate::kernels::shadow::{ShadowConfig, ShadowSequence};

/// Rotate-half RoPE of one row at `position`, with the kernels' inverse frequencies.
pub fn rope(row: &mut [f64], position: usize, inverse_frequencies: &[f64]) {
    let half = row.len() / 2;
    for (i, frequency) in inverse_frequencies.iter().enumerate().take(half) {
        let (sin, cos) = (position as f64 * frequency).sin_cos();
        let (low, high) = (row[i], row[i + half]);
        row[i] = low * cos - high * sin;
        row[i + half] = high * cos + low * sin;
    }
}

/// The `c` post-RoPE keys `[c, d]` of chunk `chunk` of head `h`, rebuilt from `A` and `Bm`.
pub fn chunk_keys(
    config: &ShadowConfig,
    sequence: &ShadowSequence,
    h: usize,
    chunk: u32,
    a: &[bf16],
    bm: &[bf16],
    inverse_frequencies: &[f64],
) -> Vec<f64> {
    let (c, d, r) = (config.chunk_size, config.head_dim, config.rank);
    let bm_stride = config.kv_heads * d;
    let mut keys = vec![0.0f64; c * d];
    for t in 0..c {
        let token = chunk as usize * c + t;
        let a_row = &a[sequence.a_offset as usize + token * r..][..r];
        let row = &mut keys[t * d..][..d];
        for (j, out) in row.iter_mut().enumerate() {
            *out = (0..r)
                .map(|i| {
                    a_row[i].to_f64()
                        * bm[sequence.bm_offset as usize + i * bm_stride + h * d + j].to_f64()
                })
                .sum();
        }
        rope(row, token, inverse_frequencies);
    }
    keys
}
