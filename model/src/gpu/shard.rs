//! One rank's weights of a tensor-parallel split on its GPU: Q/K/V and gate/up sliced by
//! output rows, O and down by input columns, the output head by vocabulary rows (a tied head
//! is the embedding's slice). The embedding itself is kept whole on every rank: its lookup is
//! a gather with no arithmetic, so a vocabulary split would only trade its memory for an
//! all-reduce of the hidden states per pass.
use std::sync::Arc;

use half::bf16;
use shadowkv::Gpu;

use super::model::GpuModel;
use super::weights::{GpuLayer, GpuWeights};
use crate::block::BlockOptions;
use crate::error::{invalid_input, OnGpu, Result};
use crate::tp::cpu::{matrix_columns, matrix_rows};
use crate::tp::plan::ShardPlan;
use crate::weights::WeightFile;

fn bf16_of(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

impl GpuModel {
    /// Rank `rank` of `plan`: its slices of `weights`, read one tensor at a time, on `gpu`.
    pub fn load_shard(
        gpu: Arc<Gpu>,
        plan: &ShardPlan,
        rank: usize,
        weights: &WeightFile,
    ) -> Result<GpuModel> {
        const WHAT: &str = "uploading a rank's weights";
        let (config, shard) = (&plan.config, plan.shard(rank));
        let rank_config = plan.rank_config();
        rank_config.check_gpu_kernels(weights.name())?;
        if config.block != BlockOptions::LLAMA {
            return Err(invalid_input(
                "model",
                format!("{} has block options beyond Llama's (Gemma-3's)", weights.name()),
                "a Llama-block model for tensor parallelism on the GPU (the CPU reference splits every block)",
            ));
        }
        let stream = gpu.stream().clone();
        let upload_bf16 = |rows: &[f32]| stream.clone_htod(&bf16_of(rows)).on_gpu(WHAT);
        let upload_f32 = |values: Vec<f32>| stream.clone_htod(&values).on_gpu(WHAT);
        let (hidden, q_dim, kv_dim, ffn) =
            (config.hidden, config.q_dim(), config.kv_dim(), config.ffn);
        let (q_rows, kv_rows) = (
            shard.q_rows(config.head_dim),
            shard.kv_rows(config.head_dim),
        );
        let matrix = |name: &str, rows, cols| weights.matrix(config, name, rows, cols);
        let vector = |name: &str, len| weights.vector(config, name, len);
        let mut layers = Vec::with_capacity(config.layers);
        for index in 0..config.layers {
            let name = |part: &str| format!("blk.{index}.{part}");
            let mut qkv = matrix_rows(
                &matrix(&name("attn_q.weight"), q_dim, hidden)?,
                q_rows.clone(),
            )
            .data;
            qkv.extend(
                matrix_rows(
                    &matrix(&name("attn_k.weight"), kv_dim, hidden)?,
                    kv_rows.clone(),
                )
                .data,
            );
            qkv.extend(
                matrix_rows(
                    &matrix(&name("attn_v.weight"), kv_dim, hidden)?,
                    kv_rows.clone(),
                )
                .data,
            );
            let qkv_bias = if config.architecture.qkv_bias() {
                let mut bias = vector(&name("attn_q.bias"), q_dim)?[q_rows.clone()].to_vec();
                bias.extend_from_slice(&vector(&name("attn_k.bias"), kv_dim)?[kv_rows.clone()]);
                bias.extend_from_slice(&vector(&name("attn_v.bias"), kv_dim)?[kv_rows.clone()]);
                Some(upload_f32(bias)?)
            } else {
                None
            };
            let mut gate_up = matrix_rows(
                &matrix(&name("ffn_gate.weight"), ffn, hidden)?,
                shard.ffn.clone(),
            )
            .data;
            gate_up.extend(
                matrix_rows(
                    &matrix(&name("ffn_up.weight"), ffn, hidden)?,
                    shard.ffn.clone(),
                )
                .data,
            );
            let o = matrix_columns(
                &matrix(&name("attn_output.weight"), hidden, q_dim)?,
                q_rows.clone(),
            );
            let down = matrix_columns(
                &matrix(&name("ffn_down.weight"), hidden, ffn)?,
                shard.ffn.clone(),
            );
            layers.push(GpuLayer {
                attn_norm: upload_f32(vector(&name("attn_norm.weight"), hidden)?)?,
                qkv: upload_bf16(&qkv)?,
                qkv_bias,
                o: upload_bf16(&o.data)?,
                ffn_norm: upload_f32(vector(&name("ffn_norm.weight"), hidden)?)?,
                gate_up: upload_bf16(&gate_up)?,
                down: upload_bf16(&down.data)?,
                qk_norm: None,
                post_attention_norm: None,
                post_ffn_norm: None,
            });
        }
        let embedding = matrix("token_embd.weight", config.vocab, hidden)?;
        let head = if config.tied_embeddings {
            matrix_rows(&embedding, shard.vocab.clone())
        } else {
            matrix_rows(
                &matrix("output.weight", config.vocab, hidden)?,
                shard.vocab.clone(),
            )
        };
        let weights = GpuWeights {
            embedding: upload_bf16(&embedding.data)?,
            layers,
            output_norm: upload_f32(vector("output_norm.weight", hidden)?)?,
            output: Some(upload_bf16(&head.data)?),
            inverse_frequencies: stream
                .clone_htod(&config.inverse_frequencies())
                .on_gpu(WHAT)?,
            local_inverse_frequencies: None,
        };
        GpuModel::new(gpu, &rank_config, weights)
    }

    /// Rank `rank` of `plan` with random weights (as [`GpuModel::synthetic`]): every rank
    /// draws the same embedding from `seed`, and its own slice of the output head.
    pub fn synthetic_shard(
        gpu: Arc<Gpu>,
        plan: &ShardPlan,
        rank: usize,
        seed: u64,
    ) -> Result<GpuModel> {
        const WHAT: &str = "generating a rank's random weights";
        let rank_config = plan.rank_config();
        rank_config.check_gpu_kernels("synthetic model")?;
        // Tied, so that no whole output head is drawn; the rank's slice is drawn below.
        let tied = crate::config::ModelConfig {
            tied_embeddings: true,
            ..rank_config.clone()
        };
        let stream = gpu.stream().clone();
        let mut weights = GpuWeights::synthetic(&gpu, &stream, &tied, seed)?;
        let rows = plan.shard(rank).vocab.len();
        let hidden = rank_config.hidden;
        let mut head = stream.alloc_zeros::<bf16>(rows * hidden).on_gpu(WHAT)?;
        let scale = (3.0 / hidden as f32).sqrt();
        let head_seed = seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(rank as u64 + 1));
        shadowkv::kernels::random::fill(&gpu, &stream, &mut head, head_seed, scale, 0.0)
            .on_gpu(WHAT)?;
        weights.output = Some(head);
        GpuModel::new(gpu, &rank_config, weights)
    }
}
