//! Each family's loaders and CPU path on tiny random checkpoints written here (GGUF and
//! Hugging Face safetensors, with the family's tensor names and metadata): the config read
//! back is the one written, the loaded weights are the split weights the checkpoint was made
//! from (fused QKV and gate/up cut apart exactly), so the logits match the model built from
//! those weights in memory; Phi-3's fused checkpoint gives the logits of the same weights as
//! a split Llama checkpoint. Bad input names the file, the tensor and the reason.
use std::path::PathBuf;

use shadowkv_model::family_fixtures::{write_gguf, Metadata, TinyCheckpoint};
use shadowkv_model::{
    Architecture, CpuCache, CpuModel, GgufFile, ModelConfig, Sampler, WeightFile, NAMED_SHAPES,
};

const FAMILIES: [Architecture; 5] = [
    Architecture::Llama,
    Architecture::Qwen2,
    Architecture::ChatGlm,
    Architecture::Phi3,
    Architecture::Gemma3,
];

const PROMPT: [u32; 7] = [1, 17, 42, 5, 88, 23, 64];

fn gguf(checkpoint: &TinyCheckpoint, skip: &[&str]) -> GgufFile {
    let name = format!("tiny-{}.gguf", checkpoint.gguf_architecture());
    GgufFile::parse(name, checkpoint.gguf_bytes(skip)).unwrap_or_else(|e| panic!("{e}"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shadowkv-families-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Greedy tokens and each step's logits for `steps` steps after the prompt.
fn greedy(model: &CpuModel, steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut cache = CpuCache::new(&model.config);
    let mut all_logits = Vec::new();
    let generation = shadowkv_model::generate(
        |ids| {
            let logits = model.forward(&mut cache, ids)?;
            all_logits.push(logits.clone());
            Ok(logits)
        },
        &PROMPT,
        &mut Sampler::greedy(),
        steps,
        |_| false,
        |_| Ok(()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (generation.tokens, all_logits)
}

fn loaded(config: ModelConfig, file: &WeightFile) -> CpuModel {
    let weights = file.load(&config, Ok).unwrap_or_else(|e| panic!("{e}"));
    CpuModel::new(config, weights)
}

#[test]
fn each_family_loads_from_gguf_as_written_and_runs() {
    for family in FAMILIES {
        let checkpoint = TinyCheckpoint::new(family, 7);
        let file = gguf(&checkpoint, &[]);
        let config = ModelConfig::from_gguf(&file).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config, checkpoint.config,
            "{family:?}: the config read back"
        );
        let model = loaded(config, &WeightFile::Gguf(file));
        let reference = CpuModel::new(checkpoint.config.clone(), checkpoint.weights.clone());
        let (tokens, logits) = greedy(&model, 8);
        let (expected_tokens, expected_logits) = greedy(&reference, 8);
        assert_eq!(tokens, expected_tokens, "{family:?}");
        assert_eq!(logits, expected_logits, "{family:?}: bit for bit");
        assert!(logits.iter().flatten().all(|v| v.is_finite()));
    }
}

#[test]
fn each_family_loads_from_safetensors_as_written_and_runs() {
    for family in FAMILIES {
        let checkpoint = TinyCheckpoint::new(family, 11);
        let dir = scratch(&format!("{family:?}"));
        checkpoint.write_hf(&dir, &[]).unwrap();
        let config =
            ModelConfig::from_hf_config(&dir.join("config.json")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            config, checkpoint.config,
            "{family:?}: the config read back"
        );
        let files = shadowkv_model::weights::SafetensorsFiles::open(&dir).unwrap();
        let model = loaded(config, &WeightFile::Safetensors(files));
        let reference = CpuModel::new(checkpoint.config.clone(), checkpoint.weights.clone());
        assert_eq!(greedy(&model, 4), greedy(&reference, 4), "{family:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn fused_tensors_split_into_the_written_projections() {
    for family in [Architecture::ChatGlm, Architecture::Phi3] {
        let checkpoint = TinyCheckpoint::new(family, 3);
        let file = WeightFile::Gguf(gguf(&checkpoint, &[]));
        assert!(file.contains(&checkpoint.config, "blk.0.attn_qkv.weight"));
        assert!(!file.contains(&checkpoint.config, "blk.0.attn_q.weight"));
        assert!(!file.contains(&checkpoint.config, "blk.0.ffn_gate.weight"));
        let weights = file.load(&checkpoint.config, Ok).unwrap();
        for (got, written) in weights.layers.iter().zip(&checkpoint.weights.layers) {
            assert_eq!(got.q, written.q, "{family:?} Q");
            assert_eq!(got.k, written.k, "{family:?} K");
            assert_eq!(got.v, written.v, "{family:?} V");
            assert_eq!(got.qkv_bias, written.qkv_bias, "{family:?} biases");
            assert_eq!(got.gate, written.gate, "{family:?} gate: the first half");
            assert_eq!(got.up, written.up, "{family:?} up: the second half");
        }
    }
}

/// GLM-4's RoPE: the first half of each head in adjacent pairs, 2 KV heads' worth of bias.
#[test]
fn glm_4_reads_partial_adjacent_rotary_and_qkv_bias() {
    let checkpoint = TinyCheckpoint::new(Architecture::ChatGlm, 5);
    let config = ModelConfig::from_gguf(&gguf(&checkpoint, &[])).unwrap();
    let rotary = config.head_dim / 2;
    assert_eq!(config.rope.rotary_dim as usize, rotary);
    assert_eq!(
        config.rope.pairing,
        shadowkv_kernels::rope::RopePairing::Adjacent
    );
    assert_eq!(config.rope.theta, 20_000.0);
    assert!(config.architecture.qkv_bias());
    // The untouched half of each head passes through RoPE unchanged.
    let table = shadowkv_model::cpu::RopeTable::new(&config);
    let mut row: Vec<f32> = (0..config.q_dim()).map(|i| i as f32).collect();
    let before = row.clone();
    shadowkv_model::cpu::rope_rows(&mut row, config.head_dim, 9, &table);
    for head in 0..config.heads {
        let base = head * config.head_dim;
        let (head, before) = (
            &row[base..][..config.head_dim],
            &before[base..][..config.head_dim],
        );
        assert_eq!(head[rotary..], before[rotary..]);
        assert_ne!(head[..rotary], before[..rotary]);
        // Adjacent pairs: dimensions 0 and 1 turn together (position 9, fastest frequency).
        let (sin, cos) = (9f64).sin_cos();
        let expected_0 = before[0] as f64 * cos - before[1] as f64 * sin;
        assert!(
            (head[0] as f64 - expected_0).abs() < 1e-3,
            "{} {expected_0}",
            head[0]
        );
    }
}

/// Phi-3 stores Q/K/V and gate/up fused; the same weights as a split Llama checkpoint (same
/// RoPE, LongRoPE included) give the same logits.
#[test]
fn phi_3_fused_checkpoint_matches_the_same_weights_as_split_llama() {
    let phi3 = TinyCheckpoint::new(Architecture::Phi3, 21);
    let phi3_dir = scratch("phi3-fused");
    phi3.write_hf(&phi3_dir, &[]).unwrap();
    let mut llama = phi3.clone();
    llama.config.architecture = Architecture::Llama;
    let llama_dir = scratch("phi3-as-llama");
    llama.write_hf(&llama_dir, &[]).unwrap();
    // The Llama folder's config.json has no LongRoPE; give it Phi-3's.
    let phi3_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(phi3_dir.join("config.json")).unwrap())
            .unwrap();
    let mut llama_json = phi3_json.clone();
    llama_json["model_type"] = "llama".into();
    std::fs::write(llama_dir.join("config.json"), llama_json.to_string()).unwrap();
    let open = |dir: &PathBuf| {
        let config = ModelConfig::from_hf_config(&dir.join("config.json")).unwrap();
        let files = shadowkv_model::weights::SafetensorsFiles::open(dir).unwrap();
        loaded(config, &WeightFile::Safetensors(files))
    };
    let (phi3_model, llama_model) = (open(&phi3_dir), open(&llama_dir));
    assert_eq!(llama_model.config.architecture, Architecture::Llama);
    assert!(phi3_model.config.rope.long_rope.is_some());
    assert_eq!(phi3_model.config.rope, llama_model.config.rope);
    assert_eq!(greedy(&phi3_model, 6), greedy(&llama_model, 6));
    let _ = std::fs::remove_dir_all(&phi3_dir);
    let _ = std::fs::remove_dir_all(&llama_dir);
}

/// Yi ships as a Llama checkpoint (`model_type` llama, GGUF `llama`) with its own base and
/// GQA; it loads as Llama.
#[test]
fn yi_loads_as_llama() {
    let dir = scratch("yi");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 4,
        "num_hidden_layers": 48, "rms_norm_eps": 1e-6, "rope_theta": 10000000.0,
        "vocab_size": 64000, "max_position_embeddings": 262144, "tie_word_embeddings": false}"#,
    )
    .unwrap();
    let config = ModelConfig::from_hf_config(&path).unwrap();
    let mut named = ModelConfig::named("yi-9b").unwrap();
    named.rms_eps = config.rms_eps;
    assert_eq!(config, named);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn named_shapes_of_every_family_are_valid() {
    for name in NAMED_SHAPES {
        ModelConfig::named(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let glm = ModelConfig::named("glm-4-9b").unwrap();
    assert_eq!(glm.architecture, Architecture::ChatGlm);
    assert_eq!(
        (glm.layers, glm.hidden, glm.heads, glm.kv_heads),
        (40, 4096, 32, 2)
    );
    assert_eq!((glm.head_dim, glm.ffn, glm.vocab), (128, 13696, 151_552));
    assert_eq!(glm.rotary_layout().rotary_dim, 64);
    // GLM-4-9B has 9.4B parameters.
    assert!((9.2e9..9.6e9).contains(&(glm.parameters() as f64)));
    let phi = ModelConfig::named("phi-3-mini").unwrap();
    assert_eq!(phi.architecture, Architecture::Phi3);
    assert_eq!(
        (phi.layers, phi.hidden, phi.heads, phi.kv_heads),
        (32, 3072, 32, 32)
    );
    assert_eq!(phi.head_dim, 96);
    // Phi-3-mini has 3.8B parameters.
    assert!((3.7e9..3.9e9).contains(&(phi.parameters() as f64)));
    // LongRoPE: short factors for runs within 4K, long past it.
    let long_rope = |context| {
        phi.clone()
            .sized_for_context(context)
            .rope
            .long_rope
            .unwrap()
    };
    assert!(long_rope(4096).context_length <= long_rope(4096).original_max_position);
    assert!(long_rope(32_768).context_length > long_rope(32_768).original_max_position);
}

#[test]
fn shapes_the_gpu_kernels_do_not_run_are_refused_by_name() {
    let phi = ModelConfig::named("phi-3-mini").unwrap();
    let error = phi
        .check_gpu_kernels("model shape `phi-3-mini`")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("phi-3-mini") && error.contains("head dimension 96"),
        "{error}"
    );
    // A group the kernels do not take (GLM-4's 16 is taken; 12 is not).
    let mut twelve = ModelConfig::named("glm-4-9b").unwrap();
    twelve.heads = 24;
    let error = twelve
        .check_gpu_kernels("glm.gguf")
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("glm.gguf") && error.contains("12 query heads per KV head"),
        "{error}"
    );
    for name in [
        "glm-4-9b",
        "llama-3-8b",
        "llama-3.1-8b",
        "yi-9b",
        "qwen2-7b",
        "smollm2-135m",
        "gemma-3-270m",
        "gemma-3-1b",
    ] {
        ModelConfig::named(name)
            .unwrap()
            .check_gpu_kernels(name)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    for family in FAMILIES {
        TinyCheckpoint::new(family, 1)
            .config
            .check_gpu_kernels("tiny")
            .unwrap_or_else(|e| panic!("{family:?}: {e}"));
    }
}

#[test]
fn unknown_and_unsupported_architectures_are_named() {
    let file = |arch: &str| {
        let metadata = vec![(
            "general.architecture".to_owned(),
            Metadata::Text(arch.into()),
        )];
        let bytes = write_gguf(&metadata, &[]);
        GgufFile::parse(format!("{arch}.gguf"), bytes).unwrap()
    };
    let error = ModelConfig::from_gguf(&file("mamba")).unwrap_err();
    assert_eq!(error.file, "mamba.gguf");
    assert!(error.reason.contains("`mamba`") && error.reason.contains("chatglm"));
    let error = ModelConfig::from_gguf(&file("glm4")).unwrap_err();
    assert!(error.reason.contains("GLM-4-0414"), "{error}");

    let dir = scratch("bad-model-type");
    std::fs::create_dir_all(&dir).unwrap();
    for (model_type, expected) in [("glm4", "GLM-4-0414"), ("gemma7", "\"gemma7\"")] {
        let path = dir.join("config.json");
        std::fs::write(&path, format!(r#"{{"model_type": "{model_type}"}}"#)).unwrap();
        let error = ModelConfig::from_hf_config(&path).unwrap_err();
        assert_eq!(error.file, path.display().to_string());
        assert!(error.reason.contains(expected), "{error}");
    }
    // A GLM variant this driver does not compute is refused by its flag.
    let checkpoint = TinyCheckpoint::new(Architecture::ChatGlm, 1);
    let json = checkpoint
        .hf_config_json()
        .replace(r#""add_qkv_bias": true"#, r#""add_qkv_bias": false"#);
    let path = dir.join("config.json");
    std::fs::write(&path, json).unwrap();
    let error = ModelConfig::from_hf_config(&path).unwrap_err();
    assert!(error.reason.contains("add_qkv_bias"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_fused_tensor_is_named() {
    let checkpoint = TinyCheckpoint::new(Architecture::Phi3, 2);
    let file = gguf(&checkpoint, &["blk.1.attn_qkv.weight"]);
    let error = WeightFile::Gguf(file)
        .load(&checkpoint.config, Ok)
        .unwrap_err();
    assert_eq!(error.file, "tiny-phi3.gguf");
    assert_eq!(error.tensor.as_deref(), Some("blk.1.attn_qkv.weight"));
    assert!(error.reason.contains("not in the file"), "{error}");

    let checkpoint = TinyCheckpoint::new(Architecture::ChatGlm, 2);
    let dir = scratch("glm-missing");
    checkpoint.write_hf(&dir, &["blk.0.ffn_up.weight"]).unwrap();
    let files = shadowkv_model::weights::SafetensorsFiles::open(&dir).unwrap();
    let error = WeightFile::Safetensors(files)
        .load(&checkpoint.config, Ok)
        .unwrap_err();
    assert_eq!(
        error.tensor.as_deref(),
        Some("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight")
    );
    assert!(error.reason.contains("not in the file"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fused_tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let checkpoint = TinyCheckpoint::new(Architecture::Phi3, 4);
    let mut config = checkpoint.config.clone();
    // A config with twice the KV heads the file's fused QKV holds.
    config.kv_heads = 4;
    let file = WeightFile::Gguf(gguf(&checkpoint, &[]));
    let error = file.load(&config, Ok).unwrap_err();
    assert_eq!(error.tensor.as_deref(), Some("blk.0.attn_qkv.weight"));
    // 4 heads of 64 and 2 KV heads in the file; the config asks for 4 KV heads.
    assert!(error.reason.contains("[512, 256]"), "{error}");
    assert!(error.reason.contains("[768, 256]"), "{error}");
}

/// ShadowKV with every chunk selected and full rank gives full attention's tokens in each
/// family: the key rebuild and landmark scoring apply GLM-4's partial adjacent rotary and
/// Phi-3's LongRoPE as the forward pass does.
#[test]
fn shadowkv_with_a_whole_budget_matches_full_attention_in_each_family() {
    for family in FAMILIES {
        let checkpoint = TinyCheckpoint::new(family, 13);
        let model = CpuModel::new(checkpoint.config.clone(), checkpoint.weights.clone());
        let prompt: Vec<u32> = (0..200u32)
            .map(|i| (i * 37 + 11) % model.config.vocab as u32)
            .collect();
        let mut params = shadowkv_model::ShadowKvParams {
            chunk_size: 8,
            sparse_budget: 8,
            rank: model.config.kv_dim(),
            local_chunks: 4,
            outlier_chunks: 4,
        };
        let chunks = params.prompt_chunks(prompt.len());
        params.sparse_budget = (chunks - params.outlier_chunks) * params.chunk_size;
        let run = |mut cache: CpuCache| {
            let mut logits = vec![model.forward(&mut cache, &prompt).unwrap()];
            for _ in 0..12 {
                let next = Sampler::greedy().sample(logits.last().unwrap());
                logits.push(model.forward(&mut cache, &[next]).unwrap());
            }
            (logits, cache.uses_shadows())
        };
        let (full, _) = run(CpuCache::new(&model.config));
        let (shadow, used) = run(CpuCache::shadowkv(&model.config, params).unwrap());
        assert!(used, "{family:?}: the prompt is long enough for ShadowKV");
        for (step, (a, b)) in full.iter().zip(&shadow).enumerate() {
            let difference: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>();
            let norm: f32 = a.iter().map(|x| x * x).sum::<f32>();
            let relative = (difference / norm).sqrt();
            assert!(
                relative < 1e-4,
                "{family:?}, step {step}: relative difference {relative}"
            );
            assert_eq!(
                Sampler::greedy().sample(a),
                Sampler::greedy().sample(b),
                "{family:?}, step {step}"
            );
        }
    }
}
