//! `shadowkv plan`: the largest batch each attention mode fits for a model and a context
//! length, from the GPU's free memory and the host's available memory (or sizes given).
use clap::Args;
use shadowkv::cache::{CacheShape, ShadowKvCache, ValueFormat, ValueHome};
use shadowkv_model::prefill_memory::DEFAULT_PASS_TOKENS;
use shadowkv_model::tp::ShardPlan;
use shadowkv_model::{ModelConfig, ModelSource, PrefillMemory, ShadowKvParams, NAMED_SHAPES};

use crate::args::{AttentionMode, ShadowKvArgs};

/// GPU bytes kept back beside the weights and the cache: the cuBLAS workspace, a decode
/// step's activations and logits, the allocator's slack.
pub const GPU_RESERVE_BYTES: u64 = 1 << 30;
/// Host bytes kept back from what the system says is available (the process itself, the
/// model files' page cache).
pub const HOST_RESERVE_BYTES: u64 = 4 << 30;

#[derive(Args, Debug)]
pub struct PlanArgs {
    /// A named shape (llama-3-8b, llama-3-70b, llama-3.1-8b, yi-9b, qwen2-7b, glm-4-9b,
    /// phi-3-mini, smollm2-135m, gemma-3-270m, gemma-3-1b), or a .gguf
    /// file / Hugging Face folder (only its config is read).
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// Tokens of context per sequence.
    #[arg(long, default_value_t = 122_880)]
    context: usize,
    /// Tokens each sequence may generate after its context.
    #[arg(long, default_value_t = 256)]
    generated: usize,
    /// Only this mode (default: all three; the ShadowKV modes in each value format unless
    /// --value-format names one).
    #[arg(long, value_enum)]
    attention: Option<AttentionMode>,
    /// GPU memory to plan for, in GiB (default: the free memory of GPU 0).
    #[arg(long)]
    gpu_gib: Option<f64>,
    /// Pinned host memory to plan for, in GiB (default: the available memory less 4 GiB).
    #[arg(long)]
    host_gib: Option<f64>,
    /// Tensor parallelism over this many GPUs: the plan of one rank (its share of the
    /// weights, its KV heads' cache in --gpu-gib, its share of the host memory); the batch is
    /// the whole model's. Needs no GPU with --gpu-gib.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    #[command(flatten)]
    shadowkv: ShadowKvArgs,
}

/// The memory a plan is made for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// GPU bytes for the weights, the cache and [`GPU_RESERVE_BYTES`].
    pub gpu_bytes: u64,
    /// Pinned host bytes for ShadowKV's values.
    pub host_bytes: u64,
}

impl Budget {
    /// The sizes given (GiB), else GPU 0's free memory and the host's available memory.
    pub fn measure(gpu_gib: Option<f64>, host_gib: Option<f64>) -> Result<Budget, String> {
        let gpu_bytes = match gpu_gib {
            Some(g) if g.is_finite() && g > 0.0 => gib(g),
            Some(g) => return Err(format!("--gpu-gib is {g}: a positive size")),
            None => {
                let gpu = shadowkv::Gpu::new(0).map_err(|e| {
                    format!("no GPU to measure ({e}): give --gpu-gib (and --host-gib)")
                })?;
                return Budget::for_gpu(&gpu, host_gib);
            }
        };
        Ok(Budget {
            gpu_bytes,
            host_bytes: host_budget(host_gib)?,
        })
    }

    /// `gpu`'s free memory now, and the host's as [`measure`](Self::measure) takes it.
    pub fn for_gpu(gpu: &shadowkv::Gpu, host_gib: Option<f64>) -> Result<Budget, String> {
        let (free, _) = gpu
            .context()
            .mem_get_info()
            .map_err(|e| format!("reading the GPU's free memory: {e}"))?;
        Ok(Budget {
            gpu_bytes: free as u64,
            host_bytes: host_budget(host_gib)?,
        })
    }
}

