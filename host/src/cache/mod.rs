//! [`ShadowKvCache`]: the ShadowKV cache an engine links against (`../shared/SHADOWKV.md`).
//!
//! Configured by the model's attention shape ([`CacheShape`]) and ShadowKV's parameters
//! ([`ShadowKvParams`], the paper's defaults), and sized once ([`CacheCapacity`]): every GPU
//! buffer and the pinned host memory for the values are allocated in [`ShadowKvCache::new`]
//! (pinning costs about 0.75 s per GiB, so never per request), after checking that they fit.
//! Sequences then come and go between steps inside those buffers: each gets ranges of every
//! per-layer buffer (the same offsets in every layer) from first-fit arenas.
//!
//! Per layer and sequence:
//! - [`prefill_layer`](ShadowKvCache::prefill_layer): the low-rank factors of the pre-RoPE keys
//!   (`factorise`), landmarks, outliers and the exact local window (`shadow_prefill`), the
//!   values offloaded to host memory on the copy stream (overlapping the next layer's work),
//!   and the first selection from the last prompt query, so decoding starts with full slots;
//! - [`append`](ShadowKvCache::append): the newest token's key and value (`kv_append`);
//! - [`decode_layer`](ShadowKvCache::decode_layer): one decode step (`decode_step`).
//!
//! Continuous batching: [`append_for`](ShadowKvCache::append_for),
//! [`decode_layer_for`](ShadowKvCache::decode_layer_for) and
//! [`attend_for`](ShadowKvCache::attend_for) run any subset of the live sequences, in any
//! order (each prefilled in that layer), while others are being prefilled or wait; the plain
//! forms run every live sequence. Each sequence keeps one row of the resident ids (the chunk
//! held by each of its sparse slots) from [`add_sequence`](ShadowKvCache::add_sequence) to
//! [`remove_sequence`](ShadowKvCache::remove_sequence), so a step's batch may be any subset:
//! each layer's [`ShadowBatch`] is set to the call's sequences (reused while the subset's size
//! is unchanged, and its device copy never shrinks).
//!
//! [`ValueHome::Device`] keeps the values in GPU memory (no PCIe traffic) when they fit.
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
pub use shadowkv_kernels::cache as kernel_layout;
use shadowkv_kernels::cache::{self as layout, AppendParams};

