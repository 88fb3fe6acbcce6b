//! Continuous batching on the GPU model ([`GpuBackend`]): sequences decoded in subsets and in
//! any order, prompts arriving in pieces while others decode, and short prompts in a ShadowKV
//! batch each give the greedy tokens they give alone (SmolLM2-135M-Instruct, fetched by
//! tools/setup.sh); GPU and host memory stay flat over 10,000 scheduler steps with sequences
//! joining and leaving, and bad calls are typed errors that leave the backend usable (a small
//! model with synthetic weights). Without a GPU every test here is reported as ignored (see
//! `run_gpu_tests`).
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shadowkv::cache::{CacheCapacity, ValueHome};
use shadowkv::Gpu;
use shadowkv_model::{
    Backend, CacheMode, Error, Event, GpuBackend, GpuModel, GpuServeCapacity, ModelSource,
    Placement, PromptEnd, Request, RequestId, RequestProblem, Sampler, Scheduler,
};
use shadowkv_suite::run_gpu_tests;

#[path = "gpu_serve/support.rs"]
mod support;

use support::*;

fn main() {
    run_gpu_tests(&[
        (
            "gpu_serve_full_attention_subsets_and_interleaved_prefill_match_alone",
            full_subsets,
        ),
        (
            "gpu_serve_shadowkv_subsets_and_interleaved_prefill_match_alone",
            shadowkv_subsets,
        ),
        (
            "gpu_serve_short_prompts_join_a_shadowkv_batch_with_exact_attention",
            short_prompts,
        ),
        (
            "gpu_serve_memory_flat_over_10000_steps_of_joining_and_leaving",
            memory_flat,
        ),
        ("gpu_serve_rejects_bad_input_and_stays_usable", bad_input),
        (
            "gpu_decode_shadow_for_any_order_matches_the_whole_cache_step",
            shadow_subset_api,
        ),
    ])
}

/// Three prompts: each arrives in pieces while the others decode, the batches name subsets of
/// the sequences in varying orders, one sequence leaves and its block is taken by the next.
/// Each sequence's greedy tokens are the ones it gets alone through the model's own paths.
fn interleaved(
    source: &ModelSource,
    model: &GpuModel,
    mode: CacheMode,
    home: ValueHome,
) -> Result<(), String> {
    let prompts = [
        filler_prompt(source, 30, "The pass key is 68231.")?,
        filler_prompt(source, 45, "The cat is called Pebble.")?,
        filler_prompt(source, 38, "The train leaves at nine.")?,
        filler_prompt(source, 33, "The lake is frozen in January.")?,
    ];
    let mut driver = Driver::new(model, mode, home)?;
    let a = driver.add(&prompts[0], None)?;
    driver.piece(a)?;
    driver.prefill(a)?;
    let b = driver.add(&prompts[1], None)?;
    driver.piece(b)?;
    driver.decode(&[a])?;
    driver.piece(b)?;
    driver.decode(&[a])?;
    driver.prefill(b)?;
    for order in [[b, a], [a, b]] {
        driver.decode(&order)?;
    }
    driver.decode(&[b])?;
    let c = driver.add(&prompts[2], None)?;
    driver.piece(c)?;
    driver.decode(&[a, b])?;
    driver.piece(c)?;
    driver.decode(&[b])?;
    driver.prefill(c)?;
    driver.decode(&[c, a, b])?;
    driver.decode(&[b, c])?;
    driver.remove(a);
    let d = driver.add(&prompts[3], None)?;
    driver.piece(d)?;
    for _ in 0..3 {
        driver.decode(&[c, b])?;
    }
    driver.prefill(d)?;
    for order in [[d, b, c], [b, c, d], [c, d, b]] {
        driver.decode(&order)?;
    }
    for (i, sequence) in driver.sequences.iter().enumerate() {
        let (alone, logits) = match mode {
            CacheMode::Full => full_alone(model, &sequence.prompt, sequence.tokens.len())?,
            CacheMode::ShadowKv(params) => {
                shadow_alone(model, &sequence.prompt, sequence.tokens.len(), params, home)?
            }
        };
        let name = format!(
            "{mode:?} {home:?}, sequence {i} ({} prompt tokens)",
            sequence.prompt.len()
        );
        compare(&name, &sequence.tokens, &alone, &logits)?;
        eprintln!(
            "  {:?}",
            source.tokenizer.decode(&sequence.tokens).map_err(s)?
        );
    }
    Ok(())
}

fn full_subsets(_: &Gpu) -> Result<(), String> {
    let source = source()?;
    let model = smollm2(&source)?;
    interleaved(&source, &model, CacheMode::Full, ValueHome::Host)
}

