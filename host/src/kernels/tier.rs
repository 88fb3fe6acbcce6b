//! The GPU value tier (see `shadowkv_kernels::tier`): per layer, a direct-mapped table of
//! value chunks in the host format for each (resident row, KV head), kept by the fetch
//! kernels ([`fetch::run_tiered`](crate::kernels::fetch::run_tiered)). This module owns its
//! buffers and their sizes; the policy's CPU model is [`crate::reference::tier`].
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
pub use shadowkv_kernels::tier as kernel_layout;
use shadowkv_kernels::tier::{entry_bytes, EMPTY_ENTRY};
use shadowkv_kernels::values::ValueFormat;

use crate::error::{invalid, Result};

const _: () = assert!(EMPTY_ENTRY == u32::MAX);

/// GPU bytes of one layer's tier: `rows * kv_heads * chunks_per_head` entries of the format's
/// chunk (rounded up to 16 bytes) and a 4-byte tag each.
pub fn layer_bytes(
    format: ValueFormat,
    rows: usize,
    kv_heads: usize,
    chunks_per_head: usize,
    chunk_size: usize,
    head_dim: usize,
) -> u64 {
    let entries = (rows * kv_heads * chunks_per_head) as u64;
    entries * (entry_bytes(format, chunk_size, head_dim) as u64 + 4)
}

/// The largest `chunks_per_head` whose tiers (one per layer) fit in `bytes`; 0 if not even one
/// chunk does.
pub fn chunks_per_head_for(
    bytes: u64,
    format: ValueFormat,
    layers: usize,
    rows: usize,
    kv_heads: usize,
    chunk_size: usize,
    head_dim: usize,
) -> usize {
    let one = layers as u64 * layer_bytes(format, rows, kv_heads, 1, chunk_size, head_dim);
    (bytes / one.max(1)) as usize
}

/// Checks a tier of `chunks_per_head` entries against the longest prompt's `longest_chunks`
/// chunk ids: at least one entry, and no more than the chunks (that many hold every value).
pub fn check_chunks_per_head(chunks_per_head: usize, longest_chunks: usize) -> Result<()> {
    if chunks_per_head == 0 {
        return Err(invalid(
            "value tier",
            "has no entries (0 chunks per KV head)",
            "at least one chunk per KV head, or values without a tier (ValueHome::Host)",
        ));
    }
    if chunks_per_head > longest_chunks.max(1) {
        return Err(invalid(
            "value tier",
            format!("holds {chunks_per_head} chunks per KV head"),
            format!(
                "at most the longest prompt's {} chunks per KV head (that many hold every value)",
                longest_chunks.max(1)
            ),
        ));
    }
    if u32::try_from(chunks_per_head).is_err() {
        return Err(invalid(
            "value tier",
            format!("holds {chunks_per_head} chunks per KV head"),
            "below 2^32",
        ));
    }
    Ok(())
}

/// One layer's tier on the GPU.
pub struct ValueTier {
    /// u32 `[rows, Hkv, chunks_per_head]` chunk id of each entry
    /// ([`EMPTY_ENTRY`] if none).
    pub tags: CudaSlice<u32>,
    /// `[rows, Hkv, chunks_per_head]` entries of
    /// [`entry_bytes`] bytes: the chunk in the host format.
    pub data: CudaSlice<u8>,
    /// Entries per (row, KV head).
    pub chunks_per_head: usize,
    /// The format of the entries (the layer's value format).
    pub format: ValueFormat,
    /// KV heads per row.
    pub kv_heads: usize,
}

