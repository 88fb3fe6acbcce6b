//! The heatmap of one attention mode: context length (rows) by needle depth (columns), each
//! cell the needle tasks' mean score, coloured red (0) to green (100) and labelled.
use std::path::Path;

use plotters::prelude::*;
use shadowkv_model::eval::Report;

use crate::table::register_font;

/// A colour from red (0) through yellow to green (100).
fn colour(score: f64) -> RGBColor {
    let t = (score / 100.0).clamp(0.0, 1.0);
    let (r, g) = if t < 0.5 {
        (230.0, 60.0 + 340.0 * t)
    } else {
        (230.0 - 360.0 * (t - 0.5), 230.0)
    };
    RGBColor(r as u8, g as u8, 80)
}

/// Draws `report`'s heatmap of mode `mode` to `path` (PNG); nothing when no needle task ran.
pub fn render(
    report: &Report,
    mode: usize,
    path: &Path,
) -> Result<bool, Box<dyn std::error::Error>> {
    let (lengths, depths, grid) = report.cells(mode);
    if lengths.is_empty() || depths.is_empty() {
        return Ok(false);
    }
    register_font();
    let (width, height) = (
        (160 + 90 * depths.len()) as u32,
        (150 + 50 * lengths.len()) as u32,
    );
    let root = BitMapBackend::new(path, (width.max(520), height)).into_drawing_area();
    root.fill(&WHITE)?;
    let label = report.modes[mode].label();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{label}: needle tasks, mean exact match (%)"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(90)
        // A segmented `0..n` has a segment per value of `0..=n`: `0..n - 1` gives n cells.
        .build_cartesian_2d(
            (0..depths.len() - 1).into_segmented(),
            (0..lengths.len() - 1).into_segmented(),
        )?;
    // Labels at the middle of each cell.
    let centre = |value: &SegmentValue<usize>| match value {
        SegmentValue::CenterOf(i) => Some(*i),
        _ => None,
    };
    let depth_label = |v: &SegmentValue<usize>| {
        centre(v)
            .and_then(|i| depths.get(i))
            .map_or(String::new(), |d| format!("{:.0}%", d * 100.0))
    };
    let length_label = |v: &SegmentValue<usize>| {
        centre(v)
            .and_then(|i| lengths.get(i))
            .map_or(String::new(), |l| l.to_string())
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("needle depth")
        .y_desc("context (tokens)")
        .x_labels(depths.len())
        .y_labels(lengths.len())
        .x_label_formatter(&depth_label)
        .y_label_formatter(&length_label)
        .label_style(("sans-serif", 14))
        .draw()?;
    for (row, scores) in grid.iter().enumerate() {
        for (column, score) in scores.iter().enumerate() {
            let fill = score.map_or(RGBColor(220, 220, 220), colour);
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(column), SegmentValue::Exact(row)),
                    (
                        SegmentValue::Exact(column + 1),
                        SegmentValue::Exact(row + 1),
                    ),
                ],
                fill.filled(),
            )))?;
            let text = score.map_or("-".into(), |s| format!("{s:.0}"));
            let (x, y) =
                chart.backend_coord(&(SegmentValue::CenterOf(column), SegmentValue::CenterOf(row)));
            root.draw(&Text::new(
                text,
                (x - 10, y - 7),
                ("sans-serif", 15).into_font().color(&BLACK),
            ))?;
        }
    }
    root.present()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use shadowkv_model::eval::{Mode, Outcome, Task};
    use shadowkv_model::ShadowKvParams;

    use super::*;

    #[test]
    fn a_heatmap_has_a_cell_per_length_and_depth() {
        let mut report = Report {
            model: "synthetic".into(),
            modes: vec![
                Mode::full(),
                Mode {
                    shadowkv: Some(ShadowKvParams::default()),
                    value_format: "bf16".into(),
                    values: "host".into(),
                },
            ],
            ..Report::default()
        };
        for mode in 0..2 {
            for (l, length) in [1024, 2048].into_iter().enumerate() {
                for (d, depth) in [0.0, 0.5, 1.0].into_iter().enumerate() {
                    report.outcomes.push(Outcome {
                        task: Task::NiahNumber,
                        length,
                        prompt_tokens: length - 3,
                        depth: Some(depth),
                        sample: 0,
                        mode,
                        score: if mode == 1 && l == 1 && d == 1 {
                            0.0
                        } else {
                            1.0
                        },
                        answer: String::new(),
                        hit_rates: Vec::new(),
                        recalls: Vec::new(),
                    });
                }
            }
        }
        let (lengths, depths, grid) = report.cells(1);
        assert_eq!((lengths, depths), (vec![1024, 2048], vec![0.0, 0.5, 1.0]));
        assert_eq!(grid[1][1], Some(0.0));
        assert_eq!(report.worst_cell(1), Some((100.0, 2048, 0.5)));
        let path =
            std::env::temp_dir().join(format!("shadowkv-heatmap-{}.png", std::process::id()));
        assert!(render(&report, 1, &path).unwrap());
        let png = std::fs::read(&path).unwrap();
        assert!(png.starts_with(b"\x89PNG"));
        std::fs::remove_file(&path).ok();
    }
}
