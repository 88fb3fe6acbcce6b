//! Reference for [`crate::kernels::rebuild`]: `A_rows · Bm_h` in f64, then RoPE in f64.
use half::bf16;

use shadowkv_kernels::rope::{pair_columns, RotaryLayout};

use crate::kernels::shadow::{ShadowConfig, ShadowSequence};

/// Rotate-half RoPE of one whole head `row` at `position`, with the kernels' inverse
/// frequencies.
pub fn rope(row: &mut [f64], position: usize, inverse_frequencies: &[f64]) {
    rope_rotary(
        row,
        position,
        inverse_frequencies,
        &RotaryLayout::full(row.len() as u32),
    );
}

/// RoPE of one head `row` at `position` as `rotary` says (the rotated part, its pairing and
/// the attention factor), with the kernels' `rotary_dim / 2` inverse frequencies.
pub fn rope_rotary(
    row: &mut [f64],
    position: usize,
    inverse_frequencies: &[f64],
    rotary: &RotaryLayout,
) {
    let scale = rotary.attention_factor as f64;
    for (i, frequency) in inverse_frequencies.iter().enumerate() {
        let (low_column, high_column, rotated) = pair_columns(i as u32, rotary);
        let (low_column, high_column) = (low_column as usize, high_column as usize);
        if !rotated || high_column >= row.len() {
            continue;
        }
        let (sin, cos) = (position as f64 * frequency).sin_cos();
        let (sin, cos) = (sin * scale, cos * scale);
        let (low, high) = (row[low_column], row[high_column]);
        row[low_column] = low * cos - high * sin;
        row[high_column] = high * cos + low * sin;
    }
}

/// The `c` post-RoPE keys `[c, d]` of chunk `chunk` of head `h`, rebuilt from `A` and `Bm`
/// (rotate-half RoPE of whole heads).
pub fn chunk_keys(
    config: &ShadowConfig,
    sequence: &ShadowSequence,
    h: usize,
    chunk: u32,
    a: &[bf16],
    bm: &[bf16],
    inverse_frequencies: &[f64],
) -> Vec<f64> {
    let rotary = RotaryLayout::full(config.head_dim as u32);
    let factors = Factors { a, bm };
    chunk_keys_rotary(
        config,
        sequence,
        (h, chunk),
        factors,
        inverse_frequencies,
        &rotary,
    )
}

/// The factors `A` and `Bm` of a layer, as the GPU holds them.
#[derive(Clone, Copy, Debug)]
pub struct Factors<'a> {
    /// bf16 `A` of every sequence.
    pub a: &'a [bf16],
    /// bf16 `Bm` of every sequence.
    pub bm: &'a [bf16],
}

/// [`chunk_keys`] of `(head, chunk)` with the RoPE variant `rotary` (partial rotary, adjacent
/// pairs, an attention factor).
pub fn chunk_keys_rotary(
    config: &ShadowConfig,
    sequence: &ShadowSequence,
    (h, chunk): (usize, u32),
    Factors { a, bm }: Factors<'_>,
    inverse_frequencies: &[f64],
    rotary: &RotaryLayout,
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
        rope_rotary(row, token, inverse_frequencies, rotary);
    }
    keys
}