impl ValueTier {
    /// An empty tier of `rows` rows (every tag [`EMPTY_ENTRY`]) on `stream`.
    pub fn new(
        stream: &Arc<CudaStream>,
        format: ValueFormat,
        rows: usize,
        kv_heads: usize,
        chunks_per_head: usize,
        chunk_size: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let entries = (rows * kv_heads * chunks_per_head).max(1);
        // SAFETY: the data of an entry is read only once its tag names a chunk, which the
        // fetch sets after writing the entry; the tags are set just below.
        let data = unsafe { stream.alloc(entries * entry_bytes(format, chunk_size, head_dim)) }?;
        let mut tier = ValueTier {
            // SAFETY: every tag is set below before any kernel reads it.
            tags: unsafe { stream.alloc(entries) }?,
            data,
            chunks_per_head,
            format,
            kv_heads,
        };
        let all = tier.tags.len();
        tier.clear(stream, 0..all)?;
        Ok(tier)
    }

    /// Rows of the tier.
    pub fn rows(&self) -> usize {
        self.tags.len() / (self.kv_heads * self.chunks_per_head).max(1)
    }

    /// Empties every entry of resident row `row` on `stream` (a new sequence takes the row:
    /// the chunk ids it held named another sequence's values).
    pub fn clear_row(&mut self, stream: &CudaStream, row: u32) -> Result<()> {
        let per_row = self.kv_heads * self.chunks_per_head;
        let first = row as usize * per_row;
        if first + per_row > self.tags.len() {
            return Err(invalid(
                "row",
                format!("is {row}"),
                format!("below the tier's {} rows", self.rows()),
            ));
        }
        self.clear(stream, first..first + per_row)
    }

    /// Marks tags `range` empty (all bits set) on `stream`.
    fn clear(&mut self, stream: &CudaStream, range: std::ops::Range<usize>) -> Result<()> {
        stream.context().bind_to_thread()?;
        let mut tags = self.tags.slice_mut(range);
        let words = tags.len();
        let (address, _guard) = tags.device_ptr_mut(stream);
        // SAFETY: `words` u32 cover exactly the view behind `address`, written in order on
        // `stream`; the guard is held until the memset is queued.
        unsafe {
            cudarc::driver::sys::cuMemsetD32Async(address, EMPTY_ENTRY, words, stream.cu_stream())
        }
        .result()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes per entry and the sizing from bytes agree: the chunks found fit, one more
    /// does not.
    #[test]
    fn sizing_from_bytes_is_the_largest_that_fits() {
        for format in ValueFormat::ALL {
            let (layers, rows, heads, c, d) = (32, 4, 8, 8, 128);
            let one = layer_bytes(format, rows, heads, 1, c, d);
            assert_eq!(
                one,
                (rows * heads) as u64 * (entry_bytes(format, c, d) as u64 + 4)
            );
            for bytes in [0u64, one * 32 - 1, one * 32, 5 << 30, 40 << 30] {
                let t = chunks_per_head_for(bytes, format, layers, rows, heads, c, d);
                let total = |t| layers as u64 * layer_bytes(format, rows, heads, t, c, d);
                assert!(total(t) <= bytes, "{format:?} {bytes}");
                assert!(total(t + 1) > bytes, "{format:?} {bytes}");
            }
        }
        // c = 8, d = 128: bf16 2048, fp8 1028 -> 1040, int4 576 bytes an entry.
        assert_eq!(entry_bytes(ValueFormat::Bf16, 8, 128), 2048);
        assert_eq!(entry_bytes(ValueFormat::Fp8, 8, 128), 1040);
        assert_eq!(entry_bytes(ValueFormat::Int4, 8, 128), 576);
    }

    /// A tier with no entries, or more than the longest prompt has chunks, is refused with
    /// what would do.
    #[test]
    fn bad_tier_sizes_are_refused() {
        let zero = check_chunks_per_head(0, 100).unwrap_err().to_string();
        assert!(zero.contains("at least one chunk"), "{zero}");
        let big = check_chunks_per_head(101, 100).unwrap_err().to_string();
        assert!(
            big.contains("at most the longest prompt's 100 chunks"),
            "{big}"
        );
        check_chunks_per_head(100, 100).unwrap();
        check_chunks_per_head(1, 100).unwrap();
    }
}
