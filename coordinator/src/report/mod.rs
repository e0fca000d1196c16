//! The sweep's comparison report: the summary table (stdout, Markdown, CSV, JSON), loss curves,
//! sample generations and the exact config of every trial.
//!
//! The report reads only what the coordinator stored (through `Get` and `Events`), never a
//! worker's disk, so `ablate report` on another machine gives the same files as `ablate run`.
//! Everything here is a pure function over plain structs ([`TrialRecord`] in, [`SummaryRow`] and
//! strings out) so the formats can be tested without a server; [`files`] writes
//! them, with the HTML page ([`html`], its charts in [`plots`]) and TensorBoard logs, to disk;
//! [`stats`] holds the paired bootstrap intervals and [`tune`] the tuning table.
//!
//! Machine formats (CSV, JSON) carry full-precision numbers; the human formats (Markdown, the
//! stdout table) round perplexity to two decimals. Both come from the same [`SummaryRow`], so they
//! cannot disagree beyond that rounding.

pub mod files;
pub mod html;
pub mod plots;
pub mod stats;
pub mod tune;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use experiments::trial::{Base, Method, Progress, TrialConfig, TrialMetrics};

use crate::scheduler::TrialState;
use serde::Serialize;

/// One trial as the coordinator stores it: the input of every report function.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct TrialRecord {
    pub id: String,
    /// The exact resolved config (None only if the stored JSON could not be read back).
    pub config: Option<TrialConfig>,
    /// Display name (the config's name; kept separately so a record without config still shows).
    pub name: String,
    /// Lower-case state as the coordinator names it: queued, running, done, failed, cancelled, ...
    pub state: String,
    pub attempts: u32,
    pub metrics: Option<TrialMetrics>,
    /// Short machine-readable failure reason (`diverged`, `out_of_memory`, ...).
    pub reason: Option<String>,
    /// Human failure message.
    pub message: Option<String>,
    /// Worker name / device that ran the (last) attempt.
    pub worker: Option<String>,
    /// When the last attempt started and when the trial reached its final state (Unix ms).
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// Every attempt so far (for the cost table); empty when unknown.
    pub attempt_spans: Vec<crate::cost::AttemptSpan>,
    /// The sweep file's `price_per_hour` (per device), for attempts whose workers set none.
    pub price_per_hour: Option<f64>,
    /// The tuner's decisions about this trial at its rungs (`[tune]` sweeps), in order.
    pub tune_rungs: Vec<TuneRung>,
    /// The last training step reported (what a stopped trial trained).
    pub latest_step: u64,
}

/// One rung decision of the tuner about a trial, as `TrialStatus.tune_json` carries it.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize, Default)]
pub struct TuneRung {
    pub rung: usize,
    pub step: u64,
    /// None when the loss was not finite.
    pub loss: Option<f64>,
    /// `continue` or `stop`.
    pub verdict: String,
}

