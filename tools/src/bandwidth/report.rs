//! The sweep's results: one row per configuration, printed as a table and written as CSV or
//! JSON (CPU only).
use std::fmt::Write as _;

use shadowkv::cache::ValueFormat;

use super::grid::{Batch, HitRate, Home};
use super::metric::{stage_spans, StepTraffic};

/// What one configuration measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// Device time of one layer's step (ms).
    pub step_ms: f64,
    /// Share of the selection that was resident, as the step's statistics counted it.
    pub actual_hit_rate: f64,
    /// Full-attention K/V bytes / step time (bytes/s).
    pub equivalent_bandwidth: f64,
    /// Full attention's K/V bytes at the batch and context.
    pub full_kv_bytes: u64,
    /// Full attention's device time at the batch and context (ms), if it fit in GPU memory.
    pub full_ms: Option<f64>,
    pub traffic: StepTraffic,
    /// When each stage ended, µs after the step began (one timed step).
    pub stages: Vec<(String, f64)>,
}

/// One configuration of the sweep and what became of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub home: Home,
    pub format: ValueFormat,
    pub context: usize,
    /// The batch asked for (`largest` is resolved into [`batch`](Self::batch) when it runs).
    pub asked: Batch,
    /// Sequences in the step (0 when skipped before the batch was known).
    pub batch: usize,
    pub hit_rate: HitRate,
    /// Whether the whole model would not fit this batch (run with `--past-fit`: one layer
    /// is measured).
    pub past_model_fit: bool,
    /// The figures, or why the configuration did not run.
    pub outcome: Result<Measured, String>,
}

/// The ceilings measured in the same run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ceilings {
    /// Device-to-device copy, bytes read + written per second.
    pub device_copy: f64,
    /// Pinned host-to-device copy, bytes per second.
    pub pinned_copy: f64,
}

/// What the table and the files say the figures are.
pub const UNIT: &str = "one layer's ShadowKV decode step at Llama-3-8B heads (32 query / 8 KV heads, d 128; c 8, r 160, S 2048, 48 outlier and 4 local chunks), SYNTHETIC context (random keys and values through the normal prefill); scripted hit rates are SYNTHETIC SELECTION";
/// The metric, as the table and the files define it.
pub const METRIC: &str =
    "equivalent bandwidth = full-attention K/V bytes at the batch and context / ShadowKV step time";

fn batch_label(batch: Batch) -> String {
    match batch {
        Batch::Sequences(count) => count.to_string(),
        Batch::Largest => "largest".to_owned(),
    }
}

