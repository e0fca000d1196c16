//! Remote mode: dial a coordinator, lease one trial at a time, run it, report, repeat.
//!
//! The worker always dials out (rented machines sit behind NAT) and owns nothing but its current
//! lease: the coordinator decides who runs what. For each lease it fetches the base trial's model
//! and any checkpoint an earlier attempt left, runs [`experiments::runner::run_trial`] on a blocking
//! thread, and meanwhile:
//!
//! - heartbeats every third of the lease ttl; a cancel order (or a report the coordinator no longer
//!   accepts) sets the trial's stop flag, and the runner checkpoints and returns;
//! - appends every `Progress` to an on-disk spool (`<work>/trials/<id>.reports-<attempt>.jsonl`)
//!   with an increasing sequence number; a sender task replays the spool in order as `Report`s,
//!   retrying each one until delivered, so a network cut costs disk, not memory, and only delays
//!   reports (the coordinator dedups replays by sequence number);
//! - uploads `ckpt/` after every checkpoint (from a snapshot copy, so training can go on writing;
//!   when a cut lets snapshots pile up, only the newest is sent).
//!
//! A gang lease (`world > 1`: a trial with `train.ranks`) first joins the trial's collective
//! ([`crate::collective`]): rank 0 opens it and posts the rendezvous blob through the coordinator,
//! the other ranks read the blob and join. Only rank 0 reports, uploads and completes; the other
//! ranks train, then keep heartbeating until the coordinator says the trial ended, so that their
//! lease does not lapse while rank 0 evaluates and uploads.
//!
//! On finish it uploads `model/`, `metrics.json` and `samples.json`, then `Complete`; on error,
//! `Fail` with the error's reason and whether retrying can help. SIGTERM/SIGINT (see `main.rs`) set
//! the global stop flag: the trial checkpoints, `ckpt/` is uploaded, the attempt is reported as
//! preempted (no retry budget spent) and the worker exits; if the coordinator cannot be reached
//! to say so, the process still exits its stop grace ([`RemoteOpts::stop_grace`]) after the signal. Every call to the
//! coordinator is retried with capped, jittered exponential backoff while it is unreachable, and
//! each short call has its own time limit, so a silently dead connection is noticed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ablate_proto::auth::BearerToken;
use ablate_proto::connect::AuthChannel;
use ablate_proto::limits::CHUNK_BYTES;
use ablate_proto::names::{check_artifact_name, check_trial_id};
use ablate_proto::pb;
use ablate_proto::pb::worker_service_client::WorkerServiceClient;
use anyhow::Context;
use experiments::runner::{run_trial, Outcome, TrialEnv};
use experiments::train::GradSync;
use experiments::trial::{Progress, TrialConfig};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Code, Status};
use tracing::Instrument;

/// How long the ranks of a gang wait for rank 0's rendezvous.
const GANG_JOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one `Lease` long-poll may wait on the coordinator.
const LEASE_WAIT: Duration = Duration::from_secs(20);
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Time limit of one short call (report, heartbeat, complete, fail): a call on a connection that
/// died silently (cable cut, NAT timeout) fails after this and is retried.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything remote mode needs, resolved from flags and environment by `main.rs`.
/// (No `Debug`: it holds the worker token, which must never reach a log.)
#[derive(Clone)]
pub struct RemoteOpts {
    /// e.g. `http://coord:7070` or `https://coord:7070`.
    pub coordinator: String,
    /// PEM CA to trust for an `https://` coordinator (`None`: the system's roots).
    pub ca_pem: Option<Vec<u8>>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub token: Option<String>,
    /// Where `token` came from: re-read (at most once a second, before a call) so that a
    /// rotated token reaches a running worker without a restart.
    pub token_file: Option<PathBuf>,
    /// Shared by all workers on a host: corpus packages, token caches, downloaded base models.
    pub cache_dir: PathBuf,
    /// This worker's own scratch space: one out dir per trial.
    pub work_dir: PathBuf,
    pub name: String,
    /// Sent at registration for the report's cost table (0: not set).
    pub price_per_hour: f64,
    /// After the first stop signal the worker exits within this long, even if the coordinator
    /// is unreachable ([`crate::signals`]).
    pub stop_grace: Duration,
    /// What `--metrics-listen` shows (`/ready`, `/metrics`): updated whether or not it is served.
    pub metrics: Arc<crate::metrics::WorkerMetrics>,
}

/// The coordinator refused this worker for a reason that restarting cannot fix (version skew):
/// `ablate-worker` exits [`ablate_proto::EXIT_CONFIG`] (78) on it, which the systemd unit, the
/// `--all-gpus` supervisor and the Slurm script do not restart.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Builds the runner's environment for one trial (base dir, out dir, cache dir, stop flag, the
/// gang's collective).
type EnvFactory = Arc<
    dyn Fn(
            Option<PathBuf>,
            PathBuf,
            PathBuf,
            Arc<AtomicBool>,
            Option<Arc<dyn GradSync>>,
        ) -> TrialEnv
        + Send
        + Sync,
>;

type Client = WorkerServiceClient<AuthChannel>;

/// Run until the stop flag is set (between trials, or after the running trial checkpointed), or
/// until the drain flag is set (SIGUSR1, or `ablate drain` on the coordinator) and no trial runs.
pub async fn run_remote(
    opts: RemoteOpts,
    stop: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let device = experiments::runner::parse_device(&opts.device)
        .with_context(|| format!("--device {}", opts.device))?;
    // The worker crate does not name candle's types: a closure carries the device instead.
    let gang_device = device.clone();
    let make_env: EnvFactory = Arc::new(move |base_dir, out_dir, cache_dir, stop, sync| TrialEnv {
        device: device.clone(),
        base_dir,
        out_dir,
        cache_dir,
        stop,
        sync,
    });
    let client = client(&opts)?;
    std::fs::create_dir_all(&opts.work_dir)
        .with_context(|| format!("creating work dir {}", opts.work_dir.display()))?;
    std::fs::create_dir_all(&opts.cache_dir)
        .with_context(|| format!("creating cache dir {}", opts.cache_dir.display()))?;
    let mut w = Worker {
        opts,
        client,
        make_env,
        gang_device,
        stop,
        drain,
        worker_id: String::new(),
        ttl: Duration::from_secs(30),
    };
    // Preemption is bounded: whatever the network does, exit the stop grace after the first
    // signal.
    let watchdog_stop = w.stop.clone();
    let grace = w.opts.stop_grace;
    tokio::spawn(async move {
        flag_set(&watchdog_stop).await;
        tokio::time::sleep(grace).await;
        tracing::warn!(
            ?grace,
            "could not finish stopping within the stop grace: exiting now"
        );
        std::process::exit(1);
    });
    tokio::spawn(watch_state(
        w.opts.metrics.clone(),
        w.opts.device.clone(),
        w.stop.clone(),
        w.drain.clone(),
    ));
    w.register().await?;
    while !w.stopping() && !w.draining() {
        let lease = match w.lease().await {
            Ok(Some(l)) => l,
            Ok(None) => continue,
            Err(e) if e.code() == Code::NotFound => {
                // The coordinator lost our registration (fresh state dir): register again.
                tracing::warn!(cause = %e.message(), "registering again");
                w.register().await?;
                continue;
            }
            Err(e) => return Err(anyhow::anyhow!("lease: {}", e.message())),
        };
        let span = tracing::info_span!("trial", id = %lease.trial_id, attempt = lease.attempt);
        let completed = w.run_lease(lease).instrument(span).await?;
        w.opts.metrics.trial_ended(completed);
    }
    if w.draining() && !w.stopping() {
        tracing::info!("drained: no trial running, taking no new one; exiting");
    } else {
        tracing::info!("stopping: no trial running");
    }
    Ok(())
}

