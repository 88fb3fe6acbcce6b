//! GPU tests of the ShadowKV prefill and cache: the factorisation (`factorise`), the
//! prefill kernels (`shadow_prefill`) and `ShadowKvCache` against their CPU references, the
//! whole cache against full attention on structured keys, and bad input.
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use half::bf16;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::cache::{
    CacheCapacity, CacheShape, SequenceId, ShadowKvCache, ShadowKvParams, ValueHome,
};
use shadowkv::decode_step::inverse_frequencies;
use shadowkv::kernels::factorise::Factoriser;
use shadowkv::kernels::shadow_prefill::PrefillSource;
use shadowkv::reference::decode_step::{decode_step, HostLayer};
use shadowkv::reference::{self, relative_error};
use shadowkv::{
    DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, Gpu, LayerValues, RopeConfig,
    SequenceLayout, EMPTY_SLOT,
};
use shadowkv_suite::structured::{structured_prompt, Prompt};
use shadowkv_suite::{poisoned, proptest_runner, random_bf16, run_gpu_tests, to_f64};

fn main() {
    run_gpu_tests(&[
        ("factorisation_matches_reference", factorisation),
        ("prefill_matches_reference", prefill_cases),
        ("cache_matches_reference_over_256_steps", cache_over_steps),
        ("cache_against_full_attention_with_needle", accuracy),
        ("cache_rejects_bad_input", rejects_bad_input),
    ])
}

fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

/// An error's message prefixed with the call that returned it.
fn at<E: std::fmt::Display>(call: &'static str) -> impl Fn(E) -> String {
    move |error| format!("{call}: {error}")
}

fn fail(error: impl std::fmt::Display) -> proptest::test_runner::TestCaseError {
    proptest::test_runner::TestCaseError::fail(error.to_string())
}

/// Uploads `prompt` and prefills every layer of `id` with it.
fn prefill(
    gpu: &Gpu,
    cache: &mut ShadowKvCache,
    id: SequenceId,
    prompt: &Prompt,
) -> Result<(), String> {
    let upload = prompt.upload(gpu)?;
    let (pre, query, source) = (&upload.pre_rope, &upload.last_query, upload.source());
    for layer in 0..cache.shape().layers {
        cache
            .prefill_layer(gpu, layer, id, pre, &source, query)
            .map_err(at("prefill_layer"))?;
    }
    // The source buffers must outlive the offload: wait before they drop.
    cache.check_prefill().map_err(at("check_prefill"))?;
    Ok(())
}

/// The cache's layer as the references see it: every live sequence's layout, in
/// `sequences()` order, and the whole resident buffer (each sequence at its row).
fn host_layer(gpu: &Gpu, cache: &ShadowKvCache, layer: usize) -> Result<HostLayer, String> {
    cache.check_prefill().map_err(s)?;
    let l = cache.layer(layer).map_err(s)?;
    let stream = gpu.stream();
    stream.synchronize().map_err(s)?;
    let sequences = cache
        .sequences()
        .into_iter()
        .map(|id| cache.layout(layer, id))
        .collect::<shadowkv::Result<Vec<_>>>()
        .map_err(s)?;
    Ok(HostLayer {
        sequences,
        landmarks: stream.clone_dtoh(&l.landmarks).map_err(s)?,
        chunk_ids: stream.clone_dtoh(&l.chunk_ids).map_err(s)?,
        a: stream.clone_dtoh(&l.a).map_err(s)?,
        bm: stream.clone_dtoh(&l.bm).map_err(s)?,
        values: match &l.values {
            LayerValues::Host(buffer) => buffer.as_slice().map_err(s)?.to_vec(),
            LayerValues::Device(slice) => stream.clone_dtoh(slice).map_err(s)?,
            LayerValues::HostPacked(..) | LayerValues::DevicePacked(..) => {
                return Err("the cache's values are compressed, not bf16".into())
            }
        },
        k: stream.clone_dtoh(&l.k).map_err(s)?,
        v: stream.clone_dtoh(&l.v).map_err(s)?,
        resident: stream.clone_dtoh(&l.resident).map_err(s)?,
    })
}

/// `A · Bm` of one sequence, `[L, w]` in f64.
fn rebuilt_keys(a: &[bf16], bm: &[bf16], len: usize, rank: usize, width: usize) -> Vec<f64> {
    let mut keys = vec![0.0f64; len * width];
    for t in 0..len {
        for i in 0..rank {
            let x = a[t * rank + i].to_f64();
            for (out, b) in keys[t * width..(t + 1) * width]
                .iter_mut()
                .zip(&bm[i * width..(i + 1) * width])
            {
                *out += x * b.to_f64();
            }
        }
    }
    keys
}

