//! The evaluation's results and the reports made of them: a markdown table (task x mode,
//! full attention's score beside each, where each task first falls off), the per-layer hit
//! rates and recall, and JSON with everything. The heatmaps are drawn by the CLI.
use std::collections::HashSet;

use serde_json::{json, Value};

use super::{Summary, Task};
use crate::ShadowKvParams;

/// How far below full attention (in points) a task's average may fall before it counts as
/// falling off.
pub const FALL_OFF_POINTS: f64 = 1.0;

/// How far below full attention (in points) one (length, depth) cell may fall.
pub const CELL_POINTS: f64 = 2.0;

/// One attention mode of the grid: full attention, or a ShadowKV setting.
#[derive(Clone, Debug, PartialEq)]
pub struct Mode {
    /// ShadowKV's parameters; `None` for full attention.
    pub shadowkv: Option<ShadowKvParams>,
    /// The values' format (`bf16`, `fp8`, `int4`).
    pub value_format: String,
    /// Where the values live: `host` or `gpu`.
    pub values: String,
}

impl Mode {
    /// Full attention.
    pub fn full() -> Mode {
        Mode {
            shadowkv: None,
            value_format: "bf16".into(),
            values: "gpu".into(),
        }
    }

    /// A short label: `full`, or `S<budget> r<rank> c<chunk> o<outliers> <format> <values>`.
    pub fn label(&self) -> String {
        match &self.shadowkv {
            None => "full".into(),
            Some(p) => format!(
                "S{} r{} c{} o{} {} {}",
                p.sparse_budget,
                p.rank,
                p.chunk_size,
                p.outlier_chunks,
                self.value_format,
                self.values
            ),
        }
    }

    fn json(&self) -> Value {
        json!({
            "label": self.label(),
            "attention": if self.shadowkv.is_some() { "shadowkv" } else { "full" },
            "sparse_budget": self.shadowkv.map(|p| p.sparse_budget),
            "rank": self.shadowkv.map(|p| p.rank),
            "chunk_size": self.shadowkv.map(|p| p.chunk_size),
            "outlier_chunks": self.shadowkv.map(|p| p.outlier_chunks),
            "local_chunks": self.shadowkv.map(|p| p.local_chunks),
            "value_format": self.value_format,
            "values": self.values,
        })
    }
}

/// One prompt answered in one mode.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub task: Task,
    /// The context length asked for.
    pub length: usize,
    /// The prompt's tokens (at most `length`).
    pub prompt_tokens: usize,
    /// The needle's depth (0 to 1), for needle tasks.
    pub depth: Option<f64>,
    /// The sample's index among those of its (task, length, depth).
    pub sample: usize,
    /// Index into [`Report::modes`].
    pub mode: usize,
    /// 0 to 1.
    pub score: f64,
    /// The model's answer (after the answer prefix).
    pub answer: String,
    /// ShadowKV: per layer, the hit rate between decode steps (empty where not measured).
    pub hit_rates: Vec<Summary>,
    /// ShadowKV on the CPU path: per layer, the attention recall of the decode steps.
    pub recalls: Vec<Summary>,
}

/// Every outcome of an evaluation, with what it ran on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    pub model: String,
    pub device: String,
    /// What was and was not measured (e.g. recall only on the CPU path).
    pub notes: Vec<String>,
    pub modes: Vec<Mode>,
    pub outcomes: Vec<Outcome>,
}

fn percent(score: Option<f64>) -> String {
    score.map_or("-".into(), |s| format!("{s:.1}"))
}

impl Report {
    /// The tasks present, in [`Task::ALL`]'s order.
    pub fn tasks(&self) -> Vec<Task> {
        let mut tasks: Vec<Task> = self.outcomes.iter().map(|o| o.task).collect();
        tasks.sort_unstable();
        tasks.dedup();
        tasks
    }

    /// The index of the full-attention mode, if run.
    pub fn full_mode(&self) -> Option<usize> {
        self.modes.iter().position(|m| m.shadowkv.is_none())
    }

