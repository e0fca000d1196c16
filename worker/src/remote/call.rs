//! Calls to the coordinator: the lazily connecting client, which failures are worth
//! retrying, capped jittered backoff, and the time limit of one short call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ablate_proto::auth::BearerToken;
use anyhow::Context;
use tonic::{Code, Status};

use super::{Client, RemoteOpts, CALL_TIMEOUT, MAX_BACKOFF};

pub(super) fn client(opts: &RemoteOpts) -> anyhow::Result<Client> {
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
pub(super) fn transient(s: &Status) -> bool {
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
pub(super) async fn flag_set(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Capped exponential backoff with jitter; state kept by the caller.
pub(super) struct Backoff {
    pub(super) next: Duration,
}

impl Backoff {
    pub(super) fn new() -> Self {
        Backoff {
            next: Duration::from_millis(200),
        }
    }

    pub(super) async fn wait(&mut self) {
        tokio::time::sleep(self.step()).await;
    }

    /// The next delay (the current one, jittered to 0.5-1.5x), doubling the one after up to
    /// [`MAX_BACKOFF`].
    pub(super) fn step(&mut self) -> Duration {
        let d = self.next.mul_f64(0.5 + jitter_fraction());
        self.next = (self.next * 2).min(MAX_BACKOFF);
        d
    }
}

/// A number in [0, 1) from the clock's nanoseconds: enough to spread reconnecting workers apart.
pub(super) fn jitter_fraction() -> f64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let x = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11;
    x as f64 / (1u64 << 53) as f64
}

/// Retry `f` while it fails transiently; give up when `stop` says so (returns the last error).
pub(super) async fn retry<T, F, Fut>(
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

/// A short call with [`CALL_TIMEOUT`]: running out counts as a transient failure.
pub(super) async fn timed<T>(
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("no answer from the coordinator")))
}