fn factorisation(gpu: &Gpu) -> Result<(), String> {
    let mut runner = proptest_runner(6);
    let strategy = (
        prop::sample::select(vec![
            (1usize, 64usize),
            (2, 64),
            (4, 64),
            (8, 128),
            (1, 256),
        ]),
        prop::sample::select(vec![16usize, 48, 160]),
        257usize..3001,
        any::<u64>(),
    );
    runner
        .run(&strategy, |((heads, d), rank, len, seed)| {
            let width = heads * d;
            let rank = rank.min(width);
            let mut rng = StdRng::seed_from_u64(seed);
            let shape = CacheShape {
                layers: 1,
                q_heads: heads,
                kv_heads: heads,
                head_dim: d,
                rope: RopeConfig::LLAMA_3,
            };
            let prompt = structured_prompt(&mut rng, &shape, len, rank / 2 + 3, 0.05, None, 8);
            let stream = gpu.stream();
            let mut factoriser = Factoriser::new(stream, width, 1).map_err(fail)?;
            let keys = stream.clone_htod(&prompt.pre_rope).map_err(fail)?;
            let mut a = poisoned(gpu, len * rank).map_err(fail)?;
            let mut bm = poisoned(gpu, rank * width).map_err(fail)?;
            factoriser
                .run(gpu, &keys, rank, 0, &mut a, &mut bm)
                .map_err(fail)?;
            factoriser.check().map_err(fail)?;
            let spectrum = factoriser.spectrum().map_err(fail)?;
            let a = stream.clone_dtoh(&a).map_err(fail)?;
            let bm = stream.clone_dtoh(&bm).map_err(fail)?;
            let gpu_keys = rebuilt_keys(&a, &bm, len, rank, width);
            let exact: Vec<f32> = prompt.pre_rope.iter().map(|k| k.to_f32()).collect();
            let (ref_a, ref_bm) = reference::factorise::factorise(&exact, width, rank);
            let mut ref_keys = vec![0.0f64; len * width];
            for t in 0..len {
                for i in 0..rank {
                    for j in 0..width {
                        ref_keys[t * width + j] +=
                            ref_a[t * rank + i] as f64 * ref_bm[i * width + j] as f64;
                    }
                }
            }
            let exact64: Vec<f64> = exact.iter().map(|&x| x as f64).collect();
            let against_reference = relative_error(&gpu_keys, &ref_keys);
            let gpu_error = relative_error(&gpu_keys, &exact64);
            let best = relative_error(&ref_keys, &exact64);
            let predicted = spectrum.relative_error(rank);
            eprintln!(
                "factorise L {len} w {width} r {rank}: vs reference {against_reference:.2e}, \
                 ‖K−A·Bm‖/‖K‖ {gpu_error:.4} (best {best:.4}, from the spectrum {predicted:.4})"
            );
            // Subspace iteration finds the leading directions; where the spectrum's tail is
            // flat (noise) it may keep other, equally good noise directions than the exact
            // reference, so the factors are held to the best error, not to the reference's
            // rows: within 2% of the best plus the bf16 rounding of A and Bm (2.9e-3 of ‖K‖
            // where the rank is the whole width and the best error is 0).
            prop_assert!(
                gpu_error <= best * 1.02 + 4e-3,
                "{gpu_error} vs best {best}"
            );
            prop_assert!(
                (predicted - gpu_error).abs() < 5e-3,
                "{predicted} vs {gpu_error}"
            );
            prop_assert!(against_reference < 2.0 * best + 1e-2, "{against_reference}");
            Ok(())
        })
        .map_err(s)
}

/// A small random cache shape and parameters.
fn small_setup(rng: &mut StdRng) -> (CacheShape, ShadowKvParams) {
    let heads = [1usize, 2, 4][rng.gen_range(0..3)];
    let group = [1usize, 2, 4][rng.gen_range(0..3)];
    let d = [64usize, 128, 256][rng.gen_range(0..3)];
    let chunk_size = [4usize, 8, 16][rng.gen_range(0..3)];
    let shape = CacheShape {
        layers: 2,
        q_heads: heads * group,
        kv_heads: heads,
        head_dim: d,
        rope: RopeConfig::LLAMA_3,
    };
    let params = ShadowKvParams {
        chunk_size,
        sparse_budget: chunk_size * rng.gen_range(2..12),
        rank: [16usize, 32, 48][rng.gen_range(0..3)],
        local_chunks: rng.gen_range(0..5),
        outlier_chunks: rng.gen_range(0..7),
    };
    (shape, params)
}

