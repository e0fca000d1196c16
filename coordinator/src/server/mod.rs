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

mod health;
mod snapshot;
mod state;
mod sweep_api;
mod transport;
mod worker_api;

use health::*;
use snapshot::*;
use state::*;
use sweep_api::*;
use transport::*;
use worker_api::*;

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
