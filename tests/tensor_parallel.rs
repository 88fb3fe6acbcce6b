//! Tensor parallelism on the GPU: the model split over N GPUs against the same model on one,
//! in every mode (full attention, ShadowKV with the values on the host, on the GPU): the
//! same greedy tokens and logits within bf16 rounding. SmolLM2-135M (9 heads over 3 KV
//! heads) splits over 3 GPUs; a tiny random Llama (2 KV heads) over 2.
//!
//! Each test needs its GPUs: without a GPU, or with fewer than it splits over, it is reported
//! as ignored (never passed). NCCL is loaded at run time (`NCCL_NVLS_ENABLE=0` is set unless
//! given).
use shadowkv::cache::{CacheCapacity, ShadowKvParams, ValueHome};
use shadowkv::reference::relative_error;
use shadowkv_model::family_fixtures::TinyCheckpoint;
use shadowkv_model::tp::{run_ranks, RankContext, ShardPlan, ShardSource};
use shadowkv_model::{Architecture, GgufFile, ModelConfig, Sampler, WeightFile};

/// Most relative error of a step's logits between N GPUs and one: both in bf16, the
/// all-reduce only changes the order of the f32 additions.
const LOGIT_TOLERANCE: f64 = 2e-2;

/// Two candidates closer than this (in logits) on one GPU may swap on N.
const NEAR_TIE: f32 = 0.05;

type Test = fn() -> Result<(), String>;

fn main() {
    let arguments = libtest_mimic::Arguments::from_args();
    let gpus = shadowkv::probe().unwrap_or(0);
    eprintln!("tensor-parallel tests with {gpus} GPUs");
    let tests: [(&str, usize, Test); 6] = [
        ("tp_tiny_two_gpus_full_attention", 2, || tiny(Mode::Full)),
        ("tp_tiny_two_gpus_shadowkv_host_values", 2, || {
            tiny(Mode::Shadow(ValueHome::Host))
        }),
        ("tp_tiny_two_gpus_shadowkv_gpu_values", 2, || {
            tiny(Mode::Shadow(ValueHome::Device))
        }),
        ("tp_smollm2_three_gpus_full_attention", 3, || {
            smollm2(Mode::Full)
        }),
        ("tp_smollm2_three_gpus_shadowkv_host_values", 3, || {
            smollm2(Mode::Shadow(ValueHome::Host))
        }),
        ("tp_smollm2_three_gpus_shadowkv_gpu_values", 3, || {
            smollm2(Mode::Shadow(ValueHome::Device))
        }),
    ];
    let trials = tests
        .into_iter()
        .map(|(name, needed, test)| {
            libtest_mimic::Trial::test(name, move || test().map_err(Into::into))
                .with_ignored_flag(gpus < needed)
        })
        .collect();
    libtest_mimic::run(&arguments, trials).exit()
}

fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Full,
    Shadow(ValueHome),
}

/// The prompt's logits and each step's after it, gathered over the vocabulary; the tokens
/// fed are `forced` where given, else the greedy ones.
fn run_rank(
    context: &RankContext<'_>,
    mode: Mode,
    prompt: &[u32],
    steps: usize,
    forced: Option<&[u32]>,
) -> shadowkv_model::Result<(Vec<u32>, Vec<Vec<f32>>)> {
    let model = context.model;
    let config = &model.config;
    let mut all = Vec::new();
    let mut tokens = Vec::new();
    let next = |logits: &[f32], step: usize, tokens: &mut Vec<u32>| {
        let token = match forced {
            Some(forced) => forced[step],
            None => Sampler::greedy().sample(logits),
        };
        tokens.push(token);
        token
    };
    match mode {
        Mode::Full => {
            let mut cache = model.new_cache(&[(prompt.len() + steps) as u32])?;
            let mut logits =
                context.gather_logits(model.forward(&mut cache, &vec![0; prompt.len()], prompt)?);
            for step in 0..steps {
                let token = next(&logits, step, &mut tokens);
                all.push(std::mem::take(&mut logits));
                logits = context.gather_logits(model.forward(&mut cache, &[0], &[token])?);
            }
            all.push(logits);
        }
        Mode::Shadow(home) => {
            // Every chunk selected and each rank's whole key width as the rank: ShadowKV
            // attends what full attention does, whatever the split.
            let (chunk_size, local_chunks, outlier_chunks) = (8, 4, 8);
            let chunks = (prompt.len() / chunk_size - local_chunks) / 8 * 8;
            let params = ShadowKvParams {
                chunk_size,
                sparse_budget: (chunks - outlier_chunks) * chunk_size,
                rank: config.kv_dim().min(256) / 16 * 16,
                local_chunks,
                outlier_chunks,
            };
            let capacity = CacheCapacity::uniform(1, prompt.len(), steps);
            let mut shadow = model.new_shadow_cache(params, home, capacity)?;
            let (_, local) = model.prefill_shadow(&mut shadow, prompt, 1000, |_| {})?;
            let mut logits = context.gather_logits(local);
            for step in 0..steps {
                let token = next(&logits, step, &mut tokens);
                all.push(std::mem::take(&mut logits));
                logits = context.gather_logits(model.decode_shadow(&mut shadow, &[token])?);
            }
            all.push(logits);
        }
    }
    Ok((tokens, all))
}

