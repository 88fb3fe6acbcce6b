//! ShadowKV prefill cost and cache memory, at Llama-3-8B shapes (32/8 heads, d 128,
//! the paper's defaults), timed with CUDA events:
//! - per layer and sequence at 32K and 122K tokens: the factorisation, the rest of the
//!   prefill (landmarks, outliers, exact rows, first selection), the value offload on the copy
//!   stream, against the layer's full-attention decode, its causal prefill attention and its
//!   dense products (the share of the layer's prefill that ShadowKV adds);
//! - the factorisation at 1M tokens;
//! - memory per 122K-token sequence (full cache, ShadowKV on GPU and host) and the largest
//!   batch that fits on the GPU (less the model's bf16 weights) with 125 GiB of host memory.
//!
//! `cargo bench --bench cache` (a summary table; ceilings measured in the same run).
use std::time::Instant;

use shadowkv::cache::{CacheCapacity, CacheShape, ShadowKvCache, ShadowKvParams, ValueHome};
use shadowkv::kernels::factorise::Factoriser;
use shadowkv::kernels::shadow_prefill::PrefillSource;
use shadowkv::linear::Linear;
use shadowkv::{
    DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, Gpu, PinnedBuffer,
    PrefillAttention, PrefillAttentionPlan, PrefillAttentionShape, QueryPlacement, SequenceLayout,
};
use shadowkv_suite::bench::{copy_bandwidth, filled, median, steady_ms};
use shadowkv_suite::shared_gpu;

fn main() {
    let gpu = match shared_gpu() {
        Ok(gpu) => gpu,
        Err(reason) => {
            println!("cache bench SKIPPED: {reason}");
            return;
        }
    };
    if let Err(error) = run(gpu) {
        eprintln!("cache bench failed: {error}");
        std::process::exit(1);
    }
}

fn median_of(
    gpu: &Gpu,
    runs: usize,
    mut call: impl FnMut() -> shadowkv::Result<()>,
) -> shadowkv::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..runs {
        times.push(gpu.time_ms(gpu.stream(), 1, &mut call)?);
    }
    Ok(median(&mut times) as f64)
}

/// The dense products of one Llama-3-8B layer's prefill over `len` tokens (QKV, O, gate and
/// up, down; cuBLAS bf16), median of 3 each.
fn layer_gemms_ms(gpu: &Gpu, len: usize) -> shadowkv::Result<f64> {
    let (hidden, kv_width, intermediate) = (4096usize, 1024usize, 14_336usize);
    let linear = Linear::new(gpu.stream().clone())?;
    let input = filled(gpu, len * intermediate, 31)?;
    let mut output = filled(gpu, len * 2 * intermediate, 32)?;
    let mut total = 0.0;
    for (inputs, outputs) in [
        (hidden, hidden + 2 * kv_width),
        (hidden, hidden),
        (hidden, 2 * intermediate),
        (intermediate, hidden),
    ] {
        let weight = filled(gpu, outputs * inputs, 33)?;
        let x = input.slice(..len * inputs);
        let mut y = output.slice_mut(..len * outputs);
        total += median_of(gpu, 3, || linear.forward(&x, &weight, inputs, &mut y))?;
    }
    Ok(total)
}