/// Keeps the metrics' state and device memory current: draining and stopping make `/ready`
/// answer 503 at once (a rolling upgrade waits on it), memory is sampled every 10 s (nvidia-smi
/// is too slow to run per step).
async fn watch_state(
    metrics: Arc<crate::metrics::WorkerMetrics>,
    device: String,
    stop: Arc<AtomicBool>,
    drain: Arc<AtomicBool>,
) {
    let mut memory = tokio::time::interval(Duration::from_secs(10));
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = memory.tick() => {
                let d = device.clone();
                if let Ok(Some(b)) =
                    tokio::task::spawn_blocking(move || crate::metrics::device_memory_bytes(&d)).await
                {
                    metrics.set_device_memory(b);
                }
            }
            _ = poll.tick() => {
                if stop.load(Ordering::SeqCst) {
                    metrics.set_state(crate::metrics::State::Stopping);
                } else if drain.load(Ordering::SeqCst) {
                    metrics.set_state(crate::metrics::State::Draining);
                }
            }
        }
    }
}

fn client(opts: &RemoteOpts) -> anyhow::Result<Client> {
    let ep = ablate_proto::connect::endpoint(&opts.coordinator, opts.ca_pem.as_deref())?;
    // Lazy: the channel (re)connects on use, so an unreachable coordinator is just a failed call.
    let channel = ep.connect_lazy();
    // With a token file the token is re-read from it before calls, so a rotated token reaches a
    // running worker within the coordinator's overlap window.
    let bearer = match (opts.token.as_deref(), &opts.token_file) {
        (Some(t), Some(f)) => BearerToken::watching("worker", t, f.clone()),
        (t, _) => BearerToken::new(t),
    }
    .context("worker token")?;
    Ok(ablate_proto::connect::worker_client(channel, bearer))
}

/// Errors worth retrying: the coordinator is down, restarting, or the network is cut.
fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Internal
    )
}

/// Resolves once `flag` is set (polled: the flag is set from a signal handler task).
async fn flag_set(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Capped exponential backoff with jitter; state kept by the caller.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: Duration::from_millis(200),
        }
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.step()).await;
    }

    /// The next delay (the current one, jittered to 0.5-1.5x), doubling the one after up to
    /// [`MAX_BACKOFF`].
    fn step(&mut self) -> Duration {
        let d = self.next.mul_f64(0.5 + jitter_fraction());
        self.next = (self.next * 2).min(MAX_BACKOFF);
        d
    }
}

/// A number in [0, 1) from the clock's nanoseconds: enough to spread reconnecting workers apart.
fn jitter_fraction() -> f64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let x = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    x as f64 / (1u64 << 53) as f64
}

/// Retry `f` while it fails transiently; give up when `stop` says so (returns the last error).
async fn retry<T, F, Fut>(
    what: &str,
    give_up: &(dyn Fn() -> bool + Sync),
    mut f: F,
) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut backoff = Backoff::new();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && !give_up() => {
                tracing::warn!(call = what, cause = %e.message(), "coordinator unreachable, retrying");
                backoff.wait().await;
            }
            Err(e) => return Err(e),
        }
    }
}

struct Worker {
    opts: RemoteOpts,
    client: Client,
    make_env: EnvFactory,
    /// The device, for the NCCL collective of gang trials.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    gang_device: candle_core::Device,
    stop: Arc<AtomicBool>,
    /// Finish the running trial, take no new one, exit 0.
    drain: Arc<AtomicBool>,
    worker_id: String,
    ttl: Duration,
}

impl Worker {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn draining(&self) -> bool {
        self.drain.load(Ordering::SeqCst)
    }

    async fn register(&mut self) -> anyhow::Result<()> {
        let (kind, name, memory) = describe_device(&self.opts.device);
        let req = pb::RegisterRequest {
            device_kind: kind,
            device_name: name,
            memory_bytes: memory,
            host: hostname().unwrap_or_else(|| "unknown".into()),
            worker_name: self.opts.name.clone(),
            price_per_hour: self.opts.price_per_hour,
            protocol_version: ablate_proto::PROTOCOL_VERSION,
        };
        let stop = self.stop.clone();
        let client = self.client.clone();
        let resp = retry("register", &|| stop.load(Ordering::SeqCst), || {
            let mut c = client.clone();
            let req = req.clone();
            async move { c.register(req).await }
        })
        .await
        .map_err(|e| {
            if e.code() == Code::FailedPrecondition {
                anyhow::Error::new(Refused(format!(
                    "the coordinator {} refused this worker: {}",
                    self.opts.coordinator,
                    e.message()
                )))
            } else {
                anyhow::anyhow!("register with {}: {}", self.opts.coordinator, e.message())
            }
        })?
        .into_inner();
        self.worker_id = resp.worker_id;
        self.ttl = Duration::from_millis(resp.lease_ttl_ms.max(300));
        self.opts.metrics.registered();
        tracing::info!(worker_id = %self.worker_id, coordinator = %self.opts.coordinator, "registered");
        Ok(())
    }

