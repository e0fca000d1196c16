//! The fault suite: real `ablate serve` and `ablate-worker` processes on loopback (or on a veth
//! pair into a network namespace the test creates), a real sweep, and real faults: kill -9 a
//! worker mid-trial, SIGTERM a worker (once, and twice in a row as Slurm does), kill -9 and restart the coordinator, cut a
//! worker's network for a while, wrong tokens and garbage requests, failing trials and a cancel.
//!
//! Every scenario ends with the same audit of the coordinator's SQLite store and report: every
//! trial finished exactly once (one attempt with outcome `finished`), the report has one result
//! per trial, no attempt is left open, the finishing attempt's reports arrived without gaps, and
//! no process of the scenario is left running. Waits poll with generous timeouts; nothing asserts
//! a duration except the bounded exit after SIGTERM, whose bound (the worker's 25 s grace) is far
//! above the normal exit time.
//!
//! Each `#[test]` has its own temp dir, port and (for the network cut) namespace, so they run in
//! parallel. `E2E_VERBOSE=1` streams every process's output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{bin, fault_sweep, find_listen_addr, processes_mentioning, run_cmd, Proc};
use rusqlite::{Connection, OptionalExtension};

const WORKER_TOKEN: &str = "wk-3f9a1c0d7e";
const ADMIN_TOKEN: &str = "ad-8b2e4d6f01";
/// Upper bound of any single wait; scenarios normally take a fraction of it.
const WAIT: Duration = Duration::from_secs(240);

/// One scenario's coordinator, workers and files.
struct Cluster {
    tmp: tempfile::TempDir,
    state: PathBuf,
    worker_token: PathBuf,
    admin_token: PathBuf,
    /// The token file workers are started with (the coordinator's own, unless a scenario
    /// gives them one of their own).
    workers_token: PathBuf,
    /// Extra `ablate serve` arguments.
    serve_args: Vec<String>,
    /// Address to (re)start the coordinator on; the bound port is kept after the first start.
    listen: String,
    ttl_s: u64,
    url: String,
    coord: Option<Proc>,
    coord_logs: Vec<String>,
    workers: Vec<Proc>,
    sweep: String,
}

impl Cluster {
    fn new(name: &str, ttl_s: u64, listen_ip: &str) -> Cluster {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("ablate-fault-{name}-"))
            .tempdir()
            .unwrap();
        let worker_token = tmp.path().join("worker.token");
        let admin_token = tmp.path().join("admin.token");
        std::fs::write(&worker_token, format!("{WORKER_TOKEN}\n")).unwrap();
        std::fs::write(&admin_token, ADMIN_TOKEN).unwrap();
        Cluster {
            state: tmp.path().join("state"),
            tmp,
            workers_token: worker_token.clone(),
            serve_args: Vec::new(),
            worker_token,
            admin_token,
            listen: format!("{listen_ip}:0"),
            ttl_s,
            url: String::new(),
            coord: None,
            coord_logs: Vec::new(),
            workers: Vec::new(),
            sweep: name.to_string(),
        }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    fn start_coordinator(&mut self) {
        let mut cmd = Command::new(bin("ablate"));
        cmd.args(["serve", "--listen", &self.listen, "--state"])
            .arg(&self.state)
            .args(["--lease-ttl", &self.ttl_s.to_string()])
            .arg("--worker-token-file")
            .arg(&self.worker_token)
            .arg("--admin-token-file")
            .arg(&self.admin_token)
            .args(&self.serve_args)
            .env("RUST_LOG", "info");
        let mut p = Proc::spawn("coordinator", &mut cmd);
        let addr = p.wait_for(Duration::from_secs(60), find_listen_addr);
        self.listen = addr.clone();
        self.url = format!("http://{addr}");
        self.coord = Some(p);
    }

    /// kill -9 the coordinator (its log is kept for the assertions at the end).
    fn kill_coordinator(&mut self) {
        let mut p = self.coord.take().expect("coordinator running");
        p.signal(libc::SIGKILL);
        p.wait_timeout(Duration::from_secs(10))
            .expect("killed coordinator exits");
        self.coord_logs
            .extend(p.log.lock().unwrap().iter().cloned());
    }

