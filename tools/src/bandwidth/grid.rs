//! The sweep's axes (context, batch, hit rate, value format, value home), the grid they span
//! and which of its configurations fit the memory (CPU only).
use std::fmt;
use std::str::FromStr;

use clap::ValueEnum;
use shadowkv::cache::{ValueFormat, ValueHome};

use crate::args::AttentionMode;

/// Where the values live during the sweep. A new home is one more variant here and its arm
/// in each method below; the sweep, the table and the chart iterate over whatever is listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum Home {
    /// Pinned, device-mapped host memory: misses come over PCIe.
    Host,
    /// GPU memory: misses are copied over HBM.
    Gpu,
    /// Pinned host memory behind a GPU value tier holding half of each (sequence, KV head)'s
    /// prompt chunks ([`TIER_SHARE`]): a miss found in the tier is copied over HBM, the others
    /// come over PCIe.
    Tiered,
}

/// The share of a prompt's chunks the [`Home::Tiered`] tier holds per (sequence, KV head).
pub const TIER_SHARE: f64 = 0.5;

impl Home {
    /// Every home, in the order the sweep runs them.
    pub const ALL: [Home; 3] = [Home::Host, Home::Gpu, Home::Tiered];

    /// The cache's value home for prompts of `prompt_chunks` chunks outside the local window
    /// (`ShadowKvParams::prompt_chunks`; only the tier's size depends on it).
    pub fn value_home(self, prompt_chunks: usize) -> ValueHome {
        match self {
            Home::Host => ValueHome::Host,
            Home::Gpu => ValueHome::Device,
            Home::Tiered => ValueHome::Tiered {
                chunks_per_head: ((prompt_chunks as f64 * TIER_SHARE) as usize).max(1),
            },
        }
    }

    /// The attention mode whose whole-model fit sizes the batch (`shadowkv plan`; the tiered
    /// home is sized as the host one, so its tier may leave fewer sequences room on the GPU).
    pub fn attention_mode(self) -> AttentionMode {
        match self {
            Home::Host | Home::Tiered => AttentionMode::Shadowkv,
            Home::Gpu => AttentionMode::ShadowkvGpu,
        }
    }

    /// The home's name in tables, files and the chart.
    pub fn name(self) -> &'static str {
        match self {
            Home::Host => "host",
            Home::Gpu => "gpu",
            Home::Tiered => "tiered",
        }
    }
}

/// A hit rate of the sweep: scripted (SYNTHETIC SELECTION: that share of every head's
/// selection stays resident) or the real top-k selection on the synthetic data.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HitRate {
    /// This share (0 to 1) of the selection hits, rewritten on the GPU each step.
    Scripted(f64),
    /// The selection as the top-k makes it (random synthetic keys: few chunks stay).
    AsSelected,
}

impl HitRate {
    /// The scripted rate, if any (what `DecodeStep::set_scripted_hit_rate` takes).
    pub fn scripted(self) -> Option<f64> {
        match self {
            HitRate::Scripted(rate) => Some(rate),
            HitRate::AsSelected => None,
        }
    }
}

impl fmt::Display for HitRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HitRate::Scripted(rate) => write!(f, "{}%", trim(100.0 * rate)),
            HitRate::AsSelected => write!(f, "selected"),
        }
    }
}

/// A percentage without a trailing `.0`.
fn trim(percent: f64) -> String {
    let text = format!("{percent:.1}");
    text.strip_suffix(".0").map(str::to_owned).unwrap_or(text)
}

impl FromStr for HitRate {
    type Err = String;

    /// `selected`, a share (`0.6`) or a percentage (`60`, `60%`).
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("selected") || text.eq_ignore_ascii_case("as-selected") {
            return Ok(HitRate::AsSelected);
        }
        let number = text.strip_suffix('%').unwrap_or(text);
        let value: f64 = number.parse().map_err(|_| {
            format!("hit rate `{text}`: expected `selected`, a share (0.6) or a percentage (60)")
        })?;
        let share = if text.ends_with('%') || value > 1.0 {
            value / 100.0
        } else {
            value
        };
        shadowkv::kernels::scripted_selection::check_hit_rate(share)
            .map_err(|error| format!("hit rate `{text}`: {error}"))?;
        Ok(HitRate::Scripted(share))
    }
}