    async fn lease(&mut self) -> Result<Option<pb::Lease>, Status> {
        let req = pb::LeaseRequest {
            worker_id: self.worker_id.clone(),
            wait_ms: LEASE_WAIT.as_millis() as u64,
        };
        let stop = self.stop.clone();
        let client = self.client.clone();
        let give_up = stop.clone();
        let give_up = move || give_up.load(Ordering::SeqCst);
        let call = retry("lease", &give_up, || {
            let mut c = client.clone();
            let req = req.clone();
            async move { c.lease(req).await }
        });
        // A stop or a drain while idle must not wait for the long poll to run out.
        let r = tokio::select! {
            r = call => r,
            _ = flag_set(&stop) => return Ok(None),
            _ = flag_set(&self.drain) => return Ok(None),
        };
        match r {
            Ok(resp) => {
                let resp = resp.into_inner();
                if resp.drain {
                    tracing::info!("the coordinator drained this worker (ablate drain)");
                    self.drain.store(true, Ordering::SeqCst);
                }
                Ok(resp.lease)
            }
            Err(e) if self.stopping() && transient(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Run one leased attempt to its end (finished, failed, stopped or taken away); true when
    /// the coordinator accepted it as completed.
    async fn run_lease(&mut self, lease: pb::Lease) -> anyhow::Result<bool> {
        let trial_id = lease.trial_id.clone();
        let attempt = lease.attempt;
        tracing::info!("leased");
        // Trial ids become directory names that are later removed: refuse any that is not one
        // plain path component before touching the disk.
        let ids_ok = check_lease_id("trial_id", &lease.trial_id).and_then(|()| {
            if lease.base_trial_id.is_empty() {
                Ok(())
            } else {
                check_lease_id("base_trial_id", &lease.base_trial_id)
            }
        });
        if let Err(e) = ids_ok {
            let msg = format!("{e:#}");
            tracing::error!(cause = %msg, "refusing the lease");
            self.fail(&trial_id, attempt, "bad_lease", &msg, true, false)
                .await;
            return Ok(false);
        }
        let out_dir = self.opts.work_dir.join("trials").join(&trial_id);
        let cfg: TrialConfig = match serde_json::from_str(&lease.config_json) {
            Ok(c) => c,
            Err(e) => {
                self.fail(
                    &trial_id,
                    attempt,
                    "bad_config",
                    &format!("config_json: {e}"),
                    true,
                    false,
                )
                .await;
                return Ok(false);
            }
        };
        // Fetch what the run starts from.
        if let Err(e) = self.fetch_inputs(&lease, &out_dir).await {
            tracing::warn!(cause = %e, "fetching inputs failed");
            self.fail(&trial_id, attempt, "fetch", &format!("{e:#}"), false, false)
                .await;
            return Ok(false);
        }
        let base_dir = (!lease.base_trial_id.is_empty()).then(|| {
            self.opts
                .cache_dir
                .join("bases")
                .join(&lease.base_trial_id)
                .join("model")
        });

        let trial_stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicBool::new(false));
        // Heartbeats; a cancel order or a global stop sets the trial's stop flag.
        let hb = tokio::spawn(heartbeat_loop(
            self.client.clone(),
            self.worker_id.clone(),
            trial_id.clone(),
            attempt,
            self.ttl / 3,
            trial_stop.clone(),
            lost.clone(),
            self.stop.clone(),
        ));
        // Reports (and checkpoint uploads), spooled on disk, sent in order, retried until
        // delivered.
        let spool_path = out_dir.with_extension(format!("reports-{attempt}.jsonl"));
        let wake = Arc::new(Notify::new());
        let (mut spool, reader) = match SpoolWriter::create(&spool_path, wake.clone()) {
            Ok(w) => {
                let r = SpoolReader::open(&spool_path, wake);
                (w, r)
            }
            Err(e) => {
                hb.abort();
                let msg = format!("creating the report spool {}: {e}", spool_path.display());
                self.fail(&trial_id, attempt, "io", &msg, false, false)
                    .await;
                return Ok(false);
            }
        };
        let reader = match reader {
            Ok(r) => r,
            Err(e) => {
                hb.abort();
                let msg = format!("opening the report spool {}: {e}", spool_path.display());
                self.fail(&trial_id, attempt, "io", &msg, false, false)
                    .await;
                return Ok(false);
            }
        };
        let latest_snapshot = Arc::new(AtomicU64::new(0));
        let reporter = tokio::spawn(report_loop(
            self.client.clone(),
            trial_id.clone(),
            attempt,
            reader,
            latest_snapshot.clone(),
            trial_stop.clone(),
            lost.clone(),
        ));

        let rank = lease.rank as usize;
        let world = (lease.world as usize).max(1);
        let gang = if world > 1 {
            match self.open_gang(&lease, trial_stop.clone()).await {
                Ok(g) => Some(g),
                Err(e) => {
                    hb.abort();
                    reporter.abort();
                    let _ = std::fs::remove_file(&spool_path);
                    tracing::warn!(cause = %e, "could not join the gang");
                    if !lost.load(Ordering::SeqCst) {
                        self.fail(&trial_id, attempt, "gang", &format!("{e:#}"), false, false)
                            .await;
                    }
                    return Ok(false);
                }
            }
        } else {
            None
        };
        let env = (self.make_env)(
            base_dir,
            out_dir.clone(),
            self.opts.cache_dir.clone(),
            trial_stop.clone(),
            None,
        );
        let snapshot_root = out_dir.with_extension("ckpt-upload");
        let metrics = self.opts.metrics.clone();
        metrics.trial_started(&trial_id, &cfg.name, cfg.train.steps);
        let result = tokio::task::spawn_blocking(move || {
            let mut env = env;
            if let Some(gang) = gang {
                // Blocks until every rank joined (or the trial is stopped).
                env.sync = Some(gang.connect()?);
            }
            let mut snap_n = 0u64;
            let mut on_progress = |p: &Progress| {
                if let Progress::Step {
                    step,
                    tokens_per_sec,
                    ..
                } = p
                {
                    metrics.progress(*step, *tokens_per_sec);
                }
                // Rank 0 speaks for the gang; the others' progress is the same steps.
                if rank != 0 {
                    return;
                }
                spool.report(p);
                if let Progress::Checkpoint { dir, .. } = p {
                    // Snapshot the checkpoint so the upload reads a consistent copy while training
                    // goes on overwriting the original.
                    snap_n += 1;
                    let snap = snapshot_root.join(snap_n.to_string());
                    match copy_dir(&env.out_dir.join(dir), &snap) {
                        Ok(()) => {
                            latest_snapshot.store(snap_n, Ordering::SeqCst);
                            spool.push(&Spooled::Upload {
                                local: snap,
                                prefix: "ckpt".into(),
                                snapshot: snap_n,
                            });
                        }
                        Err(e) => tracing::warn!(cause = %e, "could not snapshot checkpoint"),
                    }
                }
            };
            // The spool is closed (its end marked) when this closure returns or unwinds.
            run_trial(&cfg, &env, &mut on_progress)
        })
        .await
        .context("trial thread panicked")?;
        // Drain every report before the final word.
        let _ = reporter.await;
        let _ = std::fs::remove_file(&spool_path);
        let _ = std::fs::remove_dir_all(out_dir.with_extension("ckpt-upload"));
        let lost_lease = lost.load(Ordering::SeqCst);
        let mut completed = false;
        match result {
            Ok(Outcome::Finished(metrics)) if !lost_lease => {
                tracing::info!(
                    perplexity = metrics.perplexity,
                    "finished; uploading results"
                );
                let mut uploads_ok = true;
                for (local, prefix) in [(out_dir.join("model"), "model")] {
                    if local.is_dir() {
                        uploads_ok &= self.upload_dir(&trial_id, attempt, &local, prefix).await;
                    }
                }
                for f in ["metrics.json", "samples.json"] {
                    let p = out_dir.join(f);
                    if p.is_file() {
                        uploads_ok &= self.upload_file(&trial_id, attempt, f, &p).await;
                    }
                }
                if !uploads_ok {
                    self.fail(
                        &trial_id,
                        attempt,
                        "upload",
                        "could not upload the trial's results",
                        false,
                        false,
                    )
                    .await;
                } else {
                    let json = serde_json::to_string(&metrics).expect("metrics serialise");
                    let client = self.client.clone();
                    let req = pb::CompleteRequest {
                        trial_id: trial_id.clone(),
                        attempt,
                        metrics_json: json,
                    };
                    match retry("complete", &|| false, || {
                        let mut c = client.clone();
                        let req = req.clone();
                        async move { timed(c.complete(req)).await }
                    })
                    .await
                    {
                        Ok(r) if r.get_ref().accepted => {
                            tracing::info!("completed");
                            completed = true;
                            // Everything worth keeping is on the coordinator now.
                            let _ = std::fs::remove_dir_all(&out_dir);
                        }
                        Ok(_) => {
                            tracing::warn!("completion not accepted: the lease was taken away")
                        }
                        Err(e) => {
                            tracing::error!(cause = %e.message(), "could not report completion")
                        }
                    }
                }
            }
            Ok(Outcome::Finished(_)) => {
                tracing::warn!("finished, but the lease was lost; result dropped")
            }
            Ok(Outcome::RankDone { steps }) => {
                tracing::info!(
                    steps,
                    rank,
                    "rank done; heartbeating until rank 0 has reported the trial"
                );
                while !lost.load(Ordering::SeqCst) && !self.stopping() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = std::fs::remove_dir_all(&out_dir);
            }
            Ok(Outcome::Stopped { step }) => {
                if lost_lease {
                    tracing::info!(step, "stopped: the lease was cancelled or taken away");
                } else {
                    tracing::info!(
                        step,
                        "stopped; uploading checkpoint and reporting preemption"
                    );
                    let ckpt = out_dir.join("ckpt");
                    if ckpt.is_dir() && rank == 0 {
                        self.upload_dir(&trial_id, attempt, &ckpt, "ckpt").await;
                    }
                    self.fail(
                        &trial_id,
                        attempt,
                        "preempted",
                        &format!("worker stopped at step {step}"),
                        false,
                        true,
                    )
                    .await;
                }
            }
            Err(e) => {
                tracing::warn!(reason = e.reason(), cause = %e, "trial failed");
                if !lost_lease {
                    // A stop that surfaced as an error is still a preemption.
                    let preempted = matches!(e, experiments::Error::Stopped);
                    self.fail(
                        &trial_id,
                        attempt,
                        e.reason(),
                        &e.to_string(),
                        e.is_deterministic(),
                        preempted,
                    )
                    .await;
                }
            }
        }
        hb.abort();
        Ok(completed)
    }

    /// Meet the other ranks of a gang lease through the coordinator: rank 0 opens the collective
    /// and posts its blob, the others wait for the blob. Joining (which blocks until every rank
    /// is there) happens on the training thread, in [`Gang::connect`].
    async fn open_gang(&self, lease: &pb::Lease, stop: Arc<AtomicBool>) -> anyhow::Result<Gang> {
        let rank = lease.rank as usize;
        let world = lease.world as usize;
        tracing::info!(rank, world, "gang lease: meeting the other ranks");
        let mut req = pb::RendezvousRequest {
            worker_id: self.worker_id.clone(),
            trial_id: lease.trial_id.clone(),
            attempt: lease.attempt,
            post: Vec::new(),
            wait_ms: LEASE_WAIT.as_millis() as u64,
        };
        let give_up = {
            let stop = stop.clone();
            move || stop.load(Ordering::SeqCst)
        };
        if rank == 0 {
            let gang = Gang::host(&self.gang_device, world, stop.clone())?;
            req.post = gang.blob()?;
            let client = self.client.clone();
            retry("rendezvous", &give_up, || {
                let mut c = client.clone();
                let req = req.clone();
                async move { timed(c.rendezvous(req)).await }
            })
            .await
            .map_err(|e| anyhow::anyhow!("posting the gang rendezvous: {}", e.message()))?;
            return Ok(gang);
        }
        let started = std::time::Instant::now();
        loop {
            if give_up() {
                anyhow::bail!("stopped while waiting for rank 0");
            }
            if started.elapsed() > GANG_JOIN_TIMEOUT {
                anyhow::bail!("rank 0 posted no rendezvous within {GANG_JOIN_TIMEOUT:?}");
            }
            let client = self.client.clone();
            let blob = retry("rendezvous", &give_up, || {
                let mut c = client.clone();
                let req = req.clone();
                async move { c.rendezvous(req).await }
            })
            .await
            .map_err(|e| anyhow::anyhow!("waiting for the gang rendezvous: {}", e.message()))?
            .into_inner()
            .blob;
            if !blob.is_empty() {
                return Gang::join(&self.gang_device, blob, rank, world, stop);
            }
        }
    }

    async fn fail(
        &self,
        trial_id: &str,
        attempt: u32,
        reason: &str,
        message: &str,
        deterministic: bool,
        preempted: bool,
    ) {
        let req = pb::FailRequest {
            trial_id: trial_id.into(),
            attempt,
            reason: reason.into(),
            message: message.into(),
            deterministic,
            preempted,
        };
        let client = self.client.clone();
        // A preempted worker gives up quickly (the machine is going away); the lease expires anyway.
        let deadline = tokio::time::Instant::now()
            + if preempted {
                Duration::from_secs(20)
            } else {
                Duration::from_secs(600)
            };
        let r = retry("fail", &|| tokio::time::Instant::now() > deadline, || {
            let mut c = client.clone();
            let req = req.clone();
            async move { timed(c.fail(req)).await }
        })
        .await;
        if let Err(e) = r {
            tracing::error!(cause = %e.message(), "could not report the failure");
        }
    }

    /// Download the base trial's model (once per host) and the checkpoint to resume from.
    async fn fetch_inputs(&self, lease: &pb::Lease, out_dir: &Path) -> anyhow::Result<()> {
        if !lease.base_trial_id.is_empty() {
            let base = self.opts.cache_dir.join("bases").join(&lease.base_trial_id);
            let done = base.join(".complete");
            if !done.exists() {
                let list = self.list(&lease.base_trial_id).await?;
                let names: Vec<String> = list
                    .into_iter()
                    .map(|a| a.name)
                    .filter(|n| n.starts_with("model/"))
                    .collect();
                if names.is_empty() {
                    anyhow::bail!("base trial {} has no model/ artifacts", lease.base_trial_id);
                }
                for n in &names {
                    self.download(&lease.base_trial_id, n, &base.join(n))
                        .await?;
                }
                std::fs::write(&done, b"")
                    .with_context(|| format!("writing {}", done.display()))?;
                tracing::info!(base = %lease.base_trial_id, files = names.len(), "base model fetched");
            }
        }
        if !lease.resume_artifacts.is_empty() {
            let ckpt = out_dir.join("ckpt");
            let _ = std::fs::remove_dir_all(&ckpt);
            for n in &lease.resume_artifacts {
                check_name_from_coordinator(n)?;
                self.download(&lease.trial_id, n, &out_dir.join(n)).await?;
            }
            tracing::info!(
                files = lease.resume_artifacts.len(),
                "resuming from the coordinator's checkpoint"
            );
        }
        Ok(())
    }

    async fn list(&self, trial_id: &str) -> anyhow::Result<Vec<pb::ArtifactInfo>> {
        let client = self.client.clone();
        let req = pb::ListArtifactsRequest {
            trial_id: trial_id.into(),
        };
        let stop = self.stop.clone();
        let r = retry("list_artifacts", &|| stop.load(Ordering::SeqCst), || {
            let mut c = client.clone();
            let req = req.clone();
            async move { c.list_artifacts(req).await }
        })
        .await
        .map_err(|e| anyhow::anyhow!("listing artifacts of {trial_id}: {}", e.message()))?;
        Ok(r.into_inner().artifacts)
    }

    async fn download(&self, trial_id: &str, name: &str, dest: &Path) -> anyhow::Result<()> {
        check_name_from_coordinator(name)?;
        let mut backoff = Backoff::new();
        let mut tries = 0;
        loop {
            tries += 1;
            match download_once(&self.client, trial_id, name, dest).await {
                Ok(()) => return Ok(()),
                Err(e) if tries < 6 && !self.stopping() => {
                    tracing::warn!(cause = %format!("{e:#}"), name, "download failed, retrying");
                    backoff.wait().await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Upload results, retrying through network cuts until the coordinator takes them or says
    /// the attempt no longer owns the trial (a preempted worker stops trying at the watchdog).
    async fn upload_dir(&self, trial_id: &str, attempt: u32, dir: &Path, prefix: &str) -> bool {
        upload_dir(&self.client, trial_id, attempt, dir, prefix, &|| false).await
    }

    async fn upload_file(&self, trial_id: &str, attempt: u32, name: &str, path: &Path) -> bool {
        upload_file_retrying(&self.client, trial_id, attempt, name, path, &|| false).await
    }
}

/// Trial ids from the coordinator name directories under the work and cache dirs that are later
/// removed: the rule the coordinator's store applies too, so an id can never be `..`, absolute or
/// hold a `/`.
fn check_lease_id(field: &str, id: &str) -> anyhow::Result<()> {
    check_trial_id(id).with_context(|| format!("lease {field} from the coordinator"))
}

/// Names coming from the coordinator become local paths: the rule the coordinator's store
/// applies too.
fn check_name_from_coordinator(name: &str) -> anyhow::Result<()> {
    check_artifact_name(name).context("from the coordinator")
}

/// One line of an attempt's report spool.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Spooled {
    /// A progress event (as JSON) with its sequence number.
    Report { seq: u64, progress_json: String },
    /// Upload every file below `local` as `<prefix>/<relative path>`, then delete `local`.
    /// `snapshot` numbers the checkpoint snapshots of the attempt.
    Upload {
        local: PathBuf,
        prefix: String,
        snapshot: u64,
    },
    /// The attempt will produce nothing more.
    End,
}

/// Write side of the spool, owned by the training thread: appends whole lines and wakes the
/// sender. Dropping it marks the end, so the sender stops even if training panicked.
struct SpoolWriter {
    file: std::fs::File,
    path: PathBuf,
    seq: u64,
    wake: Arc<Notify>,
}

impl SpoolWriter {
    fn create(path: &Path, wake: Arc<Notify>) -> std::io::Result<Self> {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        Ok(SpoolWriter {
            file,
            path: path.to_path_buf(),
            seq: 0,
            wake,
        })
    }

    fn report(&mut self, p: &Progress) {
        let seq = self.seq;
        self.seq += 1;
        let progress_json = serde_json::to_string(p).expect("progress serialises");
        self.push(&Spooled::Report { seq, progress_json });
    }

    fn push(&mut self, entry: &Spooled) {
        let mut line = serde_json::to_vec(entry).expect("spool entry serialises");
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            // Disk full or gone: the event is lost to the coordinator, training goes on.
            tracing::warn!(spool = %self.path.display(), cause = %e, "could not spool a report");
        }
        self.wake.notify_one();
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        self.push(&Spooled::End);
    }
}

/// Read side of the spool: yields entries in the order they were written, waiting for more.
struct SpoolReader {
    file: std::fs::File,
    path: PathBuf,
    buf: Vec<u8>,
    wake: Arc<Notify>,
}

impl SpoolReader {
    fn open(path: &Path, wake: Arc<Notify>) -> std::io::Result<Self> {
        Ok(SpoolReader {
            file: std::fs::File::open(path)?,
            path: path.to_path_buf(),
            buf: Vec::new(),
            wake,
        })
    }

    /// The next entry; `End` once the writer is gone.
    async fn next(&mut self) -> Spooled {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                match serde_json::from_slice(&line[..i]) {
                    Ok(e) => return e,
                    Err(e) => {
                        tracing::warn!(spool = %self.path.display(), cause = %e, "skipping a corrupt spool line");
                        continue;
                    }
                }
            }
            let mut chunk = [0u8; 64 << 10];
            match self.file.read(&mut chunk) {
                Ok(0) => {}
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(spool = %self.path.display(), cause = %e, "cannot read the spool");
                    return Spooled::End;
                }
            }
            // Nothing new: wait for the writer (a permit is stored if it wrote meanwhile).
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Send the spool in order: reports (retried until delivered, or until the lease is known lost)
/// and checkpoint uploads (skipped when a newer snapshot is already waiting).
async fn report_loop(
    client: Client,
    trial_id: String,
    attempt: u32,
    mut spool: SpoolReader,
    latest_snapshot: Arc<AtomicU64>,
    trial_stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
) {
    let lost_flag = lost.clone();
    let give_up = move || lost_flag.load(Ordering::SeqCst);
    loop {
        match spool.next().await {
            Spooled::End => return,
            Spooled::Upload {
                local, snapshot, ..
            } if lost.load(Ordering::SeqCst)
                || snapshot < latest_snapshot.load(Ordering::SeqCst) =>
            {
                // The attempt no longer counts, or a newer checkpoint supersedes this one.
                let _ = std::fs::remove_dir_all(local);
            }
            Spooled::Upload { local, prefix, .. } => {
                upload_dir(&client, &trial_id, attempt, &local, &prefix, &give_up).await;
                let _ = std::fs::remove_dir_all(&local);
            }
            Spooled::Report { .. } if lost.load(Ordering::SeqCst) => {}
            Spooled::Report { seq, progress_json } => {
                let req = pb::ReportRequest {
                    trial_id: trial_id.clone(),
                    attempt,
                    seq,
                    progress_json,
                };
                // Keep trying while the coordinator is away: the lease decides who owns the trial.
                let r = retry("report", &give_up, || {
                    let mut c = client.clone();
                    let req = req.clone();
                    async move { timed(c.report(req)).await }
                })
                .await;
                match r {
                    Ok(resp) if !resp.get_ref().accepted => {
                        tracing::warn!(
                            "report refused: the lease was taken away; stopping the trial"
                        );
                        lost.store(true, Ordering::SeqCst);
                        trial_stop.store(true, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(cause = %e.message(), "report not delivered"),
                }
            }
        }
    }
}

/// A short call with [`CALL_TIMEOUT`]: running out counts as a transient failure.
async fn timed<T>(call: impl std::future::Future<Output = Result<T, Status>>) -> Result<T, Status> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer from the coordinator")))
}

#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    client: Client,
    worker_id: String,
    trial_id: String,
    attempt: u32,
    every: Duration,
    trial_stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
    global_stop: Arc<AtomicBool>,
) {
    let mut interval = tokio::time::interval(every.max(Duration::from_millis(100)));
    let mut poll = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = interval.tick() => {
                let req = pb::HeartbeatRequest {
                    worker_id: worker_id.clone(),
                    held: vec![pb::HeldLease { trial_id: trial_id.clone(), attempt }],
                };
                let mut c = client.clone();
                match timed(c.heartbeat(req)).await {
                    Ok(resp) => {
                        let resp = resp.into_inner();
                        if resp.cancel.iter().any(|h| h.trial_id == trial_id && h.attempt == attempt) {
                            tracing::info!("cancel order received: stopping the trial");
                            lost.store(true, Ordering::SeqCst);
                            trial_stop.store(true, Ordering::SeqCst);
                        }
                        if resp.drain_checkpoint && !global_stop.swap(true, Ordering::SeqCst) {
                            // As on SIGTERM: checkpoint, give the trial back, exit 0.
                            tracing::info!("drained with --checkpoint (ablate drain): checkpointing the trial and giving it back");
                        }
                    }
                    Err(e) if e.code() == Code::NotFound => {
                        tracing::warn!("coordinator no longer knows this worker: stopping the trial");
                        lost.store(true, Ordering::SeqCst);
                        trial_stop.store(true, Ordering::SeqCst);
                    }
                    // Unreachable: keep training; the lease decides.
                    Err(e) => tracing::warn!(cause = %e.message(), "heartbeat failed"),
                }
            }
            _ = poll.tick() => {
                if global_stop.load(Ordering::SeqCst) {
                    trial_stop.store(true, Ordering::SeqCst);
                }
            }
        }
    }
}

async fn upload_dir(
    client: &Client,
    trial_id: &str,
    attempt: u32,
    dir: &Path,
    prefix: &str,
    give_up: &(dyn Fn() -> bool + Sync),
) -> bool {
    let files = match list_files(dir) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), cause = %e, "cannot list files to upload");
            return false;
        }
    };
    let mut ok = true;
    for rel in files {
        let name = format!("{prefix}/{rel}");
        ok &=
            upload_file_retrying(client, trial_id, attempt, &name, &dir.join(&rel), give_up).await;
    }
    ok
}