fn prefill_cases(gpu: &Gpu) -> Result<(), String> {
    let cases = shadowkv_suite::proptest_cases(8);
    for case in 0..cases {
        let mut rng = StdRng::seed_from_u64(0x5eed + case as u64);
        let (shape, params) = small_setup(&mut rng);
        let values_home = [ValueHome::Host, ValueHome::Device][case as usize % 2];
        let lens: Vec<usize> = (0..rng.gen_range(1..4))
            .map(|_| rng.gen_range(params.sparse_budget + 100..3000))
            .collect();
        let capacity = CacheCapacity {
            max_sequences: 3,
            max_prompt_len: 3000,
            max_prompt_tokens: 9000,
            max_generated: 8,
        };
        let mut cache = ShadowKvCache::new(gpu, shape, params, values_home, capacity).map_err(s)?;
        let mut prompts = Vec::new();
        for &len in &lens {
            let id = cache.add_sequence(gpu, len).map_err(s)?;
            let prompt = structured_prompt(&mut rng, &shape, len, 12, 0.2, None, 8);
            prefill(gpu, &mut cache, id, &prompt)
                .map_err(|e| format!("{params:?} {lens:?}: {e}"))?;
            prompts.push(prompt);
        }
        check_prefill(gpu, &cache, &shape, &params, &prompts).map_err(|e| {
            format!("case {case} {shape:?} {params:?} {values_home:?} {lens:?}: {e}")
        })?;
    }
    Ok(())
}

