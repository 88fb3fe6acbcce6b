//! Reference for [`crate::cache`]'s `kv_append`: the newest token of each sequence written at
//! row `kv.len` of its K/V block.
use half::bf16;

use crate::kernels::shadow::ShadowSequence;

/// Writes `keys` and `values` (`[batch, Hkv, d]`) into `k` and `v` at each sequence's
/// `kv.len` (the layouts before the append).
pub fn append(
    sequences: &[ShadowSequence],
    kv_heads: usize,
    head_dim: usize,
    keys: &[bf16],
    values: &[bf16],
    k: &mut [bf16],
    v: &mut [bf16],
) {
    for (b, sequence) in sequences.iter().enumerate() {
        for head in 0..kv_heads {
            let source = (b * kv_heads + head) * head_dim;
            let target = sequence.kv_row(head as u32, sequence.kv.len, head_dim as u32) as usize;
            k[target..target + head_dim].copy_from_slice(&keys[source..source + head_dim]);
            v[target..target + head_dim].copy_from_slice(&values[source..source + head_dim]);
        }
    }
}
