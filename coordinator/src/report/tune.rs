//! The report of a tuned sweep (`[tune]`): each arm's grid with the losses the tuner compared at
//! its rungs (the arm's learning-rate curve), the setting it chose, and the tokens the search
//! and its confirm runs spent against running the whole grid to the end.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;

use experiments::trial::{TrialConfig, TuneRole};
use serde::{Deserialize, Serialize};

use crate::report::{human_count, is_done, TrialRecord};

pub use crate::report::TuneRung;

/// The rung decisions in `TrialStatus.tune_json` (empty for untuned trials or unreadable JSON).
pub fn parse_tune_json(json: &str) -> Vec<TuneRung> {
    #[derive(Deserialize)]
    struct Doc {
        #[serde(default)]
        rungs: Vec<TuneRung>,
    }
    if json.is_empty() {
        return Vec::new();
    }
    serde_json::from_str::<Doc>(json)
        .map(|d| d.rungs)
        .unwrap_or_default()
}

/// A tuned sweep's search, per arm.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tuning {
    pub arms: Vec<TunedArm>,
    /// Training tokens every grid and confirm trial spent (a stopped trial up to its last step).
    pub tokens_spent: u64,
    /// Of those, what the grid trials (the search itself) spent.
    pub tokens_search: u64,
    /// Tokens of running every grid point to the end, at one seed.
    pub tokens_full_grid: u64,
    /// Tokens of running every grid point to the end at every confirm seed.
    pub tokens_full_grid_all_seeds: u64,
    /// Tokens of the same table without early stopping: the whole grid to the end at the first
    /// confirm seed, then the winner of each arm at the other confirm seeds.
    pub tokens_without_stopping: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TunedArm {
    pub arm: String,
    pub method: String,
    pub strategy: String,
    pub rungs: Vec<u64>,
    /// The winning grid point (None until the arm is decided, or when none finished).
    pub chosen: Option<String>,
    pub chosen_lr: Option<f64>,
    pub chosen_weight_decay: Option<f64>,
    pub confirm_seeds: Vec<u64>,
    /// Confirm runs at the other seeds, by name.
    pub confirm: Vec<String>,
    pub points: Vec<GridPoint>,
    pub stopped: usize,
    pub tokens_spent: u64,
    pub tokens_full_grid: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GridPoint {
    pub trial: String,
    pub name: String,
    pub lr: f64,
    pub weight_decay: Option<f64>,
    pub status: String,
    /// (step, validation loss) at each rung the trial reached.
    pub rung_losses: Vec<(u64, Option<f64>)>,
    pub final_loss: Option<f64>,
    pub perplexity: Option<f64>,
    pub stopped_step: Option<u64>,
    pub tokens: u64,
}

fn per_step_tokens(c: &TrialConfig) -> u64 {
    (c.train.batch_size * c.train.grad_accum * c.data.context) as u64 * c.train.ranks.max(1) as u64
}

/// What a trial trained: its final count when finished, else its last reported step.
fn tokens_of(r: &TrialRecord, c: &TrialConfig) -> u64 {
    match (&r.metrics, is_done(&r.state)) {
        (Some(m), true) => m.train_tokens,
        _ => r.latest_step.min(c.train.steps) * per_step_tokens(c),
    }
}

fn tuned(r: &TrialRecord) -> Option<(&TrialConfig, String)> {
    let c = r.config.as_ref()?;
    Some((c, c.arm_key()?))
}

/// Ids of each decided arm's winning grid trial: the grid trial whose setting the confirm runs
/// carry, or, without confirm runs, the finished grid trial with the lowest validation loss once
/// every grid trial has ended (the tuner's rule).
pub fn chosen_trials(records: &[TrialRecord]) -> HashSet<String> {
    let mut arms: BTreeMap<String, Vec<&TrialRecord>> = BTreeMap::new();
    for r in records {
        if let Some((_, key)) = tuned(r) {
            arms.entry(key).or_default().push(r);
        }
    }
    let mut out = HashSet::new();
    for members in arms.values() {
        let role = |r: &TrialRecord| {
            r.config
                .as_ref()
                .and_then(|c| c.tune.as_ref())
                .map(|t| t.role)
        };
        let grid: Vec<&&TrialRecord> = members
            .iter()
            .filter(|r| role(r) == Some(TuneRole::Tune))
            .collect();
        let confirm = members.iter().find(|r| role(r) == Some(TuneRole::Confirm));
        let setting = |r: &TrialRecord| {
            r.config
                .as_ref()
                .map(|c| (c.train.lr.to_bits(), c.train.weight_decay.to_bits()))
        };
        let winner = match confirm {
            Some(c) => grid.iter().find(|g| setting(g) == setting(c)).copied(),
            None if grid.iter().all(|g| crate::report::is_terminal(&g.state)) => grid
                .iter()
                .filter(|g| is_done(&g.state))
                .filter_map(|g| Some((*g, g.metrics.as_ref()?.valid_loss)))
                .filter(|(_, l)| l.is_finite())
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(g, _)| g),
            None => None,
        };
        if let Some(w) = winner {
            out.insert(w.id.clone());
        }
    }
    out
}

