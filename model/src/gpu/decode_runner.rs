//! [`DecodeRunner`]: greedy decode steps of every sequence of a cache (full attention or
//! ShadowKV, values on the host or the GPU) with no per-step host work on the GPU side: the
//! buffers of a batch shape are allocated once, everything that changes from one step to the
//! next (token ids, positions, sequence layouts) goes to the GPU in one upload of a small
//! input block ([`StepInputLayout`]) that the kernels read, and the step's launches (embedding
//! to argmax, every layer) are captured once per batch shape in a CUDA graph and replayed
//! ([`StepMode::Graph`]), or launched one by one ([`StepMode::Eager`]).
//!
//! A shape's first step runs eagerly (it loads kernels and sizes the ShadowKV scratch, which
//! a capture may not do); its second is captured and launched, later ones replay. Capturing
//! runs the host side of a step (the ShadowKV cache's bookkeeping) but nothing on the GPU, so
//! if the capture fails the bookkeeping is put back and the step runs eagerly, as do all
//! later steps of that shape.
use std::time::{Duration, Instant};

use shadowkv::cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use shadowkv::cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, CudaView, DevicePtr};
use shadowkv::kernels::layer::kernel_layout::TokenPlacement;
use shadowkv::kernels::layer::TokenPlan;
use shadowkv::{
    cache::DeviceStepLayouts, DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape,
    SequenceLayout,
};

use super::forward::{Activations, PassCache};
use super::kv_cache::GpuKvCache;
use super::model::GpuModel;
use super::shadow_cache::GpuShadowCache;
use super::step_inputs::{find_or_evict, StepInputLayout, StepKey, StepLimits};
use crate::error::{invalid_input, OnGpu, Result};

/// How a [`DecodeRunner`] runs a step's launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    /// Captured once per batch shape in a CUDA graph and replayed (the default).
    Graph,
    /// Launched one by one every step (the fallback, and the reference in tests).
    Eager,
}

/// The wall time and the GPU time of the latest step (see [`DecodeRunner::set_timing`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepTiming {
    /// From the call until the next tokens were back on the host.
    pub wall: Duration,
    /// Between events recorded on the stream before the input upload and after the argmax:
    /// for a replayed graph, about the sum of the step's kernels; eagerly, also the gaps
    /// where the GPU waited for the host's launches.
    pub device: Duration,
    /// Whether the step was a graph replay (or its capture's first launch).
    pub replayed: bool,
}

/// The buffers of one batch shape that a step's launches use.
struct StepBuffers {
    layout: StepInputLayout,
    /// The per-step input block on the GPU ([`StepInputLayout`]).
    block: CudaSlice<u64>,
    activations: Activations,
    /// Placements read from the block.
    plan: TokenPlan,
    logits: CudaSlice<f32>,
    next: CudaSlice<u32>,
}

/// The buffers and the captured graph of one batch shape.
struct ShapeState {
    buffers: StepBuffers,
    /// Full attention: planned at the sequences' capacities, layouts read from the block.
    attention: Option<DecodeAttention>,
    /// The same with the model's sliding window, for its local layers (if it has any).
    local_attention: Option<DecodeAttention>,
    /// ShadowKV with sliding-window layers: the placements of the step's tokens in their
    /// sequences' slots of the local layers and the windowed attention over those slots, both
    /// reading from the block (lent to the cache's `LocalLayers::step` while the step runs).
    local_step: Option<(TokenPlan, DecodeAttention)>,
    graph: Option<CudaGraph>,
    /// Eager steps run so far (a capture follows the first).
    eager_steps: usize,
    /// A capture of this shape failed: it runs eagerly from then on.
    capture_failed: bool,
}

/// How a step's launches ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ran {
    /// Launched one by one.
    Eager,
    /// Captured (the host side of the step ran then) and launched.
    Captured,
    /// Replayed from the shape's graph (the host side still to do).
    Replayed,
}

/// Runs greedy decode steps of every sequence of a cache, with per-step inputs in device
/// memory, captured per batch shape in CUDA graphs ([`StepMode::Graph`]) or launched eagerly.
pub struct DecodeRunner {
    mode: StepMode,
    limits: StepLimits,
    /// The shapes kept, most recently used last.
    shapes: Vec<(StepKey, ShapeState)>,
    captures: usize,
    replays: usize,
    timing: Option<(CudaEvent, CudaEvent)>,
    last_timing: Option<StepTiming>,
    /// Why captures failed (each shape whose capture failed runs eagerly).
    capture_errors: Vec<String>,
}

