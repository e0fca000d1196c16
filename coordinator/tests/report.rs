//! The report formats, tested without a server: ordering, baseline deltas, agreement between the
//! Markdown, CSV and JSON files, failure reasons, curves and samples. Trial configs come from the
//! real quickstart sweep file, so the ordering is checked on the trials users actually get.

use std::path::Path;

use coordinator::report::files::{write_full_report, write_report};
use coordinator::report::{
    aggregate_csv, aggregate_markdown, aggregate_rows, curves_csv, is_done, mean_std, samples_md,
    summary_rows, to_csv, to_json, to_markdown, to_terminal_table, ReportMeta, SummaryRow,
    TrialEvents, TrialRecord, CSV_COLUMNS,
};
use experiments::trial::{Progress, TrialConfig, TrialMetrics};

fn quickstart() -> Vec<TrialConfig> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/sweeps/quickstart.toml");
    experiments::spec::load_sweep(&path)
        .expect("quickstart sweep parses")
        .trials
}

fn metrics(ppl: f64, trainable: u64) -> TrialMetrics {
    TrialMetrics {
        perplexity: ppl,
        valid_loss: ppl.ln(),
        valid_tokens: 4096,
        train_tokens: 153_600,
        steps: 150,
        trainable_params: trainable,
        total_params: 1_000_000,
        final_train_loss: Some(3.5),
        wall_seconds: 61.25,
        environment: [("candle", "0.11.1"), ("device", "cpu")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

fn record(c: &TrialConfig, state: &str, m: Option<TrialMetrics>) -> TrialRecord {
    TrialRecord {
        id: c.id(),
        config: Some(c.clone()),
        name: c.name.clone(),
        state: state.into(),
        attempts: 1,
        metrics: m,
        reason: None,
        message: None,
        worker: Some("w0/cpu".into()),
        started_ms: Some(1_795_426_800_000),
        finished_ms: Some(1_795_426_861_250),
        ..Default::default()
    }
}

/// Records for the whole quickstart: every trial done with a distinct perplexity except
/// `freeze-2`, which diverged.
fn records() -> Vec<TrialRecord> {
    quickstart()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.name == "freeze-2" {
                let mut r = record(c, "failed", None);
                r.attempts = 3;
                r.reason = Some("diverged".into());
                r.message = Some("loss is NaN at step 17, lr=1e-3".into());
                r
            } else {
                record(
                    c,
                    "done",
                    Some(metrics(100.0 - 7.5 * i as f64, 1000 + i as u64)),
                )
            }
        })
        .collect()
}

fn row<'a>(rows: &'a [SummaryRow], name: &str) -> &'a SummaryRow {
    rows.iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no row {name}"))
}

#[test]
fn rows_are_ordered_pretrain_baseline_then_family_and_parameter() {
    let mut recs = records();
    recs.reverse();
    recs.swap(1, 4);
    let rows = summary_rows(&recs);
    let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "pretrain",
            "baseline",
            "freeze-1",
            "freeze-2",
            "freeze-3",
            "freeze-all",
            "gradual",
            "inheritune-2",
            "inheritune-3",
            "lora-4",
            "lora-16"
        ]
    );
}

#[test]
fn baseline_delta_is_against_the_baseline_on_the_same_data_and_base() {
    let recs = records();
    let rows = summary_rows(&recs);
    let base = row(&rows, "baseline").perplexity.unwrap();
    for name in [
        "freeze-1",
        "freeze-3",
        "freeze-all",
        "gradual",
        "inheritune-3",
    ] {
        let r = row(&rows, name);
        let d = r.baseline_delta.unwrap();
        assert!((d - (r.perplexity.unwrap() - base)).abs() < 1e-12, "{name}");
    }
    assert_eq!(row(&rows, "baseline").baseline_delta, Some(0.0));
    // The pretrain stage is evaluated on other text, from another base: no comparable baseline.
    assert!(row(&rows, "pretrain").perplexity.is_some());
    assert_eq!(row(&rows, "pretrain").baseline_delta, None);
    // Failed trials have neither perplexity nor delta.
    assert_eq!(row(&rows, "freeze-2").perplexity, None);
    assert_eq!(row(&rows, "freeze-2").baseline_delta, None);

    // A second baseline on different data must not be used for trials of the first data set,
    // and a trial on that data compares with it.
    let qs = quickstart();
    let b = qs.iter().find(|c| c.name == "baseline").unwrap();
    let f = qs.iter().find(|c| c.name == "freeze-1").unwrap();
    let mut b2 = b.clone();
    b2.data.context = 64;
    b2.name = "baseline ctx64".into();
    let mut f2 = f.clone();
    f2.data.context = 64;
    f2.name = "freeze-1 ctx64".into();
    let recs = vec![
        record(&b2, "done", Some(metrics(80.0, 0))),
        record(f, "done", Some(metrics(30.0, 10))),
        record(b, "done", Some(metrics(50.0, 0))),
        record(&f2, "done", Some(metrics(70.0, 10))),
    ];
    let rows = summary_rows(&recs);
    assert_eq!(row(&rows, "freeze-1").baseline_delta, Some(-20.0));
    assert_eq!(row(&rows, "freeze-1 ctx64").baseline_delta, Some(-10.0));

    // No finished baseline: no delta (a queued baseline has no perplexity yet).
    let recs = vec![
        record(b, "queued", None),
        record(f, "done", Some(metrics(30.0, 10))),
    ];
    let rows = summary_rows(&recs);
    assert_eq!(row(&rows, "freeze-1").baseline_delta, None);
}

