//! The CPU reference model on the built-in SmolLM2-135M-Instruct (fetched by tools/setup.sh;
//! without it these tests fail with the message that says to run it).
use std::sync::OnceLock;

use shadowkv_model::{CpuCache, CpuModel, GgufFile, ModelConfig, WeightFile};

fn model() -> &'static CpuModel {
    static MODEL: OnceLock<CpuModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let load = || -> shadowkv_model::Result<CpuModel> {
            let file = GgufFile::open(&shadowkv_model::builtin_model_path()?)?;
            let config = ModelConfig::from_gguf(&file)?;
            let weights = WeightFile::Gguf(file).load(&config, Ok)?;
            Ok(CpuModel::new(config, weights))
        };
        load().unwrap_or_else(|e| panic!("{e}"))
    })
}

/// 27 token ids (a ChatML-shaped prompt) and the last position's logits from
/// `model/tests/data/numpy_reference.py`, an independent float64 numpy forward pass that reads
/// the GGUF with the `gguf` package and applies llama.cpp's adjacent-pair RoPE to the file's
/// own (permuted) Q/K rows, so it also checks the driver's un-permutation:
/// `python3 model/tests/data/numpy_reference.py $GGUF <ids>`.
const PROMPT: [u32; 27] = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3510, 28, 7018, 411, 260, 1789, 1018, 2,
    198, 1, 4093, 198, 504, 3458, 282, 4649, 314,
];
const TOP: [(u32, f32); 8] = [
    (253, 22.305),
    (260, 20.7268),
    (354, 20.4879),
    (441, 19.4748),
    (582, 19.1738),
    (597, 18.9506),
    (1343, 18.8718),
    (787, 18.729),
];
const PROBE_IDS: [usize; 9] = [0, 1, 2, 17, 999, 4096, 12345, 30000, 49151];
const PROBE_LOGITS: [f32; 9] = [
    7.5811, 0.3842, 4.0102, 12.2392, 9.6496, 9.0762, 5.7179, 3.7254, 2.245,
];
const LOGIT_NORM: f32 = 1611.344;

#[test]
fn smollm2_logits_match_the_numpy_reference() {
    let model = model();
    assert_eq!(model.config.layers, 30);
    assert_eq!(
        (
            model.config.heads,
            model.config.kv_heads,
            model.config.head_dim
        ),
        (9, 3, 64)
    );
    let mut cache = CpuCache::new(&model.config);
    let logits = model.forward(&mut cache, &PROMPT).unwrap();
    assert_eq!(logits.len(), 49152);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    for (rank, &(id, value)) in TOP.iter().enumerate() {
        assert_eq!(order[rank] as u32, id, "rank {rank}");
        assert!(
            (logits[id as usize] - value).abs() < 2e-3 * value.abs(),
            "id {id}: {} vs {value}",
            logits[id as usize]
        );
    }
    for (&id, &value) in PROBE_IDS.iter().zip(&PROBE_LOGITS) {
        assert!(
            (logits[id] - value).abs() < 2e-3 * LOGIT_NORM / 100.0,
            "id {id}: {} vs {value}",
            logits[id]
        );
    }
    let norm = logits.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - LOGIT_NORM).abs() < 1e-4 * LOGIT_NORM, "norm {norm}");
}

#[test]
fn prefill_in_one_pass_equals_token_by_token() {
    let model = model();
    let prompt = &PROMPT[..11];
    let mut whole = CpuCache::new(&model.config);
    let at_once = model.forward(&mut whole, prompt).unwrap();
    let mut stepped = CpuCache::new(&model.config);
    let mut last = Vec::new();
    for &token in prompt {
        last = model.forward(&mut stepped, &[token]).unwrap();
    }
    assert_eq!(whole.len(), prompt.len());
    assert_eq!(stepped.len(), prompt.len());
    let difference: f32 = at_once
        .iter()
        .zip(&last)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt();
    let norm: f32 = at_once.iter().map(|a| a * a).sum::<f32>().sqrt();
    assert!(
        difference / norm < 1e-5,
        "relative difference {}",
        difference / norm
    );
}