/// Every prefilled part of layer 0 against the references.
fn check_prefill(
    gpu: &Gpu,
    cache: &ShadowKvCache,
    shape: &CacheShape,
    params: &ShadowKvParams,
    prompts: &[Prompt],
) -> Result<(), String> {
    let host = host_layer(gpu, cache, 0)?;
    let config = *cache.config();
    let (heads, d, c) = (shape.kv_heads, shape.head_dim, params.chunk_size);
    let width = shape.kv_width();
    let frequencies = inverse_frequencies(&shape.rope, d as u32);
    let scratch = cache.prefill_scratch();
    let stream = gpu.stream();
    // The scratch holds the last prefilled prompt's statistics (the last sequence's layer 1):
    // check its cosines and outlier split, and every sequence's state below.
    let min_cosine = stream.clone_dtoh(&scratch.min_cosine).map_err(s)?;
    let means = stream.clone_dtoh(&scratch.chunk_means).map_err(s)?;
    let (mut worst_mean, mut worst_cos, mut worst_keys, mut worst_factor) =
        (0f64, 0f64, 0f64, 0f64);
    for (b, (sequence, prompt)) in host.sequences.iter().zip(prompts).enumerate() {
        let chunks = sequence.chunks as usize;
        let last = b + 1 == prompts.len();
        let (ref_means, ref_cos) = reference::shadow_prefill::chunk_statistics(
            &prompt.keys,
            prompt.layout,
            heads,
            d,
            c,
            chunks,
        );
        let outliers = chunks - sequence.landmarks as usize;
        // Factors: A·Bm against the pre-RoPE keys.
        let a = &host.a[sequence.a_offset as usize..][..prompt.len * params.rank];
        let bm = &host.bm[sequence.bm_offset as usize..][..params.rank * width];
        let rebuilt = rebuilt_keys(a, bm, prompt.len, params.rank, width);
        let factor_error = relative_error(&rebuilt, &to_f64(&prompt.pre_rope));
        worst_factor = worst_factor.max(factor_error);
        if factor_error > 0.2 {
            return Err(format!("sequence {b}: factor error {factor_error}"));
        }
        for h in 0..heads {
            let (gpu_outliers, kept) = if last {
                let cos = &min_cosine[h * chunks..(h + 1) * chunks];
                for (x, y) in cos.iter().zip(&ref_cos[h]) {
                    worst_cos = worst_cos.max((*x as f64 - y).abs());
                }
                let mean = to_f64(&means[h * chunks * d..(h + 1) * chunks * d]);
                worst_mean = worst_mean.max(relative_error(&mean, &ref_means[h]));
                reference::shadow_prefill::outliers(cos, outliers)
            } else {
                // Earlier sequences: the kept ids must be ascending and leave `outliers` out.
                let base = sequence.landmark_base(h as u32) as usize;
                let kept = host.chunk_ids[base..base + sequence.landmarks as usize].to_vec();
                let all: Vec<u32> = (0..chunks as u32)
                    .filter(|j| kept.binary_search(j).is_err())
                    .collect();
                (all, kept)
            };
            let base = sequence.landmark_base(h as u32) as usize;
            let ids = &host.chunk_ids[base..base + sequence.landmarks as usize];
            if ids != kept.as_slice() {
                return Err(format!(
                    "sequence {b} head {h}: chunk ids differ from the reference"
                ));
            }
            // Landmarks: each kept chunk's mean (bf16).
            let mut landmarks = Vec::new();
            let mut expected = Vec::new();
            for (row, &chunk) in ids.iter().enumerate() {
                landmarks.extend(to_f64(&host.landmarks[(base + row) * d..][..d]));
                expected.extend(&ref_means[h][chunk as usize * d..][..d]);
            }
            let landmark_error = relative_error(&landmarks, &expected);
            if landmark_error > 1e-2 {
                return Err(format!("sequence {b} head {h}: landmarks {landmark_error}"));
            }
            // Exact rows: bitwise the prompt's keys and values.
            let tokens =
                reference::shadow_prefill::exact_tokens(prompt.len, chunks, c, &gpu_outliers);
            if tokens.len() != sequence.sparse_start as usize {
                return Err(format!(
                    "sequence {b}: {} exact rows, sparse_start {}",
                    tokens.len(),
                    sequence.sparse_start
                ));
            }
            for (row, &token) in tokens.iter().enumerate() {
                let source = prompt.layout.offset as usize
                    + (h * prompt.layout.capacity as usize + token) * d;
                let target = sequence.kv_row(h as u32, row as u32, d as u32) as usize;
                if host.k[target..target + d] != prompt.keys[source..source + d]
                    || host.v[target..target + d] != prompt.values[source..source + d]
                {
                    return Err(format!(
                        "sequence {b} head {h}: exact row {row} (token {token}) differs"
                    ));
                }
            }
            // Values offloaded: the prompt's, chunk-major per head.
            let offloaded = &host.values
                [sequence.host_value_offset as usize + h * prompt.len * d..][..prompt.len * d];
            let start = prompt.layout.offset as usize + h * prompt.layout.capacity as usize * d;
            if offloaded != &prompt.values[start..start + prompt.len * d] {
                return Err(format!("sequence {b} head {h}: offloaded values differ"));
            }
            // First selection: the top-k of the last query's scores, every slot filled.
            let logits = reference::scoring::logits(
                &config,
                sequence,
                b,
                h,
                &stacked_queries(prompts),
                &host.landmarks,
                1.0 / (d as f64).sqrt(),
            );
            let scores = reference::scoring::scores(&logits);
            let rounded: Vec<f32> = scores.iter().map(|&x| x as f32).collect();
            let selection = reference::topk::select(&rounded, ids, config.budget_chunks);
            let slots = sequence.resident_base(h as u32, heads as u32, config.budget_chunks as u32);
            let resident = &host.resident[slots..slots + config.budget_chunks];
            let mut expected_resident = vec![EMPTY_SLOT; config.budget_chunks];
            reference::plan::plan(&selection, &mut expected_resident);
            if resident != expected_resident.as_slice() {
                let mut got = resident.to_vec();
                got.sort_unstable();
                let mut want = selection.clone();
                want.sort_unstable();
                // Near-ties between f32 and f64 scores may swap a chunk; anything else is a bug.
                let differing = got
                    .iter()
                    .filter(|x| want.binary_search(x).is_err())
                    .count();
                if differing > 1 {
                    return Err(format!(
                        "sequence {b} head {h}: first selection {got:?}, expected {want:?}"
                    ));
                }
            }
            for (slot, &chunk) in resident.iter().enumerate() {
                let row = sequence.sparse_start as usize + slot * c;
                let target = sequence.kv_row(h as u32, row as u32, d as u32) as usize;
                let source = prompt.layout.offset as usize
                    + (h * prompt.layout.capacity as usize + chunk as usize * c) * d;
                if host.v[target..target + c * d] != prompt.values[source..source + c * d] {
                    return Err(format!("sequence {b} head {h}: slot {slot} values differ"));
                }
                let keys = reference::rebuild::chunk_keys(
                    &config,
                    sequence,
                    h,
                    chunk,
                    &host.a,
                    &host.bm,
                    &frequencies,
                );
                let error = relative_error(&to_f64(&host.k[target..target + c * d]), &keys);
                worst_keys = worst_keys.max(error);
                if error > 1e-2 {
                    return Err(format!("sequence {b} head {h}: slot {slot} keys {error}"));
                }
            }
        }
    }
    eprintln!(
        "prefill {shape:?} {params:?}: means {worst_mean:.1e}, cosines {worst_cos:.1e}, \
         rebuilt slot keys {worst_keys:.1e}, factors {worst_factor:.3}"
    );
    if worst_mean > 1e-2 || worst_cos > 1e-3 {
        return Err(format!("means {worst_mean}, cosines {worst_cos}"));
    }
    Ok(())
}