/// One row of the summary table. Serialised as-is into `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SummaryRow {
    /// Trial id (hash of the resolved config).
    pub trial: String,
    pub name: String,
    /// Method family: pretrain, baseline, freeze, gradual, inheritune.
    pub method: String,
    pub status: String,
    pub perplexity: Option<f64>,
    /// perplexity − perplexity of the baseline evaluated on the same data and base.
    pub baseline_delta: Option<f64>,
    pub valid_loss: Option<f64>,
    pub trainable_params: Option<u64>,
    pub total_params: Option<u64>,
    pub train_tokens: Option<u64>,
    pub steps: Option<u64>,
    pub wall_seconds: Option<f64>,
    pub attempts: u32,
    pub reason: Option<String>,
    pub message: Option<String>,
    /// Worker (and its device) that ran the last attempt.
    pub worker: Option<String>,
    pub seed: Option<u64>,
    /// Validation windows of the final evaluation the intervals resample (None: not recorded).
    pub valid_windows: Option<usize>,
    /// Paired bootstrap 95 % interval of `baseline_delta` over the validation windows.
    pub baseline_delta_ci: Option<[f64; 2]>,
    /// valid loss − valid loss of the baseline (nats per token), and its interval.
    pub baseline_loss_delta: Option<f64>,
    pub baseline_loss_delta_ci: Option<[f64; 2]>,
    /// Id of the trial with the lowest perplexity among the finished trials scored on the same
    /// validation windows (same data, context and tokenizer); None when there is only one.
    pub best_trial: Option<String>,
    /// perplexity − perplexity of `best_trial`, its paired bootstrap interval, and the same for
    /// the loss.
    pub best_delta: Option<f64>,
    pub best_delta_ci: Option<[f64; 2]>,
    pub best_loss_delta: Option<f64>,
    pub best_loss_delta_ci: Option<[f64; 2]>,
    /// `best`, `indistinguishable` (the interval of Δ vs best contains 0) or `worse`; None
    /// without an interval.
    pub vs_best: Option<String>,
    /// Why an interval is missing where a reference exists (e.g. different validation windows).
    pub interval_note: Option<String>,
    /// Device time, GPU-hours, money, throughput and peak memory over every attempt.
    pub cost: crate::cost::TrialCost,
    /// Tuned sweeps (`[tune]`): the arm (the method with its own settings), and the role:
    /// `tune` for a grid point, `confirm` for a run of the arm's chosen setting (the winning grid
    /// point counts as the first confirm seed, so its role is `confirm`). None when untuned.
    pub arm: Option<String>,
    pub role: Option<String>,
    /// The learning rate of the top group, and the weight decay.
    pub lr: Option<f64>,
    pub weight_decay: Option<f64>,
    /// Where the tuner stopped the trial: the rung step and the validation loss it had there.
    pub stopped_step: Option<u64>,
    pub stopped_loss: Option<f64>,
}

/// Sort key: pretrain, baseline, then family, then the family's parameter (freeze 1,2,3,all;
/// gradual stage length; Inheritune depth; LoRA rank), then discriminative-LR factor, seed, name.
fn order_key(r: &TrialRecord) -> (u8, u64, u64, u64, String) {
    let Some(c) = &r.config else {
        return (9, 0, 0, 0, r.name.clone());
    };
    let (family, param) = match &c.method {
        Method::Pretrain { .. } => (0, 0),
        Method::Baseline => (1, 0),
        Method::Freeze { top } => (2, *top as u64),
        Method::Gradual { stage_steps } => (3, *stage_steps),
        Method::Inheritune { blocks } => (4, *blocks as u64),
        // Rank first, then adapters in fewer groups after all blocks.
        Method::Lora { rank, groups, .. } => (
            5,
            (*rank as u64) << 16 | groups.map_or(0, |k| 0xffff - k as u64),
        ),
    };
    // Factors are ≥ 1; scale to keep ordering in an integer key (None = 1.0 sorts first).
    let factor = c.train.lr_factor.map_or(0, |f| (f * 1000.0) as u64);
    (family, param, factor, c.seed, r.name.clone())
}

/// Same-data-same-base test for the baseline delta.
fn same_eval(a: &TrialConfig, b: &TrialConfig) -> bool {
    a.data == b.data && a.base == b.base
}