impl DecodeRunner {
    /// A runner in `mode` within `limits` (nothing is allocated until the first step).
    pub fn new(mode: StepMode, limits: StepLimits) -> DecodeRunner {
        DecodeRunner {
            mode,
            limits,
            shapes: Vec::new(),
            captures: 0,
            replays: 0,
            timing: None,
            last_timing: None,
            capture_errors: Vec::new(),
        }
    }

    /// Why captures failed so far (each such shape runs eagerly).
    pub fn capture_errors(&self) -> &[String] {
        &self.capture_errors
    }

    /// How steps run.
    pub fn mode(&self) -> StepMode {
        self.mode
    }

    /// Switches between graph replay and eager launches (the captured graphs are kept).
    pub fn set_mode(&mut self, mode: StepMode) {
        self.mode = mode;
    }

    /// The limits the runner was made with.
    pub fn limits(&self) -> StepLimits {
        self.limits
    }

    /// Graphs captured so far (one per batch shape, again after a shape was dropped).
    pub fn captures(&self) -> usize {
        self.captures
    }

    /// Steps replayed from a graph so far (a capture's first launch included).
    pub fn replays(&self) -> usize {
        self.replays
    }

    /// With `true`, each step records two timing events and waits for them, so
    /// [`last_timing`](Self::last_timing) can say how long the GPU took.
    pub fn set_timing(&mut self, model: &GpuModel, on: bool) -> Result<()> {
        const WHAT: &str = "creating the step's timing events";
        self.timing = match on {
            true => Some((
                model.gpu.new_event(true).on_gpu(WHAT)?,
                model.gpu.new_event(true).on_gpu(WHAT)?,
            )),
            false => None,
        };
        Ok(())
    }

    /// The latest step's timing, if timing is on (see [`set_timing`](Self::set_timing)).
    pub fn last_timing(&self) -> Option<StepTiming> {
        self.last_timing
    }

    /// Drops every captured graph and buffer (a cache they point into is about to go).
    pub fn clear(&mut self) {
        self.shapes.clear();
    }

    /// The state of `key`, made by `create` if it is new (dropping the least recently used
    /// shape if the runner keeps `max_shapes` already).
    fn state(
        &mut self,
        key: StepKey,
        create: impl FnOnce() -> Result<ShapeState>,
    ) -> Result<&mut ShapeState> {
        let (found, _evicted) = find_or_evict(&mut self.shapes, &key, self.limits.max_shapes);
        if found.is_none() {
            let state = create()?;
            self.shapes.push((key, state));
        }
        let last = self.shapes.len() - 1;
        Ok(&mut self.shapes[last].1)
    }
}

/// The token ids in a shape's block, as the embedding reads them.
fn ids_view<'a>(block: &'a CudaSlice<u64>, layout: &StepInputLayout) -> Result<CudaView<'a, u32>> {
    let words = block.slice(layout.ids.clone());
    // SAFETY: the words hold `batch` u32 ids (written by `StepInputLayout::fill`); u32 needs
    // less alignment than u64.
    unsafe { words.transmute::<u32>(layout.batch) }.ok_or_else(|| {
        invalid_input(
            "block",
            "is too short for the token ids",
            "a block laid out by StepInputLayout",
        )
    })
}

/// Device address of `words` of `block`.
fn address_of(block: &CudaSlice<u64>, model: &GpuModel, words: &std::ops::Range<usize>) -> u64 {
    let (base, _guard) = block.device_ptr(model.stream());
    base + StepInputLayout::byte_offset(words)
}

impl DecodeRunner {
    /// Records a finished step.
    fn note(&mut self, timing: Option<StepTiming>, ran: Ran) {
        self.last_timing = timing;
        match ran {
            Ran::Eager => {}
            Ran::Captured => {
                self.captures += 1;
                self.replays += 1;
            }
            Ran::Replayed => self.replays += 1,
        }
    }
}

