//! The sliding-window layers of a graph-replayed ShadowKV decode step (Gemma-3's local
//! layers): they keep full keys and values in a slot per sequence of the cache's
//! `LocalLayers`, allocated with the cache, so a captured step's addresses hold; each step's
//! placements in the slots and the slots' lengths come from the step's input block.
use shadowkv::cudarc::driver::{CudaSlice, DevicePtr};
use shadowkv::kernels::layer::kernel_layout::TokenPlacement;
use shadowkv::kernels::layer::TokenPlan;
use shadowkv::{DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, SequenceLayout};

use super::model::GpuModel;
use super::shadow_cache::GpuShadowCache;
use super::step_inputs::StepInputLayout;
use crate::error::{invalid_input, OnGpu, Result};

/// A ShadowKV step's inputs for the sliding-window layers: where each sequence's token goes in
/// its slot, the slots' layouts with the token counted and at their capacities (step order),
/// and every slot's layout (what the placements name).
pub(super) struct LocalStepInputs {
    pub(super) placements: Vec<TokenPlacement>,
    pub(super) layouts: Vec<SequenceLayout>,
    pub(super) capacities: Vec<SequenceLayout>,
    pub(super) slot_layouts: Vec<SequenceLayout>,
}

impl GpuModel {
    /// The sliding-window layers' part of a ShadowKV shape: its tokens placed in the slots of
    /// `slot_layouts` (the local layers' cache) and the windowed attention planned at each
    /// step sequence's slot capacity (`capacities`), both reading this step's values from the
    /// shape's block (`local_placements`, `local_layouts`).
    pub(super) fn local_shape_step(
        &self,
        block: &CudaSlice<u64>,
        layout: &StepInputLayout,
        inputs: &LocalStepInputs,
    ) -> Result<(TokenPlan, DecodeAttention)> {
        const WHAT: &str = "planning the sliding-window layers of a decode step";
        let (gpu, stream) = (&*self.gpu, self.stream());
        let window = self.config.block.sliding_window.ok_or_else(|| {
            invalid_input(
                "model",
                "has no sliding window",
                "a model with sliding-window layers",
            )
        })?;
        let address_of = |words: &std::ops::Range<usize>| {
            let (base, _guard) = block.device_ptr(stream);
            base + StepInputLayout::byte_offset(words)
        };
        let mut plan = TokenPlan::new(
            stream,
            self.qkv_shape(),
            &inputs.placements,
            &inputs.slot_layouts,
        )
        .on_gpu(WHAT)?;
        // SAFETY: every step writes the block's local placements (checked on the host against
        // the slots' layouts, which do not change for the cache) before its launches run, and
        // the plan lives beside the block.
        unsafe { plan.read_placements_from(Some(address_of(&layout.local_placements))) };
        let shape = DecodeAttentionShape {
            batch: layout.batch,
            q_heads: self.config.heads,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        };
        let attention_plan = DecodeAttentionPlan::for_gpu(gpu, shape, &inputs.capacities)
            .on_gpu(WHAT)?
            .with_window(window.window as u32);
        let mut attention = DecodeAttention::new(gpu, attention_plan).on_gpu(WHAT)?;
        let at = address_of(&layout.local_layouts);
        // SAFETY: every step writes the block's local layouts (the slots' offsets and
        // capacities, lengths within them) before its launches run; the attention lives beside
        // the block.
        unsafe { attention.read_layouts_from(Some(at)) };
        Ok((plan, attention))
    }

    /// The sliding-window layers' inputs of a step of every live sequence of `shadow`, or
    /// `None` for a cache without such layers. An error if a sequence has no slot or its slot
    /// is full.
    pub(super) fn local_step_inputs(
        &self,
        shadow: &GpuShadowCache,
    ) -> Result<Option<LocalStepInputs>> {
        let Some(local) = &shadow.local else {
            return Ok(None);
        };
        let batch = shadow.lens.len();
        let mut inputs = LocalStepInputs {
            placements: Vec::with_capacity(batch),
            layouts: Vec::with_capacity(batch),
            capacities: Vec::with_capacity(batch),
            slot_layouts: local.cache.layouts.clone(),
        };
        for &(id, len) in &shadow.lens {
            let (slot, layout) = local.slot_for_next_token(id, len)?;
            inputs
                .placements
                .push(TokenPlacement::new(slot as u32, len));
            inputs.layouts.push(SequenceLayout {
                len: len + 1,
                ..layout
            });
            inputs.capacities.push(SequenceLayout {
                len: layout.capacity,
                ..layout
            });
        }
        Ok(Some(inputs))
    }
}