/// Turn stored records into ordered summary rows with baseline deltas.
pub fn summary_rows(records: &[TrialRecord]) -> Vec<SummaryRow> {
    let mut sorted: Vec<&TrialRecord> = records.iter().collect();
    sorted.sort_by_key(|r| order_key(r));
    let baselines: Vec<(&TrialConfig, f64, &TrialRecord)> = records
        .iter()
        .filter_map(|r| {
            let c = r.config.as_ref()?;
            let m = r.metrics.as_ref()?;
            (matches!(c.method, Method::Baseline) && is_done(&r.state) && m.perplexity.is_finite())
                .then_some((c, m.perplexity, r))
        })
        .collect();
    let best = best_trials(records);
    sorted
        .into_iter()
        .map(|r| {
            let tune = r.config.as_ref().and_then(|c| c.tune.as_ref());
            let stop = r.tune_rungs.iter().find(|d| d.verdict == "stop");
            let done = is_done(&r.state);
            let metrics = if done { r.metrics.as_ref() } else { None };
            let perplexity = metrics.map(|m| m.perplexity);
            let baseline = match (&r.config, perplexity) {
                (Some(c), Some(_)) => baselines.iter().find(|(b, _, _)| same_eval(b, c)),
                _ => None,
            };
            let baseline_delta = baseline.and_then(|(_, bp, _)| Some(perplexity? - bp));
            let mut notes = Vec::new();
            let vs_baseline = match (metrics, baseline) {
                (Some(m), Some((_, _, b))) if b.id != r.id => compare(m, b, "baseline", &mut notes),
                _ => None,
            };
            let best_ref = metrics.and_then(|_| best.get(r.id.as_str())).copied();
            let vs_best_delta = match (metrics, best_ref) {
                (Some(m), Some(b)) if b.id != r.id => compare(m, b, "best", &mut notes),
                _ => None,
            };
            let vs_best = match (best_ref, vs_best_delta) {
                (Some(b), _) if b.id == r.id => Some("best".to_string()),
                (_, Some(d)) if stats::contains_zero(d.perplexity_ci) => {
                    Some("indistinguishable".to_string())
                }
                (_, Some(_)) => Some("worse".to_string()),
                _ => None,
            };
            let best_delta = match (best_ref, perplexity) {
                (Some(b), Some(p)) => b.metrics.as_ref().map(|m| p - m.perplexity),
                _ => None,
            };
            let best_loss_delta = match (best_ref, metrics) {
                (Some(b), Some(m)) => b.metrics.as_ref().map(|bm| m.valid_loss - bm.valid_loss),
                _ => None,
            };
            let baseline_loss_delta = match (baseline, metrics) {
                (Some((_, _, b)), Some(m)) => {
                    b.metrics.as_ref().map(|bm| m.valid_loss - bm.valid_loss)
                }
                _ => None,
            };
            SummaryRow {
                trial: r.id.clone(),
                name: r.name.clone(),
                method: r
                    .config
                    .as_ref()
                    .map_or("?", |c| c.method.family())
                    .to_string(),
                status: r.state.clone(),
                perplexity,
                baseline_delta,
                valid_loss: metrics.map(|m| m.valid_loss),
                trainable_params: metrics.map(|m| m.trainable_params),
                total_params: metrics.map(|m| m.total_params),
                train_tokens: metrics.map(|m| m.train_tokens),
                steps: metrics.map(|m| m.steps),
                wall_seconds: metrics.map(|m| m.wall_seconds),
                attempts: r.attempts,
                reason: r.reason.clone().filter(|s| !s.is_empty()),
                message: r.message.clone().filter(|s| !s.is_empty()),
                worker: r.worker.clone().filter(|s| !s.is_empty()),
                seed: r.config.as_ref().map(|c| c.seed),
                valid_windows: metrics.map(|m| m.valid_window_nll.len()).filter(|n| *n > 0),
                baseline_delta_ci: vs_baseline.map(|d| d.perplexity_ci),
                baseline_loss_delta,
                baseline_loss_delta_ci: vs_baseline.map(|d| d.loss_ci),
                best_trial: best_ref.map(|b| b.id.clone()),
                best_delta,
                best_delta_ci: vs_best_delta.map(|d| d.perplexity_ci),
                best_loss_delta,
                best_loss_delta_ci: vs_best_delta.map(|d| d.loss_ci),
                vs_best,
                interval_note: (!notes.is_empty()).then(|| notes.join("; ")),
                cost: crate::cost::trial_cost(
                    &r.attempt_spans,
                    r.metrics.as_ref().filter(|_| done),
                    r.price_per_hour,
                    now_ms(),
                ),
                arm: tune.map(|t| t.arm.clone()),
                // The winning grid trial becomes `confirm` in report_tune::mark_chosen.
                role: tune.map(|t| t.role.as_str().to_string()),
                lr: r.config.as_ref().map(|c| c.train.lr),
                weight_decay: r.config.as_ref().map(|c| c.train.weight_decay),
                stopped_step: stop.map(|d| d.step),
                stopped_loss: stop.and_then(|d| d.loss),
            }
        })
        .collect()
}

