//! The tensor-parallel GPU driver: one thread per GPU, each rank a [`GpuModel`] over its
//! shard with its own caches (its own ShadowKV cache, copy stream and pinned values), joined
//! by an NCCL all-reduce after each attention and MLP block. The logits are gathered on the
//! host for sampling (the ranks are threads of one process).
use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};

use shadowkv::Gpu;

use super::nccl::{disable_nvls, new_id, NcclPartialSums};
use super::plan::{ShardPlan, TensorParallelError};
use crate::error::{Error, OnGpu, Result};
use crate::gpu::GpuModel;
use crate::weights::WeightFile;

/// Where the ranks' weights come from.
#[derive(Clone, Copy)]
pub enum ShardSource<'a> {
    /// A model file: each rank reads its slices.
    File(&'a WeightFile),
    /// Random weights from a seed ([`GpuModel::synthetic_shard`]).
    Synthetic { seed: u64 },
}

/// What a rank's work sees: its model and the gather of the logits.
pub struct RankContext<'a> {
    pub rank: usize,
    pub ranks: usize,
    /// The rank's model (its shard, on GPU `rank`).
    pub model: &'a GpuModel,
    /// The rows of the vocabulary its logits cover.
    pub vocab_rows: Range<usize>,
    gather: &'a HostGather,
}

/// The host-side gather of the ranks' logits.
struct HostGather {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
    vocab: usize,
}

impl RankContext<'_> {
    /// Gathers every rank's logits (`[rows, its vocabulary rows]`, from the same call on
    /// every rank) into `[rows, vocab]`, the same on every rank.
    pub fn gather_logits(&self, local: Vec<f32>) -> Vec<f32> {
        let gather = self.gather;
        let rows = local.len() / self.vocab_rows.len().max(1);
        gather.slots.lock().unwrap_or_else(|p| p.into_inner())[self.rank] = local;
        gather.barrier.wait();
        let whole = {
            let slots = gather.slots.lock().unwrap_or_else(|p| p.into_inner());
            let mut whole = Vec::with_capacity(rows * gather.vocab);
            for row in 0..rows {
                for slot in slots.iter() {
                    let width = slot.len() / rows.max(1);
                    whole.extend_from_slice(&slot[row * width..(row + 1) * width]);
                }
            }
            whole
        };
        // Nobody refills a slot before every rank has read them all.
        gather.barrier.wait();
        whole
    }

    /// The most likely token of each row of the gathered logits.
    pub fn greedy(&self, local: Vec<f32>) -> Vec<u32> {
        let vocab = self.gather.vocab;
        self.gather_logits(local)
            .chunks_exact(vocab)
            .map(|row| {
                let best = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1));
                best.map_or(0, |(i, _)| i as u32)
            })
            .collect()
    }
}

/// Checks that the host has the GPUs `plan` needs: an error naming how many there are.
pub fn check_gpus(plan: &ShardPlan) -> Result<()> {
    // No driver or no device counts as none present: the error says how many are needed.
    let present = shadowkv::probe().unwrap_or(0);
    if present < plan.ranks {
        return Err(TensorParallelError::FewerGpus {
            ranks: plan.ranks,
            present,
        }
        .into());
    }
    Ok(())
}

/// Runs `work` on every rank of `plan`, rank `r` on GPU `r` in its own thread, after loading
/// its shard from `source` and (more than one rank) joining the NCCL communicator; returns
/// each rank's result in rank order. `work` must make the same model calls on every rank in
/// the same order (the all-reduces inside them pair up across the ranks).
pub fn run_ranks<R: Send>(
    plan: &ShardPlan,
    source: ShardSource<'_>,
    work: impl Fn(&RankContext<'_>) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    check_gpus(plan)?;
    let ranks = plan.ranks;
    let id = if ranks > 1 {
        disable_nvls();
        Some(new_id()?)
    } else {
        None
    };
    let gather = HostGather {
        barrier: Barrier::new(ranks),
        slots: Mutex::new(vec![Vec::new(); ranks]),
        vocab: plan.config.vocab,
    };
    // Every rank loads before any joins the communicator: a rank that cannot load makes all
    // of them stop, instead of leaving the others waiting for it in NCCL.
    let loaded = Barrier::new(ranks);
    let failed = Mutex::new(false);
    let results: Vec<Result<R>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..ranks)
            .map(|rank| {
                let (gather, loaded, failed, work, id) = (&gather, &loaded, &failed, &work, &id);
                scope.spawn(move || -> Result<R> {
                    let model = (|| -> Result<GpuModel> {
                        let gpu = Arc::new(Gpu::new(rank).on_gpu("opening a rank's GPU")?);
                        // Before any pinned allocation: the values go to this GPU's node.
                        super::numa::run_near(&gpu);
                        match source {
                            ShardSource::File(file) => GpuModel::load_shard(gpu, plan, rank, file),
                            ShardSource::Synthetic { seed } => {
                                GpuModel::synthetic_shard(gpu, plan, rank, seed)
                            }
                        }
                    })();
                    if model.is_err() {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = true;
                    }
                    loaded.wait();
                    let mut model = model?;
                    if *failed.lock().unwrap_or_else(|p| p.into_inner()) {
                        return Err(Error::TensorParallel(TensorParallelError::Nccl {
                            what: "starting",
                            reason: "another rank could not load its shard".into(),
                        }));
                    }
                    if let Some(id) = id {
                        let stream = model.gpu().stream().clone();
                        let sums = NcclPartialSums::join(stream, rank, ranks, id)?;
                        model.set_partial_sums(Arc::new(sums));
                    }
                    let context = RankContext {
                        rank,
                        ranks,
                        model: &model,
                        vocab_rows: plan.shard(rank).vocab,
                        gather,
                    };
                    work(&context)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, handle)| {
                handle
                    .join()
                    .unwrap_or(Err(TensorParallelError::RankLost { rank }.into()))
            })
            .collect()
    });
    results.into_iter().collect()
}
