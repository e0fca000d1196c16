//! The heartbeat task of an attempt: keeps the lease alive and turns a cancel order (or a lost
//! lease) into the trial's stop flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ablate_proto::pb;
use tonic::Code;

use super::call::timed;
use super::Client;

#[allow(clippy::too_many_arguments)]
pub(super) async fn heartbeat_loop(
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
