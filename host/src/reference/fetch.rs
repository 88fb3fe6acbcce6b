//! Reference for [`crate::kernels::fetch`]: each miss's values copied into its slot.
use half::bf16;

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
