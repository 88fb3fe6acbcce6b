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
use shadowkv_kernels::shadow::{MAX_CHUNK_SIZE, MAX_RANK, RANK_STEP};
use shadowkv_kernels::shadow_prefill::exact_rows;

use crate::decode_step::{DecodeStep, RopeConfig, ShadowLayer, StepStats};
use crate::error::{check_len, invalid, Error, Result};
use crate::gpu::{address, Gpu};
use crate::kernels::attention::SequenceLayout;
use crate::kernels::factorise::Factoriser;
use crate::kernels::fetch::LayerValues;
use crate::kernels::shadow::{ShadowBatch, ShadowConfig, ShadowSequence};
use crate::kernels::shadow_prefill::{self, PrefillScratch, PrefillSource};
use crate::pinned::PinnedBuffer;
use crate::ptx;

fn parameter_error(problem: String) -> Error {
    invalid("params", problem, "ShadowKV parameters the kernels support")
}

/// ShadowKV's parameters, with the paper's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowKvParams {
    /// Tokens per chunk (`c`).
    pub chunk_size: usize,
    /// Tokens attended in selected chunks per step (`S`), a multiple of `chunk_size`.
    pub sparse_budget: usize,
    /// Rank of the key factorisation (`r`).
    pub rank: usize,
    /// Chunks at the end of the prompt kept exact (`n_local`).
    pub local_chunks: usize,
    /// Chunks per KV head kept exact because their keys stray from their landmark (`n_out`).
    pub outlier_chunks: usize,
}

impl Default for ShadowKvParams {
    fn default() -> Self {
        ShadowKvParams {
            chunk_size: 8,
            sparse_budget: 2048,
            rank: 160,
            local_chunks: 4,
            outlier_chunks: 48,
        }
    }
}

impl ShadowKvParams {
    /// Selected chunks per step (`S / c`).
    pub fn budget_chunks(&self) -> usize {
        self.sparse_budget / self.chunk_size.max(1)
    }

