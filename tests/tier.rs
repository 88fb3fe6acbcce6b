//! GPU equivalence of the value tier (`ValueHome::Tiered`): the tiered fetch against the
//! tier's CPU model over random miss sequences in every value format (the same outcome for
//! every miss, the same tags, entries holding the host bytes of their chunk, slots as the
//! reference fetch fills them), and the cache's decode with a tier bitwise equal to the decode
//! without one (outputs and value slots), with the tier hits the statistics report.
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use half::bf16;
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::cache::{ShadowKvCache, ValueFormat, ValueHome};
use shadowkv::kernels::fetch::{self, TierUse};
use shadowkv::kernels::tier::{kernel_layout::entry_bytes, kernel_layout::EMPTY_ENTRY, ValueTier};
use shadowkv::reference;
use shadowkv::reference::tier::{bf16_bytes, entry_contents, TierModel};
use shadowkv::reference::values::quantise_sequence;
use shadowkv::{Gpu, LayerValues, Miss, PinnedBuffer, ShadowBatch};
use shadowkv_suite::layers::{random_fetch_case, random_layer};
use shadowkv_suite::structured::{three_sequence_decode, DecodeScenario, Prompt};
use shadowkv_suite::{poisoned, run_gpu_tests};

fn main() {
    run_gpu_tests(&[
        ("tiered_fetch_matches_the_model", tiered_fetch_matches_model),
        (
            "cache_decode_with_a_tier_equals_decode_without",
            decode_with_tier_equals_without,
        ),
    ])
}

fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

/// Per (sequence, head), `count` distinct chunk ids into distinct slots, drawn mostly from
/// `recent` (chunks of earlier steps, so the tier has something to hit) and the rest at
/// random; the list past the count is junk the kernel must skip.
fn miss_lists(
    rng: &mut StdRng,
    chunks: &[u32],
    heads: usize,
    k: usize,
    recent: &mut [Vec<u32>],
) -> (Vec<Miss>, Vec<u32>) {
    let mut misses = vec![Miss::default(); chunks.len() * heads * k];
    let mut counts = vec![0u32; chunks.len() * heads];
    for (b, &n) in chunks.iter().enumerate() {
        for h in 0..heads {
            let row = b * heads + h;
            let count = rng.gen_range(0..=k.min(n as usize));
            let mut picked: Vec<u32> = Vec::new();
            while picked.len() < count {
                let chunk = match recent[row].choose(rng) {
                    Some(&c) if rng.gen_bool(0.6) => c,
                    _ => rng.gen_range(0..n),
                };
                if !picked.contains(&chunk) {
                    picked.push(chunk);
                }
            }
            let mut slots: Vec<u32> = (0..k as u32).collect();
            slots.shuffle(rng);
            counts[row] = count as u32;
            for m in 0..k {
                misses[row * k + m] = if m < count {
                    Miss {
                        chunk: picked[m],
                        slot: slots[m],
                    }
                } else {
                    Miss {
                        chunk: rng.gen(),
                        slot: rng.gen(),
                    }
                };
            }
            recent[row].extend(picked);
        }
    }
    (misses, counts)
}

