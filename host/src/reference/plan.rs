//! Reference for [`crate::kernels::plan`]: the kernel's rule, in order.
use std::collections::HashSet;

use crate::kernels::shadow::Miss;

/// The kernel's `fresh` marks: 1 for each slot a miss fills, else 0.
pub fn fresh_slots(misses: &[Miss], budget_chunks: usize) -> Vec<u32> {
    let mut fresh = vec![0; budget_chunks];
    for miss in misses {
        fresh[miss.slot as usize] = 1;
    }
    fresh
}

/// Updates `resident` (chunk per slot) for the new `selection` of one (sequence, KV head) and
/// returns the misses: hits keep their slots; the freed slots, in slot order, go to the
/// misses, in selection order.
pub fn plan(selection: &[u32], resident: &mut [u32]) -> Vec<Miss> {
    let selected: HashSet<u32> = selection.iter().copied().collect();
    let mut hits = HashSet::new();
    let mut freed = Vec::new();
    for (slot, chunk) in resident.iter().enumerate() {
        if selected.contains(chunk) {
            hits.insert(*chunk);
        } else {
            freed.push(slot as u32);
        }
    }
    let misses: Vec<Miss> = selection
        .iter()
        .filter(|chunk| !hits.contains(chunk))
        .zip(freed)
        .map(|(&chunk, slot)| Miss { chunk, slot })
        .collect();
    for miss in &misses {
        resident[miss.slot as usize] = miss.chunk;
    }
    misses
}
