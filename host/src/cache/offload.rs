//! The value offload of a prefill: the prompt's values into the cache's value buffer (pinned
//! host memory or the GPU) on the copy stream, after the compute stream's work on them:
//! copied as they are (bf16), or quantised on the way (`kernels::values`).
use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream, DevicePtr};
use half::bf16;

use crate::error::Result;
use crate::gpu::{Gpu, LaunchBuffers};
use crate::kernels::fetch::LayerValues;
use crate::kernels::shadow::{ShadowConfig, ShadowSequence};
use crate::kernels::shadow_prefill::PrefillSource;

/// Copies the prompt's values (`[Hkv, L, d]` of `source`, checked by the prefill kernels'
/// launcher) into the sequence's range of the value buffer on `copy_stream`, once `ready`
/// (recorded on the compute stream) has passed; a compressed buffer gets them quantised.
pub(super) fn offload_values<T: DevicePtr<bf16>>(
    gpu: &Gpu,
    config: &ShadowConfig,
    ready: &CudaEvent,
    copy_stream: &Arc<CudaStream>,
    source: &PrefillSource<'_, T>,
    sequence: &ShadowSequence,
    values: &mut LayerValues,
) -> Result<()> {
    let (kv_heads, head_dim) = (config.kv_heads, config.head_dim);
    if !matches!(values, LayerValues::Host(_) | LayerValues::Device(_)) {
        copy_stream.wait(ready)?;
        return crate::kernels::values::quantise(
            gpu,
            copy_stream,
            config,
            source,
            sequence,
            values,
        );
    }
    let layout = source.layout;
    let prompt = sequence.prompt_len as usize;
    // Held until the copies are queued, so each buffer's use is recorded after them.
    let mut used = LaunchBuffers::new(copy_stream);
    let (target, target_len) = values.address_mut(&mut used);
    let target_start = sequence.host_value_offset as usize;
    crate::error::check_reach(
        "values",
        target_len,
        target_start + kv_heads * prompt * head_dim,
    )?;
    copy_stream.wait(ready)?;
    let source_address = used.read(source.values);
    let row_bytes = head_dim * 2;
    let contiguous = layout.capacity as usize == prompt;
    let (copies, bytes) = match contiguous {
        true => (1, kv_heads * prompt * row_bytes),
        false => (kv_heads, prompt * row_bytes),
    };
    for head in 0..copies {
        let from = source_address
            + ((layout.offset as usize + head * layout.capacity as usize * head_dim) * 2) as u64;
        let to = target + ((target_start + head * prompt * head_dim) * 2) as u64;
        // SAFETY: both ranges lie inside their buffers (checked above); the target is device
        // memory or mapped pinned memory (unified addressing), and the copy is ordered on
        // `copy_stream` after the source was ready.
        unsafe { crate::gpu::copy_async(copy_stream, to, from, bytes)? };
    }
    Ok(())
}
