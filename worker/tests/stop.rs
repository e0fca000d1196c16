//! The real `ablate-worker` binary stopping: `--stop-grace` / `ABLATE_STOP_GRACE` bounds a stop
//! the coordinator never answers, a repeated SIGTERM (Slurm's and the supervisor's copy, or a
//! second `scancel` seconds later) does not cut the stop short, and a later Ctrl-C does.
//!
//! The coordinator here is a loopback socket that accepts connections and never answers, so the
//! worker's registration hangs and only the stop grace can end the process.

use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ablate-worker");

/// A coordinator that accepts and stays silent; returns its URL.
fn silent_coordinator() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            held.push(s);
        }
    });
    url
}

fn start(url: &str, dir: &std::path::Path, grace: Option<&str>, env_grace: Option<&str>) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(["--coordinator", url, "--name", "stopper", "--cache"])
        .arg(dir.join("cache"))
        .arg("--work-dir")
        .arg(dir.join("work"))
        .env("RUST_LOG", "info")
        .env_remove("ABLATE_STOP_GRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(g) = grace {
        cmd.args(["--stop-grace", g]);
    }
    if let Some(g) = env_grace {
        cmd.env("ABLATE_STOP_GRACE", g);
    }
    let child = cmd.spawn().unwrap();
    // Let it install its signal handlers and start registering.
    std::thread::sleep(Duration::from_millis(1500));
    child
}

fn signal(c: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(c.id() as libc::pid_t, sig) }, 0);
}

/// Wait for the child's exit (at most `limit`); its status code and stderr.
fn finish(mut c: Child, limit: Duration) -> (Option<i32>, String) {
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            let mut err = String::new();
            c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            return (st.code(), err);
        }
        if t0.elapsed() > limit {
            c.kill().ok();
            c.wait().ok();
            let mut err = String::new();
            c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("worker still running after {limit:?}\n{err}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_repeated_sigterm_keeps_the_stop_going_until_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let url = silent_coordinator();
    let mut c = start(&url, dir.path(), Some("6s"), Some("1s"));
    let t0 = Instant::now();
    signal(&c, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(20));
    signal(&c, libc::SIGTERM);
    // A second `scancel` well after the old 3 s repeat window: still the same stop.
    std::thread::sleep(Duration::from_secs(4));
    signal(&c, libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        c.try_wait().unwrap().is_none(),
        "a repeated SIGTERM ended the stop early"
    );
    let (code, err) = finish(c, Duration::from_secs(20));
    let took = t0.elapsed();
    // The flag wins over the environment (6 s, not 1 s); the grace ends the hung stop.
    assert!(
        took >= Duration::from_secs(6) && took < Duration::from_secs(12),
        "exited {took:?} after the first SIGTERM\n{err}"
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("could not finish stopping within the stop grace"),
        "{err}"
    );
    assert_eq!(
        err.matches("the same stop request again").count(),
        2,
        "{err}"
    );
    assert!(!err.contains("exiting now, without a checkpoint"), "{err}");
}

#[test]
fn the_grace_comes_from_the_environment_and_a_later_ctrl_c_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = silent_coordinator();
    // ABLATE_STOP_GRACE alone.
    let c = start(&url, dir.path(), None, Some("2s"));
    let t0 = Instant::now();
    signal(&c, libc::SIGTERM);
    let (code, err) = finish(c, Duration::from_secs(20));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "exited {took:?} after SIGTERM with ABLATE_STOP_GRACE=2s\n{err}"
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("grace=2s"), "{err}");

    // A person at a terminal: Ctrl-C, then Ctrl-C again after the repeat window.
    let c = start(&url, dir.path(), Some("30s"), None);
    signal(&c, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(3500));
    let t1 = Instant::now();
    signal(&c, libc::SIGINT);
    let (code, err) = finish(c, Duration::from_secs(10));
    assert!(t1.elapsed() < Duration::from_secs(3), "{err}");
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("exiting now, without a checkpoint"), "{err}");
}

#[test]
fn a_bad_stop_grace_is_refused_by_name() {
    for (bad, needle) in [("0s", "between 1s and 1h"), ("ten", "not a duration")] {
        let o = Command::new(BIN)
            .args(["--coordinator", "http://127.0.0.1:1", "--stop-grace", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        assert!(err.contains("--stop-grace"), "{err}");
        assert!(err.contains(needle), "{err}");
    }
}
