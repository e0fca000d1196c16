//! `SweepService`: submit, list, get, watch, cancel, events, artifacts, drain.

use super::*;

pub(super) struct SweepApi(pub(super) Arc<Shared>);

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
        let sweep_id = snapshot.sweep_id.clone();
        let (tx, out) = mpsc::channel(256);
        let shared = self.0.clone();
        let mut stop = self.0.stop.clone();
        tokio::spawn(async move {
            let send = |e| pb::WatchEvent { event: Some(e) };
            // The trials this watcher follows: those of the last snapshot it was sent.
            let mut ids: HashSet<String> = snapshot.trials.iter().map(|t| t.id.clone()).collect();
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
                    Ok(Bus::Trial(t)) if ids.contains(&t.id) => {
                        Some(pb::watch_event::Event::Trial(*t))
                    }
                    Ok(Bus::Progress(p)) if ids.contains(&p.trial_id) => {
                        Some(pb::watch_event::Event::Progress(p))
                    }
                    // Trials were added to the sweep, or this watcher was too slow to follow
                    // every event: send the whole picture again.
                    Ok(Bus::Sweep(id)) if id == sweep_id => None,
                    Err(broadcast::error::RecvError::Lagged(_)) => None,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let event = match event {
                    Some(e) => e,
                    None => match resnapshot(&shared, &sweep_id, &mut ids).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    },
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

/// A new snapshot of `sweep_id` for a watcher, whose followed trials become the snapshot's.
async fn resnapshot(
    shared: &Arc<Shared>,
    sweep_id: &str,
    ids: &mut HashSet<String>,
) -> Result<pb::watch_event::Event, Status> {
    let id = sweep_id.to_string();
    let snap = shared
        .locked(move |shared, inner| sweep_snapshot(inner, &shared.clock, &id))
        .await?;
    *ids = snap.trials.iter().map(|t| t.id.clone()).collect();
    Ok(pb::watch_event::Event::Snapshot(snap))
}