impl GpuModel {
    /// Buffers for a step of `layout.batch` tokens placed by `placements` in `layouts` (the
    /// placements then come from the block); with `capacities`, full attention planned for
    /// every sequence at its capacity.
    fn shape_state(
        &self,
        layout: StepInputLayout,
        placements: &[TokenPlacement],
        layouts: &[SequenceLayout],
        capacities: Option<&[SequenceLayout]>,
    ) -> Result<ShapeState> {
        const WHAT: &str = "allocating a decode step's buffers";
        let (gpu, stream, batch) = (&*self.gpu, self.stream(), layout.batch);
        let block = stream.alloc_zeros::<u64>(layout.words).on_gpu(WHAT)?;
        let mut plan =
            TokenPlan::new(stream, self.qkv_shape(), placements, layouts).on_gpu(WHAT)?;
        // SAFETY: every step writes the block's placements (checked on the host against
        // these layouts, which do not change for the shape) before its launches run, and the
        // plan lives beside the block.
        unsafe { plan.read_placements_from(Some(address_of(&block, self, &layout.placements))) };
        let window = self
            .config
            .block
            .sliding_window
            .map_or(0, |window| window.window as u32);
        let plan_attention = |window: u32| -> Result<Option<DecodeAttention>> {
            Ok(match capacities {
                None => None,
                Some(capacities) => {
                    let shape = DecodeAttentionShape {
                        batch,
                        q_heads: self.config.heads,
                        kv_heads: self.config.kv_heads,
                        head_dim: self.config.head_dim,
                    };
                    let plan = DecodeAttentionPlan::for_gpu(gpu, shape, capacities)
                        .on_gpu(WHAT)?
                        .with_window(window);
                    let mut attention = DecodeAttention::new(gpu, plan).on_gpu(WHAT)?;
                    let at = address_of(&block, self, &layout.attention_layouts);
                    // SAFETY: every step writes the block's layouts (the same offsets and
                    // capacities, lengths within them) before its launches run; the attention
                    // lives beside the block.
                    unsafe { attention.read_layouts_from(Some(at)) };
                    Some(attention)
                }
            })
        };
        let attention = plan_attention(0)?;
        let local_attention = match window {
            0 => None,
            window => plan_attention(window)?,
        };
        Ok(ShapeState {
            buffers: StepBuffers {
                activations: Activations::new(self, batch)?,
                logits: stream
                    .alloc_zeros::<f32>(batch * self.logit_rows())
                    .on_gpu(WHAT)?,
                next: stream.alloc_zeros::<u32>(batch).on_gpu(WHAT)?,
                layout,
                block,
                plan,
            },
            attention,
            local_attention,
            local_step: None,
            graph: None,
            eager_steps: 0,
            capture_failed: false,
        })
    }

    /// The launches of one step from the shape's block: every layer, the logits, the argmax.
    fn enqueue_step(
        &self,
        buffers: &mut StepBuffers,
        tokens: &[u32],
        mode: &mut PassCache<'_>,
    ) -> Result<()> {
        const WHAT: &str = "a decode step's logits";
        let StepBuffers {
            layout,
            block,
            activations,
            plan,
            logits,
            next,
        } = buffers;
        let ids = ids_view(block, layout)?;
        self.layer_stack(tokens, &ids, plan, mode, activations)?;
        let hidden = self.config.hidden;
        self.linear
            .forward(&activations.normed, self.weights.head(), hidden, logits)
            .on_gpu(WHAT)?;
        let vocab = self.logit_rows();
        shadowkv::kernels::sampling::argmax(&self.gpu, self.stream(), &*logits, vocab, next)
            .on_gpu(WHAT)
    }

    /// Runs a step's launches (`enqueue`, on `context`) as `mode` says: replays the shape's
    /// graph, or captures it (after the shape's first eager step, if `capturable`) and
    /// launches it, or launches eagerly. A failed capture calls `rewind` (the host side of
    /// the step ran while capturing) and runs the step eagerly; the shape stays eager.
    #[allow(clippy::too_many_arguments)]
    fn run_shape<C>(
        &self,
        runner_errors: &mut Vec<String>,
        state: &mut ShapeState,
        mode: StepMode,
        capturable: bool,
        context: &mut C,
        enqueue: impl Fn(&mut ShapeState, &mut C) -> Result<()>,
        rewind: impl Fn(&mut C) -> Result<()>,
    ) -> Result<Ran> {
        const WHAT: &str = "replaying a decode step's graph";
        if mode == StepMode::Graph {
            if let Some(graph) = &state.graph {
                graph.launch().on_gpu(WHAT)?;
                return Ok(Ran::Replayed);
            }
            if state.eager_steps > 0 && !state.capture_failed && capturable {
                match self.capture(state, context, &enqueue) {
                    Ok(graph) => {
                        graph.launch().on_gpu(WHAT)?;
                        state.graph = Some(graph);
                        return Ok(Ran::Captured);
                    }
                    Err(error) => {
                        state.capture_failed = true;
                        runner_errors.push(error.to_string());
                        rewind(context)?;
                    }
                }
            }
        }
        enqueue(state, context)?;
        state.eager_steps += 1;
        Ok(Ran::Eager)
    }

