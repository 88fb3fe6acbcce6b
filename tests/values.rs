//! GPU equivalence of the compressed value formats (fp8, int4): the quantise kernels and the
//! dequantising fetch against their CPU references on fresh random shapes (bit-exact codes,
//! scales and slots; outputs poisoned before each run), and the whole cache's decode with
//! each format and home against the reference decode over the dequantised values.
//! Without a GPU every test here is reported as ignored (see `run_gpu_tests`).
use half::bf16;
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::cache::{SequenceId, ShadowKvCache, ValueFormat, ValueHome};
use shadowkv::decode_step::inverse_frequencies;
use shadowkv::kernels::{fetch, values};
use shadowkv::reference::decode_step::{decode_step, HostLayer};
use shadowkv::reference::values::{dequantise_chunk, quantise_sequence};
use shadowkv::reference::{self, relative_error};
use shadowkv::{
    Gpu, LayerValues, Miss, PinnedBuffer, PrefillSource, SequenceLayout, ShadowBatch, ShadowConfig,
    ShadowSequence,
};
use shadowkv_suite::layers::{random_fetch_case, random_layer};
use shadowkv_suite::structured::{three_sequence_decode, DecodeScenario, Prompt};
use shadowkv_suite::{poisoned, run_gpu_tests, to_f64};

const FORMATS: [ValueFormat; 2] = [ValueFormat::Fp8, ValueFormat::Int4];
/// The byte every compressed buffer holds before a kernel writes it.
const BYTE_POISON: u8 = 0xa5;

fn main() {
    run_gpu_tests(&[
        ("quantise_matches_reference", quantise_matches_reference),
        ("fetch_dequantises_like_reference", fetch_matches_reference),
        (
            "cache_decode_with_each_format_matches_reference",
            cache_with_each_format,
        ),
    ])
}

fn s(error: impl std::fmt::Display) -> String {
    error.to_string()
}

/// A compressed value buffer of `len` poisoned bytes, pinned on the host or on the GPU.
fn poisoned_packed(
    gpu: &Gpu,
    format: ValueFormat,
    len: usize,
    on_host: bool,
) -> Result<LayerValues, String> {
    let bytes = vec![BYTE_POISON; len];
    Ok(if on_host {
        let mut buffer = PinnedBuffer::new(gpu, len).map_err(s)?;
        buffer.as_mut_slice().map_err(s)?.copy_from_slice(&bytes);
        LayerValues::HostPacked(format, buffer)
    } else {
        LayerValues::DevicePacked(format, gpu.stream().clone_htod(&bytes).map_err(s)?)
    })
}

/// The bytes of a compressed value buffer (after the GPU's work on it).
fn packed_bytes(gpu: &Gpu, values: &LayerValues) -> Result<Vec<u8>, String> {
    gpu.stream().synchronize().map_err(s)?;
    match values {
        LayerValues::HostPacked(_, buffer) => Ok(buffer.as_slice().map_err(s)?.to_vec()),
        LayerValues::DevicePacked(_, slice) => gpu.stream().clone_dtoh(slice).map_err(s),
        _ => Err("expected compressed values".into()),
    }
}

/// The first differing byte of two buffers, described.
fn first_difference(got: &[u8], expected: &[u8]) -> Option<String> {
    if got.len() != expected.len() {
        return Some(format!("{} bytes against {}", got.len(), expected.len()));
    }
    let at = got.iter().zip(expected).position(|(a, b)| a != b)?;
    let count = got.iter().zip(expected).filter(|(a, b)| a != b).count();
    Some(format!(
        "{count} bytes differ, the first at {at}: {:#04x} against {:#04x}",
        got[at], expected[at]
    ))
}

/// Random bf16 values with the magnitudes a layer's values have and the ones that test the
/// rounding: mostly small, some channels large, exact zeros, values near the int4 and fp8
/// rounding edges.
fn values_for_rounding(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n)
        .map(|_| match rng.gen_range(0..20) {
            0 => bf16::ZERO,
            1 => bf16::from_f32(rng.gen_range(-300.0f32..300.0)),
            2 => bf16::from_f32(rng.gen_range(-1e-3f32..1e-3)),
            _ => bf16::from_f32(rng.gen_range(-2.0f32..2.0)),
        })
        .collect()
}