fn shadowkv_subsets(_: &Gpu) -> Result<(), String> {
    let source = source()?;
    let model = smollm2(&source)?;
    for home in [ValueHome::Host, ValueHome::Device] {
        interleaved(&source, &model, CacheMode::ShadowKv(SMOLLM2_SPARSE), home)?;
    }
    Ok(())
}

/// A ShadowKV batch with prompts too short for the budget (a chat turn, 200 tokens) beside
/// long ones: the short ones decode with exact attention in the same steps and give the
/// tokens of full attention alone; the long ones give ShadowKV's alone.
fn short_prompts(_: &Gpu) -> Result<(), String> {
    let source = source()?;
    let model = smollm2(&source)?;
    let params = SMOLLM2_SPARSE;
    let prompts = [
        filler_prompt(&source, 30, "The pass key is 68231.")?,
        source
            .prompt_tokens("What is the capital of France?", true)
            .map_err(s)?,
        filler_prompt(&source, 8, "The cat is called Pebble.")?,
        filler_prompt(&source, 40, "The train leaves at nine.")?,
    ];
    let mut driver = Driver::new(&model, CacheMode::ShadowKv(params), ValueHome::Host)?;
    let ids: Vec<usize> = prompts
        .iter()
        .map(|prompt| driver.add(prompt, None))
        .collect::<Result<_, _>>()?;
    driver.prefill(ids[0])?;
    driver.piece(ids[3])?;
    driver.prefill(ids[1])?;
    driver.decode(&[ids[1], ids[0]])?;
    driver.prefill(ids[2])?;
    driver.decode(&[ids[2], ids[0], ids[1]])?;
    driver.prefill(ids[3])?;
    for step in 0..12 {
        let mut order = ids.clone();
        order.rotate_left(step % 4);
        driver.decode(&order)?;
    }
    for (i, sequence) in driver.sequences.iter().enumerate() {
        let long = params.check_prompt(sequence.prompt.len()).is_ok();
        let placement = driver.backend.placement(RequestId(i as u64));
        let placed = match placement {
            Some(Placement::Shadow) => long,
            Some(Placement::Exact { .. }) => !long,
            _ => false,
        };
        if !placed {
            return Err(format!(
                "sequence {i} ({} tokens) is at {placement:?}",
                sequence.prompt.len()
            ));
        }
        let (alone, logits) = if long {
            shadow_alone(
                &model,
                &sequence.prompt,
                sequence.tokens.len(),
                params,
                ValueHome::Host,
            )?
        } else {
            full_alone(&model, &sequence.prompt, sequence.tokens.len())?
        };
        let name = format!(
            "sequence {i} ({} prompt tokens, {})",
            sequence.prompt.len(),
            if long { "ShadowKV" } else { "exact" }
        );
        compare(&name, &sequence.tokens, &alone, &logits)?;
    }
    if (0..4).all(|i| driver.backend.placement(RequestId(i)) == Some(Placement::Shadow)) {
        return Err("no prompt was short enough to stay exact".into());
    }
    Ok(())
}

/// Resident host memory of the process, from /proc/self/status (0 where there is none).
fn resident_host_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
            let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kb * 1024)
        })
        .unwrap_or(0)
}

