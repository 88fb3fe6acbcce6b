//! Dense layers through cuBLAS: `y = x · wᵀ` with bf16 `x` (`[rows, inputs]`) and weights
//! (`[outputs, inputs]`, the PyTorch/GGUF layout), f32 accumulation, and a bf16 or f32 `y`
//! (`[rows, outputs]`; f32 for logits).
use std::sync::Arc;

use cudarc::cublas::{result::gemm_ex, sys, CudaBlas};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::error::{check_len, invalid, Error, Library, Result};

/// Element types cuBLAS may write as the product.
pub trait LinearOutput {
    /// cuBLAS's name for the type.
    const DATA_TYPE: sys::cudaDataType;
}

impl LinearOutput for bf16 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}

impl LinearOutput for f32 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}

/// A cuBLAS handle bound to one stream.
pub struct Linear {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
}

/// A cuBLAS failure of `call`.
pub(crate) fn blas_error(
    call: &'static str,
) -> impl FnOnce(cudarc::cublas::result::CublasError) -> Error {
    move |error| Error::Library {
        library: Library::Cublas,
        call,
        status: format!("{:?}", error.0),
    }
}

impl Linear {
    /// A cuBLAS handle on `stream`. Errors with [`Error::Library`] if cuBLAS cannot create one.
    pub fn new(stream: Arc<CudaStream>) -> Result<Linear> {
        let blas = CudaBlas::new(stream.clone()).map_err(blas_error("cublasCreate"))?;
        Ok(Linear { blas, stream })
    }

    /// The stream the products run on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `y[rows, outputs] = x[rows, inputs] · weight[outputs, inputs]ᵀ`.
    pub fn forward<Y: LinearOutput>(
        &self,
        x: &impl DevicePtr<bf16>,
        weight: &impl DevicePtr<bf16>,
        inputs: usize,
        y: &mut impl DevicePtrMut<Y>,
    ) -> Result<()> {
        if inputs == 0 || x.len() % inputs != 0 || weight.len() % inputs != 0 {
            return Err(invalid(
                "linear",
                format!("x has {} and the weight {} elements", x.len(), weight.len()),
                format!("whole rows of inputs = {inputs}"),
            ));
        }
        let (rows, outputs) = (x.len() / inputs, weight.len() / inputs);
        check_len("y", y.len(), rows * outputs, "[rows, outputs]")?;
        let limit = i32::MAX as usize;
        if rows == 0 || rows > limit || outputs > limit || inputs > limit {
            return Err(invalid(
                "linear",
                format!("{rows} x {inputs} times {inputs} x {outputs}"),
                "1 to 2^31 - 1 rows and dimensions",
            ));
        }
        let stream = &self.stream;
        let (x_address, _x_use) = x.device_ptr(stream);
        let (w_address, _w_use) = weight.device_ptr(stream);
        let (y_address, _y_use) = y.device_ptr_mut(stream);
        // Column-major view: yᵀ [outputs, rows] = W [outputs, inputs] · xᵀ [inputs, rows], where
        // the row-major weight is a column-major [inputs, outputs] matrix used transposed.
        let shape = GemmShape {
            transpose_a: true,
            transpose_b: false,
            m: outputs,
            n: rows,
            k: inputs,
            lda: inputs,
            ldb: inputs,
            ldc: outputs,
        };
        // SAFETY: the three buffers hold exactly the elements of those shapes (checked above)
        // and live on this handle's stream.
        unsafe {
            gemm(
                &self.blas,
                shape,
                (w_address, x_address, sys::cudaDataType::CUDA_R_16BF),
                (y_address, Y::DATA_TYPE),
            )
        }
    }
}

/// A column-major cuBLAS product `C [m, n] = op(A) [m, k] · op(B) [k, n]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GemmShape {
    pub transpose_a: bool,
    pub transpose_b: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// `C = op(A) · op(B)` with `A` and `B` of `input_type` (bf16 or f32), f32 accumulation (no
/// TF32) and a `c_type` output.
///
/// # Safety
/// `a`, `b` and `c` are device addresses of buffers that hold the matrices `shape` describes,
/// ordered on `blas`'s stream; every dimension fits in an `i32` (checked, as an error).
pub(crate) unsafe fn gemm(
    blas: &CudaBlas,
    shape: GemmShape,
    (a, b, input_type): (u64, u64, sys::cudaDataType),
    (c, c_type): (u64, sys::cudaDataType),
) -> Result<()> {
    let dimension = |value: usize| {
        i32::try_from(value).map_err(|_| {
            invalid(
                "gemm",
                format!("a dimension of {value}"),
                "at most 2^31 - 1",
            )
        })
    };
    let op = |transpose| match transpose {
        true => sys::cublasOperation_t::CUBLAS_OP_T,
        false => sys::cublasOperation_t::CUBLAS_OP_N,
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the caller's contract; alpha and beta are f32 as COMPUTE_32F requires.
    unsafe {
        gemm_ex(
            *blas.handle(),
            op(shape.transpose_a),
            op(shape.transpose_b),
            dimension(shape.m)?,
            dimension(shape.n)?,
            dimension(shape.k)?,
            (&alpha) as *const f32 as *const _,
            a as *const _,
            input_type,
            dimension(shape.lda)?,
            b as *const _,
            input_type,
            dimension(shape.ldb)?,
            (&beta) as *const f32 as *const _,
            c as *mut _,
            c_type,
            dimension(shape.ldc)?,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(blas_error("cublasGemmEx"))
}
