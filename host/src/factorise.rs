//! Low-rank key factorisation on the GPU (`../shared/SHADOWKV.md`, prefill step 1): the best
//! rank-`r` approximation `K_pre ≈ A · Bm` of one sequence's pre-RoPE keys (`[L, Hkv*d]`),
//! with `A = U_r` (`[L, r]`) and `Bm = Σ_r V_rᵀ` (`[r, Hkv*d]`), both stored bf16.
//!
//! Never forms an `[L, L]` matrix:
//! 1. the Gram matrix `G = K_preᵀ K_pre` (`[w, w]`, `w = Hkv*d`) by cuBLAS, bf16 in, f32
//!    accumulation (a GEMM whose inner dimension is `L`);
//! 2. its eigen-decomposition by cuSOLVER (`cusolverDnSsyevd`, f32);
//! 3. `factor_rows` (`shadowkv_kernels::factorise`): the `r` largest eigenpairs into `Bm`
//!    (`sqrt(λ) v`) and a projection (`v / sqrt(λ)`);
//! 4. `A = K_pre · projectionᵀ` by cuBLAS, written bf16.
//!
//! Nothing here waits for the GPU; [`Factoriser::check`] reads cuSOLVER's status, and
//! [`Factoriser::spectrum`] the eigenvalues (`‖K − A·Bm‖/‖K‖ = sqrt(Σ_{i>r} λ_i / Σ λ_i)`
//! before the bf16 rounding).
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::cusolver::{safe::DnHandle, sys as solver};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
pub use shadowkv_kernels::factorise as kernel_layout;
use shadowkv_kernels::factorise::{self as layout, FactorParams};
use shadowkv_kernels::shadow::{MAX_RANK, RANK_STEP};

use crate::error::{check_len, check_reach, invalid, Error, Result};
use crate::gpu::{address, Gpu};
use crate::kernels::KernelName;
use crate::linear::{blas_error, gemm_bf16, GemmShape};

/// Widest key matrix (`Hkv * d`): the Gram matrix and the solver's workspace grow as its
/// square (4 MiB at 1024).
pub const MAX_WIDTH: usize = 8192;

fn solver_error(what: &str, status: solver::cusolverStatus_t) -> Error {
    invalid(
        "cusolver",
        format!("{what} returned {status:?}"),
        "a successful cuSOLVER call (is libcusolver on LD_LIBRARY_PATH?)",
    )
}

