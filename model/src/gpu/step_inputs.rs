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
    /// ShadowKV with sliding-window layers: `[batch]` [`TokenPlacement`]s of each token in its
    /// sequence's slot of the local layers' cache (empty otherwise).
    pub local_placements: Range<usize>,
    /// ShadowKV with sliding-window layers: `[batch]` [`SequenceLayout`]s of each sequence's
    /// slot with the new token counted, which the windowed attention reads (empty otherwise).
    pub local_layouts: Range<usize>,
    /// Words of the whole block.
    pub words: usize,
}

impl StepInputLayout {
    /// The block of a step of `batch` sequences; with `shadow`, the ShadowKV layouts too.
    pub fn new(batch: usize, shadow: bool) -> StepInputLayout {
        StepInputLayout::with_local_layers(batch, shadow, false)
    }

    /// [`new`](Self::new); with `local` (a ShadowKV step of a model with sliding-window
    /// layers), the local layers' placements and layouts too.
    pub fn with_local_layers(batch: usize, shadow: bool, local: bool) -> StepInputLayout {
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
        let (placement_words, layout_words) = if shadow && local {
            (
                words_of::<TokenPlacement>(batch),
                words_of::<SequenceLayout>(batch),
            )
        } else {
            (0, 0)
        };
        let local_placements = take(placement_words);
        let local_layouts = take(layout_words);
        StepInputLayout {
            batch,
            ids,
            placements,
            attention_layouts,
            shadow_before,
            shadow_after,
            local_placements,
            local_layouts,
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
        let batch = self.batch;
        let mut put = |range: &Range<usize>, count: usize, data: &[u8], what: &'static str| {
            if count != batch {
                return Err(crate::error::invalid_input(
                    what,
                    format!("holds {count} entries"),
                    format!("one per sequence of the step's {batch}"),
                ));
            }
            let start = range.start * 8;
            bytes[start..start + data.len()].copy_from_slice(data);
            Ok(())
        };
        put(
            &self.ids,
            tokens.len(),
            bytemuck::cast_slice(tokens),
            "tokens",
        )?;
        put(
            &self.placements,
            placements.len(),
            bytemuck::cast_slice(placements),
            "placements",
        )?;
        put(
            &self.attention_layouts,
            attention_layouts.len(),
            bytemuck::cast_slice(attention_layouts),
            "attention_layouts",
        )?;
        match shadow {
            Some((before, after)) if !self.shadow_before.is_empty() => {
                put(
                    &self.shadow_before,
                    before.len(),
                    bytemuck::cast_slice(before),
                    "before",
                )?;
                put(
                    &self.shadow_after,
                    after.len(),
                    bytemuck::cast_slice(after),
                    "after",
                )?;
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

    /// Writes the sliding-window layers' `placements` and `layouts` (one per sequence) into
    /// `block` (made by [`fill`](Self::fill)). An error if the block has no such sections or
    /// an input's length does not match the batch.
    pub fn fill_local(
        &self,
        block: &mut [u64],
        placements: &[TokenPlacement],
        layouts: &[SequenceLayout],
    ) -> Result<()> {
        let batch = self.batch;
        if self.local_placements.is_empty() || block.len() != self.words {
            return Err(crate::error::invalid_input(
                "block",
                "has no sections for sliding-window layers",
                "a block laid out with_local_layers",
            ));
        }
        for (what, count) in [
            ("local placements", placements.len()),
            ("local layouts", layouts.len()),
        ] {
            if count != batch {
                return Err(crate::error::invalid_input(
                    what,
                    format!("holds {count} entries"),
                    format!("one per sequence of the step's {batch}"),
                ));
            }
        }
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(block);
        let mut put = |range: &Range<usize>, data: &[u8]| {
            let start = range.start * 8;
            bytes[start..start + data.len()].copy_from_slice(data);
        };
        put(&self.local_placements, bytemuck::cast_slice(placements));
        put(&self.local_layouts, bytemuck::cast_slice(layouts));
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sequence(len: u32) -> ShadowSequence {
        ShadowSequence {
            kv: SequenceLayout {
                offset: 64,
                capacity: 100,
                len,
            },
            resident_row: len,
            ..ShadowSequence::default()
        }
    }

    #[test]
    fn sections_follow_each_other_without_overlap() {
        for batch in [1, 2, 3, 7, 64] {
            for shadow in [false, true] {
                let layout = StepInputLayout::new(batch, shadow);
                let sections = [
                    &layout.ids,
                    &layout.placements,
                    &layout.attention_layouts,
                    &layout.shadow_before,
                    &layout.shadow_after,
                ];
                for pair in sections.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start, "batch {batch}");
                }
                assert_eq!(layout.shadow_after.end, layout.words);
                assert_eq!(layout.ids.len(), (batch * 4).div_ceil(8));
                assert_eq!(layout.placements.len(), batch * 2);
                assert_eq!(layout.attention_layouts.len(), batch * 2);
                let shadow_words = if shadow { batch * 9 } else { 0 };
                assert_eq!(layout.shadow_before.len(), shadow_words);
                assert_eq!(StepInputLayout::byte_offset(&layout.placements) % 8, 0);
            }
        }
        assert_eq!(std::mem::size_of::<ShadowSequence>(), 72);
    }

    #[test]
    fn fill_puts_each_input_where_the_kernels_read_it() {
        let layout = StepInputLayout::new(3, true);
        let tokens = [5u32, 6, 7];
        let placements: Vec<TokenPlacement> =
            (0..3).map(|b| TokenPlacement::new(b, 10 + b)).collect();
        let attention: Vec<SequenceLayout> = (0..3)
            .map(|b| SequenceLayout {
                offset: 8 * b as u64,
                capacity: 50,
                len: 11 + b,
            })
            .collect();
        let before: Vec<ShadowSequence> = (0..3).map(sequence).collect();
        let after: Vec<ShadowSequence> = (1..4).map(sequence).collect();
        let block = layout
            .fill(&tokens, &placements, &attention, Some((&before, &after)))
            .unwrap();
        assert_eq!(block.len(), layout.words);
        let bytes: &[u8] = bytemuck::cast_slice(&block);
        let at = |range: &Range<usize>| &bytes[range.start * 8..range.end * 8];
        let ids: &[u32] = bytemuck::cast_slice(at(&layout.ids));
        assert_eq!(&ids[..3], &tokens);
        let read: &[TokenPlacement] = bytemuck::cast_slice(at(&layout.placements));
        assert_eq!(read, &placements[..]);
        let read: &[SequenceLayout] = bytemuck::cast_slice(at(&layout.attention_layouts));
        assert_eq!(read, &attention[..]);
        let read: &[ShadowSequence] = bytemuck::cast_slice(at(&layout.shadow_before));
        assert_eq!(read, &before[..]);
        let read: &[ShadowSequence] = bytemuck::cast_slice(at(&layout.shadow_after));
        assert_eq!(read, &after[..]);
    }

    #[test]
    fn fill_refuses_inputs_that_do_not_match_the_batch_or_the_kind() {
        let full = StepInputLayout::new(2, false);
        let placements = [TokenPlacement::new(0, 1), TokenPlacement::new(1, 1)];
        let layouts = [SequenceLayout::default(); 2];
        assert!(full.fill(&[1, 2], &placements, &layouts, None).is_ok());
        let problem = |result: Result<Vec<u64>>| match result {
            Err(Error::InvalidInput { argument, .. }) => argument,
            other => panic!("expected an InvalidInput error, got {other:?}"),
        };
        assert_eq!(
            problem(full.fill(&[1], &placements, &layouts, None)),
            "tokens"
        );
        assert_eq!(
            problem(full.fill(&[1, 2, 3], &placements, &layouts, None)),
            "tokens"
        );
        assert_eq!(
            problem(full.fill(&[1, 2], &placements[..1], &layouts, None)),
            "placements"
        );
        let shadow = [sequence(1), sequence(2)];
        assert_eq!(
            problem(full.fill(&[1, 2], &placements, &layouts, Some((&shadow, &shadow)))),
            "shadow"
        );
        let with_shadow = StepInputLayout::new(2, true);
        assert_eq!(
            problem(with_shadow.fill(&[1, 2], &placements, &layouts, None)),
            "shadow"
        );
        assert_eq!(
            problem(with_shadow.fill(
                &[1, 2],
                &placements,
                &layouts,
                Some((&shadow[..1], &shadow))
            )),
            "before"
        );
    }

    #[test]
    fn local_sections_follow_the_shadow_ones_only_for_shadowkv() {
        for batch in [1, 3, 8] {
            let plain = StepInputLayout::new(batch, true);
            assert!(plain.local_placements.is_empty() && plain.local_layouts.is_empty());
            assert_eq!(
                plain,
                StepInputLayout::with_local_layers(batch, true, false)
            );
            let full = StepInputLayout::with_local_layers(batch, false, true);
            assert_eq!(full, StepInputLayout::new(batch, false));
            let local = StepInputLayout::with_local_layers(batch, true, true);
            assert_eq!(local.shadow_after, plain.shadow_after);
            assert_eq!(local.local_placements.start, plain.words);
            assert_eq!(local.local_placements.len(), batch * 2);
            assert_eq!(local.local_placements.end, local.local_layouts.start);
            assert_eq!(local.local_layouts.len(), batch * 2);
            assert_eq!(local.local_layouts.end, local.words);
        }
    }

    #[test]
    fn fill_local_puts_the_slots_where_the_local_layers_read_them() {
        let layout = StepInputLayout::with_local_layers(3, true, true);
        let tokens = [1u32, 2, 3];
        let placements: Vec<TokenPlacement> = (0..3)
            .map(|b| TokenPlacement::new(b, 7 + b).with_cache_row(0))
            .collect();
        let staged = [SequenceLayout::default(); 3];
        let shadow: Vec<ShadowSequence> = (0..3).map(sequence).collect();
        let mut block = layout
            .fill(&tokens, &placements, &staged, Some((&shadow, &shadow)))
            .unwrap();
        let before = block.clone();
        // Slots out of step order, as a cache whose first sequence finished would have them.
        let local_placements: Vec<TokenPlacement> = [2u32, 0, 1]
            .iter()
            .zip(7..)
            .map(|(&slot, len)| TokenPlacement::new(slot, len))
            .collect();
        let local_layouts: Vec<SequenceLayout> = [2u64, 0, 1]
            .iter()
            .zip(8..)
            .map(|(&slot, len)| SequenceLayout {
                offset: slot * 4096,
                capacity: 512,
                len,
            })
            .collect();
        layout
            .fill_local(&mut block, &local_placements, &local_layouts)
            .unwrap();
        let bytes: &[u8] = bytemuck::cast_slice(&block);
        let at = |range: &Range<usize>| &bytes[range.start * 8..range.end * 8];
        let read: &[TokenPlacement] = bytemuck::cast_slice(at(&layout.local_placements));
        assert_eq!(read, &local_placements[..]);
        let read: &[SequenceLayout] = bytemuck::cast_slice(at(&layout.local_layouts));
        assert_eq!(read, &local_layouts[..]);
        // Everything before the local sections is as `fill` left it.
        let start = layout.local_placements.start;
        assert_eq!(block[..start], before[..start]);
        let problem = |result: Result<()>| match result {
            Err(Error::InvalidInput { argument, .. }) => argument,
            other => panic!("expected an InvalidInput error, got {other:?}"),
        };
        assert_eq!(
            problem(layout.fill_local(&mut block, &local_placements[..2], &local_layouts)),
            "local placements"
        );
        let plain = StepInputLayout::new(3, true);
        let mut plain_block = vec![0u64; plain.words];
        assert_eq!(
            problem(plain.fill_local(&mut plain_block, &local_placements, &local_layouts)),
            "block"
        );
    }

    #[test]
    fn limits_refuse_a_batch_past_the_captured_shapes() {
        let limits = StepLimits {
            max_batch: 4,
            max_shapes: 2,
        };
        assert!(limits.check(1).is_ok() && limits.check(4).is_ok());
        for batch in [0, 5, 100] {
            match limits.check(batch) {
                Err(Error::PastCapturedShapes {
                    batch: b,
                    max_batch: 4,
                }) => assert_eq!(b, batch),
                other => panic!("batch {batch}: {other:?}"),
            }
        }
        let message = limits.check(5).unwrap_err().to_string();
        assert!(
            message.contains('5') && message.contains("1 to 4"),
            "{message}"
        );
    }

    #[test]
    fn keys_tell_shapes_apart() {
        let full = |cache, batch| StepKey::Full { cache, batch };
        assert_eq!(full(1, 3), full(1, 3));
        assert_ne!(full(1, 3), full(2, 3));
        assert_ne!(full(1, 3), full(1, 2));
        let shadow = |cache, rate: Option<f64>| StepKey::Shadow {
            cache,
            sequences: Vec::new(),
            scripted_hit_rate: rate.map(f64::to_bits),
        };
        assert_eq!(shadow(1, Some(0.8)), shadow(1, Some(0.8)));
        assert_ne!(shadow(1, Some(0.8)), shadow(1, Some(0.6)));
        assert_ne!(shadow(1, None), shadow(1, Some(0.8)));
        assert_ne!(shadow(1, None), full(1, 0));
        assert_eq!(full(9, 5).batch(), 5);
    }

    #[test]
    fn the_store_keeps_the_most_recent_shapes() {
        let key = |batch| StepKey::Full { cache: 1, batch };
        let mut store: Vec<(StepKey, usize)> = Vec::new();
        for batch in 1..=3 {
            let (found, evicted) = find_or_evict(&mut store, &key(batch), 3);
            assert!(found.is_none() && evicted.is_none());
            store.push((key(batch), batch));
        }
        // Using shape 1 makes it the most recent; a new shape then drops shape 2.
        let (found, evicted) = find_or_evict(&mut store, &key(1), 3);
        assert_eq!(found, Some(2));
        assert!(evicted.is_none());
        assert_eq!(store.last().map(|(_, v)| *v), Some(1));
        let (found, evicted) = find_or_evict(&mut store, &key(4), 3);
        assert!(found.is_none());
        assert_eq!(evicted.map(|(k, _)| k), Some(key(2)));
        assert_eq!(store.len(), 2);
        // A store of at most 0 shapes still keeps one.
        let mut one: Vec<(StepKey, usize)> = vec![(key(1), 1)];
        let (_, evicted) = find_or_evict(&mut one, &key(2), 0);
        assert!(evicted.is_some() && one.is_empty());
    }
}
