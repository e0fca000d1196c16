//! The coordinator's gRPC server: `WorkerService` and `SweepService` on one port, with the
//! standard `grpc.health.v1.Health` and server reflection (v1 and v1alpha) beside them, those two
//! without a token so Kubernetes gRPC probes and grpcurl work.
//!
//! This module only translates. Requests are checked and converted to domain types here (JSON of
//! the shared trial types is parsed and rejected with the field named), the [`Scheduler`] decides,
//! the [`Store`] persists the decisions, and only then does the RPC answer. A background task ticks
//! the scheduler so expired leases are re-queued; long-polling `Lease` calls sleep on a `Notify`
//! woken whenever a trial becomes leasable; `Watch` streams come from a broadcast channel.
//!
//! On start the scheduler is rebuilt from the store: attempts that were running when the previous
//! coordinator died keep their lease for one more ttl, so workers that reconnect with backoff and
//! heartbeat carry on; attempts nobody comes back for are recorded as lost and queued again.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ablate_proto::auth::BearerToken;
use ablate_proto::connect::AuthChannel;
use ablate_proto::limits::{CHUNK_BYTES, MAX_MESSAGE_BYTES};
use ablate_proto::pb;
use ablate_proto::pb::sweep_service_client::SweepServiceClient;
use ablate_proto::pb::sweep_service_server::{SweepService, SweepServiceServer};
use ablate_proto::pb::worker_service_client::WorkerServiceClient;
use ablate_proto::pb::worker_service_server::{WorkerService, WorkerServiceServer};
use experiments::trial::{Progress, TrialConfig, TrialMetrics};
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::ServingStatus;

use crate::auth::RequireToken;
use crate::scheduler::{Decision, Failure, SchedError, Scheduler, TrialSpec, TrialState};
use crate::store::{NewTrial, Scope, Store, StoreError, TrialDetails, TrialRow, WorkerInfo};

/// Longest a `Lease` call is held open, whatever the worker asks for.
pub const MAX_LEASE_WAIT: Duration = Duration::from_secs(30);

/// How to run the coordinator. `Debug` shows whether tokens are set, never the tokens.
#[derive(Clone)]
pub struct ServeOpts {
    /// Holds `ablate.sqlite` and `artifacts/`.
    pub state_dir: PathBuf,
    /// Token `WorkerService` callers must present; `None` accepts everyone (loopback only).
    pub worker_token: Option<String>,
    /// Token `SweepService` callers must present; `None` accepts everyone (loopback only).
    pub admin_token: Option<String>,
    /// How long a lease lives without a heartbeat. Workers heartbeat every third of it.
    pub lease_ttl: Duration,
    /// Serve TLS with this certificate and key; `None` is plain HTTP/2.
    pub tls: Option<crate::tls::TlsIdentity>,
    /// Where the server reads the time (tests step its wall clock).
    pub clock: Clock,
    /// A second, plain-HTTP/2 port serving only `grpc.health.v1.Health`: Kubernetes' gRPC
    /// probes cannot speak TLS, so with `tls` set the main port is out of their reach.
    pub health_listener: Option<Arc<std::net::TcpListener>>,
    /// Files the tokens came from: re-read every second and on SIGHUP; a changed token takes
    /// effect at once and the one it replaces is accepted for `token_overlap` more.
    pub worker_token_file: Option<PathBuf>,
    pub admin_token_file: Option<PathBuf>,
    pub token_overlap: Duration,
    /// Files `tls` came from (certificate, key): re-read every second and on SIGHUP; a new
    /// valid pair is served to new connections, open ones keep theirs.
    pub tls_files: Option<(PathBuf, PathBuf)>,
}

/// The coordinator's two clocks. Lease deadlines count in monotonic milliseconds, which never
/// jump: fed wall time, the scheduler expired every lease when NTP or an operator stepped the
/// clock forward (and kept dead leases forever after a step back). Wall time is only for what
/// people read: stored start/finish times and the deadlines shown to workers.
#[derive(Clone, Debug)]
pub struct Clock {
    origin: Instant,
    /// Added to the system's wall time: what a clock step does, for tests.
    wall_step_ms: Arc<AtomicI64>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock {
            origin: Instant::now(),
            wall_step_ms: Arc::new(AtomicI64::new(0)),
        }
    }
}

impl Clock {
    /// Milliseconds since this clock was made; never goes back, unaffected by clock steps.
    pub fn mono_ms(&self) -> i64 {
        self.origin.elapsed().as_millis().min(i64::MAX as u128) as i64
    }

    /// Unix time in milliseconds.
    pub fn wall_ms(&self) -> i64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        sys.saturating_add(self.wall_step_ms.load(Ordering::Relaxed))
    }

    /// Step this clock's wall time by `ms`, as NTP or `date -s` steps the system's.
    pub fn step_wall(&self, ms: i64) {
        self.wall_step_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// A monotonic deadline as unix milliseconds, for people and workers to read.
    fn shown(&self, deadline_mono_ms: i64) -> i64 {
        self.wall_ms() + (deadline_mono_ms - self.sched_ms())
    }

    /// The time the scheduler is fed: monotonic, so lease deadlines ignore clock steps.
    fn sched_ms(&self) -> i64 {
        self.mono_ms()
    }
}

impl std::fmt::Debug for ServeOpts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |t: &Option<String>| if t.is_some() { "<set>" } else { "<none>" };
        f.debug_struct("ServeOpts")
            .field("state_dir", &self.state_dir)
            .field("worker_token", &set(&self.worker_token))
            .field("admin_token", &set(&self.admin_token))
            .field("lease_ttl", &self.lease_ttl)
            .field("tls", &self.tls.is_some())
            .field("clock", &self.clock)
            .field("health_listener", &self.health_listener)
            .finish()
    }
}

impl ServeOpts {
    /// Defaults: no tokens, 30 s leases.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        ServeOpts {
            state_dir: state_dir.into(),
            worker_token: None,
            admin_token: None,
            lease_ttl: Duration::from_secs(30),
            tls: None,
            clock: Clock::default(),
            health_listener: None,
            worker_token_file: None,
            admin_token_file: None,
            token_overlap: Duration::from_secs(600),
            tls_files: None,
        }
    }
}

/// Client type for `SweepService` with the admin token attached.
pub type AdminClient = SweepServiceClient<AuthChannel>;
/// Client type for `WorkerService` with the worker token attached.
pub type WorkerClient = WorkerServiceClient<AuthChannel>;

/// Connect to a coordinator's `SweepService` (url like `http://127.0.0.1:7070`).
pub async fn admin_client(url: &str, token: Option<&str>) -> anyhow::Result<AdminClient> {
    admin_client_tls(url, token, None).await
}

/// [`admin_client`] for an `https://` URL, trusting the CA in `ca_pem` (system roots if `None`).
pub async fn admin_client_tls(
    url: &str,
    token: Option<&str>,
    ca_pem: Option<&[u8]>,
) -> anyhow::Result<AdminClient> {
    let channel = connect(url, ca_pem).await?;
    Ok(ablate_proto::connect::sweep_client(
        channel,
        BearerToken::new(token)?,
    ))
}

/// Connect to a coordinator's `WorkerService` (tests; the worker binary has its own client).
pub async fn worker_client(url: &str, token: Option<&str>) -> anyhow::Result<WorkerClient> {
    let channel = connect(url, None).await?;
    Ok(ablate_proto::connect::worker_client(
        channel,
        BearerToken::new(token)?,
    ))
}

async fn connect(url: &str, ca_pem: Option<&[u8]>) -> anyhow::Result<Channel> {
    let ep = ablate_proto::connect::endpoint(url, ca_pem)?;
    ep.connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {url}: {e}"))
}

/// Serve both services on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    opts: ServeOpts,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    serve_with_metrics(listener, opts, Default::default(), shutdown).await
}

