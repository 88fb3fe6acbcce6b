//! Causal prefill attention, batch 1, at Llama-3-8B heads (32/8, d 128) for 4K, 16K and 32K
//! tokens and at SmolLM2 heads (9/3, d 64) for 4K, timed with CUDA events, in TFLOP/s next to
//! a cuBLAS bf16 GEMM measured in the same run. FLOPs are counted as `4 * d * q_heads * T²/2`
//! (Q·Kᵀ and P·V over the causal half).
//!
//! `cargo bench --bench prefill_attention` (criterion statistics, then a summary table).
//! For Nsight Compute: `ncu --clock-control none <bench binary> --bench --profile-time 1 llama3_8b/4096`.
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use shadowkv::kernels::prefill_attention::kernel_layout::WARP_COUNTS;
use shadowkv::{
    Gpu, PrefillAttention, PrefillAttentionPlan, PrefillAttentionShape, QueryPlacement,
    SequenceLayout,
};
use shadowkv_suite::bench::{filled, gemm_rate, median};
use shadowkv_suite::shared_gpu;

/// (label, q_heads, kv_heads, head_dim, tokens)
const CASES: [(&str, usize, usize, usize, u32); 4] = [
    ("llama3_8b", 32, 8, 128, 4096),
    ("llama3_8b", 32, 8, 128, 16_384),
    ("llama3_8b", 32, 8, 128, 32_768),
    ("smollm2", 9, 3, 64, 4096),
];

fn main() {
    let gpu = match shared_gpu() {
        Ok(gpu) => gpu,
        Err(reason) => {
            println!("prefill attention bench SKIPPED: {reason}");
            return;
        }
    };
    if let Err(error) = run(gpu) {
        eprintln!("prefill attention bench failed: {error}");
        std::process::exit(1);
    }
}

/// Median over 7 samples of the device time of one call (each sample runs enough calls for
/// about 20 ms, at least one).
fn median_ms(gpu: &Gpu, mut call: impl FnMut() -> shadowkv::Result<()>) -> shadowkv::Result<f64> {
    let stream = gpu.stream();
    let once = gpu.time_ms(stream, 1, &mut call)?;
    let iterations = ((20.0 / once.max(1e-3)) as u32).clamp(1, 50);
    let mut times = Vec::new();
    for _ in 0..7 {
        times.push(gpu.time_ms(stream, iterations, &mut call)?);
    }
    Ok(median(&mut times) as f64)
}

fn run(gpu: &Gpu) -> shadowkv::Result<()> {
    let gemm = gemm_rate(gpu)?;
    println!(
        "device: {} ({} SMs); cuBLAS bf16 GEMM 8192^3 measured now: {:.0} TFLOP/s",
        gpu.info().name,
        gpu.info().multiprocessors,
        gemm / 1e12
    );
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    let stream = gpu.stream().clone();
    let mut rows = Vec::new();
    for (label, q_heads, kv_heads, head_dim, tokens) in CASES {
        let shape = PrefillAttentionShape {
            tokens: tokens as usize,
            q_heads,
            kv_heads,
            head_dim,
        };
        let layouts = [SequenceLayout {
            offset: 0,
            capacity: tokens,
            len: tokens,
        }];
        let queries = [QueryPlacement {
            query_offset: 0,
            query_len: tokens,
            start: 0,
        }];
        let plan = PrefillAttentionPlan::new(shape, &layouts, &queries)?;
        let default_warps = plan.warps();
        let kv_elements = plan.kv_elements();
        let q = filled(gpu, shape.q_elements(), 1)?;
        let k = filled(gpu, kv_elements, 2)?;
        let v = filled(gpu, kv_elements, 3)?;
        let mut out = filled(gpu, shape.q_elements(), 4)?;
        let flops = 4.0 * (head_dim * q_heads) as f64 * (tokens as f64).powi(2) / 2.0;
        // The default kernel first, then the other P precision and the other compiled warp
        // count for comparison.
        let default_split = plan.split_p();
        let mut variants = vec![
            (default_warps, default_split),
            (default_warps, !default_split),
        ];
        variants.extend(
            WARP_COUNTS
                .iter()
                .filter(|&&w| w != default_warps)
                .map(|&w| (w, default_split)),
        );
        for (warps, split_p) in variants {
            let is_default = warps == default_warps && split_p == default_split;
            let variant = plan.clone().with_warps(warps)?.with_split_p(split_p)?;
            let mut attention = PrefillAttention::new(gpu, variant)?;
            let mut call = || attention.run(gpu, &stream, &q, &k, &v, &mut out);
            if is_default {
                let mut group = criterion.benchmark_group("prefill_attention");
                group.throughput(Throughput::Elements(flops as u64));
                group.bench_function(BenchmarkId::new(label, tokens), |bencher| {
                    bencher.iter_custom(|iterations| {
                        let ms = gpu
                            .time_ms(&stream, iterations as u32, &mut call)
                            .expect("timed run");
                        Duration::from_secs_f64(ms as f64 * 1e-3 * iterations as f64)
                    })
                });
                group.finish();
            }
            let ms = median_ms(gpu, &mut call)?;
            let mark = if is_default { "*" } else { "" };
            let p = if split_p { "split" } else { "bf16" };
            rows.push((
                label,
                q_heads,
                kv_heads,
                head_dim,
                tokens,
                format!("{warps}/{p}{mark}"),
                ms,
                flops / (ms * 1e-3),
            ));
        }
    }
    println!("\ncausal prefill attention, batch 1 (CUDA-event medians; FLOPs = 4 d Hq T^2 / 2)");
    println!(
        "{:>10} {:>6} {:>4} {:>7} {:>10} {:>10} {:>8} {:>8}",
        "model", "heads", "d", "tokens", "warps/P", "time ms", "TFLOP/s", "of GEMM"
    );
    for (label, q_heads, kv_heads, head_dim, tokens, warps, ms, rate) in rows {
        println!(
            "{:>10} {:>6} {:>4} {:>7} {:>10} {:>10.3} {:>8.1} {:>7.1}%",
            label,
            format!("{q_heads}/{kv_heads}"),
            head_dim,
            tokens,
            warps,
            ms,
            rate / 1e12,
            100.0 * rate / gemm
        );
    }
    println!(
        "cuBLAS bf16 GEMM (8192^3, same run): {:.0} TFLOP/s",
        gemm / 1e12
    );
    Ok(())
}