    /// The step's launches captured on the compute stream (the copy stream forks from it and
    /// joins it through events inside the capture) and instantiated.
    fn capture<C>(
        &self,
        state: &mut ShapeState,
        context: &mut C,
        enqueue: &impl Fn(&mut ShapeState, &mut C) -> Result<()>,
    ) -> Result<CudaGraph> {
        const WHAT: &str = "capturing a decode step";
        let stream = self.stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .on_gpu(WHAT)?;
        let queued = enqueue(state, context);
        // The capture ends whatever happened, so the stream leaves capture mode. The value
        // fetch was captured from the high-priority copy stream: its nodes keep that priority
        // in the replay only with USE_NODE_PRIORITY.
        let ended = stream
            .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_USE_NODE_PRIORITY)
            .on_gpu(WHAT);
        queued?;
        ended?.ok_or_else(|| invalid_input("graph", "captured nothing", "a step's launches"))
    }

    /// Checks a step's tokens: one per sequence of the batch, each in the vocabulary.
    fn check_step_tokens(&self, limits: StepLimits, tokens: &[u32], batch: usize) -> Result<()> {
        if batch == 0 {
            return Err(invalid_input(
                "cache",
                "has no sequence",
                "at least one sequence to decode",
            ));
        }
        limits.check(batch)?;
        if tokens.len() != batch {
            return Err(invalid_input(
                "tokens",
                format!("holds {} tokens for {batch} sequences", tokens.len()),
                "one token per sequence of the cache",
            ));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.config.vocab) {
            return Err(invalid_input(
                "tokens",
                format!("holds id {bad}"),
                format!("ids below the vocabulary size {}", self.config.vocab),
            ));
        }
        Ok(())
    }

    /// Uploads a step's block (after the timing's start event, if timing is on).
    fn upload_block(
        &self,
        buffers: &mut StepBuffers,
        block: &[u64],
        timing: Option<&(CudaEvent, CudaEvent)>,
    ) -> Result<()> {
        const WHAT: &str = "uploading a decode step's inputs";
        let stream = self.stream();
        if let Some((start, _)) = timing {
            start.record(stream).on_gpu(WHAT)?;
        }
        stream.memcpy_htod(block, &mut buffers.block).on_gpu(WHAT)
    }

    /// Reads the step's next tokens back (waiting for the step) and its timing.
    fn finish_step(
        &self,
        buffers: &StepBuffers,
        timing: Option<&(CudaEvent, CudaEvent)>,
        started: Instant,
        ran: Ran,
    ) -> Result<(Vec<u32>, Option<StepTiming>)> {
        const WHAT: &str = "reading the next tokens back";
        let stream = self.stream();
        if let Some((_, end)) = timing {
            end.record(stream).on_gpu(WHAT)?;
        }
        let next = stream.clone_dtoh(&buffers.next).on_gpu(WHAT)?;
        let wall = started.elapsed();
        let step_timing = match timing {
            None => None,
            Some((start, end)) => {
                let ms = start.elapsed_ms(end).on_gpu(WHAT)?;
                Some(StepTiming {
                    wall,
                    device: Duration::from_secs_f64(f64::from(ms.max(0.0)) / 1e3),
                    replayed: ran != Ran::Eager,
                })
            }
        };
        Ok((next, step_timing))
    }

    /// One greedy full-attention decode step of every sequence of `cache` (`tokens[b]` the
    /// next token of sequence `b`): the same tokens as [`forward_greedy`](Self::forward_greedy)
    /// over every sequence, through `runner` (per-step inputs in device memory, graphs).
    /// A batch past the runner's limits is [`Error::PastCapturedShapes`](crate::Error), with
    /// nothing changed.
    pub fn decode_full_step(
        &self,
        runner: &mut DecodeRunner,
        cache: &mut GpuKvCache,
        tokens: &[u32],
    ) -> Result<Vec<u32>> {
        let started = Instant::now();
        let batch = cache.layouts.len();
        self.check_step_tokens(runner.limits, tokens, batch)?;
        let mut placements = Vec::with_capacity(batch);
        let mut attention_layouts = Vec::with_capacity(batch);
        for (b, (layout, &len)) in cache.layouts.iter().zip(&cache.lens).enumerate() {
            if len >= layout.capacity {
                return Err(invalid_input(
                    "tokens",
                    format!("go past the end of sequence {b} ({len} tokens)"),
                    format!("at most its capacity {}", layout.capacity),
                ));
            }
            placements.push(TokenPlacement::new(b as u32, len));
            attention_layouts.push(SequenceLayout {
                len: len + 1,
                ..*layout
            });
        }
        let capacities: Vec<SequenceLayout> = cache
            .layouts
            .iter()
            .map(|l| SequenceLayout {
                len: l.capacity,
                ..*l
            })
            .collect();
        let key = StepKey::Full {
            cache: cache.id,
            batch,
        };
        let layouts = cache.layouts.clone();
        let (mode, timing) = (runner.mode, runner.timing.take());
        let mut errors = std::mem::take(&mut runner.capture_errors);
        let result = runner
            .state(key, || {
                self.shape_state(
                    StepInputLayout::new(batch, false),
                    &placements,
                    &layouts,
                    Some(&capacities),
                )
            })
            .and_then(|state| {
                let block =
                    state
                        .buffers
                        .layout
                        .fill(tokens, &placements, &attention_layouts, None)?;
                self.upload_block(&mut state.buffers, &block, timing.as_ref())?;
                let ran = self.run_shape(
                    &mut errors,
                    state,
                    mode,
                    true,
                    cache,
                    |state, cache| {
                        let ShapeState {
                            buffers,
                            attention,
                            local_attention,
                            ..
                        } = state;
                        let attention = attention.as_mut().ok_or_else(|| {
                            invalid_input("state", "has no attention", "a full-attention shape")
                        })?;
                        let mut pass = PassCache::FullDecode {
                            cache: &mut *cache,
                            attention,
                            local_attention: local_attention.as_mut(),
                        };
                        self.enqueue_step(buffers, tokens, &mut pass)
                    },
                    |_| Ok(()),
                )?;
                for len in &mut cache.lens {
                    *len += 1;
                }
                let (next, step_timing) =
                    self.finish_step(&state.buffers, timing.as_ref(), started, ran)?;
                Ok((next, step_timing, ran))
            });
        runner.timing = timing;
        runner.capture_errors = errors;
        let (next, step_timing, ran) = result?;
        runner.note(step_timing, ran);
        Ok(next)
    }

    /// One greedy ShadowKV decode step of every live sequence of `shadow` (`tokens[b]` the next
    /// token of sequence `b`, in [`GpuShadowCache::sequences`] order): the same tokens as
    /// [`decode_shadow_greedy`](Self::decode_shadow_greedy), through `runner`. A batch past
    /// the runner's limits is [`Error::PastCapturedShapes`](crate::Error), with nothing
    /// changed.
    pub fn decode_shadow_step(
        &self,
        runner: &mut DecodeRunner,
        shadow: &mut GpuShadowCache,
        tokens: &[u32],
    ) -> Result<Vec<u32>> {
        const WHAT: &str = "a ShadowKV decode step";
        let started = Instant::now();
        let batch = shadow.lens.len();
        self.check_step_tokens(runner.limits, tokens, batch)?;
        let step_layouts = shadow.cache.step_layouts().on_gpu(WHAT)?;
        let kv_dim = self.config.kv_dim();
        // Each new key and value goes to its sequence's one-row staging block.
        let staged: Vec<SequenceLayout> = (0..batch)
            .map(|b| SequenceLayout {
                offset: (b * kv_dim) as u64,
                capacity: 1,
                len: 1,
            })
            .collect();
        let placements: Vec<TokenPlacement> = shadow
            .lens
            .iter()
            .enumerate()
            .map(|(b, &(_, len))| TokenPlacement::new(b as u32, len).with_cache_row(0))
            .collect();
        let attention_layouts: Vec<SequenceLayout> =
            step_layouts.after.iter().map(|s| s.kv).collect();
        let local = self.local_step_inputs(shadow)?;
        let key = StepKey::Shadow {
            cache: shadow.id,
            sequences: shadow.sequences(),
            scripted_hit_rate: shadow.scripted_hit_rate.map(f64::to_bits),
        };
        let (mode, timing) = (runner.mode, runner.timing.take());
        let mut errors = std::mem::take(&mut runner.capture_errors);
        let stream = self.stream();
        let result = runner
            .state(key, || {
                let mut state = self.shape_state(
                    StepInputLayout::with_local_layers(batch, true, local.is_some()),
                    &placements,
                    &staged,
                    None,
                )?;
                if let Some(local) = &local {
                    let buffers = &state.buffers;
                    state.local_step =
                        Some(self.local_shape_step(&buffers.block, &buffers.layout, local)?);
                }
                Ok(state)
            })
            .and_then(|state| {
                let layout = &state.buffers.layout;
                let shadow_layouts = Some((&step_layouts.before[..], &step_layouts.after[..]));
                let mut block =
                    layout.fill(tokens, &placements, &attention_layouts, shadow_layouts)?;
                if let Some(local) = &local {
                    layout.fill_local(&mut block, &local.placements, &local.layouts)?;
                }
                let block_of = &state.buffers.block;
                let addresses = DeviceStepLayouts {
                    before: address_of(block_of, self, &layout.shadow_before),
                    after: address_of(block_of, self, &layout.shadow_after),
                    attention: address_of(block_of, self, &layout.attention_layouts),
                };
                self.upload_block(&mut state.buffers, &block, timing.as_ref())?;
                // SAFETY: the block was just written with this step's layouts (queued before
                // every launch of the step) and lives as long as the shape's graph; a prefill
                // turns the device layouts off.
                unsafe { shadow.cache.read_step_layouts_from(Some(addresses)) };
                let capturable = shadow.cache.decode_step().capturable();
                shadow
                    .cache
                    .decode_step()
                    .order_after_copies(stream)
                    .on_gpu(WHAT)?;
                let snapshot = shadow.cache.step_snapshot();
                let ran = self.run_shape(
                    &mut errors,
                    state,
                    mode,
                    capturable,
                    shadow,
                    |state, shadow| {
                        // The local layers read their step from the cache while it runs.
                        if let Some(local) = &mut shadow.local {
                            local.step = state.local_step.take();
                        }
                        let mut pass = PassCache::Shadow(&mut *shadow);
                        let queued = self.enqueue_step(&mut state.buffers, tokens, &mut pass);
                        if let Some(local) = &mut shadow.local {
                            if let Some(step) = local.step.take() {
                                state.local_step = Some(step);
                            }
                        }
                        queued
                    },
                    |shadow| shadow.cache.restore_step_snapshot(&snapshot).on_gpu(WHAT),
                );
                let ran = match ran {
                    Ok(ran) => ran,
                    Err(error) => {
                        // A step that failed part-way (or a failed capture's eager rerun)
                        // may have advanced the bookkeeping of some layers.
                        let _ = shadow.cache.restore_step_snapshot(&snapshot);
                        return Err(error);
                    }
                };
                let heads = batch * self.config.kv_heads;
                match ran {
                    Ran::Eager => Ok(()),
                    // The capture ran the step's bookkeeping; only the statistics are left.
                    Ran::Captured => shadow
                        .cache
                        .decode_step()
                        .note_replayed_step(stream, heads)
                        .on_gpu(WHAT),
                    Ran::Replayed => shadow.cache.note_replayed_step(stream).on_gpu(WHAT),
                }?;
                for entry in &mut shadow.lens {
                    entry.1 += 1;
                }
                let (next, step_timing) =
                    self.finish_step(&state.buffers, timing.as_ref(), started, ran)?;
                Ok((next, step_timing, ran))
            });
        runner.timing = timing;
        runner.capture_errors = errors;
        let (next, step_timing, ran) = result?;
        runner.note(step_timing, ran);
        Ok(next)
    }
}
