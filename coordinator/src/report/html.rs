//! `report.html`: the whole comparison report as one self-contained page (inline CSS and SVG, no
//! script, no network), readable in any browser and printable to PDF for a paper draft.
//!
//! Sections, in order: the summary table (every trial, failures with their reason), the table
//! across seeds (when a sweep has repeats), final perplexity against the baseline as bars, loss
//! curves overlaid per method family, sample generations grouped by prompt, then every trial's
//! exact resolved config and environment, and the sweep file as submitted. Everything comes from
//! the same [`SummaryRow`]s and events as the Markdown/CSV/JSON files.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use experiments::trial::Progress;

use super::plots::{self, Curve};
use crate::report::{
    fmt_ci, fmt_mean_std, human_count, human_duration, is_done, losses_by_step, trial_state,
    vs_best_mark, AggregateRow, ReportMeta, SummaryRow, TrialEvents, TrialRecord,
};
use crate::scheduler::TrialState;

/// Escape text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Unix ms → "2026-11-23 09:21:43 UTC" (proleptic Gregorian, no time-zone database needed).
pub fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        tod / 3600,
        (tod % 3600) / 60,
        tod % 60
    )
}

const CSS: &str = r#"
:root { --fg:#1d232b; --muted:#5b6673; --line:#d8dde3; --bg-alt:#f5f7f9; --accent:#0072b2; --bad:#b42318; --good:#067647; }
* { box-sizing: border-box; }
body { font-family: -apple-system, "Segoe UI", "DejaVu Sans", "Liberation Sans", Helvetica, Arial, sans-serif;
       color: var(--fg); margin: 0 auto; padding: 24px 28px 64px; max-width: 1260px; line-height: 1.45; font-size: 15px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 22px 0 8px; }
p.meta, .muted { color: var(--muted); }
p.meta { margin: 0 0 8px; }
nav { margin: 10px 0 0; font-size: 14px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; }
.counts span { display: inline-block; margin-right: 14px; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 6px; text-align: left; vertical-align: top; }
th { background: var(--bg-alt); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
tr.failed td { background: #fff4f3 !important; }
td.status-failed, td.status-cancelled { color: var(--bad); font-weight: 600; }
td.status-finished { color: var(--good); }
td.best { font-weight: 700; }
code, pre { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 12.5px; }
code.id { color: var(--muted); }
pre { background: var(--bg-alt); border: 1px solid var(--line); padding: 10px; overflow-x: auto; white-space: pre-wrap; }
figure { margin: 14px 0 22px; }
figure svg { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
.sample { white-space: pre-wrap; font-family: Georgia, "DejaVu Serif", serif; font-size: 14px; }
.sample b { background: #e8f1f8; font-weight: 600; }
details { border: 1px solid var(--line); border-radius: 4px; margin: 8px 0; padding: 6px 10px; }
details > summary { cursor: pointer; font-weight: 600; }
dl.env { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0; font-size: 13.5px; }
dl.env dt { color: var(--muted); }
dl.env dd { margin: 0; }
ul.failures li { margin-bottom: 4px; }
@media print { body { max-width: none; padding: 0; } details { break-inside: avoid; } nav { display: none; } }
"#;

fn opt_num(v: Option<f64>, digits: usize) -> String {
    v.filter(|x| x.is_finite())
        .map_or_else(|| "—".into(), |x| format!("{x:.digits$}"))
}

fn delta_cell(d: Option<f64>) -> String {
    match d {
        Some(d) if d.is_finite() => format!("{d:+.2}"),
        _ => "—".into(),
    }
}

fn params_cell(r: &SummaryRow) -> String {
    match (r.trainable_params, r.total_params) {
        (Some(t), Some(n)) if n > 0 => format!(
            "{} / {} ({:.0}%)",
            human_count(t),
            human_count(n),
            100.0 * t as f64 / n as f64
        ),
        (Some(t), _) => human_count(t),
        _ => "—".into(),
    }
}

/// The summary table: one row per trial, in the order of the Markdown table.
fn summary_table(out: &mut String, rows: &[SummaryRow]) {
    let best = rows
        .iter()
        .filter(|r| r.method != "pretrain" && is_done(&r.status))
        .filter_map(|r| r.perplexity)
        .filter(|p| p.is_finite())
        .fold(f64::INFINITY, f64::min);
    out.push_str(
        "<div class=\"wide\"><table id=\"summary-table\"><thead><tr><th>trial</th><th>method</th><th>status</th>\
         <th class=\"num\">perplexity</th><th class=\"num\">Δ baseline (95 % CI)</th><th>vs best</th>\
         <th class=\"num\">valid loss</th><th class=\"num\">trainable / total params</th>\
         <th class=\"num\">tokens seen</th><th class=\"num\">steps</th><th class=\"num\">wall time</th>\
         <th>device</th><th class=\"num\">attempts</th></tr></thead><tbody>\n",
    );
    for r in rows {
        let done = is_done(&r.status);
        let status = match &r.reason {
            Some(reason) if !done => format!("{} ({})", esc(&r.status), esc(reason)),
            _ => esc(&r.status),
        };
        let best_cls = if r.perplexity == Some(best) && r.method != "pretrain" {
            " best"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "<tr class=\"{cls}\" data-trial=\"{id}\"><td>{name}<br><code class=\"id\">{id}</code></td>\
             <td>{method}</td><td class=\"status-{state}\">{status}</td>\
             <td class=\"num{best_cls}\">{ppl}</td><td class=\"num\">{delta}</td><td class=\"vs-best\">{vs_best}</td><td class=\"num\">{vl}</td>\
             <td class=\"num\">{params}</td><td class=\"num\">{tokens}</td><td class=\"num\">{steps}</td>\
             <td class=\"num\">{wall}</td><td>{device}</td><td class=\"num\">{attempts}</td></tr>",
            cls = if done { "done".to_string() } else { esc(&r.status) }.replace(' ', "-"),
            id = esc(&r.trial),
            name = esc(&r.name),
            method = esc(&r.method),
            state = esc(&r.status),
            ppl = opt_num(r.perplexity, 2),
            delta = match r.baseline_delta_ci {
                Some(_) => format!(
                    "{}<br><small>{}</small>",
                    delta_cell(r.baseline_delta),
                    fmt_ci(r.baseline_delta_ci, 2)
                ),
                None => delta_cell(r.baseline_delta),
            },
            vs_best = match r.vs_best.as_deref() {
                Some("best") => "<b>best</b>".to_string(),
                Some("indistinguishable") => format!("≈ best<br><small>{}</small>", fmt_ci(r.best_delta_ci, 2)),
                Some("worse") => format!("{}<br><small>{}</small>", delta_cell(r.best_delta), fmt_ci(r.best_delta_ci, 2)),
                _ => String::new(),
            },
            vl = opt_num(r.valid_loss, 4),
            params = params_cell(r),
            tokens = r.train_tokens.map_or_else(|| "—".into(), human_count),
            steps = r.steps.map_or_else(|| "—".into(), |s| s.to_string()),
            wall = r.wall_seconds.map_or_else(|| "—".into(), human_duration),
            device = esc(r.worker.as_deref().unwrap_or("—")),
            attempts = r.attempts,
        );
    }
    out.push_str("</tbody></table></div>\n");
    if rows
        .iter()
        .any(|r| r.baseline_delta_ci.is_some() || r.best_delta_ci.is_some())
    {
        out.push_str(
            "<p class=\"muted\">95 % intervals: paired bootstrap over the validation windows \
             (the same windows for every trial on the same data, context and tokenizer; fixed seed). \
             ≈ best: the interval of Δ perplexity against the best trial contains 0.</p>\n",
        );
    }
    let failures: Vec<&SummaryRow> = rows
        .iter()
        .filter(|r| !is_done(&r.status) && (r.reason.is_some() || r.message.is_some()))
        .collect();
    if !failures.is_empty() {
        out.push_str("<h3>Failures</h3><ul class=\"failures\">\n");
        for r in failures {
            let _ = writeln!(
                out,
                "<li><b>{}</b> <code class=\"id\">{}</code> — {}: {}</li>",
                esc(&r.name),
                esc(&r.trial),
                esc(r.reason.as_deref().unwrap_or(&r.status)),
                esc(r.message.as_deref().unwrap_or("")),
            );
        }
        out.push_str("</ul>\n");
    }
}

fn aggregate_table(out: &mut String, rows: &[AggregateRow]) {
    out.push_str(
        "<table id=\"seed-table\"><thead><tr><th>configuration</th><th>method</th><th>seeds</th>\
         <th class=\"num\">finished</th><th class=\"num\">perplexity (mean ± std)</th>\
         <th class=\"num\">Δ baseline (mean ± std)</th><th class=\"num\">Δ best arm (mean ± std, 95 % CI)</th>\
         <th>vs best</th><th class=\"num\">mean wall time</th></tr></thead><tbody>\n",
    );
    for r in rows {
        let seeds: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}/{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
            esc(&r.name),
            esc(&r.method),
            esc(&seeds.join(", ")),
            r.finished,
            r.trials.len(),
            fmt_mean_std(r.perplexity_mean, r.perplexity_std, false),
            fmt_mean_std(r.baseline_delta_mean, r.baseline_delta_std, true),
            match r.best_delta_ci {
                Some(_) => format!(
                    "{}<br><small>{}</small>",
                    fmt_mean_std(r.best_delta_mean, r.best_delta_std, true),
                    fmt_ci(r.best_delta_ci, 2)
                ),
                None => fmt_mean_std(r.best_delta_mean, r.best_delta_std, true),
            },
            vs_best_mark(r.vs_best.as_deref()),
            r.wall_seconds_mean.map_or_else(|| "—".into(), human_duration),
        );
    }
    out.push_str(
        "</tbody></table>\n<p class=\"muted\">Standard deviation over seeds (n − 1); 95 % intervals: \
         Student t over the seeds, Δ best arm paired by seed; ≈ best: the interval contains 0.</p>\n",
    );
}

/// Device time, GPU-hours, money, time lost to preemption and retries, throughput and peak memory
/// of every trial, with the sweep's total.
fn cost_table(out: &mut String, rows: &[SummaryRow]) {
    use crate::cost::{fmt_money, human_bytes, sum_costs};
    out.push_str(
        "<table id=\"cost-table\"><thead><tr><th>trial</th><th class=\"num\">device time</th>\
         <th class=\"num\">GPU-h</th><th class=\"num\">cost</th>\
         <th class=\"num\">lost to preemption / retries</th><th class=\"num\">tokens/s</th>\
         <th class=\"num\">peak memory</th></tr></thead><tbody>\n",
    );
    let lost = crate::report::lost_cell;
    for r in rows {
        let c = &r.cost;
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{:.3}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td></tr>",
            esc(&r.name),
            human_duration(c.device_seconds),
            c.gpu_hours,
            fmt_money(c.cost),
            esc(&lost(c)),
            c.tokens_per_s
                .map_or_else(|| "—".into(), |t| format!("{t:.1}")),
            c.peak_memory_bytes.map_or_else(|| "—".into(), human_bytes),
        );
    }
    let t = sum_costs(rows.iter().map(|r| &r.cost));
    let _ = writeln!(
        out,
        "<tr><td><b>all</b></td><td class=\"num\">{}</td><td class=\"num\">{:.3}</td>\
         <td class=\"num\">{}</td><td class=\"num\">{}</td><td></td><td></td></tr>",
        human_duration(t.device_seconds),
        t.gpu_hours,
        fmt_money(t.cost),
        esc(&lost(&t)),
    );
    out.push_str(
        "</tbody></table>\n<p class=\"muted\">Device time sums every attempt and every device of a \
         gang. Cost: each worker's <code>--price-per-hour</code>, else the sweep's \
         <code>price_per_hour</code>. Lost: attempts preempted, expired or failed. Tokens/s over \
         training wall time; peak memory of the finishing attempt (CPU resident set).</p>\n",
    );
}

/// The bar chart of fine-tuned perplexity against the baseline (pretrain stages are on other
/// text and left out).
fn perplexity_figure(out: &mut String, rows: &[SummaryRow]) {
    let bars: Vec<(String, f64)> = rows
        .iter()
        .filter(|r| r.method != "pretrain" && r.method != "baseline" && is_done(&r.status))
        .filter_map(|r| Some((r.name.clone(), r.perplexity?)))
        .collect();
    if bars.is_empty() {
        return;
    }
    let baseline = rows
        .iter()
        .find(|r| r.method == "baseline" && is_done(&r.status))
        .and_then(|r| r.perplexity);
    match plots::perplexity_bars("Final validation perplexity", &bars, baseline, 900) {
        Ok(svg) => {
            let _ = writeln!(
                out,
                "<figure id=\"perplexity-figure\">{svg}<figcaption>Validation perplexity of every finished \
                 fine-tuning trial{}; the best one is dark.</figcaption></figure>",
                if baseline.is_some() {
                    ", with the untrained baseline as the dashed line"
                } else {
                    ""
                }
            );
        }
        Err(e) => {
            let _ = writeln!(out, "<p class=\"muted\">{}</p>", esc(&e));
        }
    }
}

/// Loss curves, one chart per method family.
fn curves_section(out: &mut String, rows: &[SummaryRow], events: &[TrialEvents]) {
    let by_id: BTreeMap<&str, &TrialEvents> = events.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut families: Vec<(String, Vec<Curve>)> = Vec::new();
    for r in rows {
        let Some(ev) = by_id.get(r.trial.as_str()) else {
            continue;
        };
        let mut c = Curve {
            label: r.name.clone(),
            ..Curve::default()
        };
        for (step, (train, valid)) in losses_by_step(ev) {
            if let Some(t) = train {
                c.train.push((step as f64, t));
            }
            if let Some(v) = valid {
                c.valid.push((step as f64, v));
            }
        }
        // A trial that did not train (the baseline: one evaluation at step 0) has no curve.
        if c.train.len() < 2 && c.valid.len() < 2 {
            continue;
        }
        match families.iter_mut().find(|(f, _)| *f == r.method) {
            Some((_, cs)) => cs.push(c),
            None => families.push((r.method.clone(), vec![c])),
        }
    }
    if families.is_empty() {
        out.push_str("<p class=\"muted\">No trial reported training progress.</p>\n");
        return;
    }
    for (family, curves) in &families {
        let title = format!("{family}: training and validation loss");
        match plots::loss_chart(&title, curves, 900, 440) {
            Ok(svg) => {
                let _ = writeln!(
                    out,
                    "<figure class=\"curves\" data-family=\"{}\">{svg}<figcaption>{}: {} trial(s). \
                     Solid: training loss, moving average; faded: per step; dashed with dots: \
                     validation loss at each evaluation.</figcaption></figure>",
                    esc(family),
                    esc(family),
                    curves.len()
                );
            }
            Err(e) => {
                let _ = writeln!(out, "<p class=\"muted\">{}</p>", esc(&e));
            }
        }
    }
}

/// Samples grouped by prompt, one row per trial, so the same prompt reads across methods.
fn samples_section(out: &mut String, rows: &[SummaryRow], events: &[TrialEvents]) {
    let by_id: BTreeMap<&str, &TrialEvents> = events.iter().map(|e| (e.id.as_str(), e)).collect();
    let mut prompts: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for r in rows {
        let Some(ev) = by_id.get(r.trial.as_str()) else {
            continue;
        };
        // A retried attempt reports its samples again: keep the last text per prompt.
        let mut latest: Vec<(String, String)> = Vec::new();
        for e in &ev.events {
            if let Progress::Sample { prompt, text } = e {
                match latest.iter_mut().find(|(p, _)| p == prompt) {
                    Some(slot) => slot.1 = text.clone(),
                    None => latest.push((prompt.clone(), text.clone())),
                }
            }
        }
        for (prompt, text) in latest {
            match prompts.iter_mut().find(|(p, _)| *p == prompt) {
                Some((_, v)) => v.push((r.name.clone(), text)),
                None => prompts.push((prompt, vec![(r.name.clone(), text)])),
            }
        }
    }
    if prompts.is_empty() {
        out.push_str("<p class=\"muted\">No trial reported samples.</p>\n");
        return;
    }
    out.push_str(
        "<p class=\"muted\">Generated by each worker from its final model with seeded top-k / top-p \
         sampling; the prompt is highlighted.</p>\n",
    );
    for (prompt, texts) in &prompts {
        let _ = writeln!(
            out,
            "<h3>Prompt: “{}”</h3><table class=\"samples\"><thead><tr><th style=\"width:14em\">trial</th>\
             <th>generation</th></tr></thead><tbody>",
            esc(prompt)
        );
        for (name, text) in texts {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"sample\"><b>{}</b>{}</td></tr>",
                esc(name),
                esc(prompt),
                esc(text)
            );
        }
        out.push_str("</tbody></table>\n");
    }
}

fn trials_section(out: &mut String, rows: &[SummaryRow], records: &[TrialRecord]) {
    let by_id: BTreeMap<&str, &TrialRecord> = records.iter().map(|r| (r.id.as_str(), r)).collect();
    for r in rows {
        let rec = by_id.get(r.trial.as_str());
        let _ = writeln!(
            out,
            "<details class=\"trial\" id=\"trial-{id}\"><summary>{name} <code class=\"id\">{id}</code> — {status}</summary>\
             <dl class=\"env\">",
            id = esc(&r.trial),
            name = esc(&r.name),
            status = esc(&r.status),
        );
        let mut env = |k: &str, v: String| {
            let _ = writeln!(out, "<dt>{}</dt><dd>{}</dd>", esc(k), esc(&v));
        };
        env(
            "worker / device",
            r.worker.clone().unwrap_or_else(|| "—".into()),
        );
        env("attempts", r.attempts.to_string());
        // Versions, OS, CPU, device and threads as the worker recorded them.
        if let Some(m) = rec.and_then(|r| r.metrics.as_ref()) {
            for (k, v) in &m.environment {
                env(k, v.clone());
            }
        }
        if let Some(rec) = rec {
            if let Some(s) = rec.started_ms.filter(|&s| s > 0) {
                env("last attempt started", utc(s));
            }
            if let Some(f) = rec.finished_ms.filter(|&f| f > 0) {
                env("finished", utc(f));
            }
        }
        if let Some(w) = r.wall_seconds {
            env("wall time (all attempts)", format!("{w:.1} s"));
        }
        if let (Some(t), Some(s)) = (r.train_tokens, r.wall_seconds) {
            if s > 0.0 && t > 0 {
                env("tokens / s (whole trial)", format!("{:.0}", t as f64 / s));
            }
        }
        out.push_str("</dl>\n");
        match rec.and_then(|r| r.config.as_ref()) {
            Some(c) => {
                let json = serde_json::to_string_pretty(c).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "<p class=\"muted\">Exact resolved config (also <code>trials/{}.json</code>; its \
                     SHA-256 prefix is the trial id):</p><pre>{}</pre>",
                    esc(&r.trial),
                    esc(&json)
                );
            }
            None => out.push_str("<p class=\"muted\">The stored config could not be read.</p>\n"),
        }
        out.push_str("</details>\n");
    }
}

/// The whole page.
/// Each tuned arm's grid: the validation loss at every rung (the arm's learning-rate curve), how
/// each point ended, and the tokens it trained.
fn tuning_table(out: &mut String, t: &crate::report::tune::Tuning) {
    let _ = writeln!(
        out,
        "<p class=\"muted\">{}.</p>",
        esc(&crate::report::tune::tokens_line(t))
    );
    out.push_str(
        "<table><thead><tr><th>arm</th><th>lr</th><th>losses at the rungs (step: loss)</th>\
         <th>final loss</th><th>perplexity</th><th>outcome</th><th>tokens</th></tr></thead><tbody>\n",
    );
    for a in &t.arms {
        for p in &a.points {
            let rungs = p
                .rung_losses
                .iter()
                .map(|(s, l)| format!("{s}: {}", l.map_or("—".into(), |l| format!("{l:.4}"))))
                .collect::<Vec<_>>()
                .join(" · ");
            let chosen = a.chosen.as_deref() == Some(p.name.as_str());
            let outcome = match (chosen, p.stopped_step) {
                (true, _) => "<b>chosen</b>".to_string(),
                (false, Some(s)) => format!("stopped at step {s}"),
                (false, None) => esc(&p.status),
            };
            let lr = match p.weight_decay {
                Some(w) => format!("{:e} (wd {w})", p.lr),
                None => format!("{:e}", p.lr),
            };
            let _ = writeln!(
                out,
                "<tr><td>{} ({})</td><td class=\"num\">{lr}</td><td>{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td>{outcome}</td><td class=\"num\">{}</td></tr>",
                esc(&a.arm),
                esc(&a.strategy),
                if rungs.is_empty() { "—".into() } else { rungs },
                p.final_loss.map_or("—".into(), |l| format!("{l:.4}")),
                p.perplexity.map_or("—".into(), |x| format!("{x:.2}")),
                human_count(p.tokens),
            );
        }
    }
    out.push_str("</tbody></table>\n");
}

pub fn report_html(
    meta: &ReportMeta,
    records: &[TrialRecord],
    rows: &[SummaryRow],
    aggregate: &[AggregateRow],
    events: &[TrialEvents],
) -> String {
    let title = if meta.sweep_name.is_empty() {
        "ablate report".to_string()
    } else {
        format!("ablate report — {}", meta.sweep_name)
    };
    let mut out = String::with_capacity(64 * 1024);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{CSS}</style></head><body>\n<h1>{}</h1>\n",
        esc(&title),
        esc(&title)
    );
    let done = rows.iter().filter(|r| is_done(&r.status)).count();
    let failed = rows
        .iter()
        .filter(|r| {
            matches!(
                trial_state(&r.status),
                Some(TrialState::Failed | TrialState::Cancelled | TrialState::Stopped)
            )
        })
        .count();
    let _ = writeln!(
        out,
        "<p class=\"meta\">{}{}generated {} by ablate {}</p>\
         <p class=\"counts\"><span><b>{}</b> trials</span><span><b>{done}</b> finished</span>\
         <span><b>{failed}</b> failed, cancelled or stopped</span><span><b>{}</b> unfinished</span></p>",
        if meta.sweep_id.is_empty() {
            String::new()
        } else {
            format!("sweep <code>{}</code> · ", esc(&meta.sweep_id))
        },
        if meta.sweep_name.is_empty() {
            String::new()
        } else {
            format!("{} · ", esc(&meta.sweep_name))
        },
        utc(meta.generated_ms),
        env!("CARGO_PKG_VERSION"),
        rows.len(),
        rows.len() - done - failed,
    );
    out.push_str(
        "<nav><a href=\"#summary\">Summary</a><a href=\"#perplexity\">Perplexity</a>\
         <a href=\"#curves\">Loss curves</a><a href=\"#samples\">Samples</a>\
         <a href=\"#trials\">Configs &amp; environment</a><a href=\"#sweep\">Sweep file</a></nav>\n",
    );

    out.push_str("<h2 id=\"summary\">Summary</h2>\n");
    out.push_str(
        "<p class=\"muted\">Perplexity on the validation split (exp of the mean token NLL over \
         non-overlapping context windows; the same code for every method). Δ baseline: perplexity \
         minus the untrained baseline's on the same data and base (negative is better). Tokens \
         seen: training tokens.</p>\n",
    );
    summary_table(&mut out, rows);
    let tuning = crate::report::tune::tuning(records);
    if let Some(t) = &tuning {
        out.push_str("<h2 id=\"tuning\">Tuning</h2>\n");
        tuning_table(&mut out, t);
    }
    if !aggregate.is_empty() {
        out.push_str(if tuning.is_some() {
            "<h2 id=\"seeds\">Tuned arms, ranked by their confirm runs</h2>\n"
        } else {
            "<h2 id=\"seeds\">Across seeds</h2>\n"
        });
        aggregate_table(&mut out, aggregate);
    }

    if rows.iter().any(|r| r.cost.device_seconds > 0.0) {
        out.push_str("<h2 id=\"cost\">Cost</h2>\n");
        cost_table(&mut out, rows);
    }

    out.push_str("<h2 id=\"perplexity\">Perplexity against the baseline</h2>\n");
    let before = out.len();
    perplexity_figure(&mut out, rows);
    if out.len() == before {
        out.push_str("<p class=\"muted\">No fine-tuning trial has finished yet.</p>\n");
    }

    out.push_str("<h2 id=\"curves\">Loss curves</h2>\n");
    curves_section(&mut out, rows, events);

    out.push_str("<h2 id=\"samples\">Samples</h2>\n");
    samples_section(&mut out, rows, events);

    out.push_str("<h2 id=\"trials\">Configs and environment</h2>\n");
    let _ = writeln!(
        out,
        "<dl class=\"env\"><dt>report written by</dt><dd>ablate {} (coordinator crate), {} {}</dd>\
         <dt>generated</dt><dd>{}</dd></dl>",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH,
        utc(meta.generated_ms)
    );
    trials_section(&mut out, rows, records);

    out.push_str("<h2 id=\"sweep\">Sweep file</h2>\n");
    if meta.sweep_text.trim().is_empty() {
        out.push_str("<p class=\"muted\">The sweep file was not stored with this report.</p>\n");
    } else {
        let _ = writeln!(
            out,
            "<pre id=\"sweep-text\">{}</pre>",
            esc(&meta.sweep_text)
        );
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_426_903_000), "2026-11-23 09:41:43 UTC");
    }

    #[test]
    fn escaping_covers_markup() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
