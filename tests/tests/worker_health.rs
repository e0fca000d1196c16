//! `ablate-worker --metrics-listen`: a real worker against a real `ablate serve` on loopback.
//! `/ready` answers 503 while the worker cannot register (no coordinator yet), 200 once it has,
//! `/metrics` then shows `ablate_worker_ready 1`: what a Kubernetes readinessProbe, a compose
//! healthcheck and a rolling upgrade rely on. (Drain turning `/ready` to 503 is checked in
//! worker/src/metrics.rs: an idle worker exits at once on drain.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{bin, find_loopback_addr, Proc};

/// One plain HTTP/1.1 GET; returns (status code, body). `None` when nothing answers.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn poll<T>(timeout: Duration, what: &str, log: &Proc, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} within {timeout:?}; worker log:\n{}",
            log.tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ready_turns_200_after_registration() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    // The worker first: it keeps retrying registration while the coordinator is not up.
    let mut worker = Proc::spawn(
        "worker",
        Command::new(bin("ablate-worker"))
            .args(["--coordinator", &url, "--name", "probe-w"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--cache")
            .arg(dir.path().join("cache"))
            .arg("--work-dir")
            .arg(dir.path().join("work"))
            .env("RUST_LOG", "info"),
    );
    let maddr = worker.wait_for(Duration::from_secs(20), |l| {
        l.contains("metrics on")
            .then(|| find_loopback_addr(l))
            .flatten()
    });
    let (code, body) = get(&maddr, "/ready").expect("/ready answers");
    assert_eq!(code, 503, "not registered yet: {body}");
    assert!(body.contains("starting"), "{body}");
    assert_eq!(get(&maddr, "/healthz").map(|r| r.0), Some(200));
    let (_, text) = get(&maddr, "/metrics").unwrap();
    assert!(
        text.contains("ablate_worker_ready{worker=\"probe-w\",device=\"cpu\"} 0"),
        "{text}"
    );

    let mut server = Proc::spawn(
        "serve",
        Command::new(bin("ablate"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--state"])
            .arg(dir.path().join("state")),
    );
    server.wait_for(Duration::from_secs(30), find_loopback_addr);
    poll(Duration::from_secs(30), "/ready 200", &worker, || {
        get(&maddr, "/ready").filter(|r| r.0 == 200)
    });
    let (code, text) = get(&maddr, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        text.contains("ablate_worker_ready{worker=\"probe-w\",device=\"cpu\"} 1"),
        "{text}"
    );
    assert!(text.contains("state=\"idle\"} 1"), "{text}");
    // Resident memory of a CPU worker, sampled at start.
    let mem = text
        .lines()
        .find(|l| l.starts_with("ablate_worker_device_memory_bytes{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(mem > 1 << 20, "{text}");

    // Drain: an idle worker exits 0 at once.
    worker.signal(libc::SIGUSR1);
    let st = worker
        .wait_timeout(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("drained worker exits:\n{}", worker.tail()));
    assert!(st.success(), "{st}:\n{}", worker.tail());
    drop(server);
}
