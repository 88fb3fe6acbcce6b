//! `shadowkv bench --gpus N`: the same timed decode with the model split over N GPUs of the
//! host, one thread per GPU, each rank running the one-GPU bench on its shard in step with the
//! others (their NCCL all-reduces pair up). Rank 0 reports.
//!
//! Each rank's greedy step picks the best token of its own vocabulary slice (the timed step
//! keeps its argmax on the GPU); the tokens only steer the timing, never a result, so no
//! gather is timed. `shadowkv generate --gpus N` gathers the logits before sampling.
use shadowkv::cache::CacheCapacity;
use shadowkv_model::tp::{run_ranks, ShardPlan, ShardSource};
use shadowkv_model::{ModelConfig, ModelSource, NAMED_SHAPES};

use super::{report, run_full, run_shadowkv, BenchArgs, RateTime, Run, OVERHEAD_TOKENS};
use crate::plan::{fit_beside, model_config, rank_view};

pub fn run(mut args: BenchArgs) -> Result<(), Box<dyn std::error::Error>> {
    let config = model_config(&args.model)?;
    let plan = ShardPlan::new(&config, args.gpus)?;
    shadowkv_model::tp::gpu::check_gpus(&plan)?;
    let rank_config = plan.rank_config();
    rank_config.check_gpu_kernels(&format!("a rank of model `{}`", args.model))?;
    if args.attention.value_home().is_some() {
        shadowkv_model::cpu::shadowkv::validate(&args.shadowkv.params(), &rank_config).map_err(
            |e| {
                format!(
                    "each of the {} GPUs holds {} KV heads: {e}",
                    args.gpus, rank_config.kv_heads
                )
            },
        )?;
    }
    if args.batch.is_none() {
        let gpu = shadowkv::Gpu::new(0)?;
        let budget = args.batch_budget(&gpu)?;
        drop(gpu);
        let (rank, weights, rank_budget) = rank_view(&config, args.gpus, budget)?;
        let fit = fit_beside(
            &rank,
            weights,
            &args.shadowkv.params(),
            args.attention,
            args.shadowkv.value_format(),
            args.context,
            args.steps + 3 + OVERHEAD_TOKENS,
            rank_budget,
        )?;
        if fit.batch == 0 {
            return Err(format!("not even one sequence fits a rank: {}", fit.limit).into());
        }
        eprintln!(
            "batch {} (the largest a rank fits; {})",
            fit.batch, fit.limit
        );
        args.batch = Some(fit.batch);
    }
    let run = args.run_of(args.batch.unwrap_or(1));
    let opened;
    let source = if NAMED_SHAPES.contains(&args.model.as_str()) {
        eprintln!(
            "model {} (SYNTHETIC random weights), {:.2}B parameters over {} GPUs",
            args.model,
            config.parameters() as f64 / 1e9,
            args.gpus
        );
        ShardSource::Synthetic { seed: args.seed }
    } else {
        opened = ModelSource::open(std::path::Path::new(&args.model))?;
        ShardSource::File(&opened.weights)
    };
    let per_rank = run_ranks(&plan, source, |context| {
        let model = context.model;
        if context.rank == 0 {
            eprintln!(
                "rank 0 of {}: {:.2} GB of weights on {}",
                context.ranks,
                model.weight_bytes() as f64 / 1e9,
                model.gpu().info().name
            );
        }
        Ok(time_rank(&args, &run, &model.config, model).map_err(|e| e.to_string()))
    })?;
    let mut results = Vec::new();
    for (rank, result) in per_rank.into_iter().enumerate() {
        let result = result.map_err(|e| format!("rank {rank}: {e}"))?;
        if rank == 0 {
            results = result;
        }
    }
    for (rate, per_step) in results {
        report(args.attention, rate, &run, per_step);
    }
    println!(
        "  tensor parallelism: {} GPUs, per rank {} heads / {} KV heads / {} MLP columns",
        args.gpus, rank_config.heads, rank_config.kv_heads, rank_config.ffn
    );
    Ok(())
}

/// One rank's timed run: seconds per step for each scripted hit rate (full attention: one).
fn time_rank(
    args: &BenchArgs,
    run: &Run,
    rank_config: &ModelConfig,
    model: &shadowkv_model::GpuModel,
) -> Result<Vec<RateTime>, Box<dyn std::error::Error>> {
    match args.attention.value_home() {
        Some(home) => {
            let shape = crate::plan::cache_shape(rank_config);
            let capacity = CacheCapacity::uniform(run.batch, run.context, 0);
            let storage = args.shadowkv.storage_for(home, &shape, &capacity)?;
            run_shadowkv(
                run,
                model,
                args.shadowkv.params(),
                storage,
                &[args.hit_rate],
            )
        }
        None => Ok(vec![(None, run_full(run, model)?)]),
    }
}
