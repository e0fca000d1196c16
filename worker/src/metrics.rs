//! The worker's own view for operators: readiness and Prometheus metrics over plain HTTP
//! (`ablate-worker --metrics-listen 127.0.0.1:9465`).
//!
//! - `GET /ready`: 200 once the worker has registered with the coordinator and is taking trials;
//!   503 before that, while it drains or stops (a Kubernetes readinessProbe, a compose
//!   healthcheck, a rolling upgrade waiting for the new worker);
//! - `GET /healthz`: 200 while the process serves at all (a livenessProbe);
//! - `GET /metrics`: the running trial, its step and training throughput (tokens/s), the device
//!   memory in use, trials done, and the worker's state.
//!
//! The coordinator's metrics (`ablate serve --metrics-listen`) describe the whole sweep; these
//! describe one process, so a dashboard can tell a slow GPU from a slow sweep.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a worker is doing, for `/ready` and the `ablate_worker_state` gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Starting,
    Idle,
    Training,
    Draining,
    Stopping,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Idle => "idle",
            State::Training => "training",
            State::Draining => "draining",
            State::Stopping => "stopping",
        }
    }
    const ALL: [State; 5] = [
        State::Starting,
        State::Idle,
        State::Training,
        State::Draining,
        State::Stopping,
    ];
}

#[derive(Debug, Default)]
struct Trial {
    id: String,
    name: String,
    step: u64,
    steps: u64,
    tokens_per_second: f64,
}

/// Shared between the worker loop (which updates it) and the HTTP server (which reads it).
#[derive(Debug)]
pub struct WorkerMetrics {
    name: String,
    device: String,
    version: String,
    state: Mutex<State>,
    trial: Mutex<Option<Trial>>,
    trials_done: AtomicU64,
    device_memory_bytes: AtomicU64,
    registered: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl WorkerMetrics {
    pub fn new(name: &str, device: &str) -> Arc<WorkerMetrics> {
        Arc::new(WorkerMetrics {
            name: name.to_string(),
            device: device.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            state: Mutex::new(State::Starting),
            trial: Mutex::new(None),
            trials_done: AtomicU64::new(0),
            device_memory_bytes: AtomicU64::new(0),
            registered: AtomicBool::new(false),
        })
    }

    pub fn set_state(&self, s: State) {
        let mut cur = lock(&self.state);
        // Draining and stopping are one-way.
        if matches!(*cur, State::Stopping) || (*cur == State::Draining && s != State::Stopping) {
            return;
        }
        *cur = s;
    }

    pub fn state(&self) -> State {
        *lock(&self.state)
    }

    pub fn registered(&self) {
        self.registered.store(true, Ordering::SeqCst);
        self.set_state(State::Idle);
    }

    /// Ready for work: registered, and neither draining nor stopping.
    pub fn ready(&self) -> bool {
        self.registered.load(Ordering::SeqCst)
            && matches!(self.state(), State::Idle | State::Training)
    }

    pub fn trial_started(&self, id: &str, name: &str, steps: u64) {
        *lock(&self.trial) = Some(Trial {
            id: id.to_string(),
            name: name.to_string(),
            steps,
            ..Trial::default()
        });
        self.set_state(State::Training);
    }

    pub fn progress(&self, step: u64, tokens_per_second: f64) {
        if let Some(t) = lock(&self.trial).as_mut() {
            t.step = step;
            if tokens_per_second.is_finite() {
                t.tokens_per_second = tokens_per_second;
            }
        }
    }

    pub fn trial_ended(&self, completed: bool) {
        *lock(&self.trial) = None;
        if completed {
            self.trials_done.fetch_add(1, Ordering::SeqCst);
        }
        self.set_state(State::Idle);
    }

    pub fn set_device_memory(&self, bytes: u64) {
        self.device_memory_bytes.store(bytes, Ordering::SeqCst);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let who = format!(
            "worker=\"{}\",device=\"{}\"",
            label(&self.name),
            label(&self.device)
        );
        let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for (labels, v) in samples {
                out.push_str(&format!("{name}{{{labels}}} {v}\n"));
            }
        };
        metric(
            "ablate_worker_info",
            "gauge",
            "This worker: its version.",
            vec![(
                format!("{who},version=\"{}\"", label(&self.version)),
                "1".into(),
            )],
        );
        let state = self.state();
        metric(
            "ablate_worker_state",
            "gauge",
            "1 for the state the worker is in.",
            State::ALL
                .iter()
                .map(|s| {
                    (
                        format!("{who},state=\"{}\"", s.name()),
                        u8::from(*s == state).to_string(),
                    )
                })
                .collect(),
        );
        metric(
            "ablate_worker_ready",
            "gauge",
            "1 when registered and taking trials.",
            vec![(who.clone(), u8::from(self.ready()).to_string())],
        );
        let trial = lock(&self.trial);
        let (tl, step, steps, tps) = match trial.as_ref() {
            Some(t) => (
                format!(
                    "{who},trial_id=\"{}\",trial=\"{}\"",
                    label(&t.id),
                    label(&t.name)
                ),
                t.step,
                t.steps,
                t.tokens_per_second,
            ),
            None => (format!("{who},trial_id=\"\",trial=\"\""), 0, 0, 0.0),
        };
        metric(
            "ablate_worker_trial_step",
            "gauge",
            "Optimizer step of the running trial.",
            vec![(tl.clone(), step.to_string())],
        );
        metric(
            "ablate_worker_trial_steps",
            "gauge",
            "Steps the running trial will take.",
            vec![(tl.clone(), steps.to_string())],
        );
        metric(
            "ablate_worker_tokens_per_second",
            "gauge",
            "Training throughput of the running trial.",
            vec![(tl, format!("{tps:.1}"))],
        );
        drop(trial);
        metric(
            "ablate_worker_device_memory_bytes",
            "gauge",
            "Memory in use on the worker's device (GPU memory, or resident memory on a CPU).",
            vec![(
                who.clone(),
                self.device_memory_bytes.load(Ordering::SeqCst).to_string(),
            )],
        );
        metric(
            "ablate_worker_trials_completed_total",
            "counter",
            "Trials this process completed.",
            vec![(who, self.trials_done.load(Ordering::SeqCst).to_string())],
        );
        out
    }
}