/// [`serve`], counting into `metrics` (what `ablate serve --metrics-listen` exposes).
pub async fn serve_with_metrics(
    listener: tokio::net::TcpListener,
    opts: ServeOpts,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ttl_ms = opts.lease_ttl.as_millis().clamp(1, i64::MAX as u128) as i64;
    let store = Store::open(&opts.state_dir)?;
    let restored = store.restored_trials()?;
    let workers = store
        .workers()?
        .into_iter()
        .map(|w| (w.id, w.info.host))
        .collect();
    let (sched, decisions) = Scheduler::restore(
        ttl_ms,
        crate::scheduler::DEFAULT_RETRY_BUDGET,
        restored,
        workers,
        opts.clock.sched_ms(),
    );
    let (bus, _) = broadcast::channel(1024);
    let (stop_tx, stop_rx) = watch::channel(false);
    let shared = Arc::new(Shared {
        inner: Mutex::new(Inner {
            store,
            sched,
            drained: Default::default(),
            tuner: Default::default(),
        }),
        notify: Notify::new(),
        bus,
        ttl_ms,
        stop: stop_rx.clone(),
        metrics: metrics.clone(),
        clock: opts.clock.clone(),
    });
    install_gauges(&metrics, &shared);
    shared
        .locked(move |shared, inner| {
            let lost = decisions
                .iter()
                .filter(|d| matches!(d, Decision::Ended { .. }))
                .count();
            if lost > 0 {
                tracing::info!(
                    requeued = lost,
                    "attempts of unknown workers lost in a restart"
                );
            }
            shared.apply(inner, &decisions, shared.clock.wall_ms())?;
            shared.restore_tuner(inner)
        })
        .await
        .map_err(status_to_anyhow)?;
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, state_dir = %opts.state_dir.display(), "coordinator listening");

    let ticker = tokio::spawn(tick_loop(shared.clone()));

    let worker_svc = WorkerServiceServer::new(WorkerApi(shared.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let sweep_svc = SweepServiceServer::new(SweepApi(shared.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let worker_auth = RequireToken::new(opts.worker_token.as_deref(), "worker");
    let admin_auth = RequireToken::new(opts.admin_token.as_deref(), "admin");
    let mut watched = Vec::new();
    if let (Some(f), Some(_)) = (&opts.worker_token_file, &opts.worker_token) {
        watched.push((f.clone(), worker_auth.clone(), "worker"));
    }
    if let (Some(f), Some(_)) = (&opts.admin_token_file, &opts.admin_token) {
        watched.push((f.clone(), admin_auth.clone(), "admin"));
    }
    let token_task = (!watched.is_empty()).then(|| {
        tokio::spawn(token_reload_loop(
            watched,
            opts.token_overlap,
            stop_rx.clone(),
        ))
    });

    // grpc.health.v1.Health and reflection: no token (probes and grpcurl carry none, and they
    // reveal only whether the server works and the schema that is in the repository).
    let (health, _) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::Serving).await;
    let health_svc = HealthServer::new(StoppableHealth {
        inner: tonic_health::server::HealthService::from_health_reporter(health.clone()),
        stop: stop_rx.clone(),
    });
    let health_task = tokio::spawn(health_loop(
        health.clone(),
        opts.state_dir.clone(),
        stop_rx.clone(),
    ));
    let health_port = match &opts.health_listener {
        Some(l) => {
            let l = l
                .try_clone()
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(l)
                })
                .map_err(|e| anyhow::anyhow!("health listener: {e}"))?;
            let svc = HealthServer::new(StoppableHealth {
                inner: tonic_health::server::HealthService::from_health_reporter(health.clone()),
                stop: stop_rx.clone(),
            });
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming_shutdown(no_delay(l), async move {
                        let _ = stop.wait_for(|s| *s).await;
                    }),
            ))
        }
        None => None,
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(ablate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Each version lists itself; register the other so both list every service.
    let reflection_v1 = reflection()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| anyhow::anyhow!("reflection service: {e}"))?;
    let reflection_v1alpha = reflection()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| anyhow::anyhow!("reflection service: {e}"))?;

    let signal = async move {
        shutdown.await;
        // Draining: probes see NOT_SERVING from now on (new connections are refused soon).
        set_health(&health, ServingStatus::NotServing).await;
        tracing::info!("shutting down: health is NOT_SERVING");
        // Wake long polls and watch streams so graceful shutdown does not wait on them.
        let _ = stop_tx.send(true);
    };
    // TLS is terminated here rather than by tonic, so that the certificate can be replaced
    // while the server runs (see `tls_reload_loop`).
    let tls = match &opts.tls {
        Some(id) => {
            let cert = crate::tls::ReloadableCert::new(id)
                .map_err(|e| anyhow::anyhow!("TLS certificate/key: {e:#}"))?;
            let acceptor = crate::tls::acceptor(cert.clone())?;
            let reload = opts.tls_files.clone().map(|files| {
                tokio::spawn(tls_reload_loop(files, id.clone(), cert, stop_rx.clone()))
            });
            Some((acceptor, reload))
        }
        None => None,
    };
    let router = tonic::transport::Server::builder()
        .add_service(InterceptedService::new(worker_svc, worker_auth))
        .add_service(InterceptedService::new(sweep_svc, admin_auth))
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let result = match tls {
        None => {
            router
                .serve_with_incoming_shutdown(no_delay(listener), signal)
                .await
        }
        Some((acceptor, reload)) => {
            let (incoming, accept_task) = tls_incoming(listener, acceptor);
            let r = router.serve_with_incoming_shutdown(incoming, signal).await;
            accept_task.abort();
            if let Some(t) = reload {
                t.abort();
            }
            r
        }
    };
    ticker.abort();
    health_task.abort();
    if let Some(t) = token_task {
        t.abort();
    }
    if let Some(t) = health_port {
        t.abort();
    }
    result.map_err(|e| anyhow::anyhow!("grpc server: {e}"))
}

/// The names health answers for: the whole server (`""`) and each service.
const HEALTH_NAMES: [&str; 3] = [
    "",
    <WorkerServiceServer<WorkerApi> as tonic::server::NamedService>::NAME,
    <SweepServiceServer<SweepApi> as tonic::server::NamedService>::NAME,
];

/// How often the store is probed for the health service, and how long a probe waits for it.
const HEALTH_PERIOD: Duration = Duration::from_millis(500);
const HEALTH_PROBE_WAIT: Duration = Duration::from_millis(250);

