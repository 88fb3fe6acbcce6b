//! Reference for [`crate::kernels::topk`]'s selection: exactly the kernel's rule.
/// The chunk ids of the `k` highest scores, in landmark order; of scores equal to the k-th
/// highest, the lowest indices are taken. Scores compare as f32 bit patterns, as on the GPU
/// (all scores are `>= 0`).
pub fn select(scores: &[f32], chunk_ids: &[u32], k: usize) -> Vec<u32> {
    let mut sorted: Vec<u32> = scores.iter().map(|s| s.to_bits()).collect();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let k = k.min(scores.len());
    if k == 0 {
        return Vec::new();
    }
    let threshold = sorted[k - 1];
    let above = sorted.iter().take_while(|&&s| s > threshold).count();
    let mut equal_left = k - above;
    scores
        .iter()
        .zip(chunk_ids)
        .filter_map(|(score, &chunk)| {
            let bits = score.to_bits();
            if bits > threshold {
                Some(chunk)
            } else if bits == threshold && equal_left > 0 {
                equal_left -= 1;
                Some(chunk)
            } else {
                None
            }
        })
        .collect()
}
