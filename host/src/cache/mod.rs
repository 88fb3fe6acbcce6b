//! [`ShadowKvCache`]: the ShadowKV cache an engine links against (`docs/ARCHITECTURE.md`).
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

use cudarc::driver::{CudaEvent, CudaStream};
pub use shadowkv_kernels::cache as kernel_layout;

use crate::decode_step::{DecodeStep, ShadowLayer, StepStats};
use crate::error::{exhausted, invalid, Result};
use crate::gpu::Gpu;
use crate::kernels::attention::SequenceLayout;
use crate::kernels::factorise::Factoriser;
use crate::kernels::fetch::LayerValues;
use crate::kernels::shadow::{ShadowBatch, ShadowConfig, ShadowSequence};
use crate::kernels::shadow_prefill::PrefillScratch;
use crate::kernels::tier::ValueTier;

mod arena;
mod decode;
mod memory;
mod offload;
mod params;
mod prefill;
mod replay;
mod rows;

use crate::pinned::PinnedBuffer;
use arena::Arenas;
use memory::Footprint;
pub use memory::{
    host_available_bytes, tier_chunks_for, tier_chunks_in_free, CachePlan, MemoryReport,
};
use offload::offload_values;
pub use params::{CacheCapacity, CacheShape, ShadowKvParams, ValueFormat, ValueHome, ValueStorage};
pub use prefill::PendingPrefill;
pub use replay::{DeviceStepLayouts, StepLayouts, StepSnapshot};
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
    values: ValueStorage,
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
    /// Recorded on the factoriser's stream after the latest prefill's factorisation.
    factor_done: CudaEvent,
    /// The layer between `prefill_layer_start` and `prefill_layer_finish`, if any.
    pending_prefill: Option<PendingPrefill>,
    /// The live sequences in the order they were added (ids ascending).
    entries: Vec<Entry>,
    next_id: u64,
    /// Where steps read their layouts, if from device copies (see
    /// [`read_step_layouts_from`](Self::read_step_layouts_from)).
    device_layouts: Option<DeviceStepLayouts>,
}

impl ShadowKvCache {
    /// What a cache of `capacity` takes, by part (GPU and host).
    pub fn memory_for(
        shape: &CacheShape,
        params: &ShadowKvParams,
        values: impl Into<ValueStorage>,
        capacity: &CacheCapacity,
    ) -> Result<MemoryReport> {
        memory::memory_for(shape, params, values.into(), capacity)
    }

    /// How many sequences of `prompt_len` tokens (each generating up to `max_generated`) fit
    /// in `gpu_bytes` of GPU memory and `host_bytes` of pinned host memory, and how many would
    /// with the whole K/V cache on the GPU.
    pub fn plan(
        shape: &CacheShape,
        params: &ShadowKvParams,
        values: impl Into<ValueStorage>,
        prompt_len: usize,
        max_generated: usize,
        gpu_bytes: u64,
        host_bytes: u64,
    ) -> Result<CachePlan> {
        memory::plan(
            shape,
            params,
            values.into(),
            prompt_len,
            max_generated,
            gpu_bytes,
            host_bytes,
        )
    }

    /// A cache for `shape` and `params`, sized for `capacity`, with the values where and as
    /// `values` says (a [`ValueHome`] alone keeps them in bf16; see [`ValueStorage`]). Checks
    /// first that the buffers fit in the GPU's free memory and (for [`ValueHome::Host`]) the
    /// host's available memory, and says how much was needed.
    pub fn new(
        gpu: &Gpu,
        shape: CacheShape,
        params: ShadowKvParams,
        values: impl Into<ValueStorage>,
        capacity: CacheCapacity,
    ) -> Result<Self> {
        let values: ValueStorage = values.into();
        let config = memory::shadow_config(&shape, &params)?;
        let (free, _) = gpu.context().mem_get_info()?;
        memory::check_fits(
            &shape,
            &params,
            values,
            &capacity,
            free as u64,
            host_available_bytes(),
        )?;
        let sizes = memory::buffer_sizes(&shape, &params, &capacity, values.format)?;
        let stream = gpu.stream().clone();
        let d = shape.head_dim;
        // A batch that only sizes the step until the first sequence arrives: one sequence that
        // fits every buffer (see `placeholder`).
        let placeholder = ShadowBatch::new(&stream, config, &[placeholder(&config)])?;
        let mut layers = Vec::with_capacity(shape.layers);
        let slots = capacity.max_sequences * config.kv_heads * config.budget_chunks;
        for _ in 0..shape.layers {
            let len = sizes.values.max(16);
            let layer_values = match (values.home.on_host(), values.format) {
                (true, ValueFormat::Bf16) => LayerValues::Host(PinnedBuffer::new(gpu, len)?),
                (false, ValueFormat::Bf16) => LayerValues::Device(stream.alloc_zeros(len)?),
                (true, format) => LayerValues::HostPacked(format, PinnedBuffer::new(gpu, len)?),
                (false, format) => LayerValues::DevicePacked(format, stream.alloc_zeros(len)?),
            };
            let tier = match values.home {
                ValueHome::Tiered { chunks_per_head } => Some(ValueTier::new(
                    &stream,
                    values.format,
                    capacity.max_sequences,
                    shape.kv_heads,
                    chunks_per_head,
                    params.chunk_size,
                    d,
                )?),
                _ => None,
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
                    values: layer_values,
                    tier,
                    resident: stream.alloc(slots.max(1))?,
                });
            }
        }
        let longest_chunks = params.prompt_chunks(capacity.max_prompt_len);
        Ok(ShadowKvCache {
            step: DecodeStep::new(gpu, shape.rope, &placeholder)?,
            // A stream of its own, so a prefill's factorisation runs beside the next layer's
            // forward pass (see `prefill`).
            factoriser: Factoriser::new(&gpu.new_stream()?, shape.kv_width(), shape.layers)?,
            scratch: PrefillScratch::new(&stream, &config, longest_chunks, params.outlier_chunks)?,
            arenas: Arenas::new(&sizes),
            rows: Rows::new(resident_rows(&capacity)?),
            source_ready: gpu.new_event(false)?,
            offload_done: gpu.new_event(true)?,
            factor_done: gpu.new_event(false)?,
            pending_prefill: None,
            shape,
            params,
            config,
            capacity,
            values,
            layers,
            compute_stream: stream,
            entries: Vec::new(),
            next_id: 0,
            device_layouts: None,
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
        self.values.home
    }
    /// How the values are stored (bf16, fp8 or int4).
    pub fn value_format(&self) -> ValueFormat {
        self.values.format
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
        memory::memory_for(&self.shape, &self.params, self.values, &self.capacity)
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
        let footprint = memory::footprint(&self.shape, &self.params, &geometry, self.values.format);
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
        // A pending layer of this sequence is abandoned (the factorisation it would have
        // queued writes only the sequence's own, now free, ranges, and was never queued).
        if self.pending_prefill.is_some_and(|pending| pending.id == id) {
            self.pending_prefill = None;
        }
        Ok(())
    }
}

/// Where `id` is in `entries` (kept in id order: ids only grow, and removal keeps the order).
fn position(entries: &[Entry], id: SequenceId) -> Option<usize> {
    entries.binary_search_by_key(&id, |e| e.id).ok()
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
        let _ = self.factoriser.stream().synchronize();
    }
}