    /// The mean score in percent of the outcomes `keep` selects (`None` for none).
    pub fn average(&self, keep: impl Fn(&Outcome) -> bool) -> Option<f64> {
        let scores: Vec<f64> = self
            .outcomes
            .iter()
            .filter(|o| keep(o))
            .map(|o| o.score)
            .collect();
        (!scores.is_empty()).then(|| 100.0 * scores.iter().sum::<f64>() / scores.len() as f64)
    }

    /// `task`'s mean score in percent in `mode`.
    pub fn task_score(&self, task: Task, mode: usize) -> Option<f64> {
        self.average(|o| o.task == task && o.mode == mode)
    }

    /// Full attention's mean score in percent on the prompts `mode` answered (of `task`, or
    /// of every task): the reference `mode` is compared with, over the same prompts (a mode
    /// skips the prompts too short for its budget).
    pub fn full_score_beside(&self, task: Option<Task>, mode: usize) -> Option<f64> {
        let full = self.full_mode()?;
        let key = |o: &Outcome| (o.task, o.length, o.depth.map(f64::to_bits), o.sample);
        let answered: HashSet<_> = self
            .outcomes
            .iter()
            .filter(|o| o.mode == mode && task.is_none_or(|t| o.task == t))
            .map(key)
            .collect();
        self.average(|o| o.mode == full && answered.contains(&key(o)))
    }

    /// The first ShadowKV mode (in the grid's order, most generous first) whose average on
    /// `task` is more than [`FALL_OFF_POINTS`] below full attention's on the same prompts.
    pub fn falloff(&self, task: Task) -> Option<usize> {
        (0..self.modes.len()).find(|&m| {
            self.modes[m].shadowkv.is_some()
                && match (
                    self.task_score(task, m),
                    self.full_score_beside(Some(task), m),
                ) {
                    (Some(score), Some(full)) => score < full - FALL_OFF_POINTS,
                    _ => false,
                }
        })
    }

    /// The heatmap of `mode` over the needle tasks: context lengths and depths (ascending),
    /// and per (length, depth) the mean score in percent.
    pub fn cells(&self, mode: usize) -> (Vec<usize>, Vec<f64>, Vec<Vec<Option<f64>>>) {
        let needles = || self.outcomes.iter().filter(|o| o.depth.is_some());
        let mut lengths: Vec<usize> = needles().map(|o| o.length).collect();
        lengths.sort_unstable();
        lengths.dedup();
        let mut depths: Vec<f64> = needles().filter_map(|o| o.depth).collect();
        depths.sort_by(f64::total_cmp);
        depths.dedup();
        let grid = lengths
            .iter()
            .map(|&length| {
                depths
                    .iter()
                    .map(|&depth| {
                        self.average(|o| {
                            o.mode == mode && o.length == length && o.depth == Some(depth)
                        })
                    })
                    .collect()
            })
            .collect();
        (lengths, depths, grid)
    }

    /// `mode`'s largest drop below full attention over the (length, depth) cells, in points,
    /// with its cell.
    pub fn worst_cell(&self, mode: usize) -> Option<(f64, usize, f64)> {
        let full = self.full_mode()?;
        let (lengths, depths, grid) = self.cells(mode);
        let (_, _, full_grid) = self.cells(full);
        let mut worst: Option<(f64, usize, f64)> = None;
        for (l, row) in grid.iter().enumerate() {
            for (d, cell) in row.iter().enumerate() {
                if let (Some(score), Some(reference)) = (cell, full_grid[l][d]) {
                    let gap = reference - score;
                    if worst.is_none_or(|w| gap > w.0) {
                        worst = Some((gap, lengths[l], depths[d]));
                    }
                }
            }
        }
        worst
    }