    /// Start a worker; `prefix` runs it through another program (e.g. `ip netns exec NS`).
    fn spawn_worker_with(&mut self, name: &str, prefix: &[&str], url: &str) -> usize {
        let work = self.root().join("work").join(name);
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("ablate-worker"));
                c
            }
            None => Command::new(bin("ablate-worker")),
        };
        cmd.args(["--coordinator", url, "--name", name, "--token-file"])
            .arg(&self.workers_token)
            .arg("--cache")
            .arg(self.root().join("cache"))
            .arg("--work-dir")
            .arg(&work)
            .env("RUST_LOG", "info")
            // Two workers share two cores: one thread each keeps them from thrashing.
            .env("RAYON_NUM_THREADS", "1");
        self.workers.push(Proc::spawn(name, &mut cmd));
        self.workers.len() - 1
    }

    fn spawn_worker(&mut self, name: &str) -> usize {
        let url = self.url.clone();
        self.spawn_worker_with(name, &[], &url)
    }

    fn worker_index(&self, name: &str) -> usize {
        self.workers
            .iter()
            .position(|w| w.name == name)
            .unwrap_or_else(|| panic!("no worker named {name}"))
    }

    fn ablate(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new(bin("ablate"));
        cmd.args(args);
        let (ok, out, _) = run_cmd(&mut cmd, Duration::from_secs(120));
        (ok, out)
    }

    /// Submit the scenario's sweep (with `text`) through the CLI.
    fn submit(&self, text: &str) {
        let path = self.root().join(format!("{}.toml", self.sweep));
        std::fs::write(&path, text).unwrap();
        let token = self.admin_token.display().to_string();
        let (ok, out) = self.ablate(&[
            "submit",
            path.to_str().unwrap(),
            "--coordinator",
            &self.url,
            "--token-file",
            &token,
        ]);
        assert!(ok, "submit failed:\n{out}");
    }

    fn db(&self) -> Connection {
        let c = Connection::open(self.state.join("ablate.sqlite")).unwrap();
        c.busy_timeout(Duration::from_secs(10)).unwrap();
        c
    }

    /// Poll the store until `f` returns Some; panics with every log after [`WAIT`].
    fn wait_until<T>(&self, what: &str, mut f: impl FnMut(&Connection) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = f(&self.db()) {
                return v;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(150));
        }
    }

    /// A fine-tune trial mid-run: running, with a checkpoint stored for its current attempt and
    /// at least `min_step` steps reported. Returns (trial id, attempt, worker name).
    fn wait_mid_trial(&self, min_step: u64) -> (String, u32, String) {
        let (trial, attempt, worker) = self.wait_mid_trial_on(min_step, "%");
        (trial, attempt, self.worker_name(&worker))
    }

    /// [`Self::wait_mid_trial`] for a trial whose attempt's worker ids (`w1`, or `w1,w2` for a
    /// gang) match the SQL pattern `workers`; returns those ids.
    fn wait_mid_trial_on(&self, min_step: u64, workers: &str) -> (String, u32, String) {
        self.wait_until("a fine-tune trial with a stored checkpoint", |c| {
            c.query_row(
                "SELECT t.id, t.attempts, t.worker_id FROM trials t
                 WHERE t.state = 'running' AND t.depends_on IS NOT NULL AND t.worker_id LIKE ?2
                   AND EXISTS (SELECT 1 FROM artifacts a WHERE a.trial_id = t.id AND a.name LIKE 'ckpt/%')
                   AND (SELECT MAX(CAST(json_extract(e.json, '$.step') AS INTEGER)) FROM events e
                        WHERE e.trial_id = t.id AND e.attempt = t.attempts
                          AND json_extract(e.json, '$.kind') = 'step') >= ?1
                 ORDER BY t.seq LIMIT 1",
                rusqlite::params![min_step as i64, workers],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .unwrap()
        })
    }

    fn worker_name(&self, id: &str) -> String {
        self.db()
            .query_row("SELECT name FROM workers WHERE id = ?1", [id], |r| r.get(0))
            .unwrap()
    }

    /// Wait for an attempt of `trial` after `attempt`; returns its number.
    fn wait_next_attempt(&self, trial: &str, attempt: u32) -> u32 {
        self.wait_until("the next attempt of the trial", |db| {
            db.query_row(
                "SELECT MAX(attempt) FROM attempts WHERE trial_id = ?1",
                [trial],
                |r| r.get::<_, Option<u32>>(0),
            )
            .unwrap()
            .filter(|a| *a > attempt)
        })
    }

    fn wait_all_terminal(&self) {
        self.wait_until("every trial to end", |c| {
            let open: i64 = c
                .query_row(
                    "SELECT COUNT(*) FROM trials WHERE state NOT IN ('finished', 'failed', 'cancelled', 'stopped')",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            let n: i64 = c
                .query_row("SELECT COUNT(*) FROM trials", [], |r| r.get(0))
                .unwrap();
            (n > 0 && open == 0).then_some(())
        });
    }

    /// (attempt, outcome, reason) of every attempt of a trial.
    fn attempts(&self, trial: &str) -> Vec<(u32, Option<String>, String)> {
        let c = self.db();
        let mut st = c
            .prepare(
                "SELECT attempt, outcome, reason FROM attempts WHERE trial_id = ?1 ORDER BY attempt",
            )
            .unwrap();
        let rows = st
            .query_map([trial], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap();
        rows.map(Result::unwrap).collect()
    }

    /// Step numbers reported by one attempt, in sequence order.
    fn steps(&self, trial: &str, attempt: u32) -> Vec<u64> {
        let c = self.db();
        let mut st = c
            .prepare(
                "SELECT CAST(json_extract(json, '$.step') AS INTEGER) FROM events
                 WHERE trial_id = ?1 AND attempt = ?2 AND json_extract(json, '$.kind') = 'step'
                 ORDER BY seq",
            )
            .unwrap();
        let rows = st
            .query_map(rusqlite::params![trial, attempt], |r| r.get::<_, i64>(0))
            .unwrap();
        rows.map(|r| r.unwrap() as u64).collect()
    }

    /// Everything every process printed, for failure messages.
    fn logs(&self) -> String {
        let mut s = String::new();
        if !self.coord_logs.is_empty() {
            s += "--- coordinator (earlier runs)\n";
            s += &self.coord_logs.join("\n");
            s += "\n";
        }
        for p in self.coord.iter().chain(self.workers.iter()) {
            s += &format!("--- {}\n{}\n", p.name, p.tail());
        }
        s
    }

    /// The audit every scenario ends with. Returns the row for the report table.
    fn audit(&mut self, scenario: &str, faults: &str) -> Row {
        self.wait_all_terminal();
        let c = self.db();
        let mut st = c
            .prepare("SELECT id, name, state, attempts FROM trials ORDER BY seq")
            .unwrap();
        let trials: Vec<(String, String, String, u32)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(trials.len(), 3, "pretrain + two fine-tunes (no baseline)");
        let mut duplicates = 0;
        let mut finished = 0;
        for (id, name, state, _) in &trials {
            assert_eq!(
                state,
                "finished",
                "trial {name} ended {state}\n{}",
                self.logs()
            );
            let done: Vec<u32> = self
                .attempts(id)
                .into_iter()
                .filter(|(_, o, _)| o.as_deref() == Some("finished"))
                .map(|(a, _, _)| a)
                .collect();
            assert!(!done.is_empty(), "trial {name} has no finished attempt");
            duplicates += done.len() - 1;
            finished += 1;
            // The finishing attempt's reports all arrived, in order, without gaps or repeats.
            let seqs: Vec<i64> = {
                let mut st = c
                    .prepare(
                        "SELECT seq FROM events WHERE trial_id = ?1 AND attempt = ?2 ORDER BY seq",
                    )
                    .unwrap();
                st.query_map(rusqlite::params![id, done[0]], |r| r.get(0))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect()
            };
            assert!(!seqs.is_empty(), "trial {name}: no reports");
            assert_eq!(
                seqs,
                (0..seqs.len() as i64).collect::<Vec<_>>(),
                "trial {name}: reports lost or out of order"
            );
            let steps = self.steps(id, done[0]);
            assert!(
                steps.windows(2).all(|w| w[0] < w[1]),
                "trial {name}: steps not increasing: {steps:?}"
            );
        }
        assert_eq!(duplicates, 0, "a trial finished more than once");
        let open: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM attempts WHERE ended_ms IS NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(open, 0, "attempts left open (stuck)");
        let metrics: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM trials WHERE metrics_json IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(metrics as usize, trials.len(), "every trial has metrics");

        // The report, read through the CLI, has one result per trial.
        let out = self.root().join("report");
        let token = self.admin_token.display().to_string();
        let (ok, log) = self.ablate(&[
            "report",
            &self.sweep,
            "--out",
            out.to_str().unwrap(),
            "--coordinator",
            &self.url,
            "--token-file",
            &token,
        ]);
        assert!(ok, "report failed:\n{log}");
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap())
                .unwrap();
        let results = rows
            .iter()
            .filter(|r| r["perplexity"].as_f64().is_some_and(f64::is_finite))
            .count();
        assert_eq!(results, trials.len(), "results in the report: {rows:?}");
        let lost = trials.len() - results;

        // Tokens never reach a log.
        let logs = self.logs();
        assert!(
            !logs.contains(WORKER_TOKEN) && !logs.contains(ADMIN_TOKEN),
            "a token was logged"
        );

        // Stop everything and check nothing of this scenario is left running.
        let marker = self.root().display().to_string();
        self.workers.clear();
        self.coord = None;
        let stray = processes_mentioning(&marker);
        assert!(stray.is_empty(), "processes left behind: {stray:?}");

        let row = Row {
            scenario: scenario.into(),
            faults: faults.into(),
            trials: trials.len(),
            completed: finished,
            lost,
            duplicates,
        };
        println!(
            "FAULT-ROW | {} | {} | {} | {} | {} | {} |",
            row.scenario, row.faults, row.trials, row.completed, row.lost, row.duplicates
        );
        row
    }
}

#[allow(dead_code)]
struct Row {
    scenario: String,
    faults: String,
    trials: usize,
    completed: usize,
    lost: usize,
    duplicates: usize,
}

/// First step a later attempt reported must come after a checkpoint (it resumed, not restarted).
fn assert_resumed(c: &Cluster, trial: &str, attempt: u32) {
    let steps = c.steps(trial, attempt);
    let first = *steps
        .first()
        .unwrap_or_else(|| panic!("attempt {attempt} reported no step\n{}", c.logs()));
    assert!(
        first > 1,
        "attempt {attempt} started from scratch (first step {first}) instead of the checkpoint"
    );
}

const PRE_STEPS: u64 = 20;
const FT_STEPS: u64 = 400;
const NETCUT_FT_STEPS: u64 = 2000;

#[test]
fn kill9_worker_mid_trial_resumes_elsewhere_from_the_checkpoint() {
    let mut c = Cluster::new("kill9-worker", 4, "127.0.0.1");
    c.start_coordinator();
    c.submit(&fault_sweep(&c.sweep.clone(), PRE_STEPS, FT_STEPS));
    c.spawn_worker("a");
    c.spawn_worker("b");
    let (trial, attempt, victim) = c.wait_mid_trial(FT_STEPS / 10 + 1);
    let i = c.worker_index(&victim);
    c.workers[i].signal(libc::SIGKILL);
    c.workers[i].wait_timeout(Duration::from_secs(10)).unwrap();
    // The survivor (or a replacement) takes the trial once the lease has expired.
    c.spawn_worker("c");
    let next = c.wait_next_attempt(&trial, attempt);
    c.wait_all_terminal();
    let attempts = c.attempts(&trial);
    assert_eq!(
        attempts[(attempt - 1) as usize].1.as_deref(),
        Some("expired"),
        "{attempts:?}"
    );
    assert_resumed(&c, &trial, next);
    c.audit("kill -9 worker mid-trial", "SIGKILL one of two workers");
}

/// Fine-tune steps of the gang scenario (two ranks share the two cores, so fewer steps).
const GANG_FT_STEPS: u64 = 150;

#[test]
fn kill9_one_rank_of_a_gang_ends_the_attempt_for_both_and_the_gang_resumes() {
    let mut c = Cluster::new("kill9-gang", 4, "127.0.0.1");
    c.start_coordinator();
    let sweep = fault_sweep(&c.sweep.clone(), PRE_STEPS, GANG_FT_STEPS)
        .replace("[train]\n", "[train]\nranks = 2\n");
    c.submit(&sweep);
    for w in ["a", "b", "c"] {
        c.spawn_worker(w);
    }
    // A two-rank fine-tune mid-run, with a checkpoint from rank 0 stored.
    let (trial, attempt, members) = c.wait_mid_trial_on(GANG_FT_STEPS / 10 + 1, "%,%");
    let ids: Vec<&str> = members.split(',').collect();
    assert_eq!(ids.len(), 2, "gang members {members}");
    let (rank0, rank1) = (c.worker_name(ids[0]), c.worker_name(ids[1]));
    // Kill rank 1: rank 0 must not train on alone (nor wait forever); the attempt ends for both.
    let i = c.worker_index(&rank1);
    c.workers[i].signal(libc::SIGKILL);
    c.workers[i].wait_timeout(Duration::from_secs(10)).unwrap();
    c.spawn_worker("d");
    let next = c.wait_next_attempt(&trial, attempt);
    c.wait_all_terminal();
    let attempts = c.attempts(&trial);
    let killed = &attempts[(attempt - 1) as usize];
    assert!(
        matches!(killed.1.as_deref(), Some("failed") | Some("expired")),
        "the attempt with a dead rank must end (failed by rank 0, or expired): {attempts:?}"
    );
    // Every attempt of a gang trial ran on two workers.
    let db = c.db();
    let mut st = db
        .prepare("SELECT worker_id FROM attempts WHERE trial_id = ?1 ORDER BY attempt")
        .unwrap();
    let rows: Vec<String> = st
        .query_map([&trial], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        rows.iter().all(|w| w.split(',').count() == 2),
        "gang attempts: {rows:?}"
    );
    drop(st);
    drop(db);
    assert_resumed(&c, &trial, next);
    println!("gang {trial}: ranks {rank0} + {rank1}, killed {rank1}; attempts {attempts:?}");
    c.audit(
        "kill -9 one rank of a 2-rank gang",
        "SIGKILL rank 1 mid-trial; the survivor stops, the gang re-forms and resumes",
    );
}

#[test]
fn sigterm_worker_checkpoints_reports_preempted_and_exits() {
    let mut c = Cluster::new("sigterm-worker", 5, "127.0.0.1");
    c.start_coordinator();
    c.submit(&fault_sweep(&c.sweep.clone(), PRE_STEPS, FT_STEPS));
    c.spawn_worker("a");
    c.spawn_worker("b");
    let (trial, attempt, victim) = c.wait_mid_trial(FT_STEPS / 10 + 1);
    let i = c.worker_index(&victim);
    let work = c.root().join("work").join(&victim).display().to_string();
    let t0 = Instant::now();
    c.workers[i].signal(libc::SIGTERM);
    let status = c.workers[i]
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("worker did not exit after SIGTERM\n{}", c.logs()));
    let took = t0.elapsed();
    println!("worker exited {took:?} after SIGTERM with {status}");
    assert!(
        status.success(),
        "graceful stop exits 0: {status}\n{}",
        c.logs()
    );
    assert!(
        took < Duration::from_secs(30),
        "exit is bounded by the grace period"
    );
    assert!(
        processes_mentioning(&work).is_empty(),
        "the stopped worker left processes behind"
    );
    let attempts = c.attempts(&trial);
    let (_, outcome, reason) = &attempts[(attempt - 1) as usize];
    assert_eq!(
        (outcome.as_deref(), reason.as_str()),
        (Some("preempted"), "preempted")
    );
    let spent: u32 = c
        .db()
        .query_row("SELECT spent FROM trials WHERE id = ?1", [&trial], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(spent, 0, "preemption spends no retry budget");

    // Two signals 20 ms apart (Slurm's and a supervisor's copy of one scancel) are one request:
    // the worker still checkpoints and reports a preemption instead of exiting at once.
    let (trial2, attempt2, victim2) = c.wait_mid_trial(1);
    let j = c.worker_index(&victim2);
    c.workers[j].signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(20));
    c.workers[j].signal(libc::SIGTERM);
    let status = c.workers[j]
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("worker did not stop after two signals\n{}", c.logs()));
    println!("worker stopped by two signals with {status}; trial {trial2} attempt {attempt2}");
    assert!(
        status.success(),
        "a repeated signal is the same graceful stop: {status}\n{}",
        c.logs()
    );
    let attempts2 = c.attempts(&trial2);
    let (_, outcome2, _) = &attempts2[(attempt2 - 1) as usize];
    assert_eq!(
        outcome2.as_deref(),
        Some("preempted"),
        "the doubly signalled attempt was checkpointed and reported\n{}",
        c.logs()
    );

    c.spawn_worker("c");
    let next = c.wait_until("the resumed attempt", |db| {
        db.query_row(
            "SELECT MAX(attempt) FROM attempts WHERE trial_id = ?1 AND outcome = 'finished'",
            [&trial],
            |r| r.get::<_, Option<u32>>(0),
        )
        .unwrap()
    });
    assert_resumed(&c, &trial, next);
    c.audit(
        "SIGTERM worker",
        "SIGTERM once, and twice 20 ms apart (one request): both graceful",
    );
}

