//! Shared helpers for the workspace tests and benches: random inputs, poisoned buffers and
//! the GPU test harness that reports GPU tests as ignored (with the reason) on machines
//! without one, so they never pass silently.
use std::sync::OnceLock;

use half::bf16;
use rand::Rng;
use shadowkv::cudarc::driver::CudaSlice;
use shadowkv::{Gpu, Result};

pub mod rope_variants;
pub mod structured;

/// A NaN that marks every element a kernel should have written.
pub const POISON: bf16 = bf16::from_bits(0x7fc1);

/// `n` values uniform in `[-scale, scale)`, rounded to bf16.
pub fn random_bf16(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(rng.gen_range(-scale..scale)))
        .collect()
}

/// A device buffer of `n` poisoned values.
pub fn poisoned(gpu: &Gpu, n: usize) -> Result<CudaSlice<bf16>> {
    Ok(gpu.stream().clone_htod(&vec![POISON; n])?)
}

/// bf16 values widened for comparison.
pub fn to_f64(values: &[bf16]) -> Vec<f64> {
    values.iter().map(|v| v.to_f64()).collect()
}

/// Proptest cases per test: `$PROPTEST_CASES`, else `default`.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default)
}

/// A proptest runner of [`proptest_cases`]`(default)` cases that writes no failure files.
pub fn proptest_runner(default: u32) -> proptest::test_runner::TestRunner {
    proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: proptest_cases(default),
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    })
}

