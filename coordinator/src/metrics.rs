//! Operator metrics: a Prometheus text endpoint on the coordinator (`ablate serve
//! --metrics-listen 127.0.0.1:9464`, then `GET /metrics`).
//!
//! The gRPC server bumps a few counters in [`Metrics`] as things happen (an event recorded, a
//! lease granted or expired, a worker heard from); the gauges that describe the store (trials by
//! state, registered workers) are read at scrape time through a source the server installs, so
//! a scrape always agrees with `ablate status`. The HTTP side is a deliberately tiny handler on a
//! plain TCP listener: one request per connection, `GET /metrics` or 404, no other dependency.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the store says at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Gauges {
    /// Trials per coordinator state (queued, waiting, running, finished, failed, cancelled).
    pub trials_by_state: BTreeMap<String, u64>,
    /// Workers ever registered with this store.
    pub workers_registered: u64,
    /// Sweeps in the store.
    pub sweeps: u64,
}

type GaugeSource = Box<dyn Fn() -> Gauges + Send + Sync>;

/// Counters shared by the gRPC server and the metrics endpoint.
pub struct Metrics {
    started: Instant,
    events: AtomicU64,
    leases_granted: AtomicU64,
    lease_expiries: AtomicU64,
    /// Worker id → when it last called the coordinator.
    seen: Mutex<HashMap<String, Instant>>,
    /// (when, events total) samples for the events/s gauge over the last minute.
    window: Mutex<VecDeque<(Instant, u64)>>,
    source: Mutex<Option<GaugeSource>>,
    /// A worker counts as connected when it called within this long.
    connected_within: Mutex<Duration>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            started: Instant::now(),
            events: AtomicU64::new(0),
            leases_granted: AtomicU64::new(0),
            lease_expiries: AtomicU64::new(0),
            seen: Mutex::new(HashMap::new()),
            window: Mutex::new(VecDeque::new()),
            source: Mutex::new(None),
            connected_within: Mutex::new(Duration::from_secs(90)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prometheus label values escape backslash, double quote and newline.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// The server installs how to read the store's gauges, and how recent a call must be for a
    /// worker to count as connected (an idle worker calls at least once per lease long-poll).
    pub fn set_source(
        &self,
        connected_within: Duration,
        source: impl Fn() -> Gauges + Send + Sync + 'static,
    ) {
        *lock(&self.source) = Some(Box::new(source));
        *lock(&self.connected_within) = connected_within;
    }

    /// A worker called (register, lease, heartbeat, report).
    pub fn worker_seen(&self, worker_id: &str) {
        if worker_id.is_empty() {
            return;
        }
        let mut seen = lock(&self.seen);
        match seen.get_mut(worker_id) {
            Some(t) => *t = Instant::now(),
            None => {
                seen.insert(worker_id.to_string(), Instant::now());
            }
        }
    }

    /// A new progress event was stored (duplicates replayed by a worker are not counted).
    pub fn event_recorded(&self) {
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    pub fn lease_granted(&self) {
        self.leases_granted.fetch_add(1, Ordering::Relaxed);
    }

    /// Leases lost because no heartbeat came before their deadline.
    pub fn leases_expired(&self, n: u64) {
        self.lease_expiries.fetch_add(n, Ordering::Relaxed);
    }

    pub fn workers_connected(&self) -> u64 {
        let within = *lock(&self.connected_within);
        lock(&self.seen)
            .values()
            .filter(|t| t.elapsed() <= within)
            .count() as u64
    }

    /// Events per second over (up to) the last minute, from samples taken at each scrape.
    fn events_per_second(&self, total: u64) -> f64 {
        let now = Instant::now();
        let mut w = lock(&self.window);
        w.push_back((now, total));
        while w.len() > 2
            && w.front()
                .is_some_and(|(t, _)| now - *t > Duration::from_secs(60))
        {
            w.pop_front();
        }
        // Before a second scrape: the average since start.
        let (t0, n0) = if w.len() >= 2 {
            w[0]
        } else {
            (self.started, 0)
        };
        let dt = (now - t0).as_secs_f64();
        if dt <= 0.0 {
            0.0
        } else {
            total.saturating_sub(n0) as f64 / dt
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let gauges = lock(&self.source).as_ref().map(|f| f()).unwrap_or_default();
        let events = self.events.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, lines: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        metric(
            "ablate_workers_connected",
            "gauge",
            "Workers that called the coordinator recently (lease poll, heartbeat or report).",
            vec![(String::new(), self.workers_connected().to_string())],
        );
        metric(
            "ablate_workers_registered",
            "gauge",
            "Workers ever registered in this coordinator's store.",
            vec![(String::new(), gauges.workers_registered.to_string())],
        );
        // Every state is always present (0 when empty) so dashboards do not see gaps.
        let mut states: BTreeMap<String, u64> = [
            "queued",
            "waiting",
            "running",
            "finished",
            "failed",
            "cancelled",
            "stopped",
        ]
        .into_iter()
        .map(|s| (s.to_string(), 0))
        .collect();
        states.extend(gauges.trials_by_state.clone());
        metric(
            "ablate_trials",
            "gauge",
            "Trials in the store by state.",
            states
                .iter()
                .map(|(s, n)| (format!("{{state=\"{}\"}}", label(s)), n.to_string()))
                .collect(),
        );
        metric(
            "ablate_sweeps",
            "gauge",
            "Sweeps in the store.",
            vec![(String::new(), gauges.sweeps.to_string())],
        );
        metric(
            "ablate_leases_granted_total",
            "counter",
            "Trial leases handed to workers since the coordinator started.",
            vec![(
                String::new(),
                self.leases_granted.load(Ordering::Relaxed).to_string(),
            )],
        );
        metric(
            "ablate_lease_expiries_total",
            "counter",
            "Leases lost without a heartbeat before their deadline (trial re-queued).",
            vec![(
                String::new(),
                self.lease_expiries.load(Ordering::Relaxed).to_string(),
            )],
        );
        metric(
            "ablate_events_total",
            "counter",
            "Progress events stored (steps, evaluations, checkpoints, samples).",
            vec![(String::new(), events.to_string())],
        );
        let eps = self.events_per_second(events);
        metric(
            "ablate_events_per_second",
            "gauge",
            "Progress events stored per second over the last minute of scrapes.",
            vec![(String::new(), format!("{eps:.3}"))],
        );
        metric(
            "ablate_uptime_seconds",
            "gauge",
            "Seconds since the coordinator started.",
            vec![(
                String::new(),
                format!("{:.1}", self.started.elapsed().as_secs_f64()),
            )],
        );
        out
    }
}

/// Serve `GET /metrics` on `listener` until `shutdown` resolves. Each connection gets one answer
/// and is closed; a slow or silent client is dropped after 5 s.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
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
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let answer = tokio::time::timeout(Duration::from_secs(5), async {
                let head = read_head(&mut sock).await?;
                // Rendering reads the store's gauges (SQLite, under the coordinator's lock): on a
                // blocking thread, so a scrape never stalls the runtime that serves gRPC.
                let response = tokio::task::spawn_blocking(move || respond(&head, &metrics))
                    .await
                    .map_err(std::io::Error::other)?;
                sock.write_all(response.as_bytes()).await?;
                sock.shutdown().await
            })
            .await;
            if let Ok(Err(e)) = answer {
                tracing::debug!(cause = %e, "metrics: connection error");
            }
        });
    }
}

