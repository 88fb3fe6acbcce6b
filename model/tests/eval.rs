//! The evaluation's generators, scorers, recall metric and input checks, on the CPU without
//! a model file (the recall on a tiny random Llama).
use shadowkv_model::config::Architecture;
use shadowkv_model::cpu::{matmul, rms_norm, rope_rows, RopeTable};
use shadowkv_model::eval::{self, generate, score, EvalError, Sample, Task};
use shadowkv_model::family_fixtures::TinyCheckpoint;
use shadowkv_model::{CpuCache, CpuModel, ShadowKvParams};

/// Words of the plain-text prompt: a stand-in for a tokenizer.
fn words(sample: &Sample) -> Result<usize, EvalError> {
    Ok(eval::prompt_text(sample, None)?.split_whitespace().count())
}

fn sample(task: Task, length: usize, depth: f64, seed: u64) -> Sample {
    generate(task, length, depth, seed, &mut words).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn generators_are_deterministic_per_seed_and_fit_the_length() {
    for task in Task::ALL {
        let a = sample(task, 1500, 0.3, 7);
        assert_eq!(a, sample(task, 1500, 0.3, 7), "{}", task.name());
        assert_ne!(
            a.context,
            sample(task, 1500, 0.3, 8).context,
            "{}",
            task.name()
        );
        let used = words(&a).unwrap();
        assert!(
            used <= 1500 && used + 40 >= 1500,
            "{}: {used} words for 1500",
            task.name()
        );
        for answer in &a.answers {
            assert!(
                a.context.contains(answer.as_str()),
                "{}: {answer}",
                task.name()
            );
        }
        // The same content at another length: only the filler changes.
        assert_eq!(a.answers, sample(task, 3000, 0.3, 7).answers);
    }
}

#[test]
fn needles_sit_at_their_depth() {
    for task in Task::ALL.into_iter().filter(|t| t.uses_depth()) {
        for depth in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0] {
            let s = sample(task, 4000, depth, 3);
            assert_eq!(s.depth, Some(depth));
            let first = s.needle_offsets[0];
            let at = first as f64 / s.context.len() as f64;
            assert!(
                (at - depth).abs() < 0.02,
                "{} at depth {depth}: needle at {at:.3}",
                task.name()
            );
            assert!(s.context[first..].starts_with("One of the special magic"));
            assert!(s.context[first..].contains(&s.answers[0]));
            let real = match task {
                Task::MultiValue | Task::MultiQuery => 4,
                _ => 1,
            };
            assert_eq!(s.needle_offsets.len(), real, "{}", task.name());
        }
    }
}

