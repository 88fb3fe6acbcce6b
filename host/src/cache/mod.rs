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
//! [`ValueHome::Device`] keeps the values in GPU memory (no PCIe traffic) when they fit.
use std::sync::Arc;

use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, LaunchConfig,
};
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

use crate::pinned::PinnedBuffer;
use crate::ptx;
use arena::Arenas;
use memory::Footprint;
pub use memory::{host_available_bytes, CachePlan, MemoryReport};
use offload::offload_values;
pub use params::{CacheCapacity, CacheShape, ShadowKvParams, ValueHome};

/// A live sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(u64);

struct Entry {
    id: SequenceId,
    /// The layout with no generated tokens (`kv.len = sparse_start + S`).
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
    /// bf16 `[max_sequences, q_heads, head_dim]`: each sequence's last prompt query.
    last_queries: CudaSlice<bf16>,
    arenas: Arenas,
    /// Recorded on the compute stream at each prefill: what the value offload waits for.
    source_ready: CudaEvent,
    /// Recorded on the copy stream after the latest prefill's value offload.
    offload_done: CudaEvent,
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
            // SAFETY: each row is written by its sequence's prefill before the selection reads it.
            last_queries: unsafe { stream.alloc(capacity.max_sequences * shape.q_heads * d)? },
            arenas: Arenas::new(&sizes),
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

    /// The live sequences in batch order: the order of the rows of `q`, `out` and `append`'s
    /// keys and values.
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

    /// The layer's state (buffers and batch) as the decode kernels see it.
    pub fn layer(&self, layer: usize) -> Result<&ShadowLayer> {
        self.check_layer(layer)?;
        Ok(&self.layers[layer])
    }