/// 10,000 scheduler steps on the synthetic model, about four requests live at a time, each
/// joining with a random prompt (some too short for ShadowKV's budget, some in full-attention
/// mode), a random length and random tokens, and leaving when done. Every 1,000 steps it
/// prints the GPU memory in use (`mem_get_info`), the pinned host memory the caches hold and
/// the process's resident host memory; after a warm-up of 2,000 steps none may grow.
fn memory_flat(_: &Gpu) -> Result<(), String> {
    const STEPS: usize = 10_000;
    const WARM_UP: usize = 2_000;
    /// What the readings may move by after the warm-up: the allocator's pools shift by a few
    /// MiB with the batch shapes, while a leak of one block or shadow per request would pass
    /// this within a few hundred requests.
    const GPU_SLACK: u64 = 16 << 20;
    const HOST_SLACK: u64 = 64 << 20;
    let model = small_synthetic()?;
    let gpu = model.gpu();
    let vocab = model.config.vocab as u32;
    // Room for twice the live requests, so that the caches' first-fit ranges never run out.
    let capacity = GpuServeCapacity {
        max_sequences: 8,
        max_tokens: 1024,
        max_generated: 256,
    };
    let backend =
        GpuBackend::new(&model, capacity, Some((SMALL_SPARSE, ValueHome::Host))).map_err(s)?;
    let mut scheduler = Scheduler::new(backend, 256);
    let mut rng = StdRng::seed_from_u64(11);
    let (mut joined, mut finished, mut shadows, mut exact) = (0usize, 0usize, 0usize, 0usize);
    let mut baseline: Option<(u64, u64, u64)> = None;
    let used_gpu = || -> Result<u64, String> {
        gpu.stream().synchronize().map_err(s)?;
        let (free, total) = gpu.context().mem_get_info().map_err(s)?;
        Ok((total - free) as u64)
    };
    for step in 1..=STEPS {
        while scheduler.live().len() < 4 {
            let len = if rng.gen_bool(0.3) {
                rng.gen_range(8..160)
            } else {
                rng.gen_range(160..700)
            };
            let prompt: Vec<u32> = (0..len).map(|_| rng.gen_range(0..vocab)).collect();
            let mode = if rng.gen_bool(0.25) {
                CacheMode::Full
            } else {
                CacheMode::ShadowKv(SMALL_SPARSE)
            };
            let request = Request::new(prompt, rng.gen_range(16..256)).with_mode(mode);
            scheduler.submit(request).map_err(s)?;
            joined += 1;
        }
        for event in scheduler.step().map_err(s)? {
            if let Event::Finished { .. } = event {
                finished += 1;
            }
        }
        for id in scheduler.live() {
            if scheduler.is_decoding(id) {
                match scheduler.backend().placement(id) {
                    Some(Placement::Shadow) => shadows += 1,
                    Some(Placement::Exact { .. }) => exact += 1,
                    _ => {}
                }
            }
        }
        if step % 1_000 == 0 {
            let pinned = scheduler
                .backend()
                .shadow_cache()
                .map(|shadow| shadow.memory_report().map(|r| r.host_bytes()))
                .transpose()
                .map_err(s)?
                .unwrap_or(0);
            let (gpu_bytes, host_bytes) = (used_gpu()?, resident_host_bytes());
            eprintln!(
                "step {step}: {joined} joined, {finished} finished; sequence-steps {shadows} \
                 through shadows, {exact} exact; GPU in use {:.1} MiB, pinned host {:.1} MiB, \
                 resident host {:.1} MiB",
                gpu_bytes as f64 / 1048576.0,
                pinned as f64 / 1048576.0,
                host_bytes as f64 / 1048576.0
            );
            match baseline {
                None if step >= WARM_UP => baseline = Some((gpu_bytes, pinned, host_bytes)),
                Some((gpu_base, pinned_base, host_base))
                    if gpu_bytes > gpu_base + GPU_SLACK
                        || pinned != pinned_base
                        || host_bytes > host_base + HOST_SLACK =>
                {
                    return Err(format!(
                        "memory grew after the warm-up: GPU {gpu_base} -> {gpu_bytes} bytes, \
                         pinned host {pinned_base} -> {pinned} bytes, resident host {host_base} \
                         -> {host_bytes} bytes"
                    ));
                }
                _ => {}
            }
        }
    }
    if shadows == 0 || exact == 0 || finished < 50 {
        return Err(format!(
            "the run did not exercise both kinds: {shadows} shadow and {exact} exact \
             sequence-steps, {finished} requests finished"
        ));
    }
    Ok(())
}

fn request_problem<T>(result: Result<T, Error>) -> Option<RequestProblem> {
    match result {
        Err(Error::Request { problem, .. }) => Some(problem),
        _ => None,
    }
}

