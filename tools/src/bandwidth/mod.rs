//! `shadowkv bandwidth`: the equivalent-bandwidth sweep. One layer's ShadowKV decode step at
//! Llama-3-8B heads over context, batch, hit rate, value format and value home, beside the
//! device copy, the pinned host-to-device copy and full attention measured in the same run;
//! printed as a table, written as CSV or JSON and drawn as a PNG.
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use shadowkv::cache::ValueFormat;

use crate::args::ValueFormatArg;

pub mod chart;
pub mod grid;
pub mod metric;
pub mod report;
mod sweep;

use grid::{parse_context, AxisChoice, Batch, Grid, HitRate, Home};

/// What `--help` says of the metric.
pub const ABOUT: &str = "\
The equivalent bandwidth of ShadowKV's decode step, swept over context, batch, hit rate, \
value format and value home, on the GPU.

The unit is one layer's step at Llama-3-8B heads (32 query / 8 KV heads, d 128; chunks of 8, \
rank 160, budget 2048), on a SYNTHETIC context (random keys and values through the normal \
prefill). Equivalent bandwidth = the K/V bytes full attention reads at the same batch and \
context (2 x batch x context x 8 heads x 128 x 2 bytes) / the step's time: the HBM bandwidth \
a dense attention would need to be as fast. It exceeds the GPU's real bandwidth when the step \
reads little of the cache; it falls when misses wait on PCIe.

Hit rates are scripted (SYNTHETIC SELECTION: that share of every head's selection stays \
resident, the rest is fetched and rebuilt) or `selected` (the top-k's real selection on the \
random context, which keeps few chunks). The batch grid is capped per context, format and \
home by what the whole model (32 layers, bf16 weights) fits in the GPU's free memory and the \
host's available memory, as `shadowkv plan` finds it; configurations past it are listed as \
skipped with the reason. The device-to-device copy, the pinned host-to-device copy and full \
attention are measured in the same run. The table shows where the time went: HBM and PCIe \
bytes of the step and when each stage ran (start-end, µs after the step began).";

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// One line per configuration, a header first.
    Csv,
    /// The rows with the unit, the metric and the ceilings.
    Json,
}

#[derive(Args, Debug)]
#[command(long_about = ABOUT)]
pub struct BandwidthArgs {
    /// A small grid: 32K and 122,880 tokens, batches 1 and 16, 60% and 80% hits and the real
    /// selection, every format and home (each axis flag still overrides).
    #[arg(long)]
    quick: bool,
    /// Context lengths in tokens (32K, 1M allowed; default 32K, 64K, 122,880, 256K, 512K, 1M).
    #[arg(long, value_delimiter = ',', value_parser = parse_context)]
    contexts: Option<Vec<usize>>,
    /// Batches: counts or `largest` (default 1, 2, 4, ... 128 and the largest that fits).
    #[arg(long, value_delimiter = ',')]
    batches: Option<Vec<Batch>>,
    /// Hit rates: shares (0.6), percentages (60) or `selected` (default 60, 80, 95, selected).
    #[arg(long, value_delimiter = ',')]
    hit_rates: Option<Vec<HitRate>>,
    /// Value formats (default all).
    #[arg(long, value_delimiter = ',', value_enum)]
    value_formats: Option<Vec<ValueFormatArg>>,
    /// Where the values live (default all): pinned host memory, the GPU, or the host behind a
    /// GPU value tier holding half of each head's prompt chunks (its HBM and PCIe bytes follow
    /// the step's tier hits).
    #[arg(long, value_delimiter = ',', value_enum)]
    homes: Option<Vec<Home>>,
    /// Samples per configuration (the median is kept).
    #[arg(long, default_value_t = 3)]
    samples: usize,
    /// Back-to-back steps per sample.
    #[arg(long, default_value_t = 8)]
    steps: u32,
    /// Output files without extension: the table as `.csv` or `.json`, the chart as `.png`.
    #[arg(long, default_value = "bandwidth")]
    out: PathBuf,
    /// The table's file format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Csv)]
    format: OutputFormat,
    /// Pinned host memory to size the batches for, in GiB (default: the available memory
    /// less 4 GiB).
    #[arg(long)]
    host_gib: Option<f64>,
    /// Also run the batches past the largest the whole model fits (one layer is measured, so
    /// they usually still fit; the table marks them `*`).
    #[arg(long)]
    past_fit: bool,
    /// Seed of the synthetic context and queries.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl BandwidthArgs {
    /// The grid the arguments ask for.
    pub fn grid(&self) -> Result<Grid, String> {
        if self.samples == 0 || self.steps == 0 {
            return Err("--samples and --steps must be at least 1".to_owned());
        }
        Grid::new(&AxisChoice {
            quick: self.quick,
            contexts: self.contexts.clone(),
            batches: self.batches.clone(),
            hit_rates: self.hit_rates.clone(),
            formats: self
                .value_formats
                .as_ref()
                .map(|formats| formats.iter().map(|&f| ValueFormat::from(f)).collect()),
            homes: self.homes.clone(),
        })
    }
}

