//! The summary table as people and programs read it: Markdown (with the cost and differences
//! sections), CSV, JSON and the terminal table, all from the same [`SummaryRow`]s. Machine formats
//! keep full precision; human ones round perplexity to two decimals.

use std::fmt::Write as _;

use super::*;

pub(super) fn fmt_ppl(p: Option<f64>) -> String {
    p.map_or_else(|| "—".into(), |p| format!("{p:.2}"))
}

pub(super) fn fmt_delta(d: Option<f64>) -> String {
    d.map_or_else(|| "—".into(), |d| format!("{d:+.2}"))
}

/// "[-0.12, +0.50]": a signed interval (the intervals here are of differences).
pub fn fmt_ci(ci: Option<[f64; 2]>, digits: usize) -> String {
    ci.map_or_else(
        || "—".into(),
        |[lo, hi]| format!("[{lo:+.digits$}, {hi:+.digits$}]"),
    )
}

/// "+1.23 [+0.50, +2.00]", or just the point estimate without an interval.
pub fn fmt_delta_ci(d: Option<f64>, ci: Option<[f64; 2]>, digits: usize) -> String {
    match (d, ci) {
        (None, _) => "—".into(),
        (Some(d), None) => format!("{d:+.digits$}"),
        (Some(d), ci) => format!("{d:+.digits$} {}", fmt_ci(ci, digits)),
    }
}

/// The summary's mark: `best`, `≈ best` (not distinguishable from it), or empty.
pub fn vs_best_mark(v: Option<&str>) -> &'static str {
    match v {
        Some("best") => "best",
        Some("indistinguishable") => "≈ best",
        _ => "",
    }
}

/// The Markdown tables' mark: the summary's, bold, or `worse`.
pub(super) fn md_vs_best(v: Option<&str>) -> String {
    match (v, vs_best_mark(v)) {
        (Some("worse"), _) => "worse".into(),
        (_, "") => String::new(),
        (_, m) => format!("**{m}**"),
    }
}

pub(super) fn fmt_opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "—".into(), |v| v.to_string())
}

/// 124439808 → "124.4M": short enough for a terminal column.
pub fn human_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.2}G", n as f64 / 1e9),
    }
}

/// 83.4 → "1m23s"; a table of minute-to-hour trials reads better than raw seconds.
pub fn human_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "—".into();
    }
    let s = secs.round() as u64;
    if s < 60 {
        format!("{secs:.1}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// Status cell: a failed row carries its reason so the table alone says what went wrong.
pub(super) fn status_cell(r: &SummaryRow) -> String {
    if let (Some(step), Some(TrialState::Stopped)) = (r.stopped_step, trial_state(&r.status)) {
        return format!("stopped@{step}");
    }
    match &r.reason {
        Some(reason) if !is_done(&r.status) => format!("{} ({reason})", r.status),
        _ => r.status.clone(),
    }
}

pub(super) fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// `summary.md`: one Markdown table, then the failure messages (too long for a cell).
pub fn to_markdown(rows: &[SummaryRow]) -> String {
    let mut out = String::new();
    out.push_str(
        "| trial | name | method | status | perplexity | Δ baseline | Δ baseline 95 % CI | vs best | trainable params | total params | train tokens | wall s | device | attempts | reason |\n",
    );
    out.push_str("|---|---|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---|\n");
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            md_escape(&r.trial),
            md_escape(&r.name),
            md_escape(&r.method),
            md_escape(&r.status),
            fmt_ppl(r.perplexity),
            fmt_delta(r.baseline_delta),
            fmt_ci(r.baseline_delta_ci, 2),
            vs_best_mark(r.vs_best.as_deref()),
            fmt_opt(r.trainable_params),
            fmt_opt(r.total_params),
            fmt_opt(r.train_tokens),
            r.wall_seconds
                .map_or_else(|| "—".into(), |w| format!("{w:.1}")),
            md_escape(r.worker.as_deref().unwrap_or("—")),
            r.attempts,
            md_escape(r.reason.as_deref().unwrap_or("")),
        );
    }
    differences_markdown(&mut out, rows);
    cost_markdown(&mut out, rows);
    let failures: Vec<&SummaryRow> = rows.iter().filter(|r| r.message.is_some()).collect();
    if !failures.is_empty() {
        out.push_str("\n## Failures\n\n");
        for r in failures {
            let _ = writeln!(
                out,
                "- **{}** (`{}`): {}: {}",
                md_escape(&r.name),
                r.trial,
                r.reason.as_deref().unwrap_or(&r.status),
                md_escape(r.message.as_deref().unwrap_or(""))
            );
        }
    }
    out
}