#[test]
fn kill9_coordinator_restart_keeps_results_and_running_attempts() {
    // A long ttl: the restart must not cost the running attempts their leases.
    let mut c = Cluster::new("kill9-coord", 20, "127.0.0.1");
    c.start_coordinator();
    c.submit(&fault_sweep(&c.sweep.clone(), PRE_STEPS, FT_STEPS));
    c.spawn_worker("a");
    c.spawn_worker("b");
    let (trial, attempt, _) = c.wait_mid_trial(FT_STEPS / 10 + 1);
    let pretrain_metrics: String = c
        .db()
        .query_row(
            "SELECT metrics_json FROM trials WHERE depends_on IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    c.kill_coordinator();
    std::thread::sleep(Duration::from_secs(1));
    c.start_coordinator();
    c.wait_all_terminal();
    let attempts = c.attempts(&trial);
    assert_eq!(
        attempts.last().map(|a| (a.0, a.1.as_deref())),
        Some((attempt, Some("finished"))),
        "the attempt running across the restart carried on: {attempts:?}"
    );
    let lost: i64 = c
        .db()
        .query_row(
            "SELECT COUNT(*) FROM attempts WHERE outcome IN ('lost', 'expired')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(lost, 0, "no attempt lost to the restart\n{}", c.logs());
    let after: String = c
        .db()
        .query_row(
            "SELECT metrics_json FROM trials WHERE depends_on IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(after, pretrain_metrics, "finished results intact");
    c.audit(
        "kill -9 coordinator + restart",
        "SIGKILL the coordinator mid-sweep, restart on the same state dir",
    );
}

#[test]
fn wrong_tokens_garbage_and_hostile_input_are_refused_and_the_sweep_completes() {
    let mut c = Cluster::new("bad-input", 10, "127.0.0.1");
    c.start_coordinator();
    let bad_token = c.root().join("bad.token");
    std::fs::write(&bad_token, "not-the-token-77").unwrap();
    let bad = bad_token.display().to_string();
    let url = c.url.clone();

    // A client with a wrong admin token is refused, and says so without printing either token.
    let sweep_path = c.root().join("s.toml");
    std::fs::write(&sweep_path, fault_sweep(&c.sweep, PRE_STEPS, FT_STEPS)).unwrap();
    let (ok, out) = c.ablate(&[
        "submit",
        sweep_path.to_str().unwrap(),
        "--coordinator",
        &url,
        "--token-file",
        &bad,
    ]);
    assert!(!ok, "wrong token accepted:\n{out}");
    assert!(out.to_lowercase().contains("token"), "{out}");
    assert!(
        !out.contains("not-the-token-77") && !out.contains(ADMIN_TOKEN),
        "{out}"
    );
    // The worker token does not open the admin service.
    let wt = c.worker_token.display().to_string();
    let (ok, _) = c.ablate(&["list", "--coordinator", &url, "--token-file", &wt]);
    assert!(!ok, "worker token opened SweepService");

    // A worker with a wrong token gives up with a clear error, not a retry loop.
    let mut cmd = Command::new(bin("ablate-worker"));
    cmd.args([
        "--coordinator",
        &url,
        "--name",
        "intruder",
        "--token-file",
        &bad,
    ])
    .arg("--cache")
    .arg(c.root().join("cache"))
    .arg("--work-dir")
    .arg(c.root().join("work/intruder"));
    let (ok, out, _) = run_cmd(&mut cmd, Duration::from_secs(60));
    assert!(!ok, "worker with a wrong token ran:\n{out}");
    assert!(out.to_lowercase().contains("token"), "{out}");
    assert!(!out.contains("not-the-token-77"), "{out}");

    // Garbage on the wire: random bytes, plain HTTP/1, a truncated HTTP/2 preface.
    let addr = c.listen.clone();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for payload in [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"PRI * HTTP/2.0\r\n\r\nSM".to_vec(),
        (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect(),
    ] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(&payload);
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
    }

    // Hostile sweep files: a clear error naming the file and line; nothing reaches the server.
    let admin = c.admin_token.display().to_string();
    for (i, text) in [
        "name = \"x\"\n[methods]\nfreeze = [99]\n".to_string(),
        "name = \"x\"\n[data\npaths = [\"/etc/passwd\"]\n".to_string(),
        format!("name = \"{}\"\n", "\u{0}".repeat(3)),
        "\u{feff}[[[[".to_string(),
    ]
    .iter()
    .enumerate()
    {
        let p = c.root().join(format!("hostile-{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let (ok, out) = c.ablate(&[
            "submit",
            p.to_str().unwrap(),
            "--coordinator",
            &url,
            "--token-file",
            &admin,
        ]);
        assert!(!ok, "hostile sweep {i} accepted:\n{out}");
        assert!(
            out.contains(&format!("hostile-{i}.toml")),
            "error names the file: {out}"
        );
    }

    // The coordinator is still up and serves the real sweep to the end.
    assert!(
        c.coord
            .as_mut()
            .unwrap()
            .child
            .try_wait()
            .unwrap()
            .is_none(),
        "coordinator died\n{}",
        c.logs()
    );
    c.submit(&fault_sweep(&c.sweep.clone(), PRE_STEPS, FT_STEPS / 4));
    c.spawn_worker("a");
    c.audit(
        "wrong tokens + garbage",
        "wrong admin/worker tokens, worker token on admin API, raw garbage bytes, 4 hostile sweep files",
    );
}

#[test]
fn failure_reasons_are_recorded_deterministic_ones_not_retried_and_cancel_is_prompt() {
    let mut c = Cluster::new("reasons", 10, "127.0.0.1");
    c.start_coordinator();
    // The base diverges: lr 1e30 turns the loss into inf/NaN within a step or two.
    let diverge = fault_sweep("reasons-diverge", PRE_STEPS, FT_STEPS).replacen(
        "lr = 3e-3\nwarmup_steps = 2",
        "lr = 1e30\nwarmup_steps = 2",
        1,
    );
    // The fine-tunes read a corpus that is not there.
    let missing_path = c.root().join("no-such-corpus.txt").display().to_string();
    let missing = fault_sweep("reasons-missing", PRE_STEPS + 1, FT_STEPS).replace(
        &format!(
            "paths = [\"{0}/Apache-2.0\", \"{0}/MPL-2.0\"]",
            e2e::LICENSE_DIR
        ),
        &format!("paths = [\"{missing_path}\"]"),
    );
    assert!(missing.contains("no-such-corpus"));
    // Long fine-tunes, cancelled mid-run.
    let long = fault_sweep("reasons-cancel", PRE_STEPS + 2, FT_STEPS * 10);
    for (name, text) in [
        ("reasons-diverge", &diverge),
        ("reasons-missing", &missing),
        ("reasons-cancel", &long),
    ] {
        c.sweep = name.to_string();
        c.submit(text);
    }
    c.spawn_worker("a");
    c.spawn_worker("b");

    // Cancel the long sweep while a fine-tune of it runs.
    let running = c.wait_until("a running fine-tune of the long sweep", |db| {
        db.query_row(
            "SELECT t.id, w.name FROM trials t JOIN workers w ON w.id = t.worker_id
             WHERE t.state = 'running' AND t.config_json LIKE '%\"steps\":4000%'
               AND EXISTS (SELECT 1 FROM events e WHERE e.trial_id = t.id AND e.attempt = t.attempts)
             LIMIT 1",
            [],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )
        .optional()
        .unwrap()
    });
    let admin = c.admin_token.display().to_string();
    let t0 = Instant::now();
    let (ok, out) = c.ablate(&[
        "cancel",
        "reasons-cancel",
        "--coordinator",
        &c.url,
        "--token-file",
        &admin,
    ]);
    assert!(ok, "{out}");
    let i = c.worker_index(&running.1);
    c.workers[i].wait_for(WAIT, |l| {
        l.contains("stopped: the lease was cancelled or taken away")
            .then_some(())
    });
    println!(
        "cancelled attempt stopped on its worker {:?} after the cancel",
        t0.elapsed()
    );

    c.wait_all_terminal();
    let db = c.db();
    let mut st = db
        .prepare(
            "SELECT t.name, s.name, t.state, t.attempts, t.failure_reason, t.depends_on IS NULL
             FROM trials t JOIN sweep_trials st ON st.trial_id = t.id JOIN sweeps s ON s.id = st.sweep_id
             ORDER BY t.seq",
        )
        .unwrap();
    let rows: Vec<(String, String, String, u32, String, bool)> = st
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 9, "{rows:#?}");
    for (name, sweep, state, attempts, reason, is_base) in &rows {
        let got = (state.as_str(), reason.as_str(), *attempts);
        match (sweep.as_str(), *is_base) {
            ("reasons-diverge", true) => assert_eq!(got, ("failed", "diverged", 1), "{name}"),
            ("reasons-diverge", false) => {
                assert_eq!((got.0, got.1), ("failed", "dependency_failed"), "{name}")
            }
            ("reasons-missing", true) => assert_eq!(got.0, "finished", "{name}"),
            ("reasons-missing", false) => {
                assert_eq!(got, ("failed", "bad_input", 1), "{name}: not retried")
            }
            ("reasons-cancel", true) => assert_eq!(got.0, "finished", "{name}"),
            (_, false) => assert_eq!(got.0, "cancelled", "{name}"),
            other => panic!("unexpected trial {name} {other:?}"),
        }
    }
    let open: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM attempts WHERE ended_ms IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(open, 0, "attempts left open");
    let finished_twice: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM (SELECT trial_id FROM attempts WHERE outcome = 'finished'
             GROUP BY trial_id HAVING COUNT(*) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(finished_twice, 0);
    let marker = c.root().display().to_string();
    c.workers.clear();
    c.coord = None;
    assert!(processes_mentioning(&marker).is_empty());
    println!(
        "FAULT-ROW | failure reasons + cancel | diverging base, missing corpus, cancel mid-run | {} | {} | 0 | {} |",
        rows.len(),
        rows.len(),
        finished_twice
    );
}

/// A network namespace joined to the host by a veth pair; removed (with the pair) on drop.
struct NetNs {
    name: String,
    ns_if: String,
    host_ip: String,
}

impl NetNs {
    /// Create it, or say why it cannot be done here (not root, no `ip`, no netns support).
    fn create() -> Result<NetNs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let pid = std::process::id();
        let name = format!("ablate-fault-{pid}");
        let (host_if, ns_if) = (format!("abh{pid}"), format!("abn{pid}"));
        let (x, y) = ((pid >> 8) & 0xff, pid & 0xfc);
        let host_ip = format!("10.213.{x}.{}", y + 1);
        let ns_ip = format!("10.213.{x}.{}", y + 2);
        let ns = NetNs {
            name: name.clone(),
            ns_if: ns_if.clone(),
            host_ip: host_ip.clone(),
        };
        let steps: Vec<Vec<String>> = vec![
            vec!["netns", "add", &name],
            vec![
                "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
            ],
            vec!["link", "set", &ns_if, "netns", &name],
            vec!["addr", "add", &format!("{host_ip}/30"), "dev", &host_if],
            vec!["link", "set", &host_if, "up"],
            vec![
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ns_ip}/30"),
                "dev",
                &ns_if,
            ],
            vec!["-n", &name, "link", "set", &ns_if, "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ]
        .into_iter()
        .map(|v| v.into_iter().map(String::from).collect())
        .collect();
        for args in steps {
            ip(&args).map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
        }
        Ok(ns)
    }

    fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }

    /// Cut (or restore) the link from inside the namespace: the worker can no longer reach the
    /// coordinator, and nothing else changes.
    fn set_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&[
            "-n".into(),
            self.name.clone(),
            "link".into(),
            "set".into(),
            self.ns_if.clone(),
            state.into(),
        ])
        .unwrap();
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the host end.
        let _ = ip(&["netns".into(), "del".into(), self.name.clone()]);
    }
}

