//! GPU equivalence of SYNTHETIC SELECTION (`kernels::scripted_selection`) with its CPU
//! reference on random ragged batches (odd and even shapes), and the decode step with a
//! scripted hit rate: each head's misses are exactly the scripted share. Without a GPU every
//! test here is reported as ignored (see `run_gpu_tests`).
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::kernels::scripted_selection::{self, hits_per_head};
use shadowkv::reference;
use shadowkv::reference::decode_step::HostLayer;
use shadowkv::{DecodeStep, Error, Gpu, RopeConfig, ShadowBatch, ShadowConfig, EMPTY_SLOT};
use shadowkv_suite::layers::{random_layer, small_layer, upload, SequenceSpec};
use shadowkv_suite::{poisoned, random_bf16, run_gpu_tests};

fn main() {
    run_gpu_tests(&[
        (
            "scripted_selection_matches_reference",
            scripted_matches_reference,
        ),
        ("step_with_scripted_hits_misses_the_rest", step_with_script),
        ("scripted_selection_rejects_bad_rates", rejects_bad_rates),
    ])
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: shadowkv_suite::proptest_cases(24),
        failure_persistence: None,
        max_shrink_iters: 0,
        ..Config::default()
    })
}

fn s<E: std::fmt::Display>(error: E) -> String {
    error.to_string()
}

/// Odd and even shapes: 1-3 KV heads, group 1-8, budgets from 1 to past a block of threads.
fn config_strategy() -> impl Strategy<Value = ShadowConfig> {
    (
        1usize..=3,
        1usize..=8,
        prop::sample::select(vec![64usize, 128, 256]),
        prop::sample::select(vec![1usize, 5, 8]),
        prop::sample::select(vec![1usize, 2, 7, 32, 100, 257, 300]),
    )
        .prop_map(
            |(kv_heads, group, head_dim, chunk_size, budget_chunks)| ShadowConfig {
                // At head dimension 256 only groups 1, 2 and 4 are compiled.
                q_heads: kv_heads
                    * if head_dim == 256 {
                        [1, 2, 4][group % 3]
                    } else {
                        group
                    },
                kv_heads,
                head_dim,
                chunk_size,
                rank: 16,
                budget_chunks,
            },
        )
}

/// Ragged sequences: landmarks from exactly the budget (no chunk outside the cache once it is
/// full) to far more.
fn specs_strategy(config: ShadowConfig) -> impl Strategy<Value = Vec<SequenceSpec>> {
    let c = config.chunk_size as u32;
    let k = config.budget_chunks as u32;
    let spec = (
        prop::sample::select(vec![0u32, 1, 3, 40, 700, 2000]),
        0u32..3,
        0u32..4,
    )
        .prop_map(move |(extra, local, outliers)| SequenceSpec {
            prompt_len: (k + extra + local + outliers) * c,
            local_chunks: local,
            outlier_chunks: outliers,
            generated: 1,
            spare: 0,
        });
    prop::collection::vec(spec, 1..=5)
}

fn rate_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), Just(0.6), Just(0.8), 0.0f64..=1.0]
}

fn case_strategy() -> impl Strategy<Value = (ShadowConfig, Vec<SequenceSpec>, f64, u64)> {
    config_strategy().prop_flat_map(|config| {
        (
            Just(config),
            specs_strategy(config),
            rate_strategy(),
            any::<u64>(),
        )
    })
}

/// Each head's landmark chunk ids.
fn landmark_ids(host: &HostLayer, config: &ShadowConfig) -> Vec<Vec<u32>> {
    let mut out = Vec::new();
    for s in &host.sequences {
        for h in 0..config.kv_heads as u32 {
            let base = s.landmark_base(h) as usize;
            out.push(host.chunk_ids[base..base + s.landmarks as usize].to_vec());
        }
    }
    out
}

/// A top-k-like selection (k landmark ids, in landmark order) and a resident set (a random
/// share of the selection, other landmark ids, empty slots; shuffled) per head.
fn random_selection_and_resident(
    rng: &mut StdRng,
    ids: &[Vec<u32>],
    k: usize,
) -> (Vec<u32>, Vec<u32>) {
    let (mut selection, mut resident) = (Vec::new(), Vec::new());
    for head in ids {
        let mut order: Vec<usize> = (0..head.len()).collect();
        order.shuffle(rng);
        let mut chosen: Vec<usize> = order[..k].to_vec();
        chosen.sort_unstable();
        let picked: Vec<u32> = chosen.iter().map(|&i| head[i]).collect();
        let others: Vec<u32> = order[k..].iter().map(|&i| head[i]).collect();
        let keep = rng.gen_range(0..=k);
        let other = rng.gen_range(0..=(k - keep).min(others.len()));
        let mut slots: Vec<u32> = picked[..keep].to_vec();
        slots.extend(&others[..other]);
        slots.resize(k, EMPTY_SLOT);
        slots.shuffle(rng);
        selection.extend(picked);
        resident.extend(slots);
    }
    (selection, resident)
}

