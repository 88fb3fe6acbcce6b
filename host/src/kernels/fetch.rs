//! Value fetch (see `shadowkv_kernels::fetch`): each miss's values from pinned host memory
//! (or device memory) into its slot of the GPU value buffer, dequantised on the way when the
//! values are compressed ([`ValueFormat::Fp8`], [`ValueFormat::Int4`]).
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
pub use shadowkv_kernels::fetch as kernel_layout;
use shadowkv_kernels::fetch::{self as layout, FetchParams};
use shadowkv_kernels::values::ValueFormat;

use crate::error::{check_reach, invalid, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::shadow::{BatchPart, Miss, ShadowBatch};
use crate::kernels::tier::ValueTier;
use crate::pinned::PinnedBuffer;
use crate::ptx;
use shadowkv_kernels::tier::{entry_bytes, TierParams};

/// Where a layer keeps its values, and in which format.
pub enum LayerValues {
    /// bf16 in pinned, device-mapped host memory: ShadowKV's offload (fetched over PCIe).
    Host(PinnedBuffer<bf16>),
    /// bf16 in device memory, when the values fit on the GPU (no PCIe traffic).
    Device(CudaSlice<bf16>),
    /// Compressed (fp8 or int4, laid out as `shadowkv_kernels::values` says; offsets in
    /// bytes) in pinned, device-mapped host memory.
    HostPacked(ValueFormat, PinnedBuffer<u8>),
    /// Compressed, in device memory.
    DevicePacked(ValueFormat, CudaSlice<u8>),
}

impl LayerValues {
    /// The format the values are stored in.
    pub fn format(&self) -> ValueFormat {
        match self {
            LayerValues::Host(_) | LayerValues::Device(_) => ValueFormat::Bf16,
            LayerValues::HostPacked(format, _) | LayerValues::DevicePacked(format, _) => *format,
        }
    }

    /// Whether the values live in host memory.
    pub fn on_host(&self) -> bool {
        matches!(self, LayerValues::Host(_) | LayerValues::HostPacked(..))
    }

    /// The address kernels read the values at (device memory held in `used`), and their
    /// length in elements.
    pub(crate) fn address<'a>(&'a self, used: &mut LaunchBuffers<'a>) -> (u64, usize) {
        match self {
            LayerValues::Host(buffer) => (buffer.device_address(), buffer.len()),
            LayerValues::Device(slice) => (used.read(slice), slice.len()),
            LayerValues::HostPacked(_, buffer) => (buffer.device_address(), buffer.len()),
            LayerValues::DevicePacked(_, slice) => (used.read(slice), slice.len()),
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
            LayerValues::HostPacked(_, buffer) => (buffer.device_address(), buffer.len()),
            LayerValues::DevicePacked(_, slice) => {
                let len = slice.len();
                (used.write(slice), len)
            }
        }
    }
}

/// Checks that a compressed layout suits `chunk_size` and `head_dim` (the kernels work in
/// units of 16 channels of one token).
pub fn check_packed_shape(format: ValueFormat, head_dim: usize) -> Result<()> {
    let unit = shadowkv_kernels::values::UNIT as usize;
    if format != ValueFormat::Bf16 && !head_dim.is_multiple_of(unit) {
        return Err(invalid(
            "value format",
            format!("{} values with head_dim {head_dim}", format.name()),
            format!("a head_dim that is a multiple of {unit} for compressed values, or bf16"),
        ));
    }
    Ok(())
}

/// Bytes of a value buffer in `format` that the sequences of `batch` reach.
pub fn packed_extent(batch: &ShadowBatch, format: ValueFormat) -> usize {
    let config = batch.config();
    batch
        .sequences()
        .iter()
        .map(|s| {
            s.host_value_offset as usize
                + format.packed_bytes(
                    config.kv_heads,
                    s.chunks as usize,
                    config.chunk_size,
                    config.head_dim,
                )
        })
        .max()
        .unwrap_or(0)
}

/// Warps of the grid, 2 KiB in flight each. Measured on the H100 (b16, 122K, 80% hits): the
/// fetch alone reaches 27, 41, 46, 50 and 50 GB/s with 48, 128, 256, 512 and 1024 warps, and
/// the whole step is fastest at 512 (more reads in flight only queue in the memory system and
/// slow the kernels running beside the fetch).
const GRID_WARPS: u32 = 512;

/// Copies the values of the misses of the sequences in `part` into their slots of `v`,
/// dequantising compressed values to bf16.
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
    run_tiered(
        gpu,
        stream,
        batch,
        part,
        misses,
        miss_counts,
        values,
        None,
        v,
    )
}

