//! Value fetch (see `shadowkv_kernels::fetch`): each miss's values from pinned host memory
//! (or device memory) into its slot of the GPU value buffer.
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
pub use shadowkv_kernels::fetch as kernel_layout;
use shadowkv_kernels::fetch::{self as layout, FetchParams};

use crate::decode_step::LayerValues;
use crate::error::{check_reach, Result};
use crate::gpu::{address, Gpu};
use crate::kernels::KernelName;
use crate::shadow::{Miss, ShadowBatch};

/// Warps in flight: enough 2 KiB reads to cover the PCIe latency at full rate (about
/// 110 KB in flight at 55 GB/s and 2 µs), with room to spare.
const TARGET_WARPS: u32 = 1024;

/// Splits per (sequence, KV head) so that about [`TARGET_WARPS`] warps run.
pub fn splits(batch: &ShadowBatch) -> u32 {
    let rows = (batch.batch() * batch.config().kv_heads) as u32;
    let needed = TARGET_WARPS.div_ceil(rows * layout::WARPS);
    let most = (batch.config().budget_chunks as u32).div_ceil(layout::WARPS);
    needed.clamp(1, most.max(1))
}

pub fn run(
    gpu: &Gpu,
    stream: &CudaStream,
    batch: &ShadowBatch,
    misses: &impl DevicePtr<Miss>,
    miss_counts: &impl DevicePtr<u32>,
    values: &LayerValues,
    v: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    let config = batch.config();
    batch.check_misses(misses.len(), miss_counts.len())?;
    let (values_address, values_len) = values.address(stream);
    check_reach("values", values_len, batch.extents().values)?;
    check_reach("v", v.len(), batch.extents().kv)?;
    let splits = splits(batch);
    let params = FetchParams {
        shape: batch.shape(stream),
        misses: address(misses, stream),
        miss_counts: address(miss_counts, stream),
        values: values_address,
        v: v.device_ptr_mut(stream).0,
        splits,
        _reserved: 0,
    };
    let launch = LaunchConfig {
        grid_dim: (splits, config.kv_heads as u32, batch.batch() as u32),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the values and the value buffer reach every chunk and slot the validated
    // layouts address (checked above); the kernel skips misses naming chunks or slots out of
    // range.
    unsafe {
        gpu.launch(
            stream,
            KernelName::lookup(layout::KERNEL_NAME)?,
            launch,
            params,
        )
    }
}
