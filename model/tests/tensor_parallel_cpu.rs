//! The CPU reference of tensor parallelism against the unsplit CPU model, on tiny random
//! models whose KV heads split over 1, 2 and 4 ranks: full attention, and ShadowKV with the
//! unsplit model's KV heads factorised in as many groups as there are ranks. Gemma-3's block
//! (QK norms, post norms after the all-reduce, GeGLU, a sliding-window layer) splits too.
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv_kernels::rope::RopeConfig;
use shadowkv_model::tp::{TensorParallelCpu, TensorParallelError};
use shadowkv_model::{
    Architecture, BlockOptions, CpuCache, CpuModel, Error, ExtraNorms, LayerWeights, Matrix,
    ModelConfig, ModelWeights, ShadowKvParams,
};

/// 2 layers, hidden 128, 8 heads of 32 over 4 KV heads, MLP 192, vocabulary 101 (which 2 and
/// 4 ranks split unevenly). Gemma-3's layer 0 is a sliding-window layer (window 8), layer 1
/// global.
fn tiny(architecture: Architecture, tied: bool, seed: u64) -> CpuModel {
    let gemma = architecture == Architecture::Gemma3;
    let block = if gemma {
        BlockOptions::gemma3(128, 32, 32.0, 8, 2, 10_000.0)
    } else {
        BlockOptions::LLAMA
    };
    let config = ModelConfig {
        architecture,
        layers: 2,
        hidden: 128,
        heads: 8,
        kv_heads: 4,
        head_dim: 32,
        ffn: 192,
        vocab: 101,
        rms_eps: 1e-5,
        rope: RopeConfig::new(10_000.0),
        context_length: 512,
        tied_embeddings: tied,
        block,
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut matrix = |rows: usize, cols: usize, scale: f32| Matrix {
        rows,
        cols,
        data: (0..rows * cols)
            .map(|_| rng.gen_range(-scale..scale))
            .collect(),
    };
    let (hidden, q_dim, kv_dim, ffn) = (128, 256, 128, 192);
    let mut norm = |n: usize| -> Vec<f32> {
        matrix(1, n, 0.2)
            .data
            .into_iter()
            .map(|v| 1.0 + v)
            .collect()
    };
    let norms: Vec<Vec<f32>> = (0..5).map(|_| norm(hidden)).collect();
    let extra: Vec<ExtraNorms> = (0..2)
        .map(|_| {
            if gemma {
                ExtraNorms {
                    q_norm: Some(norm(32)),
                    k_norm: Some(norm(32)),
                    post_attention_norm: Some(norm(hidden)),
                    post_ffn_norm: Some(norm(hidden)),
                }
            } else {
                ExtraNorms::default()
            }
        })
        .collect();
    let mut layers = Vec::new();
    for layer in 0..2 {
        let qkv_bias = (architecture == Architecture::Qwen2).then(|| {
            [
                matrix(1, q_dim, 0.2).data,
                matrix(1, kv_dim, 0.2).data,
                matrix(1, kv_dim, 0.2).data,
            ]
        });
        layers.push(LayerWeights {
            attn_norm: norms[2 * layer].clone(),
            q: matrix(q_dim, hidden, 0.3),
            k: matrix(kv_dim, hidden, 0.3),
            v: matrix(kv_dim, hidden, 0.3),
            qkv_bias,
            o: matrix(hidden, q_dim, 0.15),
            ffn_norm: norms[2 * layer + 1].clone(),
            gate: matrix(ffn, hidden, 0.2),
            up: matrix(ffn, hidden, 0.2),
            down: matrix(hidden, ffn, 0.15),
            extra_norms: extra[layer].clone(),
        });
    }
    let weights = ModelWeights {
        embedding: matrix(config.vocab, hidden, 1.0),
        layers,
        output_norm: norms[4].clone(),
        output: (!tied).then(|| matrix(config.vocab, hidden, 0.3)),
    };
    CpuModel::new(config, weights)
}

fn prompt(len: usize, seed: u64) -> Vec<u32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(0..101)).collect()
}

fn relative_error(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let difference: f32 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let norm: f32 = want.iter().map(|b| b * b).sum();
    (difference / norm).sqrt()
}

fn argmax(logits: &[f32]) -> u32 {
    let best = logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i);
    best.unwrap() as u32
}

/// The prompt in two pieces then `steps` greedy tokens (the unsplit model's choice fed to
/// both), comparing the logits of every step; returns the largest relative error.
fn compare(
    unsplit: &CpuModel,
    mut whole: CpuCache,
    split: &TensorParallelCpu,
    mut parts: shadowkv_model::tp::TensorParallelCpuCache,
    prompt: &[u32],
    steps: usize,
) -> f32 {
    let cut = prompt.len() / 3;
    unsplit.prefill_piece(&mut whole, &prompt[..cut]).unwrap();
    split.prefill_piece(&mut parts, &prompt[..cut]).unwrap();
    let mut want = unsplit.forward(&mut whole, &prompt[cut..]).unwrap();
    let mut got = split.forward(&mut parts, &prompt[cut..]).unwrap();
    if whole.shadowkv_params().is_some() {
        assert!(whole.uses_shadows());
        assert!((0..split.plan.ranks).all(|r| parts.rank(r).uses_shadows()));
    }
    let mut worst = relative_error(&got, &want);
    for _ in 0..steps {
        let next = argmax(&want);
        want = unsplit.forward(&mut whole, &[next]).unwrap();
        got = split.forward(&mut parts, &[next]).unwrap();
        worst = worst.max(relative_error(&got, &want));
    }
    assert_eq!(whole.len(), parts.len());
    worst
}

