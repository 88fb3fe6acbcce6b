//! A whole engine loop on synthetic tensors: sequences of different lengths join, each is
//! prefilled layer by layer, the batch decodes, one sequence leaves, and decoding goes on.
//!
//! It runs the loop twice: on the crate's own context and stream (`Gpu::new`), then as an
//! engine would, on a context and stream the example creates itself and passes in
//! (`Gpu::from_stream`), with every per-step buffer allocated by the example and handed to
//! the cache as raw device views. Both runs must give bit-identical outputs.
//!
//! `cargo run --release -p shadowkv --example engine_loop`; without a GPU it says so and
//! exits 0.
use std::sync::Arc;

use shadowkv::cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use shadowkv::half::bf16;
use shadowkv::kernels::random;
use shadowkv::{
    CacheCapacity, CacheShape, DeviceView, DeviceViewMut, Gpu, PrefillSource, RopeConfig,
    SequenceLayout, ShadowKvCache, ShadowKvParams, ValueHome,
};

/// A small model's attention: 2 layers, 8 query heads over 2 KV heads of 128.
const SHAPE: CacheShape = CacheShape {
    layers: 2,
    q_heads: 8,
    kv_heads: 2,
    head_dim: 128,
    rope: RopeConfig::LLAMA_3,
};
/// Prompt lengths of the sequences, in the order they join.
const PROMPTS: [usize; 3] = [3000, 4501, 6000];
/// Decode steps before the third sequence joins, after it joined, and after one left.
const STEPS: [usize; 3] = [4, 4, 4];

fn params() -> ShadowKvParams {
    ShadowKvParams {
        sparse_budget: 256,
        rank: 32,
        outlier_chunks: 8,
        ..ShadowKvParams::default()
    }
}

/// Where the example's buffers come from: the crate's stream, or an engine's.
enum Buffers {
    /// Buffers passed as the `CudaSlice`s they are.
    Slices,
    /// Buffers passed by address, as an engine on another allocator would.
    RawViews,
}

/// `len` bf16 values drawn from `seed` on `stream`.
fn random_buffer(
    gpu: &Gpu,
    stream: &Arc<CudaStream>,
    len: usize,
    seed: u64,
) -> shadowkv::Result<CudaSlice<bf16>> {
    // SAFETY: every element is written by the fill below before anything reads it.
    let mut buffer = unsafe { stream.alloc::<bf16>(len)? };
    random::fill(gpu, stream, &mut buffer, seed, 1.0, 0.0)?;
    Ok(buffer)
}

/// Prefills every layer of sequence `id` from synthetic prompt tensors.
fn prefill(
    gpu: &Gpu,
    cache: &mut ShadowKvCache,
    id: shadowkv::SequenceId,
    prompt_len: usize,
    seed: u64,
) -> shadowkv::Result<()> {
    let stream = gpu.stream().clone();
    let kv_len = SHAPE.kv_heads * prompt_len * SHAPE.head_dim;
    for layer in 0..SHAPE.layers {
        let layer_seed = seed * 100 + layer as u64 * 10;
        let keys = random_buffer(gpu, &stream, kv_len, layer_seed)?;
        let values = random_buffer(gpu, &stream, kv_len, layer_seed + 1)?;
        let pre_rope_keys = random_buffer(gpu, &stream, kv_len, layer_seed + 2)?;
        let last_query =
            random_buffer(gpu, &stream, SHAPE.q_heads * SHAPE.head_dim, layer_seed + 3)?;
        let source = PrefillSource {
            keys: &keys,
            values: &values,
            layout: SequenceLayout {
                offset: 0,
                capacity: prompt_len as u32,
                len: prompt_len as u32,
            },
        };
        cache.prefill_layer(gpu, layer, id, &pre_rope_keys, &source, &last_query)?;
        // The prompt's values are read by the offload on the cache's copy stream: they are
        // dropped only after it has passed.
        cache.check_prefill()?;
    }
    Ok(())
}

