//! `shadowkv bench --table`: decode throughput of full attention and both ShadowKV modes, each
//! at its largest batch, for the 7-9B shapes at two context lengths, with ShadowKV's hit rate
//! scripted (SYNTHETIC SELECTION); printed, written as JSON and drawn as a PNG bar chart.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use shadowkv::cache::ValueFormat;
use shadowkv_model::ShadowKvParams;

use crate::args::AttentionMode;
use crate::bench::{load_model, run_full, run_shadowkv, synthetic_selection_label, Run};
use crate::plan::{fit, mode_label, model_config, Budget};

/// The shapes of the table.
pub const TABLE_MODELS: [&str; 4] = ["llama-3-8b", "llama-3.1-8b", "yi-9b", "qwen2-7b"];
/// Context lengths of the table: 60K and 120K tokens.
pub const TABLE_CONTEXTS: [usize; 2] = [61_440, 122_880];
/// ShadowKV's scripted hit rates: real text keeps 60-90% of the chunks between steps
/// (`docs/BENCHMARKS.md`, Hit rates on real text).
pub const TABLE_HIT_RATES: [f64; 2] = [0.6, 0.8];

/// What the table runs.
pub struct TableOptions {
    pub steps: usize,
    pub params: ShadowKvParams,
    pub seed: u64,
    /// Output files without extension (`.json`, `.png`).
    pub out: PathBuf,
    /// Shapes (default [`TABLE_MODELS`]) and contexts (default [`TABLE_CONTEXTS`]).
    pub models: Option<Vec<String>>,
    pub contexts: Option<Vec<usize>>,
    /// ShadowKV's value formats, each a set of rows (bf16 alone by default).
    pub formats: Vec<ValueFormat>,
}

/// One measured configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct TableRow {
    pub model: String,
    pub context: usize,
    pub mode: AttentionMode,
    /// ShadowKV's scripted hit rate; `None` for full attention.
    pub hit_rate: Option<f64>,
    /// ShadowKV's value format (bf16 for full attention).
    pub format: ValueFormat,
    pub batch: usize,
    /// 0 when the run did not happen (nothing fits) or failed (`error`).
    pub tokens_per_s: f64,
    /// Tokens/s over full attention's at its largest batch, same model and context (NaN
    /// without a full-attention figure).
    pub ratio: f64,
    /// What limits the batch.
    pub limit: String,
    pub error: Option<String>,
}

impl TableRow {
    /// The configuration's name in the table and the chart's legend.
    pub fn label(&self) -> String {
        let mode = match self.format {
            ValueFormat::Bf16 => mode_label(self.mode).to_owned(),
            format => format!("{} ({})", mode_label(self.mode), format.name()),
        };
        match self.hit_rate {
            None => mode,
            Some(rate) => format!("{mode}, {:.0}% hits", 100.0 * rate),
        }
    }
}