    /// The statistics of the latest decode step, which is the last layer passed to
    /// [`decode_layer`](Self::decode_layer): the layers share one step workspace (waits until
    /// its plan has run).
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
        self.entries
            .iter()
            .position(|e| e.id == id)
            .ok_or_else(|| invalid("sequence", format!("{id:?} is not live"), "a live sequence"))
    }

    fn layout_in(&self, entry: &Entry, layer: usize) -> ShadowSequence {
        let mut layout = entry.layout;
        layout.kv.len += entry.generated[layer];
        layout
    }

    /// Re-validates and uploads every layer's batch (after a sequence came or went).
    fn refresh_batches(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        for layer in 0..self.layers.len() {
            let layouts: Vec<ShadowSequence> = self
                .entries
                .iter()
                .map(|e| self.layout_in(e, layer))
                .collect();
            let batch = &mut self.layers[layer].batch;
            if batch.batch() == layouts.len() {
                batch.update(stream, &layouts)?;
            } else {
                *batch = ShadowBatch::new(stream, self.config, &layouts)?;
            }
        }
        Ok(())
    }

    /// Adds a sequence with a `prompt_len`-token prompt (prefill each layer next). Fails,
    /// changing nothing, if the prompt is too short for the budget or the cache has no room.
    pub fn add_sequence(&mut self, gpu: &Gpu, prompt_len: usize) -> Result<SequenceId> {
        if self.entries.len() == self.capacity.max_sequences {
            return Err(exhausted(
                "the cache's sequences (CacheCapacity::max_sequences)",
                self.entries.len() as u64 + 1,
                self.capacity.max_sequences as u64,
                "sequences",
            ));
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
            kv: SequenceLayout {
                offset: starts.kv as u64,
                capacity: geometry.kv_capacity,
                len: sparse_start + self.params.sparse_budget as u32,
            },
        };
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        self.entries.push(Entry {
            id,
            layout,
            footprint,
            generated: vec![0; self.layers.len()],
            prefilled: vec![false; self.layers.len()],
        });
        let stream = gpu.stream().clone();
        if let Err(error) = self.refresh_batches(&stream) {
            self.remove_entry(self.entries.len() - 1);
            return Err(error);
        }
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
        entry
    }

    /// Removes a sequence between steps; the later sequences move up one row of the batch and
    /// keep their resident slots.
    pub fn remove_sequence(&mut self, gpu: &Gpu, id: SequenceId) -> Result<()> {
        let index = self.index_of(id)?;
        let stream = gpu.stream().clone();
        let per_sequence = self.config.kv_heads * self.config.budget_chunks;
        let later = (self.entries.len() - index - 1) * per_sequence;
        if later > 0 {
            // Overlapping device copies are not allowed: go through a temporary.
            // SAFETY: fully written by the copy below before it is read.
            let mut moved = unsafe { stream.alloc::<u32>(later)? };
            for layer in &mut self.layers {
                let from = (index + 1) * per_sequence;
                stream.memcpy_dtod(&layer.resident.slice(from..from + later), &mut moved)?;
                let to = index * per_sequence;
                stream.memcpy_dtod(&moved, &mut layer.resident.slice_mut(to..to + later))?;
            }
        }
        self.remove_entry(index);
        self.refresh_batches(&stream)
    }

    /// Builds `layer`'s shadow of sequence `id` from its prompt: `pre_rope_keys`
    /// (`[L, Hkv*d]` bf16), the post-RoPE keys and values in `source` (`[Hkv, capacity, d]`),
    /// and `last_query` (`[q_heads, d]` bf16, post-RoPE: the last prompt token's query).
    /// Nothing waits for the GPU. The values are copied to the cache on the copy stream, so
    /// `source.values` must stay unchanged until the copy stream has passed this call (any
    /// later `decode_layer` orders after it, with the overlap on or off; other work on
    /// `gpu.stream()` does not).
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
            index,
            source,
            &mut self.scratch,
            self.step.scratch(),
        )?;
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
        let batch_queries = self.entries.len() * q_width;
        stream.memcpy_dtod(
            last_query,
            &mut self
                .last_queries
                .slice_mut(index * q_width..(index + 1) * q_width),
        )?;
        let part = shadow.batch.part(index..index + 1)?;
        let queries: CudaView<'_, bf16> = self.last_queries.slice(0..batch_queries);
        self.step.select_part(gpu, shadow, part, &queries)?;
        shadow_prefill::gather_exact(
            gpu,
            &stream,
            shadow,
            index,
            source,
            &mut self.scratch,
            self.step.scratch(),
        )?;
        self.step.rebuild_part(gpu, shadow, part)?;
        let entry = &mut self.entries[index];
        entry.prefilled[layer] = true;
        if entry.generated[layer] != 0 {
            entry.generated[layer] = 0;
            self.refresh_batches(&stream)?;
        }
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
    pub fn append(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        keys: &impl DevicePtr<bf16>,
        values: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        self.check_ready(layer)?;
        let (heads, d) = (self.shape.kv_heads, self.shape.head_dim);
        let elements = self.entries.len() * heads * d;
        check_len("keys", keys.len(), elements, "[batch, kv_heads, head_dim]")?;
        check_len(
            "values",
            values.len(),
            elements,
            "[batch, kv_heads, head_dim]",
        )?;
        if let Some(full) = self
            .entries
            .iter()
            .find(|e| e.generated[layer] as usize >= self.capacity.max_generated)
        {
            return Err(exhausted(
                "a sequence's generated tokens (CacheCapacity::max_generated)",
                u64::from(full.generated[layer]) + 1,
                self.capacity.max_generated as u64,
                "tokens",
            ));
        }
        let stream = gpu.stream().clone();
        let launch = LaunchConfig {
            grid_dim: (self.entries.len() as u32, heads as u32, 1),
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
        for entry in &mut self.entries {
            entry.generated[layer] += 1;
        }
        let layouts: Vec<ShadowSequence> = self
            .entries
            .iter()
            .map(|e| self.layout_in(e, layer))
            .collect();
        self.layers[layer].batch.update(&stream, &layouts)
    }

    fn check_ready(&self, layer: usize) -> Result<()> {
        self.check_layer(layer)?;
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
        Ok(())
    }

    /// One decode step of `layer`: `q` is `[batch, q_heads, d]` (post-RoPE, the newest token,
    /// already appended), `out` the same shape. Returns without waiting for the GPU.
    pub fn decode_layer(
        &mut self,
        gpu: &Gpu,
        layer: usize,
        q: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        self.check_ready(layer)?;
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
        self.check_ready(layer)?;
        let q_elements = self.entries.len() * self.shape.q_heads * self.shape.head_dim;
        check_len("q", q.len(), q_elements, "[batch, q_heads, head_dim]")?;
        check_len("out", out.len(), q_elements, "[batch, q_heads, head_dim]")?;
        self.append(gpu, layer, new_keys, new_values)?;
        self.decode_layer(gpu, layer, q, out)
    }
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
