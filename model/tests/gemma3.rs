//! Gemma-3 on the CPU path: a tiny random checkpoint against a direct f64 computation of the
//! block (embedding scale, query/key RMSNorm, the local layers' RoPE base and sliding window,
//! the query scale, the norms after attention and after the MLP, GeGLU, the tied head), and
//! bad Gemma-3 files named by file, tensor and reason.
use shadowkv_model::family_fixtures::TinyCheckpoint;
use shadowkv_model::family_fixtures::TINY_GEMMA3_WINDOW;
use shadowkv_model::{Architecture, CpuCache, CpuModel, GgufFile, ModelConfig, WeightFile};

/// RMSNorm of each `weight.len()`-long row, in f64.
fn rms_norm(x: &[f64], weight: &[f32], eps: f64) -> Vec<f64> {
    x.chunks_exact(weight.len())
        .flat_map(|row| {
            let inverse =
                1.0 / (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + eps).sqrt();
            row.iter()
                .zip(weight)
                .map(move |(v, &w)| v * inverse * w as f64)
        })
        .collect()
}

/// `x · Wᵀ` for one row `x`.
fn product(x: &[f64], weight: &shadowkv_model::Matrix) -> Vec<f64> {
    weight
        .data
        .chunks_exact(weight.cols)
        .map(|row| row.iter().zip(x).map(|(&w, v)| w as f64 * v).sum())
        .collect()
}

/// Rotate-half RoPE of each head of `head_dim` in `row` at `position` with base `theta`.
fn rope(row: &mut [f64], head_dim: usize, position: usize, theta: f64) {
    let half = head_dim / 2;
    for head in row.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let angle = position as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
            let (sin, cos) = angle.sin_cos();
            let (low, high) = (head[i], head[i + half]);
            head[i] = low * cos - high * sin;
            head[i + half] = high * cos + low * sin;
        }
    }
}

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