fn stacked_queries(prompts: &[Prompt]) -> Vec<bf16> {
    prompts
        .iter()
        .flat_map(|p| p.last_query.iter().copied())
        .collect()
}

fn cache_over_steps(gpu: &Gpu) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(0xcafe);
    let shape = CacheShape {
        layers: 2,
        q_heads: 8,
        kv_heads: 2,
        head_dim: 128,
        rope: RopeConfig::LLAMA_3,
    };
    let params = ShadowKvParams {
        chunk_size: 8,
        sparse_budget: 256,
        rank: 64,
        local_chunks: 4,
        outlier_chunks: 8,
    };
    let steps = 256;
    let lens = [1531usize, 2048, 3077, 1100];
    let capacity = CacheCapacity {
        max_sequences: 5,
        max_prompt_len: 4000,
        max_prompt_tokens: 12000,
        max_generated: steps,
    };
    let mut cache = ShadowKvCache::new(gpu, shape, params, ValueHome::Host, capacity).map_err(s)?;
    let mut ids = Vec::new();
    for &len in &lens {
        let id = cache.add_sequence(gpu, len).map_err(s)?;
        let prompt = structured_prompt(&mut rng, &shape, len, 16, 0.3, None, 8);
        prefill(gpu, &mut cache, id, &prompt)?;
        ids.push(id);
    }
    let config = *cache.config();
    let frequencies = inverse_frequencies(&shape.rope, shape.head_dim as u32);
    let mut hosts: Vec<HostLayer> = (0..shape.layers)
        .map(|l| host_layer(gpu, &cache, l))
        .collect::<Result<_, _>>()?;
    let stream = gpu.stream().clone();
    let mut free_before = 0;
    let (mut worst, mut hits, mut selected) = (0f64, 0u64, 0u64);
    for step in 0..steps {
        if step == 1 {
            // After one step: the driver loads each kernel's code on its first launch (lazy
            // module loading), which is not growth from step to step.
            free_before = gpu.context().mem_get_info().map_err(s)?.0;
        }
        if step == steps / 2 {
            // A sequence leaves between steps; the others go on from their state.
            cache.remove_sequence(gpu, ids.remove(1)).map_err(s)?;
            hosts = (0..shape.layers)
                .map(|l| host_layer(gpu, &cache, l))
                .collect::<Result<_, _>>()?;
        }
        let batch = ids.len();
        for (layer, host) in hosts.iter_mut().enumerate() {
            let q = random_bf16(&mut rng, batch * shape.q_heads * shape.head_dim, 1.0);
            let keys = random_bf16(&mut rng, batch * shape.kv_heads * shape.head_dim, 1.0);
            let values = random_bf16(&mut rng, batch * shape.kv_heads * shape.head_dim, 1.0);
            let (q_gpu, k_gpu, v_gpu) = (
                stream.clone_htod(&q).map_err(s)?,
                stream.clone_htod(&keys).map_err(s)?,
                stream.clone_htod(&values).map_err(s)?,
            );
            let mut out = poisoned(gpu, q.len()).map_err(s)?;
            cache.append(gpu, layer, &k_gpu, &v_gpu).map_err(s)?;
            cache
                .decode_layer(gpu, layer, &q_gpu, &mut out)
                .map_err(s)?;
            let stats = cache.step_stats().map_err(s)?;
            hits += stats.selected - stats.misses;
            selected += stats.selected;
            let out = stream.clone_dtoh(&out).map_err(s)?;
            // The reference: the same append, then the same step (top-k from the GPU's scores so
            // near-ties break alike).
            reference::cache::append(
                &host.sequences,
                shape.kv_heads,
                shape.head_dim,
                &keys,
                &values,
                &mut host.k,
                &mut host.v,
            );
            for sequence in host.sequences.iter_mut() {
                sequence.kv.len += 1;
            }
            let layer_state = cache.layer(layer).map_err(s)?;
            if layer_state.batch.sequences() != host.sequences.as_slice() {
                return Err(format!("step {step} layer {layer}: layouts differ"));
            }
            let device_scores = device_scores(gpu, &cache, host)?;
            let expected = decode_step(&config, &frequencies, host, &q, Some(&device_scores));
            let error = relative_error(&to_f64(&out), &expected.out);
            worst = worst.max(error);
            if error > 1e-2 {
                return Err(format!("step {step} layer {layer}: relative error {error}"));
            }
            let resident = stream.clone_dtoh(&layer_state.resident).map_err(s)?;
            if resident[..host.resident.len().min(resident.len())] != host.resident[..] {
                return Err(format!("step {step} layer {layer}: resident ids differ"));
            }
        }
    }
    let (free_after, _) = gpu.context().mem_get_info().map_err(s)?;
    eprintln!(
        "cache over {steps} steps, {} layers, prompts {lens:?} (one removed at step {}): worst \
         relative error {worst:.2e}, hit rate {:.3}, free GPU memory {free_before} -> {free_after}",
        shape.layers,
        steps / 2,
        hits as f64 / selected as f64
    );
    if free_after < free_before {
        return Err(format!(
            "GPU memory grew by {} bytes",
            free_before - free_after
        ));
    }
    Ok(())
}

