//! The sweep's comparison report: the summary table (stdout, Markdown, CSV, JSON), loss curves,
//! sample generations and the exact config of every trial.
//!
//! The report reads only what the coordinator stored (through `Get` and `Events`), never a
//! worker's disk, so `ablate report` on another machine gives the same files as `ablate run`.
//! Everything here is a pure function over plain structs ([`TrialRecord`] in, [`SummaryRow`] and
//! strings out) so the formats can be tested without a server. This file is the model (records,
//! summary rows, which trials compare with which); `text.rs` renders the table as Markdown, CSV,
//! JSON and the terminal table, `seeds.rs` the rows across seeds, `curves.rs` the loss curves and
//! samples; [`files`] writes them, with the HTML page ([`html`], its charts in [`plots`]) and
//! TensorBoard logs, to disk; [`stats`] holds the paired bootstrap intervals and [`tune`] the
//! tuning table.
//!
//! Machine formats (CSV, JSON) carry full-precision numbers; the human formats (Markdown, the
//! stdout table) round perplexity to two decimals. Both come from the same [`SummaryRow`], so they
//! cannot disagree beyond that rounding.

pub mod files;
pub mod html;
pub mod plots;
pub mod stats;
pub mod tune;

mod curves;
mod seeds;
mod text;

pub use curves::*;
pub use seeds::*;
pub use text::*;

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
