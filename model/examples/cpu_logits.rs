//! Prints the CPU model's last-position logits for token ids given on the command line
//! (used to compare against an independent reference).
//!
//! `SHADOWKV_GGUF=path.gguf` runs that file instead of the built-in model, and
//! `SHADOWKV_LOGITS_OUT=path` also writes every logit there as little-endian f32, for a
//! reference script to read back whole (model/tests/data/llama_cpp_compare.py does both).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::var_os("SHADOWKV_GGUF") {
        Some(path) => path.into(),
        None => shadowkv_model::builtin_model_path()?,
    };
    let file = shadowkv_model::GgufFile::open(&path)?;
    let config = shadowkv_model::ModelConfig::from_gguf(&file)?;
    let weights = shadowkv_model::WeightFile::Gguf(file);
    let loaded = weights.load(&config, Ok)?;
    let model = shadowkv_model::CpuModel::new(config.clone(), loaded);
    let tokens: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let mut cache = shadowkv_model::CpuCache::new(&config);
    let started = std::time::Instant::now();
    let logits = model.forward(&mut cache, &tokens)?;
    eprintln!("{} tokens in {:?}", tokens.len(), started.elapsed());
    if let Some(out) = std::env::var_os("SHADOWKV_LOGITS_OUT") {
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(out, bytes)?;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for &i in &order[..5] {
        println!("{i} {:.5}", logits[i]);
    }
    println!("sum {:.5}", logits.iter().sum::<f32>());
    Ok(())
}