/// `ranks` GPUs against one on the model from `file`, in `mode`.
fn compare(
    config: &ModelConfig,
    file: &WeightFile,
    ranks: usize,
    mode: Mode,
    prompt: &[u32],
    steps: usize,
) -> Result<(), String> {
    let one = ShardPlan::new(config, 1).map_err(s)?;
    let split = ShardPlan::new(config, ranks).map_err(s)?;
    let (tokens, reference) = run_ranks(&one, ShardSource::File(file), |context| {
        run_rank(context, mode, prompt, steps, None)
    })
    .map_err(s)?
    .remove(0);
    let results = run_ranks(&split, ShardSource::File(file), |context| {
        run_rank(context, mode, prompt, steps, Some(&tokens))
    })
    .map_err(s)?;
    let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let mut worst = 0.0f64;
    for (rank, (_, logits)) in results.iter().enumerate() {
        if logits != &results[0].1 {
            return Err(format!("rank {rank} gathered other logits than rank 0"));
        }
    }
    let (mut same, mut near_ties) = (0, 0);
    for (step, (got, want)) in results[0].1.iter().zip(&reference).enumerate() {
        let error = relative_error(&widen(got), &widen(want));
        worst = worst.max(error);
        if error > LOGIT_TOLERANCE {
            return Err(format!(
                "{mode:?}, step {step}: {ranks} GPUs' logits {error:.3e} from one GPU's"
            ));
        }
        let (a, b) = (
            Sampler::greedy().sample(want),
            Sampler::greedy().sample(got),
        );
        if a == b {
            same += 1;
        } else if (want[a as usize] - want[b as usize]).abs() < NEAR_TIE {
            near_ties += 1;
        } else {
            return Err(format!(
                "{mode:?}, step {step}: {ranks} GPUs pick token {b}, one GPU {a} ({} against {})",
                want[b as usize], want[a as usize]
            ));
        }
    }
    eprintln!(
        "{mode:?}, {ranks} GPUs: {same} greedy tokens as one GPU, {near_ties} near ties swapped, worst logits error {worst:.3e}"
    );
    Ok(())
}

/// The tiny random Llama of `family_fixtures` (4 heads over 2 KV heads, head dimension 64),
/// split over 2 GPUs, read from its GGUF bytes.
fn tiny(mode: Mode) -> Result<(), String> {
    let checkpoint = TinyCheckpoint::new(Architecture::Llama, 5);
    let path = std::env::temp_dir().join(format!("shadowkv-tp-tiny-{}.gguf", std::process::id()));
    std::fs::write(&path, checkpoint.gguf_bytes(&[])).map_err(s)?;
    let file = GgufFile::open(&path).map_err(s)?;
    let config = ModelConfig::from_gguf(&file).map_err(s)?;
    let weights = WeightFile::Gguf(file);
    let prompt: Vec<u32> = (0..224u32)
        .map(|i| (i * 37 + 11) % config.vocab as u32)
        .collect();
    let result = compare(&config, &weights, 2, mode, &prompt, 24);
    let _ = std::fs::remove_file(&path);
    result
}

/// SmolLM2-135M (9 heads over 3 KV heads: 3 GPUs divide it, 2 do not).
fn smollm2(mode: Mode) -> Result<(), String> {
    let source =
        shadowkv_model::ModelSource::open(&shadowkv_model::builtin_model_path().map_err(s)?)
            .map_err(s)?;
    let text = "The lighthouse keeper wrote in his logbook every night. ".repeat(12)
        + "What did the keeper write in?";
    let prompt = source.prompt_tokens(&text, true).map_err(s)?;
    compare(&source.config, &source.weights, 3, mode, &prompt, 24)
}