fn scripted_matches_reference(gpu: &Gpu) -> Result<(), String> {
    runner()
        .run(&case_strategy(), |(config, specs, rate, seed)| {
            check_scripted(gpu, &config, &specs, rate, seed).map_err(TestCaseError::fail)
        })
        .map_err(s)
}

/// The kernel against the reference, exactly, for every head; the selection past the
/// batch's entries (poisoned) and the resident ids untouched; every output a distinct valid
/// chunk id with the scripted hits where the landmarks allow them.
fn check_scripted(
    gpu: &Gpu,
    config: &ShadowConfig,
    specs: &[SequenceSpec],
    rate: f64,
    seed: u64,
) -> Result<(), String> {
    let stream = gpu.stream();
    let mut rng = StdRng::seed_from_u64(seed);
    let host = random_layer(&mut rng, config, specs);
    let batch = ShadowBatch::new(stream, *config, &host.sequences).map_err(s)?;
    let k = config.budget_chunks;
    let ids = landmark_ids(&host, config);
    let (selection, resident) = random_selection_and_resident(&mut rng, &ids, k);
    const POISON: u32 = 0xdead_beef;
    let tail = 37;
    let mut padded = selection.clone();
    padded.extend(std::iter::repeat_n(POISON, tail));
    let mut d_selection = stream.clone_htod(&padded).map_err(s)?;
    let d_resident = stream.clone_htod(&resident).map_err(s)?;
    let d_ids = stream.clone_htod(&host.chunk_ids).map_err(s)?;
    // The whole batch, then again over the second part only where there is one (the first
    // part's rows must stay as the first launch left them).
    scripted_selection::run(
        gpu,
        stream,
        &batch,
        batch.whole(),
        &d_ids,
        &d_resident,
        &mut d_selection,
        rate,
    )
    .map_err(s)?;
    let out = stream.clone_dtoh(&d_selection).map_err(s)?;
    if out[selection.len()..].iter().any(|&x| x != POISON) {
        return Err("the kernel wrote past the batch's selection".into());
    }
    if stream.clone_dtoh(&d_resident).map_err(s)? != resident {
        return Err("the kernel changed the resident ids".into());
    }
    let hits = hits_per_head(rate, k).map_err(s)? as usize;
    for (index, head_ids) in ids.iter().enumerate() {
        let sequence = &host.sequences[index / config.kv_heads];
        let range = index * k..(index + 1) * k;
        let want = reference::scripted_selection::script(
            &selection[range.clone()],
            &resident[range.clone()],
            head_ids,
            sequence.chunks,
            hits,
        );
        let got = &out[range.clone()];
        if got != want {
            return Err(format!(
                "head {index}: {got:?}, reference {want:?} ({config:?}, rate {rate})"
            ));
        }
        let mut distinct = got.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        if distinct.len() != k || got.iter().any(|&c| c >= sequence.chunks) {
            return Err(format!("head {index}: duplicate or invalid ids {got:?}"));
        }
        let valid_resident = resident[range.clone()]
            .iter()
            .filter(|&&c| c != EMPTY_SLOT)
            .count();
        let outside = head_ids.len() - valid_resident;
        let want_hits = hits.min(valid_resident).max(k.saturating_sub(outside));
        let got_hits = reference::scripted_selection::hit_rate(got, &resident[range]) * k as f64;
        if got_hits.round() as usize != want_hits {
            return Err(format!(
                "head {index}: {got_hits} hits, scripted {want_hits}"
            ));
        }
    }
    if batch.batch() > 1 {
        let mut d_again = stream.clone_htod(&padded).map_err(s)?;
        let second = batch.part(1..batch.batch()).map_err(s)?;
        scripted_selection::run(
            gpu,
            stream,
            &batch,
            second,
            &d_ids,
            &d_resident,
            &mut d_again,
            rate,
        )
        .map_err(s)?;
        let again = stream.clone_dtoh(&d_again).map_err(s)?;
        let first = config.kv_heads * k;
        if again[..first] != selection[..first] || again[first..] != out[first..] {
            return Err("a part's launch touched other sequences or differed".into());
        }
    }
    Ok(())
}

