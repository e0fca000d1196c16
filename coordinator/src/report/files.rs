//! Writing a report directory: every format of [`crate::report`], the HTML page of
//! [`crate::report::html`] and the TensorBoard logs of [`crate::tensorboard`], from the same
//! [`SummaryRow`]s. The only part of the report that touches the filesystem; it sits above the
//! format modules so that none of them imports another's caller (`html` reads `report`'s rows,
//! `report` knows nothing of `html`).

use std::path::Path;

use anyhow::Context as _;

use crate::report::{
    aggregate_csv, aggregate_markdown, aggregate_rows, curves_csv, now_ms, samples_md,
    summary_rows, to_csv, to_json, to_markdown, AggregateRow, ReportMeta, SummaryRow, TrialEvents,
    TrialRecord,
};

/// Write every report file into `dir`: summary.{md,csv,json}, curves.csv, samples.md,
/// trials/<id>.json (the exact resolved config), report.html and tensorboard/<trial name>/. Returns the summary rows (for
/// the stdout table).
pub fn write_report(
    dir: &Path,
    records: &[TrialRecord],
    events: &[TrialEvents],
) -> anyhow::Result<Vec<SummaryRow>> {
    let meta = ReportMeta {
        generated_ms: now_ms(),
        ..ReportMeta::default()
    };
    write_full_report(dir, &meta, records, events)
}

/// [`write_report`] with the sweep's name, id and file for the HTML page. Also writes
/// aggregate.{csv,json} (and a seed table in summary.md) when the sweep has repeated seeds.
pub fn write_full_report(
    dir: &Path,
    meta: &ReportMeta,
    records: &[TrialRecord],
    events: &[TrialEvents],
) -> anyhow::Result<Vec<SummaryRow>> {
    let mut rows = summary_rows(records);
    crate::report::tune::mark_chosen(&mut rows, records);
    let tuning = crate::report::tune::tuning(records);
    // A tuned sweep is ranked by its confirmed results only: each arm's chosen setting over
    // its confirm seeds (the other grid points are the search, shown in the tuning section).
    let aggregate = match &tuning {
        Some(_) => {
            let mut rows = aggregate_rows(&crate::report::tune::confirmed_records(records));
            // Ranked: lowest mean perplexity first (arms without a result last).
            rows.sort_by(|a, b| {
                let p = |r: &AggregateRow| r.perplexity_mean.unwrap_or(f64::INFINITY);
                p(a).total_cmp(&p(b))
            });
            rows
        }
        None => aggregate_rows(records),
    };
    let trials_dir = dir.join("trials");
    std::fs::create_dir_all(&trials_dir)
        .with_context(|| format!("creating report directory {}", trials_dir.display()))?;
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    let mut md = to_markdown(&rows);
    if let Some(t) = &tuning {
        md.push_str(&crate::report::tune::tuning_markdown(t));
        write(
            "tuning.json",
            serde_json::to_string_pretty(t).expect("tuning serialises") + "\n",
        )?;
    }
    if !aggregate.is_empty() {
        md.push_str(if tuning.is_some() {
            "\n## Tuned arms, ranked by their confirm runs\n\n"
        } else {
            "\n## Across seeds\n\n"
        });
        md.push_str(&aggregate_markdown(&aggregate));
        write("aggregate.csv", aggregate_csv(&aggregate))?;
        write(
            "aggregate.json",
            serde_json::to_string_pretty(&aggregate).expect("aggregate rows serialise") + "\n",
        )?;
    }
    write("summary.md", md)?;
    write("summary.csv", to_csv(&rows))?;
    write("summary.json", to_json(&rows))?;
    write("curves.csv", curves_csv(events))?;
    write("samples.md", samples_md(events))?;
    for r in records {
        if let Some(c) = &r.config {
            let path = trials_dir.join(format!("{}.json", r.id));
            let text = serde_json::to_string_pretty(c).expect("TrialConfig serialises") + "\n";
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        }
    }
    write(
        "report.html",
        crate::report::html::report_html(meta, records, &rows, &aggregate, events),
    )?;
    crate::tensorboard::write_tensorboard(dir, records, events)?;
    Ok(rows)
}
