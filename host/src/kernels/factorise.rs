//! Low-rank key factorisation on the GPU (`docs/ARCHITECTURE.md`, prefill step 1): the
//! rank-`r` approximation `K_pre ≈ A · Bm` of one sequence's pre-RoPE keys (`[L, Hkv*d]`),
//! with `A = U_r` (`[L, r]`) and `Bm = Σ_r V_rᵀ` (`[r, Hkv*d]`), both stored bf16.
//!
//! Never forms an `[L, L]` matrix:
//! 1. the Gram matrix `G = K_preᵀ K_pre` (`[w, w]`, `w = Hkv*d`) by cuBLAS, bf16 in, f32
//!    accumulation (a GEMM whose inner dimension is `L`);
//! 2. its `p = r + OVERSAMPLE` leading eigenpairs by subspace iteration: `Y = G·Ω` from a
//!    fixed random `Ω` (`[w, p]`), then [`SUBSPACE_ITERATIONS`] rounds of `Q = qr(Y)`,
//!    `Y = G·Q` (cuSOLVER `geqrf`/`orgqr`, cuBLAS f32 products), a last `Q = qr(Y)` and the
//!    Rayleigh–Ritz step: `T = Qᵀ G Q` (`[p, p]`), `T = U Λ Uᵀ` (cuSOLVER `syevd`), `V = Q U`;
//! 3. `factor_rows` (`shadowkv_kernels::factorise`): the `r` largest pairs into `Bm`
//!    (`sqrt(λ) v`) and a projection (`v / sqrt(λ)`);
//! 4. `A = K_pre · projectionᵀ` by cuBLAS, written bf16.
//!
//! Why not `syevd` on `G` itself: on the H100 it takes 11.6 ms at `w = 1024` whatever `L`, and
//! only `r` of the 1024 pairs are used; this route takes about 4.6 ms, and its rank-`r` error
//! stays within 0.6% of the best on key-like spectra (`cargo bench --bench solvers` measures
//! both). Every cuSOLVER call blocks the host while it runs; the offload, queued before, runs
//! meanwhile on the copy stream.
//!
//! Nothing here reads results back; [`Factoriser::check`] reads cuSOLVER's status, and
//! [`Factoriser::spectrum`] the leading eigenvalues and `trace(G) = ‖K‖²`, from which
//! `‖K − A·Bm‖/‖K‖ = sqrt(1 − Σ_{i<r} λ_i / trace)` before the bf16 rounding.
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::cusolver::{safe::DnHandle, sys as solver};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
pub use shadowkv_kernels::factorise as kernel_layout;
use shadowkv_kernels::factorise::{self as layout, FactorParams};
use shadowkv_kernels::shadow::{MAX_RANK, RANK_STEP};

use crate::error::{check_len, check_reach, invalid, Error, Library, Result};
use crate::gpu::{Gpu, LaunchBuffers};
use crate::linear::{blas_error, gemm, GemmShape};
use crate::ptx;

/// Widest key matrix (`Hkv * d`): the Gram matrix grows as its square (4 MiB at 1024).
pub const MAX_WIDTH: usize = 8192;
/// Extra directions iterated beyond the rank, so the `r`-th converges (Halko et al.).
pub const OVERSAMPLE: usize = 16;
/// Multiplications by `G` between the first and the last orthonormalisation.
pub const SUBSPACE_ITERATIONS: usize = 2;
/// Seed of the fixed start block `Ω`.
const START_SEED: u64 = 0x05ee_d0fc_a55e;

const F32: blas_sys::cudaDataType = blas_sys::cudaDataType::CUDA_R_32F;

fn solver_error(call: &'static str, status: solver::cusolverStatus_t) -> Error {
    Error::Library {
        library: Library::Cusolver,
        call,
        status: format!("{status:?}"),
    }
}

fn solver_status(call: &'static str, status: solver::cusolverStatus_t) -> Result<()> {
    match status {
        solver::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS => Ok(()),
        status => Err(solver_error(call, status)),
    }
}