    /// Checks the parameters against the kernels' limits and the keys' width `kv_heads * head_dim`.
    pub fn validate(&self, kv_heads: usize, head_dim: usize) -> Result<()> {
        if !(1..=MAX_CHUNK_SIZE as usize).contains(&self.chunk_size) {
            return Err(parameter_error(format!(
                "chunk size {} is out of range: expected 1 to {MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        if self.sparse_budget == 0 || !self.sparse_budget.is_multiple_of(self.chunk_size) {
            return Err(parameter_error(format!(
                "sparse budget {} is not a positive multiple of the chunk size {}",
                self.sparse_budget, self.chunk_size
            )));
        }
        let step = RANK_STEP as usize;
        if self.rank == 0 || !self.rank.is_multiple_of(step) || self.rank > MAX_RANK as usize {
            return Err(parameter_error(format!(
                "rank {} is out of range: expected a multiple of {step} from {step} to {MAX_RANK}",
                self.rank
            )));
        }
        if self.rank > kv_heads * head_dim {
            return Err(parameter_error(format!(
                "rank {} exceeds the keys' width Hkv*d = {}",
                self.rank,
                kv_heads * head_dim
            )));
        }
        Ok(())
    }

    /// Whether a `prompt_len`-token prompt leaves at least the budget's chunks to select from.
    pub fn check_prompt(&self, prompt_len: usize) -> Result<()> {
        let chunks = self.prompt_chunks(prompt_len);
        let outliers = self.outlier_chunks.min(chunks);
        if chunks - outliers < self.budget_chunks() {
            return Err(parameter_error(format!(
                "a {prompt_len}-token prompt leaves {} selectable chunks per KV head ({chunks} chunks \
                 outside the local window, {outliers} outliers); the sparse budget needs {} chunks of \
                 {}: use a longer prompt or a smaller budget",
                chunks - outliers,
                self.budget_chunks(),
                self.chunk_size
            )));
        }
        Ok(())
    }

    /// Chunks of a `prompt_len`-token prompt outside the local window: `floor(L/c) - n_local`,
    /// rounded down to a multiple of 8.
    pub fn prompt_chunks(&self, prompt_len: usize) -> usize {
        ((prompt_len / self.chunk_size).saturating_sub(self.local_chunks) / 8) * 8
    }
}

impl ShadowKvParams {
    /// Outlier chunks per KV head of a `prompt_len`-token prompt.
    pub fn prompt_outliers(&self, prompt_len: usize) -> usize {
        self.outlier_chunks.min(self.prompt_chunks(prompt_len))
    }
}

/// The model's attention shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CacheShape {
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// The model's RoPE (keys are rebuilt before it and rotated at decode).
    pub rope: RopeConfig,
}

impl CacheShape {
    /// Llama-3-8B: 32 layers, 32/8 heads, d 128, theta 500000.
    pub const LLAMA_3_8B: CacheShape = CacheShape {
        layers: 32,
        q_heads: 32,
        kv_heads: 8,
        head_dim: 128,
        rope: RopeConfig::LLAMA_3,
    };

    /// Width of the keys of one token: `Hkv * d`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Where the values live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueHome {
    /// Pinned, device-mapped host memory (ShadowKV's offload; misses come over PCIe).
    Host,
    /// GPU memory, when it fits (no PCIe traffic).
    Device,
}

/// What a cache is sized for; everything is allocated once for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheCapacity {
    /// Sequences decoded together.
    pub max_sequences: usize,
    /// The longest prompt.
    pub max_prompt_len: usize,
    /// Prompt tokens of all live sequences together.
    pub max_prompt_tokens: usize,
    /// Tokens each sequence may generate after its prompt.
    pub max_generated: usize,
}

impl CacheCapacity {
    /// `sequences` sequences of `prompt_len` tokens each, generating up to `max_generated`.
    pub fn uniform(sequences: usize, prompt_len: usize, max_generated: usize) -> Self {
        CacheCapacity {
            max_sequences: sequences,
            max_prompt_len: prompt_len,
            max_prompt_tokens: sequences.saturating_mul(prompt_len),
            max_generated,
        }
    }
}

/// Bytes by part, on the GPU and in host memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryReport {
    pub gpu: Vec<(&'static str, u64)>,
    pub host: Vec<(&'static str, u64)>,
}

impl MemoryReport {
    pub fn gpu_bytes(&self) -> u64 {
        self.gpu.iter().map(|(_, b)| b).sum()
    }
    pub fn host_bytes(&self) -> u64 {
        self.host.iter().map(|(_, b)| b).sum()
    }
}

/// How many sequences of one length fit (see [`ShadowKvCache::plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachePlan {
    /// The cache for one such sequence.
    pub per_sequence: MemoryReport,
    /// Sequences that fit in the GPU and host bytes given (0 if not even one).
    pub sequences: usize,
    /// The whole K/V cache of one such sequence on the GPU (full attention), for comparison.
    pub full_cache_bytes: u64,
    /// Sequences that fit with full attention in the same GPU bytes.
    pub full_cache_sequences: usize,
}

/// One sequence's sizes, from its prompt length and the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    prompt_len: u32,
    chunks: u32,
    landmarks: u32,
    /// Local window and outlier rows at the front of each K/V head.
    exact_rows: u32,
    /// Rows of each K/V head: exact rows, sparse slots, generated tokens.
    kv_capacity: u32,
}

/// Element counts of one sequence in each per-layer buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Footprint {
    landmark_rows: usize,
    a: usize,
    bm: usize,
    kv: usize,
    values: usize,
}

/// First-fit ranges of one buffer (element offsets); every size is a multiple of 8 elements
/// where it must be, so offsets stay 16-byte aligned.
#[derive(Clone, Debug)]
struct Arena {
    name: &'static str,
    /// Free `(start, len)` ranges, sorted and merged.
    free: Vec<(usize, usize)>,
}

impl Arena {
    fn new(name: &'static str, size: usize) -> Arena {
        Arena {
            name,
            free: vec![(0, size)],
        }
    }

