//! The chunked prefill over the full KV cache and its progress bar, shared by `shadowkv
//! generate` and `shadowkv bench`; `shadowkv prefill-peak`, the peak GPU memory of a ShadowKV
//! prefill.
use std::sync::Arc;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::cache::CacheCapacity;
use shadowkv_model::{GpuKvCache, GpuModel, PrefillMemory};

use crate::args::{AttentionMode, ShadowKvArgs};

/// Tokens per prefill pass, so a long prompt shows progress and bounds its activations.
pub const PREFILL_CHUNK: usize = shadowkv_model::prefill_memory::DEFAULT_PASS_TOKENS;

/// Runs `tokens` of `sequence` in passes of [`PREFILL_CHUNK`], advancing `bar` (if any);
/// returns the last token's logits.
pub fn prefill(
    model: &GpuModel,
    cache: &mut GpuKvCache,
    sequence: usize,
    tokens: &[u32],
    bar: Option<&ProgressBar>,
) -> shadowkv_model::Result<Vec<f32>> {
    let mut logits = Vec::new();
    for chunk in tokens.chunks(PREFILL_CHUNK) {
        logits = model.forward(cache, &vec![sequence; chunk.len()], chunk)?;
        if let Some(bar) = bar {
            bar.inc(chunk.len() as u64);
        }
    }
    Ok(logits)
}

/// A progress bar over `tokens` prompt tokens.
pub fn prefill_bar(tokens: usize) -> ProgressBar {
    ProgressBar::new(tokens as u64).with_style(
        ProgressStyle::with_template("prefill {bar:40} {pos}/{len} tokens {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    )
}

#[derive(Args, Debug)]
pub struct PrefillPeakArgs {
    /// A named shape with random weights generated on the GPU (llama-3-8b, llama-3.1-8b,
    /// yi-9b, qwen2-7b, glm-4-9b, phi-3-mini, smollm2-135m, gemma-3-270m, gemma-3-1b), or a .gguf file / Hugging Face
    /// folder.
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// Tokens of the (random-token) prompt.
    #[arg(long, default_value_t = 32_768)]
    context: usize,
    /// ShadowKV with the values on the host (shadowkv) or on the GPU (shadowkv-gpu).
    #[arg(long, value_enum, default_value_t = AttentionMode::Shadowkv)]
    attention: AttentionMode,
    /// Tokens per pass.
    #[arg(long, default_value_t = PREFILL_CHUNK)]
    pass_tokens: usize,
    /// Also prefill through the all-layers route the layer-wise prefill replaced (every
    /// layer's K/V and pre-RoPE keys at once) and print its peak.
    #[arg(long)]
    all_layers: bool,
    /// Seed of the random weights and the prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    shadowkv: ShadowKvArgs,
}

/// Prefills a random-token prompt layer-wise (and, if asked, through the all-layers route)
/// and prints each one's measured peak GPU memory against the layer-wise bound.
pub fn run_peak(args: PrefillPeakArgs) -> Result<(), Box<dyn std::error::Error>> {
    let Some(home) = args.attention.value_home() else {
        return Err(
            "prefill-peak measures a ShadowKV prefill: --attention shadowkv or shadowkv-gpu".into(),
        );
    };
    // The bound needs no GPU: print it first (bf16 weights, every parameter once).
    let planned = crate::plan::model_config(&args.model)?;
    let bound = PrefillMemory::layerwise(
        &planned,
        crate::plan::weight_bytes(&planned),
        args.context,
        args.pass_tokens,
    );
    println!(
        "{} at {} prompt tokens, passes of {}: layer-wise bound {bound}; the all-layers route about {:.2} GB",
        args.model,
        args.context,
        args.pass_tokens,
        PrefillMemory::all_layers(
            &planned,
            crate::plan::weight_bytes(&planned),
            args.context,
            args.pass_tokens
        ) as f64
            / 1e9
    );
    let gpu = Arc::new(shadowkv::Gpu::new(0)?);
    let model = crate::bench::load_model(&gpu, &args.model, args.seed)?;
    let config = &model.config;
    let params = args.shadowkv.params();
    shadowkv_model::cpu::shadowkv::validate(&params, config)?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let prompt: Vec<u32> = (0..args.context)
        .map(|_| rng.gen_range(0..config.vocab as u32))
        .collect();
    let capacity = CacheCapacity::uniform(1, args.context, 1);
    let mut shadow = model.new_shadow_cache(params, home, capacity)?;
    // A first, shorter prefill loads the kernels and grows the libraries' workspaces, which
    // then stay: the measured prefills see only what a prefill holds.
    let warm_len = args.context.min(8192);
    let (warm, _) =
        model.prefill_shadow(&mut shadow, &prompt[..warm_len], args.pass_tokens, |_| {})?;
    shadow.remove_sequence(model.gpu(), warm)?;
    let (id, layerwise_logits, peak) =
        model.prefill_shadow_measured(&mut shadow, &prompt, args.pass_tokens, |_| {})?;
    println!("layer-wise {peak}");
    if args.all_layers {
        shadow.remove_sequence(model.gpu(), id)?;
        let (_, logits, peak) =
            model.prefill_shadow_all_layers(&mut shadow, &prompt, args.pass_tokens, |_| {})?;
        println!(
            "all-layers {}",
            peak.to_string().replace("; bound", "; layer-wise bound")
        );
        let same = logits
            .iter()
            .zip(&layerwise_logits)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        println!(
            "the two routes' last-token logits are {}",
            if same { "identical" } else { "DIFFERENT" }
        );
    }
    Ok(())
}