/// A fetch through a GPU value tier: what [`run`] does, with each miss looked up in `tier`
/// first (a hit copies the chunk's bytes over HBM) and the chunks fetched over PCIe kept
/// there as its policy says (`shadowkv_kernels::tier`). `outcomes`, if not 0, is the device
/// address of u32 `[batch, Hkv, budget_chunks]` in mapped host memory that receives each
/// miss's outcome (`tier::kernel_layout::OUTCOME_*`). The tier must be in the values' format
/// and have a row for every sequence's `resident_row`.
pub struct TierUse<'a> {
    /// The layer's tier.
    pub tier: &'a mut ValueTier,
    /// Mapped host address for the outcomes, or 0.
    pub outcomes: u64,
}

/// [`run`] through a GPU value tier when `tier` is given (see [`TierUse`]).
#[allow(clippy::too_many_arguments)]
pub fn run_tiered(
    gpu: &Gpu,
    stream: &CudaStream,
    batch: &ShadowBatch,
    part: BatchPart,
    misses: &impl DevicePtr<Miss>,
    miss_counts: &impl DevicePtr<u32>,
    values: &LayerValues,
    tier: Option<TierUse>,
    v: &mut impl DevicePtrMut<bf16>,
) -> Result<()> {
    let config = batch.config();
    batch.check_misses(misses.len(), miss_counts.len())?;
    let mut used = LaunchBuffers::new(stream);
    let (values_address, values_len) = values.address(&mut used);
    let format = values.format();
    let kernel = match format {
        ValueFormat::Bf16 => {
            check_reach("values", values_len, batch.extents().values)?;
            ptx::VALUE_FETCH
        }
        ValueFormat::Fp8 | ValueFormat::Int4 => {
            check_packed_shape(format, config.head_dim)?;
            check_reach("values", values_len, packed_extent(batch, format))?;
            if format == ValueFormat::Fp8 {
                ptx::VALUE_FETCH_FP8
            } else {
                ptx::VALUE_FETCH_INT4
            }
        }
    };
    check_reach("v", v.len(), batch.extents().kv)?;
    // No more warps than entries in the part's miss lists.
    let entries = (part.count() * config.kv_heads * config.budget_chunks) as u32;
    let blocks = GRID_WARPS.min(entries).div_ceil(layout::WARPS).max(1);
    let tier = match tier {
        None => TierParams::default(),
        Some(TierUse { tier, outcomes }) => {
            check_tier(batch, format, tier)?;
            TierParams {
                tags: used.write(&mut tier.tags),
                data: used.write(&mut tier.data),
                outcomes,
                chunks_per_head: tier.chunks_per_head as u32,
                _reserved: 0,
            }
        }
    };
    let params = FetchParams {
        shape: batch.shape_of(&mut used, part)?,
        misses: used.read(misses),
        miss_counts: used.read(miss_counts),
        values: values_address,
        v: used.write(v),
        tier,
        sequences: part.count() as u32,
        _reserved: 0,
    };
    let launch = LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (layout::THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the values (in the kernel's format), the value buffer and the tier reach every
    // chunk, slot and row the validated layouts address (checked above); the kernel skips
    // misses naming chunks or slots out of range.
    unsafe { gpu.launch(stream, kernel, launch, params) }
}

/// Checks that `tier` suits a fetch of `batch`'s values in `format`: the same format, a row
/// for every sequence's `resident_row`, whole entries, and room for `chunks_per_head` below
/// 2^32.
fn check_tier(batch: &ShadowBatch, format: ValueFormat, tier: &ValueTier) -> Result<()> {
    let config = batch.config();
    if tier.format != format {
        return Err(invalid(
            "tier",
            format!("holds {} values", tier.format.name()),
            format!("the layer's {} values", format.name()),
        ));
    }
    if tier.kv_heads != config.kv_heads || tier.chunks_per_head == 0 {
        return Err(invalid(
            "tier",
            format!(
                "has {} KV heads and {} chunks per head",
                tier.kv_heads, tier.chunks_per_head
            ),
            format!("{} KV heads and at least one chunk", config.kv_heads),
        ));
    }
    crate::kernels::tier::check_chunks_per_head(tier.chunks_per_head, u32::MAX as usize)?;
    let rows = batch
        .sequences()
        .iter()
        .map(|s| s.resident_row as usize + 1)
        .max()
        .unwrap_or(0);
    let entries = rows * config.kv_heads * tier.chunks_per_head;
    check_reach("tier tags", tier.tags.len(), entries)?;
    check_reach(
        "tier data",
        tier.data.len(),
        entries * entry_bytes(format, config.chunk_size, config.head_dim),
    )
}