/// Accepted connections with Nagle's algorithm off. `serve_with_incoming` does not apply the
/// builder's `tcp_nodelay`, and with Nagle on a small response segment written behind an
/// unacknowledged one waits for the client's delayed ACK: about 40 ms added to every
/// lease/complete round trip on loopback.
fn no_delay(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// NOT_SERVING while the store cannot take a write (locked, disk gone, read-only), SERVING when
/// it can again; stops at shutdown, which leaves NOT_SERVING set.
async fn health_loop(
    health: tonic_health::server::HealthReporter,
    state_dir: PathBuf,
    stop: watch::Receiver<bool>,
) {
    let mut serving = true;
    loop {
        tokio::time::sleep(HEALTH_PERIOD).await;
        let dir = state_dir.clone();
        let probe = tokio::task::spawn_blocking(move || Store::probe(&dir, HEALTH_PROBE_WAIT))
            .await
            .unwrap_or_else(|e| Err(StoreError::Invalid(format!("store probe: {e}"))));
        if *stop.borrow() {
            return;
        }
        match probe {
            Ok(()) if !serving => {
                tracing::info!("store available again: health is SERVING");
                set_health(&health, ServingStatus::Serving).await;
                serving = true;
            }
            Err(e) if serving => {
                tracing::error!(cause = %e, "store unavailable: health is NOT_SERVING");
                set_health(&health, ServingStatus::NotServing).await;
                serving = false;
            }
            _ => {}
        }
    }
}

/// tonic-health's service with `Watch` streams that end at shutdown: an open health watch
/// would otherwise hold graceful shutdown forever.
struct StoppableHealth {
    inner: tonic_health::server::HealthService,
    stop: watch::Receiver<bool>,
}

type HealthWatch = Pin<
    Box<
        dyn tokio_stream::Stream<Item = Result<tonic_health::pb::HealthCheckResponse, Status>>
            + Send,
    >,
>;

#[tonic::async_trait]
impl Health for StoppableHealth {
    async fn check(
        &self,
        req: Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<Response<tonic_health::pb::HealthCheckResponse>, Status> {
        self.inner.check(req).await
    }

    type WatchStream = HealthWatch;

    async fn watch(
        &self,
        req: Request<tonic_health::pb::HealthCheckRequest>,
    ) -> Result<Response<HealthWatch>, Status> {
        let mut inner = self.inner.watch(req).await?.into_inner();
        let mut stop = self.stop.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            // The last status this watcher was sent: a watch that ends because the server
            // drains says NOT_SERVING first (the reporter's own update may not have reached this
            // stream yet), so a watching load balancer takes the server out before the stream
            // closes rather than seeing a SERVING stream vanish.
            let not_serving =
                tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
            let mut last = None;
            loop {
                let item = tokio::select! {
                    biased;
                    item = inner.next() => Some(item),
                    _ = stop.wait_for(|s| *s) => None,
                    _ = tx.closed() => return,
                };
                let Some(item) = item else {
                    if last != Some(not_serving) {
                        let bye = tonic_health::pb::HealthCheckResponse {
                            status: not_serving,
                        };
                        let _ = tx.send(Ok(bye)).await;
                    }
                    return;
                };
                let Some(item) = item else { return };
                last = item.as_ref().ok().map(|r| r.status);
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Inner {
    store: Store,
    sched: Scheduler,
    /// Registrations drained with `ablate drain` (worker id -> checkpoint now): they get no new
    /// lease and are told to exit. In memory only: after a coordinator restart the worker
    /// carries on (drain it again); a worker that registers again (restarted, upgraded) has a
    /// new id and is not drained.
    drained: std::collections::HashMap<String, bool>,
    /// The tuner of `[tune]` sweeps, rebuilt from the store's decisions on start.
    tuner: crate::tune::Tuner,
}

/// Messages for `Watch` streams.
#[derive(Clone, Debug)]
enum Bus {
    Trial(Box<pb::TrialStatus>),
    Progress(pb::TrialProgress),
}

struct Shared {
    inner: Mutex<Inner>,
    /// Woken whenever a trial may have become leasable.
    notify: Notify,
    bus: broadcast::Sender<Bus>,
    ttl_ms: i64,
    stop: watch::Receiver<bool>,
    metrics: Arc<crate::metrics::Metrics>,
    clock: Clock,
}

/// Let the metrics endpoint read trials by state and registered workers from the store at scrape
/// time. A worker counts as connected while it calls at least once per lease long-poll plus TTL.
fn install_gauges(metrics: &crate::metrics::Metrics, shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    let within = MAX_LEASE_WAIT + Duration::from_millis(shared.ttl_ms.max(0) as u64);
    metrics.set_source(within, move || {
        let mut g = crate::metrics::Gauges::default();
        let Some(shared) = weak.upgrade() else {
            return g;
        };
        let inner = shared.lock();
        for t in inner.store.trials().unwrap_or_default() {
            *g.trials_by_state
                .entry(t.state.as_str().to_string())
                .or_default() += 1;
        }
        g.workers_registered = inner.store.workers().map_or(0, |w| w.len() as u64);
        g.sweeps = inner.store.sweeps().map_or(0, |s| s.len() as u64);
        g
    });
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves SQLite consistent (transactions), so go on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` with the lock held on one of tokio's blocking threads, so that SQLite calls (and
    /// waiting for the lock behind them) never stall the runtime's workers. The lock spans the
    /// whole of `f`: the scheduler decides, the store persists, and only then does the caller
    /// answer, in the order the calls took the lock.
    async fn locked<T, F>(self: &Arc<Self>, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Shared, &mut Inner) -> Result<T, Status> + Send + 'static,
    {
        let shared = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut inner = shared.lock();
            f(&shared, &mut inner)
        })
        .await
        .map_err(|e| Status::internal(format!("coordinator state task: {e}")))?
    }

    /// Persist decisions, then announce state changes and wake lease waiters. A grid trial of a
    /// tuned arm that ended is passed to the tuner, whose arm decision (and confirm trials) is
    /// persisted in turn.
    fn apply(&self, inner: &mut Inner, decisions: &[Decision], now: i64) -> Result<(), Status> {
        if decisions.is_empty() {
            return Ok(());
        }
        inner.store.apply(decisions, now).map_err(store_status)?;
        for d in decisions {
            if let Decision::State {
                trial_id, state, ..
            } = d
            {
                if state.is_terminal() && inner.tuner.knows(trial_id) {
                    self.tune_ended(inner, trial_id, *state, now)?;
                }
            }
        }
        let mut seen = HashSet::new();
        let mut wake = false;
        for d in decisions {
            // A gang formed: its other members may be waiting in a lease call for their grant.
            if let Decision::Started { worker_id, .. } = d {
                wake |= worker_id.contains(',');
            }
            if let Decision::State {
                trial_id, state, ..
            } = d
            {
                wake |= *state == TrialState::Queued;
                if seen.insert(trial_id.clone()) {
                    if let Ok(Some(row)) = inner.store.trial(trial_id) {
                        if let Ok(status) = one_trial_status(&inner.store, &row) {
                            let _ = self.bus.send(Bus::Trial(Box::new(status)));
                        }
                    }
                }
            }
        }
        if wake {
            self.notify.notify_waiters();
        }
        Ok(())
    }

    /// A grid trial ended: tell the tuner, and when that decides its arm, add the confirm trials
    /// to every sweep the winner belongs to, then record the decision. Crash-safe in that order:
    /// a restart between the two decides the arm again and finds the confirm trials stored.
    fn tune_ended(
        &self,
        inner: &mut Inner,
        trial_id: &str,
        state: TrialState,
        now: i64,
    ) -> Result<(), Status> {
        let how = match state {
            TrialState::Finished => {
                let loss = inner
                    .store
                    .trial(trial_id)
                    .map_err(store_status)?
                    .and_then(|r| r.metrics_json)
                    .and_then(|j| serde_json::from_str::<TrialMetrics>(&j).ok())
                    .map_or(f64::NAN, |m| m.valid_loss);
                crate::tune::Ended::Finished { valid_loss: loss }
            }
            TrialState::Cancelled => crate::tune::Ended::Cancelled,
            _ => crate::tune::Ended::Out,
        };
        let Some(arm) = inner.tuner.ended(trial_id, how) else {
            return Ok(());
        };
        tracing::info!(arm = %arm.arm, detail = %arm.detail, "tuned arm decided");
        let mut decisions = Vec::new();
        if let Some(best) = &arm.best {
            let trials: Vec<NewTrial> = arm
                .confirm
                .iter()
                .map(|c| NewTrial {
                    id: c.id(),
                    config: c.clone(),
                })
                .collect();
            for sweep in inner.store.sweeps_of(best).map_err(store_status)? {
                inner
                    .store
                    .add_to_sweep(&sweep, &trials)
                    .map_err(store_status)?;
            }
            for t in &trials {
                decisions.extend(inner.sched.submit(TrialSpec {
                    id: t.id.clone(),
                    depends_on: t.config.depends_on().map(str::to_string),
                    cost: t.config.expected_cost(),
                    ranks: t.config.train.ranks,
                }));
            }
        }
        inner.store.record_arm(&arm, now).map_err(store_status)?;
        self.apply(inner, &decisions, now)
    }

    /// A validation loss at a rung of a grid trial: the tuner's decision is stored, then acted
    /// on. Returns false when the trial was stopped (the worker is told to stop it).
    fn tune_rung(
        &self,
        inner: &mut Inner,
        trial_id: &str,
        step: u64,
        loss: f64,
        now: i64,
    ) -> Result<bool, Status> {
        let Some(d) = inner.tuner.rung_report(trial_id, step, loss) else {
            return Ok(true);
        };
        inner.store.record_rung(&d, now).map_err(store_status)?;
        tracing::info!(trial = %trial_id, rung = d.rung, step, loss, verdict = d.verdict.as_str(), detail = %d.detail, "tuner decided");
        if d.verdict == crate::tune::Verdict::Continue {
            return Ok(true);
        }
        self.stop_trial(inner, &d, now)?;
        Ok(false)
    }

    fn stop_trial(
        &self,
        inner: &mut Inner,
        d: &crate::tune::RungDecision,
        now: i64,
    ) -> Result<(), Status> {
        let message = format!(
            "stopped by the tuner at step {} (rung {}) with validation loss {:.4}: {}",
            d.step, d.rung, d.loss, d.detail
        );
        let decisions = inner
            .sched
            .stop(&d.trial_id, &message)
            .map_err(sched_status)?;
        self.apply(inner, &decisions, now)
    }

    /// Rebuild the tuner from the store after a start: the grid trials, the rung decisions taken
    /// (a stop that was stored but not yet applied is applied now), the arms decided, and the
    /// trials that ended (an arm whose last trial ended but whose decision was not stored is
    /// decided now).
    fn restore_tuner(&self, inner: &mut Inner) -> Result<(), Status> {
        let rows = inner.store.trials().map_err(store_status)?;
        for row in &rows {
            if let Ok(c) = serde_json::from_str::<TrialConfig>(&row.config_json) {
                inner.tuner.add(&row.id, &c);
            }
        }
        let rungs = inner.store.rung_decisions(None).map_err(store_status)?;
        for d in &rungs {
            inner.tuner.restore_rung(d);
        }
        for arm in inner.store.arm_decisions().map_err(store_status)? {
            inner.tuner.restore_arm(&arm.arm_key);
        }
        let now = self.clock.wall_ms();
        for d in rungs
            .iter()
            .filter(|d| d.verdict == crate::tune::Verdict::Stop)
        {
            if inner
                .sched
                .state(&d.trial_id)
                .is_some_and(|s| !s.is_terminal())
            {
                self.stop_trial(inner, d, now)?;
            }
        }
        for row in &rows {
            if row.state.is_terminal() && inner.tuner.knows(&row.id) {
                self.tune_ended(inner, &row.id, row.state, now)?;
            }
        }
        Ok(())
    }

    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

async fn tick_loop(shared: Arc<Shared>) {
    let period = Duration::from_millis((shared.ttl_ms / 10).clamp(20, 1000) as u64);
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let r = shared
            .locked(|shared, inner| {
                let decisions = inner.sched.tick(shared.clock.sched_ms());
                for d in &decisions {
                    if let Decision::Ended {
                        trial_id, attempt, ..
                    } = d
                    {
                        tracing::warn!(trial = %trial_id, attempt, "lease expired");
                        shared.metrics.leases_expired(1);
                    }
                }
                shared.apply(inner, &decisions, shared.clock.wall_ms())
            })
            .await;
        if let Err(e) = r {
            tracing::error!(cause = %e.message(), "could not persist expired leases");
        }
    }
}

/// Accept TCP connections and hand the server those whose TLS handshake succeeded (each
/// handshake in a task of its own, with a time limit, so one slow client holds up nobody).
fn tls_incoming(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> (
    ReceiverStream<Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, cause = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

/// Certificate rotation: re-read the certificate and key files every second and on SIGHUP; a
/// changed pair that loads (parses, and the key matches) is served to new connections, while
/// the connections already open keep theirs, so no worker is cut off. A pair that does not load
/// (one file written, not yet the other) changes nothing and is reported once.
async fn tls_reload_loop(
    (cert, key): (PathBuf, PathBuf),
    mut current: crate::tls::TlsIdentity,
    served: Arc<crate::tls::ReloadableCert>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut bad = false;
    loop {
        tokio::select! {
            _ = async {
                match hup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        let (Ok(c), Ok(k)) = (std::fs::read(&cert), std::fs::read(&key)) else {
            continue;
        };
        if c == current.cert_pem && k == current.key_pem {
            bad = false;
            continue;
        }
        let next = crate::tls::TlsIdentity {
            cert_pem: c,
            key_pem: k,
        };
        match served.set(&next) {
            Ok(()) => {
                tracing::info!(cert = %cert.display(), "TLS certificate changed: new connections get the new one, open ones keep theirs");
                current = next;
                bad = false;
            }
            Err(e) if !bad => {
                bad = true;
                tracing::warn!(cert = %cert.display(), key = %key.display(), cause = %format!("{e:#}"), "TLS certificate or key changed but does not load: still serving the previous one");
            }
            Err(_) => {}
        }
    }
}

/// Token rotation: re-read each token file every second and on SIGHUP; a token that changed
/// becomes current and the one it replaces stays valid for `overlap` (so the workers can be
/// given the new one while they train). A file that cannot be read or holds no valid token
/// (half written) changes nothing and is reported once until it is good again.
async fn token_reload_loop(
    files: Vec<(PathBuf, RequireToken, &'static str)>,
    overlap: Duration,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut bad = vec![false; files.len()];
    loop {
        let by_signal = tokio::select! {
            _ = async {
                match hup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => true,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            _ = stop.changed() => return,
        };
        if by_signal {
            tracing::info!("SIGHUP: re-reading the token files");
        }
        for (i, (path, auth, role)) in files.iter().enumerate() {
            match ablate_proto::auth::read_token_file(path) {
                Ok(t) => {
                    bad[i] = false;
                    if auth.rotate(&t, overlap) {
                        tracing::info!(
                            file = %path.display(), ?overlap,
                            "{role} token changed: the new one is in effect, the previous one is \
                             accepted for the overlap"
                        );
                    }
                }
                Err(e) if !bad[i] => {
                    bad[i] = true;
                    tracing::warn!(cause = %format!("{e:#}"), "{role} token file unreadable: keeping the current token");
                }
                Err(_) => {}
            }
        }
    }
}

/// Version skew between a worker and this coordinator, refused at registration: a worker that
/// speaks another protocol would misread leases or send reports this coordinator misreads.
/// Version 0 is a worker from before the field existed: accepted, with a warning to upgrade it.
fn check_protocol_version(theirs: u32, name: &str, host: &str) -> Result<(), Status> {
    let ours = ablate_proto::PROTOCOL_VERSION;
    if theirs == ours {
        return Ok(());
    }
    if theirs == 0 {
        tracing::warn!(
            worker = %name, host = %host, coordinator_protocol = ours,
            "worker sends no protocol version (an ablate-worker older than this coordinator): \
             accepted; upgrade it to ablate-worker {}",
            env!("CARGO_PKG_VERSION")
        );
        return Ok(());
    }
    let upgrade = if theirs < ours {
        format!(
            "upgrade the worker to ablate-worker {} (or run a coordinator of its version)",
            env!("CARGO_PKG_VERSION")
        )
    } else {
        "upgrade the coordinator (ablate serve) to the workers' release, or run workers of this \
         coordinator's release"
            .to_string()
    };
    tracing::warn!(worker = %name, host = %host, worker_protocol = theirs, coordinator_protocol = ours, "refused a worker of another protocol version");
    Err(Status::failed_precondition(format!(
        "version skew: worker {name:?} speaks protocol version {theirs}, this coordinator \
         (ablate {}) speaks protocol version {ours}: {upgrade}",
        env!("CARGO_PKG_VERSION")
    )))
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Invalid(m) => Status::invalid_argument(m),
        StoreError::NotFound(m) => Status::not_found(m),
        other => {
            tracing::error!(cause = %other, "store error");
            Status::internal(other.to_string())
        }
    }
}

fn sched_status(e: SchedError) -> Status {
    match e {
        SchedError::UnknownWorker(w) => {
            Status::not_found(format!("unknown worker {w}: register again"))
        }
        SchedError::UnknownTrial(t) => Status::not_found(format!("unknown trial {t}")),
        e @ SchedError::NotInGang { .. } => Status::failed_precondition(e.to_string()),
    }
}

fn status_to_anyhow(s: Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

fn non_empty(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!(
            "{field}: must not be empty"
        )))
    } else {
        Ok(())
    }
}

/// The status a user sees for one trial, from its row and the details read for it.
fn trial_status(d: &TrialDetails, row: &TrialRow) -> pb::TrialStatus {
    let worker = row
        .worker_id
        .as_deref()
        // A gang's attempt lists its members; rank 0 stands for it.
        .and_then(|w| d.workers.get(w.split(',').next().unwrap_or(w)));
    let progress =
        d.latest_step
            .get(&row.id)
            .and_then(|json| match serde_json::from_str::<Progress>(json) {
                Ok(Progress::Step {
                    step,
                    total,
                    loss,
                    tokens_per_sec,
                    ..
                }) => Some(pb::LatestProgress {
                    step,
                    total,
                    loss,
                    tokens_per_sec,
                }),
                _ => None,
            });
    pb::TrialStatus {
        id: row.id.clone(),
        name: row.name.clone(),
        method: row.method.clone(),
        state: row.state.as_str().to_string(),
        attempts: row.attempts,
        metrics_json: row.metrics_json.clone().unwrap_or_default(),
        failure_reason: row.failure_reason.clone(),
        failure_message: row.failure_message.clone(),
        worker_name: worker
            .map(|w| {
                let ranks = row
                    .worker_id
                    .as_deref()
                    .map_or(1, |ids| ids.split(',').count());
                if ranks > 1 {
                    format!("{} +{} ranks", w.info.name, ranks - 1)
                } else {
                    w.info.name.clone()
                }
            })
            .unwrap_or_default(),
        device_name: worker
            .map(|w| w.info.device_name.clone())
            .unwrap_or_default(),
        started_unix_ms: row.started_ms.unwrap_or(0),
        finished_unix_ms: row.finished_ms.unwrap_or(0),
        progress,
        config_json: row.config_json.clone(),
        attempt_costs: attempt_costs(d, &row.id),
        wait_reason: String::new(),
        tune_json: tune_json(d, &row.id),
    }
}

/// The status of one trial, read from the store.
fn one_trial_status(store: &Store, row: &TrialRow) -> Result<pb::TrialStatus, Status> {
    let d = store
        .trial_details(Scope::Trial(&row.id), row.worker_id.as_deref())
        .map_err(store_status)?;
    Ok(trial_status(&d, row))
}

/// The tuner's rung decisions about a trial as JSON (empty when it has none).
fn tune_json(d: &TrialDetails, trial_id: &str) -> String {
    let Some(rungs) = d.rungs.get(trial_id).filter(|r| !r.is_empty()) else {
        return String::new();
    };
    let list: Vec<serde_json::Value> = rungs
        .iter()
        .map(|d| {
            serde_json::json!({
                "rung": d.rung,
                "step": d.step,
                "loss": d.loss.is_finite().then_some(d.loss),
                "verdict": d.verdict.as_str(),
                "detail": d.detail,
            })
        })
        .collect();
    serde_json::json!({ "rungs": list }).to_string()
}

/// Each attempt's span, devices and price, for the report's cost table.
fn attempt_costs(d: &TrialDetails, trial_id: &str) -> Vec<pb::AttemptCost> {
    let Some(attempts) = d.attempts.get(trial_id) else {
        return Vec::new();
    };
    attempts
        .iter()
        .map(|a| {
            let members: Vec<_> = a.worker_id.split(',').map(|w| d.workers.get(w)).collect();
            pb::AttemptCost {
                attempt: a.attempt,
                outcome: a.outcome.clone().unwrap_or_default(),
                started_unix_ms: a.started_ms,
                ended_unix_ms: a.ended_ms.unwrap_or(0),
                devices: members.len() as u32,
                device_kind: members
                    .first()
                    .and_then(|w| w.as_ref())
                    .map(|w| w.info.device_kind.clone())
                    .unwrap_or_default(),
                price_per_hour: members
                    .iter()
                    .flatten()
                    .map(|w| w.info.price_per_hour)
                    .sum(),
            }
        })
        .collect()
}

fn sweep_snapshot(inner: &Inner, clock: &Clock, key: &str) -> Result<pb::GetResponse, Status> {
    let store = &inner.store;
    let sweep = store
        .find_sweep(key)
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("no sweep with id or name {key:?}")))?;
    let trials = store.sweep_trials(&sweep.id).map_err(store_status)?;
    // One query per table for the whole sweep, not several per trial.
    let details = store
        .trial_details(
            Scope::Sweep(&sweep.id),
            trials.iter().filter_map(|t| t.worker_id.as_deref()),
        )
        .map_err(store_status)?;
    let mut why = inner
        .sched
        .wait_reasons(trials.iter().map(|t| t.id.as_str()), clock.sched_ms());
    Ok(pb::GetResponse {
        sweep_id: sweep.id,
        name: sweep.name,
        sweep_text: sweep.text,
        created_unix_ms: sweep.created_ms,
        trials: trials
            .iter()
            .map(|t| pb::TrialStatus {
                wait_reason: why.remove(&t.id).unwrap_or_default(),
                ..trial_status(&details, t)
            })
            .collect(),
    })
}

// ------------------------------------------------------------------------------ WorkerService

struct WorkerApi(Arc<Shared>);

type ChunkStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>>;
type WatchStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let r = req.into_inner();
        check_protocol_version(r.protocol_version, &r.worker_name, &r.host)?;
        let kind = r.device_kind.trim().to_string();
        if kind != "cpu" && kind != "cuda" && kind != "metal" {
            return Err(Status::invalid_argument(format!(
                "device_kind: {kind:?} is not one of cpu, cuda, metal"
            )));
        }
        let info = WorkerInfo {
            name: r.worker_name,
            host: r.host,
            device_kind: kind,
            device_name: r.device_name,
            memory_bytes: r.memory_bytes,
            price_per_hour: if r.price_per_hour.is_finite() && r.price_per_hour > 0.0 {
                r.price_per_hour
            } else {
                0.0
            },
        };
        let id = self
            .0
            .locked(move |shared, inner| {
                let id = inner
                    .store
                    .register_worker(&info, shared.clock.wall_ms())
                    .map_err(store_status)?;
                inner.sched.register_worker(&id, &info.host);
                shared.metrics.worker_seen(&id);
                tracing::info!(worker = %id, name = %info.name, host = %info.host, device = %info.device_name, "worker registered");
                Ok(id)
            })
            .await?;
        Ok(Response::new(pb::RegisterResponse {
            worker_id: id,
            lease_ttl_ms: self.0.ttl_ms as u64,
            protocol_version: ablate_proto::PROTOCOL_VERSION,
        }))
    }

    async fn lease(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let r = req.into_inner();
        non_empty("worker_id", &r.worker_id)?;
        let wait = Duration::from_millis(r.wait_ms).min(MAX_LEASE_WAIT);
        self.0.metrics.worker_seen(&r.worker_id);
        let until = tokio::time::Instant::now() + wait;
        let mut stop = self.0.stop.clone();
        // While this call waits the worker is a candidate for a gang; when it ends without a
        // lease (timeout, or the worker went away mid-call) it no longer is.
        let mut waiting = Waiting {
            shared: &self.0,
            worker_id: &r.worker_id,
            leased: false,
        };
        // Ask again at least every third of the ttl, so the scheduler sees the worker as waiting.
        let refresh = Duration::from_millis((self.0.ttl_ms / 3).clamp(10, 5_000) as u64);
        let none = |drain| Ok(Response::new(pb::LeaseResponse { lease: None, drain }));
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let worker_id = r.worker_id.clone();
            let got = self
                .0
                .locked(move |shared, inner| {
                    if inner.drained.contains_key(&worker_id) {
                        return Ok(Err(()));
                    }
                    try_lease(shared, inner, &worker_id).map(Ok)
                })
                .await?;
            let Ok(got) = got else {
                tracing::info!(worker = %r.worker_id, "drained worker asked for work: telling it to exit");
                return none(true);
            };
            if let Some(lease) = got {
                waiting.leased = true;
                return Ok(Response::new(pb::LeaseResponse {
                    lease: Some(lease),
                    drain: false,
                }));
            }
            if self.0.stopping() {
                return none(false);
            }
            if tokio::time::Instant::now() >= until {
                return none(false);
            }
            let next = until.min(tokio::time::Instant::now() + refresh);
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn rendezvous(
        &self,
        req: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        let r = req.into_inner();
        non_empty("worker_id", &r.worker_id)?;
        non_empty("trial_id", &r.trial_id)?;
        if !r.post.is_empty() {
            if r.post.len() > 4096 {
                return Err(Status::invalid_argument("post: at most 4096 bytes"));
            }
            let (worker_id, trial_id, post) =
                (r.worker_id.clone(), r.trial_id.clone(), r.post.clone());
            self.0
                .locked(move |_, inner| {
                    inner
                        .sched
                        .post_rendezvous(&worker_id, &trial_id, r.attempt, post)
                        .map_err(sched_status)
                })
                .await?;
            tracing::info!(trial = %r.trial_id, attempt = r.attempt, "gang rendezvous posted");
            return Ok(Response::new(pb::RendezvousResponse { blob: r.post }));
        }
        let until =
            tokio::time::Instant::now() + Duration::from_millis(r.wait_ms).min(MAX_LEASE_WAIT);
        loop {
            let (worker_id, trial_id) = (r.worker_id.clone(), r.trial_id.clone());
            let blob = self
                .0
                .locked(move |_, inner| {
                    Ok(inner
                        .sched
                        .rendezvous(&worker_id, &trial_id, r.attempt)
                        .map_err(sched_status)?
                        .map(|b| b.to_vec()))
                })
                .await?;
            if let Some(blob) = blob {
                return Ok(Response::new(pb::RendezvousResponse { blob }));
            }
            if tokio::time::Instant::now() >= until || self.0.stopping() {
                return Ok(Response::new(pb::RendezvousResponse { blob: Vec::new() }));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let held: Vec<(String, u32)> = r
            .held
            .into_iter()
            .map(|h| (h.trial_id, h.attempt))
            .collect();
        self.0.metrics.worker_seen(&r.worker_id);
        let worker_id = r.worker_id;
        let (ans, drain_checkpoint) = self
            .0
            .locked(move |shared, inner| {
                let ans = inner
                    .sched
                    .heartbeat(&worker_id, &held, shared.clock.sched_ms())
                    .map_err(sched_status)?;
                Ok((ans, inner.drained.get(&worker_id) == Some(&true)))
            })
            .await?;
        let clock = &self.0.clock;
        Ok(Response::new(pb::HeartbeatResponse {
            renewed: ans
                .renewed
                .into_iter()
                .map(|(trial_id, attempt, deadline)| pb::RenewedLease {
                    trial_id,
                    attempt,
                    deadline_unix_ms: clock.shown(deadline),
                })
                .collect(),
            cancel: ans
                .cancel
                .into_iter()
                .map(|(trial_id, attempt)| pb::HeldLease { trial_id, attempt })
                .collect(),
            drain_checkpoint,
        }))
    }

    async fn report(
        &self,
        req: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        let r = req.into_inner();
        // Validate before anything is stored: the report reads this JSON back later.
        let progress = serde_json::from_str::<Progress>(&r.progress_json)
            .map_err(|e| Status::invalid_argument(format!("progress_json: {e}")))?;
        // Stored in canonical form (tag first, no whitespace) so the store can find step events.
        let json = serde_json::to_string(&progress).expect("Progress serialises");
        let accepted = self
            .0
            .locked(move |shared, inner| {
                if !inner.sched.report(&r.trial_id, r.attempt) {
                    return Ok(false);
                }
                let fresh = inner
                    .store
                    .record_event(&r.trial_id, r.attempt, r.seq, &json, shared.clock.wall_ms())
                    .map_err(store_status)?;
                if fresh {
                    shared.metrics.event_recorded();
                    let _ = shared.bus.send(Bus::Progress(pb::TrialProgress {
                        trial_id: r.trial_id.clone(),
                        attempt: r.attempt,
                        progress_json: json,
                    }));
                }
                if let Progress::Eval { step, valid_loss } = progress {
                    if inner.tuner.knows(&r.trial_id) {
                        let now = shared.clock.wall_ms();
                        return shared.tune_rung(inner, &r.trial_id, step, valid_loss, now);
                    }
                }
                Ok(true)
            })
            .await?;
        Ok(Response::new(pb::ReportResponse { accepted }))
    }

    async fn complete(
        &self,
        req: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let r = req.into_inner();
        let metrics: TrialMetrics = serde_json::from_str(&r.metrics_json)
            .map_err(|e| Status::invalid_argument(format!("metrics_json: {e}")))?;
        let accepted = self
            .0
            .locked(move |shared, inner| {
                let decisions = inner.sched.complete(&r.trial_id, r.attempt, r.metrics_json);
                let accepted = !decisions.is_empty();
                shared.apply(inner, &decisions, shared.clock.wall_ms())?;
                if accepted {
                    tracing::info!(trial = %r.trial_id, attempt = r.attempt, perplexity = metrics.perplexity, "trial finished");
                    // The final model is kept; the resumable checkpoint is no longer needed.
                    if let Err(e) = inner.store.delete_artifacts(&r.trial_id, "ckpt/") {
                        tracing::warn!(trial = %r.trial_id, cause = %e, "could not delete the checkpoint");
                    }
                } else {
                    tracing::info!(trial = %r.trial_id, attempt = r.attempt, "stale completion ignored");
                }
                Ok(accepted)
            })
            .await?;
        Ok(Response::new(pb::CompleteResponse { accepted }))
    }

    async fn fail(
        &self,
        req: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailResponse>, Status> {
        let r = req.into_inner();
        let failure = Failure {
            reason: if r.reason.is_empty() {
                "error".into()
            } else {
                r.reason
            },
            message: r.message,
            deterministic: r.deterministic,
            preempted: r.preempted,
        };
        tracing::info!(trial = %r.trial_id, attempt = r.attempt, reason = %failure.reason, preempted = failure.preempted, "attempt failed");
        let accepted = self
            .0
            .locked(move |shared, inner| {
                let decisions = inner.sched.fail(&r.trial_id, r.attempt, failure);
                shared.apply(inner, &decisions, shared.clock.wall_ms())?;
                Ok(!decisions.is_empty())
            })
            .await?;
        Ok(Response::new(pb::FailResponse { accepted }))
    }

    async fn upload_artifact(
        &self,
        req: Request<Streaming<pb::ArtifactChunk>>,
    ) -> Result<Response<pb::UploadArtifactResponse>, Status> {
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("upload stream was empty"))??;
        let (trial_id, attempt, name) = (first.trial_id.clone(), first.attempt, first.name.clone());
        let mut writer = {
            let (trial_id, name) = (trial_id.clone(), name.clone());
            self.0
                .locked(move |_, inner| {
                    if !inner.sched.is_current(&trial_id, attempt) {
                        return Err(Status::failed_precondition(format!(
                            "attempt {attempt} of trial {trial_id} does not own the trial"
                        )));
                    }
                    inner
                        .store
                        .artifact_writer(&trial_id, &name)
                        .map_err(store_status)
                })
                .await?
        };
        writer.write(&first.data).map_err(store_status)?;
        while let Some(chunk) = stream.next().await {
            writer.write(&chunk?.data).map_err(store_status)?;
        }
        // fsync off the runtime's threads; the file is not in place yet.
        let sealed = tokio::task::spawn_blocking(move || writer.seal())
            .await
            .map_err(|e| Status::internal(format!("artifact writer: {e}")))?
            .map_err(store_status)?;
        // The stream may have taken longer than the lease: a stale attempt's late `ckpt/` upload
        // would replace the new attempt's checkpoint. Check ownership again under the lock that
        // puts the file in place, so no new attempt can start between the check and the rename.
        let row = self
            .0
            .locked(move |shared, inner| {
                if !inner.sched.is_current(&trial_id, attempt) {
                    return Err(Status::failed_precondition(format!(
                        "attempt {attempt} of trial {trial_id} lost the trial during its upload of {name}"
                    )));
                }
                let now = shared.clock.wall_ms();
                let row = inner
                    .store
                    .commit_artifact(&trial_id, sealed, now)
                    .map_err(store_status)?;
                tracing::debug!(trial = %trial_id, name = %row.name, size = row.size, "artifact stored");
                Ok(row)
            })
            .await?;

        Ok(Response::new(pb::UploadArtifactResponse {
            size: row.size,
            sha256: row.sha256,
        }))
    }

    type DownloadArtifactStream = ChunkStream;

    async fn download_artifact(
        &self,
        req: Request<pb::DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        download_artifact(&self.0, req.into_inner()).await
    }

    async fn list_artifacts(
        &self,
        req: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        list_artifacts(&self.0, req.into_inner()).await
    }
}

/// One stored artifact as a stream of chunks: the worker side (a base model, a checkpoint to
/// resume) and the user side (`ablate export`) both read through here.
async fn download_artifact(
    shared: &Arc<Shared>,
    r: pb::DownloadArtifactRequest,
) -> Result<Response<ChunkStream>, Status> {
    let (trial_id, name) = (r.trial_id.clone(), r.name.clone());
    let path = shared
        .locked(move |_, inner| {
            let r = pb::DownloadArtifactRequest { trial_id, name };
            let path = inner
                .store
                .artifact_path(&r.trial_id, &r.name)
                .map_err(store_status)?;
            let known = inner
                .store
                .artifacts(&r.trial_id, Some(&r.name))
                .map_err(store_status)?
                .into_iter()
                .any(|a| a.name == r.name);
            if !known {
                return Err(Status::not_found(format!(
                    "trial {} has no artifact {}",
                    r.trial_id, r.name
                )));
            }
            Ok(path)
        })
        .await?;
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| Status::internal(format!("{}: {e}", path.display())))?;
    let (tx, rx) = mpsc::channel(4);
    let (trial_id, name) = (r.trial_id, r.name);
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut first = true;
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("reading artifact: {e}"))))
                        .await;
                    return;
                }
            };
            if n == 0 && !first {
                return;
            }
            buf.truncate(n);
            let chunk = pb::ArtifactChunk {
                trial_id: if first {
                    trial_id.clone()
                } else {
                    String::new()
                },
                attempt: 0,
                name: if first { name.clone() } else { String::new() },
                data: buf,
            };
            first = false;
            if tx.send(Ok(chunk)).await.is_err() || n == 0 {
                return;
            }
        }
    });
    Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
}

/// The stored artifacts of one trial (names, sizes, SHA-256).
async fn list_artifacts(
    shared: &Arc<Shared>,
    r: pb::ListArtifactsRequest,
) -> Result<Response<pb::ListArtifactsResponse>, Status> {
    let rows = shared
        .locked(move |_, inner| {
            inner
                .store
                .artifacts(&r.trial_id, None)
                .map_err(store_status)
        })
        .await?;
    Ok(Response::new(pb::ListArtifactsResponse {
        artifacts: rows
            .into_iter()
            .map(|a| pb::ArtifactInfo {
                name: a.name,
                size: a.size,
                sha256: a.sha256,
            })
            .collect(),
    }))
}

/// Marks a worker as no longer waiting for work when its lease call ends without a lease.
struct Waiting<'a> {
    shared: &'a Shared,
    worker_id: &'a str,
    leased: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.leased {
            self.shared.lock().sched.not_waiting(self.worker_id);
        }
    }
}

/// One try at a lease for a worker, under the lock: granted, persisted, then answered.
fn try_lease(
    shared: &Shared,
    inner: &mut Inner,
    worker_id: &str,
) -> Result<Option<pb::Lease>, Status> {
    let clock = &shared.clock;
    let (grant, decisions) = inner
        .sched
        .lease(worker_id, clock.sched_ms())
        .map_err(sched_status)?;
    let Some(grant) = grant else { return Ok(None) };
    shared.apply(inner, &decisions, clock.wall_ms())?;
    let row = inner
        .store
        .trial(&grant.trial_id)
        .map_err(store_status)?
        .ok_or_else(|| {
            Status::internal(format!("leased trial {} is not stored", grant.trial_id))
        })?;
    let resume = inner
        .store
        .artifacts(&grant.trial_id, Some("ckpt/"))
        .map_err(store_status)?
        .into_iter()
        .map(|a| a.name)
        .collect();
    tracing::info!(trial = %grant.trial_id, attempt = grant.attempt, worker = %worker_id, "lease granted");
    shared.metrics.lease_granted();
    Ok(Some(pb::Lease {
        trial_id: grant.trial_id,
        attempt: grant.attempt,
        config_json: row.config_json,
        base_trial_id: row.depends_on.unwrap_or_default(),
        resume_artifacts: resume,
        deadline_unix_ms: clock.shown(grant.deadline_ms),
        rank: grant.rank,
        world: grant.world,
    }))
}

// ------------------------------------------------------------------------------- SweepService

struct SweepApi(Arc<Shared>);

#[tonic::async_trait]
impl SweepService for SweepApi {
    type DownloadArtifactStream = ChunkStream;

    async fn download_artifact(
        &self,
        req: Request<pb::DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        download_artifact(&self.0, req.into_inner()).await
    }

    async fn list_artifacts(
        &self,
        req: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        list_artifacts(&self.0, req.into_inner()).await
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let r = req.into_inner();
        non_empty("worker_name", &r.worker_name)?;
        let (worker_name, checkpoint) = (r.worker_name.clone(), r.checkpoint);
        let (ids, running) = self
            .0
            .locked(move |_, inner| {
                let r = pb::DrainRequest {
                    worker_name,
                    checkpoint,
                };
                let ids: Vec<String> = inner
                    .store
                    .workers()
                    .map_err(store_status)?
                    .into_iter()
                    .filter(|w| w.info.name == r.worker_name)
                    .map(|w| w.id)
                    .collect();
                if ids.is_empty() {
                    return Err(Status::not_found(format!(
                        "worker_name: no worker named {:?} has registered with this coordinator \
                 (ablate status lists the workers of running trials)",
                        r.worker_name
                    )));
                }
                for id in &ids {
                    *inner.drained.entry(id.clone()).or_insert(false) |= r.checkpoint;
                }
                let running: Vec<String> = inner
                    .store
                    .trials()
                    .map_err(store_status)?
                    .into_iter()
                    .filter(|t| inner.sched.state(&t.id) == Some(TrialState::Running))
                    .filter(|t| {
                        inner
                            .sched
                            .members(&t.id)
                            .iter()
                            .any(|m| ids.iter().any(|i| i == m))
                    })
                    .map(|t| t.id)
                    .collect();
                Ok((ids, running))
            })
            .await?;
        // Wake a drained worker's pending long-poll so that it hears at once.
        self.0.notify.notify_waiters();
        tracing::info!(worker = %r.worker_name, ids = ?ids, checkpoint = r.checkpoint, running = ?running, "worker drained");
        Ok(Response::new(pb::DrainResponse {
            worker_ids: ids,
            running,
        }))
    }

    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let r = req.into_inner();
        let mut trials = Vec::with_capacity(r.trials.len());
        for (i, t) in r.trials.iter().enumerate() {
            let config: TrialConfig = serde_json::from_str(&t.config_json)
                .map_err(|e| Status::invalid_argument(format!("trials[{i}].config_json: {e}")))?;
            let id = config.id();
            if !t.id.is_empty() && t.id != id {
                return Err(Status::invalid_argument(format!(
                    "trials[{i}].id: {} does not match the config's id {id} (client and \
                     coordinator versions differ?)",
                    t.id
                )));
            }
            trials.push(NewTrial { id, config });
        }
        let now = self.0.clock.wall_ms();
        let submitted = self
            .0
            .locked(move |shared, inner| {
                let submitted = inner
                    .store
                    .submit(&r.sweep_name, &r.sweep_text, &trials, now)
                    .map_err(store_status)?;
                let mut decisions = Vec::new();
                for t in &trials {
                    inner.tuner.add(&t.id, &t.config);
                    decisions.extend(inner.sched.submit(TrialSpec {
                        id: t.id.clone(),
                        depends_on: t.config.depends_on().map(str::to_string),
                        cost: t.config.expected_cost(),
                        ranks: t.config.train.ranks,
                    }));
                }
                shared.apply(inner, &decisions, now)?;
                Ok(submitted)
            })
            .await?;
        tracing::info!(sweep = %submitted.sweep_id, added = submitted.added.len(), present = submitted.already_present.len(), "sweep submitted");
        Ok(Response::new(pb::SubmitResponse {
            sweep_id: submitted.sweep_id,
            added: submitted.added,
            already_present: submitted.already_present,
        }))
    }

    async fn list(
        &self,
        _req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let sweeps = self
            .0
            .locked(|_, inner| {
                let mut sweeps = Vec::new();
                for s in inner.store.sweeps().map_err(store_status)? {
                    let trials = inner.store.sweep_trials(&s.id).map_err(store_status)?;
                    let count =
                        |st: TrialState| trials.iter().filter(|t| t.state == st).count() as u32;
                    sweeps.push(pb::SweepSummary {
                        sweep_id: s.id,
                        name: s.name,
                        created_unix_ms: s.created_ms,
                        trials: trials.len() as u32,
                        queued: count(TrialState::Queued) + count(TrialState::Waiting),
                        running: count(TrialState::Running),
                        finished: count(TrialState::Finished),
                        failed: count(TrialState::Failed),
                        cancelled: count(TrialState::Cancelled),
                        stopped: count(TrialState::Stopped),
                    });
                }
                Ok(sweeps)
            })
            .await?;
        Ok(Response::new(pb::ListResponse { sweeps }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let r = req.into_inner();
        let snap = self
            .0
            .locked(move |shared, inner| sweep_snapshot(inner, &shared.clock, &r.sweep))
            .await?;
        Ok(Response::new(snap))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let key = req.into_inner().sweep;
        // Subscribe before the snapshot so nothing falls between them.
        let mut rx = self.0.bus.subscribe();
        let snapshot = self
            .0
            .locked(move |shared, inner| sweep_snapshot(inner, &shared.clock, &key))
            .await?;
        let ids: HashSet<String> = snapshot.trials.iter().map(|t| t.id.clone()).collect();
        let sweep_id = snapshot.sweep_id.clone();
        let (tx, out) = mpsc::channel(256);
        let shared = self.0.clone();
        let mut stop = self.0.stop.clone();
        tokio::spawn(async move {
            let send = |e| pb::WatchEvent { event: Some(e) };
            if tx
                .send(Ok(send(pb::watch_event::Event::Snapshot(snapshot))))
                .await
                .is_err()
            {
                return;
            }
            loop {
                let msg = tokio::select! {
                    m = rx.recv() => m,
                    _ = tx.closed() => return,
                    _ = stop.changed() => return,
                };
                let event = match msg {
                    Ok(Bus::Trial(t)) if ids.contains(&t.id) => pb::watch_event::Event::Trial(*t),
                    Ok(Bus::Progress(p)) if ids.contains(&p.trial_id) => {
                        pb::watch_event::Event::Progress(p)
                    }
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Too slow to follow every event: send the whole picture again.
                        let id = sweep_id.clone();
                        let snap = shared
                            .locked(move |shared, inner| sweep_snapshot(inner, &shared.clock, &id))
                            .await;
                        match snap {
                            Ok(s) => pb::watch_event::Event::Snapshot(s),
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(send(event))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let r = req.into_inner();
        let cancelled = self
            .0
            .locked(move |shared, inner| {
                let mut ids = Vec::new();
                if !r.sweep.is_empty() {
                    let sweep = inner
                        .store
                        .find_sweep(&r.sweep)
                        .map_err(store_status)?
                        .ok_or_else(|| {
                            Status::not_found(format!("no sweep with id or name {:?}", r.sweep))
                        })?;
                    ids.extend(
                        inner
                            .store
                            .sweep_trials(&sweep.id)
                            .map_err(store_status)?
                            .into_iter()
                            .map(|t| t.id),
                    );
                }
                ids.extend(r.trial_ids);
                // Validate every id before the scheduler changes anything: an error half way used to
                // leave the first trials cancelled in memory but running in the store (and a restart
                // revived them). Then decide, then persist.
                if let Some(unknown) = ids.iter().find(|id| inner.sched.state(id).is_none()) {
                    return Err(sched_status(SchedError::UnknownTrial(unknown.clone())));
                }
                let mut decisions = Vec::new();
                let mut cancelled = Vec::new();
                for id in ids {
                    let ds = inner.sched.cancel(&id).map_err(sched_status)?;
                    if !ds.is_empty() {
                        cancelled.push(id);
                    }
                    decisions.extend(ds);
                }
                shared.apply(inner, &decisions, shared.clock.wall_ms())?;
                Ok(cancelled)
            })
            .await?;
        tracing::info!(n = cancelled.len(), "trials cancelled");
        Ok(Response::new(pb::CancelResponse { cancelled }))
    }

    async fn events(
        &self,
        req: Request<pb::EventsRequest>,
    ) -> Result<Response<pb::EventsResponse>, Status> {
        let r = req.into_inner();
        let events = self
            .0
            .locked(move |_, inner| {
                if inner
                    .store
                    .trial(&r.trial_id)
                    .map_err(store_status)?
                    .is_none()
                {
                    return Err(Status::not_found(format!("unknown trial {}", r.trial_id)));
                }
                inner.store.events(&r.trial_id).map_err(store_status)
            })
            .await?;
        Ok(Response::new(pb::EventsResponse {
            events: events
                .into_iter()
                .map(|e| pb::RecordedEvent {
                    attempt: e.attempt,
                    seq: e.seq,
                    unix_ms: e.unix_ms,
                    progress_json: e.json,
                })
                .collect(),
        }))
    }
}
