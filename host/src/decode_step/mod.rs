//! One ShadowKV decode step for one layer: scoring -> top-k and plan -> value fetch on the
//! copy stream, overlapped with the key rebuild (and, in a large step, the attention over the
//! resident tokens) on the compute stream -> attention.
//!
//! A large step (see [`LARGE_STEP_BUDGET_BYTES`]) runs the batch in parts (`P0`, `P1`, ...)
//! so that the PCIe traffic starts after the first part's selection and the later parts'
//! selection hides behind it, and splits the attention around the fetch:
//! ```text
//! compute: select(P0) [plan_done0] select(P1) [plan_done1] ... attention(resident), rebuild, wait(fetch_done), attention(fresh)
//! copy:                wait(plan_done0) fetch(P0)  wait(plan_done1) fetch(P1) ... [fetch_done]
//! ```
//! (`select` = scoring, then top-k with the plan in the same launch; with a scripted hit rate,
//! the top-k, the scripted selection and the plan, see
//! [`DecodeStep::set_scripted_hit_rate`].) A smaller step's fetch
//! is short, and a second part or attention launch costs more than it hides: it runs in one
//! part, only the rebuild runs beside the fetch, and one attention launch follows it (see
//! [`DecodeStep::set_split_attention`]). With the overlap off, everything runs in order on
//! the compute stream over the whole batch, with one attention launch.
//!
//! Nothing in the step waits on the host: grids do not depend on the miss counts (kernels read
//! them on the device) and the statistics reach mapped host memory from the plan, read
//! only by [`DecodeStep::stats`].
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
pub use shadowkv_kernels::rope::{
    inverse_frequencies, Llama3Scaling, LongRope, RopeConfig, RopeFactors, RopePairing,
    RotaryLayout,
};