/// The "Cost" section of summary.md: what every trial took, over all its attempts. Empty when no
/// trial has an attempt on record.
pub(super) fn cost_markdown(out: &mut String, rows: &[SummaryRow]) {
    use crate::cost::{fmt_money, human_bytes};
    if rows.iter().all(|r| r.cost.device_seconds == 0.0) {
        return;
    }
    out.push_str(
        "\n## Cost\n\n| name | device time | GPU-h | cost | lost to preemption/retries | tokens/s | peak memory |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut total = Vec::new();
    for r in rows {
        let c = &r.cost;
        total.push(c);
        let _ = writeln!(
            out,
            "| {} | {} | {:.3} | {} | {} | {} | {} |",
            md_escape(&r.name),
            human_duration(c.device_seconds),
            c.gpu_hours,
            fmt_money(c.cost),
            lost_cell(c),
            c.tokens_per_s
                .map_or_else(|| "—".into(), |t| format!("{t:.1}")),
            c.peak_memory_bytes.map_or_else(|| "—".into(), human_bytes),
        );
    }
    let t = crate::cost::sum_costs(total);
    let _ = writeln!(
        out,
        "| **all** | {} | {:.3} | {} | {} | | |",
        human_duration(t.device_seconds),
        t.gpu_hours,
        fmt_money(t.cost),
        lost_cell(&t),
    );
    out.push_str(
        "\nDevice time sums every attempt and every device of a gang; cost uses each worker's \
         `--price-per-hour`, else the sweep's `price_per_hour` (— when neither is set). Lost: \
         attempts that were preempted, expired or failed. Tokens/s: training tokens over training \
         wall time; peak memory: the finishing attempt's peak resident set (CPU workers).\n",
    );
}

/// "10m00s (1 attempt, 0.33)": device time and money lost to unfinished attempts, or "—".
pub fn lost_cell(c: &crate::cost::TrialCost) -> String {
    if c.lost_attempts == 0 {
        return "—".into();
    }
    let money = c
        .lost_cost
        .map_or_else(String::new, |m| format!(", {m:.2}"));
    format!(
        "{} ({} attempt{}{money})",
        human_duration(c.lost_device_seconds),
        c.lost_attempts,
        if c.lost_attempts == 1 { "" } else { "s" }
    )
}

/// The "Differences" section of summary.md: every Δ against the baseline and the best trial with
/// its paired bootstrap interval, in perplexity and in loss. Empty when no row has a reference.
pub(super) fn differences_markdown(out: &mut String, rows: &[SummaryRow]) {
    let shown: Vec<&SummaryRow> = rows
        .iter()
        .filter(|r| r.best_trial.is_some() || r.baseline_delta.is_some())
        .collect();
    if shown.is_empty() {
        return;
    }
    let name_of = |id: &str| {
        rows.iter()
            .find(|r| r.trial == id)
            .map_or(id.to_string(), |r| r.name.clone())
    };
    let bests: Vec<String> = {
        let mut b: Vec<String> = shown
            .iter()
            .filter_map(|r| r.best_trial.as_deref())
            .map(name_of)
            .collect();
        b.dedup();
        b
    };
    let _ = write!(
        out,
        "\n## Differences with 95 % intervals\n\n\
         Δ = this trial − the reference. Intervals: paired bootstrap over the validation windows \
         (the same windows for every trial on the same data, context and tokenizer; {} resamples, \
         fixed seed). Best: {}. **≈ best**: the interval of Δ perplexity against the best contains 0, \
         so this validation set does not tell the two apart.\n\n",
        stats::BOOTSTRAP_RESAMPLES,
        if bests.is_empty() {
            "—".to_string()
        } else {
            bests.iter().map(|b| md_escape(b)).collect::<Vec<_>>().join(", ")
        },
    );
    out.push_str(
        "| name | windows | Δ ppl vs baseline | Δ loss vs baseline | Δ ppl vs best | Δ loss vs best | vs best |\n\
         |---|---:|---:|---:|---:|---:|---|\n",
    );
    for r in &shown {
        let mark = md_vs_best(r.vs_best.as_deref());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            md_escape(&r.name),
            fmt_opt(r.valid_windows),
            fmt_delta_ci(r.baseline_delta, r.baseline_delta_ci, 2),
            fmt_delta_ci(r.baseline_loss_delta, r.baseline_loss_delta_ci, 4),
            fmt_delta_ci(r.best_delta, r.best_delta_ci, 2),
            fmt_delta_ci(r.best_loss_delta, r.best_loss_delta_ci, 4),
            mark,
        );
    }
    let notes: Vec<&SummaryRow> = shown
        .iter()
        .copied()
        .filter(|r| r.interval_note.is_some())
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        for r in notes {
            let _ = writeln!(
                out,
                "- {}: {}",
                md_escape(&r.name),
                md_escape(r.interval_note.as_deref().unwrap_or(""))
            );
        }
    }
}

pub(super) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub(super) fn csv_opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(String::new, |v| v.to_string())
}

