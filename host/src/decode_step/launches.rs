//! The launches a decode step strings together (the selection of a part, the slot marks of
//! the attention, the rebuild of the misses, emptying the slots) and its stage timeline.
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;
use shadowkv_kernels::rope::RotaryLayout;

use super::layer::{ShadowLayer, StepWorkspace};
use crate::error::Result;
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::attention::SlotMarks;
use crate::kernels::plan::PlanBuffers;
use crate::kernels::shadow::{BatchPart, ShadowBatch, ShadowConfig};
use crate::kernels::{plan, rebuild, scoring, scripted_selection, topk};

/// Per-stage timing of [`DecodeStep::run`]: a timing event after each stage, on the stream
/// that ran it (see [`DecodeStep::set_timeline`]).
pub(super) struct Timeline {
    pub(super) start: CudaEvent,
    pub(super) marks: Vec<(&'static str, CudaEvent)>,
    pub(super) recorded: usize,
}

/// Records stage `name` on `stream` when the timeline is on.
pub(super) fn mark(
    timeline: &mut Option<Timeline>,
    gpu: &Gpu,
    name: &'static str,
    stream: &CudaStream,
) -> Result<()> {
    let Some(timeline) = timeline else {
        return Ok(());
    };
    if timeline.recorded == timeline.marks.len() {
        timeline.marks.push((name, gpu.new_event(true)?));
    }
    let entry = &mut timeline.marks[timeline.recorded];
    entry.0 = name;
    entry.1.record(stream)?;
    timeline.recorded += 1;
    Ok(())
}

/// Scoring, top-k and plan of `part` on `stream`, into `w`; with a scripted hit rate, the
/// top-k alone, the scripted selection, then the plan (see
/// [`DecodeStep::set_scripted_hit_rate`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn select(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    layer: &mut ShadowLayer,
    part: BatchPart,
    q: &impl DevicePtr<bf16>,
    w: &mut StepWorkspace,
    scale: f32,
    scripted_hit_rate: Option<f64>,
    timeline: &mut Option<Timeline>,
) -> Result<()> {
    let batch = &layer.batch;
    scoring::run(
        gpu,
        stream,
        batch,
        part,
        q,
        &layer.landmarks,
        &mut w.logits,
        &mut w.tile_stats,
        scale,
    )?;
    mark(timeline, gpu, "scoring", stream)?;
    let plan_buffers = PlanBuffers {
        resident: &mut layer.resident,
        misses: &mut w.misses,
        miss_counts: &mut w.miss_counts,
        fresh: &mut w.fresh,
        host_miss_counts: w.host_miss_counts.device_address(),
    };
    let Some(hit_rate) = scripted_hit_rate else {
        topk::run_and_plan(
            gpu,
            stream,
            batch,
            part,
            &w.logits,
            &w.tile_stats,
            &layer.chunk_ids,
            &mut w.scores,
            &mut w.selection,
            plan_buffers,
            None,
        )?;
        return mark(timeline, gpu, "topk + plan", stream);
    };
    topk::run(
        gpu,
        stream,
        batch,
        part,
        &w.logits,
        &w.tile_stats,
        &layer.chunk_ids,
        &mut w.scores,
        &mut w.selection,
        None,
    )?;
    mark(timeline, gpu, "topk", stream)?;
    scripted_selection::run(
        gpu,
        stream,
        batch,
        part,
        &layer.chunk_ids,
        &*plan_buffers.resident,
        &mut w.selection,
        hit_rate,
    )?;
    mark(timeline, gpu, "scripted selection", stream)?;
    plan::run(gpu, stream, batch, part, &w.selection, plan_buffers)?;
    mark(timeline, gpu, "plan", stream)
}

/// Where `batch`'s slots are for the two attention launches of a step: the latest plan's
/// marks and miss list in `w`, held in `used` until the launch is queued.
pub(super) fn slot_marks<'a>(
    used: &mut LaunchBuffers<'a>,
    batch: &'a ShadowBatch,
    w: &'a StepWorkspace,
    config: &ShadowConfig,
) -> SlotMarks {
    SlotMarks {
        sequences: batch.sequences_address(used),
        fresh: used.read(&w.fresh),
        misses: used.read(&w.misses),
        miss_counts: used.read(&w.miss_counts),
        chunk_size: config.chunk_size as u32,
        budget_chunks: config.budget_chunks as u32,
    }
}

/// The keys of `part`'s misses in `w` (the latest plan), rebuilt into their slots on the
/// compute stream.
pub(super) fn rebuild_misses(
    gpu: &Gpu,
    layer: &mut ShadowLayer,
    part: BatchPart,
    w: &StepWorkspace,
    rope: (&CudaSlice<f64>, RotaryLayout),
) -> Result<()> {
    rebuild::run(
        gpu,
        gpu.stream(),
        &layer.batch,
        part,
        &w.misses,
        &w.miss_counts,
        &layer.a,
        &layer.bm,
        rope,
        &mut layer.k,
    )
}

const _: () = assert!(crate::kernels::shadow::EMPTY_SLOT == u32::MAX);

/// Marks every slot of `resident` empty ([`EMPTY_SLOT`](crate::kernels::shadow::EMPTY_SLOT),
/// all bits set) on `stream`.
pub(super) fn empty_slots(stream: &CudaStream, resident: &mut CudaSlice<u32>) -> Result<()> {
    let bytes = resident.len() * std::mem::size_of::<u32>();
    stream.context().bind_to_thread()?;
    let (address, _guard) = resident.device_ptr_mut(stream);
    // SAFETY: `bytes` covers exactly the live allocation behind `address`, written in order on
    // `stream`; the guard is held until the memset is queued.
    unsafe { cudarc::driver::sys::cuMemsetD8Async(address, 0xff, bytes, stream.cu_stream()) }
        .result()?;
    Ok(())
}