/// The handles and scratch of the factorisation for one key width, reused across layers and
/// sequences.
pub struct Factoriser {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    solver: DnHandle,
    width: usize,
    /// `[w, w]` f32: the Gram matrix, then its eigenvectors (column-major).
    gram: CudaSlice<f32>,
    /// `[w]` f32 ascending.
    eigenvalues: CudaSlice<f32>,
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
        let blas = CudaBlas::new(stream.clone()).map_err(blas_error)?;
        let solver_handle = DnHandle::new(stream.clone())
            .map_err(|e| invalid("cusolver", e.to_string(), "a cuSOLVER handle"))?;
        // SAFETY: scratch, written by cuBLAS before cuSOLVER reads it.
        let mut gram = unsafe { stream.alloc::<f32>(width * width)? };
        let mut eigenvalues = stream.alloc_zeros::<f32>(width)?;
        let n = width as i32;
        let mut lwork = 0i32;
        // SAFETY: FFI; the handle is live and the pointers address `width²` and `width` floats.
        let status = unsafe {
            solver::cusolverDnSsyevd_bufferSize(
                solver_handle.cu(),
                solver::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
                solver::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                n,
                gram.device_ptr_mut(stream).0 as *const f32,
                n,
                eigenvalues.device_ptr_mut(stream).0 as *const f32,
                &mut lwork,
            )
        };
        if status != solver::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
            return Err(solver_error("cusolverDnSsyevd_bufferSize", status));
        }
        Ok(Factoriser {
            stream: stream.clone(),
            blas,
            solver: solver_handle,
            width,
            gram,
            eigenvalues,
            workspace: stream.alloc_zeros::<f32>(lwork.max(1) as usize)?,
            info: stream.alloc_zeros::<i32>(slots.max(1))?,
            projection: stream.alloc_zeros::<bf16>(MAX_RANK as usize * width)?,
        })
    }

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
        let keys_address = address(keys, &stream);
        let gram_address = self.gram.device_ptr_mut(&stream).0;
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
        // SAFETY: keys hold [L, w] and the Gram buffer [w, w] (checked above), on this stream.
        unsafe {
            gemm_bf16(
                &self.blas,
                gram_shape,
                keys_address,
                keys_address,
                gram_address,
                blas_sys::cudaDataType::CUDA_R_32F,
            )?
        };
        // 2. Eigenpairs, ascending, eigenvectors over G.
        let n = width as i32;
        let info_address = self.info.device_ptr_mut(&stream).0 + (slot * 4) as u64;
        let workspace_len = self.workspace.len() as i32;
        // SAFETY: FFI on the handle's stream; G is [w, w], the eigenvalues [w], the workspace
        // the size cuSOLVER asked for, and `info` one int of a live buffer.
        let status = unsafe {
            solver::cusolverDnSsyevd(
                self.solver.cu(),
                solver::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
                solver::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                n,
                gram_address as *mut f32,
                n,
                self.eigenvalues.device_ptr_mut(&stream).0 as *mut f32,
                self.workspace.device_ptr_mut(&stream).0 as *mut f32,
                workspace_len,
                info_address as *mut i32,
            )
        };
        if status != solver::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
            return Err(solver_error("cusolverDnSsyevd", status));
        }
        // 3. Bm and the projection, largest eigenvalue first.
        let projection_address = self.projection.device_ptr_mut(&stream).0;
        let params = FactorParams {
            eigenvalues: self.eigenvalues.device_ptr_mut(&stream).0,
            eigenvectors: gram_address,
            bm: bm.device_ptr_mut(&stream).0,
            projection: projection_address,
            width: width as u32,
            rank: rank as u32,
        };
        let launch = LaunchConfig {
            grid_dim: (rank as u32, 1, 1),
            block_dim: (layout::THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the eigen buffers are [w] and [w, w], Bm and the projection [rank, w] with
        // rank <= w (checked above).
        unsafe {
            gpu.launch(
                &stream,
                KernelName::lookup(layout::KERNEL_NAME)?,
                launch,
                params,
            )?
        };
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
        let a_address = a.device_ptr_mut(&stream).0;
        // SAFETY: the projection holds [rank, w], the keys [L, w] and A [L, rank] (checked).
        unsafe {
            gemm_bf16(
                &self.blas,
                a_shape,
                projection_address,
                keys_address,
                a_address,
                blas_sys::cudaDataType::CUDA_R_16BF,
            )
        }
    }

    /// Waits for the stream and checks every slot's cuSOLVER status.
    pub fn check(&self) -> Result<()> {
        let info = self.stream.clone_dtoh(&self.info)?;
        match info.iter().position(|&i| i != 0) {
            None => Ok(()),
            Some(slot) => Err(invalid(
                "factorisation",
                format!(
                    "cuSOLVER's eigen-decomposition for slot {slot} returned info {}",
                    info[slot]
                ),
                "a converged decomposition (a non-finite key?)",
            )),
        }
    }

    /// The eigenvalues of the latest run, largest first (waits for the stream).
    pub fn spectrum(&self) -> Result<Vec<f32>> {
        let mut values = self.stream.clone_dtoh(&self.eigenvalues)?;
        values.reverse();
        Ok(values)
    }
}

/// `‖K − A·Bm‖ / ‖K‖` of the best rank-`rank` approximation, from the spectrum (largest first).
pub fn relative_error_from_spectrum(spectrum: &[f32], rank: usize) -> f64 {
    let total: f64 = spectrum.iter().map(|&v| v.max(0.0) as f64).sum();
    let tail: f64 = spectrum.iter().skip(rank).map(|&v| v.max(0.0) as f64).sum();
    (tail / total.max(f64::MIN_POSITIVE)).sqrt()
}