/// The leading eigenvalues of the latest run's Gram matrix and its trace.
#[derive(Clone, Debug)]
pub struct Spectrum {
    /// The `p` Ritz values, largest first.
    pub leading: Vec<f32>,
    /// `trace(G) = ‖K_pre‖²_F`.
    pub total: f64,
}

impl Spectrum {
    /// `‖K − A·Bm‖ / ‖K‖` of the rank-`rank` factors (before their bf16 rounding).
    pub fn relative_error(&self, rank: usize) -> f64 {
        let kept: f64 = self
            .leading
            .iter()
            .take(rank)
            .map(|&v| v.max(0.0) as f64)
            .sum();
        ((self.total - kept).max(0.0) / self.total.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// GPU bytes a [`Factoriser`] for keys `width` wide holds (cuSOLVER's workspace estimated
/// from above: `geqrf`/`orgqr` at a block of 64 columns, `syevd` at `1 + 6p + 2p²`).
pub fn scratch_bytes(width: usize) -> u64 {
    let (w, p) = (
        width as u64,
        (MAX_RANK as u64 + OVERSAMPLE as u64).min(width as u64),
    );
    let workspace = (64 * w).max(1 + 6 * p + 2 * p * p);
    4 * (w * w + 3 * w * p + p * p + 2 * p + workspace) + 2 * MAX_RANK as u64 * w
}

/// The device addresses of a [`Factoriser`]'s scratch for one run (`info` at the run's slot),
/// taken through the run's [`LaunchBuffers`].
#[derive(Clone, Copy)]
struct Scratch {
    gram: u64,
    start: u64,
    blocks: [u64; 2],
    small: u64,
    eigenvalues: u64,
    tau: u64,
    workspace: u64,
    workspace_len: i32,
    info: u64,
}

/// The handles and scratch of the factorisation for one key width, reused across layers and
/// sequences.
pub struct Factoriser {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    width: usize,
    /// `[w, w]` f32: the Gram matrix (column-major; symmetric).
    gram: CudaSlice<f32>,
    /// `[w, p_max]` f32: the fixed random start `Ω`.
    start: CudaSlice<f32>,
    /// Two `[w, p_max]` f32 blocks: `Y` and `Q` in turn, then `G·Q` and `V`.
    blocks: [CudaSlice<f32>; 2],
    /// `[p_max, p_max]` f32: `T`, then its eigenvectors `U`.
    small: CudaSlice<f32>,
    /// `[p_max]` f32 ascending: the Ritz values of the latest run.
    eigenvalues: CudaSlice<f32>,
    /// The latest run's `p`.
    pairs: usize,
    tau: CudaSlice<f32>,
    workspace: CudaSlice<f32>,
    /// cuSOLVER's status of each slot's latest run.
    info: CudaSlice<i32>,
    /// `[MAX_RANK, w]` bf16: `v / sqrt(λ)` rows.
    projection: CudaSlice<bf16>,
}

impl Factoriser {
    /// Scratch for keys `width` wide, on `stream`; `slots` statuses (one per layer, say).
    pub fn new(stream: &Arc<CudaStream>, width: usize, slots: usize) -> Result<Self> {
        if !(RANK_STEP as usize..=MAX_WIDTH).contains(&width) {
            return Err(invalid(
                "width",
                format!("is {width}"),
                format!("Hkv * d in {RANK_STEP}..={MAX_WIDTH}"),
            ));
        }
        // SAFETY: probing for the library only.
        if !unsafe { solver::is_culib_present() } {
            return Err(invalid(
                "cusolver",
                "libcusolver was not found",
                "the CUDA toolkit's lib64 on LD_LIBRARY_PATH",
            ));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(blas_error("cublasCreate"))?;
        let solver_handle = DnHandle::new(stream.clone()).map_err(|e| Error::Library {
            library: Library::Cusolver,
            call: "cusolverDnCreate",
            status: e.to_string(),
        })?;
        let max_pairs = (MAX_RANK as usize + OVERSAMPLE).min(width);
        let block = width * max_pairs;
        let start: Vec<f32> = (0..block as u64)
            .map(|i| crate::kernels::random::kernel_layout::value(START_SEED, i, 1.0, 0.0))
            .collect();
        let mut blocks = [
            stream.alloc_zeros::<f32>(block)?,
            stream.alloc_zeros(block)?,
        ];
        let mut small = stream.alloc_zeros::<f32>(max_pairs * max_pairs)?;
        let mut eigenvalues = stream.alloc_zeros::<f32>(max_pairs)?;
        let mut tau = stream.alloc_zeros::<f32>(max_pairs)?;
        let (n, p) = (width as i32, max_pairs as i32);
        let handle = solver_handle.cu();
        let (mut qr, mut orthonormal, mut eigen) = (0i32, 0i32, 0i32);
        // The queries queue no work; the guards only keep the buffers borrowed meanwhile.
        let mut used = LaunchBuffers::new(stream);
        let q = used.write(&mut blocks[0]) as *mut f32;
        let tau_address = used.write(&mut tau) as *const f32;
        let t = used.write(&mut small) as *const f32;
        let w = used.write(&mut eigenvalues) as *const f32;
        // SAFETY: FFI queries on a live handle; the pointers address buffers of the sizes
        // given (`[w, p]`, `[p]`, `[p, p]`, `[p]`).
        unsafe {
            solver_status(
                "cusolverDnSgeqrf_bufferSize",
                solver::cusolverDnSgeqrf_bufferSize(handle, n, p, q, n, &mut qr),
            )?;
            solver_status(
                "cusolverDnSorgqr_bufferSize",
                solver::cusolverDnSorgqr_bufferSize(
                    handle,
                    n,
                    p,
                    p,
                    q,
                    n,
                    tau_address,
                    &mut orthonormal,
                ),
            )?;
            solver_status(
                "cusolverDnSsyevd_bufferSize",
                solver::cusolverDnSsyevd_bufferSize(
                    handle,
                    solver::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
                    solver::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                    p,
                    t,
                    p,
                    w,
                    &mut eigen,
                ),
            )?;
        }
        drop(used);
        let workspace_len = qr.max(orthonormal).max(eigen).max(1) as usize;
        Ok(Factoriser {
            stream: stream.clone(),
            blas,
            solver: solver_handle,
            width,
            gram: stream.alloc_zeros::<f32>(width * width)?,
            start: stream.clone_htod(&start)?,
            blocks,
            small,
            eigenvalues,
            pairs: max_pairs,
            tau,
            workspace: stream.alloc_zeros::<f32>(workspace_len)?,
            info: stream.alloc_zeros::<i32>(slots.max(1))?,
            projection: stream.alloc_zeros::<bf16>(MAX_RANK as usize * width)?,
        })
    }

    /// The stream every run is queued on (its cuBLAS and cuSOLVER handles are bound to it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Width of the keys this factoriser takes: `Hkv * d` columns.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Factors `keys` (`[len, width]` bf16, row-major) into `a` (`[len, rank]`) and `bm`
    /// (`[rank, width]`), both bf16, on the factoriser's stream; cuSOLVER's status goes to
    /// `slot`. `rank` is a multiple of 16 up to `min(MAX_RANK, width)`.
    pub fn run(
        &mut self,
        gpu: &Gpu,
        keys: &impl DevicePtr<bf16>,
        rank: usize,
        slot: usize,
        a: &mut impl DevicePtrMut<bf16>,
        bm: &mut impl DevicePtrMut<bf16>,
    ) -> Result<()> {
        let width = self.width;
        let step = RANK_STEP as usize;
        let max_rank = (MAX_RANK as usize).min(width);
        if rank == 0 || !rank.is_multiple_of(step) || rank > max_rank {
            return Err(invalid(
                "rank",
                format!("is {rank}"),
                format!("a multiple of {step} in {step}..={max_rank} (at most Hkv * d)"),
            ));
        }
        if keys.len() == 0 || !keys.len().is_multiple_of(width) {
            return Err(invalid(
                "keys",
                format!("has {} elements", keys.len()),
                format!("whole rows of Hkv * d = {width}"),
            ));
        }
        let len = keys.len() / width;
        check_len("a", a.len(), len * rank, "[len, rank]")?;
        check_len("bm", bm.len(), rank * width, "[rank, Hkv * d]")?;
        check_reach("slot", self.info.len(), slot + 1)?;
        let stream = self.stream.clone();
        let Factoriser {
            blas,
            solver,
            gram,
            start,
            blocks: [first, second],
            small,
            eigenvalues,
            pairs: latest_pairs,
            tau,
            workspace,
            info,
            projection,
            ..
        } = self;
        let mut used = LaunchBuffers::new(&stream);
        let keys_address = used.read(keys);
        let gram = used.write(gram);
        // 1. G = K_preᵀ K_pre: with X = K_preᵀ (column-major [w, L]), G = X · Xᵀ.
        let gram_shape = GemmShape {
            transpose_a: false,
            transpose_b: true,
            m: width,
            n: width,
            k: len,
            lda: width,
            ldb: width,
            ldc: width,
        };
        let bf16_type = blas_sys::cudaDataType::CUDA_R_16BF;
        // SAFETY: keys hold [L, w] and the Gram buffer [w, w] (checked above), on this stream.
        unsafe {
            gemm(
                blas,
                gram_shape,
                (keys_address, keys_address, bf16_type),
                (gram, F32),
            )?
        };
        // 2. The leading p eigenpairs of G, ascending, into `eigenvalues` and blocks[1].
        let pairs = (rank + OVERSAMPLE).min(width);
        *latest_pairs = pairs;
        let scratch = Scratch {
            gram,
            start: used.write(start),
            blocks: [used.write(first), used.write(second)],
            small: used.write(small),
            eigenvalues: used.write(eigenvalues),
            tau: used.write(tau),
            workspace_len: workspace.len() as i32,
            workspace: used.write(workspace),
            info: used.write(info) + (slot * 4) as u64,
        };
        let vectors = Self::leading_eigenpairs(blas, solver.cu(), width, pairs, scratch)?;
        // 3. Bm and the projection, largest eigenvalue first.
        let projection_address = used.write(projection);
        let params = FactorParams {
            eigenvalues: scratch.eigenvalues,
            eigenvectors: vectors,
            bm: used.write(bm),
            projection: projection_address,
            width: width as u32,
            pairs: pairs as u32,
            rank: rank as u32,
            _pad: 0,
        };
        let launch = LaunchConfig {
            grid_dim: (rank as u32, 1, 1),
            block_dim: (layout::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the eigen buffers are [p] and [w, p], Bm and the projection [rank, w] with
        // rank <= p <= w (checked above).
        unsafe { gpu.launch(&stream, ptx::FACTOR_ROWS, launch, params)? };
        // 4. A = K_pre · projectionᵀ: column-major Aᵀ [r, L] = P [r, w] · Xᵀ... with P stored
        //    row-major [r, w] (a column-major [w, r] used transposed) and X = K_preᵀ [w, L].
        let a_shape = GemmShape {
            transpose_a: true,
            transpose_b: false,
            m: rank,
            n: len,
            k: width,
            lda: width,
            ldb: width,
            ldc: rank,
        };
        let a_address = used.write(a);
        // SAFETY: the projection holds [rank, w], the keys [L, w] and A [L, rank] (checked).
        unsafe {
            gemm(
                blas,
                a_shape,
                (projection_address, keys_address, bf16_type),
                (a_address, bf16_type),
            )
        }
    }

    /// Subspace iteration with Rayleigh–Ritz on the Gram matrix (see the module's notes) on
    /// the handles' stream, in `scratch`: `pairs` Ritz values into `eigenvalues` (ascending)
    /// and their vectors, column-major `[w, pairs]`, into the returned block's address.
    fn leading_eigenpairs(
        blas: &CudaBlas,
        handle: solver::cusolverDnHandle_t,
        width: usize,
        pairs: usize,
        scratch: Scratch,
    ) -> Result<u64> {
        let (w, p) = (width, pairs);
        let Scratch {
            gram,
            start,
            mut blocks,
            small,
            eigenvalues,
            tau,
            workspace,
            workspace_len,
            info,
        } = scratch;
        // C [m, n] = op(A) [m, k] · B [k, n], all f32 and leading dimension = rows.
        let product = |transpose_a: bool, (m, n, k): (usize, usize, usize), a, b, c| {
            let shape = GemmShape {
                transpose_a,
                transpose_b: false,
                m,
                n,
                k,
                lda: if transpose_a { k } else { m },
                ldb: k,
                ldc: m,
            };
            // SAFETY: every operand is one of this factoriser's buffers, at least as large
            // as the shapes used below ([w, w], [w, p_max], [p_max, p_max]).
            unsafe { gemm(blas, shape, (a, b, F32), (c, F32)) }
        };
        let (n, p32) = (w as i32, p as i32);
        // Q = qr(Y) in place (Householder: stable even when Y is rank-deficient).
        let orthonormalise = |block: u64| -> Result<()> {
            // SAFETY: FFI on the handle's stream; the block is [w, p] with p <= w, `tau`
            // [p], and the workspace the size cuSOLVER asked for at p_max.
            unsafe {
                solver_status(
                    "cusolverDnSgeqrf",
                    solver::cusolverDnSgeqrf(
                        handle,
                        n,
                        p32,
                        block as *mut f32,
                        n,
                        tau as *mut f32,
                        workspace as *mut f32,
                        workspace_len,
                        info as *mut i32,
                    ),
                )?;
                solver_status(
                    "cusolverDnSorgqr",
                    solver::cusolverDnSorgqr(
                        handle,
                        n,
                        p32,
                        p32,
                        block as *mut f32,
                        n,
                        tau as *const f32,
                        workspace as *mut f32,
                        workspace_len,
                        info as *mut i32,
                    ),
                )
            }
        };
        // Y = G Ω; then (Q = qr(Y), Y = G Q) rounds; blocks[0] holds Y.
        product(false, (w, p, w), gram, start, blocks[0])?;
        for _ in 0..SUBSPACE_ITERATIONS {
            orthonormalise(blocks[0])?;
            product(false, (w, p, w), gram, blocks[0], blocks[1])?;
            blocks.swap(0, 1);
        }
        orthonormalise(blocks[0])?;
        product(false, (w, p, w), gram, blocks[0], blocks[1])?;
        // T = Qᵀ (G Q), its eigenpairs, V = Q U.
        product(true, (p, p, w), blocks[0], blocks[1], small)?;
        // SAFETY: FFI on the handle's stream; T is [p, p], the eigenvalues [p], the workspace
        // as asked for at p_max >= p, and `info` one int of a live buffer.
        unsafe {
            solver_status(
                "cusolverDnSsyevd",
                solver::cusolverDnSsyevd(
                    handle,
                    solver::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
                    solver::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                    p32,
                    small as *mut f32,
                    p32,
                    eigenvalues as *mut f32,
                    workspace as *mut f32,
                    workspace_len,
                    info as *mut i32,
                ),
            )?
        };
        product(false, (w, p, p), blocks[0], small, blocks[1])?;
        Ok(blocks[1])
    }

    /// Waits for the stream and checks every slot's cuSOLVER status.
    pub fn check(&self) -> Result<()> {
        let info = self.stream.clone_dtoh(&self.info)?;
        match info.iter().position(|&i| i != 0) {
            None => Ok(()),
            Some(slot) => Err(Error::NotConverged {
                what: "the factorisation's eigen-decomposition",
                detail: format!(
                    "cuSOLVER returned info {} for slot {slot} (a non-finite key?)",
                    info[slot]
                ),
            }),
        }
    }

    /// The latest run's leading eigenvalues and the Gram matrix's trace (waits for the
    /// stream).
    pub fn spectrum(&self) -> Result<Spectrum> {
        let mut leading = self
            .stream
            .clone_dtoh(&self.eigenvalues.slice(..self.pairs))?;
        leading.reverse();
        let gram = self.stream.clone_dtoh(&self.gram)?;
        let total = (0..self.width)
            .map(|i| gram[i * (self.width + 1)] as f64)
            .sum();
        Ok(Spectrum { leading, total })
    }
}