    fn alloc(&mut self, len: usize) -> Result<usize> {
        if len == 0 {
            return Ok(0);
        }
        let Some(index) = self.free.iter().position(|&(_, free)| free >= len) else {
            let largest = self.free.iter().map(|&(_, l)| l).max().unwrap_or(0);
            return Err(invalid(
                "sequence",
                format!(
                    "needs {len} elements of the cache's {} buffer, whose largest free range is {largest}",
                    self.name
                ),
                "a cache sized for it (CacheCapacity) or fewer live sequences",
            ));
        };
        let (start, free) = self.free[index];
        if free == len {
            self.free.remove(index);
        } else {
            self.free[index] = (start + len, free - len);
        }
        Ok(start)
    }

    fn release(&mut self, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        let index = self.free.partition_point(|&(s, _)| s < start);
        self.free.insert(index, (start, len));
        // Merge with the neighbours.
        if index + 1 < self.free.len() && start + len == self.free[index + 1].0 {
            self.free[index].1 += self.free[index + 1].1;
            self.free.remove(index + 1);
        }
        if index > 0 && self.free[index - 1].0 + self.free[index - 1].1 == start {
            self.free[index - 1].1 += self.free[index].1;
            self.free.remove(index);
        }
    }
}

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
    step: DecodeStep,
    factoriser: Factoriser,
    scratch: PrefillScratch,
    /// bf16 `[max_sequences, q_heads, head_dim]`: each sequence's last prompt query.
    last_queries: CudaSlice<bf16>,
    arenas: [Arena; 5],
    /// Recorded on the compute stream at each prefill: what the value offload waits for.
    source_ready: CudaEvent,
    /// Recorded on the copy stream after the latest prefill's value offload.
    offload_done: CudaEvent,
    entries: Vec<Entry>,
    next_id: u64,
}

