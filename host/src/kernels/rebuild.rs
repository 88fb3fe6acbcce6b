//! Low-rank key rebuild with fused RoPE (see `shadowkv_kernels::rebuild`), for the misses.
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
pub use shadowkv_kernels::rebuild as kernel_layout;
use shadowkv_kernels::rebuild::{self as layout, RebuildParams};
use shadowkv_kernels::rope::{RopePairing, RotaryLayout};

use crate::error::{check_reach, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::layer::check_rotary;
use crate::kernels::shadow::{BatchPart, Miss, ShadowBatch};
use crate::ptx;

/// Blocks the rebuild aims for: about two per multiprocessor.
const BLOCKS_PER_MULTIPROCESSOR: u32 = 2;

/// Splits per (sequence, KV head): enough blocks to fill the GPU, no more than the tiles of
/// a full miss list.
pub fn splits(gpu: &Gpu, batch: &ShadowBatch) -> u32 {
    let config = batch.config();
    let rows = (batch.batch() * config.kv_heads) as u32;
    let target = gpu.info().multiprocessors * BLOCKS_PER_MULTIPROCESSOR;
    let tiles = ((config.budget_chunks * config.chunk_size) as u32).div_ceil(layout::TILE_ROWS);
    target
        .div_ceil(rows)
        .clamp(1, tiles.div_ceil(layout::WARPS).max(1))
}

/// Checks `rotary` for the rebuild: as for `rope_qkv`, and rotate-half pairs only over whole
/// heads.
pub fn check_rebuild_rotary(
    rotary: &RotaryLayout,
    head_dim: usize,
    inverse_frequencies: usize,
) -> Result<()> {
    check_rotary(rotary, head_dim, inverse_frequencies)?;
    if rotary.pairing == RopePairing::Halves as u32 && rotary.rotary_dim as usize != head_dim {
        return Err(invalid(
            "rotary.rotary_dim",
            format!(
                "is {} of {head_dim} with rotate-half pairs",
                rotary.rotary_dim
            ),
            "the whole head for rotate-half pairs (partial rotary with adjacent pairs)",
        ));
    }
    Ok(())
}

/// Rebuilds the keys of the misses of the sequences in `part`: for each of the first
/// `miss_counts` entries of `misses` per (sequence, KV head), the chunk's `c` rows of `a`
/// times the head's columns of `bm`, rotated by RoPE at the chunk's positions (`rotary` with
/// the f64 `[rotary_dim / 2]` `inverse_frequencies`) and written as bf16 into its sparse slot
/// of `k`. Errors if a buffer is shorter than the batch's layouts need, or for rotate-half
/// pairs over part of a head (the kernel pairs halves of whole heads only).
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    stream: &CudaStream,
    batch: &ShadowBatch,
    part: BatchPart,
    misses: &impl DevicePtr<Miss>,
    miss_counts: &impl DevicePtr<u32>,
    a: &impl DevicePtr<bf16>,
    bm: &impl DevicePtr<bf16>,
    (inverse_frequencies, rotary): (&impl DevicePtr<f64>, RotaryLayout),
    k: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    let config = batch.config();
    batch.check_misses(misses.len(), miss_counts.len())?;
    check_reach("a", a.len(), batch.extents().a)?;
    check_reach("bm", bm.len(), batch.extents().bm)?;
    check_rebuild_rotary(&rotary, config.head_dim, inverse_frequencies.len())?;
    check_reach("k", k.len(), batch.extents().kv)?;
    let splits = splits(gpu, batch);
    let mut used = LaunchBuffers::new(stream);
    let params = RebuildParams {
        shape: batch.shape_of(&mut used, part)?,
        misses: used.read(misses),
        miss_counts: used.read(miss_counts),
        a: used.read(a),
        bm: used.read(bm),
        inverse_frequencies: used.read(inverse_frequencies),
        k: used.write(k),
        splits,
        _reserved: 0,
        rotary,
    };
    let launch = LaunchConfig {
        grid_dim: (splits, config.kv_heads as u32, part.count() as u32),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: layout::shared_bytes(config.rank as u32, config.head_dim as u32),
    };
    let kernel = ptx::key_rebuild(config.head_dim as u32)?;
    // SAFETY: A, Bm and the key buffer reach every row the validated layouts address
    // (checked above), rank is a multiple of 16 up to MAX_RANK (checked by the config) and the
    // kernel is the one compiled for this head_dim; bad chunk ids or slots are skipped.
    unsafe { gpu.launch(stream, kernel, launch, params) }
}