use crate::error::{check_len, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::attention::{
    DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, SequenceLayout, StepPart,
};
use crate::kernels::fetch::{self, TierUse};
use crate::kernels::shadow::{BatchPart, ShadowBatch, ShadowConfig};
use crate::kernels::{rebuild, scripted_selection};
use crate::step_stats::MissSource;
pub use crate::step_stats::StepStats;

mod launches;
mod layer;

use launches::{empty_slots, mark, rebuild_misses, select, slot_marks, Timeline};
pub use layer::{ShadowLayer, StepWorkspace};

/// Runs decode steps for layers of one [`ShadowConfig`]: owns the copy stream, the events,
/// the scratch and the attention plan, reused across layers and steps.
pub struct DecodeStep {
    config: ShadowConfig,
    copy_stream: Arc<CudaStream>,
    /// One per part of the batch (see [`set_parts`](Self::set_parts)).
    plan_done: Vec<CudaEvent>,
    fetch_done: CudaEvent,
    /// Recorded on the compute stream after every selection (a step's or a prefill's).
    stats_ready: CudaEvent,
    /// The `(sequence, KV head)` rows whose miss counts the latest selection wrote.
    selected_heads: Option<std::ops::Range<usize>>,
    /// Where the latest selection's misses came from (a prefill's come from the prompt).
    latest_source: MissSource,
    /// Set by [`fail_next_step_after_fetch`](Self::fail_next_step_after_fetch).
    fail_after_fetch: bool,
    /// The model's RoPE frequencies with every adjustment folded in, and its rotation.
    inverse_frequencies: CudaSlice<f64>,
    rotary: RotaryLayout,
    workspace: StepWorkspace,
    attention: DecodeAttention,
    scale: f32,
    overlap: bool,
    split_attention: Option<bool>,
    parts: Option<usize>,
    timeline: Option<Timeline>,
    scripted_hit_rate: Option<f64>,
    /// Where the attention reads its layouts, if not from its own copy (see
    /// [`read_attention_layouts_from`](Self::read_attention_layouts_from)).
    attention_layouts: Option<u64>,
}

/// Value bytes of a batch's whole budget (every selected chunk a miss) from which a step is
/// large: by default it then runs in [`DEFAULT_PARTS`] parts and runs the attention over the
/// resident slots beside the fetch (see [`DecodeStep::set_split_attention`]); a smaller step
/// runs in one part, with only the rebuild beside the fetch and one attention launch after
/// it. Parts and the split pay when the fetch outlasts what they add: each part pays the
/// selection's latency again, the split a second attention launch (about 14 µs on the H100
/// however small). On the H100 at Llama-3-8B shapes (4 MiB per sequence), 122K tokens, 80%
/// hits, step µs (commit `fe5af9c`; see Step arrangements in `docs/EXPERIMENTS.md`):
///
/// | batch | one part, one attention | one part, split | two parts, split |
/// | ---: | ---: | ---: | ---: |
/// | 1 | **72.1** | 83.3 | (one part) |
/// | 2 | **105.6** | 105.1 | 122.0 |
/// | 4 | **171.4** | 167.2 | 172.5 |
/// | 8 | 287.1 (two parts) | 292.3 | **269.2** |
/// | 16 | 505.7 (two parts) | 552.5 | **471.0** |
pub const LARGE_STEP_BUDGET_BYTES: usize = 32 << 20;

/// Parts a large step (see [`LARGE_STEP_BUDGET_BYTES`]) splits the batch into by default:
/// the fetch of each part overlaps the selection of the next, so only the first part's
/// selection is exposed before the PCIe traffic starts. Each part pays the top-k's latency
/// (about 20 µs, whatever its size), so more parts stop paying: on the H100 at b16, 122K, 80%
/// hits the step takes 548.5, 490.7, 520.9 and 579.5 µs with 1, 2, 4 and 8 parts
/// (`docs/logs/decode-bench-h100.log`).
pub const DEFAULT_PARTS: usize = 2;

/// `parts` contiguous parts of the batch, as even as they come (fewer if the batch is small).
fn batch_parts(batch: &ShadowBatch, parts: usize) -> Result<Vec<BatchPart>> {
    let size = batch.batch().div_ceil(parts.clamp(1, batch.batch()));
    (0..batch.batch())
        .step_by(size)
        .map(|first| batch.part(first..(first + size).min(batch.batch())))
        .collect()
}

impl DecodeStep {
    /// A step for batches shaped like `layer_batch` (sizes grow on demand; a different batch
    /// size re-plans attention). `rope` must be the model's (keys are rebuilt before RoPE).
    pub fn new(gpu: &Gpu, rope: RopeConfig, layer_batch: &ShadowBatch) -> Result<Self> {
        let config = *layer_batch.config();
        let head_dim = config.head_dim as u32;
        if let Err(problem) = rope.check(head_dim) {
            return Err(invalid(
                "rope",
                problem,
                "a RoPE configuration that fits the head dimension",
            ));
        }
        let frequencies = inverse_frequencies(&rope, head_dim);
        let rotary = rope.layout(head_dim);
        rebuild::check_rebuild_rotary(&rotary, config.head_dim, frequencies.len())?;
        let stream = gpu.stream();
        let inverse_frequencies = stream.clone_htod(&frequencies)?;
        Ok(DecodeStep {
            config,
            copy_stream: gpu.new_priority_stream()?,
            plan_done: Vec::new(),
            fetch_done: gpu.new_event(false)?,
            stats_ready: gpu.new_event(false)?,
            selected_heads: None,
            latest_source: MissSource::Prompt,
            fail_after_fetch: false,
            inverse_frequencies,
            rotary,
            workspace: StepWorkspace::new(gpu, stream, layer_batch)?,
            attention: Self::attention_for(gpu, layer_batch)?,
            scale: 1.0 / (config.head_dim as f32).sqrt(),
            overlap: true,
            split_attention: None,
            parts: None,
            timeline: None,
            scripted_hit_rate: None,
            attention_layouts: None,
        })
    }

    /// Attention planned for every sequence at its capacity, so later (shorter) lengths fit
    /// its split workspace.
    fn attention_for(gpu: &Gpu, batch: &ShadowBatch) -> Result<DecodeAttention> {
        let config = batch.config();
        let shape = DecodeAttentionShape {
            batch: batch.batch(),
            q_heads: config.q_heads,
            kv_heads: config.kv_heads,
            head_dim: config.head_dim,
        };
        let full: Vec<SequenceLayout> = batch
            .sequences()
            .iter()
            .map(|s| SequenceLayout {
                len: s.kv.capacity,
                ..s.kv
            })
            .collect();
        let plan = DecodeAttentionPlan::for_gpu(gpu, shape, &full)?;
        DecodeAttention::new(gpu, plan)
    }

    /// With `false`, the value fetch runs on the compute stream before the rebuild and one
    /// attention launch covers every token (to measure what the overlap buys).
    pub fn set_overlap(&mut self, overlap: bool) {
        self.overlap = overlap;
    }

    /// With the overlap on: `Some(true)` runs the attention over the resident slots beside
    /// the value fetch and a second launch over the fresh slots after it; `Some(false)` runs
    /// only the rebuild beside the fetch, then one attention launch over every token; `None`
    /// (the default) splits a large step (see [`LARGE_STEP_BUDGET_BYTES`]).
    pub fn set_split_attention(&mut self, split: Option<bool>) {
        self.split_attention = split;
    }

    /// Whether a step of `batch` splits the attention (see
    /// [`set_split_attention`](Self::set_split_attention)).
    pub fn splits_attention(&self, batch: &ShadowBatch) -> bool {
        self.overlap && self.split_attention.unwrap_or(self.is_large(batch))
    }

    /// SYNTHETIC SELECTION, for throughput benchmarks on random data: with `Some(rate)`, each
    /// selection runs the top-k alone, then rewrites every (sequence, KV head)'s selection so
    /// that `rate` of its chunks (rounded) were resident from the previous step and the rest
    /// were not (`kernels::scripted_selection`), then runs the plan on it, all on the GPU.
    /// Random keys and queries keep only a few percent of the chunks between steps, where real
    /// models keep most; the attention then reads chunks the query did not select, so the
    /// outputs are no longer ShadowKV's. `None` (the default) selects as usual. A rate outside
    /// `[0, 1]` (or NaN) is an [`InvalidArgument`](crate::Error::InvalidArgument).
    pub fn set_scripted_hit_rate(&mut self, rate: Option<f64>) -> Result<()> {
        if let Some(rate) = rate {
            scripted_selection::check_hit_rate(rate)?;
        }
        self.scripted_hit_rate = rate;
        Ok(())
    }

    /// The scripted hit rate (see [`set_scripted_hit_rate`](Self::set_scripted_hit_rate)), if
    /// any.
    pub fn scripted_hit_rate(&self) -> Option<f64> {
        self.scripted_hit_rate
    }

    /// Parts the batch runs in when the overlap is on (at least 1, at most the batch size);
    /// `None` (the default): [`DEFAULT_PARTS`] for a large step (see
    /// [`LARGE_STEP_BUDGET_BYTES`]), else 1.
    pub fn set_parts(&mut self, parts: Option<usize>) {
        self.parts = parts.map(|parts| parts.max(1));
    }

    /// Parts a step of `batch` runs in (see [`set_parts`](Self::set_parts)).
    pub fn parts(&self, batch: &ShadowBatch) -> usize {
        match (self.overlap, self.parts) {
            (false, _) => 1,
            (true, Some(parts)) => parts,
            (true, None) if self.is_large(batch) => DEFAULT_PARTS,
            (true, None) => 1,
        }
    }

    /// Whether `batch`'s whole budget holds at least [`LARGE_STEP_BUDGET_BYTES`] of values.
    fn is_large(&self, batch: &ShadowBatch) -> bool {
        let chunk_bytes = self.config.chunk_size * self.config.head_dim * size_of::<bf16>();
        batch.slot_entries() * chunk_bytes >= LARGE_STEP_BUDGET_BYTES
    }

    /// With `true`, each step records a timing event after every stage (a diagnostic: the
    /// events cost a little time); [`timeline`](Self::timeline) reads them.
    pub fn set_timeline(&mut self, gpu: &Gpu, on: bool) -> Result<()> {
        self.timeline = match on {
            true => Some(Timeline {
                start: gpu.new_event(true)?,
                marks: Vec::new(),
                recorded: 0,
            }),
            false => None,
        };
        Ok(())
    }

    /// When each stage of the latest step ended, in milliseconds after the step began, in
    /// launch order (the fetch's entry is on the copy stream). Waits for the step to finish.
    pub fn timeline(&self) -> Result<Vec<(&'static str, f32)>> {
        let Some(timeline) = &self.timeline else {
            return Err(invalid(
                "timeline",
                "is off",
                "set_timeline(gpu, true) before the step",
            ));
        };
        timeline.marks[..timeline.recorded]
            .iter()
            .map(|(name, event)| {
                event.synchronize()?;
                Ok((*name, timeline.start.elapsed_ms(event)?))
            })
            .collect()
    }

    /// With `Some(address)`, the attention reads each sequence's K/V layout (after the
    /// append) from `address`, launched over the splits of the sequences' capacities (see
    /// `DecodeAttention::read_layouts_from`): for a step replayed from a CUDA graph.
    ///
    /// # Safety
    /// Until the next call, `address` must hold the K/V layouts (`ShadowSequence::kv`) of the
    /// batch of every later step, in batch order, whenever that step's attention runs.
    pub unsafe fn read_attention_layouts_from(&mut self, address: Option<u64>) {
        self.attention_layouts = address;
        // SAFETY: the caller's contract.
        unsafe { self.attention.read_layouts_from(address) };
    }

    /// Whether a step may be captured into a CUDA graph: the overlap on (the fetch then forks
    /// from and joins the compute stream through events recorded in the capture) and no
    /// timeline (its events are read by the host).
    pub fn capturable(&self) -> bool {
        self.overlap && self.timeline.is_none()
    }

    /// Orders `stream` after the work queued on the copy stream (a prefill's value offload):
    /// a step replayed from a graph forks the copy stream inside the graph, which does not
    /// wait for work queued outside it.
    pub fn order_after_copies(&self, stream: &CudaStream) -> Result<()> {
        self.fetch_done.record(&self.copy_stream)?;
        stream.wait(&self.fetch_done)?;
        Ok(())
    }

    /// After a replayed step of `heads` (sequence, KV head) pairs queued on `stream`: the
    /// statistics ([`stats`](Self::stats)) are those the replay's last selection writes.
    pub fn note_replayed_step(&mut self, stream: &CudaStream, heads: usize) -> Result<()> {
        self.stats_ready.record(stream)?;
        self.selected_heads = Some(0..heads);
        Ok(())
    }

    /// The config of the layers this step runs; a layer with another config is rejected.
    pub fn config(&self) -> &ShadowConfig {
        &self.config
    }

    /// The copy stream the value fetch runs on.
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy_stream
    }

    /// One decode step of `layer` for `q` (`[batch, q_heads, head_dim]`, post-RoPE; the new
    /// token's key and value already appended to the generated part of each K/V block, as
    /// the layouts' `len` says). Writes `out` (`[batch, q_heads, head_dim]`) on the GPU's
    /// compute stream; returns without waiting for the GPU.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        layer: &mut ShadowLayer,
        q: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        let result = self.enqueue(gpu, layer, q, out);
        if result.is_err() {
            // A failure after a fetch was queued skipped the compute stream's wait for it:
            // order the copy stream's work before anything the caller queues next (the next
            // step rewrites the miss list the fetch reads). The plan may have given slots to
            // chunks whose keys were not rebuilt: empty every slot, so the next step fetches
            // and rebuilds what it selects. Errors here come second to the one returned.
            let _ = self.fetch_done.record(&self.copy_stream);
            let stream = gpu.stream();
            let _ = stream.wait(&self.fetch_done);
            let _ = empty_slots(stream, &mut layer.resident);
        }
        result
    }

    /// Makes the next [`run`](Self::run) fail once its value fetch is queued, before the
    /// rebuild and the attention: for tests of the error path's stream ordering.
    #[doc(hidden)]
    pub fn fail_next_step_after_fetch(&mut self) {
        self.fail_after_fetch = true;
    }

    /// The body of [`run`](Self::run), which keeps the streams ordered when it fails.
    fn enqueue(
        &mut self,
        gpu: &Gpu,
        layer: &mut ShadowLayer,
        q: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let batch = &layer.batch;
        let elements = batch.batch() * self.config.q_heads * self.config.head_dim;
        check_len("q", q.len(), elements, "[batch, q_heads, head_dim]")?;
        check_len("out", out.len(), elements, "[batch, q_heads, head_dim]")?;
        let stream = gpu.stream().clone();
        self.reserve(gpu, batch)?;
        let layouts: Vec<SequenceLayout> = batch.sequences().iter().map(|s| s.kv).collect();
        if self.attention.plan().shape().batch != batch.batch() {
            self.attention = Self::attention_for(gpu, batch)?;
        }
        if let Err(error) = self.attention.update_layouts(&stream, &layouts) {
            // Longer than the workspace allows: plan again for the new capacities.
            self.attention = Self::attention_for(gpu, batch).map_err(|_| error)?;
            self.attention.update_layouts(&stream, &layouts)?;
        }
        // SAFETY: the caller of `read_attention_layouts_from` keeps the copy valid.
        unsafe { self.attention.read_layouts_from(self.attention_layouts) };
        // With the overlap, the batch runs in parts: part i's fetch (copy stream) overlaps the
        // scoring, top-k and plan of part i + 1 (compute stream).
        let parts = batch_parts(batch, self.parts(batch))?;
        while self.plan_done.len() < parts.len() {
            self.plan_done.push(gpu.new_event(false)?);
        }
        let split = self.splits_attention(batch);
        if !self.overlap {
            // The fetch runs on the compute stream: order it after the copy stream's value
            // offloads (a prefill's), which the copy stream would otherwise order for it.
            self.fetch_done.record(&self.copy_stream)?;
            stream.wait(&self.fetch_done)?;
        }
        let heads = batch.batch() * self.config.kv_heads;
        let w = &mut self.workspace;
        let timeline = &mut self.timeline;
        if let Some(t) = timeline.as_mut() {
            t.start.record(&stream)?;
            t.recorded = 0;
        }
        for (part, plan_done) in parts.iter().zip(&self.plan_done) {
            let script = self.scripted_hit_rate;
            select(
                gpu, &stream, layer, *part, q, w, self.scale, script, timeline,
            )?;
            let batch = &layer.batch;
            // The fetch runs on the copy stream beside the next part's selection, the
            // resident attention and the rebuild, or in order on the compute stream when the
            // overlap is off.
            let fetch_stream = if self.overlap {
                plan_done.record(&stream)?;
                self.copy_stream.wait(plan_done)?;
                &self.copy_stream
            } else {
                &stream
            };
            let tier = layer.tier.as_mut().map(|tier| TierUse {
                tier,
                outcomes: w.host_tier_outcomes.device_address(),
            });
            fetch::run_tiered(
                gpu,
                fetch_stream,
                batch,
                *part,
                &w.misses,
                &w.miss_counts,
                &layer.values,
                tier,
                &mut layer.v,
            )?;
            mark(timeline, gpu, "fetch", fetch_stream)?;
        }
        let batch = &layer.batch;
        self.stats_ready.record(&stream)?;
        self.selected_heads = Some(0..heads);
        self.latest_source = MissSource::of(layer);
        if std::mem::take(&mut self.fail_after_fetch) {
            return Err(invalid(
                "step",
                "failed on request after its fetch was queued",
                "no injected failure (fail_next_step_after_fetch tests the error path)",
            ));
        }
        if self.overlap {
            self.fetch_done.record(&self.copy_stream)?;
        }
        if split {
            let mut used = LaunchBuffers::new(&stream);
            let slots = slot_marks(&mut used, batch, w, &self.config);
            self.attention.launch(
                gpu,
                &stream,
                q,
                &layer.k,
                &layer.v,
                out,
                Some((StepPart::Resident, slots)),
            )?;
            drop(used);
            mark(timeline, gpu, "attention (resident)", &stream)?;
        }
        let whole = layer.batch.whole();
        rebuild_misses(
            gpu,
            layer,
            whole,
            w,
            (&self.inverse_frequencies, self.rotary),
        )?;
        mark(timeline, gpu, "rebuild", &stream)?;
        if self.overlap {
            stream.wait(&self.fetch_done)?;
        }
        if split {
            let mut used = LaunchBuffers::new(&stream);
            let slots = slot_marks(&mut used, &layer.batch, w, &self.config);
            self.attention.launch(
                gpu,
                &stream,
                q,
                &layer.k,
                &layer.v,
                out,
                Some((StepPart::Fresh, slots)),
            )?;
            drop(used);
            mark(timeline, gpu, "attention (fresh)", &stream)
        } else {
            self.attention
                .run(gpu, &stream, q, &layer.k, &layer.v, out)?;
            mark(timeline, gpu, "attention", &stream)
        }
    }

    /// The first selection of a prefill (`ShadowKvCache::prefill_layer`): scoring, top-k and
    /// plan of `part` with `q` (`[batch, q_heads, head_dim]`; only `part`'s rows are read), on
    /// the compute stream. The misses are left in [`scratch`](Self::scratch) for the caller to
    /// fill (it has the values on the GPU) and rebuild.
    pub fn select_part(
        &mut self,
        gpu: &Gpu,
        layer: &mut ShadowLayer,
        part: BatchPart,
        q: &impl DevicePtr<bf16>,
    ) -> Result<()> {
        self.check_layer(layer)?;
        let elements = layer.batch.batch() * self.config.q_heads * self.config.head_dim;
        check_len("q", q.len(), elements, "[batch, q_heads, head_dim]")?;
        let stream = gpu.stream().clone();
        self.reserve(gpu, &layer.batch)?;
        select(
            gpu,
            &stream,
            layer,
            part,
            q,
            &mut self.workspace,
            self.scale,
            self.scripted_hit_rate,
            &mut None,
        )?;
        self.stats_ready.record(&stream)?;
        let kv_heads = self.config.kv_heads;
        self.selected_heads =
            Some(part.first() * kv_heads..(part.first() + part.count()) * kv_heads);
        self.latest_source = MissSource::Prompt;
        Ok(())
    }

    /// Grows the scratch to fit `batch` (the step does this itself; the prefill checks the
    /// scratch before its first selection).
    pub fn reserve(&mut self, gpu: &Gpu, batch: &ShadowBatch) -> Result<()> {
        if !self.workspace.fits(batch) {
            // The kernels address the scratch by raw address, which cudarc's drop does not
            // wait for: let the latest step's kernels and fetches finish before it is freed
            // (the pinned counts are freed at once, not in stream order).
            gpu.stream().synchronize()?;
            self.copy_stream.synchronize()?;
            self.workspace = StepWorkspace::new(gpu, gpu.stream(), batch)?;
            self.selected_heads = None;
        }
        Ok(())
    }

    /// The keys of `part`'s misses of the latest selection, rebuilt into their slots.
    pub fn rebuild_part(&self, gpu: &Gpu, layer: &mut ShadowLayer, part: BatchPart) -> Result<()> {
        self.check_layer(layer)?;
        rebuild_misses(
            gpu,
            layer,
            part,
            &self.workspace,
            (&self.inverse_frequencies, self.rotary),
        )
    }

    fn check_layer(&self, layer: &ShadowLayer) -> Result<()> {
        if *layer.batch.config() != self.config {
            return Err(invalid(
                "layer",
                format!("has config {:?}", layer.batch.config()),
                format!("the step's {:?}", self.config),
            ));
        }
        Ok(())
    }

    /// The statistics of the latest selection (a step's whole batch, or the part a prefill
    /// selected for): waits until its plan has run. An error if no selection has run since
    /// the scratch was sized.
    pub fn stats(&self) -> Result<StepStats> {
        let heads = self.selected_heads.clone().ok_or_else(|| {
            invalid(
                "stats",
                "were asked for before any selection",
                "a decode step (or a prefill) first",
            )
        })?;
        self.stats_ready.synchronize()?;
        let counts = self.workspace.host_miss_counts.as_slice()?;
        let counts = counts.get(heads.clone()).ok_or_else(|| {
            invalid(
                "stats",
                format!("cover rows {heads:?} of {} miss counts", counts.len()),
                "rows of the scratch",
            )
        })?;
        let k = self.config.budget_chunks;
        let outcomes = if self.latest_source == MissSource::Tiered {
            // The fetch writes the outcomes on the copy stream.
            self.fetch_done.synchronize()?;
            let all = self.workspace.host_tier_outcomes.as_slice()?;
            Some(&all[heads.start * k..heads.end * k])
        } else {
            None
        };
        Ok(StepStats::from_counts(
            counts,
            k,
            self.latest_source,
            outcomes,
        ))
    }

    /// The scratch of the latest step, for tests and diagnostics: scores, selection, miss
    /// list and counts (device buffers; read them after the step's stream has finished).
    pub fn scratch(&self) -> &StepWorkspace {
        &self.workspace
    }
}

impl Drop for DecodeStep {
    /// Waits for the copy stream: its fetches read the scratch and the layers' values by raw
    /// address, which the frees that follow do not wait for.
    fn drop(&mut self) {
        let _ = self.copy_stream.synchronize();
    }
}
