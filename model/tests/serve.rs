//! Chunked prefill and continuous batching on the CPU reference path with the built-in
//! SmolLM2-135M-Instruct (fetched by tools/setup.sh): a prompt in pieces gives bit for bit
//! what one call gives, and every request served by the scheduler — joining and leaving at
//! any time, prompts in pieces, decoded in subsets and orders, short prompts in ShadowKV mode
//! — gets exactly the greedy tokens it gets alone. Short prompts and few tokens keep it fast.
use std::collections::BTreeMap;
use std::sync::OnceLock;

use shadowkv_model::{
    Backend, CacheMode, CpuBackend, CpuCache, CpuModel, Error, Event, FinishReason, ModelSource,
    PromptEnd, Request, RequestId, RequestProblem, Sampler, Scheduler, ShadowKvParams,
};

fn source() -> &'static ModelSource {
    static SOURCE: OnceLock<ModelSource> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let path = shadowkv_model::builtin_model_path().unwrap_or_else(|e| panic!("{e}"));
        ModelSource::open(&path).unwrap_or_else(|e| panic!("{e}"))
    })
}

fn model() -> &'static CpuModel {
    static MODEL: OnceLock<CpuModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let source = source();
        let weights = source
            .weights
            .load(&source.config, Ok)
            .unwrap_or_else(|e| panic!("{e}"));
        CpuModel::new(source.config.clone(), weights)
    })
}

/// Small enough for a chat prompt of a few words: 2-token chunks, one local chunk, so a
/// prompt of 18 tokens or more has the 8 chunks the shadow needs.
const SPARSE: ShadowKvParams = ShadowKvParams {
    chunk_size: 2,
    sparse_budget: 4,
    rank: 16,
    local_chunks: 1,
    outlier_chunks: 1,
};

/// A budget of 8 selectable chunks: prompts under 34 tokens are too short for it.
const TOO_BIG_A_BUDGET: ShadowKvParams = ShadowKvParams {
    sparse_budget: 16,
    ..SPARSE
};

/// `text`'s tokens without the chat template, whose system prompt would add 20-odd tokens to
/// every prompt.
fn raw(text: &str) -> Vec<u32> {
    source().prompt_tokens(text, false).unwrap()
}

/// Long enough for [`SPARSE`], too short for [`TOO_BIG_A_BUDGET`].
const LONG: &str = "The quick brown fox jumps over the lazy dog while the farmer sleeps under \
    the old oak tree in the summer sun.";

fn cache(mode: CacheMode) -> CpuCache {
    match mode {
        CacheMode::Full => CpuCache::new(&model().config),
        CacheMode::ShadowKv(params) => CpuCache::shadowkv(&model().config, params).unwrap(),
    }
}

/// `prompt` prefilled alone: the cache and the last logits, the prompt fed in one call (in a
/// piece closed by `finish_prompt` when it is too short for the mode's budget, which
/// `forward` refuses).
fn prefilled(prompt: &[u32], mode: CacheMode) -> (CpuCache, Vec<f32>) {
    // Building a shadow factorises every layer's keys, slow in a test build (the `shadowkv`
    // crate's reference is not optimised there): [`LONG`] in [`SPARSE`] is built once.
    static LONG_SPARSE: OnceLock<(CpuCache, Vec<f32>)> = OnceLock::new();
    if mode == CacheMode::ShadowKv(SPARSE) && prompt == raw(LONG) {
        return LONG_SPARSE
            .get_or_init(|| prefill_alone(prompt, mode))
            .clone();
    }
    prefill_alone(prompt, mode)
}

fn prefill_alone(prompt: &[u32], mode: CacheMode) -> (CpuCache, Vec<f32>) {
    let model = model();
    let mut cache = cache(mode);
    let logits = match mode {
        CacheMode::ShadowKv(params) if params.check_prompt(prompt.len()).is_err() => {
            let logits = model.prefill_piece(&mut cache, prompt).unwrap();
            model.finish_prompt(&mut cache).unwrap();
            logits
        }
        _ => model.forward(&mut cache, prompt).unwrap(),
    };
    (cache, logits)
}