/// Minimal CSV reader for the test (quotes with doubled quotes, no embedded newlines needed).
fn parse_csv_line(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                out.last_mut().unwrap().push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(String::new()),
            (c, _) => out.last_mut().unwrap().push(c),
        }
    }
    out
}

#[test]
fn markdown_csv_and_json_carry_the_same_numbers() {
    let rows = summary_rows(&records());
    let csv = to_csv(&rows);
    let json: serde_json::Value = serde_json::from_str(&to_json(&rows)).unwrap();
    let md = to_markdown(&rows);
    let arr = json.as_array().unwrap();
    assert_eq!(arr.len(), rows.len());

    let mut lines = csv.lines();
    let header = parse_csv_line(lines.next().unwrap());
    assert_eq!(header, CSV_COLUMNS);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let csv_rows: Vec<Vec<String>> = lines.map(parse_csv_line).collect();
    assert_eq!(csv_rows.len(), rows.len());

    for key in [
        "trial",
        "name",
        "method",
        "status",
        "perplexity",
        "baseline_delta",
        "trainable_params",
        "total_params",
        "train_tokens",
        "wall_seconds",
        "attempts",
        "reason",
    ] {
        assert!(arr[0].get(key).is_some(), "summary.json lacks `{key}`");
    }

    for ((r, c), j) in rows.iter().zip(&csv_rows).zip(arr) {
        assert_eq!(c[col("trial")], r.trial);
        assert_eq!(j["trial"], r.trial.as_str());
        assert_eq!(j["name"], c[col("name")].as_str());
        match r.perplexity {
            Some(p) => {
                let from_csv: f64 = c[col("perplexity")].parse().unwrap();
                assert_eq!(from_csv, p);
                assert_eq!(j["perplexity"].as_f64().unwrap(), p);
                let delta = r
                    .baseline_delta
                    .map(|d| format!("{d:+.2}"))
                    .unwrap_or("—".into());
                let md_line = md.lines().find(|l| l.contains(&r.trial)).unwrap();
                assert!(
                    md_line.contains(&format!("| {p:.2} | {delta} |")),
                    "markdown row `{md_line}` lacks {p:.2} / {delta}"
                );
            }
            None => {
                assert_eq!(c[col("perplexity")], "");
                assert!(j["perplexity"].is_null());
            }
        }
        match r.baseline_delta {
            Some(d) => {
                assert_eq!(c[col("baseline_delta")].parse::<f64>().unwrap(), d);
                assert_eq!(j["baseline_delta"].as_f64().unwrap(), d);
            }
            None => assert!(j["baseline_delta"].is_null()),
        }
        if let Some(t) = r.trainable_params {
            assert_eq!(c[col("trainable_params")].parse::<u64>().unwrap(), t);
            assert_eq!(j["trainable_params"].as_u64().unwrap(), t);
        }
        assert_eq!(j["attempts"].as_u64().unwrap(), r.attempts as u64);
    }
}

