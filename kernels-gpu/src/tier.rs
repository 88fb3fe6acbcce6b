//! The GPU value tier: GPU memory that holds value chunks in the host format, so that a miss
//! found there is copied over HBM instead of PCIe (and dequantised as the fetch does).
//!
//! Per (resident row, KV head) of a layer, a direct-mapped table of `chunks_per_head` entries:
//! chunk `x` may only live in entry `x % chunks_per_head`. `tags` holds the chunk id of each
//! entry ([`EMPTY_ENTRY`] if none), `data` its bytes (`[rows, Hkv, chunks_per_head]` entries of
//! [`entry_bytes`], the host format's codes then its scales).
//!
//! The fetch kernels keep it, per miss of a step, judged against the tags as the step found
//! them (the policy `shadowkv::reference::tier` models):
//! - a miss whose chunk is in its entry is a **tier hit**: its bytes come from the entry;
//! - any other miss is fetched over PCIe and **inserted** into its entry (the entry's bytes
//!   then its tag), unless a later miss of the same (sequence, head) in the step maps to the
//!   same entry (the latest fetch wins) or the entry's chunk is a tier hit of the step (being
//!   read).
//!
//! So the policy is recency of fetching: an entry holds the chunk last fetched over PCIe into
//! it. It needs no stamps and no atomics (each entry has one writer per step, decided from
//! the miss list alone), costs one tag load per miss and, per PCIe miss, one pass of the warp
//! over its head's miss list (at most `budget_chunks` entries, in L2). With `chunks_per_head`
//! at least the prompt's chunks every chunk has an entry of its own: after its first fetch
//! every miss is a tier hit, the values are on the GPU.

use crate::values::ValueFormat;

/// An entry of the tier that holds no chunk (a chunk id is below the prompt's chunks).
pub const EMPTY_ENTRY: u32 = u32::MAX;

/// What the fetch did with one miss (written per miss entry to `outcomes`, if asked for).
/// Fetched over PCIe and not kept in the tier.
pub const OUTCOME_FETCHED: u32 = 0;
/// Copied from the tier over HBM.
pub const OUTCOME_TIER_HIT: u32 = 1;
/// Fetched over PCIe and inserted into the tier.
pub const OUTCOME_INSERTED: u32 = 2;

/// Bytes of one entry: a chunk of one KV head in `format` (codes then scales), rounded up to
/// 16 so that every entry's codes are 16-byte aligned.
pub const fn entry_bytes(format: ValueFormat, chunk_size: usize, head_dim: usize) -> usize {
    format
        .chunk_bytes(chunk_size, head_dim)
        .next_multiple_of(16)
}

/// The entry chunk `chunk` maps to.
#[inline(always)]
pub fn entry_of(chunk: u32, chunks_per_head: u32) -> u32 {
    chunk % chunks_per_head.max(1)
}

/// Index of entry `entry` of (`resident_row`, `kv_head`) in `tags` (times [`entry_bytes`]:
/// its first byte in `data`).
#[inline(always)]
pub fn entry_index(
    resident_row: u32,
    kv_head: u32,
    kv_heads: u32,
    chunks_per_head: u32,
    entry: u32,
) -> usize {
    (resident_row as usize * kv_heads as usize + kv_head as usize) * chunks_per_head as usize
        + entry as usize
}

/// The tier as the fetch kernels see it (all zero: no tier).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TierParams {
    /// u32 `[rows, Hkv, chunks_per_head]` chunk id per entry; updated.
    pub tags: u64,
    /// `[rows, Hkv, chunks_per_head]` entries of [`entry_bytes`] bytes; updated.
    pub data: u64,
    /// u32 `[batch, Hkv, budget_chunks]` in mapped host memory: each miss entry's
    /// `OUTCOME_*` (the step's statistics); 0 for none.
    pub outcomes: u64,
    /// Entries per (row, KV head); 0: no tier.
    pub chunks_per_head: u32,
    pub _reserved: u32,
}

const _: () = assert!(core::mem::size_of::<TierParams>() == 32);
