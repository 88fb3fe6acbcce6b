//! ShadowKV prefill kernels for one sequence of one layer (see `shadowkv_kernels::shadow_prefill`):
//! [`build_landmarks`] (chunk statistics, outlier select, landmark gather) and, after the first
//! selection's plan, [`gather_exact`] (local window and outliers, and the first selection's
//! values). The cache's `prefill_layer` runs the whole prefill.
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, LaunchConfig};
use half::bf16;
pub use shadowkv_kernels::shadow_prefill as kernel_layout;
use shadowkv_kernels::shadow_prefill::{self as layout, ShadowPrefillParams};

use crate::decode_step::{ShadowLayer, StepWorkspace};
use crate::error::{check_reach, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::attention::SequenceLayout;
use crate::kernels::shadow::ShadowConfig;
use crate::ptx;

/// The prompt's post-RoPE keys and values on the GPU: `[Hkv, capacity, d]` from
/// `layout.offset`, `layout.len` tokens (a model's K/V cache block, say).
pub struct PrefillSource<'a, T> {
    /// bf16 post-RoPE keys, laid out as [`layout`](Self::layout) says.
    pub keys: &'a T,
    /// bf16 values, laid out as the keys.
    pub values: &'a T,
    /// The sequence's block in `keys` and `values`: `len` is the prompt length, `offset` a
    /// multiple of 8.
    pub layout: SequenceLayout,
}

/// Scratch of the prefill kernels, sized for the longest prompt (reused across layers).
pub struct PrefillScratch {
    /// bf16 `[Hkv, chunks, d]`: every chunk's landmark.
    pub chunk_means: CudaSlice<bf16>,
    /// f32 `[Hkv, chunks]`.
    pub min_cosine: CudaSlice<f32>,
    /// u32 `[Hkv, outlier_chunks]`.
    pub outliers: CudaSlice<u32>,
}

impl PrefillScratch {
    /// Allocates the scratch on `stream` for prompts of up to `max_chunks` chunks and
    /// `outlier_chunks` outlier chunks per KV head (uninitialised: each kernel writes it before
    /// the next reads it). Errors if an allocation fails.
    pub fn new(
        stream: &Arc<CudaStream>,
        config: &ShadowConfig,
        max_chunks: usize,
        outlier_chunks: usize,
    ) -> Result<Self> {
        let heads = config.kv_heads;
        // SAFETY (all three): scratch that a prefill kernel writes before the next reads it.
        unsafe {
            Ok(PrefillScratch {
                chunk_means: stream.alloc(heads * max_chunks.max(1) * config.head_dim)?,
                min_cosine: stream.alloc(heads * max_chunks.max(1))?,
                outliers: stream.alloc(heads * outlier_chunks.max(1))?,
            })
        }
    }
}

/// Checks everything the prefill kernels address and builds their parameters, the buffers
/// held in `used` until the launches are queued.
fn params<'a, T: DevicePtr<bf16>>(
    used: &mut LaunchBuffers<'a>,
    layer: &'a mut ShadowLayer,
    sequence_index: usize,
    source: &PrefillSource<'a, T>,
    scratch: &'a mut PrefillScratch,
    workspace: &'a StepWorkspace,
) -> Result<(ShadowPrefillParams, u32)> {
    let config = *layer.batch.config();
    let Some(&sequence) = layer.batch.sequences().get(sequence_index) else {
        return Err(invalid(
            "sequence_index",
            format!("is {sequence_index}"),
            format!("below the batch size {}", layer.batch.batch()),
        ));
    };
    let (c, d, heads) = (config.chunk_size as u32, config.head_dim, config.kv_heads);
    let source_layout = source.layout;
    if source_layout.len != sequence.prompt_len
        || source_layout.capacity < source_layout.len
        || !source_layout.offset.is_multiple_of(8)
    {
        return Err(invalid(
            "source.layout",
            format!("{source_layout:?}"),
            format!(
                "len = the prompt's {} tokens, capacity >= len, offset a multiple of 8",
                sequence.prompt_len
            ),
        ));
    }
    let source_end = source_layout.offset as usize + heads * source_layout.capacity as usize * d;
    check_reach("source.keys", source.keys.len(), source_end)?;
    check_reach("source.values", source.values.len(), source_end)?;
    let outliers = sequence.chunks - sequence.landmarks;
    let exact = layout::exact_rows(sequence.prompt_len, sequence.chunks, c, outliers);
    if sequence.sparse_start < exact {
        return Err(invalid(
            "sequence",
            format!(
                "has its sparse slots at row {} but {exact} exact rows",
                sequence.sparse_start
            ),
            "sparse_start >= local window + outlier chunks * chunk_size",
        ));
    }
    let chunks = sequence.chunks as usize;
    check_reach("chunk_means", scratch.chunk_means.len(), heads * chunks * d)?;
    check_reach("min_cosine", scratch.min_cosine.len(), heads * chunks)?;
    check_reach(
        "outliers",
        scratch.outliers.len(),
        heads * outliers as usize,
    )?;
    let extents = *layer.batch.extents();
    check_reach(
        "landmarks",
        layer.landmarks.len(),
        extents.landmark_rows * d,
    )?;
    check_reach("chunk_ids", layer.chunk_ids.len(), extents.landmark_rows)?;
    check_reach("k", layer.k.len(), extents.kv)?;
    check_reach("v", layer.v.len(), extents.kv)?;
    let per_row = config.kv_heads * config.budget_chunks;
    let rows = layer.resident.len() / per_row.max(1);
    if sequence.resident_row as usize >= rows {
        return Err(invalid(
            "sequence",
            format!(
                "sequence {sequence_index}: resident_row {} is past the {rows} rows of the resident ids",
                sequence.resident_row
            ),
            "a resident_row below the rows of the layer's resident ids",
        ));
    }
    layer
        .batch
        .check_misses(workspace.misses.len(), workspace.miss_counts.len())?;
    Ok((
        ShadowPrefillParams {
            sequence,
            source: source_layout,
            keys: used.read(source.keys),
            values: used.read(source.values),
            chunk_means: used.write(&mut scratch.chunk_means),
            min_cosine: used.write(&mut scratch.min_cosine),
            outliers: used.write(&mut scratch.outliers),
            landmarks: used.write(&mut layer.landmarks),
            chunk_ids: used.write(&mut layer.chunk_ids),
            resident: used.write(&mut layer.resident),
            k: used.write(&mut layer.k),
            v: used.write(&mut layer.v),
            misses: used.read(&workspace.misses),
            miss_counts: used.read(&workspace.miss_counts),
            kv_heads: heads as u32,
            head_dim: d as u32,
            chunk_size: c,
            outlier_chunks: outliers,
            budget_chunks: config.budget_chunks as u32,
            sequence_index: sequence_index as u32,
        },
        exact,
    ))
}