#[test]
fn failed_rows_carry_their_reason_everywhere() {
    let rows = summary_rows(&records());
    let failed = row(&rows, "freeze-2");
    assert_eq!(failed.status, "failed");
    assert_eq!(failed.reason.as_deref(), Some("diverged"));
    assert_eq!(failed.attempts, 3);

    let md = to_markdown(&rows);
    let md_line = md
        .lines()
        .find(|l| l.contains(&failed.trial) && l.starts_with('|'))
        .unwrap();
    assert!(
        md_line.contains("| failed |") && md_line.contains("| diverged |"),
        "{md_line}"
    );
    assert!(
        md.contains("loss is NaN at step 17"),
        "markdown lacks the failure message"
    );

    let csv = to_csv(&rows);
    let line = csv.lines().find(|l| l.starts_with(&failed.trial)).unwrap();
    let cells = parse_csv_line(line);
    assert_eq!(cells[3], "failed");
    assert_eq!(cells[13], "diverged");
    // The message contains a comma: it must come back whole.
    assert_eq!(cells[14], "loss is NaN at step 17, lr=1e-3");

    let json: serde_json::Value = serde_json::from_str(&to_json(&rows)).unwrap();
    let j = json
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "freeze-2")
        .unwrap();
    assert_eq!(j["reason"], "diverged");
    assert_eq!(j["status"], "failed");

    let table = to_terminal_table(&rows);
    let line = table.lines().find(|l| l.starts_with("freeze-2 ")).unwrap();
    assert!(line.contains("failed (diverged)"), "{line}");
    // Every trial appears once, after a header and a rule.
    assert_eq!(table.lines().count(), rows.len() + 2);
    let ok = table.lines().find(|l| l.starts_with("freeze-1 ")).unwrap();
    let r = row(&rows, "freeze-1");
    assert!(
        ok.contains(&format!("{:.2}", r.perplexity.unwrap())),
        "{ok}"
    );
    assert!(
        ok.contains(&format!("{:+.2}", r.baseline_delta.unwrap())),
        "{ok}"
    );
    assert!(ok.contains("1m01s"), "{ok}");
}

#[test]
fn curves_merge_train_and_valid_loss_by_step_and_keep_the_latest_attempt() {
    let events = vec![TrialEvents {
        id: "abc".into(),
        name: "freeze-1".into(),
        unix_ms: vec![],
        events: vec![
            Progress::Step {
                step: 1,
                total: 4,
                loss: 5.0,
                lr: 1e-3,
                tokens_per_sec: 10.0,
            },
            Progress::Step {
                step: 2,
                total: 4,
                loss: 4.5,
                lr: 1e-3,
                tokens_per_sec: 10.0,
            },
            Progress::Eval {
                step: 2,
                valid_loss: 4.75,
            },
            Progress::Checkpoint {
                step: 2,
                dir: "ckpt".into(),
            },
            // The attempt was preempted after step 3 and resumed from the step-2 checkpoint.
            Progress::Step {
                step: 3,
                total: 4,
                loss: 9.0,
                lr: 1e-3,
                tokens_per_sec: 10.0,
            },
            Progress::Step {
                step: 3,
                total: 4,
                loss: 4.25,
                lr: 1e-3,
                tokens_per_sec: 10.0,
            },
            Progress::Eval {
                step: 4,
                valid_loss: 4.5,
            },
        ],
    }];
    let csv = curves_csv(&events);
    assert_eq!(
        csv,
        "trial,step,train_loss,valid_loss\nabc,1,5,\nabc,2,4.5,4.75\nabc,3,4.25,\nabc,4,,4.5\n"
    );
}

#[test]
fn samples_are_grouped_by_trial_and_fenced_safely() {
    let events = vec![
        TrialEvents {
            id: "t1".into(),
            name: "baseline".into(),
            unix_ms: vec![],
            events: vec![],
        },
        TrialEvents {
            id: "t2".into(),
            name: "freeze-1".into(),
            unix_ms: vec![],
            events: vec![
                Progress::Sample {
                    prompt: "To be".into(),
                    text: "To be or ``` not".into(),
                },
                Progress::Step {
                    step: 1,
                    total: 1,
                    loss: 1.0,
                    lr: 0.0,
                    tokens_per_sec: 1.0,
                },
            ],
        },
    ];
    let md = samples_md(&events);
    assert!(md.contains("## freeze-1 (`t2`)"));
    assert!(!md.contains("## baseline"));
    assert!(md.contains("**Prompt:** To be"));
    assert!(md.contains("````text\nTo be or ``` not\n````"), "{md}");
}