/// Upload one file, retrying transient failures with backoff until `give_up` says stop.
async fn upload_file_retrying(
    client: &Client,
    trial_id: &str,
    attempt: u32,
    name: &str,
    path: &Path,
    give_up: &(dyn Fn() -> bool + Sync),
) -> bool {
    let mut backoff = Backoff::new();
    loop {
        match upload_once(client, trial_id, attempt, name, path).await {
            Ok(()) => return true,
            Err(e) if transient(&e) && !give_up() => {
                tracing::warn!(name, cause = %e.message(), "upload failed, retrying");
                backoff.wait().await;
            }
            Err(e) => {
                tracing::warn!(name, cause = %e.message(), "upload refused");
                return false;
            }
        }
    }
}

async fn upload_once(
    client: &Client,
    trial_id: &str,
    attempt: u32,
    name: &str,
    path: &Path,
) -> Result<(), Status> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Status::failed_precondition(format!("{}: {e}", path.display())))?;
    let (tx, rx) = mpsc::channel::<pb::ArtifactChunk>(4);
    let (t, n) = (trial_id.to_string(), name.to_string());
    let reader = tokio::spawn(async move {
        let mut first = true;
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let k = file.read(&mut buf).await?;
            if k == 0 && !first {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(k);
            let chunk = pb::ArtifactChunk {
                trial_id: t.clone(),
                attempt,
                name: n.clone(),
                data: buf,
            };
            first = false;
            if tx.send(chunk).await.is_err() || k == 0 {
                return Ok(());
            }
        }
    });
    let mut c = client.clone();
    let r = c.upload_artifact(ReceiverStream::new(rx)).await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Status::failed_precondition(format!(
                "reading {}: {e}",
                path.display()
            )))
        }
        Err(e) => return Err(Status::internal(format!("upload reader: {e}"))),
    }
    r.map(|_| ())
}