/// A grid of `rows` rows of `d / 8` vectors per head.
fn rows_grid(rows: u32, head_dim: u32, heads: u32) -> LaunchConfig {
    let vectors = rows as u64 * (head_dim / 8) as u64;
    LaunchConfig {
        grid_dim: (
            vectors.div_ceil(layout::THREADS as u64).max(1) as u32,
            heads,
            1,
        ),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Landmarks, minimum cosines, outliers and the remaining chunk ids of sequence
/// `sequence_index` of `layer` (whose layout gives `chunks`, `landmarks` and where they go),
/// and empty resident slots for it. `workspace` is the decode step's (its miss buffers are
/// only checked here).
pub fn build_landmarks<T: DevicePtr<bf16>>(
    gpu: &Gpu,
    stream: &CudaStream,
    layer: &mut ShadowLayer,
    sequence_index: usize,
    source: &PrefillSource<'_, T>,
    scratch: &mut PrefillScratch,
    workspace: &StepWorkspace,
) -> Result<()> {
    let mut used = LaunchBuffers::new(stream);
    let (params, _) = params(&mut used, layer, sequence_index, source, scratch, workspace)?;
    let heads = params.kv_heads;
    let statistics = LaunchConfig {
        grid_dim: (params.sequence.chunks.div_ceil(layout::WARPS), heads, 1),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let select = LaunchConfig {
        grid_dim: (heads, 1, 1),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: layout::outlier_shared_bytes(),
    };
    let statistics_kernel = ptx::chunk_statistics(params.head_dim)?;
    // SAFETY (all three): `params` checked every buffer against the layouts it addresses
    // (source, scratch, landmark rows, resident slots); the statistics kernel is the one
    // compiled for this head_dim (the config allows only compiled ones); the grids are the
    // ones each kernel's contract names.
    unsafe {
        gpu.launch(stream, statistics_kernel, statistics, params)?;
        gpu.launch(stream, ptx::OUTLIER_SELECT, select, params)?;
        gpu.launch(
            stream,
            ptx::LANDMARK_GATHER,
            rows_grid(params.sequence.landmarks, params.head_dim, heads),
            params,
        )
    }
}

/// The exact rows (local window and outliers, keys and values) of sequence `sequence_index`
/// into its K/V block, and the values of the first selection's misses (from `workspace`,
/// written by `plan`) into their slots. Runs after [`build_landmarks`] and the plan.
pub fn gather_exact<T: DevicePtr<bf16>>(
    gpu: &Gpu,
    stream: &CudaStream,
    layer: &mut ShadowLayer,
    sequence_index: usize,
    source: &PrefillSource<'_, T>,
    scratch: &mut PrefillScratch,
    workspace: &StepWorkspace,
) -> Result<()> {
    let mut used = LaunchBuffers::new(stream);
    let (params, exact) = params(&mut used, layer, sequence_index, source, scratch, workspace)?;
    let rows = layout::gather_rows(exact, params.budget_chunks, params.chunk_size);
    // SAFETY: as in `build_landmarks`; slot rows land inside the block because the layout's
    // sparse slots fit below its len (checked by ShadowBatch) and bad misses are skipped.
    unsafe {
        gpu.launch(
            stream,
            ptx::EXACT_GATHER,
            rows_grid(rows, params.head_dim, params.kv_heads),
            params,
        )
    }
}
