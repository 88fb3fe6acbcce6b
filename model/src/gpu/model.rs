//! [`GpuModel`]: the model's shape, its weights on one GPU and the cuBLAS handle its GEMMs
//! run through. The passes over it live in the sibling files (`forward`, `shadow`).
use std::sync::Arc;

use shadowkv::cudarc::driver::{CudaSlice, CudaStream};
use shadowkv::kernels::layer::QkvShape;
use shadowkv::linear::Linear;
use shadowkv::Gpu;

use super::weights::GpuWeights;
use crate::config::ModelConfig;
use crate::error::{OnGpu, Result};
use crate::weights::WeightFile;

/// The model's weights on one GPU.
pub struct GpuModel {
    /// The model's shape.
    pub config: ModelConfig,
    pub(super) gpu: Arc<Gpu>,
    pub(super) linear: Linear,
    pub(super) weights: GpuWeights,
    /// Prompts through the tiled prefill kernel (the default; its P·V runs as two bf16 mma's
    /// on a split P, so the probabilities keep about 16 bits), or through the decode kernel
    /// with one row per query token.
    pub(super) tiled_prefill: bool,
    /// Under tensor parallelism: what adds the ranks' partial outputs of each attention and
    /// MLP block before the residual stream takes them ([`crate::tp`]); `None` on one GPU.
    pub(super) partial_sums: Option<Arc<dyn PartialSums>>,
}

/// Adds a block's partial outputs (`[tokens, hidden]` f32, one per rank) in place, on the
/// model's stream: the all-reduce of a tensor-parallel rank.
pub trait PartialSums: Send + Sync {
    /// Replaces `partial` by the sum over the ranks, queued on `stream`.
    fn all_reduce(&self, stream: &Arc<CudaStream>, partial: &mut CudaSlice<f32>) -> Result<()>;
}

impl GpuModel {
    /// Reads every weight from `weights`, converts it to bf16 and uploads it (one tensor at a
    /// time, so host memory holds at most one f32 tensor).
    pub fn load(gpu: Arc<Gpu>, config: &ModelConfig, weights: &WeightFile) -> Result<GpuModel> {
        config.check_gpu_kernels(weights.name())?;
        let weights = GpuWeights::load(gpu.stream(), config, weights)?;
        GpuModel::new(gpu, config, weights)
    }

    /// A model of `config`'s shape with random weights generated on the GPU (no files): for
    /// throughput work. Matrices are uniform with variance `1 / inputs`, norms are 1, so
    /// activations stay in range; the text it generates is meaningless.
    pub fn synthetic(gpu: Arc<Gpu>, config: &ModelConfig, seed: u64) -> Result<GpuModel> {
        config.check_gpu_kernels("synthetic model")?;
        let weights = GpuWeights::synthetic(&gpu, gpu.stream(), config, seed)?;
        GpuModel::new(gpu, config, weights)
    }

    pub(super) fn new(
        gpu: Arc<Gpu>,
        config: &ModelConfig,
        weights: GpuWeights,
    ) -> Result<GpuModel> {
        Ok(GpuModel {
            config: config.clone(),
            linear: Linear::new(gpu.stream().clone()).on_gpu("creating the cuBLAS handle")?,
            weights,
            tiled_prefill: true,
            partial_sums: None,
            gpu,
        })
    }

    /// Sends prompts through the tiled tensor-core prefill kernel (`true`, the default) or
    /// through the decode kernel, one row per query token (`false`: quadratic reads, slow
    /// for long prompts; P·V in f32).
    pub fn set_tiled_prefill(&mut self, tiled: bool) {
        self.tiled_prefill = tiled;
    }

    /// Makes this model one rank of a tensor-parallel split: `sums` adds the ranks' partial
    /// block outputs (its weights must be the rank's shard, see `crate::tp`).
    pub fn set_partial_sums(&mut self, sums: Arc<dyn PartialSums>) {
        self.partial_sums = Some(sums);
    }

    /// Adds the ranks' partial sums of `partial` under tensor parallelism; nothing on one GPU.
    pub(super) fn reduce_partial_sums(&self, partial: &mut CudaSlice<f32>) -> Result<()> {
        match &self.partial_sums {
            Some(sums) => sums.all_reduce(self.stream(), partial),
            None => Ok(()),
        }
    }

    /// Rows of the output head: the vocabulary, or a tensor-parallel rank's slice of it.
    pub fn logit_rows(&self) -> usize {
        self.weights.head().len() / self.config.hidden
    }

    /// The GPU the model lives on.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The stream every pass runs on (the GPU's compute stream).
    pub(super) fn stream(&self) -> &Arc<CudaStream> {
        self.gpu.stream()
    }

    /// Bytes of the weights on the GPU.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// The Q/K/V head shape the `layer` kernels take.
    pub(super) fn qkv_shape(&self) -> QkvShape {
        QkvShape {
            heads: self.config.heads,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        }
    }
}