/// A batch of the sweep: a number of sequences, or the largest the model fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Batch {
    /// This many sequences.
    Sequences(usize),
    /// The largest batch the whole model fits at the context, home and format.
    Largest,
}

impl FromStr for Batch {
    type Err = String;

    /// `largest` or a positive count.
    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("largest") || text.eq_ignore_ascii_case("max") {
            return Ok(Batch::Largest);
        }
        match text.parse::<usize>() {
            Ok(count) if count > 0 => Ok(Batch::Sequences(count)),
            _ => Err(format!(
                "batch `{text}`: expected `largest` or a count of at least 1"
            )),
        }
    }
}

/// A context length: a count of tokens, with `K` (1024) or `M` (1024²) allowed.
pub fn parse_context(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let (number, scale) = match text.chars().last() {
        Some('k' | 'K') => (&text[..text.len() - 1], 1024),
        Some('m' | 'M') => (&text[..text.len() - 1], 1024 * 1024),
        _ => (text, 1),
    };
    match number.parse::<usize>() {
        Ok(count) if count > 0 => Ok(count * scale),
        _ => Err(format!(
            "context `{text}`: expected a token count such as 122880, 32K or 1M"
        )),
    }
}

/// The full sweep's contexts: 32K to 1M, with 122,880 (the published ShadowKV figures).
pub const CONTEXTS: [usize; 6] = [32_768, 65_536, 122_880, 262_144, 524_288, 1_048_576];
/// The full sweep's batches (each capped by what fits), then the largest that fits.
pub const BATCHES: [Batch; 9] = [
    Batch::Sequences(1),
    Batch::Sequences(2),
    Batch::Sequences(4),
    Batch::Sequences(8),
    Batch::Sequences(16),
    Batch::Sequences(32),
    Batch::Sequences(64),
    Batch::Sequences(128),
    Batch::Largest,
];
/// The full sweep's hit rates: real text keeps 60-90% of the chunks between steps
/// (`shadowkv hit-rates`), then the real selection on the synthetic data.
pub const HIT_RATES: [HitRate; 4] = [
    HitRate::Scripted(0.60),
    HitRate::Scripted(0.80),
    HitRate::Scripted(0.95),
    HitRate::AsSelected,
];
/// `--quick`: the figures the targets name (16 x 122K at 60% hits) and a short context.
pub const QUICK_CONTEXTS: [usize; 2] = [32_768, 122_880];
/// `--quick`'s batches.
pub const QUICK_BATCHES: [Batch; 2] = [Batch::Sequences(1), Batch::Sequences(16)];
/// `--quick`'s hit rates.
pub const QUICK_HIT_RATES: [HitRate; 3] = [
    HitRate::Scripted(0.60),
    HitRate::Scripted(0.80),
    HitRate::AsSelected,
];

/// The axes of a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub contexts: Vec<usize>,
    pub batches: Vec<Batch>,
    pub hit_rates: Vec<HitRate>,
    pub formats: Vec<ValueFormat>,
    pub homes: Vec<Home>,
}

/// The axes asked for on the command line (`None`: the default of the full or quick grid).
#[derive(Clone, Debug, Default)]
pub struct AxisChoice {
    pub quick: bool,
    pub contexts: Option<Vec<usize>>,
    pub batches: Option<Vec<Batch>>,
    pub hit_rates: Option<Vec<HitRate>>,
    pub formats: Option<Vec<ValueFormat>>,
    pub homes: Option<Vec<Home>>,
}

