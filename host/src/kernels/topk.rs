//! Landmark scoring, pass two, and top-k chunk selection (see `shadowkv_kernels::topk`).
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use shadowkv_kernels::plan::PlanParams;
pub use shadowkv_kernels::topk as kernel_layout;
use shadowkv_kernels::topk::{self as layout, TopkParams};

use crate::error::{check_reach, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::plan::{self, PlanBuffers};
use crate::kernels::scoring::{logits_len, tile_stats_len};
use crate::kernels::shadow::{BatchPart, ShadowBatch};
use crate::ptx;

/// Writes each landmark's `score` (max over the group of its softmax weight) and the chunk
/// ids of the `budget_chunks` highest scores of every (sequence, KV head) into `selection`
/// (`[batch, Hkv, budget_chunks]`, in landmark order), for the sequences in `part`.
/// `cluster_blocks`: blocks per (sequence, KV head), 1 to [`MAX_CLUSTER_BLOCKS`] (in
/// thread-block clusters when more than 1), or `None` for [`cluster_blocks`]'s pick.
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    stream: &CudaStream,
    batch: &ShadowBatch,
    part: BatchPart,
    logits: &impl DevicePtr<f32>,
    tile_stats: &impl DevicePtr<f32>,
    chunk_ids: &impl DevicePtr<u32>,
    scores: &mut impl DevicePtrMut<f32>,
    selection: &mut impl DevicePtrMut<u32>,
    cluster_blocks: Option<u32>,
) -> Result<()> {
    let mut used = LaunchBuffers::new(stream);
    let selection_len = selection.len();
    let selection = (used.write(selection), selection_len);
    launch(
        gpu,
        &mut used,
        batch,
        part,
        (logits, tile_stats, chunk_ids),
        scores,
        selection,
        PlanParams::default(),
        cluster_blocks,
    )
}

/// Most blocks per (sequence, KV head) (the portable cluster size).
pub const MAX_CLUSTER_BLOCKS: u32 = shadowkv_kernels::MAX_CLUSTER_BLOCKS;

/// Blocks per (sequence, KV head) that [`run`] and [`run_and_plan`] pick for `part` on `gpu`
/// (see [`kernel_layout::cluster_blocks`]; 1 where clusters are not available). They launch
/// one block per head instead where the GPU cannot run such a cluster
/// ([`Gpu::clusters_fit`]: a partitioned GPU, say).
pub fn cluster_blocks(gpu: &Gpu, batch: &ShadowBatch, part: BatchPart) -> u32 {
    if !gpu.has_clusters() {
        return 1;
    }
    layout::cluster_blocks(
        gpu.info().multiprocessors,
        (part.count() * batch.config().kv_heads) as u32,
        batch.extents().max_landmarks,
    )
}

/// [`run`], then in the same blocks the cache-aware plan of the new selection into `plan`
/// ([`plan::run`] with the same buffers): one launch where the two take two. `cluster_blocks`
/// as for [`run`].
#[allow(clippy::too_many_arguments)]
pub fn run_and_plan(
    gpu: &Gpu,
    stream: &CudaStream,
    batch: &ShadowBatch,
    part: BatchPart,
    logits: &impl DevicePtr<f32>,
    tile_stats: &impl DevicePtr<f32>,
    chunk_ids: &impl DevicePtr<u32>,
    scores: &mut impl DevicePtrMut<f32>,
    selection: &mut impl DevicePtrMut<u32>,
    plan: PlanBuffers,
    cluster_blocks: Option<u32>,
) -> Result<()> {
    let mut used = LaunchBuffers::new(stream);
    let selection_len = selection.len();
    let selection = (used.write(selection), selection_len);
    let plan = plan::params(gpu, &mut used, batch, part, selection, plan)?;
    launch(
        gpu,
        &mut used,
        batch,
        part,
        (logits, tile_stats, chunk_ids),
        scores,
        selection,
        plan,
        cluster_blocks,
    )
}

