//! Value fetch: copies each miss's `c * d` values (2 KiB at the defaults) from pinned,
//! device-mapped host memory into its sparse slot in the GPU value buffer. One warp per
//! chunk, every lane's loads issued before its stores, many warps in flight to cover the
//! PCIe latency. Runs on the copy stream beside `rebuild`.
//!
//! Blocks are `(split, kv_head, sequence)`; warp `w` of split `s` takes misses
//! `s * WARPS + w`, then every `splits * WARPS`-th, up to the count `plan` wrote on the GPU.

use crate::shadow::ShadowShape;

pub const WARPS: u32 = 8;
pub const THREADS: u32 = WARPS * 32;
/// 16-byte vectors each lane loads before storing them.
pub const VECTORS_IN_FLIGHT: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FetchParams {
    pub shape: ShadowShape,
    /// `[batch, Hkv, budget_chunks]` misses from `plan`.
    pub misses: u64,
    /// u32 `[batch, Hkv]`.
    pub miss_counts: u64,
    /// bf16 values (device address of mapped host memory, or device memory).
    pub values: u64,
    /// bf16 GPU value buffer (the K/V layout).
    pub v: u64,
    pub splits: u32,
    pub _reserved: u32,
}

pub const KERNEL_NAME: &str = "value_fetch";

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::device::*;
    use crate::shadow::{slot_base, Miss, ShadowSequence};

    /// # Safety
    /// The host launcher validated the layouts against the value buffers and launched
    /// `(splits, kv_heads, batch)` blocks of [`THREADS`].
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn value_fetch(p: FetchParams) {
        let shape = &p.shape;
        let (split, kv_head, sequence_index) = (block_idx_x(), block_idx_y(), block_idx_z());
        let (warp, lane) = (warp_id(), lane_id());
        let sequence = *(shape.sequences as *const ShadowSequence).add(sequence_index as usize);
        let k = shape.budget_chunks;
        let count = min_u32(
            *(p.miss_counts as *const u32)
                .add((sequence_index * shape.kv_heads + kv_head) as usize),
            k,
        );
        let misses =
            (p.misses as *const Miss).add(slot_base(sequence_index, kv_head, shape.kv_heads, k));
        let (c, d) = (shape.chunk_size, shape.head_dim);
        let vectors = c * d / 8;
        let mut m = split * WARPS + warp;
        while m < count {
            let miss = *misses.add(m as usize);
            if miss.chunk < sequence.chunks && miss.slot < k {
                let source = (p.values as *const Vec16)
                    .add((sequence.host_value_chunk(kv_head, miss.chunk, c, d) / 8) as usize);
                let target = (p.v as *mut Vec16).add(
                    (sequence.kv_row(kv_head, sequence.sparse_start + miss.slot * c, d) / 8)
                        as usize,
                );
                let mut first = lane;
                while first < vectors {
                    let mut held = [[0u32; 4]; VECTORS_IN_FLIGHT as usize];
                    for (i, vector) in held.iter_mut().enumerate() {
                        let at = first + i as u32 * 32;
                        if at < vectors {
                            *vector = load_host_mapped_16(source.add(at as usize));
                        }
                    }
                    for (i, vector) in held.iter().enumerate() {
                        let at = first + i as u32 * 32;
                        if at < vectors {
                            store_16(target.add(at as usize), *vector);
                        }
                    }
                    first += 32 * VECTORS_IN_FLIGHT;
                }
            }
            m += p.splits * WARPS;
        }
    }
}