/// Read up to the end of the request head (a blank line), at most 8 KiB.
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

/// The whole HTTP/1.1 response for a request head.
pub fn respond(head: &str, metrics: &Metrics) -> String {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: the metrics are at /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_string(),
        ),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_state_and_the_counters() {
        let m = Metrics::default();
        m.set_source(Duration::from_secs(60), || Gauges {
            trials_by_state: [("running".to_string(), 2), ("finished".to_string(), 5)]
                .into_iter()
                .collect(),
            workers_registered: 3,
            sweeps: 1,
        });
        m.worker_seen("w1");
        m.worker_seen("w2");
        m.worker_seen("w1");
        m.event_recorded();
        m.event_recorded();
        m.leases_expired(1);
        m.lease_granted();
        let text = m.render();
        for line in [
            "ablate_workers_connected 2",
            "ablate_workers_registered 3",
            "ablate_trials{state=\"running\"} 2",
            "ablate_trials{state=\"finished\"} 5",
            "ablate_trials{state=\"queued\"} 0",
            "ablate_lease_expiries_total 1",
            "ablate_leases_granted_total 1",
            "ablate_events_total 2",
            "# TYPE ablate_events_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let eps: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("ablate_events_per_second "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(eps > 0.0, "{text}");
    }

    #[test]
    fn workers_not_heard_from_are_not_connected() {
        let m = Metrics::default();
        m.set_source(Duration::from_millis(0), Gauges::default);
        m.worker_seen("w1");
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(m.workers_connected(), 0);
    }

    async fn scrape(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// A real coordinator on loopback: a registered worker and a submitted sweep show up in a
    /// scrape over a real socket.
    #[tokio::test]
    async fn endpoint_reports_a_live_coordinator() {
        use ablate_proto::pb;
        let dir = tempfile::tempdir().unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", grpc.local_addr().unwrap());
        let metrics = Arc::new(Metrics::default());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::server::serve_with_metrics(
            grpc,
            crate::server::ServeOpts::new(dir.path()),
            metrics.clone(),
            async move {
                let _ = stopped.await;
            },
        ));
        let ml = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let maddr = ml.local_addr().unwrap();
        tokio::spawn(serve_metrics(ml, metrics.clone(), std::future::pending()));

        let quickstart = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../experiments/sweeps/quickstart.toml");
        let sweep = experiments::spec::load_sweep(&quickstart).unwrap();
        let mut client = crate::cli::Client::connect(&url, None).await.unwrap();
        client.submit(&sweep).await.unwrap();
        let mut worker = crate::server::worker_client(&url, None).await.unwrap();
        worker
            .register(pb::RegisterRequest {
                device_kind: "cpu".into(),
                device_name: "cpu".into(),
                memory_bytes: 1 << 30,
                host: "test".into(),
                worker_name: "w".into(),
                ..Default::default()
            })
            .await
            .unwrap();

        let text = scrape(maddr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("\nablate_workers_connected 1\n"), "{text}");
        assert!(text.contains("\nablate_workers_registered 1\n"), "{text}");
        assert!(text.contains("\nablate_sweeps 1\n"), "{text}");
        let trials: u64 = text
            .lines()
            .filter(|l| l.starts_with("ablate_trials{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(trials, sweep.trials.len() as u64, "{text}");
        assert!(scrape(maddr, "GET /nope HTTP/1.1\r\n\r\n")
            .await
            .starts_with("HTTP/1.1 404"));
        drop((worker, client));
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[test]
    fn only_get_metrics_is_served() {
        let m = Metrics::default();
        let ok = respond("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m);
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("ablate_trials{state=\"queued\"} 0"));
        let body = ok.split("\r\n\r\n").nth(1).unwrap();
        assert!(ok.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(respond("GET / HTTP/1.1\r\n\r\n", &m).starts_with("HTTP/1.1 404"));
        assert!(respond("POST /metrics HTTP/1.1\r\n\r\n", &m).starts_with("HTTP/1.1 405"));
    }
}
