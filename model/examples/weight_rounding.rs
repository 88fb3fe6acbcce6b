//! How far rounding the weights to bf16 moves the CPU path's logits, for a prompt.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let source = shadowkv_model::ModelSource::open(&shadowkv_model::builtin_model_path()?)?;
    let prompt = std::env::args().nth(1).unwrap_or_else(|| {
        "Write a short story about a lighthouse keeper and his daughter.".into()
    });
    let tokens = source.prompt_tokens(&prompt, true)?;
    let exact = shadowkv_model::CpuModel::new(
        source.config.clone(),
        source.weights.load(&source.config, Ok)?,
    );
    let rounded = shadowkv_model::CpuModel::new(
        source.config.clone(),
        source.weights.load(&source.config, |mut m| {
            m.data
                .iter_mut()
                .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
            Ok(m)
        })?,
    );
    let a = exact.forward(&mut shadowkv_model::CpuCache::new(&source.config), &tokens)?;
    let b = rounded.forward(&mut shadowkv_model::CpuCache::new(&source.config), &tokens)?;
    let diff: f32 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt();
    let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    println!(
        "{} tokens: relative change {:.3e}",
        tokens.len(),
        diff / norm
    );
    Ok(())
}
