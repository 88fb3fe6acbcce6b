//! Hugging Face checkpoints: `config.json` and `*.safetensors` (sharded, mixed dtypes) give the
//! same model as the same weights built in memory; bad files give errors naming file and tensor.
use std::collections::HashMap;
use std::path::Path;

use half::bf16;
use safetensors::{tensor::TensorView, Dtype};
use shadowkv_model::weights::SafetensorsFiles;
use shadowkv_model::{
    Architecture, CpuCache, CpuModel, LayerWeights, Matrix, ModelConfig, ModelWeights, WeightFile,
};

/// Deterministic values in [-scale, scale) (the library's random fill, in f32).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| shadowkv::kernels::random::kernel_layout::value(seed, i, scale, 0.0))
        .collect()
}

fn config_json(model_type: &str, tied: bool) -> String {
    format!(
        r#"{{"model_type": "{model_type}", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "vocab_size": 50, "max_position_embeddings": 256, "tie_word_embeddings": {tied},
        "rope_scaling": {{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 128}}}}"#
    )
}

/// A named tensor: Hugging Face name, shape and values.
type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// The tensors of a tiny model under Hugging Face names, values rounded to bf16 (so storing
/// them as bf16 or f32 loses nothing), and the same weights in memory.
fn tiny_model(config: &ModelConfig) -> (Vec<NamedTensor>, ModelWeights<Matrix>) {
    let mut seed = 0;
    let mut tensors = Vec::new();
    let mut make = |name: String, shape: Vec<usize>, scale: f32| {
        seed += 1;
        let data: Vec<f32> = values(seed, shape.iter().product(), scale)
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        tensors.push((name, shape, data.clone()));
        data
    };
    let (h, q, kv, f, v) = (
        config.hidden,
        config.q_dim(),
        config.kv_dim(),
        config.ffn,
        config.vocab,
    );
    let matrix = |rows, cols, data| Matrix { rows, cols, data };
    let embedding = matrix(
        v,
        h,
        make("model.embed_tokens.weight".into(), vec![v, h], 1.0),
    );
    let mut layers = Vec::new();
    for l in 0..config.layers {
        let name = |part: &str| format!("model.layers.{l}.{part}");
        let scale = 0.3;
        let q_bias = config
            .architecture
            .qkv_bias()
            .then(|| make(name("self_attn.q_proj.bias"), vec![q], 0.1));
        let k_bias = config
            .architecture
            .qkv_bias()
            .then(|| make(name("self_attn.k_proj.bias"), vec![kv], 0.1));
        let v_bias = config
            .architecture
            .qkv_bias()
            .then(|| make(name("self_attn.v_proj.bias"), vec![kv], 0.1));
        layers.push(LayerWeights {
            attn_norm: make(name("input_layernorm.weight"), vec![h], 1.0),
            q: matrix(
                q,
                h,
                make(name("self_attn.q_proj.weight"), vec![q, h], scale),
            ),
            k: matrix(
                kv,
                h,
                make(name("self_attn.k_proj.weight"), vec![kv, h], scale),
            ),
            v: matrix(
                kv,
                h,
                make(name("self_attn.v_proj.weight"), vec![kv, h], scale),
            ),
            qkv_bias: q_bias.map(|qb| [qb, k_bias.unwrap_or_default(), v_bias.unwrap_or_default()]),
            o: matrix(
                h,
                q,
                make(name("self_attn.o_proj.weight"), vec![h, q], scale),
            ),
            ffn_norm: make(name("post_attention_layernorm.weight"), vec![h], 1.0),
            gate: matrix(f, h, make(name("mlp.gate_proj.weight"), vec![f, h], scale)),
            up: matrix(f, h, make(name("mlp.up_proj.weight"), vec![f, h], scale)),
            down: matrix(h, f, make(name("mlp.down_proj.weight"), vec![h, f], scale)),
            extra_norms: Default::default(),
        });
    }
    let output_norm = make("model.norm.weight".into(), vec![h], 1.0);
    let output = (!config.tied_embeddings)
        .then(|| matrix(v, h, make("lm_head.weight".into(), vec![v, h], 0.5)));
    (
        tensors,
        ModelWeights {
            embedding,
            layers,
            output_norm,
            output,
        },
    )
}