use crate::decode_step::{DecodeStep, ShadowLayer, StepStats};
use crate::error::{check_len, exhausted, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::attention::SequenceLayout;
use crate::kernels::factorise::Factoriser;
use crate::kernels::fetch::LayerValues;
use crate::kernels::shadow::{ShadowBatch, ShadowConfig, ShadowSequence};
use crate::kernels::shadow_prefill::{self, PrefillScratch, PrefillSource};

mod arena;
mod memory;
mod offload;
mod params;
mod rows;

use crate::pinned::PinnedBuffer;
use crate::ptx;
use arena::Arenas;
use memory::Footprint;
pub use memory::{host_available_bytes, CachePlan, MemoryReport};
use offload::offload_values;
pub use params::{CacheCapacity, CacheShape, ShadowKvParams, ValueHome};
use rows::Rows;

/// A live sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(u64);

struct Entry {
    id: SequenceId,
    /// The layout with no generated tokens (`kv.len = sparse_start + S`); its `resident_row`
    /// is the sequence's for as long as it lives.
    layout: ShadowSequence,
    footprint: Footprint,
    /// Per layer: generated tokens appended, and whether the prefill ran.
    generated: Vec<u32>,
    prefilled: Vec<bool>,
}

/// The ShadowKV cache of a model: every layer, a ragged batch of sequences.
pub struct ShadowKvCache {
    shape: CacheShape,
    params: ShadowKvParams,
    config: ShadowConfig,
    capacity: CacheCapacity,
    values_home: ValueHome,
    layers: Vec<ShadowLayer>,
    /// The compute stream the cache was built on (the `Gpu`'s), waited for on drop.
    compute_stream: Arc<CudaStream>,
    step: DecodeStep,
    factoriser: Factoriser,
    scratch: PrefillScratch,
    arenas: Arenas,
    /// The rows of the resident ids not held by a live sequence.
    rows: Rows,
    /// Recorded on the compute stream at each prefill: what the value offload waits for.
    source_ready: CudaEvent,
    /// Recorded on the copy stream after the latest prefill's value offload.
    offload_done: CudaEvent,
    /// The live sequences in the order they were added (ids ascending).
    entries: Vec<Entry>,
    next_id: u64,
}

impl ShadowKvCache {
    /// What a cache of `capacity` takes, by part (GPU and host).
    pub fn memory_for(
        shape: &CacheShape,
        params: &ShadowKvParams,
        values_home: ValueHome,
        capacity: &CacheCapacity,
    ) -> Result<MemoryReport> {
        memory::memory_for(shape, params, values_home, capacity)
    }

    /// How many sequences of `prompt_len` tokens (each generating up to `max_generated`) fit
    /// in `gpu_bytes` of GPU memory and `host_bytes` of pinned host memory, and how many would
    /// with the whole K/V cache on the GPU.
    pub fn plan(
        shape: &CacheShape,
        params: &ShadowKvParams,
        values_home: ValueHome,
        prompt_len: usize,
        max_generated: usize,
        gpu_bytes: u64,
        host_bytes: u64,
    ) -> Result<CachePlan> {
        memory::plan(
            shape,
            params,
            values_home,
            prompt_len,
            max_generated,
            gpu_bytes,
            host_bytes,
        )
    }

    /// A cache for `shape` and `params`, sized for `capacity`, with the values in
    /// `values_home`. Checks first that the buffers fit in the GPU's free memory and (for
    /// [`ValueHome::Host`]) the host's available memory, and says how much was needed.
    pub fn new(
        gpu: &Gpu,
        shape: CacheShape,
        params: ShadowKvParams,
        values_home: ValueHome,
        capacity: CacheCapacity,
    ) -> Result<Self> {
        let config = memory::shadow_config(&shape, &params)?;
        let report = memory::memory_for(&shape, &params, values_home, &capacity)?;
        let (free, _) = gpu.context().mem_get_info()?;
        if report.gpu_bytes() > free as u64 {
            return Err(exhausted(
                "free GPU memory for the cache (ShadowKvCache::plan says what fits)",
                report.gpu_bytes(),
                free as u64,
                "bytes",
            ));
        }
        if let Some(available) = host_available_bytes() {
            if report.host_bytes() > available {
                return Err(exhausted(
                    "available host memory for the pinned values (or use ValueHome::Device)",
                    report.host_bytes(),
                    available,
                    "bytes",
                ));
            }
        }
        let sizes = memory::buffer_sizes(&shape, &params, &capacity)?;
        let stream = gpu.stream().clone();
        let d = shape.head_dim;
        // A batch that only sizes the step until the first sequence arrives: one sequence that
        // fits every buffer (see `placeholder`).
        let placeholder = ShadowBatch::new(&stream, config, &[placeholder(&config)])?;
        let mut layers = Vec::with_capacity(shape.layers);
        let slots = capacity.max_sequences * config.kv_heads * config.budget_chunks;
        for _ in 0..shape.layers {
            let values = match values_home {
                ValueHome::Host => LayerValues::Host(PinnedBuffer::new(gpu, sizes.values.max(8))?),
                ValueHome::Device => LayerValues::Device(stream.alloc_zeros(sizes.values.max(8))?),
            };
            // SAFETY (all but the values): every row is written by a sequence's prefill before
            // a decode step reads it (decode_layer refuses sequences not prefilled).
            unsafe {
                layers.push(ShadowLayer {
                    batch: ShadowBatch::new(&stream, config, placeholder.sequences())?,
                    landmarks: stream.alloc(sizes.landmark_rows.max(1) * d)?,
                    chunk_ids: stream.alloc(sizes.landmark_rows.max(1))?,
                    a: stream.alloc(sizes.a.max(8))?,
                    bm: stream.alloc(sizes.bm.max(8))?,
                    k: stream.alloc(sizes.kv.max(8))?,
                    v: stream.alloc(sizes.kv.max(8))?,
                    values,
                    resident: stream.alloc(slots.max(1))?,
                });
            }
        }
        let longest_chunks = params.prompt_chunks(capacity.max_prompt_len);
        Ok(ShadowKvCache {
            step: DecodeStep::new(gpu, shape.rope, &placeholder)?,
            factoriser: Factoriser::new(&stream, shape.kv_width(), shape.layers)?,
            scratch: PrefillScratch::new(&stream, &config, longest_chunks, params.outlier_chunks)?,
            arenas: Arenas::new(&sizes),
            rows: Rows::new(resident_rows(&capacity)?),
            source_ready: gpu.new_event(false)?,
            offload_done: gpu.new_event(true)?,
            shape,
            params,
            config,
            capacity,
            values_home,
            layers,
            compute_stream: stream,
            entries: Vec::new(),
            next_id: 0,
        })
    }

    /// The model's attention shape.
    pub fn shape(&self) -> &CacheShape {
        &self.shape
    }
    /// ShadowKV's parameters.
    pub fn params(&self) -> &ShadowKvParams {
        &self.params
    }
    /// The decode kernels' configuration derived from the shape and the parameters.
    pub fn config(&self) -> &ShadowConfig {
        &self.config
    }
    /// What the cache was sized for.
    pub fn capacity(&self) -> &CacheCapacity {
        &self.capacity
    }
    /// Where the values live.
    pub fn values_home(&self) -> ValueHome {
        self.values_home
    }

    /// The live sequences in the order they were added: the order of the rows of `q`, `out`
    /// and the keys and values of [`append`](Self::append), [`decode_layer`](Self::decode_layer)
    /// and [`attend`](Self::attend) (the `_for` forms take their own order).
    pub fn sequences(&self) -> Vec<SequenceId> {
        self.entries.iter().map(|e| e.id).collect()
    }

    /// A sequence's layout in `layer` (where its state lives; `kv.len` counts its generated
    /// tokens), for tests and diagnostics.
    pub fn layout(&self, layer: usize, id: SequenceId) -> Result<ShadowSequence> {
        let index = self.index_of(id)?;
        self.check_layer(layer)?;
        Ok(self.layout_in(&self.entries[index], layer))
    }

    /// The layer's state (buffers and batch) as the decode kernels see it. Its batch holds the
    /// layouts of the latest call on this layer (a step's or append's sequences in that call's
    /// order, or the sequence a prefill built, with the lengths after the call); its resident
    /// ids hold each live sequence's at the sequence's
    /// [`resident_row`](ShadowSequence::resident_row) (see [`layout`](Self::layout)).
    pub fn layer(&self, layer: usize) -> Result<&ShadowLayer> {
        self.check_layer(layer)?;
        Ok(&self.layers[layer])
    }

    /// The statistics of the latest decode step, which is the last layer passed to
    /// [`decode_layer`](Self::decode_layer) (or its `_for` form, in that call's order): the
    /// layers share one step workspace (waits until its plan has run).
    pub fn step_stats(&self) -> Result<StepStats> {
        self.step.stats()
    }

    /// The prefill kernels' scratch (the latest prefill's chunk statistics and outliers), for
    /// tests and diagnostics.
    pub fn prefill_scratch(&self) -> &PrefillScratch {
        &self.scratch
    }

    /// The decode step's scratch (the latest step's scores, selection and misses).
    pub fn step_scratch(&self) -> &crate::decode_step::StepWorkspace {
        self.step.scratch()
    }

    /// The decode step, to set its options (overlap, parts, timeline).
    pub fn decode_step(&mut self) -> &mut DecodeStep {
        &mut self.step
    }

    /// What this cache holds, by part.
    pub fn memory_report(&self) -> Result<MemoryReport> {
        memory::memory_for(&self.shape, &self.params, self.values_home, &self.capacity)
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(invalid(
                "layer",
                format!("is {layer}"),
                format!("below the model's {} layers", self.layers.len()),
            ));
        }
        Ok(())
    }

    fn index_of(&self, id: SequenceId) -> Result<usize> {
        position(&self.entries, id)
            .ok_or_else(|| invalid("sequence", format!("{id:?} is not live"), "a live sequence"))
    }

    fn layout_in(&self, entry: &Entry, layer: usize) -> ShadowSequence {
        let mut layout = entry.layout;
        layout.kv.len += entry.generated[layer];
        layout
    }

    /// Sets `layer`'s batch to the entries at `picked`, in that order, with their current
    /// lengths (uploaded only if they changed; the device copy is reused unless it grows).
    fn set_batch(
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
    fn picked(&self, layer: usize, ids: Option<&[SequenceId]>) -> Result<Vec<usize>> {
        self.check_layer(layer)?;
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

    /// Adds a sequence with a `prompt_len`-token prompt (prefill each layer next). Fails,
    /// changing nothing, if the prompt is too short for the budget or the cache has no room.
    /// The sequence takes ranges of every per-layer buffer and a row of the resident ids,
    /// kept until [`remove_sequence`](Self::remove_sequence); nothing runs on the GPU.
    pub fn add_sequence(&mut self, _gpu: &Gpu, prompt_len: usize) -> Result<SequenceId> {
        let full = || {
            exhausted(
                "the cache's sequences (CacheCapacity::max_sequences)",
                self.entries.len() as u64 + 1,
                self.capacity.max_sequences as u64,
                "sequences",
            )
        };
        if self.entries.len() >= self.capacity.max_sequences {
            return Err(full());
        }
        if prompt_len > self.capacity.max_prompt_len {
            return Err(invalid(
                "prompt_len",
                format!("is {prompt_len}"),
                format!(
                    "at most the cache's max_prompt_len {}",
                    self.capacity.max_prompt_len
                ),
            ));
        }
        let geometry = memory::geometry(&self.params, prompt_len, self.capacity.max_generated)?;
        let footprint = memory::footprint(&self.shape, &self.params, &geometry);
        let starts = self.arenas.alloc(&footprint)?;
        let Some(resident_row) = self.rows.alloc() else {
            self.arenas.release(&starts, &footprint);
            return Err(full());
        };
        let sparse_start = geometry.exact_rows;
        let layout = ShadowSequence {
            landmark_row: starts.landmark_rows as u64,
            a_offset: starts.a as u64,
            bm_offset: starts.bm as u64,
            host_value_offset: starts.values as u64,
            landmarks: geometry.landmarks,
            chunks: geometry.chunks,
            prompt_len: geometry.prompt_len,
            sparse_start,
            resident_row,
            _reserved: 0,
            kv: SequenceLayout {
                offset: starts.kv as u64,
                capacity: geometry.kv_capacity,
                len: sparse_start + self.params.sparse_budget as u32,
            },
        };
        // What every launch checks, once here, on the CPU.
        if let Err(error) = crate::kernels::shadow::validate(&self.config, &[layout]) {
            self.arenas.release(&starts, &footprint);
            self.rows.release(resident_row);
            return Err(error);
        }
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        self.entries.push(Entry {
            id,
            layout,
            footprint,
            generated: vec![0; self.layers.len()],
            prefilled: vec![false; self.layers.len()],
        });
        Ok(id)
    }

    fn remove_entry(&mut self, index: usize) -> Entry {
        let entry = self.entries.remove(index);
        let layout = entry.layout;
        let starts = Footprint {
            landmark_rows: layout.landmark_row as usize,
            a: layout.a_offset as usize,
            bm: layout.bm_offset as usize,
            kv: layout.kv.offset as usize,
            values: layout.host_value_offset as usize,
        };
        self.arenas.release(&starts, &entry.footprint);
        self.rows.release(layout.resident_row);
        entry
    }

    /// Removes a sequence between steps: its ranges and its row of the resident ids are free
    /// for the next [`add_sequence`](Self::add_sequence). The other sequences keep their rows
    /// and their state; nothing runs on the GPU.
    pub fn remove_sequence(&mut self, _gpu: &Gpu, id: SequenceId) -> Result<()> {
        let index = self.index_of(id)?;
        self.remove_entry(index);
        Ok(())
    }

    /// Builds `layer`'s shadow of sequence `id` from its prompt: `pre_rope_keys`
    /// (`[L, Hkv*d]` bf16), the post-RoPE keys and values in `source` (`[Hkv, capacity, d]`),
    /// and `last_query` (`[q_heads, d]` bf16, post-RoPE: the last prompt token's query).
    /// Nothing waits for the GPU. The values are copied to the cache on the copy stream, so
    /// `source.values` must stay unchanged until the copy stream has passed this call (any
    /// later `decode_layer` orders after it, with the overlap on or off; other work on
    /// `gpu.stream()` does not). Other sequences may decode between the layers of a prefill
    /// (see [`decode_layer_for`](Self::decode_layer_for)); prefilling a layer again starts
    /// it over (its generated tokens are dropped).
    pub fn prefill_layer<T: DevicePtr<bf16>>(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        id: SequenceId,
        pre_rope_keys: &impl DevicePtr<bf16>,
        source: &PrefillSource<'_, T>,
        last_query: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        let result = self.enqueue_prefill(gpu, layer, id, pre_rope_keys, source, last_query);
        if result.is_err() {
            // The offload may have been queued before the failure: the caller frees the
            // source on an error, so let the copy stream finish reading it first.
            let _ = self.step.copy_stream().synchronize();
        }
        result
    }

    /// The body of [`prefill_layer`](Self::prefill_layer), which waits for the offload when
    /// it fails.
    fn enqueue_prefill<T: DevicePtr<bf16>>(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        id: SequenceId,
        pre_rope_keys: &impl DevicePtr<bf16>,
        source: &PrefillSource<'_, T>,
        last_query: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let index = self.index_of(id)?;
        let (q_width, d) = (
            self.shape.q_heads * self.shape.head_dim,
            self.shape.head_dim,
        );
        check_len(
            "last_query",
            last_query.len(),
            q_width,
            "[q_heads, head_dim]",
        )?;
        let sequence = self.entries[index].layout;
        let prompt = sequence.prompt_len as usize;
        check_len(
            "pre_rope_keys",
            pre_rope_keys.len(),
            prompt * self.shape.kv_width(),
            "[prompt_len, kv_heads * head_dim]",
        )?;
        let stream = gpu.stream().clone();
        let rank = self.params.rank;
        let shadow = &mut self.layers[layer];
        // The layer's batch for the prefill: this sequence alone, with no generated tokens.
        shadow.batch.set_sequences(&stream, &[sequence])?;
        self.step.reserve(gpu, &shadow.batch)?;
        // The point the offload waits for: the source is ready once the work queued so far on
        // the compute stream has run.
        self.source_ready.record(&stream)?;
        // 1. Landmarks, outliers, empty slots; this checks the source and the layouts before
        //    any other work is queued.
        shadow_prefill::build_landmarks(
            gpu,
            &stream,
            shadow,
            0,
            source,
            &mut self.scratch,
            self.step.scratch(),
        )?;
        // From here the layer's state of the sequence is being rebuilt: not decodable until
        // the prefill completes.
        let entry = &mut self.entries[index];
        entry.prefilled[layer] = false;
        entry.generated[layer] = 0;
        // 2. The values to the cache's value buffer, on the copy stream.
        offload_values(
            &self.source_ready,
            self.step.copy_stream(),
            source,
            &sequence,
            self.shape.kv_heads,
            d,
            &mut shadow.values,
        )?;
        self.offload_done.record(self.step.copy_stream())?;
        // 3. The factors, into the sequence's rows of A and Bm.
        let a_range = sequence.a_offset as usize..sequence.a_offset as usize + prompt * rank;
        let bm_start = sequence.bm_offset as usize;
        let bm_range = bm_start..bm_start + rank * self.shape.kv_width();
        self.factoriser.run(
            gpu,
            pre_rope_keys,
            rank,
            layer,
            &mut shadow.a.slice_mut(a_range),
            &mut shadow.bm.slice_mut(bm_range),
        )?;
        // 4. The first selection with the last prompt query, its values from the prompt's
        //    (on the GPU) and its keys rebuilt, as a decode step would.
        let part = shadow.batch.whole();
        self.step.select_part(gpu, shadow, part, last_query)?;
        shadow_prefill::gather_exact(
            gpu,
            &stream,
            shadow,
            0,
            source,
            &mut self.scratch,
            self.step.scratch(),
        )?;
        self.step.rebuild_part(gpu, shadow, part)?;
        self.entries[index].prefilled[layer] = true;
        Ok(())
    }

    /// Completes once the latest [`prefill_layer`](Self::prefill_layer)'s values are in the
    /// cache's value buffer (recorded on the copy stream, with timing: an engine or a bench
    /// may measure the offload against it).
    pub fn offload_done(&self) -> &CudaEvent {
        &self.offload_done
    }

    /// Waits for every prefill so far and checks the factorisations converged.
    pub fn check_prefill(&self) -> Result<()> {
        self.step.copy_stream().synchronize()?;
        self.factoriser.check()
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
        self.set_batch(&stream, layer, picked)?;
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

/// Where `id` is in `entries` (kept in id order: ids only grow, and removal keeps the order).
fn position(entries: &[Entry], id: SequenceId) -> Option<usize> {
    entries.binary_search_by_key(&id, |e| e.id).ok()
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

/// Rows of the resident ids: one per sequence the cache holds at once.
fn resident_rows(capacity: &CacheCapacity) -> Result<u32> {
    u32::try_from(capacity.max_sequences).map_err(|_| {
        invalid(
            "capacity.max_sequences",
            format!("is {}", capacity.max_sequences),
            "below 2^32",
        )
    })
}

/// A sequence that satisfies `ShadowBatch`'s checks with every offset at 0, standing in
/// before the first sequence arrives.
fn placeholder(config: &ShadowConfig) -> ShadowSequence {
    let k = config.budget_chunks as u32;
    let tokens = k * config.chunk_size as u32;
    ShadowSequence {
        landmarks: k,
        chunks: k,
        prompt_len: tokens,
        kv: SequenceLayout {
            offset: 0,
            capacity: tokens,
            len: tokens,
        },
        ..ShadowSequence::default()
    }
}

impl Drop for ShadowKvCache {
    /// Waits for the work queued on the cache's buffers: the kernels and value fetches address
    /// them (and the pinned values) by raw address, which the frees that follow do not wait
    /// for.
    fn drop(&mut self) {
        let _ = self.compute_stream.synchronize();
        let _ = self.step.copy_stream().synchronize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