/// Decode steps with a scripted hit rate: after the first step, every head misses exactly
/// the unscripted share (its landmarks hold at least that many chunks outside the cache),
/// the statistics say so, and the outputs are finite.
fn step_with_script(gpu: &Gpu) -> Result<(), String> {
    let stream = gpu.stream();
    for (kv_heads, group, k, batch, rate) in
        [(2, 4, 32, 3, 0.6), (3, 3, 7, 2, 0.8), (1, 1, 100, 4, 0.0)]
    {
        let config = ShadowConfig {
            q_heads: kv_heads * group,
            kv_heads,
            head_dim: 128,
            chunk_size: 8,
            rank: 32,
            budget_chunks: k,
        };
        let specs: Vec<SequenceSpec> = (0..batch)
            .map(|b| SequenceSpec {
                prompt_len: ((3 * k + 5 + 7 * b) * 8 + 3) as u32,
                local_chunks: 2,
                outlier_chunks: 1 + b as u32 % 2,
                generated: 4,
                spare: 2,
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(k as u64);
        let host = random_layer(&mut rng, &config, &specs);
        let mut layer = upload(gpu, &config, &host, false).map_err(s)?;
        let mut step = DecodeStep::new(gpu, RopeConfig::LLAMA_3, &layer.batch).map_err(s)?;
        step.set_scripted_hit_rate(Some(rate)).map_err(s)?;
        let hits = hits_per_head(rate, k).map_err(s)?;
        let elements = batch * config.q_heads * config.head_dim;
        for index in 0..4 {
            let q = random_bf16(&mut rng, elements, 2.0);
            let dq = stream.clone_htod(&q).map_err(s)?;
            let mut out = poisoned(gpu, elements).map_err(s)?;
            step.set_overlap(index % 2 == 0);
            step.run(gpu, &mut layer, &dq, &mut out).map_err(s)?;
            let stats = step.stats().map_err(s)?;
            if index > 0 {
                let want = (k as u32 - hits) as usize;
                if stats.misses_per_head.iter().any(|&m| m as usize != want) {
                    return Err(format!(
                        "step {index}: misses {:?}, scripted {want} per head (rate {rate}, k {k})",
                        stats.misses_per_head
                    ));
                }
            }
            let values = stream.clone_dtoh(&out).map_err(s)?;
            if let Some(i) = values.iter().position(|x| !x.to_f32().is_finite()) {
                return Err(format!("step {index}: output element {i} is {}", values[i]));
            }
        }
    }
    Ok(())
}

fn rejects_bad_rates(gpu: &Gpu) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(5);
    let (config, host) = small_layer(&mut rng);
    let layer = upload(gpu, &config, &host, false).map_err(s)?;
    let mut step = DecodeStep::new(gpu, RopeConfig::LLAMA_3, &layer.batch).map_err(s)?;
    let named = |result: shadowkv::Result<()>, what: &str| match result {
        Err(Error::InvalidArgument {
            argument: "hit_rate",
            ..
        }) => Ok(()),
        Err(other) => Err(format!(
            "{what}: expected an error naming hit_rate, got {other}"
        )),
        Ok(()) => Err(format!("{what}: expected an error, got Ok")),
    };
    for bad in [-0.1, 1.0 + 1e-9, f64::NAN, f64::INFINITY] {
        named(
            step.set_scripted_hit_rate(Some(bad)),
            &format!("step, {bad}"),
        )?;
        let stream = gpu.stream();
        let ids = stream.clone_htod(&host.chunk_ids).map_err(s)?;
        let mut selection = stream.clone_htod(&host.resident).map_err(s)?;
        named(
            scripted_selection::run(
                gpu,
                stream,
                &layer.batch,
                layer.batch.whole(),
                &ids,
                &layer.resident,
                &mut selection,
                bad,
            ),
            &format!("kernel, {bad}"),
        )?;
    }
    if step.scripted_hit_rate().is_some() {
        return Err("a rejected rate was kept".into());
    }
    step.set_scripted_hit_rate(Some(1.0)).map_err(s)?;
    step.set_scripted_hit_rate(None).map_err(s)?;
    Ok(())
}
