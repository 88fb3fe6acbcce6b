//! The per-step input block of a decode step that reads everything that changes from one
//! step to the next from device memory (so its launches can be captured once in a CUDA graph
//! and replayed): where each input lies in the block, what goes in it, and what a captured
//! step is valid for. Pure host code, checked on the CPU.
use std::ops::Range;

use shadowkv::cache::SequenceId;
use shadowkv::kernels::layer::kernel_layout::TokenPlacement;
use shadowkv::{SequenceLayout, ShadowSequence};

use crate::error::{Error, Result};

/// 64-bit words of `count` items of `T` (every section starts on a word, and `T`'s size is a
/// multiple of 4 bytes, so a section of u32 items keeps 4-byte alignment).
fn words_of<T>(count: usize) -> usize {
    (count * std::mem::size_of::<T>()).div_ceil(8)
}

/// Where each input of one step of `batch` sequences lies in the block (ranges of 64-bit
/// words). The block is uploaded with one host-to-device copy before the step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepInputLayout {
    /// Sequences in the step (one token each).
    pub batch: usize,
    /// `[batch]` u32 token ids.
    pub ids: Range<usize>,
    /// `[batch]` [`TokenPlacement`]s: each token's RoPE position and cache row.
    pub placements: Range<usize>,
    /// `[batch]` [`SequenceLayout`]s the attention reads (each sequence's K/V block with the
    /// new token counted).
    pub attention_layouts: Range<usize>,
    /// ShadowKV: `[batch]` [`ShadowSequence`]s before the step's append (empty for full
    /// attention).
    pub shadow_before: Range<usize>,
    /// ShadowKV: `[batch]` [`ShadowSequence`]s after it (empty for full attention).
    pub shadow_after: Range<usize>,
    /// Words of the whole block.
    pub words: usize,
}

impl StepInputLayout {
    /// The block of a step of `batch` sequences; with `shadow`, the ShadowKV layouts too.
    pub fn new(batch: usize, shadow: bool) -> StepInputLayout {
        let mut next = 0;
        let mut take = |words: usize| {
            let range = next..next + words;
            next += words;
            range
        };
        let ids = take(words_of::<u32>(batch));
        let placements = take(words_of::<TokenPlacement>(batch));
        let attention_layouts = take(words_of::<SequenceLayout>(batch));
        let shadow_words = if shadow {
            words_of::<ShadowSequence>(batch)
        } else {
            0
        };
        let shadow_before = take(shadow_words);
        let shadow_after = take(shadow_words);
        StepInputLayout {
            batch,
            ids,
            placements,
            attention_layouts,
            shadow_before,
            shadow_after,
            words: next,
        }
    }

    /// Byte offset of `words` in the block.
    pub fn byte_offset(words: &Range<usize>) -> u64 {
        words.start as u64 * 8
    }

    /// The block of one step: `tokens`, `placements` and `attention_layouts` (one per
    /// sequence), and with ShadowKV the layouts before and after the append. An error names
    /// the first input whose length does not match the batch or the block's kind.
    pub fn fill(
        &self,
        tokens: &[u32],
        placements: &[TokenPlacement],
        attention_layouts: &[SequenceLayout],
        shadow: Option<(&[ShadowSequence], &[ShadowSequence])>,
    ) -> Result<Vec<u64>> {
        let mut block = vec![0u64; self.words];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut block);
        let mut put = |range: &Range<usize>, data: &[u8], what: &'static str| -> Result<()> {
            let start = range.start * 8;
            if data.len() > range.len() * 8 || data.len() + 8 <= range.len() * 8 {
                return Err(crate::error::invalid_input(
                    what,
                    format!("holds {} bytes", data.len()),
                    format!("one entry per sequence of the step's {}", self.batch),
                ));
            }
            bytes[start..start + data.len()].copy_from_slice(data);
            Ok(())
        };
        put(&self.ids, bytemuck::cast_slice(tokens), "tokens")?;
        put(
            &self.placements,
            bytemuck::cast_slice(placements),
            "placements",
        )?;
        put(
            &self.attention_layouts,
            bytemuck::cast_slice(attention_layouts),
            "attention_layouts",
        )?;
        match shadow {
            Some((before, after)) if !self.shadow_before.is_empty() => {
                put(&self.shadow_before, bytemuck::cast_slice(before), "before")?;
                put(&self.shadow_after, bytemuck::cast_slice(after), "after")?;
            }
            None if self.shadow_before.is_empty() => {}
            _ => {
                return Err(crate::error::invalid_input(
                    "shadow",
                    "does not match the block's kind",
                    "ShadowKV layouts exactly for a ShadowKV block",
                ))
            }
        }
        Ok(block)
    }
}

/// What a captured step is valid for: its launches bake the addresses of the cache's buffers,
/// the batch size (grids, tensor shapes) and, for ShadowKV, the grids that follow from the
/// sequences' prompts (scoring tiles, top-k clusters, parts) and the selection options.
/// Another key needs another capture.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StepKey {
    /// Full attention over every sequence of one cache.
    Full {
        /// The cache's identity ([`GpuKvCache`](super::GpuKvCache) numbers each one).
        cache: u64,
        /// Sequences (one token each).
        batch: usize,
    },
    /// ShadowKV over every live sequence of one cache.
    Shadow {
        /// The cache's identity.
        cache: u64,
        /// The live sequences, in step order.
        sequences: Vec<SequenceId>,
        /// The scripted hit rate's bits (SYNTHETIC SELECTION), if one is set.
        scripted_hit_rate: Option<u64>,
    },
}

impl StepKey {
    /// Sequences in a step of this key.
    pub fn batch(&self) -> usize {
        match self {
            StepKey::Full { batch, .. } => *batch,
            StepKey::Shadow { sequences, .. } => sequences.len(),
        }
    }
}

/// How many steps a [`DecodeRunner`](super::DecodeRunner) keeps ready, and how large.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepLimits {
    /// The largest batch a step may have (its buffers are allocated per batch shape).
    pub max_batch: usize,
    /// Batch shapes kept at once (captured graphs and their buffers); the least recently
    /// used is dropped for a new one.
    pub max_shapes: usize,
}

impl Default for StepLimits {
    fn default() -> Self {
        StepLimits {
            max_batch: 256,
            max_shapes: 4,
        }
    }
}

impl StepLimits {
    /// Checks a step of `batch` sequences against the limits: a typed error past
    /// `max_batch` (nothing is captured or changed).
    pub fn check(&self, batch: usize) -> Result<()> {
        if batch == 0 || batch > self.max_batch {
            return Err(Error::PastCapturedShapes {
                batch,
                max_batch: self.max_batch,
            });
        }
        Ok(())
    }
}

/// The shapes kept, most recently used last: where `key` is (moved to the end), or `None`
/// with the index of the shape to drop first, if the store is full, to make room.
pub fn find_or_evict<T>(
    store: &mut Vec<(StepKey, T)>,
    key: &StepKey,
    max_shapes: usize,
) -> (Option<usize>, Option<(StepKey, T)>) {
    if let Some(at) = store.iter().position(|(k, _)| k == key) {
        let entry = store.remove(at);
        store.push(entry);
        return (Some(store.len() - 1), None);
    }
    let evicted = (store.len() >= max_shapes.max(1)).then(|| store.remove(0));
    (None, evicted)
}