/// The HTTP/1.1 answer for one request head.
pub fn respond(head: &str, m: &WorkerMetrics) -> String {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let text = "text/plain; charset=utf-8";
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            m.render(),
        ),
        ("GET", "/ready") if m.ready() => ("200 OK", text, "ready\n".to_string()),
        ("GET", "/ready") => (
            "503 Service Unavailable",
            text,
            format!("not ready: {}\n", m.state().name()),
        ),
        ("GET", "/healthz") => ("200 OK", text, "ok\n".to_string()),
        ("GET", _) => (
            "404 Not Found",
            text,
            "not found: /metrics, /ready, /healthz\n".to_string(),
        ),
        _ => ("405 Method Not Allowed", text, "only GET\n".to_string()),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn read_head(sock: &mut tokio::net::TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 8192 {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Serve `listener` until `shutdown` resolves; one answer per connection, 5 s per client.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<WorkerMetrics>,
    shutdown: impl Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    loop {
        let (mut sock, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(cause = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let m = metrics.clone();
        tokio::spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(5), async {
                let head = read_head(&mut sock).await?;
                sock.write_all(respond(&head, &m).as_bytes()).await?;
                sock.shutdown().await
            })
            .await;
            if let Ok(Err(e)) = r {
                tracing::debug!(cause = %e, "metrics: connection error");
            }
        });
    }
}

