//! Reference for [`crate::kernels::shadow_prefill`]: landmarks, minimum cosines, outliers and the exact
//! rows of one sequence's prompt, in f64.
use half::bf16;

use crate::kernels::attention::SequenceLayout;

/// Per KV head: every chunk's landmark (`[chunks, d]`, the mean of its keys) and minimum
/// cosine between that mean and each of its keys. `keys` is `[Hkv, capacity, d]` from
/// `layout.offset`.
pub fn chunk_statistics(
    keys: &[bf16],
    layout: SequenceLayout,
    kv_heads: usize,
    head_dim: usize,
    chunk_size: usize,
    chunks: usize,
) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let mut means = Vec::new();
    let mut min_cosines = Vec::new();
    for head in 0..kv_heads {
        let row = |token: usize| {
            let start =
                layout.offset as usize + (head * layout.capacity as usize + token) * head_dim;
            keys[start..start + head_dim].iter().map(|k| k.to_f64())
        };
        let mut head_means = vec![0.0f64; chunks * head_dim];
        let mut head_min = vec![0.0f64; chunks];
        for chunk in 0..chunks {
            let mean = &mut head_means[chunk * head_dim..(chunk + 1) * head_dim];
            for t in 0..chunk_size {
                mean.iter_mut()
                    .zip(row(chunk * chunk_size + t))
                    .for_each(|(m, k)| *m += k / chunk_size as f64);
            }
            let mean_norm = mean.iter().map(|m| m * m).sum::<f64>().sqrt();
            head_min[chunk] = (0..chunk_size)
                .map(|t| {
                    let (dot, norm) = row(chunk * chunk_size + t)
                        .zip(mean.iter())
                        .fold((0.0, 0.0), |(dot, norm), (k, m)| {
                            (dot + k * m, norm + k * k)
                        });
                    dot / (mean_norm * norm.sqrt()).max(f32::MIN_POSITIVE as f64)
                })
                .fold(f64::INFINITY, f64::min);
        }
        means.push(head_means);
        min_cosines.push(head_min);
    }
    (means, min_cosines)
}

/// The `outliers` chunks with the smallest minimum cosine (ties: the lower chunk id), and the
/// remaining chunk ids, both ascending. Given the GPU's f32 cosines, it matches exactly.
pub fn outliers(min_cosine: &[f32], outliers: usize) -> (Vec<u32>, Vec<u32>) {
    let mut order: Vec<u32> = (0..min_cosine.len() as u32).collect();
    order.sort_by(|&x, &y| {
        min_cosine[x as usize]
            .total_cmp(&min_cosine[y as usize])
            .then(x.cmp(&y))
    });
    let mut chosen = order[..outliers].to_vec();
    chosen.sort_unstable();
    let kept = (0..min_cosine.len() as u32)
        .filter(|j| chosen.binary_search(j).is_err())
        .collect();
    (chosen, kept)
}

/// The prompt tokens of one head's exact rows: the local window (tokens past the chunks),
/// then each outlier chunk's tokens.
pub fn exact_tokens(
    prompt_len: usize,
    chunks: usize,
    chunk_size: usize,
    outlier_chunks: &[u32],
) -> Vec<usize> {
    let mut tokens: Vec<usize> = (chunks * chunk_size..prompt_len).collect();
    for &chunk in outlier_chunks {
        tokens.extend(chunk as usize * chunk_size..(chunk as usize + 1) * chunk_size);
    }
    tokens
}
