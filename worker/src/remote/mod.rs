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
//!
//! The parts: `lease` registers and long-polls for leases; `attempt` runs one leased attempt
//! to its end; `heartbeat` keeps its lease alive; `spool` spools and replays its reports;
//! `transfer` moves artifacts in and out; `gang` sets up a gang's collective; `call` holds
//! the client, the retry rule and the backoff shared by all of them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ablate_proto::connect::AuthChannel;
use ablate_proto::pb::worker_service_client::WorkerServiceClient;
use anyhow::Context;
use experiments::runner::TrialEnv;
use experiments::train::GradSync;
use tonic::Code;
use tracing::Instrument;

mod attempt;
mod call;
mod gang;
mod heartbeat;
mod lease;
mod spool;
#[cfg(test)]
mod tests;
mod transfer;

use call::{client, flag_set};
pub use lease::hostname;
use lease::Worker;

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
