//! Reference for [`crate::kernels::fetch`]: each miss's values copied into its slot, or
//! dequantised into it from a compressed format.
use half::bf16;

use super::values::{dequantise_chunk, ValueFormat};
use crate::kernels::shadow::{Miss, ShadowConfig, ShadowSequence};

/// Copies the `c * d` values of every miss of head `h` from `values` into `v`.
pub fn fetch(
    config: &ShadowConfig,
    sequence: &ShadowSequence,
    h: usize,
    misses: &[Miss],
    values: &[bf16],
    v: &mut [bf16],
) {
    let (c, d) = (config.chunk_size as u32, config.head_dim as u32);
    let len = (c * d) as usize;
    for miss in misses {
        let source = sequence.host_value_chunk(h as u32, miss.chunk, c, d) as usize;
        let target = sequence.kv_row(h as u32, sequence.sparse_start + miss.slot * c, d) as usize;
        v[target..target + len].copy_from_slice(&values[source..source + len]);
    }
}

/// Dequantises the chunk of every miss of head `h` from `bytes` (the compressed layout of
/// `format`) into its slot of `v`, each value rounded to bf16 (nearest even).
pub fn fetch_packed(
    config: &ShadowConfig,
    sequence: &ShadowSequence,
    h: usize,
    misses: &[Miss],
    format: ValueFormat,
    bytes: &[u8],
    v: &mut [bf16],
) {
    let (c, d) = (config.chunk_size as u32, config.head_dim as u32);
    for miss in misses {
        let values = dequantise_chunk(format, config, sequence, bytes, h, miss.chunk as usize);
        let target = sequence.kv_row(h as u32, sequence.sparse_start + miss.slot * c, d) as usize;
        for (slot, x) in v[target..target + values.len()].iter_mut().zip(values) {
            *slot = bf16::from_f32(x);
        }
    }
}
