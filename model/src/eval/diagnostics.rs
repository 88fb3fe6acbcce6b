//! Why answers are lost: per layer and decode step, ShadowKV's hit rate between steps (the
//! share of the selected chunks that the step before selected too) and its attention recall
//! (the share of full attention's probability mass on the tokens ShadowKV attends), as the
//! CPU path records them ([`crate::CpuCache::record_selections`],
//! [`crate::CpuCache::record_recall`]).

/// Per layer, the hit rate of each step after the first: the share of each KV head's
/// selection that the step before also selected, averaged over the heads. `steps` holds, per
/// step, per layer, per KV head, the selected chunk ids; a layer that selects nothing (kept
/// exact) gets an empty series.
pub fn step_hit_rates(steps: &[Vec<Vec<Vec<usize>>>]) -> Vec<Vec<f64>> {
    let layers = steps.first().map_or(0, |s| s.len());
    (0..layers)
        .map(|layer| {
            // A layer that selects nothing (a sliding-window layer, kept exact) has no series.
            steps
                .windows(2)
                .filter(|pair| !pair[1][layer].is_empty())
                .map(|pair| {
                    let (before, now) = (&pair[0][layer], &pair[1][layer]);
                    let heads = now.len() as f64;
                    now.iter()
                        .zip(before)
                        .map(|(now, before)| {
                            let kept = now.iter().filter(|c| before.contains(c)).count();
                            kept as f64 / now.len().max(1) as f64
                        })
                        .sum::<f64>()
                        / heads
                })
                .collect()
        })
        .collect()
}

/// Per layer, each step's recall averaged over the query heads. `steps` holds, per step, per
/// layer, per query head, the recall.
pub fn step_recalls(steps: &[Vec<Vec<f32>>]) -> Vec<Vec<f64>> {
    let layers = steps.first().map_or(0, |s| s.len());
    (0..layers)
        .map(|layer| {
            steps
                .iter()
                .map(|step| {
                    let heads = &step[layer];
                    heads.iter().map(|&r| r as f64).sum::<f64>() / heads.len().max(1) as f64
                })
                .collect()
        })
        .collect()
}

/// Mean, minimum and count of a series.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Summary {
    pub mean: f64,
    pub min: f64,
    pub count: usize,
}

impl Summary {
    /// The summary of `values` (mean 0, min 0 for none).
    pub fn of(values: &[f64]) -> Summary {
        if values.is_empty() {
            return Summary::default();
        }
        Summary {
            mean: values.iter().sum::<f64>() / values.len() as f64,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            count: values.len(),
        }
    }

    /// Pools summaries (count-weighted mean, least minimum).
    pub fn pool(parts: &[Summary]) -> Summary {
        let count: usize = parts.iter().map(|s| s.count).sum();
        if count == 0 {
            return Summary::default();
        }
        Summary {
            mean: parts.iter().map(|s| s.mean * s.count as f64).sum::<f64>() / count as f64,
            min: parts
                .iter()
                .filter(|s| s.count > 0)
                .map(|s| s.min)
                .fold(f64::INFINITY, f64::min),
            count,
        }
    }
}

/// Per layer, the summary of each layer's series.
pub fn per_layer(series: &[Vec<f64>]) -> Vec<Summary> {
    series.iter().map(|s| Summary::of(s)).collect()
}