#[test]
fn write_report_writes_every_file_and_the_exact_configs() {
    let dir = tempfile::tempdir().unwrap();
    let recs = records();
    let events: Vec<TrialEvents> = recs
        .iter()
        .map(|r| TrialEvents {
            id: r.id.clone(),
            name: r.name.clone(),
            unix_ms: vec![],
            events: vec![Progress::Eval {
                step: 10,
                valid_loss: 3.0,
            }],
        })
        .collect();
    let rows = write_report(dir.path(), &recs, &events).unwrap();
    assert_eq!(rows.len(), recs.len());
    for f in [
        "summary.md",
        "summary.csv",
        "summary.json",
        "curves.csv",
        "samples.md",
        "report.html",
    ] {
        let text = std::fs::read_to_string(dir.path().join(f)).unwrap();
        assert!(!text.is_empty(), "{f} is empty");
    }
    for r in &recs {
        let text =
            std::fs::read_to_string(dir.path().join(format!("trials/{}.json", r.id))).unwrap();
        let back: TrialConfig = serde_json::from_str(&text).unwrap();
        assert_eq!(&back, r.config.as_ref().unwrap());
        assert_eq!(
            back.id(),
            r.id,
            "the stored config must hash back to the trial id"
        );
    }
    let curves = std::fs::read_to_string(dir.path().join("curves.csv")).unwrap();
    assert_eq!(curves.lines().count(), recs.len() + 1);
}

/// A quickstart-like sweep with three seeds: pretrain/baseline once, each method per seed.
fn seeded_records() -> (Vec<TrialRecord>, Vec<TrialConfig>) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/sweeps/quickstart.toml");
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("seeds = [0]", "seeds = [0, 1, 2]");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("seeded.toml");
    std::fs::write(&file, text).unwrap();
    // The arms these tests rank by name length (below) are the quickstart's layer methods; its
    // LoRA arms have the shortest names and would always be best.
    let configs: Vec<TrialConfig> = experiments::spec::load_sweep(&file)
        .unwrap()
        .trials
        .into_iter()
        .filter(|c| !c.name.starts_with("lora-"))
        .collect();
    let recs = configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if c.name == "freeze-2 seed=1" {
                let mut r = record(c, "failed", None);
                r.reason = Some("out_of_memory".into());
                r
            } else {
                // Perplexity depends on the method and (a little) on the seed.
                let family = c.name.split(" seed=").next().unwrap().len() as f64;
                record(
                    c,
                    "done",
                    Some(metrics(40.0 + family + c.seed as f64, i as u64)),
                )
            }
        })
        .collect();
    (recs, configs)
}

#[test]
fn seeds_of_one_config_are_aggregated_as_mean_and_std() {
    let (recs, configs) = seeded_records();
    let agg = aggregate_rows(&recs);
    assert!(configs.iter().any(|c| c.name == "freeze-1 seed=2"));
    let f1 = agg.iter().find(|a| a.name == "freeze-1").unwrap();
    assert_eq!(f1.seeds, [0, 1, 2]);
    assert_eq!(f1.finished, 3);
    let base = 40.0 + "freeze-1".len() as f64;
    assert!((f1.perplexity_mean.unwrap() - (base + 1.0)).abs() < 1e-9);
    assert!(
        (f1.perplexity_std.unwrap() - 1.0).abs() < 1e-9,
        "sample std of 0,1,2 is 1"
    );
    // The failed seed is left out of the statistics but counted.
    let f2 = agg.iter().find(|a| a.name == "freeze-2").unwrap();
    assert_eq!((f2.finished, f2.trials.len()), (2, 3));
    let b2 = 40.0 + "freeze-2".len() as f64;
    let (m, sd) = mean_std(&[b2, b2 + 2.0]);
    assert_eq!(f2.perplexity_mean, m);
    assert_eq!(f2.perplexity_std, sd);
    // Pretrain and baseline run once: one group each, no std.
    let b = agg.iter().find(|a| a.name == "baseline").unwrap();
    assert_eq!(b.trials.len(), 1);
    assert_eq!(b.perplexity_std, None);
    // Every trial is in exactly one group.
    let n: usize = agg.iter().map(|a| a.trials.len()).sum();
    assert_eq!(n, recs.len());
    let csv = aggregate_csv(&agg);
    let line = csv.lines().find(|l| l.starts_with("freeze-1,")).unwrap();
    assert!(line.contains(",0 1 2,3,"), "{line}");

    // A sweep without repeats has no seed table.
    assert!(aggregate_rows(&records()).is_empty());
}

