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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::values::quantise_sequence;
    use shadowkv_kernels::kv::SequenceLayout;

    /// Each miss's slot gets its chunk's dequantised values rounded to bf16; every other row
    /// keeps its poison.
    #[test]
    fn packed_misses_fill_their_slots_and_nothing_else() {
        let config = ShadowConfig {
            q_heads: 4,
            kv_heads: 2,
            head_dim: 32,
            chunk_size: 3,
            rank: 16,
            budget_chunks: 4,
        };
        let (heads, c, d) = (config.kv_heads, config.chunk_size, config.head_dim);
        let sequence = ShadowSequence {
            host_value_offset: 32,
            chunks: 6,
            prompt_len: 20,
            sparse_start: 5,
            kv: SequenceLayout {
                offset: 8,
                capacity: 5 + 4 * 3 + 2,
                len: 5 + 4 * 3,
            },
            ..ShadowSequence::default()
        };
        let capacity = 20;
        let source: Vec<bf16> = (0..heads * capacity * d)
            .map(|i| bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 13.0))
            .collect();
        let misses = [Miss { chunk: 4, slot: 2 }, Miss { chunk: 0, slot: 0 }];
        let poison = bf16::from_bits(0x7fc1);
        for format in [ValueFormat::Fp8, ValueFormat::Int4] {
            let mut bytes = vec![0u8; 32 + format.packed_bytes(heads, 6, c, d)];
            quantise_sequence(format, &config, &source, 0, capacity, &sequence, &mut bytes);
            let kv_len = 8 + heads * sequence.kv.capacity as usize * d;
            let mut v = vec![poison; kv_len];
            fetch_packed(&config, &sequence, 1, &misses, format, &bytes, &mut v);
            let mut written = vec![false; kv_len];
            for miss in &misses {
                let values =
                    dequantise_chunk(format, &config, &sequence, &bytes, 1, miss.chunk as usize);
                let row = sequence.kv_row(1, sequence.sparse_start + miss.slot * c as u32, d as u32)
                    as usize;
                for (i, x) in values.iter().enumerate() {
                    assert_eq!(v[row + i], bf16::from_f32(*x), "{format:?} {miss:?} {i}");
                    written[row + i] = true;
                }
                // The dequantised chunk is close to the prompt's values.
                let first = (capacity + miss.chunk as usize * c) * d;
                for (x, y) in values.iter().zip(&source[first..first + c * d]) {
                    assert!((x - y.to_f32()).abs() < 0.5, "{format:?}: {x} against {y}");
                }
            }
            for (i, value) in v.iter().enumerate() {
                if !written[i] {
                    assert_eq!(
                        value.to_bits(),
                        poison.to_bits(),
                        "{format:?}: row element {i}"
                    );
                }
            }
        }
    }
}