#[test]
fn multikey_hides_distractors_and_asks_for_one_key() {
    let s = sample(Task::MultiKey, 2000, 0.5, 11);
    assert_eq!(
        s.context
            .matches("One of the special magic numbers")
            .count(),
        4
    );
    assert_eq!(s.answers.len(), 1);
    let key = s
        .question
        .split(" for ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    assert_eq!(s.context.matches(&format!("for {key} is")).count(), 1);
}

#[test]
fn variable_tracking_chains_every_variable_to_the_value() {
    let s = sample(Task::VariableTracking, 1200, 0.0, 5);
    assert_eq!(s.depth, None);
    assert_eq!(s.answers.len(), 5);
    let value = s
        .question
        .split("value ")
        .nth(1)
        .unwrap()
        .trim_end_matches(" in the text above.");
    assert!(s
        .context
        .contains(&format!("VAR {} = {value}.", s.answers[0])));
    for pair in s.answers.windows(2) {
        assert!(s
            .context
            .contains(&format!("VAR {} = VAR {}.", pair[1], pair[0])));
    }
}

#[test]
fn word_tasks_ask_for_the_most_frequent_words() {
    let count = |text: &str, word: &str| text.split_whitespace().filter(|w| *w == word).count();
    let cwe = sample(Task::CommonWords, 2000, 0.0, 9);
    assert_eq!(cwe.answers.len(), 10);
    let least_common = cwe
        .answers
        .iter()
        .map(|a| count(&cwe.context, a))
        .min()
        .unwrap();
    assert_eq!(least_common, 10);
    let most_uncommon = cwe
        .context
        .lines()
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .filter(|w| !cwe.answers.iter().any(|a| a == w))
        .map(|w| count(&cwe.context, w))
        .max()
        .unwrap();
    assert_eq!(most_uncommon, 3);

    let fwe = sample(Task::FrequentWords, 2000, 0.0, 9);
    assert_eq!(fwe.answers.len(), 3);
    let counts: Vec<usize> = fwe.answers.iter().map(|a| count(&fwe.context, a)).collect();
    assert!(counts[0] > counts[1] && counts[1] > counts[2], "{counts:?}");
    let others = fwe
        .context
        .split_whitespace()
        .filter(|w| *w != "...." && !fwe.answers.iter().any(|a| a == w))
        .map(|w| count(&fwe.context, w))
        .max()
        .unwrap();
    assert!(others < counts[2], "{others} vs {counts:?}");
}

#[test]
fn scorers_give_full_partial_and_no_credit() {
    let one = vec!["4829103".to_owned()];
    assert_eq!(score(&one, " 4829103."), 1.0);
    assert_eq!(score(&one, "It is 4829104."), 0.0);
    assert_eq!(
        score(&one, "48291035"),
        0.0,
        "a longer number is not the answer"
    );
    let word = vec!["goat".to_owned()];
    assert_eq!(score(&word, "The word is GOAT!"), 1.0);
    assert_eq!(score(&word, "goats"), 0.0);
    let uuid = vec!["3f2a9c1e-77b0-4c1d-9e2f-0a1b2c3d4e5f".to_owned()];
    assert_eq!(score(&uuid, ": 3f2a9c1e-77b0-4c1d-9e2f-0a1b2c3d4e5f"), 1.0);
    assert_eq!(score(&uuid, ": 3f2a9c1e-77b0-4c1d-9e2f-0a1b2c3d4e5"), 0.0);
    let values: Vec<String> = ["1111111", "2222222", "3333333", "4444444"]
        .map(String::from)
        .to_vec();
    assert_eq!(score(&values, "1111111, 2222222, 3333333 and 4444444"), 1.0);
    assert_eq!(score(&values, "1111111 and 3333333"), 0.5);
    assert_eq!(score(&values, "4444444, 5555555"), 0.25);
    assert_eq!(score(&values, "none"), 0.0);
    let vars: Vec<String> = ["ABCDE", "FGHIJ", "KLMNO"].map(String::from).to_vec();
    assert!((score(&vars, "ABCDE, KLMNO") - 2.0 / 3.0).abs() < 1e-12);
    // The generator's own answers score 1, and a wrong sample's 0.
    let s = sample(Task::MultiQuery, 1000, 0.5, 2);
    assert_eq!(score(&s.answers, &s.answers.join(", ")), 1.0);
    assert_eq!(score(&s.answers, &s.question), 0.0);
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let unknown = Task::parse_list("niah-number,needle")
        .unwrap_err()
        .to_string();
    assert!(
        unknown.contains("\"needle\"") && unknown.contains("niah-number, niah-word"),
        "{unknown}"
    );
    assert_eq!(
        Task::parse_list("vt, cwe,vt").unwrap(),
        [Task::VariableTracking, Task::CommonWords]
    );
    let long = eval::check_grid(&[4096, 16384], 8192, &[256]).unwrap_err();
    assert!(matches!(
        long,
        EvalError::ContextTooLong {
            length: 16384,
            limit: 8192
        }
    ));
    assert!(long.to_string().contains("8192"), "{long}");
    let budget = eval::check_grid(&[1024], 8192, &[256, 2048]).unwrap_err();
    assert!(matches!(
        budget,
        EvalError::BudgetTooLarge {
            budget: 2048,
            length: 1024
        }
    ));
    assert!(budget.to_string().contains("2048"), "{budget}");
    // A budget some lengths exceed runs there (the shorter prompts skip it).
    assert!(eval::check_grid(&[1024, 4096], 8192, &[2048]).is_ok());
    let short = generate(Task::NiahNumber, 20, 0.5, 1, &mut words).unwrap_err();
    assert!(
        matches!(short, EvalError::ContextTooShort { length: 20, .. }),
        "{short}"
    );
    let depth = generate(Task::NiahNumber, 2000, 1.5, 1, &mut words).unwrap_err();
    assert!(matches!(depth, EvalError::BadDepth(_)), "{depth}");
}

/// A tiny Llama in ShadowKV mode after a 200-token prompt and one decode step.
fn tiny_step(params: ShadowKvParams) -> (CpuModel, CpuCache, u32) {
    let checkpoint = TinyCheckpoint::new(Architecture::Llama, 17);
    let model = CpuModel::new(checkpoint.config.clone(), checkpoint.weights);
    let vocab = model.config.vocab as u32;
    let prompt: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % vocab).collect();
    let mut cache = CpuCache::shadowkv(&model.config, params).unwrap();
    model.forward(&mut cache, &prompt).unwrap();
    cache.record_selections(true);
    cache.record_recall(true);
    let token = 42 % vocab;
    model.forward(&mut cache, &[token]).unwrap();
    (model, cache, token)
}

