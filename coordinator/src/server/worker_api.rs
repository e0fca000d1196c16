//! `WorkerService`: register, lease (long-poll), heartbeat, report, complete, fail, artifacts,
//! rendezvous.

use super::*;

pub(super) struct WorkerApi(pub(super) Arc<Shared>);

pub(super) type ChunkStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>>;
pub(super) type WatchStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

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
pub(super) async fn download_artifact(
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
pub(super) async fn list_artifacts(
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
pub(super) struct Waiting<'a> {
    pub(super) shared: &'a Shared,
    pub(super) worker_id: &'a str,
    pub(super) leased: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.leased {
            self.shared.lock().sched.not_waiting(self.worker_id);
        }
    }
}

/// One try at a lease for a worker, under the lock: granted, persisted, then answered.
pub(super) fn try_lease(
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
