//! The low-rank key factorisation's one kernel. The host computes the Gram matrix
//! `G = K_preᵀ K_pre` (cuBLAS) and its leading eigenpairs (cuBLAS and cuSOLVER: `pairs`
//! ascending eigenvalues, eigenvectors as the columns of a column-major `[width, pairs]`
//! matrix); `factor_rows` then turns the `rank` largest `(λ, v)` into bf16 rows, largest first:
//! - `Bm` row `i`: `sqrt(λ) · v` (`Σ_r V_rᵀ`), what the rebuild multiplies by;
//! - `projection` row `i`: `v / sqrt(λ)`, so that `A = K_pre · projectionᵀ` (`U_r`, by cuBLAS).
//!
//! A direction with no energy (`λ <= λ_max · MIN_RELATIVE_EIGENVALUE`) gets a zero projection
//! row rather than a division by a vanishing singular value.

/// Threads per block (one block per factor row).
pub const THREADS: u32 = 256;
/// Eigenvalues below this share of the largest count as zero.
pub const MIN_RELATIVE_EIGENVALUE: f32 = 1.0e-12;
pub const KERNEL_NAME: &str = "factor_rows";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[cfg_attr(feature = "host", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FactorParams {
    /// f32 `[pairs]`, ascending.
    pub eigenvalues: u64,
    /// f32 `[width, pairs]` column-major: eigenvector `j` is the `width` values from `j * width`.
    pub eigenvectors: u64,
    /// bf16 `[rank, width]` out.
    pub bm: u64,
    /// bf16 `[rank, width]` out.
    pub projection: u64,
    pub width: u32,
    /// Eigenpairs computed, `rank <= pairs <= width`.
    pub pairs: u32,
    pub rank: u32,
    pub _pad: u32,
}

#[cfg(target_arch = "nvptx64")]
mod kernel {
    use super::*;
    use crate::device::*;

    /// # Safety
    /// The host launched `(rank)` blocks of [`THREADS`] with `rank <= pairs <= width` and
    /// buffers of the sizes above.
    #[no_mangle]
    pub unsafe extern "ptx-kernel" fn factor_rows(p: FactorParams) {
        let row = block_idx_x();
        let width = p.width as usize;
        let eigenvalues = p.eigenvalues as *const f32;
        let pairs = p.pairs as usize;
        let index = pairs - 1 - row as usize;
        let largest = max_f32(*eigenvalues.add(pairs - 1), 0.0);
        let lambda = max_f32(*eigenvalues.add(index), 0.0);
        let sigma = sqrt(lambda);
        let inverse = if lambda > largest * MIN_RELATIVE_EIGENVALUE && lambda > 0.0 {
            1.0 / sigma
        } else {
            0.0
        };
        let vector = (p.eigenvectors as *const f32).add(index * width);
        let bm = (p.bm as *mut u16).add(row as usize * width);
        let projection = (p.projection as *mut u16).add(row as usize * width);
        let mut j = thread_idx_x() as usize;
        while j < width {
            let v = *vector.add(j);
            *bm.add(j) = f32_to_bf16(sigma * v);
            *projection.add(j) = f32_to_bf16(v * inverse);
            j += THREADS as usize;
        }
    }
}