    /// Whether `mode` is within [`FALL_OFF_POINTS`] of full attention on every task's average
    /// and within [`CELL_POINTS`] at every (length, depth) cell of the needle tasks.
    pub fn meets_goal(&self, mode: usize) -> Option<bool> {
        self.full_mode()?;
        let tasks_hold = self.tasks().into_iter().all(|task| {
            match (
                self.task_score(task, mode),
                self.full_score_beside(Some(task), mode),
            ) {
                (Some(score), Some(full)) => score >= full - FALL_OFF_POINTS,
                _ => true,
            }
        });
        let cells_hold = self
            .worst_cell(mode)
            .is_none_or(|(gap, _, _)| gap <= CELL_POINTS);
        Some(tasks_hold && cells_hold)
    }

    /// `mode`'s per-layer hit rates and recalls, pooled over its outcomes.
    pub fn layer_summaries(&self, mode: usize) -> (Vec<Summary>, Vec<Summary>) {
        let pool = |pick: fn(&Outcome) -> &Vec<Summary>| -> Vec<Summary> {
            let ours: Vec<&Outcome> = self.outcomes.iter().filter(|o| o.mode == mode).collect();
            let layers = ours.iter().map(|o| pick(o).len()).max().unwrap_or(0);
            (0..layers)
                .map(|l| {
                    let parts: Vec<Summary> = ours
                        .iter()
                        .filter_map(|o| pick(o).get(l).copied())
                        .collect();
                    Summary::pool(&parts)
                })
                .collect()
        };
        (pool(|o| &o.hit_rates), pool(|o| &o.recalls))
    }