#[test]
fn html_report_holds_table_seed_table_plots_samples_and_configs() {
    let dir = tempfile::tempdir().unwrap();
    let (recs, _) = seeded_records();
    let events: Vec<TrialEvents> = recs
        .iter()
        .map(|r| {
            let mut events = Vec::new();
            if !r.name.starts_with("baseline") {
                for step in 1..=20u64 {
                    events.push(Progress::Step {
                        step,
                        total: 20,
                        loss: 6.0 - 0.1 * step as f64,
                        lr: 1e-3,
                        tokens_per_sec: 900.0,
                    });
                }
                events.push(Progress::Eval {
                    step: 20,
                    valid_loss: 4.2,
                });
            }
            events.push(Progress::Sample {
                prompt: "Once upon a time".into(),
                text: format!(" <{}> & more", r.name),
            });
            TrialEvents {
                id: r.id.clone(),
                name: r.name.clone(),
                unix_ms: vec![],
                events,
            }
        })
        .collect();
    let meta = ReportMeta {
        sweep_name: "seeded".into(),
        sweep_id: "s-123".into(),
        sweep_text: "name = \"seeded\" # <b>not markup</b>".into(),
        generated_ms: 1_795_426_903_000,
    };
    let rows = write_full_report(dir.path(), &meta, &recs, &events).unwrap();
    let html = std::fs::read_to_string(dir.path().join("report.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<title>ablate report — seeded</title>"));
    assert!(html.contains("2026-11-23 09:41:43 UTC"));
    // One row per trial, with its rounded perplexity and failure reason.
    for r in &rows {
        let at = html
            .find(&format!("data-trial=\"{}\"", r.trial))
            .unwrap_or_else(|| panic!("no row for {}", r.name));
        let tr = &html[at..at + html[at..].find("</tr>").unwrap()];
        match r.perplexity {
            Some(p) => assert!(tr.contains(&format!(">{p:.2}</td>")), "{tr}"),
            None => assert!(tr.contains("failed (out_of_memory)"), "{tr}"),
        }
        assert!(html.contains(&format!("id=\"trial-{}\"", r.trial)));
    }
    // The environment each finished trial recorded (versions, device).
    assert!(
        html.contains("<dt>candle</dt><dd>0.11.1</dd>"),
        "no candle version"
    );
    // Seed table with mean ± std.
    assert!(html.contains("id=\"seed-table\""));
    let base = 40.0 + "freeze-1".len() as f64 + 1.0;
    assert!(
        html.contains(&format!("{base:.2} ± 1.00")),
        "seed table lacks freeze-1's mean ± std"
    );
    let md = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
    assert!(md.contains("## Across seeds"));
    assert!(md.contains(&format!("{base:.2} ± 1.00")));
    assert!(dir.path().join("aggregate.csv").is_file());
    assert!(dir.path().join("aggregate.json").is_file());
    // A chart per trained family (baseline has no curve) and the perplexity bars.
    for family in ["pretrain", "freeze", "gradual", "inheritune"] {
        assert!(
            html.contains(&format!("data-family=\"{family}\"><svg")),
            "no {family} chart"
        );
    }
    assert!(!html.contains("data-family=\"baseline\""));
    assert!(html.contains("<figure id=\"perplexity-figure\"><svg"));
    // Text from trials is escaped, never markup.
    assert!(html.contains("&lt;freeze-1 seed=0&gt; &amp; more"));
    assert!(html.contains("&lt;b&gt;not markup&lt;/b&gt;"));
    assert!(!html.contains("<b>not markup</b>"));
    // The exact config of every trial, as JSON that hashes back to its id.
    let c = recs[3].config.as_ref().unwrap();
    let pretty = serde_json::to_string_pretty(c)
        .unwrap()
        .replace('"', "&quot;");
    assert!(html.contains(&pretty));
}

/// Metrics whose perplexity and loss come from per-window NLL: `offset` nats per token above a
/// shared per-window difficulty, plus `noise` alternating in sign.
fn window_metrics(windows: usize, offset: f64, noise: f64) -> TrialMetrics {
    let tok = 127u64;
    let nll: Vec<f64> = (0..windows)
        .map(|i| {
            let difficulty = 4.0 + 0.5 * (i as f64).sin();
            let wiggle = if i % 2 == 0 { noise } else { -noise * 0.9 };
            tok as f64 * (difficulty + offset + wiggle)
        })
        .collect();
    let loss = nll.iter().sum::<f64>() / (tok * windows as u64) as f64;
    TrialMetrics {
        perplexity: loss.exp(),
        valid_loss: loss,
        valid_tokens: tok * windows as u64,
        valid_window_tokens: vec![tok; windows],
        valid_window_nll: nll,
        ..metrics(1.0, 10)
    }
}