/// The GPU's landmark scores of the latest step, per (sequence, head).
fn device_scores(
    gpu: &Gpu,
    cache: &ShadowKvCache,
    host: &HostLayer,
) -> Result<Vec<Vec<f32>>, String> {
    let scores = gpu
        .stream()
        .clone_dtoh(&cache.step_scratch().scores)
        .map_err(s)?;
    let heads = cache.shape().kv_heads;
    let mut out = Vec::new();
    for sequence in &host.sequences {
        for h in 0..heads {
            let base = sequence.landmark_base(h as u32) as usize;
            out.push(scores[base..base + sequence.landmarks as usize].to_vec());
        }
    }
    Ok(out)
}

/// Structured keys at Llama-3-8B heads, a planted needle chunk and a query that looks for it:
/// ShadowKV's output against full attention over the exact keys, by budget and rank.
fn accuracy(gpu: &Gpu) -> Result<(), String> {
    let shape = CacheShape {
        layers: 1,
        ..CacheShape::LLAMA_3_8B
    };
    let (heads, d, group) = (
        shape.kv_heads,
        shape.head_dim,
        shape.q_heads / shape.kv_heads,
    );
    let stream = gpu.stream().clone();
    eprintln!("| context | budget | rank | relative error vs full | needle selected |");
    eprintln!("| ---: | ---: | ---: | ---: | --- |");
    for &len in &[4096usize, 32768, 131072] {
        let mut rng = StdRng::seed_from_u64(len as u64);
        let needle_chunk = len / 8 / 3;
        let prompt = structured_prompt(&mut rng, &shape, len, 32, 0.05, Some(needle_chunk), 8);
        // The query: each group's heads look along the needle's post-RoPE key.
        let needle_token = needle_chunk * 8 + 3;
        // Scaled so that the needle takes about 90% of the attention at every length (its
        // logits are 12 + ln(L / 4096) against about N(0, 0.6) for the rest), as a retrieval
        // query's target does.
        let mut q = vec![bf16::ZERO; shape.q_heads * d];
        for h in 0..heads {
            let at = prompt.layout.offset as usize
                + (h * prompt.layout.capacity as usize + needle_token) * d;
            let key = &prompt.keys[at..at + d];
            let norm: f32 = key.iter().map(|k| k.to_f32() * k.to_f32()).sum();
            let logit = 12.0 + (len as f32 / 4096.0).ln();
            let scale = logit * (d as f32).sqrt() / norm.max(1e-6);
            for g in 0..group {
                for j in 0..d {
                    q[(h * group + g) * d + j] = bf16::from_f32(key[j].to_f32() * scale);
                }
            }
        }
        // Full attention over the prompt plus the new token (its key: the last prompt key).
        let full_len = len + 1;
        let mut full_k = vec![bf16::ZERO; heads * full_len * d];
        let mut full_v = full_k.clone();
        let new_k = random_bf16(&mut rng, heads * d, 1.0);
        let new_v = random_bf16(&mut rng, heads * d, 1.0);
        for h in 0..heads {
            let start = prompt.layout.offset as usize + h * prompt.layout.capacity as usize * d;
            full_k[h * full_len * d..][..len * d]
                .copy_from_slice(&prompt.keys[start..start + len * d]);
            full_v[h * full_len * d..][..len * d]
                .copy_from_slice(&prompt.values[start..start + len * d]);
            full_k[(h * full_len + len) * d..][..d].copy_from_slice(&new_k[h * d..(h + 1) * d]);
            full_v[(h * full_len + len) * d..][..d].copy_from_slice(&new_v[h * d..(h + 1) * d]);
        }
        let attention_shape = DecodeAttentionShape {
            batch: 1,
            q_heads: shape.q_heads,
            kv_heads: heads,
            head_dim: d,
        };
        let full_layout = SequenceLayout {
            offset: 0,
            capacity: full_len as u32,
            len: full_len as u32,
        };
        let plan = DecodeAttentionPlan::for_gpu(gpu, attention_shape, &[full_layout])
            .map_err(at("full attention plan"))?;
        let mut attention = DecodeAttention::new(gpu, plan).map_err(at("full attention"))?;
        let q_gpu = stream.clone_htod(&q).map_err(s)?;
        let (k_gpu, v_gpu) = (
            stream.clone_htod(&full_k).map_err(s)?,
            stream.clone_htod(&full_v).map_err(s)?,
        );
        let mut full_out = poisoned(gpu, q.len()).map_err(s)?;
        attention
            .run(gpu, &stream, &q_gpu, &k_gpu, &v_gpu, &mut full_out)
            .map_err(at("full attention run"))?;
        let full_out = to_f64(&stream.clone_dtoh(&full_out).map_err(s)?);
        drop((k_gpu, v_gpu));
        for &(budget, rank) in &[(1024usize, 96usize), (2048, 96), (2048, 160)] {
            let params = ShadowKvParams {
                sparse_budget: budget,
                rank,
                ..ShadowKvParams::default()
            };
            let capacity = CacheCapacity::uniform(1, len, 4);
            let mut cache = ShadowKvCache::new(gpu, shape, params, ValueHome::Host, capacity)
                .map_err(at("ShadowKvCache::new"))?;
            let id = cache.add_sequence(gpu, len).map_err(at("add_sequence"))?;
            prefill(gpu, &mut cache, id, &prompt).map_err(|e| format!("prefill: {e}"))?;
            let (k_new, v_new) = (
                stream.clone_htod(&new_k).map_err(s)?,
                stream.clone_htod(&new_v).map_err(s)?,
            );
            cache.append(gpu, 0, &k_new, &v_new).map_err(at("append"))?;
            let mut out = poisoned(gpu, q.len()).map_err(s)?;
            cache
                .decode_layer(gpu, 0, &q_gpu, &mut out)
                .map_err(at("decode_layer"))?;
            let out = to_f64(&stream.clone_dtoh(&out).map_err(s)?);
            let error = relative_error(&out, &full_out);
            let layer = cache.layer(0).map_err(s)?;
            let resident = stream.clone_dtoh(&layer.resident).map_err(s)?;
            let layout = cache.layout(0, id).map_err(s)?;
            let outliers = stream
                .clone_dtoh(&cache.prefill_scratch().outliers)
                .map_err(s)?;
            let outlier_count = (layout.chunks - layout.landmarks) as usize;
            // Selected, or kept exact as an outlier, in every head.
            let found = (0..heads).all(|h| {
                resident[h * params.budget_chunks()..(h + 1) * params.budget_chunks()]
                    .contains(&(needle_chunk as u32))
                    || outliers[h * outlier_count..(h + 1) * outlier_count]
                        .contains(&(needle_chunk as u32))
            });
            eprintln!("| {len} | {budget} | {rank} | {error:.2e} | {found} |");
            if !found || error.is_nan() || error >= 0.1 {
                return Err(format!("{len} tokens, budget {budget}, rank {rank}: error {error}, needle found {found}"));
            }
        }
    }
    Ok(())
}

