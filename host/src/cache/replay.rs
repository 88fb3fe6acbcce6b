//! Decode steps replayed from a CUDA graph: the layouts a step reads come from device memory
//! that the caller rewrites between steps, and the host bookkeeping of a replayed step (each
//! sequence's generated tokens) advances without launching anything.
use cudarc::driver::CudaStream;

use super::ShadowKvCache;
use crate::error::{exhausted, invalid, Result};
use crate::kernels::shadow::ShadowSequence;

/// The layouts of the next decode step of every live sequence, in
/// [`sequences`](ShadowKvCache::sequences) order: what the append reads (`before`, the
/// lengths so far) and what the decode kernels read (`after`, one token longer).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepLayouts {
    /// Each sequence's layout before the step's append.
    pub before: Vec<ShadowSequence>,
    /// Each sequence's layout after it.
    pub after: Vec<ShadowSequence>,
}

/// Each live sequence's generated tokens per layer: the host bookkeeping a step advances
/// (see [`ShadowKvCache::step_snapshot`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepSnapshot {
    generated: Vec<(super::SequenceId, Vec<u32>)>,
}

/// Device addresses of a step's layouts (see [`ShadowKvCache::read_step_layouts_from`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceStepLayouts {
    /// `[batch]` [`ShadowSequence`]s before the append ([`StepLayouts::before`]).
    pub before: u64,
    /// `[batch]` [`ShadowSequence`]s after it ([`StepLayouts::after`]).
    pub after: u64,
    /// `[batch]` `SequenceLayout`s: the `kv` of each `after` layout, for the attention.
    pub attention: u64,
}

impl ShadowKvCache {
    /// The layouts of the next step of every live sequence (the same in every layer). An
    /// error if there is no live sequence, one was not prefilled in every layer, the layers
    /// disagree on its generated tokens (a step was left half done), or one has generated
    /// `max_generated` tokens (the step would not fit).
    pub fn step_layouts(&self) -> Result<StepLayouts> {
        if self.entries.is_empty() {
            return Err(invalid(
                "cache",
                "has no live sequence",
                "add_sequence first",
            ));
        }
        let mut layouts = StepLayouts::default();
        for entry in &self.entries {
            if let Some(layer) = entry.prefilled.iter().position(|&done| !done) {
                return Err(invalid(
                    "cache",
                    format!("{:?} was not prefilled in layer {layer}", entry.id),
                    "every live sequence prefilled in every layer",
                ));
            }
            let generated = entry.generated.first().copied().unwrap_or(0);
            if entry.generated.iter().any(|&g| g != generated) {
                return Err(invalid(
                    "cache",
                    format!(
                        "{:?} has generated {:?} tokens per layer",
                        entry.id, entry.generated
                    ),
                    "the same number of generated tokens in every layer",
                ));
            }
            if generated as usize >= self.capacity.max_generated {
                return Err(exhausted(
                    "a sequence's generated tokens (CacheCapacity::max_generated)",
                    u64::from(generated) + 1,
                    self.capacity.max_generated as u64,
                    "tokens",
                ));
            }
            let before = self.layout_in(entry, 0);
            let mut after = before;
            after.kv.len += 1;
            layouts.before.push(before);
            layouts.after.push(after);
        }
        Ok(layouts)
    }

    /// With `Some(addresses)`, the append and the decode step of every layer read the
    /// layouts of the whole batch from the caller's device copies instead of uploading them
    /// (a step replayed from a CUDA graph keeps its launches' addresses): the append reads
    /// `before`, the decode kernels `after` and the attention `attention`. Steps must then
    /// cover every live sequence in order ([`append`](Self::append),
    /// [`decode_layer`](Self::decode_layer), [`attend`](Self::attend)); the `_for` forms and
    /// a prefill go back to uploaded layouts by themselves. `None` goes back to uploaded
    /// layouts.
    ///
    /// # Safety
    /// Until the next call, the addresses must hold the [`step_layouts`](Self::step_layouts)
    /// of the step being run (`attention` the `kv` of each `after`), for the live sequences of
    /// that step, whenever its kernels run.
    pub unsafe fn read_step_layouts_from(&mut self, addresses: Option<DeviceStepLayouts>) {
        self.device_layouts = addresses;
        // SAFETY: the caller's contract covers every launch that reads them.
        unsafe {
            self.step
                .read_attention_layouts_from(addresses.map(|a| a.attention));
            for layer in &mut self.layers {
                layer.batch.read_layouts_from(addresses.map(|a| a.after));
            }
        }
    }