#[test]
fn token_past_the_vocabulary_is_an_error() {
    let model = model();
    let mut cache = CpuCache::new(&model.config);
    let error = model.forward(&mut cache, &[1, 49152]).unwrap_err();
    assert!(error.to_string().contains("49152"), "{error}");
    assert!(cache.is_empty());
}

fn source() -> &'static shadowkv_model::ModelSource {
    static SOURCE: OnceLock<shadowkv_model::ModelSource> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let path = shadowkv_model::builtin_model_path().unwrap_or_else(|e| panic!("{e}"));
        shadowkv_model::ModelSource::open(&path).unwrap_or_else(|e| panic!("{e}"))
    })
}

/// Greedy generation with `cache`: the new ids and the logits of every step.
fn greedy(cache: &mut CpuCache, prompt: &[u32], steps: usize) -> (Vec<u32>, Vec<Vec<f32>>) {
    let model = model();
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
    .unwrap();
    (generation.tokens, all_logits)
}

#[test]
fn greedy_generation_is_stable() {
    let source = source();
    let prompt = source
        .prompt_tokens("What is the capital of France?", true)
        .unwrap();
    let mut cache = CpuCache::new(&model().config);
    let (tokens, _) = greedy(&mut cache, &prompt, 12);
    let text = source.tokenizer.decode(&tokens).unwrap();
    // Recorded from this path; the answer is the one the model is known to give.
    assert!(
        text.starts_with("The capital of France is Paris."),
        "{text:?}"
    );
    assert_eq!(tokens, GREEDY_FRANCE, "{text:?}");
}

const GREEDY_FRANCE: [u32; 12] = [504, 3575, 282, 4649, 314, 7042, 30, 2, 198, 2, 1, 9690];

/// A prompt long enough for ShadowKV's chunks: a passage, then a question about it.
fn long_prompt() -> Vec<u32> {
    let passage = "The lighthouse keeper of Varnholm kept a logbook. Each morning he wrote the \
        weather, the ships that passed and the colour of the sea. On the ninth day of the storm he \
        wrote that the secret word was marigold, and that no one should forget it. The storm broke \
        on the tenth day, and the supply boat came with flour, lamp oil and letters from the \
        mainland. His daughter wrote that the orchard had flowered early and that the goats had \
        escaped twice. He answered that the light had never failed, not once in eleven winters, \
        and that he would come home when the new keeper arrived in spring. ";
    let question = "What was the secret word in the logbook?";
    source()
        .prompt_tokens(&format!("{passage}{passage}{question}"), true)
        .unwrap()
}

#[test]
fn shadowkv_with_a_budget_over_every_chunk_matches_full_attention() {
    let model = model();
    let prompt = long_prompt();
    let mut params = shadowkv_model::ShadowKvParams {
        chunk_size: 8,
        sparse_budget: 8,
        // Full rank: the rebuilt keys are the exact keys up to f32 rounding.
        rank: model.config.kv_dim(),
        local_chunks: 4,
        outlier_chunks: 4,
    };
    let chunks = params.prompt_chunks(prompt.len());
    params.sparse_budget = (chunks - params.outlier_chunks) * params.chunk_size;
    let mut full = CpuCache::new(&model.config);
    let mut shadow = CpuCache::shadowkv(&model.config, params).unwrap();
    let steps = 16;
    let (full_tokens, full_logits) = greedy(&mut full, &prompt, steps);
    let (shadow_tokens, shadow_logits) = greedy(&mut shadow, &prompt, steps);
    assert_eq!(
        shadow_tokens,
        full_tokens,
        "{:?}",
        source().tokenizer.decode(&full_tokens)
    );
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
}

