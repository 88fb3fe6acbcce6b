//! Dense layers through cuBLAS: `y = x · wᵀ` with bf16 `x` (`[rows, inputs]`) and weights
//! (`[outputs, inputs]`, the PyTorch/GGUF layout), f32 accumulation, and a bf16 or f32 `y`
//! (`[rows, outputs]`; f32 for logits).
use std::sync::Arc;

use cudarc::cublas::{result::gemm_ex, sys, CudaBlas};
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut};
use half::bf16;

use crate::error::{check_len, invalid, Error, Result};

/// Element types cuBLAS may write as the product.
pub trait LinearOutput {
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

fn blas_error(error: impl std::fmt::Display) -> Error {
    invalid(
        "cublas",
        error.to_string(),
        "a successful cuBLAS call (is libcublas on LD_LIBRARY_PATH?)",
    )
}

impl Linear {
    pub fn new(stream: Arc<CudaStream>) -> Result<Linear> {
        let blas = CudaBlas::new(stream.clone()).map_err(blas_error)?;
        Ok(Linear { blas, stream })
    }

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
        let (alpha, beta) = (1.0f32, 0.0f32);
        let stream = &self.stream;
        let (x_address, _x_use) = x.device_ptr(stream);
        let (w_address, _w_use) = weight.device_ptr(stream);
        let (y_address, _y_use) = y.device_ptr_mut(stream);
        // Column-major view: yᵀ [outputs, rows] = W [outputs, inputs] · xᵀ [inputs, rows], where
        // the row-major weight is a column-major [inputs, outputs] matrix used transposed.
        // SAFETY: the three buffers hold exactly the elements of those shapes (checked above)
        // and live on this handle's stream; alpha and beta are f32 as COMPUTE_32F requires.
        unsafe {
            gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                outputs as i32,
                rows as i32,
                inputs as i32,
                (&alpha) as *const f32 as *const _,
                w_address as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                inputs as i32,
                x_address as *const _,
                sys::cudaDataType::CUDA_R_16BF,
                inputs as i32,
                (&beta) as *const f32 as *const _,
                y_address as *mut _,
                Y::DATA_TYPE,
                outputs as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(blas_error)
    }
}