/// One decode step of every layer for the live batch; returns a hash of the outputs.
fn decode_step(
    gpu: &Gpu,
    cache: &mut ShadowKvCache,
    step: u64,
    buffers: &Buffers,
) -> shadowkv::Result<u64> {
    let stream = gpu.stream().clone();
    let batch = cache.sequences().len();
    let (q_len, kv_len) = (
        batch * SHAPE.q_heads * SHAPE.head_dim,
        batch * SHAPE.kv_heads * SHAPE.head_dim,
    );
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for layer in 0..SHAPE.layers {
        let seed = 1_000_000 + step * 100 + layer as u64 * 10;
        let q = random_buffer(gpu, &stream, q_len, seed)?;
        let keys = random_buffer(gpu, &stream, kv_len, seed + 1)?;
        let values = random_buffer(gpu, &stream, kv_len, seed + 2)?;
        // Poisoned, so an output the step did not write shows.
        let mut out = stream.clone_htod(&vec![bf16::NAN; q_len])?;
        match buffers {
            Buffers::Slices => cache.attend(gpu, layer, &q, &keys, &values, &mut out)?,
            Buffers::RawViews => {
                let address = |slice: &CudaSlice<bf16>| slice.device_ptr(&stream).0;
                let (q_address, keys_address, values_address, out_address) =
                    (address(&q), address(&keys), address(&values), address(&out));
                // SAFETY: each address is a live allocation of the engine's stream holding
                // the given number of bf16 values; the buffers outlive the step, which
                // runs on the same stream before they are read back or dropped.
                unsafe {
                    cache.attend(
                        gpu,
                        layer,
                        &DeviceView::<bf16>::from_raw(gpu, q_address, q_len)?,
                        &DeviceView::<bf16>::from_raw(gpu, keys_address, kv_len)?,
                        &DeviceView::<bf16>::from_raw(gpu, values_address, kv_len)?,
                        &mut DeviceViewMut::<bf16>::from_raw(gpu, out_address, q_len)?,
                    )?
                }
            }
        }
        for value in stream.clone_dtoh(&out)? {
            if !value.is_finite() {
                return Err(shadowkv::error::invalid(
                    "out",
                    "holds a value the step did not write",
                    "every output written",
                ));
            }
            hash = (hash ^ u64::from(value.to_bits())).wrapping_mul(0x100_0000_01b3);
        }
    }
    Ok(hash)
}

/// The whole loop; returns the output hash of every step.
fn engine_loop(gpu: &Gpu, buffers: Buffers) -> shadowkv::Result<Vec<u64>> {
    let capacity = CacheCapacity::uniform(PROMPTS.len(), *PROMPTS.iter().max().unwrap_or(&0), 64);
    let mut cache = ShadowKvCache::new(gpu, SHAPE, params(), ValueHome::Host, capacity)?;
    let mut hashes = Vec::new();
    let mut ids = Vec::new();
    for (seed, &prompt_len) in PROMPTS[..2].iter().enumerate() {
        let id = cache.add_sequence(gpu, prompt_len)?;
        prefill(gpu, &mut cache, id, prompt_len, seed as u64)?;
        ids.push(id);
    }
    let mut step = 0;
    for (phase, &steps) in STEPS.iter().enumerate() {
        if phase == 1 {
            let id = cache.add_sequence(gpu, PROMPTS[2])?;
            prefill(gpu, &mut cache, id, PROMPTS[2], 2)?;
            ids.push(id);
        }
        if phase == 2 {
            cache.remove_sequence(gpu, ids.remove(0))?;
        }
        for _ in 0..steps {
            hashes.push(decode_step(gpu, &mut cache, step, &buffers)?);
            step += 1;
        }
        let stats = cache.step_stats()?;
        println!(
            "  {} sequences after {step} steps: hit rate {:.2}",
            cache.sequences().len(),
            stats.hit_rate()
        );
    }
    Ok(hashes)
}

fn main() -> std::process::ExitCode {
    if let Err(reason) = shadowkv::probe() {
        println!("engine_loop: no GPU here ({reason}); nothing to run");
        return std::process::ExitCode::SUCCESS;
    }
    let run = || -> shadowkv::Result<bool> {
        println!("on the crate's own context and stream:");
        let own = engine_loop(&Gpu::new(0)?, Buffers::Slices)?;
        println!("on the engine's context and stream, buffers as raw views:");
        let context = CudaContext::new(0)?;
        let engine_stream = context.new_stream()?;
        let gpu = Gpu::from_stream(engine_stream)?;
        let engine = engine_loop(&gpu, Buffers::RawViews)?;
        Ok(own == engine)
    };
    match run() {
        Ok(true) => {
            println!("engine_loop: the same outputs on both streams");
            std::process::ExitCode::SUCCESS
        }
        Ok(false) => {
            eprintln!("engine_loop: the outputs differ between the two streams");
            std::process::ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("engine_loop: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