fn ip(args: &[String]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[test]
#[cfg_attr(
    not(ablate_ci),
    ignore = "needs root for a network namespace (ip netns); scripts/test and CI run it"
)]
fn network_cut_worker_keeps_training_replays_reports_and_the_lease_decides() {
    let ns = NetNs::create().unwrap_or_else(|why| {
        panic!("the network cut scenario needs a network namespace (run as root): {why}")
    });
    // Long enough that a short cut never costs the lease; the long cut outlasts it.
    let ttl = 12;
    let mut c = Cluster::new("netcut", ttl, &ns.host_ip);
    c.start_coordinator();
    c.submit(&fault_sweep(&c.sweep.clone(), PRE_STEPS, NETCUT_FT_STEPS));
    let url = c.url.clone();
    let prefix = ns.exec_prefix();
    let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
    c.spawn_worker_with("a", &prefix, &url);
    c.spawn_worker("b");

    // A fine-tune running on the worker behind the namespace, with a checkpoint stored.
    let (trial, attempt) = c.wait_until("a fine-tune on the namespaced worker", |db| {
        db.query_row(
            "SELECT t.id, t.attempts FROM trials t JOIN workers w ON w.id = t.worker_id
             WHERE t.state = 'running' AND t.depends_on IS NOT NULL AND w.name = 'a'
               AND EXISTS (SELECT 1 FROM artifacts a WHERE a.trial_id = t.id AND a.name LIKE 'ckpt/%')",
            [],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)),
        )
        .optional()
        .unwrap()
    });

    // 1. A short cut: the worker trains on, spools its reports and replays them in order.
    let before = c.steps(&trial, attempt).last().copied().unwrap_or(0);
    ns.set_link(false);
    std::thread::sleep(Duration::from_secs(3));
    let during = c.steps(&trial, attempt).last().copied().unwrap_or(0);
    ns.set_link(true);
    let replayed = c.wait_until("reports made during the cut to arrive", |_| {
        let steps = c.steps(&trial, attempt);
        let last = steps.last().copied().unwrap_or(0);
        (last > during + 5).then_some(last)
    });
    let seqs: Vec<i64> = {
        let db = c.db();
        let mut st = db
            .prepare("SELECT seq FROM events WHERE trial_id = ?1 AND attempt = ?2 ORDER BY seq")
            .unwrap();
        st.query_map(rusqlite::params![trial, attempt], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    assert_eq!(
        seqs,
        (0..seqs.len() as i64).collect::<Vec<_>>(),
        "reports made during the cut were lost or reordered"
    );
    let state: (String, u32) = c
        .db()
        .query_row(
            "SELECT state, attempts FROM trials WHERE id = ?1",
            [&trial],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    println!(
        "short cut: last step {before} before, {during} seen during, {replayed} after; trial {state:?}"
    );
    assert!(
        state == ("running".to_string(), attempt) || state == ("finished".to_string(), attempt),
        "a short cut must not cost the lease: {state:?}\n{}",
        c.logs()
    );

    // 2. A long cut: the lease expires, another worker resumes the trial from the checkpoint,
    //    and when the cut worker comes back the lease tells it to stop.
    if state.0 == "running" {
        ns.set_link(false);
        // The trial moves to another worker.
        let next = c.wait_next_attempt(&trial, attempt);
        ns.set_link(true);
        let a = c.worker_index("a");
        c.workers[a].wait_for(WAIT, |l| {
            (l.contains("cancel order received")
                || l.contains("lease was taken away")
                || l.contains("completion not accepted"))
            .then_some(())
        });
        c.wait_all_terminal();
        let attempts = c.attempts(&trial);
        assert_eq!(
            attempts[(attempt - 1) as usize].1.as_deref(),
            Some("expired"),
            "{attempts:?}"
        );
        assert_resumed(&c, &trial, next);
    } else {
        println!("the trial finished before the long cut; only the short cut was exercised");
    }
    c.audit(
        "network cut",
        "worker in a netns: 3 s cut (< ttl), then a cut until its lease expired",
    );
    drop(ns);
}

/// Drain, three ways, in one sweep: `ablate drain W --checkpoint` (the worker checkpoints, gives
/// its trial back as a preemption and exits 0), SIGUSR1 on a worker (it finishes its trial, takes
/// no new one, exits 0) and `ablate drain W` (the same, ordered by the coordinator). Another
/// worker resumes the given-back trial from its checkpoint; the audit sees every trial finished
/// once.
#[test]
fn drain_by_the_coordinator_and_by_sigusr1_finishes_or_gives_back_and_exits() {
    let mut c = Cluster::new("drain", 5, "127.0.0.1");
    c.start_coordinator();
    c.submit(&fault_sweep(&c.sweep.clone(), PRE_STEPS, FT_STEPS));
    c.spawn_worker("a");
    c.spawn_worker("b");
    let token = c.admin_token.display().to_string();
    let url = c.url.clone();
    let drain = |c: &Cluster, args: &[&str]| {
        let mut a = vec!["drain"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["--coordinator", &url, "--token-file", &token]);
        c.ablate(&a)
    };
    let (ok, out) = drain(&c, &["nobody"]);
    assert!(!ok && out.contains("no worker named \"nobody\""), "{out}");

    // 1. --checkpoint: the trial is given back at once.
    let (trial, attempt, victim) = c.wait_mid_trial(FT_STEPS / 10 + 1);
    let (ok, out) = drain(&c, &[&victim, "--checkpoint"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("drained worker {victim}")), "{out}");
    assert!(
        out.contains(&trial),
        "the drain names the running trial: {out}"
    );
    let i = c.worker_index(&victim);
    let status = c.workers[i]
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("drained worker did not exit\n{}", c.logs()));
    assert!(status.success(), "drained worker: {status}\n{}", c.logs());
    let attempts = c.attempts(&trial);
    assert_eq!(
        attempts[(attempt - 1) as usize].1.as_deref(),
        Some("preempted"),
        "the drained attempt was checkpointed and given back\n{}",
        c.logs()
    );

    // 2. SIGUSR1 on the other worker: it finishes what it runs, takes nothing new.
    let (trial2, attempt2, other) = c.wait_mid_trial(1);
    assert_ne!(other, victim);
    let j = c.worker_index(&other);
    c.workers[j].signal(libc::SIGUSR1);
    let status = c.workers[j]
        .wait_timeout(WAIT)
        .unwrap_or_else(|| panic!("SIGUSR1-drained worker did not exit\n{}", c.logs()));
    assert!(status.success(), "SIGUSR1 drain: {status}\n{}", c.logs());
    let attempts2 = c.attempts(&trial2);
    assert_eq!(
        attempts2[(attempt2 - 1) as usize].1.as_deref(),
        Some("finished"),
        "SIGUSR1 lets the running trial finish\n{}",
        c.logs()
    );
    let other_id: String = c
        .db()
        .query_row("SELECT id FROM workers WHERE name = ?1", [&other], |r| {
            r.get(0)
        })
        .unwrap();
    let after: i64 = c
        .db()
        .query_row(
            "SELECT COUNT(*) FROM attempts WHERE worker_id = ?1 AND NOT (trial_id = ?2 AND attempt = ?3)
             AND started_ms >= (SELECT started_ms FROM attempts WHERE trial_id = ?2 AND attempt = ?3)",
            rusqlite::params![other_id, trial2, attempt2],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        after,
        0,
        "the drained worker took another trial\n{}",
        c.logs()
    );

    // 3. `ablate drain W` without --checkpoint: a fresh worker resumes the given-back trial,
    // is drained mid-way, finishes it and exits.
    c.spawn_worker("c");
    let (trial3, attempt3, w3) = c.wait_mid_trial(1);
    assert_eq!(w3, "c");
    let (ok, out) = drain(&c, &["c"]);
    assert!(ok && out.contains("it finishes"), "{out}");
    let k = c.worker_index("c");
    let status = c.workers[k]
        .wait_timeout(WAIT)
        .unwrap_or_else(|| panic!("drained worker c did not exit\n{}", c.logs()));
    assert!(status.success(), "drain c: {status}\n{}", c.logs());
    assert_eq!(
        c.attempts(&trial3)[(attempt3 - 1) as usize].1.as_deref(),
        Some("finished"),
        "{}",
        c.logs()
    );
    if trial3 == trial {
        assert_resumed(&c, &trial, attempt3);
    }
    c.audit(
        "drain",
        "ablate drain --checkpoint, SIGUSR1, ablate drain: one gives back, two finish",
    );
}

/// `ablate backup` mid-sweep while the coordinator writes, then the host is lost (kill -9 of
/// the coordinator and every worker); `ablate restore` into a fresh state folder, a new
/// coordinator on it and new workers finish the sweep, resuming the trial that was running from
/// the checkpoint the backup holds. A damaged backup and a non-empty target are refused.
#[test]
fn backup_mid_sweep_restores_into_a_new_coordinator_that_finishes_the_sweep() {
    let mut c = Cluster::new("backup", 5, "127.0.0.1");
    c.start_coordinator();
    c.submit(&fault_sweep(&c.sweep.clone(), PRE_STEPS, FT_STEPS));
    c.spawn_worker("a");
    c.spawn_worker("b");
    let (trial, attempt, _) = c.wait_mid_trial(FT_STEPS / 10 + 1);
    let backup = c.root().join("backup");
    let (ok, out) = c.ablate(&[
        "backup",
        "--state",
        c.state.to_str().unwrap(),
        "--out",
        backup.to_str().unwrap(),
    ]);
    assert!(ok, "backup failed:\n{out}");
    assert!(out.contains("backed up"), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(backup.join("BACKUP.json")).unwrap())
            .unwrap();
    let files = manifest["files"].as_array().unwrap();
    assert!(
        files.iter().any(|f| f["path"]
            .as_str()
            .unwrap()
            .starts_with(&format!("artifacts/{trial}/ckpt/"))),
        "the running trial's checkpoint is in the backup: {manifest}"
    );
    assert!(files
        .iter()
        .all(|f| f["sha256"].as_str().is_some_and(|s| s.len() == 64)));

    // The host is lost.
    c.kill_coordinator();
    for w in c.workers.iter_mut() {
        w.signal(libc::SIGKILL);
        w.wait_timeout(Duration::from_secs(10))
            .expect("killed worker exits");
    }

    // A damaged copy is refused before anything is written.
    let damaged = c.root().join("damaged");
    assert!(Command::new("cp")
        .arg("-r")
        .arg(&backup)
        .arg(&damaged)
        .status()
        .unwrap()
        .success());
    let db = damaged.join("ablate.sqlite");
    let mut bytes = std::fs::read(&db).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&db, bytes).unwrap();
    let elsewhere = c.root().join("state-damaged");
    let (ok, out) = c.ablate(&[
        "restore",
        damaged.to_str().unwrap(),
        "--state",
        elsewhere.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("does not match the manifest"), "{out}");
    assert!(!elsewhere.join("ablate.sqlite").exists());

    let fresh = c.root().join("state-restored");
    let (ok, out) = c.ablate(&[
        "restore",
        backup.to_str().unwrap(),
        "--state",
        fresh.to_str().unwrap(),
    ]);
    assert!(ok, "restore failed:\n{out}");
    let (ok, out) = c.ablate(&[
        "restore",
        backup.to_str().unwrap(),
        "--state",
        fresh.to_str().unwrap(),
    ]);
    assert!(!ok && out.contains("holds a store already"), "{out}");

    // A new coordinator (new port) on the restored state, new workers.
    c.state = fresh;
    c.listen = "127.0.0.1:0".into();
    c.start_coordinator();
    c.spawn_worker("c");
    c.spawn_worker("d");
    let next = c.wait_until("the restored trial to finish", |db| {
        db.query_row(
            "SELECT MAX(attempt) FROM attempts WHERE trial_id = ?1 AND outcome = 'finished'",
            [&trial],
            |r| r.get::<_, Option<u32>>(0),
        )
        .unwrap()
    });
    assert!(next > attempt, "a new attempt finished the trial");
    assert_resumed(&c, &trial, next);
    c.audit(
        "backup and restore",
        "ablate backup mid-sweep, kill -9 everything, ablate restore into a new coordinator",
    );
}

/// Write `text` to `path` as an operator's tools do: a new file renamed over the old one.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Token rotation without stopping the sweep: the coordinator's worker token file gets a new
/// token (SIGHUP) and its admin token file too (noticed by itself); the old tokens work for the
/// overlap window (4 s here), in which the running workers' own token file is updated and they
/// pick it up. After the window the old tokens are refused (a worker started with the old one
/// cannot register, `ablate list` with the old admin token fails) and the sweep finishes.
#[test]
fn rotated_tokens_overlap_and_the_running_workers_pick_up_the_new_one() {
    const NEW_WORKER: &str = "wk-new-5e1d2c9a";
    const NEW_ADMIN: &str = "ad-new-0b7f3e11";
    let mut c = Cluster::new("tokens", 5, "127.0.0.1");
    c.serve_args = vec!["--token-overlap".into(), "4".into()];
    let workers_token = c.root().join("workers.token");
    std::fs::write(&workers_token, WORKER_TOKEN).unwrap();
    c.workers_token = workers_token.clone();
    let old_admin = c.root().join("old-admin.token");
    std::fs::write(&old_admin, ADMIN_TOKEN).unwrap();
    c.start_coordinator();
    c.submit(&fault_sweep(&c.sweep.clone(), PRE_STEPS, FT_STEPS));
    c.spawn_worker("a");
    c.spawn_worker("b");
    let (trial, attempt, _) = c.wait_mid_trial(FT_STEPS / 10 + 1);
    let url = c.url.clone();
    let list = |c: &Cluster, token: &Path| {
        c.ablate(&[
            "list",
            "--coordinator",
            &url,
            "--token-file",
            token.to_str().unwrap(),
        ])
    };

    // The coordinator's files first: worker token by SIGHUP, admin token by itself.
    replace_file(&c.worker_token, NEW_WORKER);
    c.coord.as_ref().unwrap().signal(libc::SIGHUP);
    replace_file(&c.admin_token, NEW_ADMIN);
    let rotated = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, out) = list(&c, &old_admin);
    assert!(ok, "the old admin token within the overlap: {out}");
    let admin = c.admin_token.clone();
    let (ok, out) = list(&c, &admin);
    assert!(ok, "the new admin token: {out}");
    // Then the workers' own file, while they train on the old token.
    replace_file(&workers_token, NEW_WORKER);

    // Past the overlap: the old tokens are refused, the running workers carry on.
    let past = Duration::from_secs(4) + Duration::from_millis(1500);
    if let Some(rest) = past.checked_sub(rotated.elapsed()) {
        std::thread::sleep(rest);
    }
    let (ok, out) = list(&c, &old_admin);
    assert!(!ok && out.contains("wrong admin token"), "{out}");
    let stale = c.root().join("stale.token");
    std::fs::write(&stale, WORKER_TOKEN).unwrap();
    c.workers_token = stale;
    let s = c.spawn_worker("stale");
    let status = c.workers[s]
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("a worker with the old token kept running\n{}", c.logs()));
    assert!(!status.success());
    assert!(
        c.workers[s].tail().contains("wrong worker token"),
        "{}",
        c.workers[s].tail()
    );
    let coord_log = c.coord.as_ref().unwrap().log.lock().unwrap().join("\n");
    assert!(
        coord_log.contains("worker token changed") && coord_log.contains("admin token changed"),
        "{coord_log}"
    );
    for w in ["a", "b"] {
        let i = c.worker_index(w);
        assert!(
            c.workers[i]
                .wait_timeout(Duration::from_millis(1))
                .is_none(),
            "worker {w} stopped after the rotation\n{}",
            c.logs()
        );
        let log = c.workers[i].log.lock().unwrap().join("\n");
        assert!(
            log.contains("worker token file changed: using the new token"),
            "worker {w} did not pick up the new token\n{log}"
        );
    }
    let next = c.wait_until("the running trial to finish", |db| {
        db.query_row(
            "SELECT MAX(attempt) FROM attempts WHERE trial_id = ?1 AND outcome = 'finished'",
            [&trial],
            |r| r.get::<_, Option<u32>>(0),
        )
        .unwrap()
    });
    assert_eq!(
        next,
        attempt,
        "the attempt running during the rotation finished it (no restart)\n{}",
        c.logs()
    );
    assert!(
        !c.logs().contains(NEW_WORKER) && !c.logs().contains(NEW_ADMIN),
        "a new token was logged"
    );
    c.audit(
        "token rotation",
        "worker and admin tokens rotated mid-sweep with a 4 s overlap",
    );
}

