//! The ShadowKV cache's one decode-time kernel besides the step's: `kv_append` writes each
//! sequence's newest token (post-RoPE key and value, `[batch, Hkv, d]`) at row `kv.len` of its
//! GPU K/V block, the generated-token part after the sparse slots.

/// Threads per block: one 16-byte vector each (a block per (sequence, KV head)).
pub const THREADS: u32 = 32;
pub const KERNEL_NAME: &str = "kv_append";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct AppendParams {
    /// `[batch]` [`ShadowSequence`](crate::shadow::ShadowSequence): `kv.len` is the row written.
    pub sequences: u64,
    /// bf16 `[batch, Hkv, d]` new keys and values.
    pub keys: u64,
    pub values: u64,
    /// bf16 GPU K/V buffers of the layer.
    pub k: u64,
    pub v: u64,
    pub kv_heads: u32,
    pub head_dim: u32,
}

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::device::*;
    use crate::shadow::ShadowSequence;

    /// # Safety
    /// The host checked that every sequence's `kv.len < kv.capacity` and the buffers' sizes,
    /// and launched `(batch, kv_heads)` blocks of [`THREADS`].
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn kv_append(p: AppendParams) {
        let (sequence_index, head) = (block_idx_x(), block_idx_y());
        let sequence = &*(p.sequences as *const ShadowSequence).add(sequence_index as usize);
        let mut vector = thread_idx_x();
        while vector < p.head_dim / 8 {
            let source = ((sequence_index * p.kv_heads + head) * p.head_dim / 8 + vector) as usize;
            let target =
                (sequence.kv_row(head, sequence.kv.len, p.head_dim) / 8) as usize + vector as usize;
            store_16(
                (p.k as *mut Vec16).add(target),
                load_16((p.keys as *const Vec16).add(source)),
            );
            store_16(
                (p.v as *mut Vec16).add(target),
                load_16((p.values as *const Vec16).add(source)),
            );
            vector += THREADS;
        }
    }
}
