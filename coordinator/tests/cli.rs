//! The real `ablate` binary: sweep errors, the loopback guard of `serve`, and the client commands
//! (submit, list, status, cancel, report) against a real `ablate serve` on 127.0.0.1:0. No worker
//! runs here (the end-to-end test in tests/ does that), so every test takes a second or two.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const ABLATE: &str = env!("CARGO_BIN_EXE_ablate");

fn quickstart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/sweeps/quickstart.toml")
}

fn ablate(args: &[&str]) -> Output {
    Command::new(ABLATE)
        .args(args)
        .env_remove("ABLATE_COORDINATOR")
        .env_remove("ABLATE_TOKEN_FILE")
        .output()
        .expect("ablate runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `ablate serve` on 127.0.0.1:0, killed on drop.
struct Server {
    child: Child,
    url: String,
    stderr_log: PathBuf,
}

impl Server {
    fn start(state: &Path, extra: &[&str]) -> Server {
        let stderr_log = state.with_extension("stderr");
        let mut child = Command::new(ABLATE)
            .args(["serve", "--listen", "127.0.0.1:0", "--state"])
            .arg(state)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap())
            .spawn()
            .expect("ablate serve starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server {
            child,
            url: format!("http://{addr}"),
            stderr_log,
        }
    }

    fn client(&self, args: &[&str]) -> Output {
        Command::new(ABLATE)
            .args(args)
            .env("ABLATE_COORDINATOR", &self.url)
            .env_remove("ABLATE_TOKEN_FILE")
            .output()
            .expect("ablate runs")
    }

    /// SIGTERM and wait: the server must exit cleanly and soon.
    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on the pid of our own child, not reaped before the wait below.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn malformed_sweep_exits_1_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let sweep = dir.path().join("bad.toml");
    // The quickstart with one bad freeze entry: the error must point at that line.
    let good = std::fs::read_to_string(quickstart()).unwrap();
    let line = good
        .lines()
        .position(|l| l.starts_with("freeze ="))
        .unwrap()
        + 1;
    let bad = good.replace("freeze = [1, 2, 3, \"all\"]", "freeze = [1, 9]");
    assert_ne!(bad, good);
    std::fs::write(&sweep, bad).unwrap();
    let out = ablate(&[
        "run",
        sweep.to_str().unwrap(),
        "--out",
        dir.path().join("o").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("bad.toml:{line}:")),
        "no file:line in {err:?}"
    );
    assert!(err.contains("freeze"), "{err}");

    // TOML syntax errors too, and `submit` validates before it connects anywhere.
    std::fs::write(&sweep, "name = \"bad\"\ngroups = = 4\n").unwrap();
    let out = ablate(&[
        "submit",
        sweep.to_str().unwrap(),
        "--coordinator",
        "http://127.0.0.1:9",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("bad.toml:2:"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn run_with_a_missing_worker_binary_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = ablate(&[
        "run",
        quickstart().to_str().unwrap(),
        "--out",
        dir.path().to_str().unwrap(),
        "--worker-bin",
        "/nonexistent/ablate-worker",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/nonexistent/ablate-worker"),
        "{}",
        text(&out.stderr)
    );
}

/// `ablate run` keeps its local workers by the same rule as `ablate-worker --all-gpus`
/// (`experiments::supervise`): a worker that keeps crashing is restarted after growing delays up
/// to `--max-restarts` in a row and then given up; one the coordinator refused (exit 78) is not
/// restarted at all; when every worker is gone the run fails and says why. The workers are a
/// script standing in for a broken `ablate-worker` build: worker local-1 is refused, local-0
/// crashes.
#[test]
fn run_restarts_a_crashing_worker_with_backoff_gives_it_up_and_never_restarts_a_refused_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("broken-worker");
    let starts = dir.path().join("starts");
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\necho \"$*\" >> {}\ncase \"$*\" in *local-1*) exit 78;; esac\nexit 3\n",
            starts.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let t0 = Instant::now();
    let out = ablate(&[
        "run",
        quickstart().to_str().unwrap(),
        "--out",
        dir.path().join("out").to_str().unwrap(),
        "--worker-bin",
        bin.to_str().unwrap(),
        "--workers",
        "2",
        "--max-restarts",
        "2",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("worker local-0 exited (exit status: 3); restarting in 1 s (1/2 in a row)"),
        "{err}"
    );
    assert!(err.contains("restarting in 2 s (2/2 in a row)"), "{err}");
    assert!(
        err.contains(
            "worker local-0 exited (exit status: 3) after 2 restarts in a row; giving it up"
        ),
        "{err}"
    );
    assert!(
        err.contains("worker local-1 was refused by the coordinator"),
        "{err}"
    );
    assert!(
        err.contains("every worker kept exiting and was given up"),
        "{err}"
    );
    let starts = std::fs::read_to_string(&starts).unwrap();
    assert_eq!(starts.matches("local-0").count(), 3, "{starts}");
    assert_eq!(
        starts.matches("local-1").count(),
        1,
        "refused once, never restarted: {starts}"
    );
    // 1 s + 2 s of backoff, not a tight loop and not minutes.
    assert!(t0.elapsed() >= Duration::from_secs(3), "{:?}", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
}
#[test]
fn serve_refuses_a_public_address_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out = ablate(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--state",
        state.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("refusing to listen on 0.0.0.0:0"), "{err}");
    assert!(
        err.contains("--worker-token-file") && err.contains("--admin-token-file"),
        "{err}"
    );

    // One token is not enough: the other service would be open.
    let tok = dir.path().join("w.token");
    std::fs::write(&tok, "s3cret-worker\n").unwrap();
    let out = ablate(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--state",
        state.to_str().unwrap(),
        "--worker-token-file",
        tok.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("--admin-token-file") && !err.contains("s3cret"),
        "{err}"
    );

    // An empty token file is an error, not "no authentication".
    let empty = dir.path().join("empty.token");
    std::fs::write(&empty, "  \n").unwrap();
    let out = ablate(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--state",
        state.to_str().unwrap(),
        "--admin-token-file",
        empty.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("empty.token is empty"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn client_commands_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[]);
    let sweep = quickstart();
    let n = experiments::spec::load_sweep(&sweep).unwrap().trials.len();

    let out = server.client(&["submit", sweep.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    assert!(
        s.contains(&format!("{n} trials added, 0 already present")),
        "{s}"
    );
    // Same sweep again adds nothing.
    let out = server.client(&["submit", sweep.to_str().unwrap()]);
    assert!(text(&out.stdout).contains(&format!("0 trials added, {n} already present")));

    let out = server.client(&["list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("quickstart"),
        "{}",
        text(&out.stdout)
    );

    let out = server.client(&["status", "quickstart"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = text(&out.stdout);
    for name in ["pretrain", "baseline", "freeze-all", "inheritune-3"] {
        assert!(
            s.lines().any(|l| l.starts_with(name)),
            "status lacks {name}: {s}"
        );
    }

    let out = server.client(&["cancel", "quickstart"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Cancelling the pretrain stage also ends every trial that depends on it.
    assert!(
        text(&out.stdout).starts_with("cancelled "),
        "{}",
        text(&out.stdout)
    );

    let report = dir.path().join("report");
    let out = server.client(&["report", "quickstart", "--out", report.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("summary.json")).unwrap())
            .unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), n);
    assert_eq!(rows[0]["name"], "pretrain");
    assert_eq!(rows[1]["name"], "baseline");
    assert_eq!(rows[0]["status"], "cancelled");
    assert!(
        rows.iter()
            .all(|r| r["status"] == "cancelled" || r["status"] == "failed"),
        "{json}"
    );
    assert!(rows.iter().all(|r| r["perplexity"].is_null()));
    assert_eq!(std::fs::read_dir(report.join("trials")).unwrap().count(), n);

    // `status --watch` returns at once when every trial is terminal.
    let out = server.client(&["status", "quickstart", "--watch"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let st = server.terminate();
    assert!(st.success(), "serve exited with {st}");
}

#[test]
fn admin_token_is_required_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin.token");
    std::fs::write(&admin, "admin-TOKEN-1234567890\n").unwrap();
    let server = Server::start(
        &dir.path().join("state"),
        &["--admin-token-file", admin.to_str().unwrap()],
    );
    let sweep = quickstart();

    let out = server.client(&["submit", sweep.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("rejected the token"),
        "{}",
        text(&out.stderr)
    );

    let out = Command::new(ABLATE)
        .args(["submit", sweep.to_str().unwrap()])
        .env("ABLATE_COORDINATOR", &server.url)
        .env("ABLATE_TOKEN_FILE", &admin)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let log = server.stderr_log.clone();
    assert!(server.terminate().success());
    let logged = std::fs::read_to_string(log).unwrap();
    assert!(
        !logged.contains("admin-TOKEN"),
        "token leaked into the log: {logged}"
    );
}

/// The reference Python env's interpreter (`$ABLATE_PYTHON`, else
/// `${ABLATE_PYENV:-$HOME/.cache/ablate/pyenv}/bin/python`, made by scripts/pyenv.sh). Missing,
/// the test fails naming it: it is part of what the test command prepares.
fn reference_python() -> PathBuf {
    let py = std::env::var_os("ABLATE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("ABLATE_PYENV")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/ablate/pyenv")
                })
                .join("bin/python")
        });
    let ok = Command::new(&py)
        .args([
            "-c",
            "import grpc, grpc_health.v1, grpc_reflection.v1alpha, grpc_tools.protoc",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "no Python with grpcio, grpcio-tools, grpcio-health-checking and grpcio-reflection at {} \
         (run `bash scripts/pyenv.sh`, or set ABLATE_PYTHON)",
        py.display()
    );
    py
}

/// Python's grpcio (another gRPC implementation) against a real `ablate serve`: lists the
/// services by reflection, checks health without a token, calls SweepService.List with the admin
/// token from the reflected descriptors (and is refused without it); then, with stubs grpcio-tools
/// generates from proto/ablate.proto, finds the served schema equal to the file's, lists and gets
/// the sweep, resubmits its trials (nothing added) and cancels an unknown sweep (NOT_FOUND).
#[test]
fn python_grpc_client_uses_reflection_health_and_the_admin_api() {
    let py = reference_python();
    let dir = tempfile::tempdir().unwrap();
    let (wt, at) = (
        dir.path().join("worker.token"),
        dir.path().join("admin.token"),
    );
    std::fs::write(&wt, "wk-py-1f2e3d").unwrap();
    std::fs::write(&at, "ad-py-4c5b6a\n").unwrap();
    let server = Server::start(
        &dir.path().join("state"),
        &[
            "--worker-token-file",
            wt.to_str().unwrap(),
            "--admin-token-file",
            at.to_str().unwrap(),
        ],
    );
    let submit = Command::new(ABLATE)
        .args(["submit", quickstart().to_str().unwrap()])
        .env("ABLATE_COORDINATOR", &server.url)
        .env("ABLATE_TOKEN_FILE", &at)
        .output()
        .unwrap();
    assert!(submit.status.success(), "{}", text(&submit.stderr));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/health_reflection.py");
    let out = Command::new(&py)
        .arg(&script)
        .arg(server.url.trim_start_matches("http://"))
        .arg("ad-py-4c5b6a")
        .arg("quickstart")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} failed:\n{}",
        script.display(),
        text(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services: Vec<&str> = got["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for want in [
        "ablate.v1.SweepService",
        "ablate.v1.WorkerService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&want), "{want} not in {services:?}");
    }
    for name in ["", "ablate.v1.SweepService", "ablate.v1.WorkerService"] {
        assert_eq!(got["health"][name], "SERVING", "{got}");
    }
    assert_eq!(got["sweeps"], serde_json::json!(["quickstart"]), "{got}");
    assert_eq!(got["anonymous_list"], "UNAUTHENTICATED", "{got}");
    assert_eq!(got["unknown_health"], "NOT_FOUND", "{got}");
    // The stubs from proto/ablate.proto: the same schema as served, and the same sweep.
    assert_eq!(got["schema_mismatch"], serde_json::json!([]), "{got}");
    assert_eq!(
        got["stub_sweeps"],
        serde_json::json!(["quickstart"]),
        "{got}"
    );
    let planned = experiments::spec::load_sweep(&quickstart()).unwrap().trials;
    let trials = got["stub_trials"].as_array().unwrap();
    assert_eq!(trials.len(), planned.len(), "{got}");
    for t in &planned {
        let seen = trials
            .iter()
            .find(|s| s["id"] == t.id().as_str())
            .unwrap_or_else(|| panic!("{} ({}) not in {got}", t.name, t.id()));
        assert_eq!(seen["name"], t.name.as_str(), "{got}");
        assert_eq!(seen["method"], t.method.family(), "{got}");
        assert!(
            ["queued", "waiting"].contains(&seen["state"].as_str().unwrap()),
            "no worker yet: {got}"
        );
    }
    // Resubmitting the sweep's own trials through the stubs: the same sweep, nothing new.
    assert_eq!(got["resubmit_sweep_id"], got["get_sweep_id"], "{got}");
    assert_eq!(got["resubmit_added"], serde_json::json!([]), "{got}");
    let mut ids: Vec<String> = planned.iter().map(|t| t.id()).collect();
    ids.sort();
    assert_eq!(got["resubmit_present"], serde_json::json!(ids), "{got}");
    assert_eq!(got["cancel_unknown"], "NOT_FOUND", "{got}");
    assert!(server.terminate().success());
}

/// `ablate plan`: the trial table with the ids a submit would store, every check passing for a
/// sweep whose base and corpus are on disk; each problem named, exit status 1, when they are not.
#[test]
fn plan_prints_the_trials_and_checks_what_a_run_needs() {
    let dir = tempfile::tempdir().unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/tests/fixtures/tiny-gpt2");
    let corpus = dir.path().join("milton.txt");
    std::fs::write(
        &corpus,
        "Of man's first disobedience, and the fruit\n".repeat(50),
    )
    .unwrap();
    let sweep = |base: &str, paths: &str, ranks: u32| {
        format!(
            "name = \"p\"\ngroups = 3\n[base]\npath = \"{base}\"\n[data]\npaths = [{paths}]\n\
             context = 32\n[train]\nsteps = 5\nbatch_size = 2\nranks = {ranks}\n[methods]\n\
             freeze = [1]\nlora = {{ ranks = [4] }}\n"
        )
    };
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        sweep(&fixture.to_string_lossy(), "\"milton.txt\"", 1),
    )
    .unwrap();
    let out = ablate(&[
        "plan",
        good.to_str().unwrap(),
        "--workers",
        "2",
        "--no-fetch",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let trials = experiments::spec::load_sweep(&good).unwrap().trials;
    assert_eq!(trials.len(), 3);
    for t in &trials {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{} ", t.name)))
            .unwrap_or_else(|| panic!("{} in\n{stdout}", t.name));
        assert!(line.contains(&t.id()), "{line}");
    }
    // 5 steps × 2 windows × 32 tokens.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("lora-4 ") && l.contains("lora r4") && l.contains("320")),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok    corpus") && stdout.contains("1 file"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok    base") && stdout.contains("every check passed"),
        "{stdout}"
    );

    // A base that is not there, a corpus pattern that matches nothing, 4 ranks for 2 workers.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, sweep("/nonexistent/model", "\"poems/*.txt\"", 4)).unwrap();
    let out = ablate(&[
        "plan",
        bad.to_str().unwrap(),
        "--workers",
        "2",
        "--no-fetch",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let fails: Vec<&str> = stdout.lines().filter(|l| l.starts_with("FAIL")).collect();
    assert_eq!(fails.len(), 3, "{stdout}");
    assert!(fails[0].contains("poems/*.txt"), "{stdout}");
    assert!(fails[1].contains("/nonexistent/model") && fails[1].contains("no such directory"));
    assert!(fails[2].contains("ranks = 4"), "{stdout}");
    assert!(stdout.contains("3 checks failed"), "{stdout}");
    // A broken sweep file is the parser's error, with its line.
    std::fs::write(&bad, "name = \"p\"\n[base\n").unwrap();
    let out = ablate(&["plan", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("bad.toml:2:"),
        "{}",
        text(&out.stderr)
    );
}