/// The quickstart with per-window NLL: freeze-1 best, freeze-3 a hair worse with noise (not
/// distinguishable), freeze-all clearly worse, gradual scored on other windows (no interval).
fn windowed_records() -> Vec<TrialRecord> {
    quickstart()
        .iter()
        .map(|c| {
            let m = match c.name.as_str() {
                "freeze-2" => {
                    let mut r = record(c, "failed", None);
                    r.reason = Some("diverged".into());
                    return r;
                }
                "baseline" => window_metrics(48, 0.5, 0.0),
                "freeze-1" => window_metrics(48, 0.0, 0.0),
                "freeze-3" => window_metrics(48, 0.002, 0.05),
                "freeze-all" => window_metrics(48, 0.1, 0.01),
                "gradual" => window_metrics(40, 0.05, 0.0),
                _ => window_metrics(48, 0.3, 0.02),
            };
            record(c, "done", Some(m))
        })
        .collect()
}

#[test]
fn deltas_carry_paired_bootstrap_intervals_and_the_best_is_marked() {
    let recs = windowed_records();
    let rows = summary_rows(&recs);
    let best = row(&rows, "freeze-1");
    assert_eq!(best.vs_best.as_deref(), Some("best"));
    assert_eq!(best.best_trial.as_deref(), Some(best.trial.as_str()));
    assert_eq!(best.valid_windows, Some(48));

    let tied = row(&rows, "freeze-3");
    assert_eq!(tied.vs_best.as_deref(), Some("indistinguishable"));
    let ci = tied.best_delta_ci.unwrap();
    assert!(ci[0] < 0.0 && ci[1] > 0.0, "{ci:?}");
    let d = tied.best_delta.unwrap();
    assert!((d - (tied.perplexity.unwrap() - best.perplexity.unwrap())).abs() < 1e-12);
    assert!(ci[0] <= d && d <= ci[1]);
    assert!(tied.best_loss_delta_ci.is_some());

    let worse = row(&rows, "freeze-all");
    assert_eq!(worse.vs_best.as_deref(), Some("worse"));
    assert!(worse.best_delta_ci.unwrap()[0] > 0.0);
    // Better than the baseline, and the interval says so.
    let b = worse.baseline_delta_ci.unwrap();
    assert!(b[1] < 0.0, "{b:?}");
    let lb = worse.baseline_loss_delta_ci.unwrap();
    assert!((worse.baseline_loss_delta.unwrap() - (0.1 - 0.5)).abs() < 0.01);
    assert!(lb[0] <= -0.35 && lb[1] >= -0.45 && lb[1] < 0.0, "{lb:?}");

    let base = row(&rows, "baseline");
    assert_eq!(base.baseline_delta, Some(0.0));
    assert_eq!(base.baseline_delta_ci, None);
    assert_eq!(base.vs_best.as_deref(), Some("worse"));

    // Other windows: the point estimate, no interval, and a note saying why.
    let g = row(&rows, "gradual");
    assert!(g.best_delta.is_some());
    assert_eq!((g.best_delta_ci, g.baseline_delta_ci), (None, None));
    assert_eq!(g.vs_best, None);
    let note = g.interval_note.as_deref().unwrap();
    assert!(
        note.contains("different validation windows: 40 vs 48"),
        "{note}"
    );

    // The pretrain stage is scored on its own data and tokenizer: nothing to compare with.
    let p = rows.iter().find(|r| r.method == "pretrain").unwrap();
    assert_eq!(
        (p.best_trial.as_deref(), p.vs_best.as_deref()),
        (None, None)
    );

    // The same numbers in every format.
    let md = to_markdown(&rows);
    assert!(md.contains("## Differences with 95 % intervals"), "{md}");
    let line = |text: &str, name: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("| {name} |")))
            .unwrap_or_else(|| panic!("no row for {name}"))
            .to_string()
    };
    assert!(line(&md, "freeze-3").contains("| **≈ best** |"));
    let [lo, hi] = ci;
    assert!(
        line(&md, "freeze-3").contains(&format!("{d:+.2} [{lo:+.2}, {hi:+.2}]")),
        "{}",
        line(&md, "freeze-3")
    );
    let main = md.lines().find(|l| l.contains(&best.trial)).unwrap();
    assert!(main.contains("| best |"), "{main}");
    let csv = to_csv(&rows);
    let header = parse_csv_line(csv.lines().next().unwrap());
    let col = |n: &str| header.iter().position(|h| h == n).unwrap();
    let cells = parse_csv_line(csv.lines().find(|l| l.starts_with(&tied.trial)).unwrap());
    assert_eq!(cells[col("vs_best")], "indistinguishable");
    assert_eq!(cells[col("best_delta_lo")].parse::<f64>().unwrap(), lo);
    assert_eq!(cells[col("best_delta_hi")].parse::<f64>().unwrap(), hi);
    assert_eq!(cells[col("best_trial")], best.trial);
    let json: serde_json::Value = serde_json::from_str(&to_json(&rows)).unwrap();
    let j = json
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "freeze-3")
        .unwrap();
    assert_eq!(j["best_delta_ci"][0].as_f64(), Some(lo));
    assert_eq!(j["vs_best"], "indistinguishable");
    let t = to_terminal_table(&rows);
    assert!(
        t.lines()
            .any(|l| l.starts_with("freeze-3 ") && l.contains("≈ best")),
        "{t}"
    );
    // Reproducible: the bootstrap is seeded.
    assert_eq!(summary_rows(&recs), rows);
}

