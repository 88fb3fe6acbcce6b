//! Reference for [`crate::kernels::sampling`].

/// Per row of `vocab` logits: the index of the largest (the lowest among equals; NaN never
/// wins; 0 if nothing beats -inf).
pub fn argmax(logits: &[f32], vocab: usize) -> Vec<u32> {
    logits
        .chunks_exact(vocab)
        .map(|row| {
            let mut best: Option<(f32, usize)> = None;
            for (i, &v) in row.iter().enumerate() {
                if v > best.map_or(f32::NEG_INFINITY, |b| b.0) {
                    best = Some((v, i));
                }
            }
            best.map_or(0, |b| b.1 as u32)
        })
        .collect()
}