    /// The markdown report.
    pub fn markdown(&self) -> String {
        let mut md = format!("# ShadowKV accuracy: {}\n\n", self.model);
        let mut lengths: Vec<usize> = self.outcomes.iter().map(|o| o.length).collect();
        lengths.sort_unstable();
        lengths.dedup();
        md += &format!(
            "{}; {} answers over {} modes; context lengths {:?} tokens.\n\n",
            self.device,
            self.outcomes.len(),
            self.modes.len(),
            lengths
        );
        for note in &self.notes {
            md += &format!("- {note}\n");
        }
        let full = self.full_mode();
        let tasks = self.tasks();
        md += "\n## Score by task\n\nExact match in percent (partial credit for multi-answer \
               tasks); full attention's score on the same prompts in parentheses.\n\n| task |";
        for mode in &self.modes {
            md += &format!(" {} |", mode.label());
        }
        md += "\n|---|";
        md += &"---:|".repeat(self.modes.len());
        md += "\n";
        let row = |name: &str, task: Option<Task>| {
            let mut line = format!("| {name} |");
            for m in 0..self.modes.len() {
                let score = match task {
                    Some(t) => self.task_score(t, m),
                    None => self.average(|o| o.mode == m),
                };
                if Some(m) == full {
                    line += &format!(" {} |", percent(score));
                } else {
                    let beside = self.full_score_beside(task, m);
                    line += &format!(" {} ({}) |", percent(score), percent(beside));
                }
            }
            line + "\n"
        };
        for &task in &tasks {
            md += &row(task.name(), Some(task));
        }
        md += &row("**average**", None);
        if full.is_some() {
            md += &format!(
                "\n## Where each task falls off\n\nThe first ShadowKV setting, in the grid's \
                 order (most generous first), more than {FALL_OFF_POINTS} point below full \
                 attention on the task's average.\n\n| task | falls off at | score | full |\n\
                 |---|---|---:|---:|\n"
            );
            for &task in &tasks {
                match self.falloff(task) {
                    Some(m) => {
                        md += &format!(
                            "| {} | {} | {} | {} |\n",
                            task.name(),
                            self.modes[m].label(),
                            percent(self.task_score(task, m)),
                            percent(self.full_score_beside(Some(task), m))
                        )
                    }
                    None => {
                        md += &format!(
                            "| {} | never | - | {} |\n",
                            task.name(),
                            percent(full.and_then(|f| self.task_score(task, f)))
                        )
                    }
                }
            }
        }
        md += "\n## Per mode: worst (length, depth) cell and per-layer diagnostics\n\n\
               Gap: points below full attention at the needle tasks' worst cell. Hit rate: share \
               of the selected chunks the step before selected too. Recall: share of full \
               attention's probability mass on the tokens ShadowKV attends.\n\n\
               Goal: every task's average within 1 point of full attention and every cell within \
               2 points.\n\n\
               | mode | goal | worst cell (gap) | hit rate | recall | lowest-recall layer |\n\
               |---|---|---|---:|---:|---|\n";
        for (m, mode) in self.modes.iter().enumerate() {
            if mode.shadowkv.is_none() {
                continue;
            }
            let worst = self
                .worst_cell(m)
                .map_or("-".into(), |(gap, length, depth)| {
                    format!("{length} tokens, depth {:.0}% ({gap:+.1})", depth * 100.0)
                });
            let (hits, recalls) = self.layer_summaries(m);
            let mean = |s: &[Summary]| {
                let pooled = Summary::pool(s);
                if pooled.count == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.1}%", 100.0 * pooled.mean)
                }
            };
            let lowest = recalls
                .iter()
                .enumerate()
                .filter(|(_, s)| s.count > 0)
                .min_by(|a, b| a.1.mean.total_cmp(&b.1.mean))
                .map_or("-".into(), |(l, s)| {
                    format!(
                        "layer {l}: {:.1}% (min {:.1}%)",
                        100.0 * s.mean,
                        100.0 * s.min
                    )
                });
            let goal = match self.meets_goal(m) {
                Some(true) => "met",
                Some(false) => "missed",
                None => "-",
            };
            md += &format!(
                "| {} | {goal} | {worst} | {} | {} | {lowest} |\n",
                mode.label(),
                mean(&hits),
                mean(&recalls)
            );
        }
        md
    }

    /// Everything, as JSON: the modes, every outcome, and the summaries of the markdown.
    pub fn json(&self) -> Value {
        let summaries = |s: &[Summary]| -> Value {
            s.iter()
                .map(|s| json!({"mean": s.mean, "min": s.min, "steps": s.count}))
                .collect()
        };
        let tasks = self.tasks();
        let modes: Vec<Value> = self
            .modes
            .iter()
            .enumerate()
            .map(|(m, mode)| {
                let (hits, recalls) = self.layer_summaries(m);
                let mut value = mode.json();
                value["task_scores"] = tasks
                    .iter()
                    .map(|&t| (t.name().to_owned(), json!(self.task_score(t, m))))
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                value["average"] = json!(self.average(|o| o.mode == m));
                value["full_average_beside"] = json!(self.full_score_beside(None, m));
                value["meets_goal"] = json!(self.meets_goal(m));
                value["worst_cell"] = json!(self.worst_cell(m).map(|(gap, length, depth)| {
                    json!({"gap_points": gap, "length": length, "depth": depth})
                }));
                value["layers"] = json!({
                    "hit_rate": summaries(&hits),
                    "recall": summaries(&recalls),
                });
                value
            })
            .collect();
        let outcomes: Vec<Value> = self
            .outcomes
            .iter()
            .map(|o| {
                json!({
                    "task": o.task.name(),
                    "length": o.length,
                    "prompt_tokens": o.prompt_tokens,
                    "depth": o.depth,
                    "sample": o.sample,
                    "mode": self.modes[o.mode].label(),
                    "score": o.score,
                    "answer": o.answer,
                    "hit_rate": summaries(&o.hit_rates),
                    "recall": summaries(&o.recalls),
                })
            })
            .collect();
        let falloff: serde_json::Map<String, Value> = tasks
            .iter()
            .map(|&t| {
                let mode = self.falloff(t).map(|m| self.modes[m].label());
                (t.name().to_owned(), json!(mode))
            })
            .collect();
        json!({
            "model": self.model,
            "device": self.device,
            "notes": self.notes,
            "fall_off_points": FALL_OFF_POINTS,
            "falloff": falloff,
            "modes": modes,
            "outcomes": outcomes,
        })
    }
}