/// The logits after each token of `tokens`, computed directly from Gemma-3's definition.
fn direct_logits(
    checkpoint: &TinyCheckpoint,
    query_pre_attn_scalar: f64,
    tokens: &[u32],
) -> Vec<Vec<f64>> {
    let config = &checkpoint.config;
    let weights = &checkpoint.weights;
    let window = config.block.sliding_window.unwrap();
    let (hidden, head_dim, eps) = (config.hidden, config.head_dim, config.rms_eps as f64);
    let group = config.heads / config.kv_heads;
    // Per layer: every position's keys and values.
    let mut keys = vec![Vec::<Vec<f64>>::new(); config.layers];
    let mut values = vec![Vec::<Vec<f64>>::new(); config.layers];
    let mut all_logits = Vec::new();
    for (position, &token) in tokens.iter().enumerate() {
        let row = token as usize * hidden;
        let mut x: Vec<f64> = weights.embedding.data[row..row + hidden]
            .iter()
            .map(|&v| v as f64 * (hidden as f64).sqrt())
            .collect();
        for (layer, w) in weights.layers.iter().enumerate() {
            let local = layer % window.global_every != window.global_every - 1;
            let theta = if local {
                window.local_rope.theta
            } else {
                config.rope.theta
            };
            let h = rms_norm(&x, &w.attn_norm, eps);
            let mut q = rms_norm(
                &product(&h, &w.q),
                w.extra_norms.q_norm.as_ref().unwrap(),
                eps,
            );
            let mut k = rms_norm(
                &product(&h, &w.k),
                w.extra_norms.k_norm.as_ref().unwrap(),
                eps,
            );
            rope(&mut q, head_dim, position, theta);
            rope(&mut k, head_dim, position, theta);
            keys[layer].push(k);
            values[layer].push(product(&h, &w.v));
            let first = if local {
                (position + 1).saturating_sub(window.window)
            } else {
                0
            };
            let mut attended = vec![0.0; config.heads * head_dim];
            for head in 0..config.heads {
                let kv = head / group;
                let query = &q[head * head_dim..(head + 1) * head_dim];
                let scores: Vec<f64> = (first..=position)
                    .map(|p| {
                        let key = &keys[layer][p][kv * head_dim..(kv + 1) * head_dim];
                        query.iter().zip(key).map(|(a, b)| a * b).sum::<f64>()
                            / query_pre_attn_scalar.sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (p, s) in (first..=position).zip(&scores) {
                    let weight = (s - max).exp() / total;
                    let value = &values[layer][p][kv * head_dim..(kv + 1) * head_dim];
                    for (o, v) in attended[head * head_dim..(head + 1) * head_dim]
                        .iter_mut()
                        .zip(value)
                    {
                        *o += weight * v;
                    }
                }
            }
            let out = rms_norm(
                &product(&attended, &w.o),
                w.extra_norms.post_attention_norm.as_ref().unwrap(),
                eps,
            );
            x.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
            let h = rms_norm(&x, &w.ffn_norm, eps);
            let gated: Vec<f64> = product(&h, &w.gate)
                .into_iter()
                .zip(product(&h, &w.up))
                .map(|(g, u)| gelu_tanh(g) * u)
                .collect();
            let out = rms_norm(
                &product(&gated, &w.down),
                w.extra_norms.post_ffn_norm.as_ref().unwrap(),
                eps,
            );
            x.iter_mut().zip(&out).for_each(|(a, b)| *a += b);
        }
        let normed = rms_norm(&x, &weights.output_norm, eps);
        all_logits.push(product(&normed, &weights.embedding));
    }
    all_logits
}

fn relative_error(actual: &[f32], expected: &[f64]) -> f64 {
    let difference: f64 = actual
        .iter()
        .zip(expected)
        .map(|(&a, e)| (a as f64 - e).powi(2))
        .sum();
    let norm: f64 = expected.iter().map(|e| e * e).sum();
    (difference / norm).sqrt()
}

/// The CPU path's logits match the direct computation token by token, past the window (so
/// the local layers drop their oldest keys), and with a query scale of the model's own.
#[test]
fn cpu_path_matches_a_direct_f64_gemma3() {
    let mut checkpoint = TinyCheckpoint::new(Architecture::Gemma3, 5);
    let tokens: Vec<u32> = (0..3 * TINY_GEMMA3_WINDOW as u32)
        .map(|i| (i * 29 + 3) % checkpoint.config.vocab as u32)
        .collect();
    for query_pre_attn_scalar in [256.0, 128.0] {
        let config = &mut checkpoint.config;
        config.block.query_scale = (config.head_dim as f64 / query_pre_attn_scalar).sqrt() as f32;
        let expected = direct_logits(&checkpoint, query_pre_attn_scalar, &tokens);
        let model = CpuModel::new(checkpoint.config.clone(), checkpoint.weights.clone());
        // The prompt in one call, then token by token.
        let mut cache = CpuCache::new(&model.config);
        let half = tokens.len() / 2;
        let logits = model.forward(&mut cache, &tokens[..half]).unwrap();
        let error = relative_error(&logits, &expected[half - 1]);
        assert!(
            error < 1e-5,
            "scalar {query_pre_attn_scalar}, prompt: {error:.2e}"
        );
        for (position, &token) in tokens.iter().enumerate().skip(half) {
            let logits = model.forward(&mut cache, &[token]).unwrap();
            let error = relative_error(&logits, &expected[position]);
            assert!(
                error < 1e-5,
                "scalar {query_pre_attn_scalar}, position {position}: {error:.2e}"
            );
        }
    }
}

/// The window matters: the same model without it gives other logits once the prompt is
/// longer than the window (so the test above checks the window, not only the norms).
#[test]
fn the_window_changes_logits_past_its_length() {
    let checkpoint = TinyCheckpoint::new(Architecture::Gemma3, 6);
    let tokens: Vec<u32> = (0..2 * TINY_GEMMA3_WINDOW as u32 + 1).collect();
    let logits = |config: ModelConfig| {
        let model = CpuModel::new(config, checkpoint.weights.clone());
        model
            .forward(&mut CpuCache::new(&model.config), &tokens)
            .unwrap()
    };
    let mut unwindowed = checkpoint.config.clone();
    unwindowed.block.sliding_window.as_mut().unwrap().window = tokens.len();
    let (windowed, full) = (logits(checkpoint.config.clone()), logits(unwindowed));
    let difference: f32 = windowed.iter().zip(&full).map(|(a, b)| (a - b).abs()).sum();
    assert!(difference > 1e-3, "{difference}");
}

#[test]
fn a_gemma3_file_with_a_tensor_missing_is_named() {
    let checkpoint = TinyCheckpoint::new(Architecture::Gemma3, 2);
    for missing in ["blk.1.post_ffw_norm.weight", "blk.0.attn_k_norm.weight"] {
        let bytes = checkpoint.gguf_bytes(&[missing]);
        let file = GgufFile::parse("tiny-gemma3.gguf".into(), bytes).unwrap();
        let config = ModelConfig::from_gguf(&file).unwrap();
        let error = WeightFile::Gguf(file).load(&config, Ok).unwrap_err();
        assert_eq!(error.file, "tiny-gemma3.gguf");
        assert_eq!(error.tensor.as_deref(), Some(missing));
        assert!(error.reason.contains("not in the file"), "{error}");
    }
    let dir = std::env::temp_dir().join(format!("shadowkv-gemma3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    checkpoint
        .write_hf(&dir, &["blk.2.attn_q_norm.weight"])
        .unwrap();
    let config = ModelConfig::from_hf_config(&dir.join("config.json")).unwrap();
    assert_eq!(config, checkpoint.config);
    let files = shadowkv_model::weights::SafetensorsFiles::open(&dir).unwrap();
    let error = WeightFile::Safetensors(files)
        .load(&config, Ok)
        .unwrap_err();
    assert_eq!(
        error.tensor.as_deref(),
        Some("model.layers.2.self_attn.q_norm.weight")
    );
    assert!(error.reason.contains("not in the file"), "{error}");
    // The multimodal checkpoint's config is refused by name.
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gemma3"}"#).unwrap();
    let error = ModelConfig::from_hf_config(&dir.join("config.json")).unwrap_err();
    assert!(error.reason.contains("gemma3_text"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gemma3_named_shapes_have_their_sizes() {
    let small = ModelConfig::named("gemma-3-270m").unwrap();
    assert_eq!(small.architecture, Architecture::Gemma3);
    assert_eq!(
        (
            small.layers,
            small.hidden,
            small.heads,
            small.kv_heads,
            small.head_dim
        ),
        (18, 640, 4, 1, 256)
    );
    // 268M parameters, 170M of them the embedding.
    assert!(
        (2.6e8..2.8e8).contains(&(small.parameters() as f64)),
        "{}",
        small.parameters()
    );
    let window = small.block.sliding_window.unwrap();
    let global: Vec<usize> = (0..small.layers).filter(|&l| !window.is_local(l)).collect();
    assert_eq!(global, [5, 11, 17]);
    let one_b = ModelConfig::named("gemma-3-1b").unwrap();
    assert!(
        (0.95e9..1.05e9).contains(&(one_b.parameters() as f64)),
        "{}",
        one_b.parameters()
    );
}

/// The Gemma-3-270M file from the cache folder, or `None` with a message saying how to get it.
fn gemma3_270m_file() -> Option<GgufFile> {
    let Some(path) = shadowkv_model::gemma3_270m_path() else {
        eprintln!(
            "skipped: {} is not in the cache folder; run tools/setup.sh gemma3-270m",
            shadowkv_model::GEMMA3_270M_FILE
        );
        return None;
    };
    Some(GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}")))
}

/// The file's model on the CPU path and its tokenizer.
fn cpu_model_and_tokenizer(file: GgufFile) -> (CpuModel, shadowkv_model::Tokenizer) {
    let config = ModelConfig::from_gguf(&file).unwrap_or_else(|e| panic!("{e}"));
    let tokenizer = shadowkv_model::Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{e}"));
    let weights = WeightFile::Gguf(file)
        .load(&config, Ok)
        .unwrap_or_else(|e| panic!("{e}"));
    (CpuModel::new(config, weights), tokenizer)
}

/// `count` tokens chosen greedily after `prompt`, each fed back in turn.
fn greedy_answer(model: &CpuModel, cache: &mut CpuCache, prompt: &[u32], count: usize) -> Vec<u32> {
    let mut logits = model.forward(cache, prompt).unwrap();
    let mut answer = Vec::new();
    for _ in 0..count {
        let next = shadowkv_model::Sampler::greedy().sample(&logits);
        answer.push(next);
        logits = model.forward(cache, &[next]).unwrap();
    }
    answer
}

/// Gemma-3-270M (base model, `tools/setup.sh gemma3-270m`) completes factual sentences
/// greedily with the right name. Prompts are plain text after `<bos>` (a base model has no
/// chat template). A few seconds in a debug build; skipped with a message without the file.
#[test]
fn gemma3_270m_completes_factual_prompts() {
    let Some(file) = gemma3_270m_file() else {
        return;
    };
    let (model, tokenizer) = cpu_model_and_tokenizer(file);
    for (text, expected) in [
        ("The capital of Japan is", " Tokyo"),
        ("The Eiffel Tower is in the city of", " Paris"),
        (
            "Question: What is the capital of France?\nAnswer:",
            " Paris",
        ),
    ] {
        let mut prompt = vec![tokenizer.bos_id().unwrap()];
        prompt.extend(tokenizer.encode(text).unwrap());
        let answer = greedy_answer(&model, &mut CpuCache::new(&model.config), &prompt, 3);
        let completion = tokenizer.decode(&answer).unwrap();
        assert!(
            completion.starts_with(expected),
            "{text:?} ({prompt:?}) -> {completion:?} ({answer:?})"
        );
    }
}

/// Gemma-3-270M's SentencePiece vocabulary (when the file is present): whole words merge into
/// their own entries, `\n` and the turn markers are single tokens, `<bos>` is added, and
/// decoding gives the text back. The ids were looked up in the file's token list by hand.
#[test]
fn gemma3_270m_tokenizer_encodes_known_text() {
    let Some(file) = gemma3_270m_file() else {
        return;
    };
    let tokenizer = shadowkv_model::Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tokenizer.vocab_size(), 262_144);
    assert_eq!((tokenizer.bos_id(), tokenizer.add_bos()), (Some(2), true));
    for (text, ids) in [
        ("The capital of France is", vec![818, 5279, 529, 7001, 563]),
        ("Hello world", vec![9259, 1902]),
        (
            "<start_of_turn>user\nHello world<end_of_turn>\n<start_of_turn>model\n",
            vec![105, 2364, 107, 9259, 1902, 106, 107, 105, 4368, 107],
        ),
    ] {
        assert_eq!(tokenizer.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    }
    // Any text comes back, characters outside the vocabulary through their bytes.
    for text in ["naïve café, 東京 🦀 x\u{10FFFD}", "  two  spaces\n\n"] {
        let ids = tokenizer.encode(text).unwrap();
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    }
    assert!(tokenizer.is_end_of_generation(1));
    assert!(tokenizer.is_end_of_generation(106));
}

/// Gemma-3-270M with a pass key in about 1,700 tokens (past the local layers' 512-token
/// window): full attention and ShadowKV at budget 256 (shadows on the global layers, the
/// local layers exact over their window) both answer with the key.
#[test]
#[ignore = "two 1.7K-token prefills of Gemma-3-270M on the f32 CPU path: about two minutes"]
fn gemma3_270m_shadowkv_finds_the_pass_key_as_full_attention() {
    let Some(file) = gemma3_270m_file() else {
        return;
    };
    let (model, tokenizer) = cpu_model_and_tokenizer(file);
    let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    let text = format!(
        "There is a pass key hidden in the following text. Find it and remember it.\n{}The pass key is 68231. Remember it. 68231 is the pass key.\n{}\nWhat is the pass key? The pass key is",
        filler.repeat(23),
        filler.repeat(47)
    );
    let mut prompt = vec![tokenizer.bos_id().unwrap()];
    prompt.extend(tokenizer.encode(&text).unwrap());
    let params = shadowkv_model::ShadowKvParams {
        sparse_budget: 256,
        ..shadowkv_model::ShadowKvParams::default()
    };
    for cache in [
        CpuCache::new(&model.config),
        CpuCache::shadowkv(&model.config, params).unwrap(),
    ] {
        let mut cache = cache;
        let answer = greedy_answer(&model, &mut cache, &prompt, 7);
        // Gemma writes each digit as a token of its own.
        let text = tokenizer.decode(&answer).unwrap();
        eprintln!(
            "{} prompt tokens, ShadowKV {}: {text:?}",
            prompt.len(),
            cache.uses_shadows()
        );
        assert!(text.contains("68231"), "{text:?}");
    }
}