impl Grid {
    /// The grid of `choice`: each axis as given, else the quick or the full default, sorted
    /// and without repeats (hit rates keep their order, scripted first).
    pub fn new(choice: &AxisChoice) -> Result<Grid, String> {
        let pick = |given: &Option<Vec<usize>>, quick: &[usize], full: &[usize]| {
            given.clone().unwrap_or_else(|| {
                if choice.quick {
                    quick.to_vec()
                } else {
                    full.to_vec()
                }
            })
        };
        let mut contexts = pick(&choice.contexts, &QUICK_CONTEXTS, &CONTEXTS);
        contexts.sort_unstable();
        contexts.dedup();
        let mut batches = choice.batches.clone().unwrap_or_else(|| {
            if choice.quick {
                QUICK_BATCHES.to_vec()
            } else {
                BATCHES.to_vec()
            }
        });
        batches.sort_unstable();
        batches.dedup();
        let mut hit_rates = choice.hit_rates.clone().unwrap_or_else(|| {
            if choice.quick {
                QUICK_HIT_RATES.to_vec()
            } else {
                HIT_RATES.to_vec()
            }
        });
        let mut unique: Vec<HitRate> = Vec::new();
        for rate in hit_rates.drain(..) {
            if !unique.contains(&rate) {
                unique.push(rate);
            }
        }
        let mut formats = choice
            .formats
            .clone()
            .unwrap_or_else(|| ValueFormat::ALL.to_vec());
        formats.dedup();
        let mut homes = choice.homes.clone().unwrap_or_else(|| Home::ALL.to_vec());
        homes.sort_unstable();
        homes.dedup();
        let grid = Grid {
            contexts,
            batches,
            hit_rates: unique,
            formats,
            homes,
        };
        for (axis, empty) in [
            ("--contexts", grid.contexts.is_empty()),
            ("--batches", grid.batches.is_empty()),
            ("--hit-rates", grid.hit_rates.is_empty()),
            ("--value-formats", grid.formats.is_empty()),
            ("--homes", grid.homes.is_empty()),
        ] {
            if empty {
                return Err(format!("{axis} names nothing: give at least one value"));
            }
        }
        Ok(grid)
    }

    /// The (home, format, context) cells in the order the sweep runs them: one one-layer
    /// cache each, prefilled once for its largest batch.
    pub fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::new();
        for &home in &self.homes {
            for &format in &self.formats {
                for &context in &self.contexts {
                    cells.push(Cell {
                        home,
                        format,
                        context,
                    });
                }
            }
        }
        cells
    }
}

/// One (home, format, context) of the grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cell {
    pub home: Home,
    pub format: ValueFormat,
    pub context: usize,
}

/// The largest batch the whole model fits in one cell, and what stops it growing.
#[derive(Clone, Debug, PartialEq)]
pub struct CellFit {
    pub largest: usize,
    pub limit: String,
}

