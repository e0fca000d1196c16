//! TensorBoard event files, read back by TensorBoard's own reader: the report of the quickstart
//! sweep (configs from the real sweep file, progress events as the coordinator stores them) is
//! written with `write_full_report`, then `scripts/tensorboard_check.py` loads every trial's folder
//! with `EventAccumulator` and prints the scalars and the HParams plugin's session_start_info it
//! parsed. Steps, values (at f32, TensorBoard's scalar type) and hyperparameters must be those
//! written.
//!
//! Needs the reference Python env with the `tensorboard` package (`bash scripts/pyenv.sh`); the
//! interpreter is `$ABLATE_PYTHON`, else `${ABLATE_PYENV:-$HOME/.cache/ablate/pyenv}/bin/python`.
//! Without it the test fails and says so: there is no skipping.

use std::path::PathBuf;
use std::process::Command;

use coordinator::report::files::write_full_report;
use coordinator::report::{ReportMeta, TrialEvents, TrialRecord};
use coordinator::tensorboard::dir_name;
use experiments::trial::{Progress, TrialConfig, TrialMetrics};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    let py = match std::env::var_os("ABLATE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("ABLATE_PYENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                    .join(".cache/ablate/pyenv")
            })
            .join("bin/python"),
    };
    let ok = Command::new(&py)
        .args(["-c", "import tensorboard"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "no Python with the tensorboard package at {} (run `bash scripts/pyenv.sh`, or set ABLATE_PYTHON)",
        py.display()
    );
    py
}

fn quickstart() -> Vec<TrialConfig> {
    let path = root().join("experiments/sweeps/quickstart.toml");
    experiments::spec::load_sweep(&path)
        .expect("quickstart sweep parses")
        .trials
}

/// What TensorBoard's reader saw in each folder.
fn tensorboard_reads(dirs: &[PathBuf]) -> Value {
    let out = Command::new(python())
        .arg(root().join("scripts/tensorboard_check.py"))
        .args(dirs)
        .output()
        .expect("start tensorboard_check.py");
    assert!(
        out.status.success(),
        "tensorboard_check.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("tensorboard_check.py prints JSON")
}

/// Steps 1..=n, with an attempt that was preempted after step 6 and resumed from its step-4
/// checkpoint (steps 5 and 6 replayed with other values: the replay wins).
fn trained_events(n: u64, shift: f64) -> (Vec<Progress>, Vec<i64>) {
    let step = |s: u64, loss: f64| Progress::Step {
        step: s,
        total: n,
        loss,
        lr: 1e-3 * s as f64 / n as f64,
        tokens_per_sec: 1000.0 + s as f64,
    };
    let mut ev = Vec::new();
    for s in 1..=6 {
        ev.push(step(s, 9.0 - 0.1 * s as f64 + shift));
    }
    ev.push(Progress::Checkpoint {
        step: 4,
        dir: "ckpt".into(),
    });
    for s in 5..=n {
        ev.push(step(s, 8.0 - 0.1 * s as f64 + shift));
        if s % 4 == 0 {
            ev.push(Progress::Eval {
                step: s,
                valid_loss: 5.0 - 0.05 * s as f64 + shift,
            });
        }
    }
    ev.push(Progress::Sample {
        prompt: "p".into(),
        text: "t".into(),
    });
    let ms = (0..ev.len() as i64)
        .map(|i| 1_795_426_800_000 + 250 * i)
        .collect();
    (ev, ms)
}

fn assert_series(got: &Value, tag: &str, want: &[(u64, f64)]) {
    let got = got["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no {tag} in {got}"));
    assert_eq!(got.len(), want.len(), "{tag}: {got:?}");
    for (g, (step, v)) in got.iter().zip(want) {
        assert_eq!(g[0].as_u64(), Some(*step), "{tag}");
        // TensorBoard's scalars are f32.
        assert_eq!(
            g[1].as_f64().unwrap() as f32,
            *v as f32,
            "{tag} at step {step}"
        );
    }
}