pub fn run(options: &TableOptions) -> Result<(), Box<dyn std::error::Error>> {
    let gpu = Arc::new(shadowkv::Gpu::new(0)?);
    let budget = Budget::for_gpu(&gpu, None)?;
    let models: Vec<String> = options
        .models
        .clone()
        .unwrap_or_else(|| TABLE_MODELS.iter().map(|m| m.to_string()).collect());
    let contexts = options
        .contexts
        .clone()
        .unwrap_or_else(|| TABLE_CONTEXTS.to_vec());
    let steps = options.steps;
    let mut rows = Vec::new();
    for name in &models {
        let config = model_config(name)?;
        let model = load_model(&gpu, name, options.seed)?;
        for &context in &contexts {
            let run_of = |batch| Run {
                batch,
                context,
                steps,
                synthetic_context: true,
                seed: options.seed,
                graph: true,
                overhead: false,
            };
            let full = fit(
                &config,
                &options.params,
                AttentionMode::Full,
                ValueFormat::Bf16,
                context,
                steps + 3,
                budget,
            )?;
            let mut row = TableRow {
                model: name.clone(),
                context,
                mode: AttentionMode::Full,
                hit_rate: None,
                format: ValueFormat::Bf16,
                batch: full.batch,
                tokens_per_s: 0.0,
                ratio: f64::NAN,
                limit: full.limit.clone(),
                error: None,
            };
            if full.batch > 0 {
                eprintln!("{name} at {context}: full attention, batch {}", full.batch);
                match run_full(&run_of(full.batch), &model) {
                    Ok(per_step) => row.tokens_per_s = full.batch as f64 / per_step,
                    Err(error) => row.error = Some(error.to_string()),
                }
            }
            let full_rate = row.tokens_per_s;
            rows.push(row);
            let modes = [AttentionMode::Shadowkv, AttentionMode::ShadowkvGpu];
            let configurations = modes
                .iter()
                .flat_map(|&mode| options.formats.iter().map(move |&format| (mode, format)));
            for (mode, format) in configurations {
                let Some(home) = mode.value_home() else {
                    continue;
                };
                let generated = TABLE_HIT_RATES.len() * (steps + 2) + 1;
                let shadow = fit(
                    &config,
                    &options.params,
                    mode,
                    format,
                    context,
                    generated,
                    budget,
                )?;
                let rates: Vec<Option<f64>> = TABLE_HIT_RATES.iter().map(|&r| Some(r)).collect();
                let measured = if shadow.batch == 0 {
                    Ok(Vec::new())
                } else {
                    eprintln!(
                        "{name} at {context}: {}, {} values, batch {}",
                        mode_label(mode),
                        format.name(),
                        shadow.batch
                    );
                    run_shadowkv(
                        &run_of(shadow.batch),
                        &model,
                        options.params,
                        home.with_format(format),
                        &rates,
                    )
                };
                for rate in TABLE_HIT_RATES {
                    let mut row = TableRow {
                        model: name.clone(),
                        context,
                        mode,
                        hit_rate: Some(rate),
                        format,
                        batch: shadow.batch,
                        tokens_per_s: 0.0,
                        ratio: f64::NAN,
                        limit: shadow.limit.clone(),
                        error: None,
                    };
                    match &measured {
                        Ok(results) => {
                            if let Some((_, per_step)) =
                                results.iter().find(|(r, _)| *r == Some(rate))
                            {
                                row.tokens_per_s = shadow.batch as f64 / per_step;
                            }
                        }
                        Err(error) => row.error = Some(error.to_string()),
                    }
                    if full_rate > 0.0 {
                        row.ratio = row.tokens_per_s / full_rate;
                    }
                    rows.push(row);
                }
            }
            if let Some(full) = rows
                .iter_mut()
                .find(|r| r.model == *name && r.context == context && r.hit_rate.is_none())
            {
                if full.tokens_per_s > 0.0 {
                    full.ratio = 1.0;
                }
            }
        }
    }
    print_table(&rows);
    let json = options.out.with_extension("json");
    std::fs::write(&json, to_json(&rows, steps).to_string())?;
    let png = options.out.with_extension("png");
    render_chart(&rows, &png, CHART_SIZE)?;
    println!("wrote {} and {}", json.display(), png.display());
    Ok(())
}

/// The table on stdout.
pub fn print_table(rows: &[TableRow]) {
    println!(
        "decode throughput, SYNTHETIC context (random keys and values), ShadowKV with {} and {}:",
        synthetic_selection_label(TABLE_HIT_RATES[0]),
        synthetic_selection_label(TABLE_HIT_RATES[1])
    );
    println!(
        "{:<14} {:>8}  {:<38} {:>6} {:>11} {:>7}",
        "model", "context", "mode", "batch", "tokens/s", "x full"
    );
    for row in rows {
        let rate = if row.tokens_per_s > 0.0 {
            format!("{:.1}", row.tokens_per_s)
        } else {
            "-".to_owned()
        };
        let ratio = if row.ratio.is_finite() {
            format!("{:.2}", row.ratio)
        } else {
            "-".to_owned()
        };
        println!(
            "{:<14} {:>8}  {:<38} {:>6} {:>11} {:>7}",
            row.model,
            row.context,
            row.label(),
            row.batch,
            rate,
            ratio
        );
        if let Some(error) = &row.error {
            println!("    failed: {error}");
        }
    }
}