/// A tuned sweep (`[tune]`) through kill -9 of the worker running a grid trial after its first
/// rung, and kill -9 of the coordinator later: every rung decision taken before a kill is still
/// there, unchanged, afterwards; a stopped trial is never attempted again; each (trial, rung) is
/// decided once; the arm gets exactly one confirm run, which finishes.
#[test]
fn tuned_sweep_decisions_survive_a_killed_worker_and_a_killed_coordinator() {
    let mut c = Cluster::new("kill9-tuned", 4, "127.0.0.1");
    c.start_coordinator();
    let sweep = fault_sweep(&c.sweep.clone(), PRE_STEPS, FT_STEPS)
        .replace("freeze = [1, \"all\"]", "freeze = [\"all\"]")
        .replace(
            &format!("eval_every = {FT_STEPS}"),
            &format!("eval_every = {}", FT_STEPS / 10),
        )
        + &format!(
            "\n[tune]\nlr = [3e-4, 3e-3, 3e-2]\nmin_steps = {}\nreduction_factor = 3\n\
             confirm_seeds = [0, 1]\n",
            FT_STEPS / 10
        );
    c.submit(&sweep);
    c.spawn_worker("a");
    c.spawn_worker("b");
    let rungs = |db: &Connection| -> Vec<(String, i64, Option<f64>, String, i64)> {
        let mut st = db
            .prepare(
                "SELECT trial_id, rung, loss, verdict, decided_ms FROM tune_rungs ORDER BY rowid",
            )
            .unwrap();
        st.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    };
    // A grid trial past its first rung (decided "continue") and still running: kill its worker.
    let (trial, attempt, worker): (String, u32, String) =
        c.wait_until("a running grid trial past its first rung", |db| {
            db.query_row(
                "SELECT t.id, t.attempts, w.name FROM trials t
                 JOIN tune_rungs r ON r.trial_id = t.id AND r.verdict = 'continue'
                 JOIN workers w ON w.id = t.worker_id
                 WHERE t.state = 'running' ORDER BY t.seq LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .unwrap()
        });
    let before_worker_kill = rungs(&c.db());
    let i = c.worker_index(&worker);
    c.workers[i].signal(libc::SIGKILL);
    c.workers[i].wait_timeout(Duration::from_secs(10)).unwrap();
    c.spawn_worker("c");
    c.wait_next_attempt(&trial, attempt);
    // Later, with more decisions taken, kill the coordinator and start it again.
    c.wait_until("a second rung decision", |db| {
        (rungs(db).len() > before_worker_kill.len().max(1)).then_some(())
    });
    let before_coord_kill = rungs(&c.db());
    c.kill_coordinator();
    std::thread::sleep(Duration::from_secs(1));
    c.start_coordinator();
    c.wait_until("the confirm run to finish", |db| {
        db.query_row(
            "SELECT 1 FROM trials WHERE name LIKE '% seed=1' AND state = 'finished'",
            [],
            |_| Ok(()),
        )
        .optional()
        .unwrap()
    });
    c.wait_all_terminal();
    let after = rungs(&c.db());
    assert!(
        after.starts_with(&before_worker_kill) && after.starts_with(&before_coord_kill),
        "decisions taken before the kills changed:\nbefore {before_coord_kill:#?}\nafter {after:#?}"
    );
    let mut seen = std::collections::BTreeSet::new();
    for (t, rung, ..) in &after {
        assert!(
            seen.insert((t.clone(), *rung)),
            "({t}, rung {rung}) decided twice"
        );
    }
    let db = c.db();
    let mut st = db
        .prepare("SELECT id, name, state, attempts FROM trials ORDER BY seq")
        .unwrap();
    let trials: Vec<(String, String, String, u32)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    // pretrain + 3 grid points + 1 confirm run.
    assert_eq!(trials.len(), 5, "{trials:#?}");
    let stopped: Vec<_> = trials.iter().filter(|t| t.2 == "stopped").collect();
    assert!(
        !stopped.is_empty(),
        "ASHA stopped no grid point: {trials:#?}"
    );
    for (id, name, _, _) in &stopped {
        let stop_rung = after
            .iter()
            .find(|r| &r.0 == id && r.3 == "stop")
            .unwrap_or_else(|| panic!("{name} is stopped without a stop decision"));
        let attempts = c.attempts(id);
        assert_eq!(
            attempts.last().and_then(|a| a.1.as_deref()),
            Some("stopped"),
            "{name}: {attempts:?} (stopped at rung {})",
            stop_rung.1
        );
        assert!(
            attempts[..attempts.len() - 1]
                .iter()
                .all(|a| a.1.as_deref() != Some("stopped")),
            "{name} ran again after it was stopped: {attempts:?}"
        );
    }
    let others: Vec<_> = trials
        .iter()
        .filter(|t| t.2 != "stopped")
        .map(|t| (t.1.as_str(), t.2.as_str()))
        .collect();
    assert!(
        others.iter().all(|(_, s)| *s == "finished"),
        "every other trial finished: {trials:#?}\n{}",
        c.logs()
    );
    assert_eq!(
        trials.iter().filter(|t| t.1.ends_with(" seed=1")).count(),
        1,
        "one confirm run: {trials:#?}"
    );
    let arms: i64 = db
        .query_row("SELECT COUNT(*) FROM tune_arms", [], |r| r.get(0))
        .unwrap();
    assert_eq!(arms, 1, "the arm was decided once");
}