#[test]
fn shadowkv_at_a_small_budget_stays_close_and_reports_short_prompts() {
    let model = model();
    let prompt = long_prompt();
    let params = shadowkv_model::ShadowKvParams {
        chunk_size: 8,
        sparse_budget: 64,
        rank: 96,
        local_chunks: 4,
        outlier_chunks: 2,
    };
    let mut full = CpuCache::new(&model.config);
    let mut shadow = CpuCache::shadowkv(&model.config, params).unwrap();
    let (full_tokens, _) = greedy(&mut full, &prompt, 14);
    let (shadow_tokens, _) = greedy(&mut shadow, &prompt, 14);
    let tokenizer = &source().tokenizer;
    eprintln!(
        "full: {:?}\nshadowkv (S 64, r 96): {:?}",
        tokenizer.decode(&full_tokens).unwrap(),
        tokenizer.decode(&shadow_tokens).unwrap()
    );
    // SmolLM2-135M misremembers the word ("marlo") with full attention too; what is checked
    // is that ShadowKV with a 64-token budget and rank 96 of 192 follows full attention.
    let agreeing = full_tokens
        .iter()
        .zip(&shadow_tokens)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(agreeing >= 10, "only the first {agreeing} tokens agree");
    // A prompt with fewer selectable chunks than the budget is an error, not a silent fallback.
    let mut short = CpuCache::shadowkv(&model.config, params).unwrap();
    let error = model.forward(&mut short, &prompt[..60]).unwrap_err();
    assert!(error.to_string().contains("sparse budget"), "{error}");
    assert!(short.is_empty());
}

#[test]
fn shadowkv_parameters_out_of_range_are_errors() {
    let config = &model().config;
    let base = shadowkv_model::ShadowKvParams::default();
    let cases = [
        (
            shadowkv_model::ShadowKvParams { rank: 200, ..base },
            "rank 200",
        ),
        (
            shadowkv_model::ShadowKvParams { rank: 208, ..base },
            "exceeds the keys' width",
        ),
        (shadowkv_model::ShadowKvParams { rank: 0, ..base }, "rank 0"),
        (
            shadowkv_model::ShadowKvParams {
                chunk_size: 0,
                ..base
            },
            "chunk size 0",
        ),
        (
            shadowkv_model::ShadowKvParams {
                chunk_size: 65,
                ..base
            },
            "chunk size 65",
        ),
        (
            shadowkv_model::ShadowKvParams {
                sparse_budget: 100,
                ..base
            },
            "sparse budget 100",
        ),
    ];
    for (params, expected) in cases {
        let error = CpuCache::shadowkv(config, params).unwrap_err().to_string();
        assert!(error.contains(expected), "{error} (expected {expected:?})");
    }
}

/// Passkey retrieval (run on a many-core machine: `--ignored`): a pass key planted in ~2K
/// tokens of filler; ShadowKV at sparse budgets of 256 and 512 tokens must answer as full
/// attention does.
#[test]
#[ignore = "2K-token prompts on the f32 CPU path: about a minute on 16 cores"]
fn passkey_shadowkv_answers_as_full_attention() {
    let model = model();
    let filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
    let key = "68231";
    let (before, after) = (filler.repeat(45), filler.repeat(45));
    let text = format!(
        "There is a pass key hidden in the following text. Find it and remember it.\n{before}The pass key is {key}. Remember it. {key} is the pass key.\n{after}\nWhat is the pass key?"
    );
    let prompt = source().prompt_tokens(&text, true).unwrap();
    let tokenizer = &source().tokenizer;
    let mut full = CpuCache::new(&model.config);
    let (full_tokens, _) = greedy(&mut full, &prompt, 12);
    let full_answer = tokenizer.decode(&full_tokens).unwrap();
    eprintln!(
        "{} prompt tokens; full attention: {full_answer:?}",
        prompt.len()
    );
    for sparse_budget in [256, 512] {
        let params = shadowkv_model::ShadowKvParams {
            sparse_budget,
            ..Default::default()
        };
        let mut shadow = CpuCache::shadowkv(&model.config, params).unwrap();
        let (tokens, _) = greedy(&mut shadow, &prompt, 12);
        let answer = tokenizer.decode(&tokens).unwrap();
        eprintln!("ShadowKV, budget {sparse_budget}, rank 160: {answer:?}");
        assert_eq!(
            answer.contains(key),
            full_answer.contains(key),
            "budget {sparse_budget}: {answer:?} vs {full_answer:?}"
        );
    }
    assert!(
        full_answer.contains(key),
        "full attention did not find the key: {full_answer:?}"
    );
}