async fn download_once(
    client: &Client,
    trial_id: &str,
    name: &str,
    dest: &Path,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let parent = dest
        .parent()
        .context("download destination has no parent")?;
    tokio::fs::create_dir_all(parent)
        .await
        .with_context(|| format!("creating {}", parent.display()))?;
    let tmp = dest.with_extension(format!("part-{}", std::process::id()));
    let mut c = client.clone();
    let mut stream = c
        .download_artifact(pb::DownloadArtifactRequest {
            trial_id: trial_id.into(),
            name: name.into(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("downloading {trial_id}/{name}: {}", e.message()))?
        .into_inner();
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("creating {}", tmp.display()))?;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| anyhow::anyhow!("downloading {trial_id}/{name}: {}", e.message()))?;
        f.write_all(&chunk.data)
            .await
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    f.sync_all()
        .await
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    tokio::fs::rename(&tmp, dest)
        .await
        .with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(())
}

/// Regular files below `dir`, as sorted `/`-separated relative paths.
fn list_files(dir: &Path) -> std::io::Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(root, &p, out)?;
            } else if ft.is_file() {
                let rel = p.strip_prefix(root).expect("below root");
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(rel.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn copy_dir(src: &Path, dst: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(dst);
    for rel in list_files(src)? {
        let to = dst.join(&rel);
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::copy(src.join(&rel), to)?;
    }
    Ok(())
}

/// (kind, name, memory bytes) for the registration: what the status table shows.
fn describe_device(device: &str) -> (String, String, u64) {
    if device.starts_with("cuda") {
        let (name, memory) = experiments::gpus::describe_cuda(device);
        ("cuda".into(), name, memory)
    } else {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "cpu".into());
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix("MemTotal:")
                        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
            })
            .map(|kb| kb * 1024)
            .unwrap_or(0);
        ("cpu".into(), model, mem)
    }
}