#[test]
fn split_full_attention_matches_the_unsplit_model() {
    for (architecture, tied) in [
        (Architecture::Llama, false),
        (Architecture::Qwen2, true),
        (Architecture::Gemma3, true),
    ] {
        let model = tiny(architecture, tied, 7);
        let prompt = prompt(37, 1);
        for ranks in [1, 2, 4] {
            let split = TensorParallelCpu::split(&model.config, &model.weights, ranks).unwrap();
            let error = compare(
                &model,
                CpuCache::new(&model.config),
                &split,
                split.cache(),
                &prompt,
                6,
            );
            eprintln!("{architecture:?}, {ranks} ranks: relative error {error:e}");
            // One rank adds its blocks' outputs to zeros: bit for bit the unsplit model.
            if ranks == 1 {
                assert_eq!(error, 0.0);
            }
            assert!(error < 1e-5, "{architecture:?}, {ranks} ranks: {error}");
        }
    }
}

fn shadowkv_params(rank: usize) -> ShadowKvParams {
    ShadowKvParams {
        chunk_size: 8,
        sparse_budget: 32,
        rank,
        local_chunks: 2,
        outlier_chunks: 2,
    }
}

#[test]
fn split_shadowkv_matches_the_unsplit_model_factorised_in_as_many_groups() {
    for (architecture, tied) in [(Architecture::Llama, false), (Architecture::Gemma3, true)] {
        let model = tiny(architecture, tied, 11);
        // 160 tokens: 16 chunks outside the local window, 2 outliers, 4 selected per step.
        let prompt = prompt(160, 2);
        for ranks in [1, 2, 4] {
            let params = shadowkv_params(16);
            let split = TensorParallelCpu::split(&model.config, &model.weights, ranks).unwrap();
            let whole = CpuCache::shadowkv_grouped(&model.config, params, ranks).unwrap();
            let parts = split.shadowkv_cache(params).unwrap();
            let error = compare(&model, whole, &split, parts, &prompt, 6);
            eprintln!(
                "{architecture:?}, ShadowKV rank 16, {ranks} ranks: relative error {error:e}"
            );
            assert!(error < 1e-5, "{architecture:?}, {ranks} ranks: {error}");
        }
    }
}

#[test]
fn split_shadowkv_at_full_rank_matches_unsplit_shadowkv_at_full_rank() {
    let model = tiny(Architecture::Llama, false, 13);
    let prompt = prompt(160, 3);
    let kv_dim = model.config.kv_dim();
    for ranks in [2, 4] {
        // Each rank's keys are kv_dim / ranks wide: at that rank its factors are exact, as
        // the unsplit model's are at kv_dim, so both rebuild the keys up to rounding.
        let split = TensorParallelCpu::split(&model.config, &model.weights, ranks).unwrap();
        let whole = CpuCache::shadowkv(&model.config, shadowkv_params(kv_dim)).unwrap();
        let parts = split
            .shadowkv_cache(shadowkv_params(kv_dim / ranks))
            .unwrap();
        let error = compare(&model, whole, &split, parts, &prompt, 6);
        eprintln!("ShadowKV full rank, {ranks} ranks: relative error {error:e}");
        assert!(error < 1e-4, "{ranks} ranks: {error}");
    }
}

#[test]
fn splits_that_do_not_fit_are_errors() {
    let model = tiny(Architecture::Llama, false, 17);
    let error = |result: shadowkv_model::Result<TensorParallelCpu>| match result {
        Err(Error::TensorParallel(e)) => e,
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("split accepted"),
    };
    assert!(matches!(
        error(TensorParallelCpu::split(&model.config, &model.weights, 3)),
        TensorParallelError::Indivisible {
            what: "KV heads",
            count: 4,
            ranks: 3,
            ..
        }
    ));
    assert_eq!(
        error(TensorParallelCpu::split(&model.config, &model.weights, 0)),
        TensorParallelError::NoRanks
    );
    // Four ranks hold 32-wide keys each: rank 48 does not fit them.
    let split = TensorParallelCpu::split(&model.config, &model.weights, 4).unwrap();
    let too_wide = split.shadowkv_cache(shadowkv_params(48)).unwrap_err();
    assert!(matches!(too_wide, Error::Parameters(_)), "{too_wide}");
    let groups = CpuCache::shadowkv_grouped(&model.config, shadowkv_params(16), 3).unwrap_err();
    assert!(
        groups.to_string().contains("divisor of the KV heads"),
        "{groups}"
    );
    let narrow = CpuCache::shadowkv_grouped(&model.config, shadowkv_params(48), 4).unwrap_err();
    assert!(narrow.to_string().contains("rank 48"), "{narrow}");
}
