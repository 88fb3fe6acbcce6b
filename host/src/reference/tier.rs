//! Reference for the GPU value tier ([`crate::kernels::tier`], kept by
//! [`crate::kernels::fetch::run_tiered`]): the policy as the fetch kernels apply it, miss by
//! miss against the tags the step found, and the bytes an entry holds.
use half::bf16;
use shadowkv_kernels::tier::{
    entry_of, EMPTY_ENTRY, OUTCOME_FETCHED, OUTCOME_INSERTED, OUTCOME_TIER_HIT,
};

use super::values::ValueFormat;
use crate::kernels::shadow::{Miss, ShadowConfig, ShadowSequence};
use shadowkv_kernels::values::packed_chunk;

/// The tags of a tier: `[heads, chunks_per_head]` chunk ids, a head being a (resident row,
/// KV head) pair, `row * Hkv + kv_head`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TierModel {
    chunks_per_head: usize,
    tags: Vec<u32>,
}

impl TierModel {
    /// An empty tier of `heads` (row, KV head) pairs of `chunks_per_head` entries each.
    pub fn new(heads: usize, chunks_per_head: usize) -> Self {
        TierModel {
            chunks_per_head,
            tags: vec![EMPTY_ENTRY; heads * chunks_per_head],
        }
    }

    /// The tags of `head`, entry by entry.
    pub fn tags(&self, head: usize) -> &[u32] {
        &self.tags[head * self.chunks_per_head..(head + 1) * self.chunks_per_head]
    }

    /// Empties every entry of `head`.
    pub fn clear(&mut self, head: usize) {
        let per_head = self.chunks_per_head;
        self.tags[head * per_head..(head + 1) * per_head].fill(EMPTY_ENTRY);
    }

    /// One step's `misses` of `head` (its miss list, in order): the outcome of each
    /// (`OUTCOME_TIER_HIT`, `OUTCOME_INSERTED` or `OUTCOME_FETCHED`) and the tags after it.
    /// Each miss is judged as a warp of the kernel judges it, against the tags before the
    /// step: a hit if its entry names it; else inserted unless a later miss maps to the same
    /// entry or a miss of the step is the entry's chunk.
    pub fn step(&mut self, head: usize, misses: &[Miss]) -> Vec<u32> {
        let per_head = self.chunks_per_head as u32;
        let before = self.tags(head).to_vec();
        let outcomes: Vec<u32> = misses
            .iter()
            .enumerate()
            .map(|(index, miss)| {
                let entry = entry_of(miss.chunk, per_head);
                let held = before[entry as usize];
                if held == miss.chunk {
                    return OUTCOME_TIER_HIT;
                }
                let conflict = misses.iter().enumerate().any(|(j, other)| {
                    (j > index && entry_of(other.chunk, per_head) == entry) || other.chunk == held
                });
                if conflict {
                    OUTCOME_FETCHED
                } else {
                    OUTCOME_INSERTED
                }
            })
            .collect();
        let first = head * self.chunks_per_head;
        for (miss, &outcome) in misses.iter().zip(&outcomes) {
            if outcome == OUTCOME_INSERTED {
                self.tags[first + entry_of(miss.chunk, per_head) as usize] = miss.chunk;
            }
        }
        outcomes
    }
}

/// The bytes an entry holding `chunk` of head `h` of `sequence` has (the format's codes then
/// its scales; the padding to 16 bytes is not part of it): `values` is the layer's value
/// buffer, bf16 as bytes for [`ValueFormat::Bf16`].
pub fn entry_contents(
    format: ValueFormat,
    config: &ShadowConfig,
    sequence: &ShadowSequence,
    values: &[u8],
    h: usize,
    chunk: u32,
) -> Vec<u8> {
    let (c, d) = (config.chunk_size, config.head_dim);
    if format == ValueFormat::Bf16 {
        let first = sequence.host_value_chunk(h as u32, chunk, c as u32, d as u32) as usize * 2;
        return values[first..first + c * d * 2].to_vec();
    }
    let place = packed_chunk(
        format,
        sequence,
        config.kv_heads as u32,
        h as u32,
        chunk,
        c as u32,
        d as u32,
    );
    let (codes, scales) = (place.codes as usize, place.scales as usize);
    let mut bytes = values[codes..codes + format.code_bytes(c, d)].to_vec();
    bytes.extend_from_slice(&values[scales..scales + format.scale_bytes(c, d)]);
    bytes
}