fn run(gpu: &Gpu) -> shadowkv::Result<()> {
    let stream = gpu.stream().clone();
    let shape = CacheShape {
        layers: 1,
        ..CacheShape::LLAMA_3_8B
    };
    let params = ShadowKvParams::default();
    let (heads, d, width) = (shape.kv_heads, shape.head_dim, shape.kv_width());
    let copy = copy_bandwidth(gpu)?;
    // Device-to-pinned-host copy rate: the offload's ceiling.
    let pinned_bytes = 1usize << 30;
    let source = filled(gpu, pinned_bytes / 2, 5)?;
    let pinned = PinnedBuffer::<half::bf16>::new(gpu, pinned_bytes / 2)?;
    let mut times = Vec::new();
    for _ in 0..5 {
        times.push(gpu.time_ms(&stream, 1, || {
            let (from, _use) = shadowkv::cudarc::driver::DevicePtr::device_ptr(&source, &stream);
            // SAFETY: both ranges hold `pinned_bytes`; the stream orders the copy.
            unsafe {
                shadowkv::cudarc::driver::sys::cuMemcpyAsync(
                    pinned.device_address(),
                    from,
                    pinned_bytes,
                    stream.cu_stream(),
                )
            }
            .result()?;
            Ok(())
        })?);
    }
    let to_host = pinned_bytes as f64 / (median(&mut times) as f64 * 1e-3);
    drop((source, pinned));
    println!(
        "ceilings: copy {:.0} GB/s, device -> pinned host {:.1} GB/s ({})",
        copy / 1e9,
        to_host / 1e9,
        gpu.info().name
    );
    println!();
    println!("| tokens | factorise ms | rest of prefill ms | offload done ms (GB/s) | offload end - compute end ms | prefill, compute stream ms | full-attention decode ms | causal prefill attention ms | layer's GEMMs ms | ShadowKV share of the layer's prefill | ‖K−A·Bm‖/‖K‖ |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &len in &[32_768usize, 122_880] {
        let pre = filled(gpu, len * width, 11)?;
        let layout = SequenceLayout {
            offset: 0,
            capacity: len as u32,
            len: len as u32,
        };
        let keys = filled(gpu, heads * len * d, 12)?;
        let values = filled(gpu, heads * len * d, 13)?;
        let query = filled(gpu, shape.q_heads * d, 14)?;
        let mut factoriser = Factoriser::new(&stream, width, 1)?;
        let mut a = filled(gpu, len * params.rank, 15)?;
        let mut bm = filled(gpu, params.rank * width, 16)?;
        let factorise_ms = median_of(gpu, 5, || {
            factoriser.run(gpu, &pre, params.rank, 0, &mut a, &mut bm)
        })?;
        factoriser.check()?;
        let error = factoriser.spectrum()?.relative_error(params.rank);
        drop((factoriser, a, bm));
        let mut cache = ShadowKvCache::new(
            gpu,
            shape,
            params,
            ValueHome::Host,
            CacheCapacity::uniform(1, len, 64),
        )?;
        let id = cache.add_sequence(gpu, len)?;
        let source = PrefillSource {
            keys: &keys,
            values: &values,
            layout,
        };
        // Warm up, then time: the compute stream's share, and the whole call with the copy
        // stream's offload (host clock, both streams drained).
        cache.prefill_layer(gpu, 0, id, &pre, &source, &query)?;
        cache.check_prefill()?;
        let compute_ms = median_of(gpu, 5, || {
            cache.prefill_layer(gpu, 0, id, &pre, &source, &query)
        })?;
        cache.check_prefill()?;
        // The offload: from the call's start on the compute stream to the cache's
        // `offload_done` event on the copy stream (not an event recorded after the call
        // returns: cuSOLVER blocks the host, which would put that event late).
        let mut offload = Vec::new();
        let mut after_compute = Vec::new();
        for _ in 0..5 {
            stream.synchronize()?;
            let start = gpu.new_event(true)?;
            let end = gpu.new_event(true)?;
            start.record(&stream)?;
            cache.prefill_layer(gpu, 0, id, &pre, &source, &query)?;
            end.record(&stream)?;
            end.synchronize()?;
            cache.offload_done().synchronize()?;
            let copy_ms = start.elapsed_ms(cache.offload_done())?;
            offload.push(copy_ms);
            after_compute.push(copy_ms - start.elapsed_ms(&end)?);
        }
        let offload_ms = median(&mut offload) as f64;
        let offload_late_ms = median(&mut after_compute) as f64;
        let offload_bytes = (heads * len * d * 2) as f64;
        // The layer's full-attention decode (batch 1) and causal prefill attention.
        let attention_shape = DecodeAttentionShape {
            batch: 1,
            q_heads: shape.q_heads,
            kv_heads: heads,
            head_dim: d,
        };
        let plan = DecodeAttentionPlan::for_gpu(gpu, attention_shape, &[layout])?;
        let mut attention = DecodeAttention::new(gpu, plan)?;
        let mut out = filled(gpu, shape.q_heads * d, 17)?;
        let decode_ms = steady_ms(gpu, &stream, || {
            attention.run(gpu, &stream, &query, &keys, &values, &mut out)
        })?;
        let prefill_shape = PrefillAttentionShape {
            tokens: len,
            q_heads: shape.q_heads,
            kv_heads: heads,
            head_dim: d,
        };
        let placement = [QueryPlacement {
            query_offset: 0,
            query_len: len as u32,
            start: 0,
        }];
        let prefill_plan = PrefillAttentionPlan::new(prefill_shape, &[layout], &placement)?;
        let mut prefill_attention = PrefillAttention::new(gpu, prefill_plan)?;
        let q_all = filled(gpu, prefill_shape.q_elements(), 18)?;
        let mut prefill_out = filled(gpu, prefill_shape.q_elements(), 19)?;
        let prefill_ms = median_of(gpu, 3, || {
            prefill_attention.run(gpu, &stream, &q_all, &keys, &values, &mut prefill_out)
        })?;
        drop((q_all, prefill_out, prefill_attention));
        let gemm_ms = layer_gemms_ms(gpu, len)?;
        let layer_ms = prefill_ms + gemm_ms;
        println!(
            "| {len} | {factorise_ms:.2} | {:.2} | {offload_ms:.2} ({:.1}) | {offload_late_ms:+.2} | {compute_ms:.2} | {decode_ms:.3} | {prefill_ms:.1} | {gemm_ms:.1} | {:.1}% | {error:.3} |",
            (compute_ms - factorise_ms).max(0.0),
            offload_bytes / (offload_ms * 1e-3) / 1e9,
            100.0 * compute_ms / layer_ms,
        );
    }
    // The factorisation at 1M tokens (random keys: no structure, so the error is large).
    let len = 1 << 20;
    let pre = filled(gpu, len * width, 21)?;
    let mut factoriser = Factoriser::new(&stream, width, 1)?;
    let mut a = filled(gpu, len * params.rank, 22)?;
    let mut bm = filled(gpu, params.rank * width, 23)?;
    let wall = Instant::now();
    let million_ms = median_of(gpu, 3, || {
        factoriser.run(gpu, &pre, params.rank, 0, &mut a, &mut bm)
    })?;
    factoriser.check()?;
    println!(
        "\nfactorisation at {len} tokens x {width}: {million_ms:.1} ms (3 runs in {:.1} s), no [L, L] matrix",
        wall.elapsed().as_secs_f64()
    );
    drop((factoriser, a, bm, pre));

    // Memory at 122K tokens, Llama-3-8B (32 layers), 1024 generated tokens per sequence.
    let model = CacheShape::LLAMA_3_8B;
    let (free, total) = gpu.context().mem_get_info()?;
    let weights = 16_060_522_496u64; // Llama-3-8B in bf16
    let gpu_bytes = (total as u64).saturating_sub(weights + (2u64 << 30));
    let host_bytes = 125u64 << 30;
    println!(
        "\nmemory at 122880 tokens + 1024 generated, Llama-3-8B: GPU {:.1} GB total ({:.1} free now), \
         {:.1} GB for the cache after the weights and 2 GiB of activations; host {:.0} GiB",
        total as f64 / 1e9,
        free as f64 / 1e9,
        gpu_bytes as f64 / 1e9,
        host_bytes as f64 / (1u64 << 30) as f64
    );
    println!("| mode | GPU GB per sequence | host GB per sequence | largest batch |");
    println!("| --- | ---: | ---: | ---: |");
    for (label, home) in [
        ("ShadowKV, values on host", ValueHome::Host),
        ("ShadowKV, values on GPU", ValueHome::Device),
    ] {
        let plan =
            ShadowKvCache::plan(&model, &params, home, 122_880, 1024, gpu_bytes, host_bytes)?;
        if home == ValueHome::Host {
            for (part, bytes) in plan.per_sequence.gpu.iter().chain(&plan.per_sequence.host) {
                println!("|   {part} | {:.3} | | |", *bytes as f64 / 1e9);
            }
        }
        println!(
            "| {label} | {:.2} | {:.2} | {} |",
            plan.per_sequence.gpu_bytes() as f64 / 1e9,
            plan.per_sequence.host_bytes() as f64 / 1e9,
            plan.sequences
        );
        if home == ValueHome::Device {
            println!(
                "| full attention (whole K/V on GPU) | {:.2} | 0 | {} |",
                plan.full_cache_bytes as f64 / 1e9,
                plan.full_cache_sequences
            );
        }
    }
    Ok(())
}
