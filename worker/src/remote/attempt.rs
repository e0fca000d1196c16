//! One leased attempt from start to end: validate the lease, fetch inputs, run the trial on a
//! blocking thread beside the heartbeat and spool tasks, then complete, fail or report the stop.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ablate_proto::names::{check_artifact_name, check_trial_id};
use ablate_proto::pb;
use anyhow::Context;
use experiments::runner::{run_trial, Outcome};
use experiments::trial::{Progress, TrialConfig};
use tokio::sync::Notify;

use super::call::{retry, timed};
use super::gang::Gang;
use super::heartbeat::heartbeat_loop;
use super::lease::Worker;
use super::spool::{report_loop, SpoolReader, SpoolWriter, Spooled};
use super::transfer::copy_dir;
use super::{GANG_JOIN_TIMEOUT, LEASE_WAIT};

impl Worker {
    /// Run one leased attempt to its end (finished, failed, stopped or taken away); true when
    /// the coordinator accepted it as completed.
    pub(super) async fn run_lease(&mut self, lease: pb::Lease) -> anyhow::Result<bool> {
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
    pub(super) async fn open_gang(
        &self,
        lease: &pb::Lease,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Gang> {
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

    pub(super) async fn fail(
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
    pub(super) async fn fetch_inputs(
        &self,
        lease: &pb::Lease,
        out_dir: &Path,
    ) -> anyhow::Result<()> {
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
}

/// Trial ids from the coordinator name directories under the work and cache dirs that are later
/// removed: the rule the coordinator's store applies too, so an id can never be `..`, absolute or
/// hold a `/`.
pub(super) fn check_lease_id(field: &str, id: &str) -> anyhow::Result<()> {
    check_trial_id(id).with_context(|| format!("lease {field} from the coordinator"))
}

/// Names coming from the coordinator become local paths: the rule the coordinator's store
/// applies too.
pub(super) fn check_name_from_coordinator(name: &str) -> anyhow::Result<()> {
    check_artifact_name(name).context("from the coordinator")
}