/// The top-k launch, with a plan unless `plan.resident` is 0, on `used`'s stream; `selection`
/// is the address and length of the selection, already in `used` (which holds every buffer's
/// guard until the launch is queued).
#[allow(clippy::too_many_arguments)]
fn launch<'a>(
    gpu: &Gpu,
    used: &mut LaunchBuffers<'a>,
    batch: &'a ShadowBatch,
    part: BatchPart,
    (logits, tile_stats, chunk_ids): (
        &'a impl DevicePtr<f32>,
        &'a impl DevicePtr<f32>,
        &'a impl DevicePtr<u32>,
    ),
    scores: &'a mut impl DevicePtrMut<f32>,
    (selection, selection_len): (u64, usize),
    plan: PlanParams,
    cluster_blocks: Option<u32>,
) -> Result<()> {
    let stream = used.stream();
    let config = batch.config();
    let extents = batch.extents();
    let most = if gpu.has_clusters() {
        MAX_CLUSTER_BLOCKS
    } else {
        1
    };
    if let Some(blocks) = cluster_blocks.filter(|&blocks| blocks == 0 || blocks > most) {
        return Err(invalid(
            "cluster_blocks",
            blocks,
            format!("1 to {most} blocks per (sequence, KV head) on this GPU"),
        ));
    }
    let rows = extents.landmark_rows;
    check_reach("logits", logits.len(), logits_len(batch))?;
    check_reach("tile_stats", tile_stats.len(), tile_stats_len(batch))?;
    check_reach("chunk_ids", chunk_ids.len(), rows)?;
    check_reach("scores", scores.len(), rows)?;
    check_reach("selection", selection_len, batch.slot_entries())?;
    let plan_bytes = if plan.resident == 0 {
        0
    } else {
        plan::kernel_layout::shared_bytes(
            plan.bitmap_words,
            config.budget_chunks as u32,
            layout::THREADS,
        )
    };
    let kernel = ptx::topk_select(config.group() as u32)?;
    let launch_config = |blocks: u32| {
        let shared_scores = layout::shared_scores(extents.max_landmarks, blocks);
        let launch = LaunchConfig {
            grid_dim: (config.kv_heads as u32 * blocks, part.count() as u32, 1),
            block_dim: (layout::THREADS, 1, 1),
            shared_mem_bytes: layout::shared_bytes(
                config.group() as u32,
                shared_scores,
                plan_bytes,
            ),
        };
        (launch, shared_scores)
    };
    // A cluster that cannot be co-scheduled here (a partitioned GPU, say): an error when
    // asked for, one block per head when picked automatically.
    let cluster_blocks = match cluster_blocks {
        Some(blocks) => {
            if !gpu.clusters_fit(kernel, launch_config(blocks).0, blocks)? {
                return Err(invalid(
                    "cluster_blocks",
                    blocks,
                    "fewer blocks per (sequence, KV head): this GPU cannot run such a cluster",
                ));
            }
            blocks
        }
        None => {
            let blocks = self::cluster_blocks(gpu, batch, part);
            if gpu.clusters_fit(kernel, launch_config(blocks).0, blocks)? {
                blocks
            } else {
                1
            }
        }
    };
    let (launch, shared_scores) = launch_config(cluster_blocks);
    let params = TopkParams {
        shape: batch.shape_of(used, part)?,
        logits: used.read(logits),
        tile_stats: used.read(tile_stats),
        chunk_ids: used.read(chunk_ids),
        scores: used.write(scores),
        selection,
        max_tiles: batch.scoring_tiles(),
        tile_len: batch.scoring_tile_len().get(),
        shared_scores,
        _reserved: 0,
        plan,
    };
    // SAFETY: every buffer reaches the rows the validated layouts address (checked above);
    // every sequence has at least `budget_chunks` landmarks (checked by the batch); a plan's
    // buffers were validated by `plan::params` for the same part, and its bitmaps fit the
    // shared memory (`plan::check_fits`); the grid is `cluster_blocks` blocks per KV head, at
    // most the portable cluster size.
    unsafe { gpu.launch_in_clusters(stream, kernel, launch, cluster_blocks, params) }
}