/// Which batches of `batches` a cell runs (ascending, without repeats) and which it skips,
/// with the reason: a batch past the largest that fits is skipped unless `past_fit` (one
/// layer is measured, so it usually still fits; the rows mark it); `largest` is the largest
/// itself (skipped when not even one sequence fits).
pub fn plan_batches(
    batches: &[Batch],
    fit: &CellFit,
    past_fit: bool,
) -> (Vec<usize>, Vec<(Batch, String)>) {
    let mut run = Vec::new();
    let mut skipped = Vec::new();
    for &batch in batches {
        let count = match batch {
            Batch::Sequences(count) => count,
            Batch::Largest => fit.largest,
        };
        if count == 0 || (count > fit.largest && !past_fit) {
            let reason = if fit.largest == 0 {
                format!("not even one sequence fits ({})", fit.limit)
            } else {
                format!(
                    "{} sequences do not fit: the model fits {} ({})",
                    count, fit.largest, fit.limit
                )
            };
            skipped.push((batch, reason));
        } else if !run.contains(&count) {
            run.push(count);
        }
    }
    run.sort_unstable();
    (run, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hit_rates_as_shares_percentages_or_selected() {
        assert_eq!("0.6".parse::<HitRate>(), Ok(HitRate::Scripted(0.6)));
        assert_eq!("80".parse::<HitRate>(), Ok(HitRate::Scripted(0.8)));
        assert_eq!("95%".parse::<HitRate>(), Ok(HitRate::Scripted(0.95)));
        assert_eq!("selected".parse::<HitRate>(), Ok(HitRate::AsSelected));
        assert!("1.5%".parse::<HitRate>().is_ok());
        let error = "often".parse::<HitRate>().unwrap_err();
        assert!(error.contains("selected"), "{error}");
        assert!("150".parse::<HitRate>().is_err());
        assert!("-0.1".parse::<HitRate>().is_err());
        assert_eq!(HitRate::Scripted(0.6).to_string(), "60%");
        assert_eq!(HitRate::Scripted(0.955).to_string(), "95.5%");
        assert_eq!(HitRate::AsSelected.to_string(), "selected");
    }

    #[test]
    fn parses_batches_and_contexts() {
        assert_eq!("16".parse::<Batch>(), Ok(Batch::Sequences(16)));
        assert_eq!("largest".parse::<Batch>(), Ok(Batch::Largest));
        assert!("0".parse::<Batch>().is_err());
        assert_eq!(parse_context("122880"), Ok(122_880));
        assert_eq!(parse_context("32K"), Ok(32_768));
        assert_eq!(parse_context("1M"), Ok(1 << 20));
        assert!(parse_context("lots").unwrap_err().contains("1M"));
        assert!(parse_context("0").is_err());
    }

    #[test]
    fn builds_the_full_and_quick_grids_and_overrides_an_axis() {
        let full = Grid::new(&AxisChoice::default()).unwrap();
        assert_eq!(full.contexts, CONTEXTS);
        assert_eq!(full.batches, BATCHES);
        assert_eq!(full.hit_rates, HIT_RATES);
        assert_eq!(full.formats, ValueFormat::ALL);
        assert_eq!(full.homes, Home::ALL);
        assert_eq!(full.cells().len(), 3 * 3 * 6);
        let quick = Grid::new(&AxisChoice {
            quick: true,
            formats: Some(vec![ValueFormat::Int4]),
            contexts: Some(vec![1 << 20, 32_768, 32_768]),
            ..AxisChoice::default()
        })
        .unwrap();
        assert_eq!(quick.contexts, [32_768, 1 << 20]);
        assert_eq!(quick.batches, QUICK_BATCHES);
        assert_eq!(quick.hit_rates, QUICK_HIT_RATES);
        assert_eq!(quick.formats, [ValueFormat::Int4]);
        let cells = quick.cells();
        assert_eq!(cells.len(), 3 * 2);
        assert_eq!(
            cells[0],
            Cell {
                home: Home::Host,
                format: ValueFormat::Int4,
                context: 32_768
            }
        );
        let empty = Grid::new(&AxisChoice {
            homes: Some(Vec::new()),
            ..AxisChoice::default()
        });
        assert!(empty.unwrap_err().contains("--homes"));
    }

    #[test]
    fn skips_batches_that_do_not_fit_and_says_why() {
        let fit = CellFit {
            largest: 17,
            limit: "host memory: 18 sequences pin 130 GiB".to_owned(),
        };
        let batches = [
            Batch::Sequences(1),
            Batch::Sequences(16),
            Batch::Sequences(32),
            Batch::Largest,
        ];
        let (run, skipped) = plan_batches(&batches, &fit, false);
        assert_eq!(run, [1, 16, 17]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].0, Batch::Sequences(32));
        assert!(skipped[0].1.contains("fits 17"), "{}", skipped[0].1);
        assert!(skipped[0].1.contains("host memory"), "{}", skipped[0].1);
        // The largest equal to a count already listed runs once.
        let (run, _) = plan_batches(
            &batches,
            &CellFit {
                largest: 16,
                ..fit.clone()
            },
            false,
        );
        assert_eq!(run, [1, 16]);
        // Past the fit on request: 32 runs too, the largest stays the largest.
        let (run, skipped) = plan_batches(&batches, &fit, true);
        assert_eq!(run, [1, 16, 17, 32]);
        assert!(skipped.is_empty());
        let nothing = CellFit {
            largest: 0,
            ..fit.clone()
        };
        let (run, skipped) = plan_batches(&batches, &nothing, true);
        assert_eq!(run, [1, 16, 32]);
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].0, Batch::Largest);
        // Nothing fits: everything is skipped, the largest included.
        let (run, skipped) = plan_batches(&batches, &CellFit { largest: 0, ..fit }, false);
        assert!(run.is_empty());
        assert_eq!(skipped.len(), 4);
        assert!(skipped[3].1.starts_with("not even one"), "{}", skipped[3].1);
    }

    #[test]
    fn homes_map_to_the_cache_and_the_planner() {
        assert_eq!(Home::Host.value_home(15_000), ValueHome::Host);
        assert_eq!(Home::Gpu.value_home(15_000), ValueHome::Device);
        assert_eq!(
            Home::Tiered.value_home(15_000),
            ValueHome::Tiered {
                chunks_per_head: 7_500
            }
        );
        assert_eq!(
            Home::Tiered.value_home(1),
            ValueHome::Tiered { chunks_per_head: 1 }
        );
        assert_eq!(Home::Gpu.attention_mode(), AttentionMode::ShadowkvGpu);
        assert_eq!(Home::Tiered.attention_mode(), AttentionMode::Shadowkv);
    }
}
