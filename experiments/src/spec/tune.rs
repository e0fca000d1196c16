//! `[tune]`: every arm of the sweep (a method with its own settings: `freeze-2`, `gradual`,
//! `lora-16`, …) becomes one trial per point of a learning-rate (and optionally weight-decay)
//! grid, tagged with the arm's plan ([`TuneTag`]); the coordinator's tuner stops the weak ones at
//! the rungs and, once an arm is decided, runs its best setting at the other confirm seeds.
//!
//! ```toml
//! [tune]
//! lr = [3e-4, 1e-3, 3e-3]
//! strategy = "asha"          # or "median"
//! reduction_factor = 3       # asha: 1/3 of the trials seen at a rung go on
//! min_steps = 20             # the first rung (default: the first evaluation)
//! confirm_seeds = [0, 1, 2]
//! ```

use std::ops::Range;

use toml::Spanned;

use super::location::Ctx;
use super::raw::RawTune;
use crate::error::Result;
use crate::trial::{Method, TrialConfig, TuneRole, TuneStrategy, TuneTag};

/// `trials` (the untuned expansion) with every arm replaced by its grid points. The pretrain
/// stage and the baseline stay as they are; grid points come interleaved across arms, each arm's
/// middle point first, so every arm's first rung is reached early by the point most likely to
/// win and the others meet a loss to compare against.
pub(super) fn apply(
    ctx: &Ctx,
    t: &Spanned<RawTune>,
    trials: Vec<TrialConfig>,
    seeds_span: Option<Range<usize>>,
) -> Result<Vec<TrialConfig>> {
    let tune_span = t.span();
    let t = t.get_ref();
    if let Some(span) = seeds_span {
        return Err(ctx.err(
            span,
            "with [tune], seeds come from `confirm_seeds` in [tune]: remove `seeds` from [methods]",
        ));
    }
    let lr = grid(ctx, &t.lr, "lr", |v| v > 0.0, "positive")?;
    let weight_decay = match &t.weight_decay {
        Some(w) => grid(ctx, w, "weight_decay", |v| v >= 0.0, "at least 0")?,
        None => Vec::new(),
    };
    let strategy = match t
        .strategy
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None | Some(("asha", _)) => {
            let eta = match &t.reduction_factor {
                Some(r) if *r.get_ref() < 2 => {
                    return Err(ctx.err(r.span(), "`reduction_factor` must be at least 2"))
                }
                Some(r) => *r.get_ref(),
                None => 3,
            };
            TuneStrategy::Asha {
                reduction_factor: eta,
            }
        }
        Some(("median", _)) => {
            if let Some(r) = &t.reduction_factor {
                return Err(ctx.err(
                    r.span(),
                    "`reduction_factor` goes with strategy = \"asha\", not \"median\"",
                ));
            }
            TuneStrategy::Median
        }
        Some((other, span)) => {
            return Err(ctx.err(
                span,
                format!("`strategy` is \"asha\" or \"median\", not `{other}`"),
            ))
        }
    };
    let confirm_seeds = match &t.confirm_seeds {
        Some(s) if s.get_ref().is_empty() => {
            return Err(ctx.err(s.span(), "`confirm_seeds` must not be empty"))
        }
        Some(s) => {
            let mut v: Vec<u64> = Vec::new();
            for &x in s.get_ref() {
                if !v.contains(&x) {
                    v.push(x);
                }
            }
            v
        }
        None => vec![0],
    };
    let mut points: Vec<(f64, Option<f64>)> = Vec::new();
    for &l in &lr {
        if weight_decay.is_empty() {
            points.push((l, None));
        }
        for &w in &weight_decay {
            points.push((l, Some(w)));
        }
    }
    let order = middle_first(points.len());

    let mut fixed = Vec::new();
    let mut arms: Vec<Vec<TrialConfig>> = Vec::new();
    for trial in trials {
        if matches!(trial.method, Method::Baseline | Method::Pretrain { .. }) {
            fixed.push(trial);
            continue;
        }
        let s = &trial.train;
        if s.eval_every == 0 {
            return Err(ctx.err(
                tune_span.clone(),
                format!(
                    "[tune] compares trials at their evaluations, but `{}` evaluates only at the \
                     end: set `eval_every` in [train]",
                    trial.name
                ),
            ));
        }
        let min_steps = match &t.min_steps {
            Some(m) if *m.get_ref() == 0 => {
                return Err(ctx.err(m.span(), "`min_steps` must be at least 1"))
            }
            Some(m) => *m.get_ref(),
            None => s.eval_every,
        };
        let rungs = rungs(&strategy, min_steps, s.eval_every, s.steps);
        if rungs.is_empty() {
            let span = t.min_steps.as_ref().map_or(tune_span.clone(), |m| m.span());
            return Err(ctx.err(
                span,
                format!(
                    "`{}` has no rung before its end: min_steps = {min_steps} with an evaluation \
                     every {} steps reaches no evaluation before step {}",
                    trial.name, s.eval_every, s.steps
                ),
            ));
        }
        let tag = TuneTag {
            arm: trial.name.clone(),
            role: TuneRole::Tune,
            strategy,
            rungs,
            lr: lr.clone(),
            weight_decay: weight_decay.clone(),
            confirm_seeds: confirm_seeds.clone(),
        };
        let arm = order
            .iter()
            .map(|&i| {
                let (l, w) = points[i];
                let mut c = trial.clone();
                c.name = point_name(&tag.arm, l, w);
                c.train.lr = l;
                if let Some(w) = w {
                    c.train.weight_decay = w;
                }
                c.seed = confirm_seeds[0];
                c.tune = Some(tag.clone());
                c
            })
            .collect();
        arms.push(arm);
    }
    if arms.is_empty() {
        return Err(ctx.err(
            tune_span,
            "[tune] needs at least one trained arm in [methods] (the baseline has nothing to tune)",
        ));
    }
    for k in 0..order.len() {
        for arm in &arms {
            fixed.push(arm[k].clone());
        }
    }
    Ok(fixed)
}