/// Stages as `name start-end` (µs) joined by `; `.
fn stages_text(stages: &[(String, f64)]) -> String {
    stage_spans(stages)
        .iter()
        .map(|s| format!("{} {:.1}-{:.1}", s.name, s.start_us, s.end_us))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The table on stdout, with the ceilings and the definitions first.
pub fn table_text(rows: &[Row], ceilings: Option<&Ceilings>) -> String {
    let mut text = format!("unit: {UNIT}\n{METRIC}\n");
    if let Some(ceilings) = ceilings {
        let _ = writeln!(
            text,
            "ceilings measured now: device copy {:.0} GB/s (read + write), pinned host->device {:.1} GB/s",
            ceilings.device_copy / 1e9,
            ceilings.pinned_copy / 1e9
        );
    }
    if rows.iter().any(|r| r.past_model_fit) {
        let _ = writeln!(
            text,
            "batch*: past the largest batch the whole model fits (--past-fit; one layer fits)"
        );
    }
    let _ = writeln!(
        text,
        "{:<5} {:<5} {:>8} {:>6} {:>9} {:>7} {:>9} {:>9} {:>8} {:>10} {:>9} {:>9}  stages (µs after the step began: start-end)",
        "home", "vals", "context", "batch", "hits", "actual", "step us", "full us", "speedup", "equiv TB/s", "HBM MB", "PCIe MB"
    );
    for row in rows {
        let head = format!(
            "{:<5} {:<5} {:>8} {:>6} {:>9}",
            row.home.name(),
            row.format.name(),
            row.context,
            if row.batch > 0 {
                format!("{}{}", row.batch, if row.past_model_fit { "*" } else { "" })
            } else {
                batch_label(row.asked)
            },
            row.hit_rate.to_string()
        );
        match &row.outcome {
            Ok(m) => {
                let (full, speedup) = match m.full_ms {
                    Some(full) => (
                        format!("{:.1}", full * 1e3),
                        format!("{:.2}x", full / m.step_ms),
                    ),
                    None => ("-".to_owned(), "-".to_owned()),
                };
                let _ = writeln!(
                    text,
                    "{head} {:>6.1}% {:>9.1} {:>9} {:>8} {:>10.2} {:>9.2} {:>9.2}  {}",
                    100.0 * m.actual_hit_rate,
                    m.step_ms * 1e3,
                    full,
                    speedup,
                    m.equivalent_bandwidth / 1e12,
                    m.traffic.hbm_bytes as f64 / 1e6,
                    m.traffic.pcie_bytes as f64 / 1e6,
                    stages_text(&m.stages)
                );
            }
            Err(reason) => {
                let _ = writeln!(text, "{head}  skipped: {reason}");
            }
        }
    }
    text
}

/// The CSV header.
pub const CSV_HEADER: &str = "home,format,context,batch_asked,batch,past_model_fit,hit_rate,actual_hit_rate,step_us,full_attention_us,speedup,equivalent_tb_per_s,full_kv_bytes,hbm_bytes,pcie_bytes,stages,skipped";

/// A CSV field, quoted when it holds a comma, a quote or a line break.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}

/// The rows as CSV (a header line, then one line a row; empty fields where nothing was
/// measured).
pub fn to_csv(rows: &[Row]) -> String {
    let mut text = format!("{CSV_HEADER}\n");
    for row in rows {
        let hit_rate = match row.hit_rate {
            HitRate::Scripted(rate) => rate.to_string(),
            HitRate::AsSelected => "selected".to_owned(),
        };
        let mut fields = vec![
            row.home.name().to_owned(),
            row.format.name().to_owned(),
            row.context.to_string(),
            batch_label(row.asked),
            row.batch.to_string(),
            row.past_model_fit.to_string(),
            hit_rate,
        ];
        match &row.outcome {
            Ok(m) => fields.extend([
                format!("{:.4}", m.actual_hit_rate),
                format!("{:.2}", m.step_ms * 1e3),
                m.full_ms
                    .map_or(String::new(), |f| format!("{:.2}", f * 1e3)),
                m.full_ms
                    .map_or(String::new(), |f| format!("{:.3}", f / m.step_ms)),
                format!("{:.3}", m.equivalent_bandwidth / 1e12),
                m.full_kv_bytes.to_string(),
                m.traffic.hbm_bytes.to_string(),
                m.traffic.pcie_bytes.to_string(),
                stages_text(&m.stages),
                String::new(),
            ]),
            Err(reason) => {
                fields.extend(std::iter::repeat_n(String::new(), 9));
                fields.push(reason.clone());
            }
        }
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        text += &line.join(",");
        text.push('\n');
    }
    text
}

/// The rows as JSON, with the unit, the metric and the ceilings.
pub fn to_json(rows: &[Row], ceilings: Option<&Ceilings>) -> serde_json::Value {
    let finite = |x: f64| x.is_finite().then_some(x);
    serde_json::json!({
        "unit": UNIT,
        "metric": METRIC,
        "ceilings": ceilings.map(|c| serde_json::json!({
            "device_copy_bytes_per_s": c.device_copy,
            "pinned_host_to_device_bytes_per_s": c.pinned_copy,
        })),
        "rows": rows.iter().map(|row| {
            let hit_rate = match row.hit_rate {
                HitRate::Scripted(rate) => serde_json::json!(rate),
                HitRate::AsSelected => serde_json::json!("selected"),
            };
            let mut value = serde_json::json!({
                "home": row.home.name(),
                "format": row.format.name(),
                "context": row.context,
                "batch_asked": batch_label(row.asked),
                "batch": row.batch,
                "past_model_fit": row.past_model_fit,
                "hit_rate": hit_rate,
            });
            match &row.outcome {
                Ok(m) => {
                    value["actual_hit_rate"] = serde_json::json!(m.actual_hit_rate);
                    value["step_us"] = serde_json::json!(m.step_ms * 1e3);
                    value["full_attention_us"] = serde_json::json!(m.full_ms.map(|f| f * 1e3));
                    value["equivalent_bytes_per_s"] =
                        serde_json::json!(finite(m.equivalent_bandwidth));
                    value["full_kv_bytes"] = serde_json::json!(m.full_kv_bytes);
                    value["hbm_bytes"] = serde_json::json!(m.traffic.hbm_bytes);
                    value["pcie_bytes"] = serde_json::json!(m.traffic.pcie_bytes);
                    value["stages"] = stage_spans(&m.stages)
                        .iter()
                        .map(|s| {
                            serde_json::json!({
                                "stage": s.name,
                                "start_us": s.start_us,
                                "end_us": s.end_us,
                            })
                        })
                        .collect();
                }
                Err(reason) => value["skipped"] = serde_json::json!(reason),
            }
            value
        }).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::bandwidth::metric::{equivalent_bandwidth, full_attention_kv_bytes, unit_shape};

    /// Rows like a sweep's: two homes, two batches, contexts 32K to 1M, one skipped.
    pub(crate) fn fake_rows() -> Vec<Row> {
        let mut rows = Vec::new();
        for home in Home::ALL {
            for (context_index, context) in [32_768usize, 122_880, 1 << 20].into_iter().enumerate()
            {
                for batch in [1usize, 16] {
                    for hit_rate in [HitRate::Scripted(0.6), HitRate::AsSelected] {
                        let full_kv_bytes = full_attention_kv_bytes(&unit_shape(batch), context);
                        let step_ms =
                            0.05 * (batch as f64).powf(0.7) * (1.0 + context_index as f64 * 0.2);
                        let outcome = if context == 1 << 20 && batch == 16 {
                            Err("16 sequences do not fit: the model fits 6 (host memory)".into())
                        } else {
                            Ok(Measured {
                                step_ms,
                                actual_hit_rate: 0.6,
                                equivalent_bandwidth: equivalent_bandwidth(full_kv_bytes, step_ms),
                                full_kv_bytes,
                                full_ms: (context < 1 << 20).then_some(step_ms * 20.0),
                                traffic: StepTraffic {
                                    hbm_bytes: 12_000_000,
                                    pcie_bytes: 3_000_000,
                                },
                                stages: vec![
                                    ("select".to_owned(), 20.0),
                                    ("fetch, copy".to_owned(), 60.5),
                                ],
                            })
                        };
                        rows.push(Row {
                            home,
                            format: ValueFormat::Bf16,
                            context,
                            asked: Batch::Sequences(batch),
                            batch,
                            hit_rate,
                            past_model_fit: false,
                            outcome,
                        });
                    }
                }
            }
        }
        rows
    }

    #[test]
    fn csv_has_a_line_per_row_and_quotes_commas() {
        let rows = fake_rows();
        let csv = to_csv(&rows);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines.len(), rows.len() + 1);
        let columns = CSV_HEADER.split(',').count();
        // The stage list holds a comma ("fetch, copy"): one quoted field.
        assert!(
            lines[1].contains("\"select 0.0-20.0; fetch, copy 20.0-60.5\""),
            "{}",
            lines[1]
        );
        assert!(lines[1].starts_with("host,bf16,32768,1,1,false,0.6,0.6000,50.00,1000.00,20.000,"));
        let skipped = lines
            .iter()
            .find(|l| l.contains("do not fit"))
            .expect("a skipped row");
        // Unquoted fields of a skipped row: the seven keys, nine empty, the reason.
        assert_eq!(skipped.split(',').count(), columns);
        assert!(skipped.ends_with("host memory)"), "{skipped}");
        assert!(lines[2].contains(",selected,"), "{}", lines[2]);
    }

    #[test]
    fn json_names_the_metric_and_every_row() {
        let rows = fake_rows();
        let ceilings = Ceilings {
            device_copy: 4.0e12,
            pinned_copy: 55.0e9,
        };
        let json = to_json(&rows, Some(&ceilings));
        assert_eq!(json["metric"], METRIC);
        assert_eq!(
            json["ceilings"]["pinned_host_to_device_bytes_per_s"],
            55.0e9
        );
        let out = json["rows"].as_array().unwrap();
        assert_eq!(out.len(), rows.len());
        assert_eq!(out[0]["hit_rate"], 0.6);
        assert_eq!(out[1]["hit_rate"], "selected");
        assert_eq!(out[0]["stages"][1]["stage"], "fetch, copy");
        assert_eq!(out[0]["stages"][1]["start_us"], 20.0);
        let skipped = out.iter().find(|r| r["skipped"].is_string()).unwrap();
        assert!(skipped["step_us"].is_null());
        let no_full = out
            .iter()
            .find(|r| r["step_us"].is_number() && r["full_attention_us"].is_null());
        assert!(no_full.is_some());
    }

    #[test]
    fn table_prints_figures_and_reasons() {
        let rows = fake_rows();
        let text = table_text(&rows, None);
        assert!(text.starts_with("unit: one layer"));
        assert!(text.contains(METRIC));
        // 16 x 122,880 at 60 us: 8.05 GB / 120 us.
        let row = rows
            .iter()
            .find(|r| r.batch == 16 && r.context == 122_880)
            .unwrap();
        let measured = row.outcome.as_ref().unwrap();
        let shown = format!("{:.2}", measured.equivalent_bandwidth / 1e12);
        assert!(text.contains(&shown), "{shown} in\n{text}");
        assert!(text.contains("skipped: 16 sequences do not fit"));
        assert!(!text.contains("batch*"));
        let mut past = rows.clone();
        past[0].past_model_fit = true;
        let text = table_text(&past, None);
        assert!(text.contains("batch*: past the largest batch"), "{text}");
        assert!(text.contains("     1*"), "{text}");
        assert!(to_csv(&past).lines().nth(1).unwrap().contains(",1,1,true,"));
    }
}
