//! The ShadowKV state of one layer as the decode kernels see it: where each sequence's
//! landmarks, chunk ids, low-rank factors, host values and GPU K/V block live, and the index
//! math every decode family shares (`scoring`, `topk`, `plan`, `fetch`, `rebuild`).
//!
//! Per sequence `b` and KV head `h` (see `docs/ARCHITECTURE.md`, The decode step):
//! - landmarks `[Hkv, landmarks, d]` and chunk ids / scores `[Hkv, landmarks]`, from row
//!   `landmark_row`; logits `[Hkv, G, landmarks]` from row `landmark_row * G`;
//! - `A` `[prompt_len, rank]` at `a_offset`, `Bm` `[rank, Hkv * d]` at `bm_offset`;
//! - values `[Hkv, prompt_len, d]` at `host_value_offset` (a chunk of a head is contiguous);
//! - the GPU K/V block (`kv`), whose sparse slot `s` holds tokens
//!   `sparse_start + s * chunk_size ..` of each head;
//! - resident ids `[rows, Hkv, budget_chunks]` from row `resident_row` (the sequence's own row,
//!   kept while it lives, whatever its place in the batch of a step);
//! - selection and miss list `[B, Hkv, budget_chunks]` at the sequence's place `b` in the batch.

use crate::kv::SequenceLayout;

/// A resident slot that holds no chunk yet.
pub const EMPTY_SLOT: u32 = u32::MAX;

/// Where one sequence's ShadowKV state lives. Offsets are in elements of their buffers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ShadowSequence {
    /// First landmark row (per-head blocks of `landmarks` rows follow, head-major).
    pub landmark_row: u64,
    /// First element of `A`.
    pub a_offset: u64,
    /// First element of `Bm`.
    pub bm_offset: u64,
    /// First element of the values in the (host) value buffer.
    pub host_value_offset: u64,
    /// Landmarks per KV head (chunks that are neither outliers nor local).
    pub landmarks: u32,
    /// Chunks of the prompt a chunk id may name: ids are `< chunks`, `chunks * c <= prompt_len`.
    pub chunks: u32,
    /// Prompt tokens: rows of `A`, and the head stride of the values.
    pub prompt_len: u32,
    /// First token of sparse slot 0 in each head of the K/V block.
    pub sparse_start: u32,
    /// The sequence's row of the layer's resident ids (`[rows, Hkv, budget_chunks]`): the
    /// chunk each of its sparse slots holds, kept from one step to the next. Distinct among
    /// the sequences of a batch; not its index in the batch, so a step may run any subset of
    /// the sequences, in any order.
    pub resident_row: u32,
    /// Zero: keeps `kv` 8-byte aligned with no implicit padding.
    pub _reserved: u32,
    /// The GPU K/V block that attention reads.
    pub kv: SequenceLayout,
}

// The layout both sides agree on: 8-byte fields first, `kv` on an 8-byte boundary, no
// implicit padding (`Pod` on the host checks the same).
const _: () = assert!(core::mem::size_of::<ShadowSequence>() == 72);
const _: () = assert!(core::mem::offset_of!(ShadowSequence, kv) == 56);

impl ShadowSequence {
    /// First landmark row of head `kv_head` (index into chunk ids and scores; times `d`
    /// into landmarks).
    #[inline(always)]
    pub fn landmark_base(&self, kv_head: u32) -> u64 {
        self.landmark_row + kv_head as u64 * self.landmarks as u64
    }

    /// First logit of (`kv_head`, `g`) in the logits buffer.
    #[inline(always)]
    pub fn logit_base(&self, kv_head: u32, group: u32, g: u32) -> u64 {
        self.landmark_base(kv_head) * group as u64 + g as u64 * self.landmarks as u64
    }

    /// First element of token `token` of head `kv_head` in the K/V buffers.
    #[inline(always)]
    pub fn kv_row(&self, kv_head: u32, token: u32, head_dim: u32) -> u64 {
        self.kv.offset + (kv_head as u64 * self.kv.capacity as u64 + token as u64) * head_dim as u64
    }

    /// First resident id of head `kv_head` (the sequence's row of the resident ids).
    #[inline(always)]
    pub fn resident_base(&self, kv_head: u32, kv_heads: u32, budget_chunks: u32) -> usize {
        slot_base(self.resident_row, kv_head, kv_heads, budget_chunks)
    }

    /// First value of chunk `chunk` of head `kv_head` in the (host) value buffer.
    #[inline(always)]
    pub fn host_value_chunk(
        &self,
        kv_head: u32,
        chunk: u32,
        chunk_size: u32,
        head_dim: u32,
    ) -> u64 {
        self.host_value_offset
            + (kv_head as u64 * self.prompt_len as u64 + chunk as u64 * chunk_size as u64)
                * head_dim as u64
    }
}

/// Index of the first entry of (`sequence`, `kv_head`) in the `[B, Hkv, budget_chunks]`
/// buffers (selection, miss list: `sequence` is the place in the batch) and of the resident
/// ids (`sequence` is a [`ShadowSequence::resident_row`]).
#[inline(always)]
pub fn slot_base(sequence: u32, kv_head: u32, kv_heads: u32, budget_chunks: u32) -> usize {
    (sequence as usize * kv_heads as usize + kv_head as usize) * budget_chunks as usize
}

/// One cache miss: the chunk to bring in and the slot it goes to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct Miss {
    pub chunk: u32,
    pub slot: u32,
}

/// The parameters every decode family shares: the batch's shape and where the per-sequence
/// layouts are. Each family's params struct embeds it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ShadowShape {
    /// `[batch]` [`ShadowSequence`] (device address).
    pub sequences: u64,
    pub batch: u32,
    pub kv_heads: u32,
    /// Query heads per KV head (`G`).
    pub group: u32,
    pub head_dim: u32,
    /// Tokens per chunk (`c`).
    pub chunk_size: u32,
    /// Rank of the key factorisation (`r`).
    pub rank: u32,
    /// Chunks selected per (sequence, KV head): `S / c`.
    pub budget_chunks: u32,
    /// The launch's first sequence: its grid covers sequences `first_sequence ..`, so a step
    /// can run the batch in parts and overlap one part's fetch with the next part's scoring.
    pub first_sequence: u32,
}

// SAFETY: both are `#[repr(C)]` plain old data without padding (bytemuck::Pod), valid for
// any bit pattern, so cudarc may copy them to and from the device as bytes.
#[cfg(feature = "host")]
unsafe impl cudarc::driver::DeviceRepr for ShadowSequence {}
#[cfg(feature = "host")]
unsafe impl cudarc::driver::ValidAsZeroBits for ShadowSequence {}
#[cfg(feature = "host")]
unsafe impl cudarc::driver::DeviceRepr for Miss {}
#[cfg(feature = "host")]
unsafe impl cudarc::driver::ValidAsZeroBits for Miss {}

/// Limits the host validates against (the kernels rely on them).
pub const MAX_CHUNK_SIZE: u32 = 64;
/// Largest rank: `Bm_h` (`[r, d]` bf16) and the gathered `A` tiles fit in shared memory.
pub const MAX_RANK: u32 = 256;
/// Rank granularity: one `mma` k-step.
pub const RANK_STEP: u32 = 16;
