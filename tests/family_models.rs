//! Each family's GPU model (Llama, Qwen2 with QKV bias, GLM-4 with fused QKV and bias, RoPE
//! on half of each head in adjacent pairs, Phi-3 with fused QKV and gate/up and LongRoPE)
//! against its CPU path, on the tiny random checkpoints of `family_fixtures` loaded through
//! the family's own files (GGUF, and Hugging Face safetensors for GLM-4 and Phi-3).
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use shadowkv::Gpu;
use shadowkv_model::family_fixtures::TinyCheckpoint;
use shadowkv_model::weights::SafetensorsFiles;
use shadowkv_model::{Architecture, CpuModel, GgufFile, ModelConfig, WeightFile};
use shadowkv_suite::run_gpu_tests;

#[path = "families/support.rs"]
mod support;

use support::*;

fn main() {
    run_gpu_tests(&[
        (
            "gpu_family_models_match_cpu_path_from_gguf",
            families_from_gguf,
        ),
        (
            "gpu_family_models_match_cpu_path_from_safetensors",
            families_from_safetensors,
        ),
        (
            "gpu_family_shadowkv_with_a_whole_budget_matches_full_attention",
            families_shadowkv_whole_budget,
        ),
    ])
}

const FAMILIES: [Architecture; 4] = [
    Architecture::Llama,
    Architecture::Qwen2,
    Architecture::ChatGlm,
    Architecture::Phi3,
];

fn families_from_gguf(_: &Gpu) -> Result<(), String> {
    for family in FAMILIES {
        let checkpoint = TinyCheckpoint::new(family, 41);
        let name = format!("tiny-{}.gguf", checkpoint.gguf_architecture());
        let file = GgufFile::parse(name.clone(), checkpoint.gguf_bytes(&[])).map_err(s)?;
        let config = ModelConfig::from_gguf(&file).map_err(s)?;
        let weights = WeightFile::Gguf(file);
        let cpu = CpuModel::new(config.clone(), weights.load(&config, Ok).map_err(s)?);
        compare(&name, &config, &weights, &cpu)?;
    }
    Ok(())
}

fn families_from_safetensors(_: &Gpu) -> Result<(), String> {
    for family in [Architecture::ChatGlm, Architecture::Phi3] {
        let checkpoint = TinyCheckpoint::new(family, 43);
        let dir = std::env::temp_dir().join(format!(
            "shadowkv-family-models-{}-{family:?}",
            std::process::id()
        ));
        checkpoint.write_hf(&dir, &[]).map_err(s)?;
        let config = ModelConfig::from_hf_config(&dir.join("config.json")).map_err(s)?;
        let weights = WeightFile::Safetensors(SafetensorsFiles::open(&dir).map_err(s)?);
        let cpu = CpuModel::new(config.clone(), weights.load(&config, Ok).map_err(s)?);
        let result = compare(&format!("{family:?} safetensors"), &config, &weights, &cpu);
        let _ = std::fs::remove_dir_all(&dir);
        result?;
    }
    Ok(())
}

/// In each family, ShadowKV on the GPU with every chunk selected and the whole key width as
/// the rank against the GPU's full attention, both fed full attention's greedy tokens: each
/// step's logits within [`LOGIT_TOLERANCE`] and the same greedy token unless a near-tie (the
/// key rebuild and landmark scoring apply GLM-4's partial adjacent rotary and Phi-3's
/// LongRoPE as the forward pass does; the CPU test of the same name checks the reference).
fn families_shadowkv_whole_budget(_: &Gpu) -> Result<(), String> {
    for family in FAMILIES {
        let checkpoint = TinyCheckpoint::new(family, 47);
        let name = format!("tiny-{}.gguf", checkpoint.gguf_architecture());
        let file = GgufFile::parse(name.clone(), checkpoint.gguf_bytes(&[])).map_err(s)?;
        let config = ModelConfig::from_gguf(&file).map_err(s)?;
        let model = gpu_model(&config, &WeightFile::Gguf(file))?;
        shadowkv_whole_budget_matches_full_attention(&name, &config, &model, 1000)?;
    }
    Ok(())
}