/// Bad calls on the synthetic model — a decode naming an unknown sequence, a finished one,
/// one still prefilling, one twice, a token past the vocabulary, a piece past a sequence's
/// room, a ShadowKV sequence past its generated tokens, a prompt piece past the declared
/// length through the scheduler — are each a typed error. Run between normal calls, they
/// change nothing: the sequences give bit for bit the tokens of the same script without them.
fn bad_input(_: &Gpu) -> Result<(), String> {
    let model = small_synthetic()?;
    let mut rng = StdRng::seed_from_u64(3);
    let vocab = model.config.vocab as u32;
    let mut prompt =
        |len: usize| -> Vec<u32> { (0..len).map(|_| rng.gen_range(0..vocab)).collect() };
    let (long, middle, later) = (prompt(300), prompt(150), prompt(200));
    let mode = CacheMode::ShadowKv(SMALL_SPARSE);
    let script = |bad: bool| -> Result<Vec<Vec<u32>>, String> {
        let mut driver = Driver::new(&model, mode, ValueHome::Host)?;
        let check = |what: &str, got: Option<RequestProblem>, expected: RequestProblem| {
            if bad && got != Some(expected.clone()) {
                return Err(format!("{what}: {got:?}, expected {expected:?}"));
            }
            Ok(())
        };
        let a = driver.add(&long, None)?;
        driver.prefill(a)?;
        let b = driver.add(&middle, Some(CacheMode::Full))?;
        driver.piece(b)?;
        if bad {
            let token = *driver.sequences[a].tokens.last().unwrap();
            let backend = &mut driver.backend;
            let unknown = backend.decode(&[(RequestId(a as u64), token), (RequestId(9), 1)]);
            check(
                "an unknown sequence",
                request_problem(unknown),
                RequestProblem::Unknown,
            )?;
            let prefilling =
                backend.decode(&[(RequestId(a as u64), token), (RequestId(b as u64), 1)]);
            check(
                "a prefilling sequence",
                request_problem(prefilling),
                RequestProblem::Prefilling,
            )?;
            let twice =
                backend.decode(&[(RequestId(a as u64), token), (RequestId(a as u64), token)]);
            check(
                "a sequence twice",
                request_problem(twice),
                RequestProblem::Repeated,
            )?;
            if !matches!(
                backend.decode(&[(RequestId(a as u64), vocab)]),
                Err(Error::InvalidInput { .. })
            ) {
                return Err("a token past the vocabulary was not refused".into());
            }
            let past = backend.prefill(RequestId(b as u64), &vec![1; 2048]);
            check(
                "a piece past the block",
                request_problem(past),
                RequestProblem::PastCapacity {
                    capacity: 2048,
                    given: 2048 + PIECE,
                },
            )?;
        }
        driver.decode(&[a])?;
        driver.prefill(b)?;
        driver.decode(&[b, a])?;
        driver.remove(b);
        if bad {
            let finished = driver.backend.decode(&[(RequestId(b as u64), 1)]);
            check(
                "a finished sequence",
                request_problem(finished),
                RequestProblem::Finished,
            )?;
        }
        let c = driver.add(&later, None)?;
        driver.prefill(c)?;
        for _ in 0..6 {
            driver.decode(&[c, a])?;
        }
        if bad {
            // Sequence `a` generates up to max_generated (64) tokens, then is refused.
            while driver.sequences[a].tokens.len() <= 64 {
                driver.decode(&[a])?;
            }
            let token = *driver.sequences[a].tokens.last().unwrap();
            let full = driver.backend.decode(&[(RequestId(a as u64), token)]);
            if !matches!(
                request_problem(full),
                Some(RequestProblem::PastCapacity { .. })
            ) {
                return Err("a step past max_generated was not refused".into());
            }
        }
        driver.decode(&[c])?;
        Ok(driver.sequences.iter().map(|s| s.tokens.clone()).collect())
    };
    // The bad run decodes `a` further at the end: compare what both runs did.
    let clean = script(false)?;
    let with_bad_calls = script(true)?;
    let same = clean.len() == with_bad_calls.len()
        && clean
            .iter()
            .zip(&with_bad_calls)
            .all(|(clean, bad)| bad.starts_with(clean));
    if !same {
        return Err(format!(
            "the bad calls changed the tokens: {with_bad_calls:?} against {clean:?}"
        ));
    }
    // Through the scheduler: a piece past the declared prompt length is refused and the
    // request still gets the tokens of its prompt given whole.
    let capacity = GpuServeCapacity {
        max_sequences: 2,
        max_tokens: 512,
        max_generated: 16,
    };
    let run = |pieces: bool| -> Result<Vec<u32>, String> {
        let backend =
            GpuBackend::new(&model, capacity, Some((SMALL_SPARSE, ValueHome::Host))).map_err(s)?;
        // Pieces of 64 tokens whether the prompt came whole or in two parts (the first 128
        // tokens long), so both runs make the same passes.
        let mut scheduler = Scheduler::new(backend, 64);
        let request = Request::new(long.clone(), 6).with_mode(mode);
        let id = if pieces {
            let id = scheduler
                .submit(Request {
                    prompt: long[..128].to_vec(),
                    prompt_end: PromptEnd::Length(long.len()),
                    ..request
                })
                .map_err(s)?;
            scheduler.step().map_err(s)?;
            let past = scheduler.push_prompt(id, &vec![1; long.len()], false);
            if !matches!(
                request_problem(past),
                Some(RequestProblem::PastPromptLength { .. })
            ) {
                return Err("a piece past the declared prompt length was not refused".into());
            }
            scheduler.push_prompt(id, &long[128..], false).map_err(s)?;
            id
        } else {
            scheduler.submit(request).map_err(s)?
        };
        let mut tokens = Vec::new();
        while !scheduler.is_idle() {
            for event in scheduler.step().map_err(s)? {
                if let Event::Token { id: of, token } = event {
                    if of == id {
                        tokens.push(token);
                    }
                }
            }
        }
        Ok(tokens)
    };
    let (whole, in_pieces) = (run(false)?, run(true)?);
    if whole != in_pieces || whole.len() != 6 {
        return Err(format!(
            "the prompt given whole gives {whole:?}, in pieces with a refused one {in_pieces:?}"
        ));
    }
    Ok(())
}

