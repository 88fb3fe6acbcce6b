//! Decode: the newest tokens appended and attended for every live sequence, or for any
//! subset of them in any order (continuous batching).
use std::sync::Arc;

use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
use shadowkv_kernels::cache::{self as layout, AppendParams};

use super::{position, Entry, SequenceId, ShadowKvCache};
use crate::error::{check_len, exhausted, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::shadow::ShadowSequence;
use crate::ptx;

impl ShadowKvCache {
    /// Sets `layer`'s batch to the entries at `picked`, in that order, with their current
    /// lengths (uploaded only if they changed; the device copy is reused unless it grows).
    pub(super) fn set_batch(
        &mut self,
        stream: &Arc<CudaStream>,
        layer: usize,
        picked: &[usize],
    ) -> Result<()> {
        let layouts: Vec<ShadowSequence> = picked
            .iter()
            .map(|&index| self.layout_in(&self.entries[index], layer))
            .collect();
        self.layers[layer].batch.set_sequences(stream, &layouts)
    }

    /// The positions in the entries of `ids`, checked for a step of `layer` (see
    /// [`pick`]); `None` for every live sequence (an error if there is none, or if one was not
    /// prefilled in `layer`).
    pub(super) fn picked(&self, layer: usize, ids: Option<&[SequenceId]>) -> Result<Vec<usize>> {
        self.check_layer(layer)?;
        self.check_no_pending_prefill()?;
        match ids {
            Some(ids) => pick(&self.entries, layer, ids),
            None => {
                if self.entries.is_empty() {
                    return Err(invalid(
                        "cache",
                        "has no live sequence",
                        "add_sequence first",
                    ));
                }
                if let Some(entry) = self.entries.iter().find(|e| !e.prefilled[layer]) {
                    return Err(invalid(
                        "layer",
                        format!("{layer} of {:?} was not prefilled", entry.id),
                        "prefill_layer for every layer of every live sequence first",
                    ));
                }
                Ok((0..self.entries.len()).collect())
            }
        }
    }

    /// Appends each live sequence's newest token to `layer`: `keys` and `values` are
    /// `[batch, Hkv, d]` bf16 (post-RoPE keys), in [`sequences`](Self::sequences) order.
    /// Every live sequence must be prefilled in `layer` ([`append_for`](Self::append_for)
    /// takes a subset).
    pub fn append(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        keys: &impl DevicePtr<bf16>,
        values: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        let picked = self.picked(layer, None)?;
        self.check_append(layer, &picked, None, keys, values)?;
        self.enqueue_append(gpu, layer, &picked, keys, values)
    }

    /// Appends the newest token of each sequence of `ids` to `layer`: `keys` and `values` are
    /// `[ids.len(), Hkv, d]` bf16 (post-RoPE keys), in `ids` order. Each id must be live,
    /// appear once, and be prefilled in `layer`; the other sequences are left as they are (they
    /// may be mid-prefill or idle). Any error
    /// ([`Error::InvalidArgument`](crate::Error::InvalidArgument) naming the argument and the
    /// id, or [`Error::CapacityExhausted`](crate::Error::CapacityExhausted) past
    /// `max_generated`) changes nothing and queues nothing.
    pub fn append_for(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        ids: &[SequenceId],
        keys: &impl DevicePtr<bf16>,
        values: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        self.leave_device_layouts();
        let picked = self.picked(layer, Some(ids))?;
        self.check_append(layer, &picked, Some(ids), keys, values)?;
        self.enqueue_append(gpu, layer, &picked, keys, values)
    }

    /// The tensor lengths and the room of an append of the entries at `picked` (named by
    /// `ids` in errors where given).
    fn check_append(
        &self,
        layer: usize,
        picked: &[usize],
        ids: Option<&[SequenceId]>,
        keys: &impl DevicePtr<bf16>,
        values: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        let (heads, d) = (self.shape.kv_heads, self.shape.head_dim);
        let elements = picked.len() * heads * d;
        let shape = rows_shape(picked.len(), ids.is_some(), "kv_heads");
        check_len("keys", keys.len(), elements, &shape)?;
        check_len("values", values.len(), elements, &shape)?;
        let max = self.capacity.max_generated;
        if let Some(&full) = picked
            .iter()
            .find(|&&index| self.entries[index].generated[layer] as usize >= max)
        {
            return Err(exhausted(
                "a sequence's generated tokens (CacheCapacity::max_generated)",
                u64::from(self.entries[full].generated[layer]) + 1,
                max as u64,
                "tokens",
            ));
        }
        Ok(())
    }

    /// The append of checked entries `picked`: sets the layer's batch to them, appends, and
    /// updates the batch to the new lengths.
    fn enqueue_append(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        picked: &[usize],
        keys: &impl DevicePtr<bf16>,
        values: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        let (heads, d) = (self.shape.kv_heads, self.shape.head_dim);
        let stream = gpu.stream().clone();
        self.check_device_batch(picked)?;
        self.set_batch(&stream, layer, picked)?;
        if let Some(device) = self.device_layouts {
            // SAFETY: `read_step_layouts_from`'s caller keeps `before` valid for this step.
            unsafe {
                self.layers[layer]
                    .batch
                    .read_layouts_from(Some(device.before))
            };
        }
        let launch = LaunchConfig {
            grid_dim: (picked.len() as u32, heads as u32, 1),
            block_dim: (layout::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let shadow = &mut self.layers[layer];
        let mut used = LaunchBuffers::new(&stream);
        let params = AppendParams {
            sequences: shadow.batch.sequences_address(&mut used),
            keys: used.read(keys),
            values: used.read(values),
            k: used.write(&mut shadow.k),
            v: used.write(&mut shadow.v),
            kv_heads: heads as u32,
            head_dim: d as u32,
        };
        // SAFETY: every sequence has room for one more row (checked above: its K/V block was
        // sized for max_generated tokens), `keys` and `values` hold [batch, Hkv, d], and the
        // batch's device copy is the layouts the rows are computed from.
        unsafe { gpu.launch(&stream, ptx::KV_APPEND, launch, params)? };
        drop(used);
        for &index in picked {
            self.entries[index].generated[layer] += 1;
        }
        if let Some(device) = self.device_layouts {
            // SAFETY: as above, for `after`.
            unsafe {
                self.layers[layer]
                    .batch
                    .read_layouts_from(Some(device.after))
            };
        }
        self.set_batch(&stream, layer, picked)
    }

    /// One decode step of `layer` for every live sequence: `q` is `[batch, q_heads, d]`
    /// (post-RoPE, the newest token, already appended), `out` the same shape, in
    /// [`sequences`](Self::sequences) order. Returns without waiting for the GPU.
    pub fn decode_layer(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        q: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        let picked = self.picked(layer, None)?;
        self.check_queries(&picked, false, q, out)?;
        self.enqueue_decode(gpu, layer, &picked, q, out)
    }

    /// One decode step of `layer` for the sequences `ids`, in that order: `q` is
    /// `[ids.len(), q_heads, d]` (post-RoPE, the newest token of each, already appended with
    /// [`append_for`](Self::append_for)), `out` the same shape. Each id must be live, appear
    /// once, and be prefilled in `layer`; the other sequences' state is untouched (they may be
    /// mid-prefill or idle). A sequence's output does not depend on which others share the
    /// step, but for the attention's split into blocks, which follows the batch's longest
    /// sequence (see `DecodeAttentionPlan::new`). Returns without waiting for the GPU; an
    /// error in the arguments ([`Error::InvalidArgument`](crate::Error::InvalidArgument)
    /// naming the argument and the id) changes nothing and queues nothing.
    pub fn decode_layer_for(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        ids: &[SequenceId],
        q: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        self.leave_device_layouts();
        let picked = self.picked(layer, Some(ids))?;
        self.check_queries(&picked, true, q, out)?;
        self.enqueue_decode(gpu, layer, &picked, q, out)
    }

    /// The lengths of `q` and `out` for a step of the entries at `picked`.
    fn check_queries(
        &self,
        picked: &[usize],
        subset: bool,
        q: &impl DevicePtr<bf16>,
        out: &impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        let elements = picked.len() * self.shape.q_heads * self.shape.head_dim;
        let shape = rows_shape(picked.len(), subset, "q_heads");
        check_len("q", q.len(), elements, &shape)?;
        check_len("out", out.len(), elements, &shape)
    }

    /// The step of checked entries `picked`.
    fn enqueue_decode(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        picked: &[usize],
        q: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        self.check_device_batch(picked)?;
        self.set_batch(gpu.stream(), layer, picked)?;
        self.step.run(gpu, &mut self.layers[layer], q, out)
    }

    /// The common loop's call for one layer of one decode step: appends each live
    /// sequence's newest key and value (`new_keys`, `new_values`: `[batch, Hkv, d]` bf16,
    /// post-RoPE keys) and attends its query `q` (`[batch, q_heads, d]`, post-RoPE) over its
    /// whole cache into `out` (same shape), all in [`sequences`](Self::sequences) order:
    /// [`append`](Self::append) then [`decode_layer`](Self::decode_layer). Returns without
    /// waiting for the GPU; a shape error changes nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        q: &impl DevicePtr<bf16>,
        new_keys: &impl DevicePtr<bf16>,
        new_values: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        let picked = self.picked(layer, None)?;
        self.check_queries(&picked, false, q, out)?;
        self.check_append(layer, &picked, None, new_keys, new_values)?;
        self.enqueue_append(gpu, layer, &picked, new_keys, new_values)?;
        self.enqueue_decode(gpu, layer, &picked, q, out)
    }

    /// [`attend`](Self::attend) for the sequences `ids`, in that order (continuous batching):
    /// [`append_for`](Self::append_for) then [`decode_layer_for`](Self::decode_layer_for),
    /// with every tensor `[ids.len(), ..]` in `ids` order. Every argument is checked before
    /// anything is queued: an error changes nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn attend_for(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        ids: &[SequenceId],
        q: &impl DevicePtr<bf16>,
        new_keys: &impl DevicePtr<bf16>,
        new_values: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        self.leave_device_layouts();
        let picked = self.picked(layer, Some(ids))?;
        self.check_queries(&picked, true, q, out)?;
        self.check_append(layer, &picked, Some(ids), new_keys, new_values)?;
        self.enqueue_append(gpu, layer, &picked, new_keys, new_values)?;
        self.enqueue_decode(gpu, layer, &picked, q, out)
    }
}

/// The shape of a tensor of one row per sequence, for an error: `[batch, heads, head_dim]`,
/// or with `subset` `[ids.len() = n, heads, head_dim]`.
fn rows_shape(rows: usize, subset: bool, heads: &str) -> String {
    if subset {
        format!("[ids.len() = {rows}, {heads}, head_dim]")
    } else {
        format!("[batch = {rows}, {heads}, head_dim]")
    }
}

/// The positions in `entries` of `ids`, in order, for a step of `layer`: each id live, listed
/// once, and prefilled in `layer`. The error names `ids`, the offending place and the id.
fn pick(entries: &[Entry], layer: usize, ids: &[SequenceId]) -> Result<Vec<usize>> {
    if ids.is_empty() {
        return Err(invalid(
            "ids",
            "is empty",
            "at least one live sequence prefilled in the layer",
        ));
    }
    // The place in `ids` that named each entry so far.
    let mut named = vec![usize::MAX; entries.len()];
    let mut picked = Vec::with_capacity(ids.len());
    for (i, &id) in ids.iter().enumerate() {
        let Some(index) = position(entries, id) else {
            return Err(invalid(
                "ids",
                format!("ids[{i}] = {id:?} is not live (never added, or removed)"),
                "ids of live sequences (add_sequence)",
            ));
        };
        if named[index] != usize::MAX {
            return Err(invalid(
                "ids",
                format!("ids[{i}] = {id:?} repeats ids[{}]", named[index]),
                "each sequence at most once",
            ));
        }
        named[index] = i;
        if !entries[index].prefilled[layer] {
            return Err(invalid(
                "ids",
                format!("ids[{i}] = {id:?} was not prefilled in layer {layer}"),
                "sequences prefilled in the layer (prefill_layer)",
            ));
        }
        picked.push(index);
    }
    Ok(picked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::memory::Footprint;
    use proptest::prelude::*;

    /// Live entries with the given ids (ascending) and, per entry, whether layer 0 and 1 were
    /// prefilled.
    fn entries(live: &[(u64, [bool; 2])]) -> Vec<Entry> {
        live.iter()
            .map(|&(id, prefilled)| Entry {
                id: SequenceId(id),
                layout: ShadowSequence::default(),
                footprint: Footprint::default(),
                generated: vec![0; 2],
                prefilled: prefilled.to_vec(),
            })
            .collect()
    }

    fn problem(result: Result<Vec<usize>>) -> String {
        match result {
            Err(crate::Error::InvalidArgument {
                argument, problem, ..
            }) => {
                assert_eq!(argument, "ids");
                problem
            }
            other => panic!("expected an error naming ids, got {other:?}"),
        }
    }

    #[test]
    fn pick_keeps_the_order_of_the_ids() {
        let live = entries(&[(1, [true, true]), (4, [true, false]), (9, [true, true])]);
        let ids = [SequenceId(9), SequenceId(1), SequenceId(4)];
        assert_eq!(pick(&live, 0, &ids).unwrap(), vec![2, 0, 1]);
        assert_eq!(
            pick(&live, 1, &[SequenceId(9), SequenceId(1)]).unwrap(),
            vec![2, 0]
        );
    }

    #[test]
    fn pick_names_the_bad_id() {
        let live = entries(&[(1, [true, true]), (4, [true, false]), (9, [true, true])]);
        // Removed (or never added), repeated, not prefilled in the layer, none at all.
        let text = problem(pick(&live, 0, &[SequenceId(1), SequenceId(3)]));
        assert!(
            text.contains("ids[1]") && text.contains("SequenceId(3)"),
            "{text}"
        );
        assert!(text.contains("not live"), "{text}");
        let text = problem(pick(
            &live,
            0,
            &[SequenceId(9), SequenceId(1), SequenceId(9)],
        ));
        assert!(
            text.contains("ids[2]") && text.contains("repeats ids[0]"),
            "{text}"
        );
        assert!(text.contains("SequenceId(9)"), "{text}");
        let text = problem(pick(&live, 1, &[SequenceId(1), SequenceId(4)]));
        assert!(
            text.contains("SequenceId(4)") && text.contains("layer 1"),
            "{text}"
        );
        assert!(text.contains("not prefilled"), "{text}");
        let text = problem(pick(&live, 0, &[]));
        assert!(text.contains("empty"), "{text}");
        // The same entries still serve a correct list.
        assert_eq!(pick(&live, 1, &[SequenceId(1)]).unwrap(), vec![0]);
    }

    proptest! {
        /// Against a model: a list is accepted exactly when every id is live, listed once and
        /// prefilled in the layer, and then maps each id to its entry in order.
        #[test]
        fn pick_matches_a_model(
            live in prop::collection::btree_map(0u64..40, any::<[bool; 2]>(), 0..12),
            ids in prop::collection::vec(0u64..40, 0..10),
            layer in 0usize..2,
        ) {
            let live: Vec<(u64, [bool; 2])> = live.into_iter().collect();
            let all = entries(&live);
            let ids: Vec<SequenceId> = ids.into_iter().map(SequenceId).collect();
            let position_of = |id: SequenceId| live.iter().position(|&(l, _)| SequenceId(l) == id);
            let mut seen = std::collections::HashSet::new();
            let valid = !ids.is_empty()
                && ids.iter().all(|&id| {
                    seen.insert(id)
                        && position_of(id).is_some_and(|p| live[p].1[layer])
                });
            match pick(&all, layer, &ids) {
                Ok(picked) => {
                    prop_assert!(valid);
                    let expected: Vec<usize> =
                        ids.iter().map(|&id| position_of(id).unwrap()).collect();
                    prop_assert_eq!(picked, expected);
                }
                Err(crate::Error::InvalidArgument { argument, .. }) => {
                    prop_assert!(!valid);
                    prop_assert_eq!(argument, "ids");
                }
                Err(other) => prop_assert!(false, "{other}"),
            }
        }
    }
}