const PARAMS: ShadowKvParams = ShadowKvParams {
    chunk_size: 8,
    sparse_budget: 32,
    rank: 16,
    local_chunks: 2,
    outlier_chunks: 2,
};

#[test]
fn recall_matches_a_direct_computation_on_a_tiny_model() {
    let (model, cache, token) = tiny_step(PARAMS);
    let config = &model.config;
    let (head_dim, position) = (config.head_dim, 200usize);
    // Layer 0's query of the decode token, computed here from the weights.
    let layer = &model.weights.layers[0];
    let x = &model.weights.embedding.data[token as usize * config.hidden..][..config.hidden];
    let mut q = matmul(&rms_norm(x, &layer.attn_norm, config.rms_eps), &layer.q);
    rope_rows(&mut q, head_dim, position as u32, &RopeTable::new(config));
    let shadow = cache
        .shadow(0)
        .expect("the prompt is long enough for shadows");
    let recalls = &cache.recalls()[0];
    assert_eq!(recalls.len(), config.heads);
    let mut below_one = false;
    for head in 0..config.heads {
        let kv_head = head / config.group();
        let (keys, _) = cache.head(0, kv_head);
        let query = &q[head * head_dim..(head + 1) * head_dim];
        let logits: Vec<f64> = keys
            .chunks_exact(head_dim)
            .take(position + 1)
            .map(|k| {
                query
                    .iter()
                    .zip(k)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
                    / (head_dim as f64).sqrt()
            })
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
        let c = PARAMS.chunk_size;
        let selected = &cache.selections()[0][kv_head];
        assert_eq!(selected.len(), PARAMS.budget_chunks());
        let attended = |p: usize| {
            p >= shadow.chunks() * c
                || shadow.outliers(kv_head).contains(&(p / c))
                || selected.contains(&(p / c))
        };
        let expected: f64 = logits
            .iter()
            .enumerate()
            .filter(|&(p, _)| attended(p))
            .map(|(_, l)| (l - max).exp())
            .sum::<f64>()
            / total;
        let got = recalls[head] as f64;
        assert!(
            (got - expected).abs() < 1e-4,
            "head {head}: recall {got} vs direct {expected}"
        );
        below_one |= expected < 0.999;
    }
    assert!(
        below_one,
        "a 4-of-16-chunk budget should lose some mass somewhere"
    );
    // Every layer recorded, each recall a share.
    assert_eq!(cache.recalls().len(), config.layers);
    assert!(cache
        .recalls()
        .iter()
        .flatten()
        .all(|r| (0.0..=1.0 + 1e-5).contains(r)));
}

#[test]
fn recall_is_one_when_every_chunk_is_attended() {
    // 16 chunks outside the local window, 2 outliers: a budget of the other 14 attends all.
    let whole = ShadowKvParams {
        sparse_budget: 14 * 8,
        ..PARAMS
    };
    let (_, cache, _) = tiny_step(whole);
    for recall in cache.recalls().iter().flatten() {
        assert!((recall - 1.0).abs() < 1e-5, "{recall}");
    }
}

#[test]
fn hit_rates_and_recalls_summarise_per_layer() {
    let steps = vec![
        vec![
            vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]],
            vec![vec![0, 1, 2, 3]; 2],
        ],
        vec![
            vec![vec![0, 1, 2, 9], vec![4, 5, 8, 9]],
            vec![vec![0, 1, 2, 3]; 2],
        ],
        vec![
            vec![vec![0, 1, 2, 9], vec![4, 5, 8, 9]],
            vec![vec![4, 5, 6, 7]; 2],
        ],
    ];
    assert_eq!(
        eval::step_hit_rates(&steps),
        vec![vec![0.625, 1.0], vec![1.0, 0.0]]
    );
    let recalls = vec![vec![vec![1.0f32, 0.5]], vec![vec![0.25f32, 0.75]]];
    assert_eq!(eval::step_recalls(&recalls), vec![vec![0.75, 0.5]]);
    let summary = eval::Summary::of(&[0.75, 0.5]);
    assert_eq!((summary.mean, summary.min, summary.count), (0.625, 0.5, 2));
}