/// `value_quantise_fp8` / `value_quantise_int4` against `reference::values::quantise_sequence`
/// on random shapes (odd and even chunk sizes and counts, a source with spare rows and an
/// offset, a target offset), into pinned and device memory: every byte equal, the poison
/// outside the sequence's range kept.
fn quantise_matches_reference(gpu: &Gpu) -> Result<(), String> {
    let cases = shadowkv_suite::proptest_cases(16);
    for case in 0..cases {
        let mut rng = StdRng::seed_from_u64(0x9a11 + case as u64);
        let kv_heads = rng.gen_range(1..=4);
        let head_dim = [64usize, 128, 256][rng.gen_range(0..3)];
        let config = ShadowConfig {
            // Group 2 at head dimension 256 (groups 1, 2 and 4 are compiled there).
            q_heads: if head_dim == 256 { 2 * kv_heads } else { 8 },
            kv_heads,
            head_dim,
            chunk_size: rng.gen_range(1..=16),
            rank: 16,
            budget_chunks: 1,
        };
        let (heads, c, d) = (config.kv_heads, config.chunk_size, config.head_dim);
        let chunks = rng.gen_range(1..40usize);
        let len = chunks * c + rng.gen_range(0..c + 3);
        let layout = SequenceLayout {
            offset: 8 * rng.gen_range(0..5u64),
            capacity: (len + rng.gen_range(0..4)) as u32,
            len: len as u32,
        };
        let total = layout.offset as usize + heads * layout.capacity as usize * d;
        let source = values_for_rounding(&mut rng, total);
        let sequence = ShadowSequence {
            host_value_offset: 16 * rng.gen_range(0..6u64),
            chunks: chunks as u32,
            prompt_len: len as u32,
            ..ShadowSequence::default()
        };
        let source_gpu = gpu.stream().clone_htod(&source).map_err(s)?;
        let prefill_source = PrefillSource {
            keys: &source_gpu,
            values: &source_gpu,
            layout,
        };
        for format in FORMATS {
            let bytes = sequence.host_value_offset as usize
                + format.packed_bytes(heads, chunks, c, d)
                + 16 * rng.gen_range(0..3);
            let mut expected = vec![BYTE_POISON; bytes];
            quantise_sequence(
                format,
                &config,
                &source,
                layout.offset as usize,
                layout.capacity as usize,
                &sequence,
                &mut expected,
            );
            for on_host in [true, false] {
                let mut target = poisoned_packed(gpu, format, bytes, on_host)?;
                values::quantise(
                    gpu,
                    gpu.stream(),
                    &config,
                    &prefill_source,
                    &sequence,
                    &mut target,
                )
                .map_err(s)?;
                let got = packed_bytes(gpu, &target)?;
                if let Some(difference) = first_difference(&got, &expected) {
                    return Err(format!(
                        "case {case}, {} into {} memory, {config:?}, {chunks} chunks, {layout:?}, \
                         target at {}: {difference}",
                        format.name(),
                        if on_host { "pinned" } else { "device" },
                        sequence.host_value_offset
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `value_fetch_fp8` / `value_fetch_int4` against `reference::fetch::fetch_packed` on random
/// ragged batches and miss lists: every element of the value buffer equal (the slots of the
/// misses hold the reference's dequantised values, everything else keeps its poison).
fn fetch_matches_reference(gpu: &Gpu) -> Result<(), String> {
    let cases = shadowkv_suite::proptest_cases(12);
    let stream = gpu.stream();
    for case in 0..cases {
        let mut rng = StdRng::seed_from_u64(0xfe7c + case as u64);
        let (config, specs) = random_fetch_case(&mut rng, 12, 5, 30);
        let (c, heads, d, k) = (
            config.chunk_size,
            config.kv_heads,
            config.head_dim,
            config.budget_chunks,
        );
        let mut host = random_layer(&mut rng, &config, &specs);
        // The bf16 values of each sequence are the source of its compressed range.
        let bf16_values = host.values.clone();
        let bf16_sequences = host.sequences.clone();
        for format in FORMATS {
            let mut offset = 16 * rng.gen_range(0..3u64);
            for sequence in host.sequences.iter_mut() {
                sequence.host_value_offset = offset;
                offset += format.packed_bytes(heads, sequence.chunks as usize, c, d) as u64
                    + 16 * rng.gen_range(0..2u64);
            }
            let mut bytes = vec![BYTE_POISON; offset as usize + 16];
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
            // Misses: per (sequence, head), distinct chunks into distinct slots, a random
            // count of them (the rest of the list is junk the kernel must skip).
            let mut misses = vec![Miss::default(); host.sequences.len() * heads * k];
            let mut counts = vec![0u32; host.sequences.len() * heads];
            for (b, sequence) in host.sequences.iter().enumerate() {
                for h in 0..heads {
                    let mut chunks: Vec<u32> = (0..sequence.chunks).collect();
                    chunks.shuffle(&mut rng);
                    let mut slots: Vec<u32> = (0..k as u32).collect();
                    slots.shuffle(&mut rng);
                    let count = rng.gen_range(0..=k);
                    counts[b * heads + h] = count as u32;
                    for m in 0..k {
                        misses[(b * heads + h) * k + m] = if m < count {
                            Miss {
                                chunk: chunks[m],
                                slot: slots[m],
                            }
                        } else {
                            Miss {
                                chunk: rng.gen(),
                                slot: rng.gen(),
                            }
                        };
                    }
                }
            }
            let mut expected = host.v.clone();
            for (b, sequence) in host.sequences.iter().enumerate() {
                for h in 0..heads {
                    let count = counts[b * heads + h] as usize;
                    let list = &misses[(b * heads + h) * k..][..count];
                    reference::fetch::fetch_packed(
                        &config,
                        sequence,
                        h,
                        list,
                        format,
                        &bytes,
                        &mut expected,
                    );
                }
            }
            let batch = ShadowBatch::new(stream, config, &host.sequences).map_err(s)?;
            let misses_gpu = stream.clone_htod(&misses).map_err(s)?;
            let counts_gpu = stream.clone_htod(&counts).map_err(s)?;
            for on_host in [true, false] {
                let mut values = poisoned_packed(gpu, format, bytes.len(), on_host)?;
                match &mut values {
                    LayerValues::HostPacked(_, buffer) => {
                        buffer.as_mut_slice().map_err(s)?.copy_from_slice(&bytes)
                    }
                    LayerValues::DevicePacked(_, slice) => {
                        stream.memcpy_htod(&bytes, slice).map_err(s)?
                    }
                    _ => unreachable!("poisoned_packed gives compressed values"),
                }
                let mut v = stream.clone_htod(&host.v).map_err(s)?;
                fetch::run(
                    gpu,
                    stream,
                    &batch,
                    batch.whole(),
                    &misses_gpu,
                    &counts_gpu,
                    &values,
                    &mut v,
                )
                .map_err(s)?;
                let got = stream.clone_dtoh(&v).map_err(s)?;
                let differ = got
                    .iter()
                    .zip(&expected)
                    .position(|(a, b)| a.to_bits() != b.to_bits());
                if let Some(at) = differ {
                    return Err(format!(
                        "case {case}, {} from {} memory, {config:?}, {specs:?}: element {at} is \
                         {} against {}",
                        format.name(),
                        if on_host { "pinned" } else { "device" },
                        got[at],
                        expected[at]
                    ));
                }
            }
        }
    }
    Ok(())
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
            .map_err(|e| format!("prefill_layer: {e}"))?;
    }
    cache
        .check_prefill()
        .map_err(|e| format!("check_prefill: {e}"))?;
    Ok(())
}

/// The cache's layer as the reference decode sees it, the values dequantised into a bf16
/// layout `[Hkv, prompt_len, d]` per sequence (the reference fetch copies them as they are,
/// which is what the dequantising fetch writes). Checks on the way that each sequence's
/// compressed bytes are what the reference quantisation of its prompt gives.
fn reference_layer(
    gpu: &Gpu,
    cache: &ShadowKvCache,
    layer: usize,
    prompts: &[&Prompt],
) -> Result<HostLayer, String> {
    cache.check_prefill().map_err(s)?;
    let l = cache.layer(layer).map_err(s)?;
    let stream = gpu.stream();
    stream.synchronize().map_err(s)?;
    let config = *cache.config();
    let (heads, c, d) = (config.kv_heads, config.chunk_size, config.head_dim);
    let mut sequences = cache
        .sequences()
        .into_iter()
        .map(|id| cache.layout(layer, id))
        .collect::<shadowkv::Result<Vec<_>>>()
        .map_err(s)?;
    let format = l.values.format();
    let values = match &l.values {
        LayerValues::Host(buffer) => buffer.as_slice().map_err(s)?.to_vec(),
        LayerValues::Device(slice) => stream.clone_dtoh(slice).map_err(s)?,
        packed => {
            let bytes = packed_bytes(gpu, packed)?;
            let mut values = Vec::new();
            for (b, (sequence, prompt)) in sequences.iter_mut().zip(prompts).enumerate() {
                let start = sequence.host_value_offset as usize;
                let end = start + format.packed_bytes(heads, sequence.chunks as usize, c, d);
                let mut expected = bytes[..end].to_vec();
                quantise_sequence(
                    format,
                    &config,
                    &prompt.values,
                    prompt.layout.offset as usize,
                    prompt.layout.capacity as usize,
                    sequence,
                    &mut expected,
                );
                if let Some(difference) = first_difference(&bytes[start..end], &expected[start..]) {
                    return Err(format!(
                        "layer {layer} sequence {b}: the offloaded {} bytes differ from the \
                         reference quantisation: {difference}",
                        format.name()
                    ));
                }
                let first = values.len();
                values.resize(first + heads * sequence.prompt_len as usize * d, bf16::ZERO);
                for h in 0..heads {
                    for chunk in 0..sequence.chunks as usize {
                        let back = dequantise_chunk(format, &config, sequence, &bytes, h, chunk);
                        let at = first + (h * sequence.prompt_len as usize + chunk * c) * d;
                        for (slot, x) in values[at..at + c * d].iter_mut().zip(back) {
                            *slot = bf16::from_f32(x);
                        }
                    }
                }
                sequence.host_value_offset = first as u64;
                values.resize(values.len().next_multiple_of(8), bf16::ZERO);
            }
            values
        }
    };
    Ok(HostLayer {
        sequences,
        landmarks: stream.clone_dtoh(&l.landmarks).map_err(s)?,
        chunk_ids: stream.clone_dtoh(&l.chunk_ids).map_err(s)?,
        a: stream.clone_dtoh(&l.a).map_err(s)?,
        bm: stream.clone_dtoh(&l.bm).map_err(s)?,
        values,
        k: stream.clone_dtoh(&l.k).map_err(s)?,
        v: stream.clone_dtoh(&l.v).map_err(s)?,
        resident: stream.clone_dtoh(&l.resident).map_err(s)?,
    })
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

/// The whole cache with each format (bf16, fp8, int4) and home: prefilled sequences of odd
/// and even lengths, the offloaded bytes against the reference quantisation, then decode
/// steps against the reference decode over the dequantised values, and the output against
/// the bf16 cache's.
fn cache_with_each_format(gpu: &Gpu) -> Result<(), String> {
    let DecodeScenario {
        shape,
        params,
        capacity,
        prompts,
        inputs,
    } = three_sequence_decode(0xf0a7);
    let steps = inputs.len();
    let lens: Vec<usize> = prompts.iter().map(|p| p.len).collect();
    let frequencies = inverse_frequencies(&shape.rope, shape.head_dim as u32);
    let stream = gpu.stream().clone();
    let mut bf16_outputs: Vec<Vec<bf16>> = Vec::new();
    for format in [ValueFormat::Bf16, ValueFormat::Fp8, ValueFormat::Int4] {
        for home in [ValueHome::Host, ValueHome::Device] {
            let what = format!("{} values on {home:?}", format.name());
            let storage = home.with_format(format);
            let mut cache = ShadowKvCache::new(gpu, shape, params, storage, capacity).map_err(s)?;
            for prompt in &prompts {
                let id = cache.add_sequence(gpu, prompt.len).map_err(s)?;
                prefill(gpu, &mut cache, id, prompt).map_err(|e| format!("{what}: {e}"))?;
            }
            let config = *cache.config();
            let references: Vec<&Prompt> = prompts.iter().collect();
            let mut hosts: Vec<HostLayer> = (0..shape.layers)
                .map(|l| reference_layer(gpu, &cache, l, &references))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("{what}: {e}"))?;
            let (mut worst, mut worst_against_bf16) = (0f64, 0f64);
            let mut outputs = Vec::new();
            for (step, step_inputs) in inputs.iter().enumerate() {
                for (layer, host) in hosts.iter_mut().enumerate() {
                    let [q, keys, values] = &step_inputs[layer];
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
                    let out = stream.clone_dtoh(&out).map_err(s)?;
                    reference::cache::append(
                        &host.sequences,
                        shape.kv_heads,
                        shape.head_dim,
                        keys,
                        values,
                        &mut host.k,
                        &mut host.v,
                    );
                    for sequence in host.sequences.iter_mut() {
                        sequence.kv.len += 1;
                    }
                    let scores = device_scores(gpu, &cache, host)?;
                    let expected = decode_step(&config, &frequencies, host, q, Some(&scores));
                    let error = relative_error(&to_f64(&out), &expected.out);
                    worst = worst.max(error);
                    if error > 1e-2 {
                        return Err(format!(
                            "{what}, step {step} layer {layer}: relative error {error} against \
                             the reference"
                        ));
                    }
                    if let Some(bf16_out) = bf16_outputs.get(outputs.len()) {
                        let against = relative_error(&to_f64(&out), &to_f64(bf16_out));
                        worst_against_bf16 = worst_against_bf16.max(against);
                    }
                    outputs.push(out);
                }
            }
            eprintln!(
                "{what}: {steps} steps x {} layers, prompts {lens:?}: worst relative error \
                 {worst:.2e} against the reference, {worst_against_bf16:.2e} against bf16 \
                 values on the host",
                shape.layers
            );
            if format == ValueFormat::Bf16 && home == ValueHome::Host {
                bf16_outputs = outputs;
            }
        }
    }
    Ok(())
}
