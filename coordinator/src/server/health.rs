//! `grpc.health.v1.Health`: SERVING while the store takes writes and the server is not
//! draining, NOT_SERVING otherwise, and a Watch that reports NOT_SERVING before it ends.

use super::*;

/// The names health answers for: the whole server (`""`) and each service.
pub(super) const HEALTH_NAMES: [&str; 3] = [
    "",
    <WorkerServiceServer<WorkerApi> as tonic::server::NamedService>::NAME,
    <SweepServiceServer<SweepApi> as tonic::server::NamedService>::NAME,
];

/// How often the store is probed for the health service, and how long a probe waits for it.
pub(super) const HEALTH_PERIOD: Duration = Duration::from_millis(500);
pub(super) const HEALTH_PROBE_WAIT: Duration = Duration::from_millis(250);

/// Accepted connections with Nagle's algorithm off. `serve_with_incoming` does not apply the
/// builder's `tcp_nodelay`, and with Nagle on a small response segment written behind an
/// unacknowledged one waits for the client's delayed ACK: about 40 ms added to every
/// lease/complete round trip on loopback.
pub(super) fn no_delay(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

pub(super) async fn set_health(
    health: &tonic_health::server::HealthReporter,
    status: ServingStatus,
) {
    for name in HEALTH_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// NOT_SERVING while the store cannot take a write (locked, disk gone, read-only), SERVING when
/// it can again; stops at shutdown, which leaves NOT_SERVING set.
pub(super) async fn health_loop(
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
pub(super) struct StoppableHealth {
    pub(super) inner: tonic_health::server::HealthService,
    pub(super) stop: watch::Receiver<bool>,
}

pub(super) type HealthWatch = Pin<
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
