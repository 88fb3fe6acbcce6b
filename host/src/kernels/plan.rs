//! Cache-aware plan (see `shadowkv_kernels::plan`): hits keep their slots, misses take the
//! freed ones; writes the miss list and counts and updates the resident ids.
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig};
pub use shadowkv_kernels::plan as kernel_layout;
use shadowkv_kernels::plan::{self as layout, PlanParams};

use crate::error::{check_reach, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::shadow::{BatchPart, Miss, ShadowBatch};
use crate::ptx;

/// Most chunk ids a sequence may have: both bitmaps and the freed list fit the shared memory
/// one block may use.
pub fn check_fits(gpu: &Gpu, batch: &ShadowBatch) -> Result<u32> {
    let words = layout::bitmap_words(batch.extents().max_chunks);
    // The plan runs in blocks of its own or of the top-k, whichever needs more flags.
    let threads = layout::THREADS.max(shadowkv_kernels::topk::THREADS);
    let bytes = layout::shared_bytes(words, batch.config().budget_chunks as u32, threads);
    if bytes > gpu.info().max_shared_per_block {
        return Err(invalid(
            "sequences",
            format!(
                "a sequence has {} chunks and the budget is {} chunks: the plan needs {bytes} bytes of shared memory",
                batch.extents().max_chunks,
                batch.config().budget_chunks
            ),
            format!("at most {} bytes (fewer chunks)", gpu.info().max_shared_per_block),
        ));
    }
    Ok(words)
}

/// What a plan reads and writes besides the selection, for a batch's `[batch, Hkv,
/// budget_chunks]` slots: `resident`, the chunk id in each slot (`[rows, Hkv, budget_chunks]`,
/// each sequence at its `resident_row`; updated in place); `misses`
/// and `miss_counts` (`[batch, Hkv]`), the miss list; `fresh`, 1 for each slot filled by a
/// miss and 0 elsewhere; `host_miss_counts`, if not 0, the device address of `[batch, Hkv]`
/// u32 in mapped host memory that also receives the counts (the step's statistics, read
/// without a device-to-host copy).
pub struct PlanBuffers<'a> {
    /// `[rows, Hkv, budget_chunks]` chunk id held by each slot, each sequence's at its
    /// [`resident_row`](crate::kernels::shadow::ShadowSequence::resident_row); updated in
    /// place.
    pub resident: &'a mut CudaSlice<u32>,
    /// `[batch, Hkv, budget_chunks]` miss list: for each (sequence, KV head), its first
    /// [`miss_counts`](Self::miss_counts) entries name a chunk and the slot it goes to.
    pub misses: &'a mut CudaSlice<Miss>,
    /// `[batch, Hkv]` misses of each (sequence, KV head).
    pub miss_counts: &'a mut CudaSlice<u32>,
    /// `[batch, Hkv, budget_chunks]`: 1 for each slot a miss filled, 0 elsewhere.
    pub fresh: &'a mut CudaSlice<u32>,
    /// Device address of `[batch, Hkv]` u32 in mapped host memory that also receives the
    /// counts, or 0 for none.
    pub host_miss_counts: u64,
}

impl<'a> PlanBuffers<'a> {
    /// The buffers of a plan whose counts go to the GPU only (`host_miss_counts` 0).
    pub fn new(
        resident: &'a mut CudaSlice<u32>,
        misses: &'a mut CudaSlice<Miss>,
        miss_counts: &'a mut CudaSlice<u32>,
        fresh: &'a mut CudaSlice<u32>,
    ) -> Self {
        PlanBuffers {
            resident,
            misses,
            miss_counts,
            fresh,
            host_miss_counts: 0,
        }
    }
}

/// Runs the plan of `selection` for the sequences in `part` into `buffers`.
pub fn run(
    gpu: &Gpu,
    stream: &CudaStream,
    batch: &ShadowBatch,
    part: BatchPart,
    selection: &impl DevicePtr<u32>,
    buffers: PlanBuffers,
) -> Result<()> {
    let config = batch.config();
    let mut used = LaunchBuffers::new(stream);
    let selection = (used.read(selection), selection.len());
    let params = params(gpu, &mut used, batch, part, selection, buffers)?;
    let launch = LaunchConfig {
        grid_dim: (config.kv_heads as u32, part.count() as u32, 1),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: layout::shared_bytes(
            params.bitmap_words,
            config.budget_chunks as u32,
            layout::THREADS,
        ),
    };
    // SAFETY: the slot buffers hold `[batch, Hkv, budget_chunks]` entries and the counts
    // `[batch, Hkv]`, the resident ids every sequence's distinct row (checked above); the
    // bitmaps cover every sequence's chunks.
    unsafe { gpu.launch(stream, ptx::CACHE_PLAN, launch, params) }
}

/// The plan's parameters for `part`, its buffers validated as [`run`] does and held in
/// `used` until the launch is queued (the plan kernel's or the top-k's, see
/// `topk::run_and_plan`). `selection` is the address and length of the selection it reads,
/// already in `used` (the top-k writes it in the same launch).
pub(crate) fn params<'a>(
    gpu: &Gpu,
    used: &mut LaunchBuffers<'a>,
    batch: &'a ShadowBatch,
    part: BatchPart,
    (selection, selection_len): (u64, usize),
    buffers: PlanBuffers<'a>,
) -> Result<PlanParams> {
    let PlanBuffers {
        resident,
        misses,
        miss_counts,
        fresh,
        host_miss_counts,
    } = buffers;
    let entries = batch.slot_entries();
    check_reach("selection", selection_len, entries)?;
    batch.check_resident(resident.len())?;
    check_reach("fresh", fresh.len(), entries)?;
    batch.check_misses(misses.len(), miss_counts.len())?;
    let bitmap_words = check_fits(gpu, batch)?;
    Ok(PlanParams {
        shape: batch.shape_of(used, part)?,
        selection,
        resident: used.write(resident),
        misses: used.write(misses),
        miss_counts: used.write(miss_counts),
        fresh: used.write(fresh),
        host_miss_counts,
        bitmap_words,
        _reserved: 0,
    })
}