/// The name of one grid point of `arm`: `freeze-2 lr=1e-3` (and ` wd=0.1` when tuned).
pub fn point_name(arm: &str, lr: f64, weight_decay: Option<f64>) -> String {
    match weight_decay {
        Some(w) => format!("{arm} lr={lr:e} wd={w}"),
        None => format!("{arm} lr={lr:e}"),
    }
}

/// Distinct values, each checked, in increasing order.
fn grid(
    ctx: &Ctx,
    values: &Spanned<Vec<Spanned<f64>>>,
    key: &str,
    ok: impl Fn(f64) -> bool,
    what: &str,
) -> Result<Vec<f64>> {
    if values.get_ref().is_empty() {
        return Err(ctx.err(values.span(), format!("`{key}` must not be empty")));
    }
    let mut out: Vec<f64> = Vec::new();
    for v in values.get_ref() {
        let x = *v.get_ref();
        if !(x.is_finite() && ok(x)) {
            return Err(ctx.err(v.span(), format!("`{key}` values must be {what}")));
        }
        if !out.contains(&x) {
            out.push(x);
        }
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// Indices 0..n ordered by distance from the middle (lower side first): 3 → [1, 0, 2].
fn middle_first(n: usize) -> Vec<usize> {
    let mid = (n.saturating_sub(1) / 2) as i64;
    let mut v: Vec<usize> = (0..n).collect();
    v.sort_by_key(|&i| ((i as i64 - mid).abs(), i));
    v
}

/// Rung steps: evaluation steps (multiples of `eval_every`) before `steps`. ASHA's rung k is the
/// first evaluation at or after `min_steps · η^k`; the median rule looks at every evaluation from
/// `min_steps` on.
pub fn rungs(strategy: &TuneStrategy, min_steps: u64, eval_every: u64, steps: u64) -> Vec<u64> {
    let at_eval = |s: u64| s.div_ceil(eval_every) * eval_every;
    let mut out = Vec::new();
    match strategy {
        TuneStrategy::Asha { reduction_factor } => {
            let mut target = min_steps;
            loop {
                let r = at_eval(target);
                if r >= steps {
                    break;
                }
                if out.last() != Some(&r) {
                    out.push(r);
                }
                target = target.saturating_mul(*reduction_factor as u64);
            }
        }
        TuneStrategy::Median => {
            let mut r = at_eval(min_steps);
            while r < steps {
                out.push(r);
                r += eval_every;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn middle_point_first() {
        assert_eq!(middle_first(3), vec![1, 0, 2]);
        assert_eq!(middle_first(4), vec![1, 0, 2, 3]);
        assert_eq!(middle_first(1), vec![0]);
    }

    #[test]
    fn rungs_sit_on_evaluations_before_the_end() {
        let asha = TuneStrategy::Asha {
            reduction_factor: 3,
        };
        assert_eq!(rungs(&asha, 10, 10, 100), vec![10, 30, 90]);
        assert_eq!(rungs(&asha, 7, 5, 100), vec![10, 25, 65]);
        assert_eq!(rungs(&asha, 10, 10, 90), vec![10, 30]);
        assert!(rungs(&asha, 100, 10, 100).is_empty());
        assert_eq!(
            rungs(&TuneStrategy::Median, 15, 10, 60),
            vec![20, 30, 40, 50]
        );
    }
}