/// The bf16 values as bytes, as [`entry_contents`] takes them.
pub fn bf16_bytes(values: &[bf16]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| v.to_bits().to_le_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::plan::plan;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    /// The policy said plainly: the misses in order against a map from entry to chunk; the
    /// entries hit this step keep their chunk; of the rest, the last miss of each entry is
    /// the one kept.
    fn simple_map_step(
        map: &mut HashMap<u32, u32>,
        chunks_per_head: u32,
        misses: &[Miss],
    ) -> Vec<u32> {
        let entry = |chunk: u32| chunk % chunks_per_head;
        let hit: Vec<bool> = misses
            .iter()
            .map(|m| map.get(&entry(m.chunk)) == Some(&m.chunk))
            .collect();
        let read: HashSet<u32> = misses
            .iter()
            .zip(&hit)
            .filter(|(_, &h)| h)
            .map(|(m, _)| entry(m.chunk))
            .collect();
        let mut written = HashMap::new();
        for (index, (m, &h)) in misses.iter().zip(&hit).enumerate() {
            if !h && !read.contains(&entry(m.chunk)) {
                written.insert(entry(m.chunk), index);
            }
        }
        for (&e, &index) in &written {
            map.insert(e, misses[index].chunk);
        }
        (0..misses.len())
            .map(|index| {
                if hit[index] {
                    OUTCOME_TIER_HIT
                } else if written.get(&entry(misses[index].chunk)) == Some(&index) {
                    OUTCOME_INSERTED
                } else {
                    OUTCOME_FETCHED
                }
            })
            .collect()
    }

    /// Random selections of `k` of `chunks` chunk ids, each step keeping about `keep` of the
    /// last one, through the plan: the miss lists a tier sees.
    fn miss_lists(seed: u64, chunks: u32, k: usize, keep: f64, steps: usize) -> Vec<Vec<Miss>> {
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut resident = vec![u32::MAX; k];
        let mut selection: Vec<u32> = Vec::new();
        let mut lists = Vec::new();
        for _ in 0..steps {
            let mut chosen: Vec<u32> = selection
                .iter()
                .copied()
                .filter(|_| (next() % 1000) as f64 / 1000.0 < keep)
                .collect();
            while chosen.len() < k {
                let chunk = (next() % chunks as u64) as u32;
                if !chosen.contains(&chunk) {
                    chosen.push(chunk);
                }
            }
            chosen.sort_unstable();
            selection = chosen;
            lists.push(plan(&selection, &mut resident));
        }
        lists
    }

    proptest! {
        /// The kernel's per-miss rule decides exactly as the plain map, step after step, and
        /// leaves the same chunks in the entries.
        #[test]
        fn the_model_decides_as_a_plain_map(
            seed in any::<u64>(),
            chunks in 16u32..400,
            k in 1usize..16,
            per_head in 1usize..64,
            keep in 0.0f64..1.0,
        ) {
            let k = k.min(chunks as usize);
            let mut model = TierModel::new(2, per_head);
            let mut maps = [HashMap::new(), HashMap::new()];
            for (step, misses) in miss_lists(seed, chunks, k, keep, 40).iter().enumerate() {
                let head = step % 2;
                let outcomes = model.step(head, misses);
                let expected = simple_map_step(&mut maps[head], per_head as u32, misses);
                prop_assert_eq!(&outcomes, &expected, "step {}", step);
                for (entry, &tag) in model.tags(head).iter().enumerate() {
                    prop_assert_eq!(maps[head].get(&(entry as u32)).copied().unwrap_or(EMPTY_ENTRY), tag);
                }
                // Every insert is the only one of its entry in the step.
                let inserted: Vec<u32> = misses.iter().zip(&outcomes)
                    .filter(|(_, &o)| o == OUTCOME_INSERTED)
                    .map(|(m, _)| m.chunk % per_head as u32).collect();
                let distinct: HashSet<u32> = inserted.iter().copied().collect();
                prop_assert_eq!(distinct.len(), inserted.len());
            }
        }
    }

    /// A tier with an entry for every chunk holds every value: after a chunk's first fetch,
    /// each of its misses is a tier hit.
    #[test]
    fn a_tier_with_every_chunk_misses_each_chunk_once() {
        let chunks = 300;
        let mut model = TierModel::new(1, chunks as usize);
        let mut seen = HashSet::new();
        for misses in miss_lists(7, chunks, 24, 0.6, 200) {
            for (miss, outcome) in misses.iter().zip(model.step(0, &misses)) {
                let first = seen.insert(miss.chunk);
                let expected = if first {
                    OUTCOME_INSERTED
                } else {
                    OUTCOME_TIER_HIT
                };
                assert_eq!(outcome, expected, "{miss:?}");
            }
        }
        assert!(seen.len() > 200);
    }

    /// Clearing a head empties its entries and leaves the other heads alone.
    #[test]
    fn clear_empties_one_head() {
        let mut model = TierModel::new(2, 4);
        let misses = [Miss { chunk: 5, slot: 0 }, Miss { chunk: 2, slot: 1 }];
        model.step(0, &misses);
        model.step(1, &misses);
        model.clear(0);
        assert!(model.tags(0).iter().all(|&t| t == EMPTY_ENTRY));
        assert_eq!(model.tags(1), &[EMPTY_ENTRY, 5, 2, EMPTY_ENTRY]);
        assert_eq!(model.step(1, &misses), vec![OUTCOME_TIER_HIT; 2]);
    }

    /// Two misses of one entry in one step: only the later is kept; an entry hit in the step
    /// is not overwritten.
    #[test]
    fn conflicts_in_one_step_keep_the_later_miss_and_the_hit() {
        let mut model = TierModel::new(1, 4);
        let m = |chunk| Miss { chunk, slot: 0 };
        assert_eq!(
            model.step(0, &[m(1), m(5), m(2)]),
            vec![OUTCOME_FETCHED, OUTCOME_INSERTED, OUTCOME_INSERTED]
        );
        assert_eq!(model.tags(0), &[EMPTY_ENTRY, 5, 2, EMPTY_ENTRY]);
        // 5 is a hit in entry 1, so 9 (entry 1 too) is not kept; 6 replaces 2.
        assert_eq!(
            model.step(0, &[m(9), m(5), m(6)]),
            vec![OUTCOME_FETCHED, OUTCOME_TIER_HIT, OUTCOME_INSERTED]
        );
        assert_eq!(model.tags(0), &[EMPTY_ENTRY, 5, 6, EMPTY_ENTRY]);
    }
}
