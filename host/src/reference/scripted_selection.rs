//! Reference for [`crate::kernels::scripted_selection`]: the kernel's rule, in order.
use std::collections::HashSet;

/// The scripted selection of one (sequence, KV head): from the top-k's `selection`, the
/// `resident` ids of the previous step, the head's landmark chunk ids (`landmark_ids`), the
/// sequence's `chunks` and the scripted `hits`. Hits are the resident chunks the top-k picked
/// (selection order), then the other resident chunks (slot order), up to `hits`; misses are
/// the top-k's non-resident picks (selection order), then the landmarks' chunks neither
/// resident nor picked (landmark order), up to the rest of the budget; if those run out, more
/// hits fill it. Returns the hits, then the misses.
pub fn script(
    selection: &[u32],
    resident: &[u32],
    landmark_ids: &[u32],
    chunks: u32,
    hits: usize,
) -> Vec<u32> {
    let k = selection.len();
    let valid = |chunk: &u32| *chunk < chunks;
    let is_resident: HashSet<u32> = resident.iter().copied().filter(valid).collect();
    let picked: HashSet<u32> = selection.iter().copied().filter(valid).collect();
    let hit_order: Vec<u32> = selection
        .iter()
        .copied()
        .filter(|chunk| is_resident.contains(chunk))
        .chain(
            resident
                .iter()
                .copied()
                .filter(|chunk| valid(chunk) && !picked.contains(chunk)),
        )
        .collect();
    let first_hits = hits.min(hit_order.len());
    let misses: Vec<u32> = selection
        .iter()
        .copied()
        .filter(|chunk| valid(chunk) && !is_resident.contains(chunk))
        .chain(landmark_ids.iter().copied().filter(|chunk| {
            valid(chunk) && !is_resident.contains(chunk) && !picked.contains(chunk)
        }))
        .take(k - first_hits)
        .collect();
    let hit_count = k - misses.len();
    let mut out: Vec<u32> = hit_order.into_iter().take(hit_count).collect();
    out.extend(misses);
    out
}

/// The hit rate a scripted selection gives: the share of `selection` in `resident`.
pub fn hit_rate(selection: &[u32], resident: &[u32]) -> f64 {
    let resident: HashSet<u32> = resident.iter().copied().collect();
    let hits = selection.iter().filter(|c| resident.contains(c)).count();
    hits as f64 / selection.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_the_hits_and_takes_the_top_k_first() {
        // Landmarks 0..20, resident 0..8 (one empty slot), top-k picked 2, 3, 10, 11, 12, 13, 14, 15.
        let landmarks: Vec<u32> = (0..20).collect();
        let resident = [0, 1, 2, 3, 4, 5, 6, u32::MAX];
        let selection = [2, 3, 10, 11, 12, 13, 14, 15];
        let out = script(&selection, &resident, &landmarks, 20, 5);
        assert_eq!(out, vec![2, 3, 0, 1, 4, 10, 11, 12]);
        assert_eq!(hit_rate(&out, &resident), 5.0 / 8.0);
        // No hits: the top-k's non-resident picks, then the lowest free landmarks.
        let out = script(&selection, &resident, &landmarks, 20, 0);
        assert_eq!(out, vec![10, 11, 12, 13, 14, 15, 7, 8]);
        // Every chunk resident that can be.
        let out = script(&selection, &resident, &landmarks, 20, 8);
        assert_eq!(out, vec![2, 3, 0, 1, 4, 5, 6, 10]);
    }

    #[test]
    fn fills_with_hits_when_the_landmarks_run_out() {
        // As many landmarks as the budget, all resident: every chunk is a hit.
        let landmarks = [5, 9, 1, 7];
        let resident = [9, 7, 5, 1];
        let out = script(&[1, 5, 7, 9], &resident, &landmarks, 10, 0);
        assert_eq!(out, vec![1, 5, 7, 9]);
        let out = script(&[1, 5, 7, 9], &resident, &landmarks, 10, 2);
        assert_eq!(out, vec![1, 5, 7, 9]);
    }
}
