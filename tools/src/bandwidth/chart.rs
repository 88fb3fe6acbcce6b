//! The chart: equivalent bandwidth against context, one line per batch, a panel per
//! (home, value format, hit rate) (CPU only).
use std::path::Path;

use plotters::prelude::*;

use super::report::Row;
use crate::table::register_font;

/// Pixels of one panel; the image is a grid of them.
pub const PANEL_SIZE: (u32, u32) = (640, 420);
/// Panels per line of the grid, at most.
const PANEL_COLUMNS: usize = 3;

const LINE_COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A panel's title: where the values live, their format and the hit rate.
fn panel_title(row: &Row) -> String {
    format!(
        "values on {}, {}, {} hits",
        row.home.name(),
        row.format.name(),
        row.hit_rate
    )
}

/// A context in tokens as the axis shows it: `32K`, `1M`, `122880` where not a whole K.
fn tokens_label(tokens: f64) -> String {
    let tokens = tokens.round() as u64;
    if tokens >= 1 << 20 && tokens.is_multiple_of(1 << 20) {
        format!("{}M", tokens >> 20)
    } else if tokens.is_multiple_of(1024) {
        format!("{}K", tokens >> 10)
    } else {
        tokens.to_string()
    }
}

/// The image size for `panels` panels.
pub fn chart_size(panels: usize) -> (u32, u32) {
    let columns = panels.clamp(1, PANEL_COLUMNS);
    let lines = panels.max(1).div_ceil(columns);
    (
        PANEL_SIZE.0 * columns as u32,
        PANEL_SIZE.1 * lines as u32 + 50,
    )
}

/// Draws the measured rows as a PNG at `path`: a panel per (home, format, hit rate) in the
/// order the rows come, in each a line per batch of equivalent TB/s against context (log
/// scale). Returns the image's size.
pub fn render_chart(rows: &[Row], path: &Path) -> Result<(u32, u32), Box<dyn std::error::Error>> {
    register_font();
    let measured: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.outcome
                .as_ref()
                .is_ok_and(|m| m.equivalent_bandwidth.is_finite())
        })
        .collect();
    let mut panels: Vec<String> = Vec::new();
    for row in &measured {
        let title = panel_title(row);
        if !panels.contains(&title) {
            panels.push(title);
        }
    }
    let size = chart_size(panels.len());
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let (caption, body) = root.split_vertically(50);
    caption.titled(
        "Equivalent bandwidth (full-attention K/V bytes / step time), one Llama-3-8B layer",
        ("sans-serif", 24),
    )?;
    if panels.is_empty() {
        body.titled("nothing was measured", ("sans-serif", 20))?;
        root.present()?;
        return Ok(size);
    }
    let columns = panels.len().clamp(1, PANEL_COLUMNS);
    let areas = body.split_evenly((panels.len().div_ceil(columns), columns));
    // Context on a log2 axis: doublings are evenly spaced and labelled in tokens.
    let (low, high) = measured.iter().fold((f64::MAX, 0f64), |(low, high), r| {
        (low.min(r.context as f64), high.max(r.context as f64))
    });
    let (low, high) = (low.log2().floor(), high.log2().ceil());
    let contexts = (low - 0.3)..(high + 0.3);
    let doublings = (high - low) as usize + 1;
    for (title, area) in panels.iter().zip(areas) {
        let in_panel: Vec<&&Row> = measured
            .iter()
            .filter(|r| panel_title(r) == *title)
            .collect();
        let top = in_panel
            .iter()
            .filter_map(|r| r.outcome.as_ref().ok())
            .map(|m| m.equivalent_bandwidth / 1e12)
            .fold(0.1f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(contexts.clone(), 0f64..top)?;
        chart
            .configure_mesh()
            .x_desc("context (tokens)")
            .y_desc("equivalent TB/s")
            .x_labels(doublings + 1)
            .x_label_formatter(&|x| tokens_label(x.exp2()))
            .max_light_lines(1)
            .y_label_formatter(&|y| format!("{y:.1}"))
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 14))
            .draw()?;
        let mut batches: Vec<usize> = in_panel.iter().map(|r| r.batch).collect();
        batches.sort_unstable();
        batches.dedup();
        for (index, batch) in batches.iter().enumerate() {
            let colour = LINE_COLOURS[index % LINE_COLOURS.len()];
            let mut points: Vec<(f64, f64)> = in_panel
                .iter()
                .filter(|r| r.batch == *batch)
                .filter_map(|r| {
                    let m = r.outcome.as_ref().ok()?;
                    Some(((r.context as f64).log2(), m.equivalent_bandwidth / 1e12))
                })
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(points.clone(), colour.stroke_width(2)))?
                .label(format!("batch {batch}"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            chart.draw_series(
                points
                    .into_iter()
                    .map(|point| Circle::new(point, 3, colour.filled())),
            )?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()?;
    }
    root.present()?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandwidth::report::tests::fake_rows;
    use crate::table::tests::png_size;

    #[test]
    fn renders_a_png_of_a_panel_per_home_format_and_hit_rate() {
        let dir = std::env::temp_dir().join(format!("shadowkv-bandwidth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bandwidth.png");
        let rows = fake_rows();
        let size = render_chart(&rows, &path).unwrap();
        // Two homes x one format x two hit rates: four panels, three a line.
        assert_eq!(size, chart_size(4));
        assert_eq!(size, (3 * PANEL_SIZE.0, 2 * PANEL_SIZE.1 + 50));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(png_size(&bytes), Some(size));
        // Lines, points, text and legends: far more than a blank image compresses to.
        assert!(bytes.len() > 20_000, "{} bytes", bytes.len());
        if let Ok(keep) = std::env::var("SHADOWKV_KEEP_CHART") {
            std::fs::copy(&path, keep).unwrap();
        }
        assert_eq!(tokens_label(32_768.0), "32K");
        assert_eq!(tokens_label(1_048_576.0), "1M");
        assert_eq!(tokens_label(122_880.0), "120K");
        assert_eq!(tokens_label(100_000.0), "100000");
        // Nothing measured: a captioned image all the same.
        let skipped: Vec<Row> = rows
            .into_iter()
            .map(|mut r| {
                r.outcome = Err("no".into());
                r
            })
            .collect();
        assert_eq!(render_chart(&skipped, &path).unwrap(), chart_size(0));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