#[test]
fn one_prefill_serves_every_setting() {
    let checkpoint = TinyCheckpoint::new(Architecture::Llama, 23);
    let model = CpuModel::new(checkpoint.config.clone(), checkpoint.weights);
    let config = &model.config;
    let vocab = config.vocab as u32;
    let prompt: Vec<u32> = (0..200u32).map(|i| (i * 29 + 3) % vocab).collect();
    let mut shared = CpuCache::shadowkv(config, PARAMS).unwrap();
    let logits = model.prefill_piece(&mut shared, &prompt).unwrap();
    let smaller = ShadowKvParams {
        sparse_budget: 16,
        ..PARAMS
    };
    for params in [None, Some(PARAMS), Some(smaller)] {
        let mut fresh = match params {
            None => CpuCache::new(config),
            Some(params) => CpuCache::shadowkv(config, params).unwrap(),
        };
        assert_eq!(model.forward(&mut fresh, &prompt).unwrap(), logits);
        let mut cache = shared.clone();
        cache.set_shadowkv(config, params).unwrap();
        model.finish_prompt(&mut cache).unwrap();
        assert_eq!(cache.uses_shadows(), params.is_some());
        for token in [5, 17] {
            assert_eq!(
                model.forward(&mut cache, &[token]).unwrap(),
                model.forward(&mut fresh, &[token]).unwrap(),
                "{params:?}"
            );
        }
        assert!(cache.set_shadowkv(config, params).is_err(), "closed prompt");
    }
    let bad = ShadowKvParams { rank: 17, ..PARAMS };
    assert!(shared.set_shadowkv(config, Some(bad)).is_err());
    assert!(CpuCache::new(config).set_shadowkv(config, None).is_err());
}

/// A report of full attention and two ShadowKV budgets over two lengths and two depths:
/// the smaller budget loses one cell, and skips the shorter length.
fn synthetic_report() -> eval::Report {
    let mode = |budget| eval::Mode {
        shadowkv: Some(ShadowKvParams {
            sparse_budget: budget,
            ..ShadowKvParams::default()
        }),
        value_format: "bf16".into(),
        values: "host".into(),
    };
    let mut report = eval::Report {
        model: "synthetic".into(),
        modes: vec![eval::Mode::full(), mode(1024), mode(256)],
        ..eval::Report::default()
    };
    for m in 0..3 {
        for length in [1000, 4000] {
            for depth in [0.0, 1.0] {
                // Full attention misses the 1000-token cells at depth 1: the 256 mode skips
                // them, so its reference leaves them out.
                let full_miss = length == 1000 && depth == 1.0;
                let score = match m {
                    _ if full_miss => 0.0,
                    2 if length == 4000 && depth == 0.0 => 0.0,
                    _ => 1.0,
                };
                if m == 2 && length == 1000 {
                    continue;
                }
                report.outcomes.push(eval::Outcome {
                    task: Task::NiahNumber,
                    length,
                    prompt_tokens: length - 10,
                    depth: Some(depth),
                    sample: 0,
                    mode: m,
                    score,
                    answer: String::new(),
                    hit_rates: vec![eval::Summary::of(&[0.5, 1.0]); 2],
                    recalls: Vec::new(),
                });
            }
        }
    }
    report
}

#[test]
fn reports_compare_each_mode_with_full_attention_on_the_same_prompts() {
    let report = synthetic_report();
    assert_eq!(report.task_score(Task::NiahNumber, 0), Some(75.0));
    assert_eq!(
        report.full_score_beside(Some(Task::NiahNumber), 1),
        Some(75.0)
    );
    assert_eq!(
        report.full_score_beside(Some(Task::NiahNumber), 2),
        Some(100.0)
    );
    assert_eq!(report.task_score(Task::NiahNumber, 2), Some(50.0));
    assert_eq!(report.falloff(Task::NiahNumber), Some(2));
    assert_eq!(report.meets_goal(1), Some(true));
    assert_eq!(report.meets_goal(2), Some(false));
    assert_eq!(report.worst_cell(2), Some((100.0, 4000, 0.0)));
    let (hits, _) = report.layer_summaries(1);
    assert_eq!(hits.len(), 2);
    assert_eq!((hits[0].mean, hits[0].min, hits[0].count), (0.75, 0.5, 8));
    let markdown = report.markdown();
    assert!(
        markdown.contains("| niah-number | 75.0 | 75.0 (75.0) | 50.0 (100.0) |"),
        "{markdown}"
    );
    assert!(
        markdown.contains("| niah-number | S256 r160 c8 o48 bf16 host | 50.0 | 100.0 |"),
        "{markdown}"
    );
    let json = report.json();
    assert_eq!(json["falloff"]["niah-number"], "S256 r160 c8 o48 bf16 host");
    assert_eq!(json["outcomes"].as_array().unwrap().len(), 10);
    assert_eq!(json["modes"][2]["meets_goal"], false);
}
