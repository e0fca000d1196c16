//! The coordinator's state behind one lock (store, scheduler, tuner) and the one place that
//! persists decisions and then announces them; the tuner's hooks; the tick loop.

use super::*;

pub(super) struct Inner {
    pub(super) store: Store,
    pub(super) sched: Scheduler,
    /// Registrations drained with `ablate drain` (worker id -> checkpoint now): they get no new
    /// lease and are told to exit. In memory only: after a coordinator restart the worker
    /// carries on (drain it again); a worker that registers again (restarted, upgraded) has a
    /// new id and is not drained.
    pub(super) drained: std::collections::HashMap<String, bool>,
    /// The tuner of `[tune]` sweeps, rebuilt from the store's decisions on start.
    pub(super) tuner: crate::scheduler::tune::Tuner,
}

/// Messages for `Watch` streams.
#[derive(Clone, Debug)]
pub(super) enum Bus {
    Trial(Box<pb::TrialStatus>),
    Progress(pb::TrialProgress),
    /// Trials were added to this sweep (a tuned arm's confirm runs): its watchers need a new
    /// snapshot, since the trials they follow were fixed by the last one.
    Sweep(String),
}

pub(super) struct Shared {
    pub(super) inner: Mutex<Inner>,
    /// Woken whenever a trial may have become leasable.
    pub(super) notify: Notify,
    pub(super) bus: broadcast::Sender<Bus>,
    pub(super) ttl_ms: i64,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) metrics: Arc<crate::metrics::Metrics>,
    pub(super) clock: Clock,
}

/// Let the metrics endpoint read trials by state and registered workers from the store at scrape
/// time. A worker counts as connected while it calls at least once per lease long-poll plus TTL.
pub(super) fn install_gauges(metrics: &crate::metrics::Metrics, shared: &Arc<Shared>) {
    let weak = Arc::downgrade(shared);
    let within = MAX_LEASE_WAIT + Duration::from_millis(shared.ttl_ms.max(0) as u64);
    metrics.set_source(within, move || {
        let mut g = crate::metrics::Gauges::default();
        let Some(shared) = weak.upgrade() else {
            return g;
        };
        // Called on a blocking thread (the metrics endpoint's scrape), never on the runtime's.
        let counts = shared.lock().store.counts().unwrap_or_default();
        g.trials_by_state = counts.trials_by_state;
        g.workers_registered = counts.workers;
        g.sweeps = counts.sweeps;
        g
    });
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves SQLite consistent (transactions), so go on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` with the lock held on one of tokio's blocking threads, so that SQLite calls (and
    /// waiting for the lock behind them) never stall the runtime's workers. The lock spans the
    /// whole of `f`: the scheduler decides, the store persists, and only then does the caller
    /// answer, in the order the calls took the lock.
    pub(super) async fn locked<T, F>(self: &Arc<Self>, f: F) -> Result<T, Status>
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
    pub(super) fn apply(
        &self,
        inner: &mut Inner,
        decisions: &[Decision],
        now: i64,
    ) -> Result<(), Status> {
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
    pub(super) fn tune_ended(
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
                crate::scheduler::tune::Ended::Finished { valid_loss: loss }
            }
            TrialState::Cancelled => crate::scheduler::tune::Ended::Cancelled,
            _ => crate::scheduler::tune::Ended::Out,
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
                let added = inner
                    .store
                    .add_to_sweep(&sweep, &trials)
                    .map_err(store_status)?;
                if !added.is_empty() {
                    let _ = self.bus.send(Bus::Sweep(sweep));
                }
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
    pub(super) fn tune_rung(
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
        if d.verdict == crate::scheduler::tune::Verdict::Continue {
            return Ok(true);
        }
        self.stop_trial(inner, &d, now)?;
        Ok(false)
    }

    pub(super) fn stop_trial(
        &self,
        inner: &mut Inner,
        d: &crate::scheduler::tune::RungDecision,
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
    pub(super) fn restore_tuner(&self, inner: &mut Inner) -> Result<(), Status> {
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
            .filter(|d| d.verdict == crate::scheduler::tune::Verdict::Stop)
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

    pub(super) fn stopping(&self) -> bool {
        *self.stop.borrow()
    }
}

pub(super) async fn tick_loop(shared: Arc<Shared>) {
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