/// Writes the tensors into `shards` files (alternating bf16 and f32) with an index when sharded.
fn write_checkpoint(
    dir: &Path,
    config: &str,
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    shards: usize,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    let mut weight_map = HashMap::new();
    for shard in 0..shards {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{shards:05}.safetensors", shard + 1)
        };
        let bytes: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = tensors
            .iter()
            .enumerate()
            .filter(|(i, _)| i % shards == shard)
            .map(|(i, (name, shape, data))| {
                weight_map.insert(name.clone(), file.clone());
                if i % 2 == 0 {
                    (
                        name.clone(),
                        shape.clone(),
                        Dtype::BF16,
                        data.iter()
                            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                            .collect(),
                    )
                } else {
                    (
                        name.clone(),
                        shape.clone(),
                        Dtype::F32,
                        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    )
                }
            })
            .collect();
        let views: Vec<(String, TensorView)> = bytes
            .iter()
            .map(|(name, shape, dtype, data)| {
                (
                    name.clone(),
                    TensorView::new(*dtype, shape.clone(), data).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = serde_json_like(&weight_map);
        std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    }
}

fn serde_json_like(map: &HashMap<String, String>) -> String {
    let entries: Vec<String> = map.iter().map(|(k, v)| format!("{k:?}: {v:?}")).collect();
    format!(
        "{{\"metadata\": {{}}, \"weight_map\": {{{}}}}}",
        entries.join(", ")
    )
}

fn logits(model: &CpuModel) -> Vec<f32> {
    model
        .forward(&mut CpuCache::new(&model.config), &[1, 7, 49, 3, 3, 20])
        .unwrap()
}

#[test]
fn sharded_mixed_dtype_checkpoints_load_as_built() {
    let root = std::env::temp_dir().join(format!("shadowkv-safetensors-{}", std::process::id()));
    for (model_type, tied, shards) in [("llama", false, 1), ("llama", true, 3), ("qwen2", false, 2)]
    {
        let dir = root.join(format!("{model_type}-{tied}-{shards}"));
        let json = config_json(model_type, tied);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), &json).unwrap();
        let config = ModelConfig::from_hf_config(&dir.join("config.json")).unwrap();
        assert_eq!(
            (
                config.layers,
                config.heads,
                config.kv_heads,
                config.head_dim
            ),
            (2, 4, 2, 16)
        );
        assert_eq!(
            config.architecture,
            if model_type == "qwen2" {
                Architecture::Qwen2
            } else {
                Architecture::Llama
            }
        );
        assert_eq!(config.tied_embeddings, tied);
        assert!(config.rope.scaling.is_some());
        let (tensors, built) = tiny_model(&config);
        write_checkpoint(&dir, &json, &tensors, shards);
        let file = WeightFile::Safetensors(SafetensorsFiles::open(&dir).unwrap());
        let loaded = file.load(&config, Ok).unwrap();
        let from_file = logits(&CpuModel::new(config.clone(), loaded));
        let from_memory = logits(&CpuModel::new(config.clone(), built));
        assert_eq!(
            from_file, from_memory,
            "{model_type}, tied {tied}, {shards} shards"
        );
    }
    std::fs::remove_dir_all(&root).ok();
}

#[test]
fn bad_checkpoints_name_file_tensor_and_reason() {
    let root =
        std::env::temp_dir().join(format!("shadowkv-safetensors-bad-{}", std::process::id()));
    let json = config_json("llama", false);
    let dir = root.join("ok");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), &json).unwrap();
    let config = ModelConfig::from_hf_config(&dir.join("config.json")).unwrap();
    let (mut tensors, _) = tiny_model(&config);

    // A tensor of the wrong shape.
    let wrong = root.join("wrong-shape");
    let down = tensors
        .iter()
        .position(|t| t.0.ends_with("layers.1.mlp.down_proj.weight"))
        .unwrap();
    tensors[down].1 = vec![96, 64];
    write_checkpoint(&wrong, &json, &tensors, 1);
    let error = WeightFile::Safetensors(SafetensorsFiles::open(&wrong).unwrap())
        .load(&config, Ok)
        .unwrap_err()
        .to_string();
    assert!(
        // Named as the checkpoint names it.
        error.contains("model.layers.1.mlp.down_proj.weight")
            && error.contains("[96, 64]")
            && error.contains("[64, 96]"),
        "{error}"
    );

    // A missing tensor names its Hugging Face name.
    tensors.remove(down);
    let missing = root.join("missing");
    write_checkpoint(&missing, &json, &tensors, 2);
    let error = WeightFile::Safetensors(SafetensorsFiles::open(&missing).unwrap())
        .load(&config, Ok)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("model.layers.1.mlp.down_proj.weight") && error.contains("not in the file"),
        "{error}"
    );

    // Truncated shard, shard outside the folder, bad JSON, unknown architecture.
    let truncated = root.join("truncated");
    write_checkpoint(&truncated, &json, &tensors, 1);
    let file = truncated.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let error = SafetensorsFiles::open(&truncated)
        .err()
        .expect("a truncated file is an error")
        .to_string();
    assert!(
        error.contains("model.safetensors") && error.contains("not a valid safetensors file"),
        "{error}"
    );
    std::fs::write(
        truncated.join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "../escape.safetensors"}}"#,
    )
    .unwrap();
    let error = SafetensorsFiles::open(&truncated)
        .err()
        .expect("an escaping shard is an error")
        .to_string();
    assert!(error.contains("outside the folder"), "{error}");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let error = ModelConfig::from_hf_config(&dir.join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("config.json") && error.contains("not valid JSON"),
        "{error}"
    );
    std::fs::write(
        dir.join("config.json"),
        json.replace("\"llama\"", "\"falcon\""),
    )
    .unwrap();
    let error = ModelConfig::from_hf_config(&dir.join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("falcon"), "{error}");
    std::fs::write(
        dir.join("config.json"),
        json.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 3"),
    )
    .unwrap();
    let error = ModelConfig::from_hf_config(&dir.join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(error.contains("not a multiple"), "{error}");
    std::fs::remove_dir_all(&root).ok();
}
