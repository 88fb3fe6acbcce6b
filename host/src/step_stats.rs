//! What a decode step did with its selection: [`StepStats`], from the plan's miss counts and,
//! with a GPU value tier, the fetch's outcome for each miss (both in mapped host memory).
use shadowkv_kernels::tier::{OUTCOME_INSERTED, OUTCOME_TIER_HIT};

/// What one step did, for all (sequence, KV head) pairs. Every selected chunk is a slot hit
/// or a miss; every miss is a tier hit or a PCIe fetch: `selected = slot_hits + misses` and
/// `misses = tier_hits + pcie_fetches` (a prefill's first selection fetches from the prompt
/// on the GPU: neither).
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// `[batch, Hkv]` chunks fetched and rebuilt.
    pub misses_per_head: Vec<u32>,
    /// Chunks fetched and rebuilt in all: the sum of [`misses_per_head`](Self::misses_per_head).
    pub misses: u64,
    /// Chunks selected in all: `batch * Hkv * budget_chunks`.
    pub selected: u64,
    /// Selected chunks already in their sparse slots: `selected - misses`.
    pub slot_hits: u64,
    /// Misses whose values were copied from GPU memory over HBM: found in the value tier, or
    /// every miss with the values on the GPU (`ValueHome::Device`, the tier that holds
    /// everything).
    pub tier_hits: u64,
    /// Misses whose values came from host memory over PCIe.
    pub pcie_fetches: u64,
    /// PCIe fetches the value tier kept (0 without a tier).
    pub tier_inserts: u64,
}

/// Where a selection's misses get their values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MissSource {
    /// A prefill's first selection: from the prompt's values on the GPU.
    Prompt,
    /// Host memory over PCIe.
    Host,
    /// GPU memory (`ValueHome::Device`).
    Device,
    /// The value tier, or host memory when not there.
    Tiered,
}

impl StepStats {
    /// Share of the selected chunks that were already resident.
    pub fn hit_rate(&self) -> f64 {
        1.0 - self.misses as f64 / self.selected.max(1) as f64
    }

    /// Share of the misses found in the value tier (or on the GPU).
    pub fn tier_hit_rate(&self) -> f64 {
        self.tier_hits as f64 / self.misses.max(1) as f64
    }

    /// The statistics of `counts` (misses per (sequence, KV head)) of a selection of
    /// `budget_chunks` per head whose misses came from `source`; for a tier, `outcomes` holds
    /// `budget_chunks` entries per head, the first `count` of each the fetch's outcome.
    pub(crate) fn from_counts(
        counts: &[u32],
        budget_chunks: usize,
        source: MissSource,
        outcomes: Option<&[u32]>,
    ) -> StepStats {
        let misses: u64 = counts.iter().map(|&c| c as u64).sum();
        let selected = (counts.len() * budget_chunks) as u64;
        let (tier_hits, tier_inserts) = match (source, outcomes) {
            (MissSource::Device, _) => (misses, 0),
            (MissSource::Tiered, Some(outcomes)) => {
                let mut hits = 0;
                let mut inserts = 0;
                for (row, &count) in counts.iter().enumerate() {
                    let first = row * budget_chunks;
                    let valid = (count as usize).min(budget_chunks);
                    for &outcome in outcomes.get(first..first + valid).unwrap_or(&[]) {
                        hits += (outcome == OUTCOME_TIER_HIT) as u64;
                        inserts += (outcome == OUTCOME_INSERTED) as u64;
                    }
                }
                (hits, inserts)
            }
            _ => (0, 0),
        };
        let pcie_fetches = match source {
            MissSource::Prompt | MissSource::Device => 0,
            MissSource::Host | MissSource::Tiered => misses - tier_hits,
        };
        StepStats {
            misses_per_head: counts.to_vec(),
            misses,
            selected,
            slot_hits: selected.saturating_sub(misses),
            tier_hits,
            pcie_fetches,
            tier_inserts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowkv_kernels::tier::OUTCOME_FETCHED;

    /// Each source splits the misses as documented, and the parts add up.
    #[test]
    fn the_split_adds_up_for_every_source() {
        let counts = [3u32, 0, 2];
        let k = 4;
        // Junk past each head's count is not counted.
        let outcomes = [
            OUTCOME_TIER_HIT,
            OUTCOME_INSERTED,
            OUTCOME_FETCHED,
            OUTCOME_TIER_HIT,
            OUTCOME_TIER_HIT,
            OUTCOME_TIER_HIT,
            OUTCOME_TIER_HIT,
            OUTCOME_TIER_HIT,
            OUTCOME_TIER_HIT,
            OUTCOME_INSERTED,
            OUTCOME_TIER_HIT,
            OUTCOME_TIER_HIT,
        ];
        let tiered = StepStats::from_counts(&counts, k, MissSource::Tiered, Some(&outcomes));
        assert_eq!(
            (tiered.selected, tiered.misses, tiered.slot_hits),
            (12, 5, 7)
        );
        assert_eq!(
            (tiered.tier_hits, tiered.pcie_fetches, tiered.tier_inserts),
            (2, 3, 2)
        );
        assert!((tiered.tier_hit_rate() - 0.4).abs() < 1e-12);
        let host = StepStats::from_counts(&counts, k, MissSource::Host, None);
        assert_eq!((host.tier_hits, host.pcie_fetches), (0, 5));
        let device = StepStats::from_counts(&counts, k, MissSource::Device, None);
        assert_eq!((device.tier_hits, device.pcie_fetches), (5, 0));
        let prompt = StepStats::from_counts(&counts, k, MissSource::Prompt, None);
        assert_eq!((prompt.tier_hits, prompt.pcie_fetches), (0, 0));
        for stats in [tiered, host, device] {
            assert_eq!(
                stats.slot_hits + stats.tier_hits + stats.pcie_fetches,
                stats.selected
            );
            assert!((stats.hit_rate() - 7.0 / 12.0).abs() < 1e-12);
        }
    }
}
