//! Value quantisation (see `shadowkv_kernels::values`): one sequence's prompt values, bf16
//! `[Hkv, capacity, d]` in device memory, compressed into its range of a layer's value buffer.
//!
//! The kernel writes the compressed bytes straight into the mapped pinned buffer (or device
//! memory) rather than into a device staging buffer followed by a copy: the writes are 16- and
//! 8-byte stores of whole chunks, which PCIe takes as posted writes, so no GPU memory is held
//! for a staging buffer the size of the longest prompt's layer, and the offload stays one
//! launch on the copy stream.
use cudarc::driver::{CudaStream, DevicePtr};
use half::bf16;
pub use shadowkv_kernels::values as kernel_layout;
use shadowkv_kernels::values::{self as layout, QuantiseParams, ValueFormat};

use crate::error::{check_reach, invalid, Result};
use crate::gpu::{grid_for, Gpu, LaunchBuffers};
use crate::kernels::fetch::{check_packed_shape, LayerValues};
use crate::kernels::shadow::{ShadowConfig, ShadowSequence};
use crate::kernels::shadow_prefill::PrefillSource;
use crate::ptx;

/// Most blocks of a quantise launch (the kernels stride over the grid).
const MAX_BLOCKS: u32 = 1024;

/// Quantises the prompt values of `source` (`[Hkv, capacity, d]` from `source.layout.offset`)
/// for `sequence` into `values` (a compressed buffer), on `stream`. The chunks a miss may name
/// (`sequence.chunks` per head) are stored; the local window stays exact on the GPU.
pub fn quantise<T: DevicePtr<bf16>>(
    gpu: &Gpu,
    stream: &CudaStream,
    config: &ShadowConfig,
    source: &PrefillSource<'_, T>,
    sequence: &ShadowSequence,
    values: &mut LayerValues,
) -> Result<()> {
    let format = values.format();
    let kernel = match format {
        ValueFormat::Fp8 => ptx::VALUE_QUANTISE_FP8,
        ValueFormat::Int4 => ptx::VALUE_QUANTISE_INT4,
        ValueFormat::Bf16 => {
            return Err(invalid(
                "values",
                "hold bf16",
                "a compressed value buffer (bf16 values are copied, not quantised)",
            ))
        }
    };
    let (kv_heads, d, c) = (config.kv_heads, config.head_dim, config.chunk_size);
    check_packed_shape(format, d)?;
    let layout_in = source.layout;
    if (sequence.chunks as usize) * c > layout_in.len as usize
        || layout_in.len > layout_in.capacity
        || !layout_in.offset.is_multiple_of(8)
        || !sequence.host_value_offset.is_multiple_of(16)
    {
        return Err(invalid(
            "source",
            format!(
                "a block of {} of {} rows at {} for {} chunks of {c} at byte {}",
                layout_in.len,
                layout_in.capacity,
                layout_in.offset,
                sequence.chunks,
                sequence.host_value_offset
            ),
            "the prompt's rows covering every chunk, a source offset that is a multiple of 8 \
             and a target offset that is a multiple of 16",
        ));
    }
    let mut used = LaunchBuffers::new(stream);
    let source_end = layout_in.offset as usize + kv_heads * layout_in.capacity as usize * d;
    check_reach("source.values", source.values.len(), source_end)?;
    let (target, target_len) = values.address_mut(&mut used);
    let needed = sequence.host_value_offset as usize
        + format.packed_bytes(kv_heads, sequence.chunks as usize, c, d);
    check_reach("values", target_len, needed)?;
    let params = QuantiseParams {
        source: used.read(source.values),
        source_offset: layout_in.offset,
        target,
        sequence: *sequence,
        source_capacity: layout_in.capacity,
        kv_heads: kv_heads as u32,
        head_dim: d as u32,
        chunk_size: c as u32,
    };
    let items = match format {
        // A warp per (head, chunk).
        ValueFormat::Fp8 => kv_heads * sequence.chunks as usize * 32,
        // A thread per (head, chunk, token, group).
        _ => kv_heads * sequence.chunks as usize * c * d.div_ceil(layout::INT4_GROUP),
    };
    if items == 0 {
        return Ok(());
    }
    // SAFETY: the source reaches every row of the sequence's chunks and the target every byte
    // of its compressed range (checked above); the shape suits the kernel's 16-channel units.
    unsafe {
        gpu.launch(
            stream,
            kernel,
            grid_for(items, layout::THREADS, MAX_BLOCKS),
            params,
        )
    }
}