pub fn run(args: BandwidthArgs) -> Result<(), Box<dyn std::error::Error>> {
    let grid = args.grid()?;
    let gpu = shadowkv::Gpu::new(0).map_err(|error| {
        format!("shadowkv bandwidth measures on a GPU, and there is none: {error}")
    })?;
    let options = sweep::SweepOptions {
        samples: args.samples,
        steps: args.steps,
        seed: args.seed,
        host_gib: args.host_gib,
        past_fit: args.past_fit,
    };
    let (rows, ceilings) = sweep::run(&gpu, &grid, &options)?;
    print!("{}", report::table_text(&rows, Some(&ceilings)));
    let (table, text) = match args.format {
        OutputFormat::Csv => (args.out.with_extension("csv"), report::to_csv(&rows)),
        OutputFormat::Json => (
            args.out.with_extension("json"),
            report::to_json(&rows, Some(&ceilings)).to_string(),
        ),
    };
    std::fs::write(&table, text)?;
    let png = args.out.with_extension("png");
    chart::render_chart(&rows, &png)?;
    println!("wrote {} and {}", table.display(), png.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BandwidthArgs,
    }

    fn parse(words: &[&str]) -> Result<BandwidthArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bandwidth").chain(words.iter().copied()))
            .map(|cli| cli.args)
    }

    #[test]
    fn parses_every_axis() {
        let args = parse(&[
            "--contexts",
            "32K,122880,1M",
            "--batches",
            "1,16,largest",
            "--hit-rates",
            "60,0.95,selected",
            "--value-formats",
            "bf16,int4",
            "--homes",
            "host",
            "--format",
            "json",
        ])
        .unwrap();
        let grid = args.grid().unwrap();
        assert_eq!(grid.contexts, [32_768, 122_880, 1 << 20]);
        assert_eq!(
            grid.batches,
            [Batch::Sequences(1), Batch::Sequences(16), Batch::Largest]
        );
        assert_eq!(
            grid.hit_rates,
            [
                HitRate::Scripted(0.6),
                HitRate::Scripted(0.95),
                HitRate::AsSelected
            ]
        );
        assert_eq!(grid.formats, [ValueFormat::Bf16, ValueFormat::Int4]);
        assert_eq!(grid.homes, [Home::Host]);
        assert_eq!(args.format, OutputFormat::Json);
    }

    #[test]
    fn quick_is_the_small_grid_and_bad_values_say_what_is_expected() {
        let grid = parse(&["--quick"]).unwrap().grid().unwrap();
        assert_eq!(grid.contexts, grid::QUICK_CONTEXTS);
        assert_eq!(grid.batches, grid::QUICK_BATCHES);
        assert_eq!(grid.formats, ValueFormat::ALL);
        for (words, expected) in [
            (&["--contexts", "many"][..], "1M"),
            (&["--batches", "0"][..], "largest"),
            (&["--hit-rates", "often"][..], "selected"),
            (&["--value-formats", "fp16"][..], "int4"),
            (&["--homes", "disk"][..], "gpu"),
        ] {
            let error = parse(words).expect_err("an error").to_string();
            assert!(error.contains(expected), "{words:?}: {error}");
        }
        let error = parse(&["--steps", "0"]).unwrap().grid().unwrap_err();
        assert!(error.contains("--steps"), "{error}");
    }

    #[test]
    fn help_explains_the_metric() {
        let Err(help) = Cli::try_parse_from(["bandwidth", "--help"]) else {
            panic!("--help parsed as a run");
        };
        let help = help.to_string();
        assert!(help.contains("Equivalent bandwidth = the K/V bytes full attention reads"));
        assert!(help.contains("SYNTHETIC SELECTION"));
    }
}