/// Header of `summary.csv`, in column order.
pub const CSV_COLUMNS: [&str; 46] = [
    "trial",
    "name",
    "method",
    "status",
    "perplexity",
    "baseline_delta",
    "valid_loss",
    "trainable_params",
    "total_params",
    "train_tokens",
    "steps",
    "wall_seconds",
    "attempts",
    "reason",
    "message",
    "worker",
    "seed",
    "valid_windows",
    "baseline_delta_lo",
    "baseline_delta_hi",
    "baseline_loss_delta",
    "baseline_loss_delta_lo",
    "baseline_loss_delta_hi",
    "best_trial",
    "best_delta",
    "best_delta_lo",
    "best_delta_hi",
    "best_loss_delta",
    "best_loss_delta_lo",
    "best_loss_delta_hi",
    "vs_best",
    "interval_note",
    "device_seconds",
    "gpu_hours",
    "cost",
    "lost_device_seconds",
    "lost_attempts",
    "lost_cost",
    "tokens_per_s",
    "peak_memory_bytes",
    "arm",
    "role",
    "lr",
    "weight_decay",
    "stopped_step",
    "stopped_loss",
];

/// `summary.csv`: full-precision numbers (Rust's shortest round-trip form); empty cells for
/// missing values.
pub fn to_csv(rows: &[SummaryRow]) -> String {
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for r in rows {
        let cells = [
            csv_field(&r.trial),
            csv_field(&r.name),
            csv_field(&r.method),
            csv_field(&r.status),
            csv_opt(r.perplexity),
            csv_opt(r.baseline_delta),
            csv_opt(r.valid_loss),
            csv_opt(r.trainable_params),
            csv_opt(r.total_params),
            csv_opt(r.train_tokens),
            csv_opt(r.steps),
            csv_opt(r.wall_seconds),
            r.attempts.to_string(),
            csv_field(r.reason.as_deref().unwrap_or("")),
            csv_field(r.message.as_deref().unwrap_or("")),
            csv_field(r.worker.as_deref().unwrap_or("")),
            csv_opt(r.seed),
            csv_opt(r.valid_windows),
            csv_opt(r.baseline_delta_ci.map(|c| c[0])),
            csv_opt(r.baseline_delta_ci.map(|c| c[1])),
            csv_opt(r.baseline_loss_delta),
            csv_opt(r.baseline_loss_delta_ci.map(|c| c[0])),
            csv_opt(r.baseline_loss_delta_ci.map(|c| c[1])),
            csv_field(r.best_trial.as_deref().unwrap_or("")),
            csv_opt(r.best_delta),
            csv_opt(r.best_delta_ci.map(|c| c[0])),
            csv_opt(r.best_delta_ci.map(|c| c[1])),
            csv_opt(r.best_loss_delta),
            csv_opt(r.best_loss_delta_ci.map(|c| c[0])),
            csv_opt(r.best_loss_delta_ci.map(|c| c[1])),
            csv_field(r.vs_best.as_deref().unwrap_or("")),
            csv_field(r.interval_note.as_deref().unwrap_or("")),
            csv_opt(Some(r.cost.device_seconds)),
            csv_opt(Some(r.cost.gpu_hours)),
            csv_opt(r.cost.cost),
            csv_opt(Some(r.cost.lost_device_seconds)),
            csv_opt(Some(r.cost.lost_attempts)),
            csv_opt(r.cost.lost_cost),
            csv_opt(r.cost.tokens_per_s),
            csv_opt(r.cost.peak_memory_bytes),
            csv_field(r.arm.as_deref().unwrap_or("")),
            csv_field(r.role.as_deref().unwrap_or("")),
            csv_opt(r.lr),
            csv_opt(r.weight_decay),
            csv_opt(r.stopped_step),
            csv_opt(r.stopped_loss),
        ];
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// `summary.json`: an array of [`SummaryRow`] objects (nulls for missing values).
pub fn to_json(rows: &[SummaryRow]) -> String {
    // NaN cannot be written as JSON; serde_json turns it into null, which is what we want.
    serde_json::to_string_pretty(rows).expect("summary rows serialise") + "\n"
}

/// The table printed to stdout at the end of `ablate run` and by `ablate status`.
pub fn to_terminal_table(rows: &[SummaryRow]) -> String {
    let header = [
        "trial",
        "method",
        "status",
        "perplexity",
        "Δ baseline",
        "vs best",
        "trainable",
        "wall",
    ];
    let body: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.method.clone(),
                status_cell(r),
                fmt_ppl(r.perplexity),
                fmt_delta(r.baseline_delta),
                vs_best_mark(r.vs_best.as_deref()).to_string(),
                r.trainable_params.map_or_else(|| "—".into(), human_count),
                r.wall_seconds.map_or_else(|| "—".into(), human_duration),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &body {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Numbers right-aligned, text left-aligned.
    let right = [false, false, false, true, true, false, true, true];
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                s.push_str("  ");
            }
            if right[i] {
                s.push_str(&" ".repeat(pad));
                s.push_str(cell);
            } else {
                s.push_str(cell);
                if i + 1 < cells.len() {
                    s.push_str(&" ".repeat(pad));
                }
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&header.map(String::from));
    let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    out.push_str(&"─".repeat(total));
    out.push('\n');
    for row in &body {
        out.push_str(&line(row));
    }
    out
}