/// Metrics from before per-window NLL was recorded still read, and simply have no interval.
#[test]
fn metrics_without_windows_read_and_have_no_interval() {
    let old = r#"{"perplexity":12.5,"valid_loss":2.5257,"valid_tokens":4096,"train_tokens":0,
        "steps":0,"trainable_params":0,"total_params":10,"final_train_loss":null,"wall_seconds":1.0}"#;
    let m: TrialMetrics = serde_json::from_str(old).unwrap();
    assert!(m.valid_window_nll.is_empty() && m.valid_window_tokens.is_empty());
    // And the new fields are left out of the JSON when empty, so old readers are not surprised.
    assert!(!serde_json::to_string(&m).unwrap().contains("window"));
    let rows = summary_rows(&records());
    assert!(rows
        .iter()
        .all(|r| r.best_delta_ci.is_none() && r.valid_windows.is_none()));
    let f1 = row(&rows, "freeze-1");
    assert!(f1.best_delta.is_some());
    assert!(f1
        .interval_note
        .as_deref()
        .unwrap()
        .contains("no per-window NLL"));
}

#[test]
fn seeds_give_t_intervals_and_the_best_arm() {
    let (mut recs, _) = seeded_records();
    // freeze-all sits around gradual's perplexity, above and below it by seed.
    let gradual: std::collections::HashMap<u64, f64> = recs
        .iter()
        .filter(|r| r.name.starts_with("gradual seed="))
        .map(|r| {
            (
                r.config.as_ref().unwrap().seed,
                r.metrics.as_ref().unwrap().perplexity,
            )
        })
        .collect();
    for r in &mut recs {
        if r.name.starts_with("freeze-all seed=") {
            let s = r.config.as_ref().unwrap().seed;
            r.metrics.as_mut().unwrap().perplexity = gradual[&s] + [0.5, -0.4, 0.2][s as usize];
        }
    }
    let agg = aggregate_rows(&recs);
    let g = agg.iter().find(|a| a.name == "gradual").unwrap();
    assert_eq!(g.vs_best.as_deref(), Some("best"));
    assert_eq!(g.best_arm.as_deref(), Some("gradual"));
    // freeze-1: 48, 49, 50 → 49 ± 1, t(2) = 4.303: 49 ± 4.303/√3.
    let f1 = agg.iter().find(|a| a.name == "freeze-1").unwrap();
    let [lo, hi] = f1.perplexity_ci.unwrap();
    let half = 4.303 / 3f64.sqrt();
    assert!((lo - (49.0 - half)).abs() < 1e-9 && (hi - (49.0 + half)).abs() < 1e-9);
    // One more than gradual at every seed: Δ = 1 exactly, clearly worse.
    assert_eq!(f1.best_delta_mean, Some(1.0));
    assert_eq!(f1.best_delta_ci, Some([1.0, 1.0]));
    assert_eq!(f1.vs_best.as_deref(), Some("worse"));
    let fa = agg.iter().find(|a| a.name == "freeze-all").unwrap();
    assert!((fa.best_delta_mean.unwrap() - 0.1).abs() < 1e-9);
    assert_eq!(fa.vs_best.as_deref(), Some("indistinguishable"));
    // The baseline ran once, at gradual's mean: gradual (three seeds) is the best arm, and the
    // baseline has no interval of its own and no verdict.
    let b = agg.iter().find(|a| a.name == "baseline").unwrap();
    assert_eq!(b.perplexity_mean, g.perplexity_mean);
    assert_eq!((b.perplexity_ci, b.vs_best.as_deref()), (None, None));
    // Against a best arm that ran once, every seed is paired with that one run.
    let mut once = recs.clone();
    once.retain(|r| !r.name.starts_with("gradual") && !r.name.starts_with("freeze-all"));
    let agg1 = aggregate_rows(&once);
    let f1b = agg1.iter().find(|a| a.name == "freeze-1").unwrap();
    assert_eq!(f1b.best_arm.as_deref(), Some("baseline"));
    // 48, 49, 50 against the baseline's 48.
    assert_eq!(f1b.best_delta_mean, Some(1.0));
    assert_eq!(f1b.vs_best.as_deref(), Some("indistinguishable"));
    let md = aggregate_markdown(&agg);
    let line = md
        .lines()
        .find(|l| l.starts_with("| freeze-all |"))
        .unwrap();
    assert!(line.contains("**≈ best**"), "{line}");
    let csv = aggregate_csv(&agg);
    let line = csv.lines().find(|l| l.starts_with("freeze-1,")).unwrap();
    assert!(line.ends_with(",gradual,1,0,1,1,worse,0,0,,0"), "{line}");
}