/// Paired bootstrap of `m` against the reference trial `b` (None, with a note saying why, when
/// the two were not scored on the same windows or a trial lacks per-window NLL).
fn compare(
    m: &TrialMetrics,
    b: &TrialRecord,
    what: &str,
    notes: &mut Vec<String>,
) -> Option<stats::PairedDelta> {
    let bm = b.metrics.as_ref()?;
    match stats::paired_bootstrap(
        &m.valid_window_nll,
        &m.valid_window_tokens,
        &bm.valid_window_nll,
        &bm.valid_window_tokens,
        stats::BOOTSTRAP_RESAMPLES,
        stats::BOOTSTRAP_SEED,
    ) {
        Ok(d) => Some(d),
        Err(e) => {
            notes.push(format!("no interval vs {what}: {e}"));
            None
        }
    }
}

/// Where a trial's tokenizer comes from: a base directory's, or the one a pretrain stage trained
/// (named by that trial's id). Perplexities under different tokenizers are not comparable.
fn tokenizer_key(c: &TrialConfig, records: &[TrialRecord], depth: usize) -> String {
    match &c.base {
        Base::HfDir { path } => format!("dir:{path}"),
        Base::Gguf { path, package } => format!(
            "gguf:{}:{path}",
            package
                .as_ref()
                .map(|p| format!("{}:{}=={}", p.manager, p.name, p.version))
                .unwrap_or_default()
        ),
        Base::Hub { repo, revision } => {
            format!("hub:{repo}@{}", revision.as_deref().unwrap_or("main"))
        }
        Base::Scratch { .. } => format!("trained:{}", c.id()),
        Base::Trial { id } => match records.iter().find(|r| &r.id == id) {
            Some(TrialRecord {
                config: Some(p), ..
            }) if depth < 16 => tokenizer_key(p, records, depth + 1),
            _ => format!("trial:{id}"),
        },
    }
}

/// Trials scored on the same validation windows share this key: same data (corpus, split,
/// context, window cap) and the same tokenizer.
pub fn comparison_key(c: &TrialConfig, records: &[TrialRecord]) -> String {
    format!(
        "{}|{}",
        serde_json::to_string(&c.data).unwrap_or_default(),
        tokenizer_key(c, records, 0)
    )
}

/// For every finished trial, the trial with the lowest perplexity among the finished trials of
/// its comparison group; groups of one have no best (there is nothing to compare).
fn best_trials(records: &[TrialRecord]) -> std::collections::HashMap<&str, &TrialRecord> {
    let mut groups: BTreeMap<String, Vec<&TrialRecord>> = BTreeMap::new();
    for r in records {
        let (Some(c), Some(m)) = (&r.config, &r.metrics) else {
            continue;
        };
        if is_done(&r.state) && m.perplexity.is_finite() {
            groups
                .entry(comparison_key(c, records))
                .or_default()
                .push(r);
        }
    }
    let mut out = std::collections::HashMap::new();
    for members in groups.into_values().filter(|m| m.len() > 1) {
        let best = members
            .iter()
            .copied()
            .min_by(|a, b| {
                let p =
                    |r: &TrialRecord| r.metrics.as_ref().map_or(f64::INFINITY, |m| m.perplexity);
                p(a).total_cmp(&p(b)).then_with(|| a.id.cmp(&b.id))
            })
            .expect("non-empty group");
        for r in members {
            out.insert(r.id.as_str(), best);
        }
    }
    out
}

/// A record's state string read as a [`TrialState`], the one place that does so for records:
/// they keep the string because they are written to and read back from summary.json, and a
/// record written by another tool may say "done", "succeeded", "completed" or "canceled".
pub fn trial_state(state: &str) -> Option<TrialState> {
    TrialState::parse(state).or(match state {
        "done" | "succeeded" | "completed" => Some(TrialState::Finished),
        "canceled" => Some(TrialState::Cancelled),
        _ => None,
    })
}

/// True for the state of a trial that finished successfully.
pub fn is_done(state: &str) -> bool {
    trial_state(state) == Some(TrialState::Finished)
}