/// The winning grid trial of each decided arm counts as its first confirm seed: its row's role
/// is `confirm`.
pub fn mark_chosen(rows: &mut [crate::report::SummaryRow], records: &[TrialRecord]) {
    let chosen = chosen_trials(records);
    for r in rows.iter_mut().filter(|r| chosen.contains(&r.trial)) {
        r.role = Some("confirm".to_string());
    }
}

/// The records a tuned sweep is ranked on: the baseline, and each arm's winning grid trial with
/// its confirm runs (the pretrain stage is scored on another corpus and left out).
pub fn confirmed_records(records: &[TrialRecord]) -> Vec<TrialRecord> {
    let chosen = chosen_trials(records);
    records
        .iter()
        .filter(|r| match r.config.as_ref().and_then(|c| c.tune.as_ref()) {
            None => !r
                .config
                .as_ref()
                .is_some_and(|c| matches!(c.method, experiments::trial::Method::Pretrain { .. })),
            Some(t) => t.role == TuneRole::Confirm || chosen.contains(&r.id),
        })
        .cloned()
        .collect()
}

/// The tuning section's content; None for an untuned sweep.
pub fn tuning(records: &[TrialRecord]) -> Option<Tuning> {
    let chosen = chosen_trials(records);
    let mut arms: Vec<(String, TunedArm)> = Vec::new();
    let mut spent_all = 0;
    let mut search = 0;
    for r in records {
        let Some((c, key)) = tuned(r) else { continue };
        let tag = c.tune.as_ref().expect("tuned");
        let idx = match arms.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                let grid = (tag.lr.len() * tag.weight_decay.len().max(1)) as u64;
                arms.push((
                    key.clone(),
                    TunedArm {
                        arm: tag.arm.clone(),
                        method: c.method.family().to_string(),
                        strategy: tag.strategy.name().to_string(),
                        rungs: tag.rungs.clone(),
                        chosen: None,
                        chosen_lr: None,
                        chosen_weight_decay: None,
                        confirm_seeds: tag.confirm_seeds.clone(),
                        confirm: Vec::new(),
                        points: Vec::new(),
                        stopped: 0,
                        tokens_spent: 0,
                        tokens_full_grid: grid * c.train.steps * per_step_tokens(c),
                    },
                ));
                arms.len() - 1
            }
        };
        let arm = &mut arms[idx].1;
        let tokens = tokens_of(r, c);
        arm.tokens_spent += tokens;
        spent_all += tokens;
        if tag.role == TuneRole::Confirm {
            arm.confirm.push(r.name.clone());
            continue;
        }
        search += tokens;
        if chosen.contains(&r.id) {
            arm.chosen = Some(r.name.clone());
            arm.chosen_lr = Some(c.train.lr);
            arm.chosen_weight_decay =
                (!tag.weight_decay.is_empty()).then_some(c.train.weight_decay);
        }
        let stop = r.tune_rungs.iter().find(|d| d.verdict == "stop");
        arm.stopped += stop.is_some() as usize;
        let done = is_done(&r.state);
        arm.points.push(GridPoint {
            trial: r.id.clone(),
            name: r.name.clone(),
            lr: c.train.lr,
            weight_decay: (!tag.weight_decay.is_empty()).then_some(c.train.weight_decay),
            status: r.state.clone(),
            rung_losses: r.tune_rungs.iter().map(|d| (d.step, d.loss)).collect(),
            final_loss: r.metrics.as_ref().filter(|_| done).map(|m| m.valid_loss),
            perplexity: r.metrics.as_ref().filter(|_| done).map(|m| m.perplexity),
            stopped_step: stop.map(|d| d.step),
            tokens,
        });
    }
    if arms.is_empty() {
        return None;
    }
    let mut arms: Vec<TunedArm> = arms.into_iter().map(|(_, a)| a).collect();
    for a in &mut arms {
        a.points.sort_by(|x, y| {
            x.lr.total_cmp(&y.lr).then(
                x.weight_decay
                    .unwrap_or(0.0)
                    .total_cmp(&y.weight_decay.unwrap_or(0.0)),
            )
        });
    }
    let full: u64 = arms.iter().map(|a| a.tokens_full_grid).sum();
    let grid_points = |a: &TunedArm| a.points.len().max(1) as u64;
    let without: u64 = arms
        .iter()
        .map(|a| {
            a.tokens_full_grid
                + a.tokens_full_grid / grid_points(a)
                    * a.confirm_seeds.len().saturating_sub(1) as u64
        })
        .sum();
    let full_seeds: u64 = arms
        .iter()
        .map(|a| a.tokens_full_grid * a.confirm_seeds.len().max(1) as u64)
        .sum();
    Some(Tuning {
        arms,
        tokens_spent: spent_all,
        tokens_search: search,
        tokens_full_grid: full,
        tokens_full_grid_all_seeds: full_seeds,
        tokens_without_stopping: without,
    })
}

