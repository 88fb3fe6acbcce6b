//! Value fetch (see `shadowkv_kernels::fetch`): each miss's values from pinned host memory
//! (or device memory) into its slot of the GPU value buffer.
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
pub use shadowkv_kernels::fetch as kernel_layout;
use shadowkv_kernels::fetch::{self as layout, FetchParams};

use crate::error::{check_reach, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::shadow::{BatchPart, Miss, ShadowBatch};
use crate::pinned::PinnedBuffer;
use crate::ptx;

/// Where a layer keeps its values.
pub enum LayerValues {
    /// Pinned, device-mapped host memory: ShadowKV's offload (fetched over PCIe).
    Host(PinnedBuffer<bf16>),
    /// Device memory, when the values fit on the GPU (no PCIe traffic).
    Device(CudaSlice<bf16>),
}

impl LayerValues {
    /// The address kernels read the values at (device memory held in `used`), and their
    /// length in elements.
    pub(crate) fn address<'a>(&'a self, used: &mut LaunchBuffers<'a>) -> (u64, usize) {
        match self {
            LayerValues::Host(buffer) => (buffer.device_address(), buffer.len()),
            LayerValues::Device(slice) => (used.read(slice), slice.len()),
        }
    }

    /// The address a copy writes the values at (device memory held in `used`), and their
    /// length in elements.
    pub(crate) fn address_mut<'a>(&'a mut self, used: &mut LaunchBuffers<'a>) -> (u64, usize) {
        match self {
            LayerValues::Host(buffer) => (buffer.device_address(), buffer.len()),
            LayerValues::Device(slice) => {
                let len = slice.len();
                (used.write(slice), len)
            }
        }
    }
}

/// Warps of the grid, 2 KiB in flight each. Measured on the H100 (b16, 122K, 80% hits): the
/// fetch alone reaches 27, 41, 46, 50 and 50 GB/s with 48, 128, 256, 512 and 1024 warps, and
/// the whole step is fastest at 512 (more reads in flight only queue in the memory system and
/// slow the kernels running beside the fetch).
const GRID_WARPS: u32 = 512;

/// Copies the values of the misses of the sequences in `part` into their slots of `v`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    gpu: &Gpu,
    stream: &CudaStream,
    batch: &ShadowBatch,
    part: BatchPart,
    misses: &impl DevicePtr<Miss>,
    miss_counts: &impl DevicePtr<u32>,
    values: &LayerValues,
    v: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    let config = batch.config();
    batch.check_misses(misses.len(), miss_counts.len())?;
    let mut used = LaunchBuffers::new(stream);
    let (values_address, values_len) = values.address(&mut used);
    check_reach("values", values_len, batch.extents().values)?;
    check_reach("v", v.len(), batch.extents().kv)?;
    // No more warps than entries in the part's miss lists.
    let entries = (part.count() * config.kv_heads * config.budget_chunks) as u32;
    let blocks = GRID_WARPS.min(entries).div_ceil(layout::WARPS).max(1);
    let params = FetchParams {
        shape: batch.shape_of(&mut used, part)?,
        misses: used.read(misses),
        miss_counts: used.read(miss_counts),
        values: values_address,
        v: used.write(v),
        sequences: part.count() as u32,
        _reserved: 0,
    };
    let launch = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the values and the value buffer reach every chunk and slot the validated
    // layouts address (checked above); the kernel skips misses naming chunks or slots out of
    // range.
    unsafe { gpu.launch(stream, ptx::VALUE_FETCH, launch, params) }
}