/// Host bytes: `host_gib` if given, else the available memory less [`HOST_RESERVE_BYTES`].
fn host_budget(host_gib: Option<f64>) -> Result<u64, String> {
    match host_gib {
        Some(g) if g.is_finite() && g >= 0.0 => Ok(gib(g)),
        Some(g) => Err(format!("--host-gib is {g}: a size of at least 0")),
        None => Ok(shadowkv::cache::host_available_bytes()
            .ok_or("the host's available memory is unknown: give --host-gib")?
            .saturating_sub(HOST_RESERVE_BYTES)),
    }
}

/// Bytes in `gib` GiB.
fn gib(gib: f64) -> u64 {
    (gib * (1u64 << 30) as f64) as u64
}

/// The largest batch of one mode and what stops it growing.
#[derive(Clone, Debug, PartialEq)]
pub struct ModeFit {
    pub mode: AttentionMode,
    /// How ShadowKV stores the values (bf16 for full attention).
    pub format: ValueFormat,
    /// Sequences that fit (0: not even one).
    pub batch: usize,
    /// What limits the batch ("GPU memory: ...", "host memory: ...").
    pub limit: String,
    /// GPU and host bytes of the cache at that batch.
    pub cache_gpu_bytes: u64,
    pub cache_host_bytes: u64,
}

/// The cache's view of a model's attention shape: its global layers (a model's
/// sliding-window layers keep their full keys and values beside the shadow cache, counted by
/// [`ModelConfig::local_kv_bytes`]).
pub fn cache_shape(config: &ModelConfig) -> CacheShape {
    config.shadow_cache_shape()
}

/// bf16 weight bytes of a model on the GPU (every parameter once).
pub fn weight_bytes(config: &ModelConfig) -> u64 {
    config.parameters() as u64 * 2
}