/// The greedy tokens of `prompt` generated alone.
fn alone(prompt: &[u32], mode: CacheMode, steps: usize) -> Vec<u32> {
    let (mut cache, mut logits) = prefilled(prompt, mode);
    let mut sampler = Sampler::greedy();
    let mut tokens = Vec::new();
    loop {
        let token = sampler.sample(&logits);
        tokens.push(token);
        if tokens.len() == steps {
            return tokens;
        }
        logits = model().forward(&mut cache, &[token]).unwrap();
    }
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn a_prompt_in_pieces_gives_the_one_call_cache_and_logits_bit_for_bit() {
    let model = model();
    let prompt = raw(LONG);
    assert!(
        SPARSE.check_prompt(prompt.len()).is_ok(),
        "{}",
        prompt.len()
    );
    for mode in [CacheMode::Full, CacheMode::ShadowKv(SPARSE)] {
        let (mut whole, mut logits_whole) = prefilled(&prompt, mode);
        let mut pieces = cache(mode);
        let mut logits_pieces = Vec::new();
        for piece in [&prompt[..5], &prompt[5..6], &prompt[6..17], &prompt[17..]] {
            assert!(!pieces.prompt_complete());
            logits_pieces = model.prefill_piece(&mut pieces, piece).unwrap();
        }
        model.finish_prompt(&mut pieces).unwrap();
        assert_eq!(
            pieces.uses_shadows(),
            matches!(mode, CacheMode::ShadowKv(_))
        );
        assert!(pieces == whole, "{mode:?}: the caches differ");
        for step in 0..3 {
            assert_eq!(
                bits(&logits_pieces),
                bits(&logits_whole),
                "{mode:?}, step {step}"
            );
            let token = shadowkv_model::sampling::argmax(&logits_whole);
            logits_whole = model.forward(&mut whole, &[token]).unwrap();
            logits_pieces = model.forward(&mut pieces, &[token]).unwrap();
        }
    }
}

#[test]
fn a_prompt_too_short_for_the_budget_keeps_exact_attention() {
    let model = model();
    let prompt = raw(LONG);
    assert!(TOO_BIG_A_BUDGET.check_prompt(prompt.len()).is_err());
    let mut full = cache(CacheMode::Full);
    let mut short = cache(CacheMode::ShadowKv(TOO_BIG_A_BUDGET));
    let mut logits_full = model.forward(&mut full, &prompt).unwrap();
    let mut logits_short = model.prefill_piece(&mut short, &prompt).unwrap();
    model.finish_prompt(&mut short).unwrap();
    assert!(short.prompt_complete() && !short.uses_shadows());
    for _ in 0..2 {
        assert_eq!(bits(&logits_short), bits(&logits_full));
        let token = shadowkv_model::sampling::argmax(&logits_full);
        logits_full = model.forward(&mut full, &[token]).unwrap();
        logits_short = model.forward(&mut short, &[token]).unwrap();
    }
    // A closed prompt takes no more pieces and cannot be closed again.
    let error = model.prefill_piece(&mut short, &prompt[..1]).unwrap_err();
    assert!(error.to_string().contains("complete prompt"), "{error}");
    assert!(model.finish_prompt(&mut short).is_err());
    // `forward` keeps refusing a short prompt in one call, leaving the cache empty.
    let mut strict = cache(CacheMode::ShadowKv(TOO_BIG_A_BUDGET));
    let error = model.forward(&mut strict, &prompt).unwrap_err();
    assert!(error.to_string().contains("sparse budget"), "{error}");
    assert!(strict.is_empty() && !strict.prompt_complete());
}

/// Every request's tokens, from the events.
fn collect(events: Vec<Event>, tokens: &mut BTreeMap<RequestId, Vec<u32>>) -> Vec<RequestId> {
    let mut finished = Vec::new();
    for event in events {
        match event {
            Event::Token { id, token } => tokens.entry(id).or_default().push(token),
            Event::Finished { id, stats, .. } => {
                assert_eq!(stats.generated_tokens, tokens[&id].len());
                finished.push(id);
            }
        }
    }
    finished
}

#[test]
fn requests_joining_leaving_in_pieces_and_in_any_order_get_their_tokens_alone() {
    let long = raw(LONG);
    let other = raw("Two plus two is");
    let short = raw("Hello there, my friend!");
    let full_french = raw("Once upon a time,");
    // A starts first and runs longest, so it decodes while every other request joins.
    let (steps, a_steps) = (8, 16);
    let mut scheduler = Scheduler::new(CpuBackend::new(model()), 4);
    let mut tokens = BTreeMap::new();
    let mut finished = Vec::new();

    // A: full attention, whole prompt; it decodes while the others join.
    let a = scheduler
        .submit(Request::new(full_french.clone(), a_steps))
        .unwrap();
    // 4 tokens a step: every prompt is spread over steps.
    let step = |scheduler: &mut Scheduler<CpuBackend>, tokens: &mut _| {
        collect(scheduler.step().unwrap(), tokens)
    };
    for _ in 0..4 {
        if scheduler.is_decoding(a) {
            break;
        }
        finished.extend(step(&mut scheduler, &mut tokens));
    }
    assert!(scheduler.is_decoding(a));
    // B: ShadowKV, prompt in pieces of unknown total length.
    let b = scheduler
        .submit(
            Request::new(long[..7].to_vec(), steps)
                .with_mode(CacheMode::ShadowKv(SPARSE))
                .with_prompt_end(PromptEnd::Open),
        )
        .unwrap();
    finished.extend(step(&mut scheduler, &mut tokens));
    scheduler.push_prompt(b, &long[7..20], false).unwrap();
    finished.extend(step(&mut scheduler, &mut tokens));
    // C: ShadowKV with a budget its prompt is too short for; a declared length closes it.
    let c = scheduler
        .submit(
            Request::new(short[..2].to_vec(), steps)
                .with_mode(CacheMode::ShadowKv(TOO_BIG_A_BUDGET))
                .with_prompt_end(PromptEnd::Length(short.len())),
        )
        .unwrap();
    scheduler.push_prompt(b, &long[20..], true).unwrap();
    finished.extend(step(&mut scheduler, &mut tokens));
    scheduler.push_prompt(c, &short[2..], false).unwrap();
    // D: leaves after two tokens; E: cancelled after its first.
    let d = scheduler.submit(Request::new(other.clone(), 2)).unwrap();
    let e = scheduler
        .submit(Request::new(other.clone(), steps))
        .unwrap();
    // Until E has its first token (its prompt is the last in line).
    for _ in 0..12 {
        if scheduler.is_decoding(e) {
            break;
        }
        finished.extend(step(&mut scheduler, &mut tokens));
    }
    assert!(scheduler.is_decoding(e));
    scheduler.cancel(e).unwrap();
    // Subsets in chosen orders, then steps until every request is done.
    let decoding = |scheduler: &Scheduler<CpuBackend>, ids: &[RequestId]| -> Vec<RequestId> {
        ids.iter()
            .copied()
            .filter(|&id| scheduler.is_decoding(id))
            .collect()
    };
    for subset in [&[d, c][..], &[c, b, a], &[b, c], &[a], &[b, a, c]] {
        let subset = decoding(&scheduler, subset);
        eprintln!("decoding {subset:?}");
        finished.extend(collect(scheduler.decode(&subset).unwrap(), &mut tokens));
    }
    for _ in 0..a_steps {
        finished.extend(step(&mut scheduler, &mut tokens));
    }
    assert!(scheduler.is_idle());

    finished.sort();
    assert_eq!(finished, [a, b, c, d]);
    assert_eq!(
        tokens[&a],
        alone(&full_french, CacheMode::Full, a_steps),
        "A"
    );
    assert_eq!(
        tokens[&b],
        alone(&long, CacheMode::ShadowKv(SPARSE), steps),
        "B"
    );
    let c_alone = alone(&short, CacheMode::ShadowKv(TOO_BIG_A_BUDGET), steps);
    assert_eq!(tokens[&c], c_alone, "C");
    assert_eq!(c_alone, alone(&short, CacheMode::Full, steps), "C is exact");
    let other_alone = alone(&other, CacheMode::Full, steps);
    assert_eq!(tokens[&d], other_alone[..2], "D");
    assert_eq!(tokens[&e], other_alone[..tokens[&e].len()], "E");
    assert!(scheduler.backend().cache(a).is_none(), "A left the backend");
}

#[test]
fn end_of_generation_ids_finish_a_request() {
    let prompt = raw("The capital of France is");
    let expected = alone(&prompt, CacheMode::Full, 4);
    let mut scheduler = Scheduler::new(CpuBackend::new(model()), 64);
    let id = scheduler
        .submit(Request::new(prompt, 10).with_end_ids([expected[2]]))
        .unwrap();
    let mut events = Vec::new();
    while !scheduler.is_idle() {
        events.extend(scheduler.step().unwrap());
    }
    let generated: Vec<u32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Token { token, .. } => Some(*token),
            _ => None,
        })
        .collect();
    assert_eq!(generated, expected[..3]);
    assert!(matches!(
        events.last(),
        Some(Event::Finished { id: finished, reason: FinishReason::EndOfGeneration, .. }) if *finished == id
    ));
}