fn expect_error<T>(result: shadowkv::Result<T>, needle: &str) -> Result<(), String> {
    match result {
        Ok(_) => Err(format!("expected an error containing {needle:?}")),
        Err(error) if error.to_string().contains(needle) => Ok(()),
        Err(error) => Err(format!("error {error:?} does not contain {needle:?}")),
    }
}

fn rejects_bad_input(gpu: &Gpu) -> Result<(), String> {
    let shape = CacheShape {
        layers: 2,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 64,
        rope: RopeConfig::LLAMA_3,
    };
    let params = ShadowKvParams {
        sparse_budget: 64,
        rank: 32,
        ..ShadowKvParams::default()
    };
    let capacity = CacheCapacity::uniform(2, 1000, 4);
    // Rank above Hkv * d, chunk size out of range, a capacity larger than the GPU.
    expect_error(
        ShadowKvCache::new(
            gpu,
            shape,
            ShadowKvParams {
                rank: 144,
                ..params
            },
            ValueHome::Host,
            capacity,
        ),
        "exceeds the keys' width",
    )?;
    expect_error(
        ShadowKvCache::new(
            gpu,
            shape,
            ShadowKvParams {
                chunk_size: 0,
                ..params
            },
            ValueHome::Host,
            capacity,
        ),
        "chunk size 0",
    )?;
    expect_error(
        ShadowKvCache::new(
            gpu,
            shape,
            params,
            ValueHome::Device,
            CacheCapacity::uniform(4096, 1 << 20, 0),
        ),
        "free GPU memory for the cache",
    )?;
    let mut cache = ShadowKvCache::new(gpu, shape, params, ValueHome::Host, capacity).map_err(s)?;
    // A prompt too short for the budget, and one past the capacity.
    expect_error(cache.add_sequence(gpu, 100), "sparse budget")?;
    expect_error(cache.add_sequence(gpu, 1001), "max_prompt_len")?;
    expect_error(
        cache.decode_layer(
            gpu,
            0,
            &poisoned(gpu, 4 * 64).map_err(s)?,
            &mut poisoned(gpu, 4 * 64).map_err(s)?,
        ),
        "no live sequence",
    )?;
    let id = cache.add_sequence(gpu, 1000).map_err(s)?;
    let mut rng = StdRng::seed_from_u64(7);
    let prompt = structured_prompt(&mut rng, &shape, 1000, 8, 0.1, None, 8);
    let stream = gpu.stream();
    let upload = prompt.upload(gpu)?;
    let (pre, query, source) = (&upload.pre_rope, &upload.last_query, upload.source());
    // Mismatched shapes: the pre-RoPE keys one row short, the query of the wrong width, a
    // layout longer than the prompt, a layer past the model.
    expect_error(
        cache.prefill_layer(gpu, 0, id, &pre.slice(0..pre.len() - 128), &source, query),
        "pre_rope_keys",
    )?;
    expect_error(
        cache.prefill_layer(gpu, 0, id, pre, &source, &query.slice(0..64)),
        "last_query",
    )?;
    let long = PrefillSource {
        layout: SequenceLayout {
            len: 1001,
            ..prompt.layout
        },
        ..source
    };
    expect_error(
        cache.prefill_layer(gpu, 0, id, pre, &long, query),
        "source.layout",
    )?;
    expect_error(
        cache.prefill_layer(gpu, 2, id, pre, &source, query),
        "layer",
    )?;
    // Decoding a layer that was not prefilled.
    cache
        .prefill_layer(gpu, 0, id, pre, &source, query)
        .map_err(s)?;
    let q = poisoned(gpu, 4 * 64).map_err(s)?;
    expect_error(
        cache.decode_layer(gpu, 1, &q, &mut poisoned(gpu, 4 * 64).map_err(s)?),
        "not prefilled",
    )?;
    // The prefill in two halves: `finish` with nothing pending; a second `start`, or a decode
    // step, while a layer is pending; `finish` with another keys buffer. Each is refused and
    // leaves the pending layer to finish; after it the layer decodes again.
    expect_error(cache.prefill_layer_finish(gpu, pre), "no layer pending")?;
    cache
        .prefill_layer_start(gpu, 0, id, pre, &source, query)
        .map_err(s)?;
    expect_error(
        cache.prefill_layer_start(gpu, 1, id, pre, &source, query),
        "prefill_layer_finish for the pending layer",
    )?;
    expect_error(
        cache.decode_layer(gpu, 0, &q, &mut poisoned(gpu, 4 * 64).map_err(s)?),
        "between prefill_layer_start and prefill_layer_finish",
    )?;
    let other_keys = poisoned(gpu, pre.len()).map_err(s)?;
    expect_error(
        cache.prefill_layer_finish(gpu, &other_keys),
        "pre_rope_keys",
    )?;
    if cache.pending_prefill().map(|p| (p.layer, p.id)) != Some((0, id)) {
        return Err(format!("pending: {:?}", cache.pending_prefill()));
    }
    cache.prefill_layer_finish(gpu, pre).map_err(s)?;
    if cache.pending_prefill().is_some() {
        return Err("a finished layer is still pending".into());
    }
    // Appending past max_generated, and with the wrong batch.
    let kv = stream
        .clone_htod(&random_bf16(&mut rng, 2 * 64, 1.0))
        .map_err(s)?;
    expect_error(cache.append(gpu, 0, &kv.slice(0..64), &kv), "keys")?;
    for _ in 0..4 {
        cache.append(gpu, 0, &kv, &kv).map_err(s)?;
    }
    expect_error(cache.append(gpu, 0, &kv, &kv), "max_generated")?;
    // Too many sequences, an unknown one.
    cache.add_sequence(gpu, 900).map_err(s)?;
    expect_error(cache.add_sequence(gpu, 900), "max_sequences")?;
    cache.remove_sequence(gpu, id).map_err(s)?;
    expect_error(cache.remove_sequence(gpu, id), "not live")?;
    cache.check_prefill().map_err(s)?;
    Ok(())
}
