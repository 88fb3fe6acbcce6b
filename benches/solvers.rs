//! Which route gives the rank-r eigenpairs of the 1024² Gram matrix of 32K keys fastest, and
//! does it block the host? cuSOLVER's `syevd` (all pairs), `syevdx` (the top r) and
//! `syevj` (Jacobi) against the library's subspace iteration (`Factoriser::run`, whole), on
//! the GPU (events) and on the host (the call's return), with the energy each captures
//! against the best rank-r (syevd's). Keys: a decaying spectrum like real keys', and a flat one
//! (uniform noise, the worst case for subspace iteration).
//!
//! `cargo bench --bench solvers`
use std::time::Instant;

use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};
use shadowkv::cudarc::cublas::{sys as blas, CudaBlas};
use shadowkv::cudarc::cusolver::{safe::DnHandle, sys as solver};
use shadowkv::cudarc::driver::{CudaSlice, DevicePtrMut};
use shadowkv::kernels::factorise::{Factoriser, OVERSAMPLE, SUBSPACE_ITERATIONS};
use shadowkv::Gpu;
use shadowkv_suite::bench::median;
use shadowkv_suite::shared_gpu;

/// Panics unless a cuBLAS or cuSOLVER call succeeded (a probe, not a library path).
macro_rules! ok {
    ($e:expr) => {{
        let status = $e;
        assert!(
            format!("{status:?}").ends_with("SUCCESS"),
            "{} -> {status:?}",
            stringify!($e)
        );
    }};
}

fn main() {
    let gpu = match shared_gpu() {
        Ok(gpu) => gpu,
        Err(reason) => {
            println!("solvers probe SKIPPED: {reason}");
            return;
        }
    };
    for (label, decay) in [("decaying j^-0.75", 0.75f32), ("flat", 0.0)] {
        run(gpu, label, decay);
    }
}

fn addr<T>(s: &mut CudaSlice<T>, gpu: &Gpu) -> u64 {
    s.device_ptr_mut(gpu.stream()).0
}

