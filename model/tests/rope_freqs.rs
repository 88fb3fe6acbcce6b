//! Llama-3.1's `rope_freqs` end to end on the CPU path: a tiny random Llama checkpoint written
//! here as GGUF with a `rope_freqs.weight` tensor loads with its factors, and ShadowKV with the
//! whole budget and full rank gives full attention's tokens (the key rebuild applies the
//! factors as the forward pass does). Also the RoPE metadata of GGUF files and `config.json`:
//! partial rotary and LongRoPE.
use shadowkv_model::family_fixtures::{write_gguf, Metadata};
use shadowkv_model::{CpuCache, CpuModel, GgufFile, ModelConfig, ShadowKvParams, WeightFile};

const LAYERS: usize = 2;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const FFN: usize = 96;
const VOCAB: usize = 96;

/// Deterministic values in `[-scale, scale)` (a small linear congruential generator).
fn random(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The Llama metadata of the tiny shape, with `extra` keys.
fn metadata(extra: Vec<(String, Metadata)>) -> Vec<(String, Metadata)> {
    let mut metadata = vec![
        (
            "general.architecture".into(),
            Metadata::Text("llama".into()),
        ),
        ("llama.block_count".into(), Metadata::U32(LAYERS)),
        ("llama.embedding_length".into(), Metadata::U32(HIDDEN)),
        ("llama.attention.head_count".into(), Metadata::U32(HEADS)),
        (
            "llama.attention.head_count_kv".into(),
            Metadata::U32(KV_HEADS),
        ),
        ("llama.attention.key_length".into(), Metadata::U32(HEAD_DIM)),
        ("llama.feed_forward_length".into(), Metadata::U32(FFN)),
        ("llama.context_length".into(), Metadata::U32(131_072)),
        ("llama.rope.freq_base".into(), Metadata::F32(10_000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Metadata::F32(1e-5),
        ),
    ];
    metadata.extend(extra);
    metadata
}

/// Every weight of the tiny shape (shapes rows first), random, plus `extra` tensors.
fn tensors(extra: Vec<(String, Vec<usize>, Vec<f32>)>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let (q_dim, kv_dim) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
    let mut seed = 0;
    let mut matrix = |name: String, rows: usize, cols: usize, scale: f32| {
        seed += 1;
        let dims = if rows == 1 {
            vec![cols]
        } else {
            vec![rows, cols]
        };
        (name, dims, random(seed, rows * cols, scale))
    };
    let ones = |name: String, n: usize| (name, vec![n], vec![1.0f32; n]);
    let mut out = vec![matrix("token_embd.weight".into(), VOCAB, HIDDEN, 1.0)];
    for layer in 0..LAYERS {
        let name = |part: &str| format!("blk.{layer}.{part}");
        out.push(ones(name("attn_norm.weight"), HIDDEN));
        out.push(matrix(name("attn_q.weight"), q_dim, HIDDEN, 0.5));
        out.push(matrix(name("attn_k.weight"), kv_dim, HIDDEN, 0.5));
        out.push(matrix(name("attn_v.weight"), kv_dim, HIDDEN, 0.3));
        out.push(matrix(name("attn_output.weight"), HIDDEN, q_dim, 0.2));
        out.push(ones(name("ffn_norm.weight"), HIDDEN));
        out.push(matrix(name("ffn_gate.weight"), FFN, HIDDEN, 0.2));
        out.push(matrix(name("ffn_up.weight"), FFN, HIDDEN, 0.2));
        out.push(matrix(name("ffn_down.weight"), HIDDEN, FFN, 0.2));
    }
    out.push(ones("output_norm.weight".into(), HIDDEN));
    out.push(matrix("output.weight".into(), VOCAB, HIDDEN, 1.0));
    out.extend(extra);
    out
}

/// Llama-3.1-style factors: 1 for the fastest frequencies up to 8 for the slowest.
fn rope_freqs() -> Vec<f32> {
    (0..HEAD_DIM / 2)
        .map(|i| 1.0 + 7.0 * (i as f32 / (HEAD_DIM / 2 - 1) as f32).powi(2))
        .collect()
}

fn parse(name: &str, bytes: Vec<u8>) -> GgufFile {
    GgufFile::parse(name.into(), bytes).unwrap_or_else(|e| panic!("{e}"))
}

fn tiny_llama_3_1() -> CpuModel {
    let extra = vec![(
        "rope_freqs.weight".to_owned(),
        vec![HEAD_DIM / 2],
        rope_freqs(),
    )];
    let file = parse(
        "tiny-llama-3.1.gguf",
        write_gguf(&metadata(vec![]), &tensors(extra)),
    );
    let config = ModelConfig::from_gguf(&file).unwrap_or_else(|e| panic!("{e}"));
    let weights = WeightFile::Gguf(file)
        .load(&config, Ok)
        .unwrap_or_else(|e| panic!("{e}"));
    CpuModel::new(config, weights)
}

fn greedy(
    model: &CpuModel,
    cache: &mut CpuCache,
    prompt: &[u32],
    steps: usize,
) -> (Vec<u32>, Vec<Vec<f32>>) {
    let mut all_logits = Vec::new();
    let generation = shadowkv_model::generate(
        |ids| {
            let logits = model.forward(cache, ids)?;
            all_logits.push(logits.clone());
            Ok(logits)
        },
        prompt,
        &mut shadowkv_model::Sampler::greedy(),
        steps,
        |_| false,
        |_| Ok(()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (generation.tokens, all_logits)
}

#[test]
fn rope_freqs_tensor_becomes_the_models_factors() {
    let model = tiny_llama_3_1();
    let factors = model.config.rope.factors.expect("rope_freqs read");
    assert_eq!(factors.as_slice(), rope_freqs().as_slice());
    let table = model.config.inverse_frequencies();
    for (i, (frequency, factor)) in table.iter().zip(rope_freqs()).enumerate() {
        let expected = 10_000f64.powf(-2.0 * i as f64 / HEAD_DIM as f64) / factor as f64;
        assert!(
            (frequency - expected).abs() <= 1e-12 * expected,
            "frequency {i}"
        );
    }
}

#[test]
fn shadowkv_with_rope_freqs_and_a_whole_budget_matches_full_attention() {
    let model = tiny_llama_3_1();
    let prompt: Vec<u32> = (0..300u32).map(|i| (i * 37 + 11) % VOCAB as u32).collect();
    let mut params = ShadowKvParams {
        chunk_size: 8,
        sparse_budget: 8,
        rank: model.config.kv_dim(),
        local_chunks: 4,
        outlier_chunks: 4,
    };
    let chunks = params.prompt_chunks(prompt.len());
    params.sparse_budget = (chunks - params.outlier_chunks) * params.chunk_size;
    let steps = 16;
    let mut full = CpuCache::new(&model.config);
    let mut shadow = CpuCache::shadowkv(&model.config, params).unwrap_or_else(|e| panic!("{e}"));
    let (full_tokens, full_logits) = greedy(&model, &mut full, &prompt, steps);
    let (shadow_tokens, shadow_logits) = greedy(&model, &mut shadow, &prompt, steps);
    assert!(
        shadow.uses_shadows(),
        "the prompt is long enough for ShadowKV"
    );
    assert_eq!(shadow_tokens, full_tokens);
    for (step, (a, b)) in full_logits.iter().zip(&shadow_logits).enumerate() {
        let difference: f32 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f32>()
            .sqrt();
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!(
            difference / norm < 1e-4,
            "step {step}: relative difference {}",
            difference / norm
        );
    }
    // The factors matter: without them the same weights give other logits.
    let mut plain_config = model.config.clone();
    plain_config.rope.factors = None;
    let plain = CpuModel::new(plain_config, model.weights.clone());
    let mut plain_cache = CpuCache::new(&plain.config);
    let plain_logits = plain
        .forward(&mut plain_cache, &prompt)
        .unwrap_or_else(|e| panic!("{e}"));
    let moved: f32 = plain_logits
        .iter()
        .zip(&full_logits[0])
        .map(|(x, y)| (x - y).abs())
        .sum();
    assert!(moved > 1e-3, "rope_freqs left the logits unchanged");
}

#[test]
fn gguf_partial_rotary_and_long_rope_metadata_are_read() {
    let pairs = HEAD_DIM / 4;
    let short: Vec<f32> = (0..pairs).map(|i| 1.0 + i as f32 * 0.25).collect();
    let long: Vec<f32> = (0..pairs).map(|i| 2.0 + i as f32).collect();
    let extra_metadata = vec![
        (
            "llama.rope.dimension_count".into(),
            Metadata::U32(HEAD_DIM / 2),
        ),
        (
            "llama.rope.scaling.original_context_length".into(),
            Metadata::U32(4096),
        ),
        ("llama.rope.scaling.attn_factor".into(), Metadata::F32(1.19)),
    ];
    let extra = vec![
        (
            "rope_factors_short.weight".to_owned(),
            vec![pairs],
            short.clone(),
        ),
        (
            "rope_factors_long.weight".to_owned(),
            vec![pairs],
            long.clone(),
        ),
    ];
    let file = parse(
        "tiny-long-rope.gguf",
        write_gguf(&metadata(extra_metadata), &tensors(extra)),
    );
    let config = ModelConfig::from_gguf(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.rope.rotary_dim, (HEAD_DIM / 2) as u32);
    let long_rope = config.rope.long_rope.expect("LongRoPE read");
    assert_eq!(long_rope.short_factors.as_slice(), short.as_slice());
    assert_eq!(long_rope.long_factors.as_slice(), long.as_slice());
    assert_eq!(long_rope.original_max_position, 4096.0);
    assert_eq!(long_rope.context_length, 131_072.0);
    assert!((long_rope.attention_factor - 1.19).abs() < 1e-6);
    assert!((config.rotary_layout().attention_factor - 1.19).abs() < 1e-6);
    // Past the original context the long factors are in force.
    let table = config.inverse_frequencies();
    assert_eq!(table.len(), pairs);
    let expected = 10_000f64.powf(-2.0 / (HEAD_DIM / 2) as f64) / long[1] as f64;
    assert!((table[1] - expected).abs() <= 1e-12 * expected);
    // A run sized within the original context uses the short factors.
    let short_run = config.clone().sized_for_context(4096).inverse_frequencies();
    let expected = 10_000f64.powf(-2.0 / (HEAD_DIM / 2) as f64) / short[1] as f64;
    assert!((short_run[1] - expected).abs() <= 1e-12 * expected);

    // Only one of the two factor tensors: an error naming the missing one.
    let one = vec![("rope_factors_short.weight".to_owned(), vec![pairs], short)];
    let file = parse(
        "half-long-rope.gguf",
        write_gguf(
            &metadata(vec![
                (
                    "llama.rope.dimension_count".into(),
                    Metadata::U32(HEAD_DIM / 2),
                ),
                (
                    "llama.rope.scaling.original_context_length".into(),
                    Metadata::U32(4096),
                ),
            ]),
            &tensors(one),
        ),
    );
    let error = ModelConfig::from_gguf(&file).unwrap_err().to_string();
    assert!(error.contains("rope_factors_long.weight"), "{error}");

    // A rope_freqs table of the wrong length: an error naming the tensor.
    let wrong = vec![("rope_freqs.weight".to_owned(), vec![3], vec![1.0; 3])];
    let file = parse(
        "bad-rope-freqs.gguf",
        write_gguf(&metadata(vec![]), &tensors(wrong)),
    );
    let error = ModelConfig::from_gguf(&file).unwrap_err().to_string();
    assert!(
        error.contains("rope_freqs.weight") && error.contains("expected 8"),
        "{error}"
    );
}

#[test]
fn hf_config_partial_rotary_and_long_rope_are_read() {
    let dir = std::env::temp_dir().join(format!("shadowkv-rope-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, json: serde_json::Value| {
        let path = dir.join(name);
        std::fs::write(&path, json.to_string()).unwrap();
        ModelConfig::from_hf_config(&path)
    };
    let base = serde_json::json!({
        "model_type": "llama", "hidden_size": 96, "num_attention_heads": 1,
        "num_key_value_heads": 1, "num_hidden_layers": 1, "intermediate_size": 32,
        "vocab_size": 16, "rope_theta": 10000.0, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096
    });
    let mut partial = base.clone();
    partial["partial_rotary_factor"] = 0.5.into();
    let config = write("partial.json", partial).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.rotary_layout().rotary_dim, 48);
    assert_eq!(config.inverse_frequencies().len(), 24);

    let short: Vec<f64> = (0..48).map(|i| 1.0 + i as f64 * 0.01).collect();
    let long: Vec<f64> = (0..48).map(|i| 1.0 + i as f64).collect();
    let mut phi = base.clone();
    phi["rope_scaling"] =
        serde_json::json!({"type": "longrope", "short_factor": short, "long_factor": long});
    let config = write("phi3.json", phi).unwrap_or_else(|e| panic!("{e}"));
    let long_rope = config.rope.long_rope.expect("LongRoPE read");
    let expected_factor = (1.0 + 32f64.ln() / 4096f64.ln()).sqrt();
    assert!((long_rope.attention_factor - expected_factor).abs() < 1e-12);
    assert_eq!(long_rope.long_factors.as_slice()[5], 6.0);

    let mut bad = base;
    bad["rope_scaling"] =
        serde_json::json!({"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]});
    let error = write("bad.json", bad).unwrap_err().to_string();
    assert!(
        error.contains("short_factor") && error.contains("expected 48"),
        "{error}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
