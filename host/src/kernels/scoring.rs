//! Landmark scoring, pass one (see `shadowkv_kernels::scoring`): base-2 logits of every
//! landmark for the query heads of its group, and per-tile softmax statistics.
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
pub use shadowkv_kernels::scoring as kernel_layout;
use shadowkv_kernels::scoring::{self as layout, ScoringParams};

use crate::error::{check_len, check_reach, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::shadow::{BatchPart, ShadowBatch};
use crate::ptx;

/// f32 logits the batch needs: `G` per landmark row.
pub fn logits_len(batch: &ShadowBatch) -> usize {
    batch.extents().landmark_rows * batch.config().group()
}

/// f32 tile statistics the batch needs: (max, sum) per tile, query head and sequence.
pub fn tile_stats_len(batch: &ShadowBatch) -> usize {
    batch.batch() * batch.config().q_heads * batch.scoring_tiles() as usize * 2
}

/// Writes `logits` and `tile_stats` for `q` (`[batch, q_heads, head_dim]`, post-RoPE) against
/// every landmark of the sequences in `part`; `scale` is the softmax scale (`1/sqrt(d)`).
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    stream: &CudaStream,
    batch: &ShadowBatch,
    part: BatchPart,
    q: &impl DevicePtr<bf16>,
    landmarks: &impl DevicePtr<bf16>,
    logits: &mut impl DevicePtrMut<f32>,
    tile_stats: &mut impl DevicePtrMut<f32>,
    scale: f32,
) -> Result<()> {
    let config = batch.config();
    let q_elements = batch.batch() * config.q_heads * config.head_dim;
    check_len("q", q.len(), q_elements, "[batch, q_heads, head_dim]")?;
    check_reach(
        "landmarks",
        landmarks.len(),
        batch.extents().landmark_rows * config.head_dim,
    )?;
    check_reach("logits", logits.len(), logits_len(batch))?;
    check_reach("tile_stats", tile_stats.len(), tile_stats_len(batch))?;
    let (group, head_dim) = (config.group() as u32, config.head_dim as u32);
    let mut used = LaunchBuffers::new(stream);
    let params = ScoringParams {
        shape: batch.shape_of(&mut used, part)?,
        q: used.read(q),
        landmarks: used.read(landmarks),
        logits: used.write(logits),
        tile_stats: used.write(tile_stats),
        max_tiles: batch.scoring_tiles(),
        tile_len: batch.scoring_tile_len().get(),
        scale_log2: scale * std::f32::consts::LOG2_E,
        _reserved: 0,
    };
    let config = LaunchConfig {
        grid_dim: (
            batch.scoring_tiles(),
            config.kv_heads as u32,
            part.count() as u32,
        ),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: layout::shared_bytes(group),
    };
    let kernel = ptx::landmark_scoring(group, head_dim)?;
    // SAFETY: q, landmarks, logits and tile_stats reach every index the batch's validated
    // layouts address (checked above); the grid covers the tiles the stats are sized for.
    unsafe { gpu.launch(stream, kernel, config, params) }
}
