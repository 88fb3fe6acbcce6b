//! The chunked prefill over the full KV cache and its progress bar, shared by `shadowkv
//! generate` and `shadowkv bench`.
use indicatif::{ProgressBar, ProgressStyle};
use shadowkv_model::{GpuKvCache, GpuModel};

/// Tokens per prefill pass, so a long prompt shows progress and bounds its activations.
pub const PREFILL_CHUNK: usize = 2048;

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