/// This machine's name from gethostname(2): the `host` a worker registers with (gang ranks on
/// one host share it) and the default `--name`, so both always agree. (`main.rs` once read
/// `/etc/hostname` for the name, which a container may lack or hold another name in.) `None`
/// when the call fails or the name is empty.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// A gang's collective between the rendezvous (async, through the coordinator) and the blocking
/// join on the training thread.
enum Gang {
    TcpHost(crate::collective::TcpHost, Arc<AtomicBool>),
    TcpJoin {
        blob: Vec<u8>,
        rank: usize,
        world: usize,
        stop: Arc<AtomicBool>,
    },
    #[cfg(feature = "nccl")]
    Nccl {
        id: candle_core::cuda_backend::cudarc::nccl::Id,
        blob: Vec<u8>,
        device: candle_core::Device,
        rank: usize,
        world: usize,
    },
}

impl Gang {
    /// Rank 0's side: NCCL on a CUDA device in a build with the `nccl` feature, loopback TCP
    /// otherwise.
    fn host(
        device: &candle_core::Device,
        world: usize,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Gang> {
        #[cfg(feature = "nccl")]
        if device.is_cuda() {
            let (id, blob) = crate::collective::NcclGroup::new_id()?;
            return Ok(Gang::Nccl {
                id,
                blob,
                device: device.clone(),
                rank: 0,
                world,
            });
        }
        let _ = device;
        let host = crate::collective::TcpHost::bind(world).context("opening the gang's socket")?;
        Ok(Gang::TcpHost(host, stop))
    }

    fn join(
        device: &candle_core::Device,
        blob: Vec<u8>,
        rank: usize,
        world: usize,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Gang> {
        if blob.starts_with(b"nccl ") {
            #[cfg(feature = "nccl")]
            {
                let id = crate::collective::NcclGroup::id_from_blob(&blob)?;
                return Ok(Gang::Nccl {
                    id,
                    blob,
                    device: device.clone(),
                    rank,
                    world,
                });
            }
            #[cfg(not(feature = "nccl"))]
            anyhow::bail!(
                "rank 0 averages gradients with NCCL but this worker was built without the `nccl` feature"
            );
        }
        let _ = device;
        Ok(Gang::TcpJoin {
            blob,
            rank,
            world,
            stop,
        })
    }

    fn blob(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            Gang::TcpHost(h, _) => Ok(h.blob()?),
            Gang::TcpJoin { blob, .. } => Ok(blob.clone()),
            #[cfg(feature = "nccl")]
            Gang::Nccl { blob, .. } => Ok(blob.clone()),
        }
    }

    fn connect(self) -> experiments::Result<Arc<dyn GradSync>> {
        Ok(match self {
            Gang::TcpHost(h, stop) => Arc::new(h.accept(stop)?),
            Gang::TcpJoin {
                blob,
                rank,
                world,
                stop,
            } => Arc::new(crate::collective::TcpGroup::join(&blob, rank, world, stop)?),
            #[cfg(feature = "nccl")]
            Gang::Nccl {
                id,
                device,
                rank,
                world,
                ..
            } => Arc::new(crate::collective::NcclGroup::init(
                &device, rank, world, id,
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Request;

    #[test]
    fn backoff_is_capped_and_jitter_in_range() {
        let mut b = Backoff::new();
        let mut base = Duration::from_millis(200);
        for i in 0..40 {
            let d = b.step();
            assert!(
                d >= base.mul_f64(0.5) && d < base.mul_f64(1.5),
                "delay {i}: {d:?} outside 0.5-1.5x {base:?}"
            );
            base = (base * 2).min(MAX_BACKOFF);
        }
        assert_eq!(b.next, MAX_BACKOFF);
        assert!(b.step() < MAX_BACKOFF.mul_f64(1.5));
        for _ in 0..100 {
            let j = jitter_fraction();
            assert!((0.0..1.0).contains(&j));
        }
    }

    /// A coordinator that hands out one lease with the given trial id, then records the
    /// worker's `Fail` (a compromised or buggy coordinator; the real one only makes hex ids).
    struct Hostile {
        lease: pb::Lease,
        failed: tokio::sync::Mutex<Vec<pb::FailRequest>>,
    }

    struct HostileSvc(Arc<Hostile>);

    type Chunks = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>,
    >;

    #[tonic::async_trait]
    impl pb::worker_service_server::WorkerService for HostileSvc {
        async fn register(
            &self,
            _: Request<pb::RegisterRequest>,
        ) -> Result<tonic::Response<pb::RegisterResponse>, Status> {
            Err(Status::unimplemented("register"))
        }
        async fn lease(
            &self,
            _: Request<pb::LeaseRequest>,
        ) -> Result<tonic::Response<pb::LeaseResponse>, Status> {
            Ok(tonic::Response::new(pb::LeaseResponse {
                lease: Some(self.0.lease.clone()),
                drain: false,
            }))
        }
        async fn heartbeat(
            &self,
            _: Request<pb::HeartbeatRequest>,
        ) -> Result<tonic::Response<pb::HeartbeatResponse>, Status> {
            Ok(tonic::Response::new(pb::HeartbeatResponse::default()))
        }
        async fn report(
            &self,
            _: Request<pb::ReportRequest>,
        ) -> Result<tonic::Response<pb::ReportResponse>, Status> {
            Ok(tonic::Response::new(pb::ReportResponse { accepted: true }))
        }
        async fn complete(
            &self,
            _: Request<pb::CompleteRequest>,
        ) -> Result<tonic::Response<pb::CompleteResponse>, Status> {
            Err(Status::unimplemented("complete"))
        }
        async fn fail(
            &self,
            req: Request<pb::FailRequest>,
        ) -> Result<tonic::Response<pb::FailResponse>, Status> {
            self.0.failed.lock().await.push(req.into_inner());
            Ok(tonic::Response::new(pb::FailResponse { accepted: true }))
        }
        async fn upload_artifact(
            &self,
            _: Request<tonic::Streaming<pb::ArtifactChunk>>,
        ) -> Result<tonic::Response<pb::UploadArtifactResponse>, Status> {
            Err(Status::failed_precondition("upload"))
        }
        type DownloadArtifactStream = Chunks;
        async fn download_artifact(
            &self,
            _: Request<pb::DownloadArtifactRequest>,
        ) -> Result<tonic::Response<Chunks>, Status> {
            Err(Status::not_found("no such artifact"))
        }
        async fn list_artifacts(
            &self,
            _: Request<pb::ListArtifactsRequest>,
        ) -> Result<tonic::Response<pb::ListArtifactsResponse>, Status> {
            Err(Status::not_found("no artifacts"))
        }
        async fn rendezvous(
            &self,
            _: Request<pb::RendezvousRequest>,
        ) -> Result<tonic::Response<pb::RendezvousResponse>, Status> {
            Err(Status::unimplemented("rendezvous"))
        }
    }

    fn any_config() -> TrialConfig {
        use experiments::trial::*;
        TrialConfig {
            name: "t".into(),
            method: Method::Freeze { top: 1 },
            base: Base::HfDir { path: "/m".into() },
            data: DataSpec {
                train: CorpusSpec {
                    paths: vec!["/nonexistent/x.txt".into()],
                    package: None,
                    documents: DocSplit::File,
                },
                valid: None,
                valid_fraction: 0.1,
                context: 32,
                max_train_tokens: None,
                max_valid_windows: None,
            },
            train: TrainSpec {
                steps: 1,
                batch_size: 2,
                grad_accum: 1,
                lr: 1e-3,
                lr_factor: None,
                weight_decay: 0.0,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                schedule: Schedule::Constant,
                warmup_steps: 0,
                clip_norm: None,
                eval_every: 0,
                eval_windows: 1,
                checkpoint_every: 0,
                ranks: 1,
            },
            groups: 2,
            seed: 0,
            tune: None,
        }
    }

    /// A lease whose trial id is `..` must not make the worker delete `<work>/ckpt` (the resume
    /// path clears `<work>/trials/<id>/ckpt` before downloading): it is refused, by name.
    #[tokio::test]
    async fn trial_ids_from_the_coordinator_are_refused_unless_plain() {
        let hostile = Arc::new(Hostile {
            lease: pb::Lease {
                trial_id: "..".into(),
                attempt: 1,
                config_json: serde_json::to_string(&any_config()).unwrap(),
                base_trial_id: String::new(),
                resume_artifacts: vec!["ckpt/state.safetensors".into()],
                deadline_unix_ms: 0,
                rank: 0,
                world: 1,
            },
            failed: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::worker_service_server::WorkerServiceServer::new(
                    HostileSvc(hostile.clone()),
                ))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        // As after any earlier trial: `<work>/trials` exists, so `trials/..` resolves.
        std::fs::create_dir_all(work.join("trials")).unwrap();
        let victim = work.join("ckpt").join("keep");
        std::fs::create_dir_all(victim.parent().unwrap()).unwrap();
        std::fs::write(&victim, b"mine").unwrap();
        let opts = RemoteOpts {
            coordinator: url,
            ca_pem: None,
            device: "cpu".into(),
            token: None,
            token_file: None,
            cache_dir: dir.path().join("cache"),
            work_dir: work.clone(),
            name: "w".into(),
            price_per_hour: 0.0,
            stop_grace: crate::signals::DEFAULT_STOP_GRACE,
            metrics: crate::metrics::WorkerMetrics::new("w", "cpu"),
        };
        let make_env: EnvFactory = Arc::new(|base_dir, out_dir, cache_dir, stop, sync| TrialEnv {
            device: candle_core::Device::Cpu,
            base_dir,
            out_dir,
            cache_dir,
            stop,
            sync,
        });
        let mut w = Worker {
            client: client(&opts).unwrap(),
            opts,
            make_env,
            gang_device: candle_core::Device::Cpu,
            stop: Arc::new(AtomicBool::new(false)),
            drain: Arc::new(AtomicBool::new(false)),
            worker_id: "w1".into(),
            ttl: Duration::from_secs(30),
        };
        let lease = w.lease().await.unwrap().unwrap();
        w.run_lease(lease).await.unwrap();
        assert_eq!(
            std::fs::read(&victim).unwrap(),
            b"mine",
            "the worker left <work>/ckpt alone"
        );
        let failed = hostile.failed.lock().await;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].reason, "bad_lease", "{failed:?}");
        assert!(
            failed[0].message.contains("\"..\""),
            "{}",
            failed[0].message
        );
        assert!(failed[0].deterministic);
        server.abort();
    }

    #[test]
    fn the_host_name_is_the_kernels() {
        let h = hostname().expect("gethostname works here");
        assert!(!h.is_empty() && !h.contains(['\0', '/']), "{h:?}");
        let uname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(h, uname.trim());
    }

    #[test]
    fn names_from_the_coordinator_are_checked() {
        assert!(check_name_from_coordinator("ckpt/state.safetensors").is_ok());
        for bad in [
            "../x",
            "/etc/passwd",
            "a//b",
            "ckpt/../../x",
            "",
            "ckpt/.hidden",
        ] {
            let err = format!("{:#}", check_name_from_coordinator(bad).unwrap_err());
            assert!(err.contains("from the coordinator"), "{bad}: {err}");
        }
    }

    #[test]
    fn lists_files_recursively_and_sorted() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("b/c")).unwrap();
        std::fs::write(d.path().join("b/c/x"), b"1").unwrap();
        std::fs::write(d.path().join("a"), b"2").unwrap();
        assert_eq!(
            list_files(d.path()).unwrap(),
            vec!["a".to_string(), "b/c/x".to_string()]
        );
        let d2 = tempfile::tempdir().unwrap();
        let dst = d2.path().join("copy");
        copy_dir(d.path(), &dst).unwrap();
        assert_eq!(std::fs::read(dst.join("b/c/x")).unwrap(), b"1");
    }
}