#[test]
fn cost_sums_attempts_per_trial_and_per_arm_in_every_format() {
    use coordinator::cost::AttemptSpan;
    let (mut recs, _) = seeded_records();
    let span = |attempt, outcome: &str, secs: i64, price| AttemptSpan {
        attempt,
        outcome: outcome.into(),
        started_ms: 1_000,
        ended_ms: Some(1_000 + secs * 1000),
        devices: 1,
        device_kind: "cuda".into(),
        price_per_hour: price,
    };
    for r in &mut recs {
        // Every trial: a 10-minute preempted attempt at 2/h, then a 30-minute finished one on a
        // worker without a price (the sweep's 4/h applies).
        r.attempt_spans = vec![
            span(1, "preempted", 600, 2.0),
            span(2, "finished", 1800, 0.0),
        ];
        r.price_per_hour = Some(4.0);
        if let Some(m) = &mut r.metrics {
            m.train_tokens = 1000;
            m.train_seconds = Some(4.0);
            m.peak_memory_bytes = Some(3 << 30);
        }
    }
    let rows = summary_rows(&recs);
    for r in &rows {
        let c = &r.cost;
        assert_eq!(c.device_seconds, 2400.0, "{}", r.name);
        assert!((c.gpu_hours - 2400.0 / 3600.0).abs() < 1e-12);
        assert!((c.cost.unwrap() - (2.0 / 6.0 + 2.0)).abs() < 1e-12);
        assert!((c.lost_cost.unwrap() - 2.0 / 6.0).abs() < 1e-12);
        assert_eq!((c.lost_device_seconds, c.lost_attempts), (600.0, 1));
        if is_done(&r.status) {
            assert_eq!(c.tokens_per_s, Some(250.0));
            assert_eq!(c.peak_memory_bytes, Some(3 << 30));
        }
    }
    let md = to_markdown(&rows);
    assert!(md.contains("## Cost"), "{md}");
    assert!(
        md.contains("| 40m00s | 0.667 | 2.33 | 10m00s (1 attempt, 0.33) | 250.0 | 3.00 GiB |"),
        "{md}"
    );
    let csv = to_csv(&rows);
    let header = parse_csv_line(csv.lines().next().unwrap());
    let first = parse_csv_line(csv.lines().nth(1).unwrap());
    let col = |name: &str| &first[header.iter().position(|h| h == name).unwrap()];
    assert_eq!(col("device_seconds"), "2400");
    assert_eq!(col("lost_attempts"), "1");
    let json: serde_json::Value = serde_json::from_str(&to_json(&rows)).unwrap();
    assert_eq!(json[0]["cost"]["device_seconds"], 2400.0);
    // Per arm: the seeds' costs add up.
    let agg = aggregate_rows(&recs);
    let arm = agg
        .iter()
        .find(|a| a.trials.len() > 1)
        .expect("an arm with seeds");
    assert_eq!(arm.cost.device_seconds, 2400.0 * arm.trials.len() as f64);
    assert!(aggregate_markdown(&agg).contains("| device time | cost |"));
}

#[test]
fn record_states_read_as_trial_states_with_other_tools_aliases() {
    use coordinator::report::{is_terminal, trial_state};
    use coordinator::scheduler::TrialState;
    for s in [
        "queued",
        "waiting",
        "running",
        "finished",
        "failed",
        "cancelled",
        "stopped",
    ] {
        assert_eq!(trial_state(s).map(TrialState::as_str), Some(s));
    }
    for s in ["done", "succeeded", "completed"] {
        assert_eq!(trial_state(s), Some(TrialState::Finished), "{s}");
        assert!(is_done(s) && is_terminal(s), "{s}");
    }
    assert_eq!(trial_state("canceled"), Some(TrialState::Cancelled));
    assert_eq!(
        trial_state("Finished"),
        None,
        "records hold lower-case states"
    );
    assert!(!is_done("running") && !is_done("stopped"));
    assert!(is_terminal("stopped") && !is_terminal("waiting") && !is_terminal("bogus"));
}
