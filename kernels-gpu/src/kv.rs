//! Where a sequence's K/V block lies in the K and V buffers: read by decode attention and
//! named by the ShadowKV state (`shadow`), the layer kernels and the prefill, so it belongs to
//! none of them.

/// Placement of one sequence's K/V block in the K and V buffers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct SequenceLayout {
    /// First element of the sequence's block; a multiple of `attention::VECTOR` (the 16-byte
    /// vector of bf16 every thread loads).
    pub offset: u64,
    /// Tokens per KV head in the block (the head stride, in rows).
    pub capacity: u32,
    /// Valid tokens per KV head, `1..=capacity`.
    pub len: u32,
}
