//! Decode attention at Llama-3-8B shapes (32 query heads, 8 KV heads, d = 128), timed with
//! CUDA events, against a device-to-device copy measured in the same run.
//!
//! `cargo bench --bench attention` (criterion statistics, then a summary table of medians).
//! For Nsight Compute: `ncu --clock-control none <bench binary> --bench --profile-time 1 b16_len2048`.
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::kernels::attention::kernel_layout::MAX_SPLITS;
use shadowkv::{DecodeAttention, DecodeAttentionPlan, DecodeAttentionShape, Gpu, SequenceLayout};
use shadowkv_suite::bench::{copy_bandwidth, filled, steady_ms};
use shadowkv_suite::shared_gpu;

const BATCHES: [usize; 3] = [1, 4, 16];
const LENS: [u32; 4] = [2048, 8192, 32_768, 131_072];
const SHAPE: DecodeAttentionShape = DecodeAttentionShape {
    batch: 1,
    q_heads: 32,
    kv_heads: 8,
    head_dim: 128,
};
/// Each timed run reads a different set of buffers until this many bytes have passed, so
/// small problems are not served from the 50 MB L2.
const ROTATION_BYTES: usize = 256 << 20;

struct Setup {
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    q: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
}

/// Rows of (batch, tokens, split length or splits, ms, bytes/s) next to the copy ceiling.
fn print_table(title: &str, third: &str, rows: &[(usize, u32, u32, f64, f64)], copy: f64) {
    if !title.is_empty() {
        println!("\n{title}");
    }
    println!(
        "{:>5} {:>8} {third:>9} {:>10} {:>9} {:>8}",
        "batch", "tokens", "time us", "GB/s", "of copy"
    );
    for &(batch, len, third, ms, rate) in rows {
        println!(
            "{batch:>5} {len:>8} {third:>9} {:>10.1} {:>9.0} {:>7.1}%",
            ms * 1e3,
            rate / 1e9,
            100.0 * rate / copy
        );
    }
}

/// Plans for `sets` disjoint copies of a `batch x len` problem inside the shared buffers,
/// split by the planner or at `split_len`.
fn plans(
    gpu: &Gpu,
    batch: usize,
    len: u32,
    capacity_elements: usize,
    split_len: Option<u32>,
) -> shadowkv::Result<Vec<DecodeAttention>> {
    let shape = DecodeAttentionShape { batch, ..SHAPE };
    let per_sequence = SHAPE.kv_heads * len as usize * SHAPE.head_dim;
    let problem_bytes = 2 * 2 * batch * per_sequence;
    let sets = ROTATION_BYTES
        .div_ceil(problem_bytes)
        .clamp(1, capacity_elements / (batch * per_sequence));
    (0..sets)
        .map(|set| {
            let layouts: Vec<_> = (0..batch)
                .map(|b| SequenceLayout {
                    offset: ((set * batch + b) * per_sequence) as u64,
                    capacity: len,
                    len,
                })
                .collect();
            let plan = match split_len {
                Some(split_len) => DecodeAttentionPlan::with_split_len(shape, &layouts, split_len)?,
                None => DecodeAttentionPlan::for_gpu(gpu, shape, &layouts)?,
            };
            DecodeAttention::new(gpu, plan)
        })
        .collect()
}

fn main() {
    let gpu = match shared_gpu() {
        Ok(gpu) => gpu,
        Err(reason) => {
            println!("attention bench SKIPPED: {reason}");
            return;
        }
    };
    if let Err(error) = run(gpu) {
        eprintln!("attention bench failed: {error}");
        std::process::exit(1);
    }
}

fn run(gpu: &Gpu) -> shadowkv::Result<()> {
    let copy = copy_bandwidth(gpu)?;
    println!(
        "device: {} ({} SMs); device-to-device copy: {:.0} GB/s (read + write)",
        gpu.info().name,
        gpu.info().multiprocessors,
        copy / 1e9
    );

    let capacity = BATCHES.iter().max().unwrap()
        * *LENS.iter().max().unwrap() as usize
        * SHAPE.kv_heads
        * SHAPE.head_dim;
    let capacity = capacity.max(ROTATION_BYTES / 2);
    let mut setup = Setup {
        k: filled(gpu, capacity, 2)?,
        v: filled(gpu, capacity, 3)?,
        q: filled(
            gpu,
            BATCHES.iter().max().unwrap() * SHAPE.q_heads * SHAPE.head_dim,
            4,
        )?,
        out: filled(
            gpu,
            BATCHES.iter().max().unwrap() * SHAPE.q_heads * SHAPE.head_dim,
            5,
        )?,
    };
    let stream = gpu.stream().clone();
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    let mut rows = Vec::new();
    for batch in BATCHES {
        for len in LENS {
            let mut attention = plans(gpu, batch, len, capacity, None)?;
            let bytes = attention[0].plan().kv_bytes_read();
            let elements = batch * SHAPE.q_heads * SHAPE.head_dim;
            let (q, out) = (setup.q.slice(..elements), &mut setup.out);
            let mut out = out.slice_mut(..elements);
            let mut next = 0usize;
            let mut step = |gpu: &Gpu| {
                next = (next + 1) % attention.len();
                attention[next].run(gpu, &stream, &q, &setup.k, &setup.v, &mut out)
            };
            let mut group = criterion.benchmark_group("decode_attention");
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(
                BenchmarkId::new(format!("b{batch}"), format!("len{len}")),
                |bencher| {
                    bencher.iter_custom(|iterations| {
                        let ms = gpu
                            .time_ms(&stream, iterations as u32, || step(gpu))
                            .expect("timed run");
                        Duration::from_secs_f64(ms as f64 * 1e-3 * iterations as f64)
                    })
                },
            );
            group.finish();
            let ms = steady_ms(gpu, &stream, || step(gpu))?;
            rows.push((
                batch,
                len,
                attention[0].plan().max_splits(),
                ms,
                bytes as f64 / (ms * 1e-3),
            ));
        }
    }
    // How the split length moves the two target points (informs the planner).
    let mut sweep = Vec::new();
    for (batch, len) in [(16usize, 2048u32), (16, 2560), (1, 2560), (1, 131_072)] {
        for split_len in [
            128u32, 256, 512, 640, 704, 864, 1024, 1280, 2048, 2560, 2688, 4096,
        ] {
            if split_len > len || len.div_ceil(split_len) > MAX_SPLITS {
                continue;
            }
            let mut attention = plans(gpu, batch, len, capacity, Some(split_len))?;
            let elements = batch * SHAPE.q_heads * SHAPE.head_dim;
            let q = setup.q.slice(..elements);
            let mut out = setup.out.slice_mut(..elements);
            let mut next = 0usize;
            let ms = steady_ms(gpu, &stream, || {
                next = (next + 1) % attention.len();
                attention[next].run(gpu, &stream, &q, &setup.k, &setup.v, &mut out)
            })?;
            sweep.push((
                batch,
                len,
                split_len,
                ms,
                attention[0].plan().kv_bytes_read() as f64 / (ms * 1e-3),
            ));
        }
    }
    print_table("split-length sweep", "split_len", &sweep, copy);
    println!("\nsparse GQA decode attention = full attention over the buffer (32/8 heads, d 128)");
    println!(
        "CUDA-event medians of 20 back-to-back steps; copy ceiling {:.0} GB/s; target >= 80% at (b1, 128K) and (b16, 2K)",
        copy / 1e9
    );
    print_table("", "splits", &rows, copy);
    Ok(())
}
