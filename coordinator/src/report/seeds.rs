//! Trials that differ only in their seed, as one row each: mean ± std of the final metrics, the
//! Markdown and CSV tables of them.

use super::*;

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
pub(super) fn strip_seed(name: &str) -> &str {
    match name.rfind(" seed=") {
        Some(i) if name[i + 6..].chars().all(|c| c.is_ascii_digit()) => &name[..i],
        _ => name,
    }
}

/// Group key: the resolved config with the seed and name's seed suffix taken out. Trials that
/// differ in anything else (lr factor, data, base) stay apart.
pub(super) fn seed_group_key(r: &TrialRecord) -> String {
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