#[test]
fn tensorboard_reads_every_trials_scalars_and_hparams() {
    let dir = tempfile::tempdir().unwrap();
    let configs = quickstart();
    let n = 12u64;
    let mut records = Vec::new();
    let mut events = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        let trained = !c.name.starts_with("baseline");
        let (ev, ms) = if trained {
            trained_events(n, i as f64 / 10.0)
        } else {
            (
                vec![Progress::Eval {
                    step: 0,
                    valid_loss: 4.75,
                }],
                vec![1_795_426_800_000],
            )
        };
        records.push(TrialRecord {
            id: c.id(),
            config: Some(c.clone()),
            name: c.name.clone(),
            state: "done".into(),
            attempts: 2,
            metrics: Some(TrialMetrics {
                perplexity: 4.75f64.exp(),
                valid_loss: 4.75,
                ..Default::default()
            }),
            started_ms: Some(1_795_426_790_000),
            ..Default::default()
        });
        events.push(TrialEvents {
            id: c.id(),
            name: c.name.clone(),
            events: ev,
            unix_ms: ms,
        });
    }
    let meta = ReportMeta::default();
    // Twice: a rewritten report replaces the earlier event files instead of adding to them.
    write_full_report(dir.path(), &meta, &records, &events).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write_full_report(dir.path(), &meta, &records, &events).unwrap();

    let dirs: Vec<PathBuf> = configs
        .iter()
        .map(|c| dir.path().join("tensorboard").join(dir_name(&c.name)))
        .collect();
    for d in &dirs {
        let files: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files.len(), 1, "{}: {files:?}", d.display());
        assert!(files[0].starts_with("events.out.tfevents."), "{files:?}");
    }
    let seen = tensorboard_reads(&dirs);
    for (i, (c, d)) in configs.iter().zip(&dirs).enumerate() {
        let got = &seen[d.to_str().unwrap()];
        assert_eq!(got["file_version"].as_f64(), Some(2.0), "{}", c.name);
        let hp = &got["hparams"];
        assert_eq!(hp["name"].as_str(), Some(c.name.as_str()), "{hp}");
        assert_eq!(hp["trial"].as_str(), Some(c.id().as_str()));
        assert_eq!(hp["method.kind"].as_str(), Some(c.method.family()));
        assert_eq!(hp["train.lr"].as_f64(), Some(c.train.lr));
        assert_eq!(hp["train.steps"].as_f64(), Some(c.train.steps as f64));
        assert_eq!(hp["seed"].as_f64(), Some(c.seed as f64));
        assert_eq!(hp["data.context"].as_f64(), Some(c.data.context as f64));
        if c.name.starts_with("baseline") {
            assert_series(got, "valid/loss", &[(0, 4.75)]);
            assert_series(got, "valid/perplexity", &[(0, 4.75f64.exp())]);
            assert!(got["scalars"].get("train/loss").is_none(), "{got}");
            continue;
        }
        let shift = i as f64 / 10.0;
        let loss: Vec<(u64, f64)> = (1..=n)
            .map(|s| {
                let base = if s <= 4 { 9.0 } else { 8.0 };
                (s, base - 0.1 * s as f64 + shift)
            })
            .collect();
        assert_series(got, "train/loss", &loss);
        let lr: Vec<(u64, f64)> = (1..=n).map(|s| (s, 1e-3 * s as f64 / n as f64)).collect();
        assert_series(got, "train/lr", &lr);
        let tps: Vec<(u64, f64)> = (1..=n).map(|s| (s, 1000.0 + s as f64)).collect();
        assert_series(got, "train/tokens_per_s", &tps);
        let valid: Vec<(u64, f64)> = [8u64, 12]
            .iter()
            .map(|&s| (s, 5.0 - 0.05 * s as f64 + shift))
            .collect();
        assert_series(got, "valid/loss", &valid);
        let ppl: Vec<(u64, f64)> = valid.iter().map(|&(s, v)| (s, v.exp())).collect();
        assert_series(got, "valid/perplexity", &ppl);
    }
}

/// Names that are not path components still get one folder each.
#[test]
fn trial_names_become_distinct_folders() {
    let dir = tempfile::tempdir().unwrap();
    let ev = |id: &str, name: &str| TrialEvents {
        id: id.into(),
        name: name.into(),
        events: vec![Progress::Eval {
            step: 3,
            valid_loss: 1.0,
        }],
        unix_ms: vec![],
    };
    let events = [ev("a1", "x/y z"), ev("b2", "x y/z"), ev("c3", "../up")];
    let written = coordinator::tensorboard::write_tensorboard(dir.path(), &[], &events).unwrap();
    let names: Vec<String> = written
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["x_y_z", "x_y_z-b2", "_.._up"]);
    for p in &written {
        assert!(
            p.starts_with(dir.path().join("tensorboard")),
            "{}",
            p.display()
        );
        assert_eq!(p.parent().unwrap(), dir.path().join("tensorboard"));
    }
    let seen = tensorboard_reads(&written);
    for p in &written {
        let got = &seen[p.to_str().unwrap()];
        assert_series(got, "valid/loss", &[(3, 1.0)]);
        assert!(got["hparams"].is_null(), "no config, no hparams: {got}");
    }
}