/// The tiered fetch, step after step, against the model and the reference fetch.
fn tiered_fetch_matches_model(gpu: &Gpu) -> Result<(), String> {
    let cases = shadowkv_suite::proptest_cases(8);
    let stream = gpu.stream();
    for case in 0..cases {
        let mut rng = StdRng::seed_from_u64(0x71e4 + case as u64);
        let (config, specs) = random_fetch_case(&mut rng, 24, 4, 40);
        let (c, heads, d, k) = (
            config.chunk_size,
            config.kv_heads,
            config.head_dim,
            config.budget_chunks,
        );
        let mut host = random_layer(&mut rng, &config, &specs);
        // Rows of the tier: distinct and not the batch's order.
        let rows = host.sequences.len() + 2;
        let mut row_order: Vec<u32> = (0..rows as u32).collect();
        row_order.shuffle(&mut rng);
        for (sequence, &row) in host.sequences.iter_mut().zip(&row_order) {
            sequence.resident_row = row;
        }
        let longest = host.sequences.iter().map(|s| s.chunks).max().unwrap_or(1);
        let bf16_values = host.values.clone();
        let bf16_sequences = host.sequences.clone();
        for format in ValueFormat::ALL {
            // The values in the format, on the host.
            let (values, bytes) = if format == ValueFormat::Bf16 {
                let mut pinned = PinnedBuffer::new(gpu, bf16_values.len()).map_err(s)?;
                pinned
                    .as_mut_slice()
                    .map_err(s)?
                    .copy_from_slice(&bf16_values);
                (LayerValues::Host(pinned), bf16_bytes(&bf16_values))
            } else {
                let mut offset = 16 * rng.gen_range(0..3u64);
                for sequence in host.sequences.iter_mut() {
                    sequence.host_value_offset = offset;
                    offset += format.packed_bytes(heads, sequence.chunks as usize, c, d) as u64;
                }
                let mut bytes = vec![0xa5u8; offset as usize + 16];
                for (sequence, original) in host.sequences.iter().zip(&bf16_sequences) {
                    quantise_sequence(
                        format,
                        &config,
                        &bf16_values,
                        original.host_value_offset as usize,
                        original.prompt_len as usize,
                        sequence,
                        &mut bytes,
                    );
                }
                let mut pinned = PinnedBuffer::new(gpu, bytes.len()).map_err(s)?;
                pinned.as_mut_slice().map_err(s)?.copy_from_slice(&bytes);
                (LayerValues::HostPacked(format, pinned), bytes)
            };
            if format == ValueFormat::Bf16 {
                host.sequences.clone_from(&bf16_sequences);
            }
            // A tier from one entry per head to one per chunk.
            let per_head = match rng.gen_range(0..3) {
                0 => 1,
                1 => rng.gen_range(1..=longest as usize),
                _ => longest as usize,
            };
            let mut tier =
                ValueTier::new(stream, format, rows, heads, per_head, c, d).map_err(s)?;
            let mut model = TierModel::new(rows * heads, per_head);
            let mut outcomes =
                PinnedBuffer::<u32>::new(gpu, host.sequences.len() * heads * k).map_err(s)?;
            let batch = ShadowBatch::new(stream, config, &host.sequences).map_err(s)?;
            let chunks: Vec<u32> = host.sequences.iter().map(|s| s.chunks).collect();
            let mut recent = vec![Vec::new(); chunks.len() * heads];
            let what = |step: usize| {
                format!(
                    "case {case}, {} values, {per_head} entries per head, step {step}, \
                     {config:?}",
                    format.name()
                )
            };
            for step in 0..12 {
                let (misses, counts) = miss_lists(&mut rng, &chunks, heads, k, &mut recent);
                outcomes.as_mut_slice().map_err(s)?.fill(u32::MAX);
                let mut expected_v = host.v.clone();
                let mut expected_outcomes = Vec::new();
                for (b, sequence) in host.sequences.iter().enumerate() {
                    for h in 0..heads {
                        let list = &misses[(b * heads + h) * k..][..counts[b * heads + h] as usize];
                        if format == ValueFormat::Bf16 {
                            reference::fetch::fetch(
                                &config,
                                sequence,
                                h,
                                list,
                                &bf16_values,
                                &mut expected_v,
                            );
                        } else {
                            reference::fetch::fetch_packed(
                                &config,
                                sequence,
                                h,
                                list,
                                format,
                                &bytes,
                                &mut expected_v,
                            );
                        }
                        let tier_head = sequence.resident_row as usize * heads + h;
                        expected_outcomes.push(model.step(tier_head, list));
                    }
                }
                let misses_gpu = stream.clone_htod(&misses).map_err(s)?;
                let counts_gpu = stream.clone_htod(&counts).map_err(s)?;
                let mut v = stream.clone_htod(&host.v).map_err(s)?;
                fetch::run_tiered(
                    gpu,
                    stream,
                    &batch,
                    batch.whole(),
                    &misses_gpu,
                    &counts_gpu,
                    &values,
                    Some(TierUse {
                        tier: &mut tier,
                        outcomes: outcomes.device_address(),
                    }),
                    &mut v,
                )
                .map_err(s)?;
                let got_v = stream.clone_dtoh(&v).map_err(s)?;
                if let Some(at) = got_v
                    .iter()
                    .zip(&expected_v)
                    .position(|(a, b)| a.to_bits() != b.to_bits())
                {
                    return Err(format!(
                        "{}: value element {at} is {} against {}",
                        what(step),
                        got_v[at],
                        expected_v[at]
                    ));
                }
                let got_outcomes = outcomes.as_slice().map_err(s)?;
                for (row, expected) in expected_outcomes.iter().enumerate() {
                    let got = &got_outcomes[row * k..row * k + expected.len()];
                    if got != expected.as_slice() {
                        return Err(format!(
                            "{}: (sequence, head) {row}: outcomes {got:?} against {expected:?}",
                            what(step)
                        ));
                    }
                }
                let tags = stream.clone_dtoh(&tier.tags).map_err(s)?;
                let data = stream.clone_dtoh(&tier.data).map_err(s)?;
                let stride = entry_bytes(format, c, d);
                for (b, sequence) in host.sequences.iter().enumerate() {
                    for h in 0..heads {
                        let tier_head = sequence.resident_row as usize * heads + h;
                        let got = &tags[tier_head * per_head..(tier_head + 1) * per_head];
                        if got != model.tags(tier_head) {
                            return Err(format!(
                                "{}: sequence {b} head {h}: tags {got:?} against {:?}",
                                what(step),
                                model.tags(tier_head)
                            ));
                        }
                        for (entry, &tag) in got.iter().enumerate() {
                            if tag == EMPTY_ENTRY {
                                continue;
                            }
                            let expected =
                                entry_contents(format, &config, sequence, &bytes, h, tag);
                            let first = (tier_head * per_head + entry) * stride;
                            if data[first..first + expected.len()] != expected[..] {
                                return Err(format!(
                                    "{}: sequence {b} head {h} entry {entry}: the bytes of chunk \
                                     {tag} differ from the host's",
                                    what(step)
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// Uploads `prompt` and prefills every layer of a new sequence with it.
fn prefill(gpu: &Gpu, cache: &mut ShadowKvCache, prompt: &Prompt) -> Result<(), String> {
    let id = cache.add_sequence(gpu, prompt.len).map_err(s)?;
    let upload = prompt.upload(gpu)?;
    let (pre, query, source) = (&upload.pre_rope, &upload.last_query, upload.source());
    for layer in 0..cache.shape().layers {
        cache
            .prefill_layer(gpu, layer, id, pre, &source, query)
            .map_err(|e| format!("prefill_layer: {e}"))?;
    }
    cache
        .check_prefill()
        .map_err(|e| format!("check_prefill: {e}"))
}

/// The cache's decode with a tier (small, and holding everything) against the same cache
/// without one, in each format: the same outputs and value slots bit for bit, every
/// miss a tier hit or a PCIe fetch, and with the tier holding everything no PCIe fetch of a
/// chunk already fetched.
fn decode_with_tier_equals_without(gpu: &Gpu) -> Result<(), String> {
    let DecodeScenario {
        shape,
        params,
        capacity,
        prompts,
        inputs,
    } = three_sequence_decode(0x7e42);
    let steps = inputs.len();
    let stream = gpu.stream().clone();
    let everything = params.prompt_chunks(capacity.max_prompt_len);
    for format in ValueFormat::ALL {
        // (outputs, value slots) per step and layer of the cache without a tier.
        let mut plain: Vec<(Vec<bf16>, Vec<bf16>)> = Vec::new();
        for home in [
            ValueHome::Host,
            ValueHome::Tiered { chunks_per_head: 5 },
            ValueHome::Tiered {
                chunks_per_head: everything,
            },
        ] {
            let what = format!("{} values, {home:?}", format.name());
            let storage = home.with_format(format);
            let mut cache = ShadowKvCache::new(gpu, shape, params, storage, capacity).map_err(s)?;
            for prompt in &prompts {
                prefill(gpu, &mut cache, prompt).map_err(|e| format!("{what}: {e}"))?;
            }
            let (mut tier_hits, mut pcie) = (0u64, 0u64);
            let mut at = 0;
            for (step, step_inputs) in inputs.iter().enumerate() {
                for (layer, [q, keys, values]) in step_inputs.iter().enumerate() {
                    let (q_gpu, k_gpu, v_gpu) = (
                        stream.clone_htod(q).map_err(s)?,
                        stream.clone_htod(keys).map_err(s)?,
                        stream.clone_htod(values).map_err(s)?,
                    );
                    let mut out = poisoned(gpu, q.len()).map_err(s)?;
                    cache.append(gpu, layer, &k_gpu, &v_gpu).map_err(s)?;
                    cache
                        .decode_layer(gpu, layer, &q_gpu, &mut out)
                        .map_err(s)?;
                    let stats = cache.step_stats().map_err(s)?;
                    if stats.slot_hits + stats.tier_hits + stats.pcie_fetches != stats.selected {
                        return Err(format!(
                            "{what}, step {step}: statistics {stats:?} do not add up"
                        ));
                    }
                    if home == ValueHome::Host && stats.tier_hits != 0 {
                        return Err(format!("{what}: tier hits without a tier: {stats:?}"));
                    }
                    tier_hits += stats.tier_hits;
                    pcie += stats.pcie_fetches;
                    let out = stream.clone_dtoh(&out).map_err(s)?;
                    let slots = stream
                        .clone_dtoh(&cache.layer(layer).map_err(s)?.v)
                        .map_err(s)?;
                    if home == ValueHome::Host {
                        plain.push((out, slots));
                    } else {
                        let (plain_out, plain_slots) = &plain[at];
                        if let Some(i) = out
                            .iter()
                            .zip(plain_out)
                            .position(|(a, b)| a.to_bits() != b.to_bits())
                        {
                            return Err(format!(
                                "{what}, step {step} layer {layer}: output {i} is {} against {} \
                                 without the tier",
                                out[i], plain_out[i]
                            ));
                        }
                        if slots
                            .iter()
                            .zip(plain_slots)
                            .any(|(a, b)| a.to_bits() != b.to_bits())
                        {
                            return Err(format!(
                                "{what}, step {step} layer {layer}: the value slots differ from \
                                 those without the tier"
                            ));
                        }
                    }
                    at += 1;
                }
            }
            eprintln!("{what}: {tier_hits} tier hits, {pcie} PCIe fetches over {steps} steps");
            if matches!(home, ValueHome::Tiered { .. }) && tier_hits == 0 {
                return Err(format!("{what}: no tier hit in {steps} steps"));
            }
        }
    }
    Ok(())
}
