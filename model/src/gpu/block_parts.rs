//! The parts of a block that differ between families on the GPU: the scaled embedding, the
//! residual add with the norm some families put on the delta first, the gate activation, and
//! which layers attend through the sliding window.
use half::bf16;
use shadowkv::cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use shadowkv::kernels::layer::{self, GatedActivation};

use super::model::GpuModel;
use crate::block::Activation;
use crate::error::{OnGpu, Result};

impl GpuModel {
    /// The embedding rows of `tokens` (`ids` is their device copy) into `out`, times the
    /// block's embedding scale (Gemma's `sqrt(hidden)`; 1 elsewhere): the one embedding of
    /// every prefill route and decode step.
    pub(super) fn embed(
        &self,
        tokens: &[u32],
        ids: &impl DevicePtr<u32>,
        out: &mut impl DevicePtrMut<f32>,
    ) -> Result<()> {
        layer::embedding_scaled(
            &self.gpu,
            self.stream(),
            &self.weights.embedding,
            self.config.hidden,
            (tokens, ids),
            self.config.block.embedding_scale,
            out,
        )
        .on_gpu("gathering the token embeddings")
    }

    /// `x += delta` (RMS-normed by the delta's weight first, where the block has a norm
    /// after the attention or the MLP), then `out = rmsnorm(x) * weight`, in one launch.
    pub(super) fn add_and_norm(
        &self,
        x: &mut impl DevicePtrMut<f32>,
        delta: Option<(&CudaSlice<f32>, Option<&CudaSlice<f32>>)>,
        weight: &CudaSlice<f32>,
        out: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        const WHAT: &str = "adding to the residual stream and norming it";
        let (gpu, stream, eps) = (&*self.gpu, self.stream(), self.config.rms_eps);
        match delta {
            Some((delta, Some(delta_weight))) => {
                layer::rms_norm_normed_delta(gpu, stream, x, delta, delta_weight, weight, eps, out)
            }
            Some((delta, None)) => layer::rms_norm(gpu, stream, x, Some(delta), weight, eps, out),
            None => layer::rms_norm(gpu, stream, x, None, weight, eps, out),
        }
        .on_gpu(WHAT)
    }

    /// The MLP's gate activation.
    pub(super) fn activation(&self) -> GatedActivation {
        match self.config.block.activation {
            Activation::Silu => GatedActivation::Silu,
            Activation::GeluTanh => GatedActivation::GeluTanh,
        }
    }

    /// Whether layer `index` attends through the model's sliding window.
    pub(super) fn is_local_layer(&self, index: usize) -> bool {
        self.config
            .block
            .sliding_window
            .is_some_and(|window| window.is_local(index))
    }
}