const LANDMARKS: usize = 0;
const A: usize = 1;
const BM: usize = 2;
const KV: usize = 3;
const VALUES: usize = 4;

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Bytes of host memory the system says are available (`MemAvailable`), if it says.
pub fn host_available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl ShadowKvCache {
    /// The validated decode config for `shape` and `params`.
    fn config_for(shape: &CacheShape, params: &ShadowKvParams) -> Result<ShadowConfig> {
        params.validate(shape.kv_heads, shape.head_dim)?;
        if shape.layers == 0 {
            return Err(invalid("shape.layers", "is 0", "at least one layer"));
        }
        let config = ShadowConfig {
            q_heads: shape.q_heads,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
            chunk_size: params.chunk_size,
            rank: params.rank,
            budget_chunks: params.budget_chunks(),
        };
        config.validate()?;
        Ok(config)
    }

    fn geometry(
        params: &ShadowKvParams,
        prompt_len: usize,
        max_generated: usize,
    ) -> Result<Geometry> {
        params.check_prompt(prompt_len)?;
        let too_long = || {
            invalid(
                "prompt_len",
                format!("{prompt_len} tokens plus {max_generated} generated"),
                "fewer than 2^31 tokens",
            )
        };
        let prompt = u32::try_from(prompt_len).map_err(|_| too_long())?;
        let chunks = params.prompt_chunks(prompt_len) as u32;
        let outliers = params.prompt_outliers(prompt_len) as u32;
        let exact = exact_rows(prompt, chunks, params.chunk_size as u32, outliers);
        let kv_capacity = (exact as usize + params.sparse_budget + max_generated)
            .try_into()
            .ok()
            .filter(|&c: &u32| c < i32::MAX as u32)
            .ok_or_else(too_long)?;
        Ok(Geometry {
            prompt_len: prompt,
            chunks,
            landmarks: chunks - outliers,
            exact_rows: exact,
            kv_capacity,
        })
    }

    fn footprint(shape: &CacheShape, params: &ShadowKvParams, geometry: &Geometry) -> Footprint {
        let (heads, d) = (shape.kv_heads, shape.head_dim);
        Footprint {
            landmark_rows: heads * geometry.landmarks as usize,
            a: geometry.prompt_len as usize * params.rank,
            bm: params.rank * shape.kv_width(),
            kv: heads * geometry.kv_capacity as usize * d,
            values: heads * geometry.prompt_len as usize * d,
        }
    }

    /// Per-layer buffer sizes (elements) for `capacity`: the sum of the footprints of
    /// `max_sequences` sequences sharing `max_prompt_tokens`, the worst split (each buffer's
    /// own worst case: some grow with the prompt, the K/V blocks with the count).
    fn buffer_sizes(
        shape: &CacheShape,
        params: &ShadowKvParams,
        capacity: &CacheCapacity,
    ) -> Result<Footprint> {
        if capacity.max_sequences == 0 || capacity.max_prompt_len == 0 {
            return Err(invalid(
                "capacity",
                format!("{capacity:?}"),
                "at least one sequence with a prompt",
            ));
        }
        let longest = Self::geometry(params, capacity.max_prompt_len, capacity.max_generated)?;
        let tokens = capacity.max_prompt_tokens.max(capacity.max_prompt_len);

        let longest_footprint = Self::footprint(shape, params, &longest);
        // A K/V block holds the local window (below `n_local + 8` chunks plus the remainder
        // of the last chunk, whatever the prompt's length), the outliers, the slots and the
        // generated tokens.
        let c = params.chunk_size;
        let exact_bound = ((params.local_chunks + 9) * c).min(capacity.max_prompt_len)
            + params.outlier_chunks * c;
        let per_sequence_kv =
            shape.kv_width() * (exact_bound + params.sparse_budget + capacity.max_generated);
        let sequences = capacity.max_sequences;
        Ok(Footprint {
            // Landmarks per head are at most a sequence's tokens over c, so in all at most
            // Hkv * tokens / c rows.
            landmark_rows: shape.kv_heads * (tokens / params.chunk_size),
            a: tokens * params.rank,
            bm: sequences * longest_footprint.bm,
            kv: sequences * per_sequence_kv,
            values: tokens * shape.kv_width(),
        })
    }

    /// What a cache of `capacity` takes, by part (GPU and host).
    pub fn memory_for(
        shape: &CacheShape,
        params: &ShadowKvParams,
        values_home: ValueHome,
        capacity: &CacheCapacity,
    ) -> Result<MemoryReport> {
        let config = Self::config_for(shape, params)?;
        let sizes = Self::buffer_sizes(shape, params, capacity)?;
        let layers = shape.layers as u64;
        let d = shape.head_dim as u64;
        let slots = (capacity.max_sequences * shape.kv_heads * config.budget_chunks) as u64;
        let longest_chunks = params.prompt_chunks(capacity.max_prompt_len) as u64;
        let heads = shape.kv_heads as u64;
        let landmark_rows = sizes.landmark_rows as u64;
        let values = layers * sizes.values as u64 * 2;
        let mut report = MemoryReport {
            gpu: vec![
                ("landmarks", layers * landmark_rows * d * 2),
                ("chunk ids", layers * landmark_rows * 4),
                ("A", layers * sizes.a as u64 * 2),
                ("Bm", layers * sizes.bm as u64 * 2),
                ("K/V blocks", layers * sizes.kv as u64 * 2 * 2),
                ("resident ids", layers * slots * 4),
                (
                    "prefill scratch",
                    heads * longest_chunks * (d * 2 + 4)
                        + crate::kernels::factorise::scratch_bytes(shape.kv_width())
                        + (capacity.max_sequences * shape.q_heads) as u64 * d * 2,
                ),
                (
                    "decode scratch",
                    landmark_rows * (config.group() as u64 + 1) * 4 + slots * 16,
                ),
            ],
            host: Vec::new(),
        };
        match values_home {
            ValueHome::Host => report.host.push(("values (pinned)", values)),
            ValueHome::Device => report.gpu.push(("values", values)),
        }
        Ok(report)
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
        let report = |n: usize| {
            Self::memory_for(
                shape,
                params,
                values_home,
                &CacheCapacity::uniform(n, prompt_len, max_generated),
            )
        };
        let one = report(1)?;
        let fits = |r: &MemoryReport| r.gpu_bytes() <= gpu_bytes && r.host_bytes() <= host_bytes;
        // The footprint grows with the count (the scratch barely), so search upwards.
        let mut sequences = 0;
        let (mut low, mut high) = (0usize, 1usize);
        while fits(&report(high)?) {
            low = high;
            high *= 2;
            if high > 1 << 20 {
                break;
            }
        }
        while low + 1 < high {
            let middle = (low + high) / 2;
            if fits(&report(middle)?) {
                low = middle;
            } else {
                high = middle;
            }
        }
        if low > 0 {
            sequences = low;
        }
        let full_cache_bytes = shape.layers as u64
            * 2
            * shape.kv_width() as u64
            * (prompt_len + max_generated) as u64
            * 2;
        Ok(CachePlan {
            per_sequence: one,
            sequences,
            full_cache_bytes,
            full_cache_sequences: (gpu_bytes / full_cache_bytes.max(1)) as usize,
        })
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
        let config = Self::config_for(&shape, &params)?;
        let report = Self::memory_for(&shape, &params, values_home, &capacity)?;
        let (free, _) = gpu.context().mem_get_info()?;
        if report.gpu_bytes() > free as u64 {
            return Err(invalid(
                "capacity",
                format!(
                    "needs {} of GPU memory ({:?}) but {} is free",
                    gib(report.gpu_bytes()),
                    report.gpu,
                    gib(free as u64)
                ),
                "a smaller CacheCapacity (ShadowKvCache::plan says what fits)",
            ));
        }
        if let Some(available) = host_available_bytes() {
            if report.host_bytes() > available {
                return Err(invalid(
                    "capacity",
                    format!(
                        "needs {} of pinned host memory but {} is available",
                        gib(report.host_bytes()),
                        gib(available)
                    ),
                    "a smaller CacheCapacity, or ValueHome::Device if the GPU has room",
                ));
            }
        }
        let sizes = Self::buffer_sizes(&shape, &params, &capacity)?;
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
            arenas: [
                Arena::new("landmarks", sizes.landmark_rows),
                Arena::new("A", sizes.a),
                Arena::new("Bm", sizes.bm),
                Arena::new("K/V", sizes.kv),
                Arena::new("values", sizes.values),
            ],
            source_ready: gpu.new_event(false)?,
            offload_done: gpu.new_event(true)?,
            shape,
            params,
            config,
            capacity,
            values_home,
            layers,
            entries: Vec::new(),
            next_id: 0,
        })
    }

    pub fn shape(&self) -> &CacheShape {
        &self.shape
    }
    pub fn params(&self) -> &ShadowKvParams {
        &self.params
    }
    pub fn config(&self) -> &ShadowConfig {
        &self.config
    }
    pub fn capacity(&self) -> &CacheCapacity {
        &self.capacity
    }
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
        let layer = self
            .layers
            .first()
            .ok_or_else(|| invalid("cache", "has no layers", "a cache with layers"))?;
        self.step.stats(&layer.batch)
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
        Self::memory_for(&self.shape, &self.params, self.values_home, &self.capacity)
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
            return Err(invalid(
                "sequence",
                format!("would be number {}", self.entries.len() + 1),
                format!("at most max_sequences = {}", self.capacity.max_sequences),
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
        let geometry = Self::geometry(&self.params, prompt_len, self.capacity.max_generated)?;
        let footprint = Self::footprint(&self.shape, &self.params, &geometry);
        let lens = [
            footprint.landmark_rows,
            footprint.a,
            footprint.bm,
            footprint.kv,
            footprint.values,
        ];
        let mut offsets = [0usize; 5];
        for part in 0..5 {
            match self.arenas[part].alloc(lens[part]) {
                Ok(offset) => offsets[part] = offset,
                Err(error) => {
                    for undo in 0..part {
                        self.arenas[undo].release(offsets[undo], lens[undo]);
                    }
                    return Err(error);
                }
            }
        }
        let sparse_start = geometry.exact_rows;
        let layout = ShadowSequence {
            landmark_row: offsets[LANDMARKS] as u64,
            a_offset: offsets[A] as u64,
            bm_offset: offsets[BM] as u64,
            host_value_offset: offsets[VALUES] as u64,
            landmarks: geometry.landmarks,
            chunks: geometry.chunks,
            prompt_len: geometry.prompt_len,
            sparse_start,
            kv: SequenceLayout {
                offset: offsets[KV] as u64,
                capacity: geometry.kv_capacity,
                len: sparse_start + self.params.sparse_budget as u32,
            },
        };
        let id = SequenceId(self.next_id);
        self.next_id += 1;
        self.entries.push(Entry {
            id,
            layout,
            footprint: Footprint {
                landmark_rows: lens[0],
                a: lens[1],
                bm: lens[2],
                kv: lens[3],
                values: lens[4],
            },
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
        let f = entry.footprint;
        let l = entry.layout;
        self.arenas[LANDMARKS].release(l.landmark_row as usize, f.landmark_rows);
        self.arenas[A].release(l.a_offset as usize, f.a);
        self.arenas[BM].release(l.bm_offset as usize, f.bm);
        self.arenas[KV].release(l.kv.offset as usize, f.kv);
        self.arenas[VALUES].release(l.host_value_offset as usize, f.values);
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
    /// later `decode_layer` orders after it; `gpu.stream()` does not).
    pub fn prefill_layer<T: DevicePtr<bf16>>(
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
            return Err(invalid(
                "append",
                format!(
                    "{:?} has generated {} tokens in layer {layer}",
                    full.id, full.generated[layer]
                ),
                format!(
                    "at most the cache's max_generated = {}",
                    self.capacity.max_generated
                ),
            ));
        }
        let stream = gpu.stream().clone();
        let shadow = &mut self.layers[layer];
        let params = AppendParams {
            sequences: shadow.batch.sequences_address(&stream),
            keys: address(keys, &stream),
            values: address(values, &stream),
            k: shadow.k.device_ptr_mut(&stream).0,
            v: shadow.v.device_ptr_mut(&stream).0,
            kv_heads: heads as u32,
            head_dim: d as u32,
        };
        let launch = LaunchConfig {
            grid_dim: (self.entries.len() as u32, heads as u32, 1),
            block_dim: (layout::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every sequence has room for one more row (checked above: its K/V block was
        // sized for max_generated tokens), `keys` and `values` hold [batch, Hkv, d], and the
        // batch's device copy is the layouts the rows are computed from.
        unsafe { gpu.launch(&stream, ptx::KV_APPEND, launch, params)? };
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

/// Copies the prompt's values (`[Hkv, L, d]` of `source`, checked by the prefill kernels'
/// launcher) into the sequence's range of the value buffer on `copy_stream`, once `ready`
/// (recorded on the compute stream) has passed.
fn offload_values<T: DevicePtr<bf16>>(
    ready: &CudaEvent,
    copy_stream: &Arc<CudaStream>,
    source: &PrefillSource<'_, T>,
    sequence: &ShadowSequence,
    kv_heads: usize,
    head_dim: usize,
    values: &mut LayerValues,
) -> Result<()> {
    let layout = source.layout;
    let prompt = sequence.prompt_len as usize;
    let (target, target_len) = values.address(copy_stream);
    let target_start = sequence.host_value_offset as usize;
    crate::error::check_reach(
        "values",
        target_len,
        target_start + kv_heads * prompt * head_dim,
    )?;
    copy_stream.wait(ready)?;
    // Held until the copies are queued, so the source's use is recorded after them.
    let (source_address, _source_use) = source.values.device_ptr(copy_stream);
    let row_bytes = head_dim * 2;
    let contiguous = layout.capacity as usize == prompt;
    let (copies, bytes) = match contiguous {
        true => (1, kv_heads * prompt * row_bytes),
        false => (kv_heads, prompt * row_bytes),
    };
    for head in 0..copies {
        let from = source_address
            + ((layout.offset as usize + head * layout.capacity as usize * head_dim) * 2) as u64;
        let to = target + ((target_start + head * prompt * head_dim) * 2) as u64;
        // SAFETY: both ranges lie inside their buffers (checked above); the target is device
        // memory or mapped pinned memory (unified addressing), and the copy is ordered on
        // `copy_stream` after the source was ready.
        unsafe { crate::gpu::copy_async(copy_stream, to, from, bytes)? };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// First fit against a model of the buffer: ranges stay inside it and disjoint, an
        /// allocation fails only when no free run is long enough, and releasing everything
        /// merges the free list back into one range.
        #[test]
        fn arena_matches_a_model(
            size in 1usize..200,
            steps in prop::collection::vec((any::<bool>(), 0usize..60, any::<prop::sample::Index>()), 1..80),
        ) {
            let mut arena = Arena::new("test", size);
            let mut used = vec![false; size];
            let mut live: Vec<(usize, usize)> = Vec::new();
            for (allocate, len, pick) in steps {
                if allocate || live.is_empty() {
                    let longest_run = used
                        .split(|&u| u)
                        .map(|run| run.len())
                        .max()
                        .unwrap_or(0);
                    match arena.alloc(len) {
                        Ok(start) if len > 0 => {
                            prop_assert!(start + len <= size);
                            prop_assert!(used[start..start + len].iter().all(|&u| !u));
                            used[start..start + len].iter_mut().for_each(|u| *u = true);
                            live.push((start, len));
                        }
                        Ok(_) => {}
                        Err(error) => {
                            prop_assert!(longest_run < len, "{error}: a run of {longest_run} was free");
                            prop_assert!(error.to_string().contains("largest free range"));
                        }
                    }
                } else {
                    let (start, len) = live.swap_remove(pick.index(live.len()));
                    arena.release(start, len);
                    used[start..start + len].iter_mut().for_each(|u| *u = false);
                }
                let free: usize = arena.free.iter().map(|&(_, l)| l).sum();
                prop_assert_eq!(free, used.iter().filter(|&&u| !u).count());
                prop_assert!(arena.free.windows(2).all(|w| w[0].0 + w[0].1 < w[1].0));
            }
            for (start, len) in live.drain(..) {
                arena.release(start, len);
            }
            prop_assert_eq!(&arena.free, &vec![(0, size)]);
        }

        /// The planner's count is the largest that fits: that many fit and one more does not.
        #[test]
        fn planner_finds_the_largest_batch(
            prompt_len in 4096usize..200_000,
            gpu_gib in 1u64..80,
            host_gib in 1u64..200,
            on_host in any::<bool>(),
        ) {
            let shape = CacheShape::LLAMA_3_8B;
            let params = ShadowKvParams::default();
            let home = if on_host { ValueHome::Host } else { ValueHome::Device };
            let (gpu_bytes, host_bytes) = (gpu_gib << 30, host_gib << 30);
            let plan = ShadowKvCache::plan(&shape, &params, home, prompt_len, 256, gpu_bytes, host_bytes)
                .unwrap();
            let fits = |n: usize| {
                let report = ShadowKvCache::memory_for(
                    &shape,
                    &params,
                    home,
                    &CacheCapacity::uniform(n, prompt_len, 256),
                )
                .unwrap();
                report.gpu_bytes() <= gpu_bytes && report.host_bytes() <= host_bytes
            };
            if plan.sequences > 0 {
                prop_assert!(fits(plan.sequences));
            }
            prop_assert!(!fits(plan.sequences + 1));
            prop_assert_eq!(plan.full_cache_sequences as u64, gpu_bytes / plan.full_cache_bytes);
            // ShadowKV keeps less on the GPU per sequence than the whole cache.
            let per_sequence = plan.per_sequence.gpu_bytes();
            if on_host {
                prop_assert!(per_sequence < plan.full_cache_bytes);
            }
        }
    }

    #[test]
    fn planner_rejects_a_short_prompt() {
        let error = ShadowKvCache::plan(
            &CacheShape::LLAMA_3_8B,
            &ShadowKvParams::default(),
            ValueHome::Host,
            100,
            16,
            1 << 36,
            1 << 36,
        )
        .unwrap_err();
        assert!(error.to_string().contains("prompt"), "{error}");
    }
}