fn widen(values: &[f32]) -> Vec<f64> {
    values.iter().map(|&v| v as f64).collect()
}

/// `GpuModel::decode_shadow_for` on the synthetic model: two sequences stepped in reversed
/// order give, row for row, the logits of `decode_shadow` over the whole cache (a copy built
/// from the same prompts); a step of one of them leaves the other's length alone; an empty
/// batch, a sequence named twice and a removed sequence are refused and change nothing.
fn shadow_subset_api(_: &Gpu) -> Result<(), String> {
    let model = small_synthetic()?;
    let vocab = model.config.vocab;
    let mut rng = StdRng::seed_from_u64(5);
    let prompts: Vec<Vec<u32>> = [300usize, 420]
        .iter()
        .map(|&len| (0..len).map(|_| rng.gen_range(0..vocab as u32)).collect())
        .collect();
    let capacity = CacheCapacity {
        max_sequences: 3,
        max_prompt_len: 420,
        max_prompt_tokens: 720,
        max_generated: 8,
    };
    let cache = || {
        model
            .new_shadow_cache(SMALL_SPARSE, ValueHome::Host, capacity)
            .map_err(s)
    };
    let (mut whole, mut subset) = (cache()?, cache()?);
    let (mut ids, mut next) = (Vec::new(), Vec::new());
    for prompt in &prompts {
        let (_, logits) = model
            .prefill_shadow(&mut whole, prompt, PIECE, |_| {})
            .map_err(s)?;
        let (id, _) = model
            .prefill_shadow(&mut subset, prompt, PIECE, |_| {})
            .map_err(s)?;
        ids.push(id);
        next.push(Sampler::greedy().sample(&logits));
    }
    let lens = subset.lens();
    for (what, batch) in [
        ("an empty batch", vec![]),
        ("a sequence twice", vec![(ids[0], 1), (ids[0], 2)]),
    ] {
        if model.decode_shadow_for(&mut subset, &batch).is_ok() {
            return Err(format!("{what} was accepted"));
        }
    }
    if subset.lens() != lens {
        return Err(format!(
            "refused steps moved the lengths to {:?}",
            subset.lens()
        ));
    }
    let mut worst = 0.0f64;
    for step in 0..4 {
        let together = model.decode_shadow(&mut whole, &next).map_err(s)?;
        let reversed = model
            .decode_shadow_for(&mut subset, &[(ids[1], next[1]), (ids[0], next[0])])
            .map_err(s)?;
        for b in 0..2 {
            let mine = &reversed[(1 - b) * vocab..(2 - b) * vocab];
            let theirs = &together[b * vocab..(b + 1) * vocab];
            let error = shadowkv::reference::relative_error(&widen(mine), &widen(theirs));
            worst = worst.max(error);
            if error > 1e-2 {
                return Err(format!(
                    "step {step}, sequence {b}: relative error {error:.3e} against the whole-cache step"
                ));
            }
        }
        next = together
            .chunks_exact(vocab)
            .map(|row| Sampler::greedy().sample(row))
            .collect();
    }
    eprintln!("reversed subset steps against whole-cache steps: worst relative error {worst:.3e}");
    let before = subset.lens();
    model
        .decode_shadow_for_greedy(&mut subset, &[(ids[1], next[1])])
        .map_err(s)?;
    if subset.lens() != [before[0], before[1] + 1] {
        return Err(format!(
            "a step of the second sequence moved the lengths from {before:?} to {:?}",
            subset.lens()
        ));
    }
    subset.remove_sequence(model.gpu(), ids[0]).map_err(s)?;
    if model
        .decode_shadow_for(&mut subset, &[(ids[0], next[0])])
        .is_ok()
    {
        return Err("a removed sequence was accepted".into());
    }
    model
        .decode_shadow_for(&mut subset, &[(ids[1], next[1])])
        .map_err(s)?;
    Ok(())
}