/// True for states from which a trial never moves again.
pub fn is_terminal(state: &str) -> bool {
    trial_state(state).is_some_and(TrialState::is_terminal)
}

fn fmt_ppl(p: Option<f64>) -> String {
    p.map_or_else(|| "—".into(), |p| format!("{p:.2}"))
}

fn fmt_delta(d: Option<f64>) -> String {
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
fn md_vs_best(v: Option<&str>) -> String {
    match (v, vs_best_mark(v)) {
        (Some("worse"), _) => "worse".into(),
        (_, "") => String::new(),
        (_, m) => format!("**{m}**"),
    }
}

fn fmt_opt<T: ToString>(v: Option<T>) -> String {
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
fn status_cell(r: &SummaryRow) -> String {
    if let (Some(step), Some(TrialState::Stopped)) = (r.stopped_step, trial_state(&r.status)) {
        return format!("stopped@{step}");
    }
    match &r.reason {
        Some(reason) if !is_done(&r.status) => format!("{} ({reason})", r.status),
        _ => r.status.clone(),
    }
}

fn md_escape(s: &str) -> String {
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
fn cost_markdown(out: &mut String, rows: &[SummaryRow]) {
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
fn differences_markdown(out: &mut String, rows: &[SummaryRow]) {
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

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn csv_opt<T: ToString>(v: Option<T>) -> String {
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

/// One trial's recorded progress events, in the order the coordinator stored them.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialEvents {
    pub id: String,
    pub name: String,
    pub events: Vec<Progress>,
    /// When the coordinator recorded each event (Unix ms), parallel to `events`; empty when not
    /// known. TensorBoard's wall-time axis comes from here.
    pub unix_ms: Vec<i64>,
}

/// A trial's (train loss, validation loss) per step. A retried attempt replays steps from its
/// checkpoint; the latest value for a step wins.
pub fn losses_by_step(t: &TrialEvents) -> BTreeMap<u64, (Option<f64>, Option<f64>)> {
    let mut by_step: BTreeMap<u64, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for e in &t.events {
        match e {
            Progress::Step { step, loss, .. } => by_step.entry(*step).or_default().0 = Some(*loss),
            Progress::Eval { step, valid_loss } => {
                by_step.entry(*step).or_default().1 = Some(*valid_loss)
            }
            _ => {}
        }
    }
    by_step
}

/// `curves.csv` (trial, step, train_loss, valid_loss): one row per trial and step that has a
/// train loss or a validation loss. A retried attempt replays steps from its checkpoint; the
/// latest value for a step wins.
pub fn curves_csv(trials: &[TrialEvents]) -> String {
    let mut out = String::from("trial,step,train_loss,valid_loss\n");
    for t in trials {
        for (step, (train, valid)) in losses_by_step(t) {
            let _ = writeln!(
                out,
                "{},{step},{},{}",
                csv_field(&t.id),
                csv_opt(train),
                csv_opt(valid)
            );
        }
    }
    out
}

/// `samples.md`: the generations each trial reported, under one heading per trial.
pub fn samples_md(trials: &[TrialEvents]) -> String {
    let mut out = String::from("# Samples\n");
    let mut any = false;
    for t in trials {
        let samples: Vec<(&String, &String)> = t
            .events
            .iter()
            .filter_map(|e| match e {
                Progress::Sample { prompt, text } => Some((prompt, text)),
                _ => None,
            })
            .collect();
        if samples.is_empty() {
            continue;
        }
        any = true;
        let _ = write!(out, "\n## {} (`{}`)\n", md_escape(&t.name), t.id);
        for (prompt, text) in samples {
            let _ = write!(out, "\n**Prompt:** {}\n\n", md_escape(prompt));
            // Fence longer than any backtick run in the text, so generated text cannot end it.
            let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
            let fence = "`".repeat(longest.max(2) + 1);
            let _ = write!(out, "{fence}text\n{text}\n{fence}\n");
        }
    }
    if !any {
        out.push_str("\nNo trial reported samples.\n");
    }
    out
}

/// Seeds of one configuration summarised: what a paper table shows when a sweep has repeats.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AggregateRow {
    /// The trial name without its ` seed=N` suffix.
    pub name: String,
    pub method: String,
    /// Seeds of the group, in table order, and how many of them finished.
    pub seeds: Vec<u64>,
    pub finished: usize,
    pub perplexity_mean: Option<f64>,
    /// Sample standard deviation (n − 1); None with fewer than two finished seeds.
    pub perplexity_std: Option<f64>,
    pub baseline_delta_mean: Option<f64>,
    pub baseline_delta_std: Option<f64>,
    pub wall_seconds_mean: Option<f64>,
    /// Trial ids of the group.
    pub trials: Vec<String>,
    /// 95 % Student-t intervals of the means across seeds (None below two finished seeds).
    pub perplexity_ci: Option<[f64; 2]>,
    pub baseline_delta_ci: Option<[f64; 2]>,
    /// The configuration with the lowest mean perplexity among those scored on the same
    /// validation windows (None when there is no other).
    pub best_arm: Option<String>,
    /// perplexity − perplexity of the best arm, paired by seed: mean, std and 95 % t-interval
    /// over the seeds both finished.
    pub best_delta_mean: Option<f64>,
    pub best_delta_std: Option<f64>,
    pub best_delta_ci: Option<[f64; 2]>,
    /// `best`, `indistinguishable` (the t-interval of Δ vs the best arm contains 0) or `worse`;
    /// None below two paired seeds.
    pub vs_best: Option<String>,
    /// The arm's cost: its seeds' device time, GPU-hours and money summed.
    pub cost: crate::cost::TrialCost,
}

/// Mean and sample standard deviation (None for the std below two values).
pub fn mean_std(xs: &[f64]) -> (Option<f64>, Option<f64>) {
    if xs.is_empty() {
        return (None, None);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (Some(mean), None);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (Some(mean), Some(var.sqrt()))
}

/// The trial name without the ` seed=N` the sweep expansion appends.
fn strip_seed(name: &str) -> &str {
    match name.rfind(" seed=") {
        Some(i) if name[i + 6..].chars().all(|c| c.is_ascii_digit()) => &name[..i],
        _ => name,
    }
}

/// Group key: the resolved config with the seed and name's seed suffix taken out. Trials that
/// differ in anything else (lr factor, data, base) stay apart.
fn seed_group_key(r: &TrialRecord) -> String {
    match &r.config {
        Some(c) => {
            let mut c = c.clone();
            c.seed = 0;
            // A tuned arm's winning grid trial and its confirm runs are one configuration.
            if let Some(t) = c.tune.as_mut() {
                t.role = experiments::trial::TuneRole::Tune;
            }
            c.name = strip_seed(&c.name).to_string();
            serde_json::to_string(&c).unwrap_or_default()
        }
        None => format!("no-config:{}", r.id),
    }
}

/// One row per configuration with its seeds aggregated, in summary-table order; empty when no
/// configuration has more than one seed (the summary table already says everything then).
pub fn aggregate_rows(records: &[TrialRecord]) -> Vec<AggregateRow> {
    let rows = summary_rows(records);
    let by_id: std::collections::HashMap<&str, &TrialRecord> =
        records.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut groups: Vec<(String, Vec<&SummaryRow>)> = Vec::new();
    for row in &rows {
        let key = by_id
            .get(row.trial.as_str())
            .map_or_else(|| row.trial.clone(), |r| seed_group_key(r));
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(row),
            None => groups.push((key, vec![row])),
        }
    }
    if groups.iter().all(|(_, m)| m.len() < 2) {
        return Vec::new();
    }
    let mut out: Vec<AggregateRow> = groups
        .iter()
        .map(|(_, members)| {
            let done: Vec<&&SummaryRow> = members.iter().filter(|r| is_done(&r.status)).collect();
            let collect = |f: fn(&SummaryRow) -> Option<f64>| -> Vec<f64> {
                done.iter()
                    .filter_map(|r| f(r))
                    .filter(|x| x.is_finite())
                    .collect()
            };
            let (pm, ps) = mean_std(&collect(|r| r.perplexity));
            let (dm, ds) = mean_std(&collect(|r| r.baseline_delta));
            let (wm, _) = mean_std(&collect(|r| r.wall_seconds));
            AggregateRow {
                name: strip_seed(&members[0].name).to_string(),
                method: members[0].method.clone(),
                seeds: members.iter().filter_map(|r| r.seed).collect(),
                finished: done.len(),
                perplexity_mean: pm,
                perplexity_std: ps,
                baseline_delta_mean: dm,
                baseline_delta_std: ds,
                wall_seconds_mean: wm,
                trials: members.iter().map(|r| r.trial.clone()).collect(),
                perplexity_ci: stats::t_interval(&collect(|r| r.perplexity)).map(|t| t.2),
                baseline_delta_ci: stats::t_interval(&collect(|r| r.baseline_delta)).map(|t| t.2),
                best_arm: None,
                best_delta_mean: None,
                best_delta_std: None,
                best_delta_ci: None,
                vs_best: None,
                cost: crate::cost::sum_costs(members.iter().map(|r| &r.cost)),
            }
        })
        .collect();
    // The best arm of each set of arms scored on the same windows, and every arm against it.
    let key_of = |members: &[&SummaryRow]| {
        members
            .iter()
            .find_map(|m| by_id.get(m.trial.as_str())?.config.as_ref())
            .map(|c| comparison_key(c, records))
    };
    let keys: Vec<Option<String>> = groups.iter().map(|(_, m)| key_of(m)).collect();
    for i in 0..out.len() {
        let Some(key) = &keys[i] else { continue };
        let peers: Vec<usize> = (0..out.len())
            .filter(|&j| keys[j].as_ref() == Some(key) && out[j].perplexity_mean.is_some())
            .collect();
        if peers.len() < 2 || out[i].perplexity_mean.is_none() {
            continue;
        }
        let best = *peers
            .iter()
            .min_by(|&&a, &&b| {
                // Lowest mean; on a tie the arm with more finished seeds (the firmer mean).
                let p = |j: usize| out[j].perplexity_mean.unwrap_or(f64::INFINITY);
                p(a).total_cmp(&p(b))
                    .then_with(|| out[b].finished.cmp(&out[a].finished))
            })
            .expect("two peers");
        let seed_ppl = |j: usize| -> BTreeMap<u64, f64> {
            groups[j]
                .1
                .iter()
                .filter(|r| is_done(&r.status))
                .filter_map(|r| Some((r.seed?, r.perplexity.filter(|p| p.is_finite())?)))
                .collect()
        };
        let (mine, theirs) = (seed_ppl(i), seed_ppl(best));
        // A best arm that ran once (the baseline: evaluation does not depend on the seed) is
        // the reference of every seed; otherwise pair by seed.
        let single = (theirs.len() == 1)
            .then(|| theirs.values().copied().next())
            .flatten();
        let deltas: Vec<f64> = mine
            .iter()
            .filter_map(|(s, p)| Some(p - single.or_else(|| theirs.get(s).copied())?))
            .collect();
        let (dm, ds) = mean_std(&deltas);
        let ci = stats::t_interval(&deltas).map(|t| t.2);
        let r = &mut out[i];
        r.best_arm = Some(strip_seed(&groups[best].1[0].name).to_string());
        r.best_delta_mean = dm;
        r.best_delta_std = ds;
        r.best_delta_ci = ci;
        r.vs_best = if i == best {
            Some("best".into())
        } else {
            ci.map(|c| {
                if stats::contains_zero(c) {
                    "indistinguishable".into()
                } else {
                    "worse".into()
                }
            })
        };
    }
    out
}

/// "12.34 ± 0.56" (or just the mean with one seed, "—" with none).
pub fn fmt_mean_std(mean: Option<f64>, std: Option<f64>, signed: bool) -> String {
    match (mean, std) {
        (None, _) => "—".into(),
        (Some(m), None) if signed => format!("{m:+.2}"),
        (Some(m), None) => format!("{m:.2}"),
        (Some(m), Some(s)) if signed => format!("{m:+.2} ± {s:.2}"),
        (Some(m), Some(s)) => format!("{m:.2} ± {s:.2}"),
    }
}

/// The seed table in Markdown (appended to summary.md when a sweep has repeats).
pub fn aggregate_markdown(rows: &[AggregateRow]) -> String {
    let mut out = String::from(
        "| name | method | seeds | finished | perplexity (mean ± std) | 95 % CI | Δ baseline (mean ± std) | 95 % CI | Δ best arm (mean ± std) | 95 % CI | vs best | mean wall s | device time | cost |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n",
    );
    for r in rows {
        let seeds: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
        let mark = md_vs_best(r.vs_best.as_deref());
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}/{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            md_escape(&r.name),
            md_escape(&r.method),
            seeds.join(", "),
            r.finished,
            r.trials.len(),
            fmt_mean_std(r.perplexity_mean, r.perplexity_std, false),
            r.perplexity_ci
                .map_or_else(|| "—".into(), |[lo, hi]| format!("[{lo:.2}, {hi:.2}]")),
            fmt_mean_std(r.baseline_delta_mean, r.baseline_delta_std, true),
            fmt_ci(r.baseline_delta_ci, 2),
            fmt_mean_std(r.best_delta_mean, r.best_delta_std, true),
            fmt_ci(r.best_delta_ci, 2),
            mark,
            r.wall_seconds_mean
                .map_or_else(|| "—".into(), |w| format!("{w:.1}")),
            human_duration(r.cost.device_seconds),
            crate::cost::fmt_money(r.cost.cost),
        );
    }
    out.push_str(
        "\nStandard deviation over seeds (n − 1); 95 % intervals: Student t over the seeds. \
         Δ best arm is paired by seed; **≈ best**: its interval contains 0.\n",
    );
    out
}

/// `aggregate.csv`: full precision, empty cells for missing values; seeds and trials joined by
/// spaces.
pub fn aggregate_csv(rows: &[AggregateRow]) -> String {
    let mut out = String::from(
        "name,method,seeds,finished,trials,perplexity_mean,perplexity_std,baseline_delta_mean,baseline_delta_std,wall_seconds_mean,perplexity_lo,perplexity_hi,baseline_delta_lo,baseline_delta_hi,best_arm,best_delta_mean,best_delta_std,best_delta_lo,best_delta_hi,vs_best,device_seconds,gpu_hours,cost,lost_device_seconds\n",
    );
    for r in rows {
        let seeds: Vec<String> = r.seeds.iter().map(u64::to_string).collect();
        let cells = [
            csv_field(&r.name),
            csv_field(&r.method),
            seeds.join(" "),
            r.finished.to_string(),
            r.trials.join(" "),
            csv_opt(r.perplexity_mean),
            csv_opt(r.perplexity_std),
            csv_opt(r.baseline_delta_mean),
            csv_opt(r.baseline_delta_std),
            csv_opt(r.wall_seconds_mean),
            csv_opt(r.perplexity_ci.map(|c| c[0])),
            csv_opt(r.perplexity_ci.map(|c| c[1])),
            csv_opt(r.baseline_delta_ci.map(|c| c[0])),
            csv_opt(r.baseline_delta_ci.map(|c| c[1])),
            csv_field(r.best_arm.as_deref().unwrap_or("")),
            csv_opt(r.best_delta_mean),
            csv_opt(r.best_delta_std),
            csv_opt(r.best_delta_ci.map(|c| c[0])),
            csv_opt(r.best_delta_ci.map(|c| c[1])),
            csv_field(r.vs_best.as_deref().unwrap_or("")),
            csv_opt(Some(r.cost.device_seconds)),
            csv_opt(Some(r.cost.gpu_hours)),
            csv_opt(r.cost.cost),
            csv_opt(Some(r.cost.lost_device_seconds)),
        ];
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// Who wrote the report and about what: the page header and the environment section.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReportMeta {
    pub sweep_name: String,
    pub sweep_id: String,
    /// The sweep file as submitted (empty when unknown).
    pub sweep_text: String,
    /// When the report was written (Unix ms).
    pub generated_ms: i64,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