/// The rows as JSON (NaN ratios as null).
pub fn to_json(rows: &[TableRow], steps: usize) -> serde_json::Value {
    let finite = |x: f64| x.is_finite().then_some(x);
    serde_json::json!({
        "context": "SYNTHETIC (random keys and values through each mode's prefill)",
        "selection": "SYNTHETIC SELECTION for ShadowKV (scripted hit rate)",
        "steps": steps,
        "rows": rows.iter().map(|r| serde_json::json!({
            "model": r.model,
            "context": r.context,
            "mode": mode_label(r.mode),
            "hit_rate": r.hit_rate,
            "value_format": r.format.name(),
            "batch": r.batch,
            "tokens_per_s": r.tokens_per_s,
            "ratio_to_full": finite(r.ratio),
            "limit": r.limit,
            "error": r.error,
        })).collect::<Vec<_>>(),
    })
}

/// Pixels of the chart.
pub const CHART_SIZE: (u32, u32) = (1600, 900);

/// The text font (DejaVu Sans, in the binary: no system fonts needed).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Registers the bundled font as `sans-serif` (once), for every chart of the tool.
pub(crate) fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The font is valid TrueType, built in; a failure would only leave the text out.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

const SERIES_COLOURS: [RGBColor; 5] = [
    RGBColor(90, 90, 90),
    RGBColor(31, 119, 180),
    RGBColor(120, 180, 230),
    RGBColor(214, 39, 40),
    RGBColor(245, 150, 120),
];