fn run(gpu: &Gpu, label: &str, decay: f32) {
    let stream = gpu.stream().clone();
    let (len, w, r) = (32_768usize, 1024usize, 160usize);
    let mut rng = StdRng::seed_from_u64(3);
    let mut scale: Vec<f32> = (0..w).map(|j| (j as f32 + 1.0).powf(-decay)).collect();
    for j in (1..w).rev() {
        scale.swap(j, rng.gen_range(0..=j));
    }
    let keys: Vec<bf16> = (0..len * w)
        .map(|i| bf16::from_f32((rng.gen::<f32>() - 0.5 + 0.3) * scale[i % w]))
        .collect();
    let keys = stream.clone_htod(&keys).unwrap();
    let blas_handle = CudaBlas::new(stream.clone()).unwrap();
    let dn = DnHandle::new(stream.clone()).unwrap();
    let h = blas_handle.handle();
    let s = dn.cu();
    let mut gram0 = stream.alloc_zeros::<f32>(w * w).unwrap();
    // Gram by cuBLAS: G = X Xᵀ with X = keysᵀ column-major [w, L].
    {
        let g0 = addr(&mut gram0, gpu);
        let (k, _u) = shadowkv::cudarc::driver::DevicePtr::device_ptr(&keys, &stream);
        let (one, zero) = (1f32, 0f32);
        // SAFETY: probe; sizes as allocated.
        unsafe {
            ok!(blas::cublasGemmEx(
                *h,
                blas::cublasOperation_t::CUBLAS_OP_N,
                blas::cublasOperation_t::CUBLAS_OP_T,
                w as i32,
                w as i32,
                len as i32,
                &one as *const f32 as *const _,
                k as *const _,
                blas::cudaDataType::CUDA_R_16BF,
                w as i32,
                k as *const _,
                blas::cudaDataType::CUDA_R_16BF,
                w as i32,
                &zero as *const f32 as *const _,
                g0 as *mut _,
                blas::cudaDataType::CUDA_R_32F,
                w as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            ))
        };
    }
    let mut gram = stream.alloc_zeros::<f32>(w * w).unwrap();
    let mut values = stream.alloc_zeros::<f32>(w).unwrap();
    let mut info = stream.alloc_zeros::<i32>(1).unwrap();
    let n = w as i32;
    let lower = solver::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
    let vector = solver::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
    let (g, wv, inf) = (
        addr(&mut gram, gpu),
        addr(&mut values, gpu),
        addr(&mut info, gpu),
    );
    // Workspace: the largest any route asks for.
    let mut lwork = 0i32;
    let mut lw = 0i32;
    // SAFETY: probe FFI on live buffers of the sizes given.
    unsafe {
        ok!(solver::cusolverDnSsyevd_bufferSize(
            s, vector, lower, n, g as _, n, wv as _, &mut lw
        ));
        lwork = lwork.max(lw);
        let mut meig = 0;
        ok!(solver::cusolverDnSsyevdx_bufferSize(
            s,
            vector,
            solver::cusolverEigRange_t::CUSOLVER_EIG_RANGE_I,
            lower,
            n,
            g as _,
            n,
            0.0,
            0.0,
            n - r as i32 + 1,
            n,
            &mut meig,
            wv as _,
            &mut lw
        ));
        lwork = lwork.max(lw);
    }
    let mut syevj_info: solver::syevjInfo_t = std::ptr::null_mut();
    // SAFETY: probe FFI.
    unsafe {
        ok!(solver::cusolverDnCreateSyevjInfo(&mut syevj_info));
        ok!(solver::cusolverDnXsyevjSetTolerance(syevj_info, 1e-5));
        ok!(solver::cusolverDnXsyevjSetMaxSweeps(syevj_info, 15));
        ok!(solver::cusolverDnSsyevj_bufferSize(
            s, vector, lower, n, g as _, n, wv as _, &mut lw, syevj_info
        ));
        lwork = lwork.max(lw);
    }
    let mut work = stream.alloc_zeros::<f32>(lwork as usize).unwrap();
    let wk = addr(&mut work, gpu);
    let reset = |gram: &mut CudaSlice<f32>| stream.memcpy_dtod(&gram0, gram).unwrap();

    // Reference: syevd's full spectrum.
    reset(&mut gram);
    // SAFETY: probe FFI.
    unsafe {
        ok!(solver::cusolverDnSsyevd(
            s, vector, lower, n, g as _, n, wv as _, wk as _, lwork, inf as _
        ))
    };
    let mut spectrum = stream.clone_dtoh(&values).unwrap();
    spectrum.reverse();
    let trace: f64 = spectrum.iter().map(|&v| v.max(0.0) as f64).sum();
    let best: f64 = spectrum[..r].iter().map(|&v| v as f64).sum();
    let error_of = |captured: f64| ((trace - captured).max(0.0) / trace).sqrt();
    println!(
        "\n{label}: L {len}, w {w}, r {r}: best rank-r error {:.4}",
        error_of(best)
    );
    println!("| route | GPU ms | host call ms | captured/best - 1 | rank-r error |");
    println!("| --- | ---: | ---: | ---: | ---: |");

    let mut time = |name: &str, call: &mut dyn FnMut(), captured: &dyn Fn() -> f64| {
        let mut gpu_ms = Vec::new();
        let mut host_ms = Vec::new();
        for _ in 0..5 {
            reset(&mut gram);
            stream.synchronize().unwrap();
            let start = gpu.new_event(true).unwrap();
            let end = gpu.new_event(true).unwrap();
            start.record(&stream).unwrap();
            let wall = Instant::now();
            call();
            host_ms.push(wall.elapsed().as_secs_f32() * 1e3);
            end.record(&stream).unwrap();
            end.synchronize().unwrap();
            gpu_ms.push(start.elapsed_ms(&end).unwrap());
        }
        let c = captured();
        println!(
            "| {name} | {:.2} | {:.2} | {:.2e} | {:.4} |",
            median(&mut gpu_ms),
            median(&mut host_ms),
            c / best - 1.0,
            error_of(c)
        );
    };
    let top_sum = |values: &CudaSlice<f32>, count: usize| -> f64 {
        let v = stream.clone_dtoh(values).unwrap();
        let mut v: Vec<f64> = v[..count].iter().map(|&x| x as f64).collect();
        v.sort_by(|a, b| b.total_cmp(a));
        v[..r].iter().sum()
    };

    // SAFETY (all closures below): probe FFI on the buffers sized above.
    time(
        "syevd (all)",
        &mut || unsafe {
            ok!(solver::cusolverDnSsyevd(
                s, vector, lower, n, g as _, n, wv as _, wk as _, lwork, inf as _
            ))
        },
        &|| top_sum(&values, w),
    );
    time(
        "syevdx (top r)",
        &mut || unsafe {
            let mut meig = 0;
            ok!(solver::cusolverDnSsyevdx(
                s,
                vector,
                solver::cusolverEigRange_t::CUSOLVER_EIG_RANGE_I,
                lower,
                n,
                g as _,
                n,
                0.0,
                0.0,
                n - r as i32 + 1,
                n,
                &mut meig,
                wv as _,
                wk as _,
                lwork,
                inf as _
            ))
        },
        &|| top_sum(&values, r),
    );
    time(
        "syevj (tol 1e-5, 15 sweeps)",
        &mut || unsafe {
            ok!(solver::cusolverDnSsyevj(
                s, vector, lower, n, g as _, n, wv as _, wk as _, lwork, inf as _, syevj_info
            ))
        },
        &|| top_sum(&values, w),
    );

    // The library's route (subspace iteration, see `shadowkv::kernels::factorise`), whole: Gram, pairs,
    // factors and A.
    let mut factoriser = Factoriser::new(&stream, w, 1).unwrap();
    let mut a = stream.alloc_zeros::<bf16>(len * r).unwrap();
    let mut bm = stream.alloc_zeros::<bf16>(r * w).unwrap();
    let mut gpu_ms = Vec::new();
    let mut host_ms = Vec::new();
    for _ in 0..5 {
        stream.synchronize().unwrap();
        let start = gpu.new_event(true).unwrap();
        let end = gpu.new_event(true).unwrap();
        start.record(&stream).unwrap();
        let wall = Instant::now();
        factoriser.run(gpu, &keys, r, 0, &mut a, &mut bm).unwrap();
        host_ms.push(wall.elapsed().as_secs_f32() * 1e3);
        end.record(&stream).unwrap();
        end.synchronize().unwrap();
        gpu_ms.push(start.elapsed_ms(&end).unwrap());
    }
    factoriser.check().unwrap();
    let spectrum = factoriser.spectrum().unwrap();
    let captured: f64 = spectrum.leading[..r].iter().map(|&v| v as f64).sum();
    println!(
        "| Factoriser::run (Gram + subspace p {} x {SUBSPACE_ITERATIONS} + factors + A) | {:.2} | {:.2} | {:.2e} | {:.4} (its own estimate {:.4}) |",
        r + OVERSAMPLE,
        median(&mut gpu_ms),
        median(&mut host_ms),
        captured / best - 1.0,
        error_of(captured),
        spectrum.relative_error(r)
    );
}