fn problem(error: Error) -> RequestProblem {
    match error {
        Error::Request { problem, .. } => problem,
        other => panic!("expected a request error, got {other}"),
    }
}

#[test]
fn bad_calls_are_typed_errors_that_leave_the_scheduler_usable() {
    let prompt = raw("Hello there, how are you?");
    let mut scheduler = Scheduler::new(CpuBackend::new(model()), 64);
    let vocab = scheduler.backend().vocab() as u32;
    // Input the scheduler refuses before anything is added.
    assert!(matches!(
        scheduler.submit(Request::new(vec![1, vocab], 2)),
        Err(Error::InvalidInput { .. })
    ));
    assert!(scheduler.submit(Request::new(Vec::new(), 2)).is_err());
    assert!(scheduler.submit(Request::new(prompt.clone(), 0)).is_err());
    let bad_params = ShadowKvParams { rank: 8, ..SPARSE };
    assert!(matches!(
        scheduler
            .submit(Request::new(prompt.clone(), 2).with_mode(CacheMode::ShadowKv(bad_params))),
        Err(Error::Parameters(_))
    ));
    assert!(scheduler.is_idle());

    let open = scheduler
        .submit(
            Request::new(prompt[..2].to_vec(), 3).with_prompt_end(PromptEnd::Length(prompt.len())),
        )
        .unwrap();
    let done = scheduler.submit(Request::new(prompt.clone(), 1)).unwrap();
    assert_eq!(
        problem(scheduler.decode(&[RequestId(99)]).unwrap_err()),
        RequestProblem::Unknown
    );
    assert_eq!(
        problem(scheduler.decode(&[open]).unwrap_err()),
        RequestProblem::Prefilling
    );
    let too_long = vec![1; prompt.len()];
    assert!(matches!(
        problem(scheduler.push_prompt(open, &too_long, false).unwrap_err()),
        RequestProblem::PastPromptLength { .. }
    ));
    assert!(matches!(
        problem(
            scheduler
                .push_prompt(open, &prompt[2..3], true)
                .unwrap_err()
        ),
        RequestProblem::ShortOfPromptLength { .. }
    ));
    assert!(scheduler.push_prompt(open, &[vocab], false).is_err());
    // `done` generates its one token and finishes in the first step.
    let events = scheduler.step().unwrap();
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Finished { id, .. } if *id == done)));
    assert_eq!(
        problem(scheduler.decode(&[done]).unwrap_err()),
        RequestProblem::Finished
    );
    assert_eq!(
        problem(
            scheduler
                .push_prompt(done, &prompt[..1], false)
                .unwrap_err()
        ),
        RequestProblem::Finished
    );
    assert_eq!(
        problem(scheduler.cancel(done).unwrap_err()),
        RequestProblem::Finished
    );
    // The rest of the prompt closes `open` at its declared length; more is refused.
    scheduler.push_prompt(open, &prompt[2..], false).unwrap();
    assert_eq!(
        problem(
            scheduler
                .push_prompt(open, &prompt[..1], false)
                .unwrap_err()
        ),
        RequestProblem::PromptComplete
    );
    let mut tokens = BTreeMap::new();
    collect(scheduler.step().unwrap(), &mut tokens);
    assert_eq!(
        problem(scheduler.decode(&[open, open]).unwrap_err()),
        RequestProblem::Repeated
    );
    while !scheduler.is_idle() {
        collect(scheduler.step().unwrap(), &mut tokens);
    }
    assert_eq!(tokens[&open], alone(&prompt, CacheMode::Full, 3));
}