/// Memory in use on the device: `nvidia-smi --query-gpu=memory.used` of the GPU this process
/// sees as cuda:0 (CUDA_VISIBLE_DEVICES' first entry), or this process's resident memory on a
/// CPU. `None` when it cannot be read.
pub fn device_memory_bytes(device: &str) -> Option<u64> {
    if device.starts_with("cuda") {
        let id = std::env::var("CUDA_VISIBLE_DEVICES")
            .ok()
            .and_then(|v| v.split(',').next().map(str::to_string))
            .unwrap_or_else(|| "0".into());
        let out = std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=memory.used",
                "--format=csv,noheader,nounits",
                &format!("--id={id}"),
            ])
            .output()
            .ok()?;
        let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        Some(mib * 1024 * 1024)
    } else {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_registered_and_taking_trials() {
        let m = WorkerMetrics::new("box-gpu0", "cuda:0");
        assert!(!m.ready());
        assert!(respond("GET /ready HTTP/1.1\r\n\r\n", &m).starts_with("HTTP/1.1 503"));
        m.registered();
        assert!(m.ready());
        m.trial_started("t1", "freeze-2/seed0", 400);
        assert!(m.ready());
        assert!(respond("GET /ready HTTP/1.1\r\n\r\n", &m).starts_with("HTTP/1.1 200"));
        m.set_state(State::Draining);
        assert!(!m.ready());
        // Draining does not go back to idle when the trial ends.
        m.trial_ended(true);
        assert_eq!(m.state(), State::Draining);
        m.set_state(State::Stopping);
        m.set_state(State::Idle);
        assert_eq!(m.state(), State::Stopping);
        assert!(respond("GET /healthz HTTP/1.1\r\n\r\n", &m).starts_with("HTTP/1.1 200"));
        assert!(respond("GET /x HTTP/1.1\r\n\r\n", &m).starts_with("HTTP/1.1 404"));
        assert!(respond("PUT /ready HTTP/1.1\r\n\r\n", &m).starts_with("HTTP/1.1 405"));
    }

    #[test]
    fn exposition_names_the_trial_step_and_throughput() {
        let m = WorkerMetrics::new("box-gpu\"1", "cuda:0");
        m.registered();
        m.trial_started("t7", "ulmfit/seed1", 300);
        m.progress(120, 5321.25);
        m.set_device_memory(3 << 30);
        let text = m.render();
        assert!(
            text.contains("# TYPE ablate_worker_trial_step gauge"),
            "{text}"
        );
        assert!(text.contains(
            "ablate_worker_trial_step{worker=\"box-gpu\\\"1\",device=\"cuda:0\",trial_id=\"t7\",trial=\"ulmfit/seed1\"} 120"
        ), "{text}");
        assert!(
            text.contains("ablate_worker_tokens_per_second{") && text.contains("} 5321.2"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "ablate_worker_device_memory_bytes{{worker=\"box-gpu\\\"1\",device=\"cuda:0\"}} {}",
                3u64 << 30
            )),
            "{text}"
        );
        assert!(text.contains("state=\"training\"} 1"), "{text}");
        assert!(text.contains("state=\"idle\"} 0"), "{text}");
        m.trial_ended(true);
        let text = m.render();
        assert!(
            text.contains(
                "ablate_worker_trials_completed_total{worker=\"box-gpu\\\"1\",device=\"cuda:0\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("trial_id=\"\",trial=\"\"} 0"), "{text}");
    }

    #[test]
    fn resident_memory_is_read_for_a_cpu_worker() {
        let b = device_memory_bytes("cpu").expect("VmRSS");
        assert!(b > 1 << 20, "{b}");
    }

    #[tokio::test]
    async fn serves_over_a_real_socket() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let m = WorkerMetrics::new("w", "cpu");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(l, m.clone(), async {
            let _ = rx.await;
        }));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/ready").await.starts_with("HTTP/1.1 503"));
        m.registered();
        assert!(get("/ready").await.starts_with("HTTP/1.1 200"));
        assert!(get("/metrics")
            .await
            .contains("ablate_worker_ready{worker=\"w\",device=\"cpu\"} 1"));
        tx.send(()).unwrap();
        task.await.unwrap();
    }
}