/// One line for people: what the search spent against the whole grid.
pub fn tokens_line(t: &Tuning) -> String {
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    format!(
        "the search spent {} training tokens, {:.0} % of the {} of running the whole grid to the \
         end; with the confirm runs {}, {:.0} % of the {} the same table costs without early \
         stopping (the whole grid to the end, then the confirm runs) and {:.0} % of the {} of the \
         whole grid at every confirm seed",
        human_count(t.tokens_search),
        pct(t.tokens_search, t.tokens_full_grid),
        human_count(t.tokens_full_grid),
        human_count(t.tokens_spent),
        pct(t.tokens_spent, t.tokens_without_stopping),
        human_count(t.tokens_without_stopping),
        pct(t.tokens_spent, t.tokens_full_grid_all_seeds),
        human_count(t.tokens_full_grid_all_seeds),
    )
}

fn fmt_loss(l: Option<f64>) -> String {
    l.map_or("—".into(), |l| format!("{l:.4}"))
}

/// summary.md's tuning section: per arm, each grid point's losses at the rungs (its learning-rate
/// curve), how it ended, and the setting chosen.
pub fn tuning_markdown(t: &Tuning) -> String {
    let mut out = String::from("\n## Tuning\n\n");
    let _ = writeln!(out, "{}.\n", tokens_line(t));
    out.push_str("| arm | lr | losses at the rungs (step: loss) | final loss | perplexity | outcome | tokens |\n");
    out.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    for a in &t.arms {
        for p in &a.points {
            let lr = match p.weight_decay {
                Some(w) => format!("{:e} (wd {w})", p.lr),
                None => format!("{:e}", p.lr),
            };
            let rungs = p
                .rung_losses
                .iter()
                .map(|(s, l)| format!("{s}: {}", fmt_loss(*l)))
                .collect::<Vec<_>>()
                .join(" · ");
            let outcome = if a.chosen.as_deref() == Some(p.name.as_str()) {
                "**chosen**".to_string()
            } else if let Some(s) = p.stopped_step {
                format!("stopped at step {s}")
            } else {
                p.status.clone()
            };
            let _ = writeln!(
                out,
                "| {} ({}) | {lr} | {} | {} | {} | {outcome} | {} |",
                a.arm,
                a.strategy,
                if rungs.is_empty() {
                    "—".into()
                } else {
                    rungs
                },
                fmt_loss(p.final_loss),
                p.perplexity.map_or("—".into(), |x| format!("{x:.2}")),
                human_count(p.tokens),
            );
        }
    }
    out.push('\n');
    for a in &t.arms {
        let _ = writeln!(
            out,
            "- **{}**: {} of {} grid points stopped early; {}.",
            a.arm,
            a.stopped,
            a.points.len(),
            match (&a.chosen, a.chosen_lr) {
                (Some(_), Some(lr)) if a.confirm.is_empty() => format!("chose lr {lr:e}"),
                (Some(_), Some(lr)) => format!(
                    "chose lr {lr:e}, confirmed at seeds {:?} ({})",
                    a.confirm_seeds,
                    a.confirm.join(", ")
                ),
                _ => "not decided yet".to_string(),
            }
        );
    }
    out
}
