//! SYNTHETIC SELECTION for benchmarks (see `shadowkv_kernels::scripted_selection`): after the
//! top-k, rewrites each (sequence, KV head)'s selection so that a scripted share of it is
//! resident from the previous step; the plan then runs on it as usual.
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
pub use shadowkv_kernels::scripted_selection as kernel_layout;
use shadowkv_kernels::scripted_selection::{self as layout, ScriptedSelectionParams};

use crate::error::{check_reach, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::shadow::{BatchPart, ShadowBatch};
use crate::ptx;

/// Checks a scripted hit rate: a number in `[0, 1]`.
pub fn check_hit_rate(hit_rate: f64) -> Result<()> {
    if (0.0..=1.0).contains(&hit_rate) {
        Ok(())
    } else {
        Err(invalid(
            "hit_rate",
            format!("is {hit_rate}"),
            "a share of the selection in [0, 1]",
        ))
    }
}

/// Hits per (sequence, KV head) that `hit_rate` (in `[0, 1]`) scripts for a budget of
/// `budget_chunks`: `hit_rate * budget_chunks`, rounded.
pub fn hits_per_head(hit_rate: f64, budget_chunks: usize) -> Result<u32> {
    check_hit_rate(hit_rate)?;
    Ok(layout::hits_for(hit_rate, budget_chunks as u32))
}

/// Rewrites `selection` (the top-k's, `[batch, Hkv, budget_chunks]`) for the sequences in
/// `part` so that `hit_rate` of each (sequence, KV head)'s chunks (rounded) are in `resident`
/// and the rest are not: the top-k's own picks first, then the other resident chunks (hits) or
/// the other landmarks' chunks (misses); more hits where the landmarks have too few chunks
/// outside the cache. `chunk_ids` are the layer's landmark chunk ids; `resident`'s ids must be
/// distinct within each (sequence, KV head) (as the plan keeps them). A `hit_rate` outside
/// `[0, 1]` (or NaN) is an [`InvalidArgument`](crate::Error::InvalidArgument).
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    stream: &CudaStream,
    batch: &ShadowBatch,
    part: BatchPart,
    chunk_ids: &impl DevicePtr<u32>,
    resident: &impl DevicePtr<u32>,
    selection: &mut impl DevicePtrMut<u32>,
    hit_rate: f64,
) -> Result<()> {
    let config = batch.config();
    let hits = hits_per_head(hit_rate, config.budget_chunks)?;
    let entries = batch.slot_entries();
    check_reach("chunk_ids", chunk_ids.len(), batch.extents().landmark_rows)?;
    check_reach("resident", resident.len(), entries)?;
    check_reach("selection", selection.len(), entries)?;
    let bitmap_words = layout::bitmap_words(batch.extents().max_chunks);
    let shared = layout::shared_bytes(bitmap_words, config.budget_chunks as u32);
    if shared > gpu.info().max_shared_per_block {
        return Err(invalid(
            "sequences",
            format!(
                "a sequence has {} chunks and the budget is {} chunks: the scripted selection needs {shared} bytes of shared memory",
                batch.extents().max_chunks,
                config.budget_chunks
            ),
            format!("at most {} bytes (fewer chunks)", gpu.info().max_shared_per_block),
        ));
    }
    let mut used = LaunchBuffers::new(stream);
    let params = ScriptedSelectionParams {
        shape: batch.shape_of(&mut used, part)?,
        chunk_ids: used.read(chunk_ids),
        resident: used.read(resident),
        selection: used.write(selection),
        hits,
        bitmap_words,
    };
    let launch = LaunchConfig {
        grid_dim: (config.kv_heads as u32, part.count() as u32, 1),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: shared,
    };
    // SAFETY: chunk ids reach every landmark row and the slot buffers hold `[batch, Hkv,
    // budget_chunks]` (checked above); every sequence has at least `budget_chunks` landmarks
    // (checked by the batch); the bitmaps cover every sequence's chunks; `hits` is at most
    // `budget_chunks`.
    unsafe { gpu.launch(stream, ptx::SCRIPTED_SELECTION, launch, params) }
}