    /// Whether steps read their layouts from device copies
    /// ([`read_step_layouts_from`](Self::read_step_layouts_from)).
    pub fn reads_device_layouts(&self) -> bool {
        self.device_layouts.is_some()
    }

    /// The host side of a step of every live sequence that was replayed (queued on `stream`)
    /// rather than launched: every layer's append counted, each layer's batch set to the new
    /// lengths (validated, not uploaded), the statistics those of the replay. Checks
    /// everything first ([`step_layouts`](Self::step_layouts)): an error changes nothing.
    pub fn note_replayed_step(&mut self, stream: &std::sync::Arc<CudaStream>) -> Result<()> {
        if self.device_layouts.is_none() {
            return Err(invalid(
                "cache",
                "reads its layouts from its own copies",
                "read_step_layouts_from(Some(..)) before replaying steps",
            ));
        }
        self.step_layouts()?;
        for entry in &mut self.entries {
            for generated in &mut entry.generated {
                *generated += 1;
            }
        }
        let all: Vec<usize> = (0..self.entries.len()).collect();
        for layer in 0..self.layers.len() {
            self.set_batch(stream, layer, &all)?;
        }
        let heads = self.entries.len() * self.config.kv_heads;
        self.step.note_replayed_step(stream, heads)
    }

    /// The host bookkeeping of the steps so far (each live sequence's generated tokens per
    /// layer), to put back with [`restore_step_snapshot`](Self::restore_step_snapshot) when
    /// a step's launches were captured into a graph that could not be made: capturing runs
    /// the host side of a step but nothing on the GPU.
    pub fn step_snapshot(&self) -> StepSnapshot {
        StepSnapshot {
            generated: self
                .entries
                .iter()
                .map(|e| (e.id, e.generated.clone()))
                .collect(),
        }
    }

    /// Puts back the bookkeeping of [`step_snapshot`](Self::step_snapshot). An error, changing
    /// nothing, if the live sequences are not the snapshot's.
    pub fn restore_step_snapshot(&mut self, snapshot: &StepSnapshot) -> Result<()> {
        let same = snapshot.generated.len() == self.entries.len()
            && snapshot
                .generated
                .iter()
                .zip(&self.entries)
                .all(|((id, generated), e)| *id == e.id && generated.len() == e.generated.len());
        if !same {
            return Err(invalid(
                "snapshot",
                "was taken with other live sequences",
                "a snapshot of the same live sequences",
            ));
        }
        for ((_, generated), entry) in snapshot.generated.iter().zip(&mut self.entries) {
            entry.generated.clone_from(generated);
        }
        Ok(())
    }

    /// Goes back to uploaded layouts: a step of chosen sequences (the `_for` forms) never
    /// reads a replayed step's device copies, which hold the whole batch of the latest
    /// replayed step.
    pub(super) fn leave_device_layouts(&mut self) {
        // SAFETY: `None` points at nothing.
        unsafe { self.read_step_layouts_from(None) };
    }

    /// Refuses a step of `picked` while layouts come from device copies, unless it covers
    /// every live sequence in order (the copies hold the whole batch).
    pub(super) fn check_device_batch(&self, picked: &[usize]) -> Result<()> {
        let whole = picked.len() == self.entries.len()
            && picked.iter().enumerate().all(|(i, &index)| i == index);
        if self.device_layouts.is_some() && !whole {
            return Err(invalid(
                "ids",
                format!("name {} of the {} live sequences", picked.len(), self.entries.len()),
                "every live sequence in order while the layouts come from device copies (read_step_layouts_from)",
            ));
        }
        Ok(())
    }
}