/// The model's config: a named shape, or a model file's / folder's.
pub fn model_config(model: &str) -> Result<ModelConfig, Box<dyn std::error::Error>> {
    if NAMED_SHAPES.contains(&model) {
        Ok(ModelConfig::named(model)?)
    } else {
        Ok(ModelSource::open(std::path::Path::new(model))?.config)
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// The largest batch of `mode` (ShadowKV's values in `format`) for `context` tokens per
/// sequence plus `generated`, in `budget` after the weights and [`GPU_RESERVE_BYTES`]. A
/// ShadowKV prefill (layer-wise, in passes of [`DEFAULT_PASS_TOKENS`]) also holds one prompt's
/// hidden states, about two layers' K/V of it and a pass's activations while it builds the
/// shadow: [`prefill_transient_bytes`].
#[allow(clippy::too_many_arguments)]
pub fn fit(
    config: &ModelConfig,
    params: &ShadowKvParams,
    mode: AttentionMode,
    format: ValueFormat,
    context: usize,
    generated: usize,
    budget: Budget,
) -> Result<ModeFit, Box<dyn std::error::Error>> {
    let weights = weight_bytes(config);
    fit_beside(
        config, weights, params, mode, format, context, generated, budget,
    )
}

/// [`fit`] beside `weights` bytes of weights: a tensor-parallel rank's plan has `config` its
/// rank's shape ([`ShardPlan::rank_config`]) and `weights` its share.
#[allow(clippy::too_many_arguments)]
pub fn fit_beside(
    config: &ModelConfig,
    weights: u64,
    params: &ShadowKvParams,
    mode: AttentionMode,
    format: ValueFormat,
    context: usize,
    generated: usize,
    budget: Budget,
) -> Result<ModeFit, Box<dyn std::error::Error>> {
    let room = budget.gpu_bytes.saturating_sub(weights + GPU_RESERVE_BYTES);
    let kv_row = config.kv_dim() as u64 * 2;
    let Some(home) = mode.value_home() else {
        let per_sequence = 2 * config.layers as u64 * kv_row * (context + generated) as u64;
        let batch = (room / per_sequence.max(1)) as usize;
        return Ok(ModeFit {
            mode,
            format: ValueFormat::Bf16,
            batch,
            limit: format!(
                "GPU memory: {:.2} GiB of KV cache per sequence in {:.2} GiB left after {:.2} GiB of weights",
                per_sequence as f64 / GIB,
                room as f64 / GIB,
                weights as f64 / GIB
            ),
            cache_gpu_bytes: per_sequence * batch as u64,
            cache_host_bytes: 0,
        });
    };
    let shape = cache_shape(config);
    let transient = prefill_transient_bytes(config, context);
    let gpu_room = room.saturating_sub(transient);
    let host = if home.on_host() {
        budget.host_bytes
    } else {
        u64::MAX
    };
    let storage = home.with_format(format);
    // The sliding-window layers' full keys and values, per sequence, beside the cache.
    let local = config.local_kv_bytes(context + generated);
    let plan = ShadowKvCache::plan(&shape, params, storage, context, generated, gpu_room, host)?;
    let memory = |n: usize| {
        ShadowKvCache::memory_for(
            &shape,
            params,
            storage,
            &shadowkv::cache::CacheCapacity::uniform(n.max(1), context, generated),
        )
    };
    let gpu_bytes = |n: usize| -> Result<u64, Box<dyn std::error::Error>> {
        Ok(memory(n)?.gpu_bytes() + n.max(1) as u64 * local)
    };
    // The cache alone fits `plan.sequences`; with the local layers, the largest batch at most
    // that whose GPU bytes fit (they grow with the batch).
    let (mut low, mut high) = (0usize, plan.sequences + 1);
    while low + 1 < high {
        let middle = (low + high) / 2;
        if gpu_bytes(middle)? <= gpu_room {
            low = middle;
        } else {
            high = middle;
        }
    }
    let batch = low;
    let next = memory(batch + 1)?;
    let at = memory(batch)?;
    let local_note = match local {
        0 => String::new(),
        _ => format!(
            " (with {:.2} GiB per sequence of the sliding-window layers' keys and values)",
            local as f64 / GIB
        ),
    };
    let limit = if gpu_bytes(batch + 1)? > gpu_room {
        format!(
            "GPU memory: {} sequences take {:.2} GiB{local_note} of the {:.2} GiB left after {:.2} GiB of weights and the prefill's {:.2} GiB",
            batch + 1,
            gpu_bytes(batch + 1)? as f64 / GIB,
            gpu_room as f64 / GIB,
            weights as f64 / GIB,
            transient as f64 / GIB
        )
    } else {
        format!(
            "host memory: {} sequences pin {:.2} GiB of {} values, {:.2} GiB available",
            batch + 1,
            next.host_bytes() as f64 / GIB,
            format.name(),
            budget.host_bytes as f64 / GIB
        )
    };
    Ok(ModeFit {
        mode,
        format,
        batch,
        limit,
        cache_gpu_bytes: if batch == 0 {
            0
        } else {
            at.gpu_bytes() + batch as u64 * local
        },
        cache_host_bytes: if batch == 0 { 0 } else { at.host_bytes() },
    })
}

/// The largest ShadowKV batch (values on the host in one format) beside a GPU value tier, and
/// the tier's size per (sequence, KV head).
#[derive(Clone, Debug, PartialEq)]
pub struct TierFit {
    /// The batch, sized for the GPU memory less the tier.
    pub fit: ModeFit,
    /// Chunks the tier holds per (sequence, KV head) and layer at that batch.
    pub chunks_per_head: usize,
    /// Chunks of one prompt per KV head (what a tier holding everything takes).
    pub prompt_chunks: usize,
}

/// [`fit`] for ShadowKV with the values on the host in `format` and a GPU value tier of
/// `tier_bytes` taken from `budget`'s GPU memory first. An error, saying how large a tier
/// fits beside one sequence, when the tier leaves no room for one.
#[allow(clippy::too_many_arguments)]
pub fn tier_fit(
    config: &ModelConfig,
    params: &ShadowKvParams,
    format: ValueFormat,
    context: usize,
    generated: usize,
    budget: Budget,
    tier_bytes: u64,
) -> Result<TierFit, Box<dyn std::error::Error>> {
    let mode = AttentionMode::Shadowkv;
    let reduced = Budget {
        gpu_bytes: budget.gpu_bytes.saturating_sub(tier_bytes),
        ..budget
    };
    let fit = fit(config, params, mode, format, context, generated, reduced)?;
    if fit.batch == 0 {
        // What one sequence leaves: the budget less the weights, the reserve, the prefill and
        // one sequence's cache.
        let shape = cache_shape(config);
        let one = ShadowKvCache::memory_for(
            &shape,
            params,
            ValueHome::Host.with_format(format),
            &shadowkv::cache::CacheCapacity::uniform(1, context, generated),
        )?
        .gpu_bytes()
            + config.local_kv_bytes(context + generated);
        let used = weight_bytes(config)
            + GPU_RESERVE_BYTES
            + prefill_transient_bytes(config, context)
            + one;
        let left = budget.gpu_bytes.saturating_sub(used);
        return Err(format!(
            "a {:.2} GiB value tier does not fit: beside one sequence of {context} tokens \
             ({} values) at most {:.2} GiB are left for it",
            tier_bytes as f64 / GIB,
            format.name(),
            left as f64 / GIB
        )
        .into());
    }
    let shape = cache_shape(config);
    let capacity = shadowkv::cache::CacheCapacity::uniform(fit.batch, context, generated);
    let storage = ValueHome::Host.with_format(format);
    let chunks_per_head =
        shadowkv::cache::tier_chunks_for(&shape, params, storage, &capacity, tier_bytes)?;
    Ok(TierFit {
        fit,
        chunks_per_head,
        prompt_chunks: params.prompt_chunks(context),
    })
}

/// What a layer-wise ShadowKV prefill of a `context`-token prompt holds on the GPU beyond the
/// weights and the cache it fills ([`PrefillMemory::layerwise`]'s transient part).
pub fn prefill_transient_bytes(config: &ModelConfig, context: usize) -> u64 {
    PrefillMemory::layerwise(config, 0, context, DEFAULT_PASS_TOKENS).transient()
}

/// Every mode (or only `only`), the ShadowKV modes in each of `formats`, for the `plan`
/// command.
#[allow(clippy::too_many_arguments)]
pub fn fits(
    config: &ModelConfig,
    weights: u64,
    params: &ShadowKvParams,
    only: Option<AttentionMode>,
    formats: &[ValueFormat],
    context: usize,
    generated: usize,
    budget: Budget,
) -> Result<Vec<ModeFit>, Box<dyn std::error::Error>> {
    let modes = [
        AttentionMode::Full,
        AttentionMode::Shadowkv,
        AttentionMode::ShadowkvGpu,
    ];
    let mut out = Vec::new();
    for mode in modes.into_iter().filter(|m| only.is_none_or(|o| o == *m)) {
        let mode_formats = match mode {
            AttentionMode::Full => &[ValueFormat::Bf16][..],
            _ => formats,
        };
        for &format in mode_formats {
            out.push(fit_beside(
                config, weights, params, mode, format, context, generated, budget,
            )?);
        }
    }
    Ok(out)
}

/// One rank's view of a model split over `gpus` GPUs: its shape, its weight bytes and its
/// budget (each GPU's memory whole, the host's memory shared evenly). One GPU: the model.
pub fn rank_view(
    config: &ModelConfig,
    gpus: usize,
    budget: Budget,
) -> Result<(ModelConfig, u64, Budget), Box<dyn std::error::Error>> {
    let plan = ShardPlan::new(config, gpus)?;
    if gpus == 1 {
        return Ok((config.clone(), weight_bytes(config), budget));
    }
    let rank_budget = Budget {
        host_bytes: budget.host_bytes / gpus as u64,
        ..budget
    };
    Ok((
        plan.rank_config(),
        plan.rank_parameters() as u64 * 2,
        rank_budget,
    ))
}

/// A mode's name as the tables print it.
pub fn mode_label(mode: AttentionMode) -> &'static str {
    match mode {
        AttentionMode::Full => "full attention",
        AttentionMode::Shadowkv => "ShadowKV, values on host",
        AttentionMode::ShadowkvGpu => "ShadowKV, values on GPU",
    }
}

pub fn run(args: PlanArgs) -> Result<(), Box<dyn std::error::Error>> {
    let whole = model_config(&args.model)?;
    let params = args.shadowkv.params();
    // The split is checked before the GPU is measured: it is arithmetic.
    ShardPlan::new(&whole, args.gpus)?;
    if args.gpus > 1 && args.shadowkv.value_tier_bytes()?.is_some() {
        return Err("--value-tier-gib is planned for one GPU; leave out --gpus".into());
    }
    let (config, weights, budget) = rank_view(
        &whole,
        args.gpus,
        Budget::measure(args.gpu_gib, args.host_gib)?,
    )?;
    if args.gpus > 1 && params.rank > config.kv_dim() {
        return Err(format!(
            "--rank {} is past a rank's keys: each of the {} GPUs factorises its {} KV heads' \
             keys, {} wide; give --rank {} or less",
            params.rank,
            args.gpus,
            config.kv_heads,
            config.kv_dim(),
            config.kv_dim()
        )
        .into());
    }
    if args.gpus > 1 {
        println!(
            "tensor parallelism over {} GPUs: each rank holds {} of {} heads, {} of {} KV heads, {} of {} MLP columns; per rank:",
            args.gpus,
            config.heads,
            whole.heads,
            config.kv_heads,
            whole.kv_heads,
            config.ffn,
            whole.ffn
        );
    }
    println!(
        "{} at {} tokens of context (+{} generated): {:.2} GiB GPU ({:.2} GiB of bf16 weights, {:.2} GiB kept back), {:.2} GiB pinned host",
        args.model,
        args.context,
        args.generated,
        budget.gpu_bytes as f64 / GIB,
        weights as f64 / GIB,
        GPU_RESERVE_BYTES as f64 / GIB,
        budget.host_bytes as f64 / GIB
    );
    for fit in fits(
        &config,
        weights,
        &params,
        args.attention,
        &args.shadowkv.value_formats(),
        args.context,
        args.generated,
        budget,
    )? {
        let format = match fit.mode {
            AttentionMode::Full => String::new(),
            _ => format!(", {}", fit.format.name()),
        };
        println!(
            "  {:<32} batch {:>4}  (cache {:.2} GiB GPU, {:.2} GiB host); limit: {}",
            format!("{}{format}", mode_label(fit.mode)),
            fit.batch,
            fit.cache_gpu_bytes as f64 / GIB,
            fit.cache_host_bytes as f64 / GIB,
            fit.limit
        );
    }
    if let Some(tier_bytes) = args.shadowkv.value_tier_bytes()? {
        let modes_on_host = args
            .attention
            .is_none_or(|mode| mode == AttentionMode::Shadowkv);
        if !modes_on_host {
            return Err(
                "--value-tier-gib needs the values on the host (--attention shadowkv)".into(),
            );
        }
        for format in args.shadowkv.value_formats() {
            let tier = tier_fit(
                &config,
                &params,
                format,
                args.context,
                args.generated,
                budget,
                tier_bytes,
            )?;
            println!(
                "  {:<32} batch {:>4}  (cache {:.2} GiB GPU with a {:.2} GiB value tier of {} chunks per KV head, {:.1}% of a prompt's, {:.2} GiB host); limit: {}",
                format!("ShadowKV, host + tier, {}", format.name()),
                tier.fit.batch,
                (tier.fit.cache_gpu_bytes + tier_bytes) as f64 / GIB,
                tier_bytes as f64 / GIB,
                tier.chunks_per_head,
                100.0 * tier.chunks_per_head as f64 / tier.prompt_chunks.max(1) as f64,
                tier.fit.cache_host_bytes as f64 / GIB,
                tier.fit.limit
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowkv::cache::CacheCapacity;

    #[test]
    fn plans_llama_3_8b_on_an_h200_without_a_gpu() {
        let config = ModelConfig::named("llama-3-8b").unwrap();
        let budget = Budget::measure(Some(139.0), Some(1000.0)).unwrap();
        let fits = fits(
            &config,
            weight_bytes(&config),
            &ShadowKvParams::default(),
            None,
            &[ValueFormat::Bf16],
            122_880,
            256,
            budget,
        )
        .unwrap();
        let batch = |mode| fits.iter().find(|f| f.mode == mode).unwrap().batch;
        // 15 GiB of weights, 15.03 GiB of KV cache per sequence: 8 in the 123 GiB left.
        assert_eq!(batch(AttentionMode::Full), 8);
        assert!(batch(AttentionMode::ShadowkvGpu) > batch(AttentionMode::Full));
        assert!(batch(AttentionMode::Shadowkv) > batch(AttentionMode::ShadowkvGpu));
        for fit in &fits {
            assert!(fit.limit.starts_with("GPU memory"), "{fit:?}");
        }
        // Little host memory: the values on the host limit the batch.
        let small = Budget::measure(Some(139.0), Some(40.0)).unwrap();
        let host = fit(
            &config,
            &ShadowKvParams::default(),
            AttentionMode::Shadowkv,
            ValueFormat::Bf16,
            122_880,
            256,
            small,
        )
        .unwrap();
        assert!(host.limit.starts_with("host memory"), "{host:?}");
        assert!(host.cache_host_bytes <= 40 << 30);
    }

    /// Llama-3-70B does not fit one 80 GiB GPU in bf16; split over 4 each rank holds a
    /// quarter of the weights and of the KV heads, and the batch grows with the split.
    #[test]
    fn plans_llama_3_70b_over_several_gpus_without_a_gpu() {
        let config = ModelConfig::named("llama-3-70b").unwrap();
        let params = ShadowKvParams {
            rank: 128,
            ..ShadowKvParams::default()
        };
        let budget = Budget::measure(Some(80.0), Some(1000.0)).unwrap();
        let batch = |gpus: usize, mode| {
            let (rank, weights, rank_budget) = rank_view(&config, gpus, budget).unwrap();
            fit_beside(
                &rank,
                weights,
                &params,
                mode,
                ValueFormat::Bf16,
                32_768,
                256,
                rank_budget,
            )
            .unwrap()
            .batch
        };
        assert_eq!(batch(1, AttentionMode::Full), 0);
        let (rank, weights, _) = rank_view(&config, 4, budget).unwrap();
        assert_eq!((rank.heads, rank.kv_heads, rank.ffn), (16, 2, 7168));
        // A quarter of 141 GB of weights, the whole embedding beside them (2.1 GB).
        assert!(
            (36_500_000_000..37_000_000_000).contains(&weights),
            "{weights}"
        );
        for mode in [AttentionMode::Full, AttentionMode::Shadowkv] {
            assert!(batch(4, mode) > 0);
            assert!(batch(8, mode) > batch(4, mode), "{mode:?}");
        }
        assert!(batch(4, AttentionMode::Shadowkv) > batch(4, AttentionMode::Full));
        let error = rank_view(&ModelConfig::named("smollm2-135m").unwrap(), 2, budget)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("3 KV heads cannot be split evenly over 2 GPUs"),
            "{error}"
        );
    }

    /// A value tier comes out of the batch's GPU memory; one that leaves no room for a
    /// sequence says how large a tier fits.
    #[test]
    fn a_value_tier_takes_gpu_memory_from_the_batch() {
        let config = ModelConfig::named("llama-3-8b").unwrap();
        let params = ShadowKvParams::default();
        let budget = Budget::measure(Some(139.0), Some(1000.0)).unwrap();
        let (context, generated) = (122_880, 256);
        let plain = fit(
            &config,
            &params,
            AttentionMode::Shadowkv,
            ValueFormat::Int4,
            context,
            generated,
            budget,
        )
        .unwrap();
        let tier = tier_fit(
            &config,
            &params,
            ValueFormat::Int4,
            context,
            generated,
            budget,
            20 << 30,
        )
        .unwrap();
        assert!(tier.fit.batch < plain.batch, "{tier:?} {plain:?}");
        assert!(tier.fit.batch > 0);
        assert!(tier.chunks_per_head > 0 && tier.chunks_per_head <= tier.prompt_chunks);
        assert!(tier.fit.cache_gpu_bytes + (20 << 30) <= budget.gpu_bytes);
        let error = tier_fit(
            &config,
            &params,
            ValueFormat::Int4,
            context,
            generated,
            budget,
            130 << 30,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("does not fit") && error.contains("are left for it"),
            "{error}"
        );
    }

    #[test]
    fn shadowkv_batches_leave_room_for_the_layerwise_prefill() {
        let config = ModelConfig::named("llama-3-8b").unwrap();
        let params = ShadowKvParams::default();
        let (context, generated) = (122_880, 256);
        let transient = prefill_transient_bytes(&config, context);
        let memory = PrefillMemory::layerwise(&config, weight_bytes(&config), context, 2048);
        assert_eq!(transient, memory.bound() - weight_bytes(&config));
        // Hidden states (2.01 GB), two layers' K/V (1.01 GB) and a pass's activations.
        assert!(
            (3_000_000_000..3_800_000_000).contains(&transient),
            "{transient}"
        );
        let budget = Budget::measure(Some(139.0), Some(1000.0)).unwrap();
        for mode in [AttentionMode::Shadowkv, AttentionMode::ShadowkvGpu] {
            let fit = fit(
                &config,
                &params,
                mode,
                ValueFormat::Bf16,
                context,
                generated,
                budget,
            )
            .unwrap();
            let used = weight_bytes(&config) + GPU_RESERVE_BYTES + transient;
            // The batch and its prefill fit; one more sequence would not.
            assert!(fit.cache_gpu_bytes + used <= budget.gpu_bytes, "{fit:?}");
            let shape = cache_shape(&config);
            let home = mode.value_home().unwrap();
            let capacity = CacheCapacity::uniform(fit.batch + 1, context, generated);
            let next = ShadowKvCache::memory_for(&shape, &params, home, &capacity).unwrap();
            assert!(next.gpu_bytes() + used > budget.gpu_bytes, "{fit:?}");
            let prefill = format!("the prefill's {:.2} GiB", transient as f64 / GIB);
            assert!(fit.limit.contains(&prefill), "{}", fit.limit);
        }
    }

    /// Gemma-3's sliding-window layers keep full keys and values per sequence beside the
    /// shadow cache of its global layers: a ShadowKV batch counts both.
    #[test]
    fn gemma_batches_count_the_sliding_window_layers() {
        let config = ModelConfig::named("gemma-3-270m").unwrap();
        let (local_layers, global_layers) = (config.local_layers(), config.global_layers());
        assert_eq!((local_layers, global_layers), (15, 3));
        let params = ShadowKvParams::default();
        let (context, generated) = (32_768, 259);
        let shape = cache_shape(&config);
        assert_eq!(shape.layers, 3);
        let local = config.local_kv_bytes(context + generated);
        assert_eq!(
            local,
            15 * 2 * (config.kv_dim() * (context + generated)) as u64 * 2
        );
        assert_eq!(
            ModelConfig::named("llama-3-8b")
                .unwrap()
                .local_kv_bytes(context),
            0
        );
        let budget = Budget::measure(Some(12.0), Some(1000.0)).unwrap();
        let used =
            weight_bytes(&config) + GPU_RESERVE_BYTES + prefill_transient_bytes(&config, context);
        for mode in [AttentionMode::Shadowkv, AttentionMode::ShadowkvGpu] {
            let fit = fit(
                &config,
                &params,
                mode,
                ValueFormat::Bf16,
                context,
                generated,
                budget,
            )
            .unwrap();
            let home = mode.value_home().unwrap();
            let cache = |n: usize| {
                let capacity = CacheCapacity::uniform(n, context, generated);
                ShadowKvCache::memory_for(&shape, &params, home, &capacity)
                    .unwrap()
                    .gpu_bytes()
                    + n as u64 * local
            };
            assert!(fit.batch > 1, "{fit:?}");
            assert_eq!(fit.cache_gpu_bytes, cache(fit.batch), "{fit:?}");
            // The batch, its local layers and its prefill fit; one more sequence would not.
            assert!(cache(fit.batch) + used <= budget.gpu_bytes, "{fit:?}");
            assert!(cache(fit.batch + 1) + used > budget.gpu_bytes, "{fit:?}");
            assert!(fit.limit.contains("sliding-window"), "{}", fit.limit);
            // Without the local layers' keys and values the same memory would hold more.
            let room = budget.gpu_bytes - used;
            let shadow_only = ShadowKvCache::plan(
                &shape,
                &params,
                home,
                context,
                generated,
                room,
                budget.host_bytes,
            )
            .unwrap();
            assert!(shadow_only.sequences > fit.batch, "{fit:?}");
        }
    }
}