/// A grouped bar chart of tokens/s: a group per (model, context), a bar per configuration
/// (full attention, then each ShadowKV mode and hit rate), each ShadowKV bar labelled with
/// its ratio to full attention, written as a PNG of `size` pixels.
pub fn render_chart(
    rows: &[TableRow],
    path: &Path,
    size: (u32, u32),
) -> Result<(), Box<dyn std::error::Error>> {
    register_font();
    let mut groups: Vec<(String, usize)> = Vec::new();
    let mut series: Vec<String> = Vec::new();
    for row in rows {
        if !groups.contains(&(row.model.clone(), row.context)) {
            groups.push((row.model.clone(), row.context));
        }
        if !series.contains(&row.label()) {
            series.push(row.label());
        }
    }
    let top = rows
        .iter()
        .map(|r| r.tokens_per_s)
        .filter(|x| x.is_finite())
        .fold(1.0f64, f64::max)
        * 1.15;
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Decode throughput at the largest batch (SYNTHETIC context; ShadowKV: SYNTHETIC SELECTION)",
            ("sans-serif", 26),
        )
        .margin(20)
        .x_label_area_size(70)
        .y_label_area_size(90)
        .build_cartesian_2d(0f64..groups.len().max(1) as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc("tokens/s")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 18))
        .axis_desc_style(("sans-serif", 20))
        .draw()?;
    let width = 0.8 / series.len().max(1) as f64;
    for (s, name) in series.iter().enumerate() {
        let colour = SERIES_COLOURS[s % SERIES_COLOURS.len()];
        let bars: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.label() == *name)
            .filter_map(|r| {
                let g = groups
                    .iter()
                    .position(|g| *g == (r.model.clone(), r.context))?;
                Some((g as f64 + 0.1 + s as f64 * width, r.tokens_per_s.max(0.0)))
            })
            .collect();
        chart
            .draw_series(
                bars.iter().map(|&(x, y)| {
                    Rectangle::new([(x, 0.0), (x + width * 0.92, y)], colour.filled())
                }),
            )?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 7), (x + 16, y + 7)], colour.filled()));
        let ratios: Vec<(f64, f64, String)> = rows
            .iter()
            .filter(|r| r.label() == *name && r.hit_rate.is_some() && r.ratio.is_finite())
            .filter_map(|r| {
                let g = groups
                    .iter()
                    .position(|g| *g == (r.model.clone(), r.context))?;
                let x = g as f64 + 0.1 + s as f64 * width + width * 0.46;
                Some((x, r.tokens_per_s, format!("{:.1}x", r.ratio)))
            })
            .collect();
        chart.draw_series(ratios.into_iter().map(|(x, y, text)| {
            Text::new(
                text,
                (x, y),
                ("sans-serif", 14)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 18))
        .draw()?;
    // The group names under the axis, two lines each.
    let style = ("sans-serif", 18)
        .into_font()
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (g, (model, context)) in groups.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        root.draw(&Text::new(model.clone(), (x, y + 10), style.clone()))?;
        let tokens = format!("{context} tokens");
        root.draw(&Text::new(tokens, (x, y + 34), style.clone()))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn fake_rows() -> Vec<TableRow> {
        let mut rows = Vec::new();
        for (model, base) in [("llama-3-8b", 400.0), ("qwen2-7b", 520.0)] {
            for context in TABLE_CONTEXTS {
                let scale = 61_440.0 / context as f64;
                let full = base * scale;
                let row = |mode, hit_rate, batch, tokens_per_s: f64| TableRow {
                    model: model.to_owned(),
                    context,
                    mode,
                    hit_rate,
                    format: ValueFormat::Bf16,
                    batch,
                    tokens_per_s,
                    ratio: tokens_per_s / full,
                    limit: "GPU memory".to_owned(),
                    error: None,
                };
                rows.push(row(AttentionMode::Full, None, 7, full));
                for (mode, gain) in [
                    (AttentionMode::Shadowkv, 3.0),
                    (AttentionMode::ShadowkvGpu, 2.0),
                ] {
                    for rate in TABLE_HIT_RATES {
                        rows.push(row(mode, Some(rate), 40, full * gain * (0.5 + rate)));
                    }
                }
            }
        }
        rows
    }

    /// Width and height from a PNG's IHDR chunk, if `bytes` starts like a PNG.
    pub(crate) fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
        const SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];
        if bytes.len() < 24 || bytes[..8] != SIGNATURE || &bytes[12..16] != b"IHDR" {
            return None;
        }
        let word = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        Some((word(16), word(20)))
    }

    #[test]
    fn renders_the_chart_as_a_png_of_its_size() {
        let dir = std::env::temp_dir().join(format!("shadowkv-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("table.png");
        render_chart(&fake_rows(), &path, (1200, 700)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(png_size(&bytes), Some((1200, 700)));
        // Bars, text and a legend: far more than a blank image compresses to.
        assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
        if let Ok(keep) = std::env::var("SHADOWKV_KEEP_CHART") {
            std::fs::copy(&path, keep).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn json_names_every_row_and_leaves_unknown_ratios_null() {
        let mut rows = fake_rows();
        rows[1].ratio = f64::NAN;
        let json = to_json(&rows, 16);
        let out = json["rows"].as_array().unwrap();
        assert_eq!(out.len(), rows.len());
        assert!(out[1]["ratio_to_full"].is_null());
        assert_eq!(out[0]["mode"], "full attention");
        assert_eq!(out[1]["hit_rate"], 0.6);
        assert_eq!(out[1]["value_format"], "bf16");
    }

    #[test]
    fn rows_of_a_compressed_format_say_so_in_their_label() {
        let mut rows = fake_rows();
        let bf16 = rows[1].label();
        rows[1].format = ValueFormat::Int4;
        let int4 = rows[1].label();
        assert_eq!(bf16, "ShadowKV, values on host, 60% hits");
        assert_eq!(int4, "ShadowKV, values on host (int4), 60% hits");
        assert_eq!(to_json(&rows, 16)["rows"][1]["value_format"], "int4");
    }
}