/// The GPU of this process, or why there is none.
pub fn shared_gpu() -> std::result::Result<&'static Gpu, String> {
    static GPU: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new(0).map_err(|error| error.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// A GPU test: gets the device, returns a message on failure.
pub type GpuTest = fn(&Gpu) -> std::result::Result<(), String>;

/// Runs GPU tests under libtest-mimic. Without a GPU each one is reported as ignored and the
/// reason is printed, so `cargo test` shows "N ignored" rather than N silent passes.
pub fn run_gpu_tests(tests: &[(&'static str, GpuTest)]) -> ! {
    let arguments = libtest_mimic::Arguments::from_args();
    let gpu = shared_gpu();
    match &gpu {
        Ok(gpu) => eprintln!(
            "GPU tests on {} ({} multiprocessors)",
            gpu.info().name,
            gpu.info().multiprocessors
        ),
        Err(reason) => eprintln!("GPU tests SKIPPED (reported as ignored): {reason}"),
    }
    let trials = tests
        .iter()
        .map(|&(name, test)| {
            libtest_mimic::Trial::test(name, move || {
                let gpu = shared_gpu().map_err(|reason| format!("no GPU: {reason}"))?;
                test(gpu).map_err(Into::into)
            })
            .with_ignored_flag(gpu.is_err())
        })
        .collect();
    libtest_mimic::run(&arguments, trials).exit()
}

/// Random ShadowKV layers laid out as `shadowkv_kernels::shadow` says, on the host (for the
/// references) and uploaded (for the GPU).
pub mod layers {
    use half::bf16;
    use rand::seq::SliceRandom;
    use rand::Rng;
    use shadowkv::reference::decode_step::HostLayer;
    use shadowkv::{
        LayerValues, PinnedBuffer, Result, SequenceLayout, ShadowBatch, ShadowConfig, ShadowLayer,
        ShadowSequence, EMPTY_SLOT,
    };

    use super::random_bf16;

    /// One sequence of a random layer.
    #[derive(Clone, Copy, Debug)]
    pub struct SequenceSpec {
        pub prompt_len: u32,
        /// Chunks kept exact at the end of the prompt (the local window is these plus the
        /// remainder of the prompt).
        pub local_chunks: u32,
        /// Chunks kept exact as outliers (removed from the landmarks).
        pub outlier_chunks: u32,
        /// Generated tokens after the sparse slots.
        pub generated: u32,
        /// Spare K/V rows past the generated tokens (room to grow, poisoned).
        pub spare: u32,
    }

    /// A random fetch case: 8 query heads over 1, 2 or 4 KV heads of dimension 64 or 128,
    /// chunks of 1 to 16 tokens, rank 16, a budget of 2 up to `max_budget` chunks, and 1 up to
    /// `max_sequences` sequences, each with up to 2 local and 2 outlier chunks, 0 up to
    /// `max_extra_chunks` more chunks than the budget needs, a ragged tail, and a few generated
    /// and spare rows.
    pub fn random_fetch_case(
        rng: &mut impl Rng,
        max_budget: usize,
        max_sequences: usize,
        max_extra_chunks: u32,
    ) -> (ShadowConfig, Vec<SequenceSpec>) {
        let c = rng.gen_range(1..=16usize);
        let kv_heads = [1usize, 2, 4][rng.gen_range(0..3)];
        let head_dim = [64usize, 128, 256][rng.gen_range(0..3)];
        let config = ShadowConfig {
            // Group 2 at head dimension 256 (groups 1, 2 and 4 are compiled there).
            q_heads: if head_dim == 256 { 2 * kv_heads } else { 8 },
            kv_heads,
            head_dim,
            chunk_size: c,
            rank: 16,
            budget_chunks: rng.gen_range(2..max_budget),
        };
        let k = config.budget_chunks as u32;
        let specs = (0..rng.gen_range(1..max_sequences))
            .map(|_| {
                let outliers = rng.gen_range(0..3u32);
                let local = rng.gen_range(0..3u32);
                let chunks = k + outliers + rng.gen_range(0..max_extra_chunks);
                SequenceSpec {
                    prompt_len: (chunks + local) * c as u32 + rng.gen_range(0..c as u32),
                    local_chunks: local,
                    outlier_chunks: outliers,
                    generated: rng.gen_range(0..3),
                    spare: rng.gen_range(0..3),
                }
            })
            .collect();
        (config, specs)
    }

    /// A small layer of one sequence (budget 16 chunks, rank 32, a 320-token prompt with two
    /// local and three outlier chunks), for the bad-input tests.
    pub fn small_layer(rng: &mut impl Rng) -> (ShadowConfig, HostLayer) {
        let config = ShadowConfig {
            budget_chunks: 16,
            rank: 32,
            ..ShadowConfig::LLAMA_3_8B
        };
        let spec = SequenceSpec {
            prompt_len: 8 * 40,
            local_chunks: 2,
            outlier_chunks: 3,
            generated: 2,
            spare: 0,
        };
        let host = random_layer(rng, &config, &[spec]);
        (config, host)
    }

    /// Builds a layer: random landmarks, `A`, `Bm`, values and exact K/V rows, each head's
    /// landmark chunk ids a random subset of the chunks (the rest are its outliers), every
    /// slot empty. Unused K/V rows hold NaN so a read past a layout shows.
    pub fn random_layer(
        rng: &mut impl Rng,
        config: &ShadowConfig,
        specs: &[SequenceSpec],
    ) -> HostLayer {
        let (kv_heads, d, c, r) = (
            config.kv_heads,
            config.head_dim,
            config.chunk_size as u32,
            config.rank,
        );
        let mut sequences = Vec::new();
        let (mut landmark_row, mut a_offset, mut bm_offset, mut values_offset, mut kv_offset) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        for (b, spec) in specs.iter().enumerate() {
            let chunks = spec.prompt_len / c - spec.local_chunks;
            let landmarks = chunks - spec.outlier_chunks;
            let local = spec.prompt_len - chunks * c;
            let sparse_start = local + spec.outlier_chunks * c;
            let len = sparse_start + config.sparse_budget() as u32 + spec.generated;
            let capacity = len + spec.spare;
            sequences.push(ShadowSequence {
                landmark_row,
                a_offset,
                bm_offset,
                host_value_offset: values_offset,
                landmarks,
                chunks,
                prompt_len: spec.prompt_len,
                sparse_start,
                resident_row: b as u32,
                _reserved: 0,
                kv: SequenceLayout {
                    offset: kv_offset,
                    capacity,
                    len,
                },
            });
            landmark_row += (kv_heads as u64) * landmarks as u64 + 3;
            a_offset += (spec.prompt_len as u64 * r as u64).next_multiple_of(8) + 8;
            bm_offset += (r * kv_heads * d) as u64 + 8;
            values_offset += (kv_heads as u64 * spec.prompt_len as u64 * d as u64) + 8;
            kv_offset += (kv_heads as u64 * capacity as u64 * d as u64) + 8;
        }
        let rows = landmark_row as usize;
        let landmarks = random_bf16(rng, rows * d, 1.0);
        let mut chunk_ids = vec![u32::MAX; rows];
        for s in &sequences {
            for h in 0..kv_heads as u32 {
                let mut ids: Vec<u32> = (0..s.chunks).collect();
                ids.shuffle(rng);
                ids.truncate(s.landmarks as usize);
                let base = s.landmark_base(h) as usize;
                chunk_ids[base..base + ids.len()].copy_from_slice(&ids);
            }
        }
        // A like U (rows of norm ~1), Bm like Sigma V^T: keys of norm ~ sqrt(d).
        let a_scale = (3.0 / r as f32).sqrt();
        let a = random_bf16(rng, a_offset as usize, a_scale);
        let bm = random_bf16(rng, bm_offset as usize, 1.7);
        let values = random_bf16(rng, values_offset as usize, 1.0);
        let poison = bf16::from_bits(0x7fc1);
        let mut k = vec![poison; kv_offset as usize];
        let mut v = vec![poison; kv_offset as usize];
        for s in &sequences {
            for h in 0..kv_heads as u32 {
                // Exact rows: local window, outliers and generated tokens; slots stay NaN
                // until a step fills them.
                let slots = s.sparse_start..s.sparse_start + config.sparse_budget() as u32;
                for token in (0..s.kv.len).filter(|t| !slots.contains(t)) {
                    let row = s.kv_row(h, token, d as u32) as usize;
                    for i in row..row + d {
                        k[i] = bf16::from_f32(rng.gen_range(-1.5..1.5));
                        v[i] = bf16::from_f32(rng.gen_range(-1.0..1.0));
                    }
                }
            }
        }
        let resident = vec![EMPTY_SLOT; specs.len() * kv_heads * config.budget_chunks];
        HostLayer {
            sequences,
            landmarks,
            chunk_ids,
            a,
            bm,
            values,
            k,
            v,
            resident,
        }
    }

    /// Uploads a host layer; values go to pinned, device-mapped host memory unless
    /// `values_on_gpu`.
    pub fn upload(
        gpu: &shadowkv::Gpu,
        config: &ShadowConfig,
        host: &HostLayer,
        values_on_gpu: bool,
    ) -> Result<ShadowLayer> {
        let stream = gpu.stream();
        let values = if values_on_gpu {
            LayerValues::Device(stream.clone_htod(&host.values)?)
        } else {
            let mut pinned = PinnedBuffer::new(gpu, host.values.len())?;
            pinned.as_mut_slice()?.copy_from_slice(&host.values);
            LayerValues::Host(pinned)
        };
        Ok(ShadowLayer {
            batch: ShadowBatch::new(stream, *config, &host.sequences)?,
            landmarks: stream.clone_htod(&host.landmarks)?,
            chunk_ids: stream.clone_htod(&host.chunk_ids)?,
            a: stream.clone_htod(&host.a)?,
            bm: stream.clone_htod(&host.bm)?,
            k: stream.clone_htod(&host.k)?,
            v: stream.clone_htod(&host.v)?,
            values,
            tier: None,
            resident: stream.clone_htod(&host.resident)?,
        })
    }
}

/// Benchmark helpers: filled device buffers and the GEMM ceiling; the copy ceilings and the
/// steady-state timing are the library's (`shadowkv::measure`), shared with `shadowkv bandwidth`.
pub mod bench {
    use half::bf16;
    use rand::{rngs::StdRng, SeedableRng};
    use shadowkv::cudarc::driver::CudaSlice;
    use shadowkv::Gpu;

    use super::random_bf16;
    pub use shadowkv::measure::{
        best_ms, copy_bandwidth, copy_bandwidth_at, median, pinned_copy_bandwidth,
        pinned_copy_bandwidth_at, steady_ms,
    };

    /// Fills a large device buffer with a repeated random block (no zeros, no host RNG over GiBs).
    pub fn filled(gpu: &Gpu, elements: usize, seed: u64) -> shadowkv::Result<CudaSlice<bf16>> {
        let stream = gpu.stream();
        let block = 16 << 20;
        let pattern =
            stream.clone_htod(&random_bf16(&mut StdRng::seed_from_u64(seed), block, 1.0))?;
        // SAFETY: every element is written by the copies below before any kernel reads it.
        let mut buffer = unsafe { stream.alloc::<bf16>(elements)? };
        let mut start = 0;
        while start < elements {
            let n = block.min(elements - start);
            stream.memcpy_dtod(&pattern.slice(..n), &mut buffer.slice_mut(start..start + n))?;
            start += n;
        }
        Ok(buffer)
    }

    /// cuBLAS bf16 GEMM rate (FLOP/s) at 8192^3, f32 accumulate, median of 6: the tensor-core
    /// ceiling that matrix-bound kernels are compared with in the same run.
    pub fn gemm_rate(gpu: &Gpu) -> shadowkv::Result<f64> {
        use shadowkv::cudarc::cublas::{sys::cublasOperation_t, CudaBlas, Gemm, GemmConfig};
        let n = 8192usize;
        let blas = CudaBlas::new(gpu.stream().clone()).map_err(|e| shadowkv::Error::Library {
            library: shadowkv::error::Library::Cublas,
            call: "cublasCreate",
            status: format!("{:?}", e.0),
        })?;
        let a = filled(gpu, n * n, 21)?;
        let b = filled(gpu, n * n, 22)?;
        let mut c = filled(gpu, n * n, 23)?;
        let config = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: n as i32,
            k: n as i32,
            alpha: bf16::ONE,
            lda: n as i32,
            ldb: n as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        let mut times = Vec::new();
        for _ in 0..6 {
            times.push(gpu.time_ms(gpu.stream(), 1, || {
                // SAFETY: a, b and c hold n * n elements each, as the config says.
                unsafe { blas.gemm(config, &a, &b, &mut c) }
                    .map_err(|e| shadowkv::error::invalid("cublas gemm", e.to_string(), "success"))
            })?);
        }
        Ok(2.0 * (n as f64).powi(3) / (median(&mut times) as f64 * 1e-3))
    }
}
