//! Reference for [`crate::kernels::factorise`]: the rank-`r` factors of a key matrix in f64, from the
//! eigenvectors of its Gram matrix (nalgebra's `SymmetricEigen`).
use nalgebra::{DMatrix, SymmetricEigen};

/// The rank-`rank` factors of `keys` (`[len, width]`, row-major): `a = U_r` (`[len, rank]`) and
/// `bm = Σ_r V_rᵀ` (`[rank, width]`), from the eigenvectors of the Gram matrix `keysᵀ keys`
/// (`width²`, never `len²`).
pub fn factorise(keys: &[f32], width: usize, rank: usize) -> (Vec<f32>, Vec<f32>) {
    let len = keys.len() / width;
    let mut gram = DMatrix::<f64>::zeros(width, width);
    for row in keys.chunks_exact(width) {
        for i in 0..width {
            let ki = row[i] as f64;
            for j in 0..=i {
                gram[(i, j)] += ki * row[j] as f64;
            }
        }
    }
    for i in 0..width {
        for j in 0..i {
            gram[(j, i)] = gram[(i, j)];
        }
    }
    let eigen = SymmetricEigen::new(gram);
    let mut order: Vec<usize> = (0..width).collect();
    order.sort_by(|&x, &y| eigen.eigenvalues[y].total_cmp(&eigen.eigenvalues[x]));
    let largest = eigen.eigenvalues[order[0]].max(0.0);
    let mut a = vec![0.0f32; len * rank];
    let mut bm = vec![0.0f32; rank * width];
    for (component, &index) in order.iter().take(rank).enumerate() {
        let sigma = eigen.eigenvalues[index].max(0.0).sqrt();
        let vector = eigen.eigenvectors.column(index);
        for j in 0..width {
            bm[component * width + j] = (sigma * vector[j]) as f32;
        }
        // Directions with no energy carry nothing: leave their column of A at zero rather
        // than divide by a vanishing singular value.
        if sigma * sigma <= largest * 1e-24 || sigma == 0.0 {
            continue;
        }
        for (t, row) in keys.chunks_exact(width).enumerate() {
            let projection: f64 = row
                .iter()
                .zip(vector.iter())
                .map(|(&k, &v)| k as f64 * v)
                .sum();
            a[t * rank + component] = (projection / sigma) as f32;
        }
    }
    (a, bm)
}

/// `‖K - a·bm‖ / ‖K‖` of [`factorise`]'s factors (a check, not part of the prefill).
pub fn factorisation_error(keys: &[f32], width: usize, rank: usize, a: &[f32], bm: &[f32]) -> f64 {
    let (mut error, mut norm) = (0.0f64, 0.0f64);
    for (t, row) in keys.chunks_exact(width).enumerate() {
        for (j, &k) in row.iter().enumerate() {
            let rebuilt: f64 = (0..rank)
                .map(|c| a[t * rank + c] as f64 * bm[c * width + j] as f64)
                .sum();
            error += (k as f64 - rebuilt).powi(2);
            norm += (k as f64).powi(2);
        }
    }
    (error / norm.max(f64::MIN_POSITIVE)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::{factorisation_error, factorise};

    /// Deterministic values in [-1, 1) (the GPU random fill's, in f32).
    fn noise(seed: u64, n: usize) -> Vec<f32> {
        (0..n as u64)
            .map(|i| crate::kernels::random::kernel_layout::value(seed, i, 1.0, 0.0))
            .collect()
    }

    #[test]
    fn factorisation_recovers_a_low_rank_matrix_and_bounds_the_rest() {
        let (len, width, rank) = (301, 48, 16);
        let left = noise(1, len * rank);
        let right = noise(2, rank * width);
        let mut keys = vec![0.0f32; len * width];
        for t in 0..len {
            for j in 0..width {
                keys[t * width + j] = (0..rank)
                    .map(|c| left[t * rank + c] * right[c * width + j])
                    .sum();
            }
        }
        let (a, bm) = factorise(&keys, width, rank);
        let error = factorisation_error(&keys, width, rank, &a, &bm);
        assert_eq!((a.len(), bm.len()), (len * rank, rank * width));
        assert!(error < 1e-5, "exactly rank {rank}: error {error}");
        // With noise on top, a lower rank leaves more error, and the full rank none.
        let noisy: Vec<f32> = keys
            .iter()
            .zip(noise(3, len * width))
            .map(|(k, n)| k + 0.05 * n)
            .collect();
        let error_at = |rank| {
            let (a, bm) = factorise(&noisy, width, rank);
            factorisation_error(&noisy, width, rank, &a, &bm)
        };
        let (at_rank, below, full) = (error_at(rank), error_at(rank / 2), error_at(width));
        assert!(
            full < 1e-5 && at_rank < below && at_rank < 0.05,
            "{full} {at_rank} {below}"
        );
    }
}
