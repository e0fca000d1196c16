//! The scheduler: a pure, deterministic state machine deciding which trial runs where and when.
//!
//! It never touches a socket, a file or the clock. The server feeds it events (a trial submitted, a
//! lease request, a heartbeat, a report, a completion or failure, a cancel, a clock tick with the
//! current time in Unix milliseconds) and applies the [`Decision`]s it returns to the store, exactly
//! like toydb's raft node is driven by `step` and `tick`. That keeps every scheduling rule testable
//! with explicit times and no gRPC:
//!
//! - a lease has a deadline, renewed by heartbeats; a lease whose deadline passes is lost and the
//!   trial is queued again, and its next attempt gets the next attempt number;
//! - the queued trial with the largest [`TrialConfig::expected_cost`] is handed out first (ties by
//!   submission order, then id), so the longest trial does not start last and stretch the sweep;
//! - a trial whose base is another trial waits until that trial finished, and fails with reason
//!   `dependency_failed` when it failed for good;
//! - deterministic failures are final; transient ones (and lost leases) are retried until
//!   `retry_budget` of them were spent; preempted attempts spend nothing;
//! - a message carrying an attempt that no longer owns its trial is stale and changes nothing;
//! - after a coordinator restart ([`Scheduler::restore`]) a running attempt keeps its lease for one
//!   more ttl, so a worker that reconnects in time loses no steps; one that does not is lost
//!   without spending budget.
//!
//! [`TrialConfig::expected_cost`]: experiments::trial::TrialConfig::expected_cost

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Default number of transient failures (errors, lost leases) after which a trial fails for good.
pub const DEFAULT_RETRY_BUDGET: u32 = 3;

/// Where a trial is in its life. Stored as the lowercase name ([`TrialState::as_str`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TrialState {
    /// Ready to be leased.
    Queued,
    /// Waiting for the trial it starts from to finish.
    Waiting,
    /// Leased to a worker.
    Running,
    Finished,
    /// Failed for good (deterministic, budget spent, or dependency failed).
    Failed,
    Cancelled,
}

impl TrialState {
    pub fn as_str(self) -> &'static str {
        match self {
            TrialState::Queued => "queued",
            TrialState::Waiting => "waiting",
            TrialState::Running => "running",
            TrialState::Finished => "finished",
            TrialState::Failed => "failed",
            TrialState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<TrialState> {
        Some(match s {
            "queued" => TrialState::Queued,
            "waiting" => TrialState::Waiting,
            "running" => TrialState::Running,
            "finished" => TrialState::Finished,
            "failed" => TrialState::Failed,
            "cancelled" => TrialState::Cancelled,
            _ => return None,
        })
    }

    /// No further attempt will be made without a new submission.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TrialState::Finished | TrialState::Failed | TrialState::Cancelled
        )
    }
}

impl fmt::Display for TrialState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How one attempt ended. Stored as the lowercase name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    Finished,
    /// The worker reported an error.
    Failed,
    /// The worker was stopped from outside (SIGTERM, spot preemption).
    Preempted,
    /// The lease deadline passed without a heartbeat.
    Expired,
    /// The coordinator restarted while the attempt ran.
    Lost,
    Cancelled,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Finished => "finished",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Preempted => "preempted",
            AttemptOutcome::Expired => "expired",
            AttemptOutcome::Lost => "lost",
            AttemptOutcome::Cancelled => "cancelled",
        }
    }
}

/// What the scheduler needs to know about a trial: its id, what it waits for, how long it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialSpec {
    pub id: String,
    pub depends_on: Option<String>,
    pub cost: f64,
}

/// A trial as the store remembers it, to rebuild the scheduler after a coordinator restart.
#[derive(Clone, Debug, PartialEq)]
pub struct RestoredTrial {
    pub spec: TrialSpec,
    pub state: TrialState,
    /// Attempts started so far (the last attempt's number).
    pub attempts: u32,
    /// Transient failures spent from the retry budget.
    pub spent: u32,
    /// The trial failed deterministically (resubmitting does not retry it).
    pub deterministic: bool,
    /// Worker holding the lease when `state` is running.
    pub worker_id: Option<String>,
}

/// A worker's report of a failed attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub reason: String,
    pub message: String,
    pub deterministic: bool,
    pub preempted: bool,
}

/// A lease handed to a worker.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    pub trial_id: String,
    pub attempt: u32,
    pub deadline_ms: i64,
}

/// Answer to a heartbeat.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct HeartbeatAnswer {
    /// (trial, attempt, new deadline) still owned by the worker.
    pub renewed: Vec<(String, u32, i64)>,
    /// (trial, attempt) the worker must stop: cancelled, or taken away.
    pub cancel: Vec<(String, u32)>,
}

/// A change the server must persist (and announce to watchers), in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// An attempt began on a worker.
    Started {
        trial_id: String,
        attempt: u32,
        worker_id: String,
        deadline_ms: i64,
    },
    /// An attempt ended. `metrics_json` is passed through from [`Scheduler::complete`].
    Ended {
        trial_id: String,
        attempt: u32,
        outcome: AttemptOutcome,
        reason: String,
        message: String,
        metrics_json: Option<String>,
    },
    /// A trial entered a new state. For `Failed`, `reason`/`message` say why; `spent` is the retry
    /// budget used so far and `deterministic` whether a resubmission may retry it.
    State {
        trial_id: String,
        state: TrialState,
        attempts: u32,
        spent: u32,
        deterministic: bool,
        reason: String,
        message: String,
    },
}

impl Decision {
    pub fn trial_id(&self) -> &str {
        match self {
            Decision::Started { trial_id, .. }
            | Decision::Ended { trial_id, .. }
            | Decision::State { trial_id, .. } => trial_id,
        }
    }
}

/// Why an event was refused (the server turns these into gRPC statuses).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SchedError {
    #[error("unknown worker {0}")]
    UnknownWorker(String),
    #[error("unknown trial {0}")]
    UnknownTrial(String),
}

#[derive(Clone, Debug)]
struct Trial {
    spec: TrialSpec,
    state: TrialState,
    attempts: u32,
    spent: u32,
    deterministic: bool,
    /// Submission order, the tie-breaker after cost.
    order: u64,
    /// (worker, deadline) while running.
    lease: Option<(String, i64)>,
    /// The lease was carried over a coordinator restart and not yet renewed by a heartbeat.
    restored: bool,
}

/// The scheduling state machine. See the module documentation for its rules.
#[derive(Clone, Debug)]
pub struct Scheduler {
    trials: BTreeMap<String, Trial>,
    workers: BTreeSet<String>,
    lease_ttl_ms: i64,
    retry_budget: u32,
    next_order: u64,
    // Indexes over `trials`, kept in step by `with_trial`, so that a lease, a tick and a
    // completion cost O(log n) rather than a scan of every trial (a store of 100,000 trials made
    // each of them a scan: the whole sweep was quadratic).
    /// Queued trials in lease order: highest cost first, then submission order, then id.
    queue: BTreeSet<QueueKey>,
    /// Lease deadlines, earliest first.
    deadlines: BTreeSet<(i64, String)>,
    /// The trials that start from each trial.
    children: BTreeMap<String, Vec<String>>,
}

type QueueKey = (Reverse<Cost>, u64, String);

/// A cost with a total order (`f64::total_cmp`), to key the queue.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Cost(f64);

impl Eq for Cost {}

impl PartialOrd for Cost {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Cost {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn queue_key(t: &Trial) -> QueueKey {
    (Reverse(Cost(t.spec.cost)), t.order, t.spec.id.clone())
}

impl Scheduler {
    pub fn new(lease_ttl_ms: i64, retry_budget: u32) -> Self {
        Scheduler {
            trials: BTreeMap::new(),
            workers: BTreeSet::new(),
            lease_ttl_ms: lease_ttl_ms.max(1),
            retry_budget: retry_budget.max(1),
            next_order: 0,
            queue: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            children: BTreeMap::new(),
        }
    }

    /// Mutate one trial, keeping the indexes in step with its state and lease.
    fn with_trial<R>(&mut self, id: &str, f: impl FnOnce(&mut Trial) -> R) -> R {
        let t = self.trials.get_mut(id).expect("trial exists");
        self.queue.remove(&queue_key(t));
        if let Some((_, d)) = &t.lease {
            self.deadlines.remove(&(*d, id.to_string()));
        }
        let r = f(t);
        self.index(id);
        r
    }

    fn index(&mut self, id: &str) {
        let t = &self.trials[id];
        if t.state == TrialState::Queued {
            self.queue.insert(queue_key(t));
        }
        if let Some((_, d)) = &t.lease {
            self.deadlines.insert((*d, id.to_string()));
        }
    }

    fn add_child(&mut self, id: &str) {
        if let Some(dep) = self.trials[id].spec.depends_on.clone() {
            self.children.entry(dep).or_default().push(id.to_string());
        }
    }

    pub fn lease_ttl_ms(&self) -> i64 {
        self.lease_ttl_ms
    }

    /// Rebuild after a coordinator restart, at time `now_ms`.
    ///
    /// An attempt that was running on a known worker keeps its lease for one more ttl: a worker
    /// that reconnects and heartbeats within it carries on as if nothing happened (no steps lost).
    /// If no heartbeat comes, the attempt ends as lost at the deadline and its trial is queued
    /// again without spending retry budget (the restart was not the trial's fault). An attempt
    /// whose worker is unknown is lost at once.
    pub fn restore(
        lease_ttl_ms: i64,
        retry_budget: u32,
        trials: Vec<RestoredTrial>,
        workers: Vec<String>,
        now_ms: i64,
    ) -> (Self, Vec<Decision>) {
        let mut s = Scheduler::new(lease_ttl_ms, retry_budget);
        s.workers.extend(workers);
        let mut out = Vec::new();
        for t in trials {
            let order = s.next_order;
            s.next_order += 1;
            let mut trial = Trial {
                spec: t.spec,
                state: t.state,
                attempts: t.attempts,
                spent: t.spent,
                deterministic: t.deterministic,
                order,
                lease: None,
                restored: false,
            };
            if trial.state == TrialState::Running {
                match t.worker_id.filter(|w| s.workers.contains(w)) {
                    Some(w) => {
                        trial.lease = Some((w, now_ms + s.lease_ttl_ms));
                        trial.restored = true;
                    }
                    None => {
                        out.push(lost_in_restart(&trial));
                        trial.state = TrialState::Queued;
                        out.push(state_decision(&trial, "", ""));
                    }
                }
            }
            s.trials.insert(trial.spec.id.clone(), trial);
        }
        let ids: Vec<String> = s.trials.keys().cloned().collect();
        for id in &ids {
            s.index(id);
            s.add_child(id);
        }
        // Dependencies may have finished or failed while a dependant was recorded as waiting.
        for id in ids {
            s.resolve_waiting(&id, &mut out);
        }
        (s, out)
    }

    pub fn state(&self, trial_id: &str) -> Option<TrialState> {
        self.trials.get(trial_id).map(|t| t.state)
    }

    /// Attempts started so far for a trial (the current or last attempt's number).
    pub fn attempts(&self, trial_id: &str) -> Option<u32> {
        self.trials.get(trial_id).map(|t| t.attempts)
    }

    /// Worker and deadline of the running attempt.
    pub fn lease_of(&self, trial_id: &str) -> Option<(&str, i64)> {
        self.trials
            .get(trial_id)?
            .lease
            .as_ref()
            .map(|(w, d)| (w.as_str(), *d))
    }

    /// Number of trials leasable right now.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn register_worker(&mut self, worker_id: &str) {
        self.workers.insert(worker_id.to_string());
    }

    /// Add a trial. A trial already known changes nothing, except that a cancelled one or one that
    /// failed for a transient reason is queued again with a fresh retry budget.
    pub fn submit(&mut self, spec: TrialSpec) -> Vec<Decision> {
        let mut out = Vec::new();
        let id = spec.id.clone();
        if let Some(t) = self.trials.get(&id) {
            let retry = t.state == TrialState::Cancelled
                || (t.state == TrialState::Failed && !t.deterministic);
            if !retry {
                return out;
            }
            self.with_trial(&id, |t| {
                t.spent = 0;
                t.deterministic = false;
                t.state = TrialState::Waiting;
            });
        } else {
            let order = self.next_order;
            self.next_order += 1;
            self.trials.insert(
                id.clone(),
                Trial {
                    spec,
                    state: TrialState::Waiting,
                    attempts: 0,
                    spent: 0,
                    deterministic: false,
                    order,
                    lease: None,
                    restored: false,
                },
            );
            self.add_child(&id);
        }
        // Decide between queued, waiting and dependency_failed; always announce the new state.
        let t = &self.trials[&id];
        match self.dependency_status(t) {
            Dep::Ready => self.set_state(&id, TrialState::Queued, "", "", &mut out),
            Dep::Pending => {
                let t = &self.trials[&id];
                out.push(state_decision(t, "", ""))
            }
            Dep::Failed(dep) => self.fail_dependency(&id, &dep, &mut out),
        }
        // A trial this one unblocks may already be waiting (submitted out of order).
        self.release_dependants(&id, &mut out);
        out
    }

    /// Hand the most expensive queued trial to `worker_id`, or nothing.
    pub fn lease(
        &mut self,
        worker_id: &str,
        now_ms: i64,
    ) -> Result<(Option<Grant>, Vec<Decision>), SchedError> {
        if !self.workers.contains(worker_id) {
            return Err(SchedError::UnknownWorker(worker_id.to_string()));
        }
        let Some(id) = self.queue.first().map(|k| k.2.clone()) else {
            return Ok((None, Vec::new()));
        };
        let deadline = now_ms + self.lease_ttl_ms;
        let attempt = self.with_trial(&id, |t| {
            t.attempts += 1;
            t.state = TrialState::Running;
            t.lease = Some((worker_id.to_string(), deadline));
            t.restored = false;
            t.attempts
        });
        let t = &self.trials[&id];
        let out = vec![
            Decision::Started {
                trial_id: id.clone(),
                attempt,
                worker_id: worker_id.to_string(),
                deadline_ms: deadline,
            },
            state_decision(t, "", ""),
        ];
        Ok((
            Some(Grant {
                trial_id: id,
                attempt,
                deadline_ms: deadline,
            }),
            out,
        ))
    }

    /// True when (trial, attempt) is the running attempt: the only one whose messages count.
    pub fn is_current(&self, trial_id: &str, attempt: u32) -> bool {
        self.trials
            .get(trial_id)
            .is_some_and(|t| t.state == TrialState::Running && t.attempts == attempt)
    }

    /// Renew the leases a worker still owns; tell it to stop the others.
    pub fn heartbeat(
        &mut self,
        worker_id: &str,
        held: &[(String, u32)],
        now_ms: i64,
    ) -> Result<HeartbeatAnswer, SchedError> {
        if !self.workers.contains(worker_id) {
            return Err(SchedError::UnknownWorker(worker_id.to_string()));
        }
        let ttl = self.lease_ttl_ms;
        let mut ans = HeartbeatAnswer::default();
        for (trial_id, attempt) in held {
            if !self.trials.contains_key(trial_id) {
                ans.cancel.push((trial_id.clone(), *attempt));
                continue;
            }
            let owned = self.with_trial(trial_id, |t| {
                let current = t.state == TrialState::Running && t.attempts == *attempt;
                match &mut t.lease {
                    Some((w, deadline)) if current && w == worker_id => {
                        *deadline = now_ms + ttl;
                        t.restored = false;
                        Some(*deadline)
                    }
                    _ => None,
                }
            });
            match owned {
                Some(deadline) => ans.renewed.push((trial_id.clone(), *attempt, deadline)),
                None => ans.cancel.push((trial_id.clone(), *attempt)),
            }
        }
        Ok(ans)
    }

    /// A progress report: accepted only from the current attempt (the store dedups by seq).
    pub fn report(&self, trial_id: &str, attempt: u32) -> bool {
        self.is_current(trial_id, attempt)
    }

    /// The current attempt finished. Stale completions return no decisions.
    pub fn complete(
        &mut self,
        trial_id: &str,
        attempt: u32,
        metrics_json: String,
    ) -> Vec<Decision> {
        let mut out = Vec::new();
        if !self.is_current(trial_id, attempt) {
            return out;
        }
        self.with_trial(trial_id, |t| t.lease = None);
        out.push(Decision::Ended {
            trial_id: trial_id.to_string(),
            attempt,
            outcome: AttemptOutcome::Finished,
            reason: String::new(),
            message: String::new(),
            metrics_json: Some(metrics_json),
        });
        self.set_state(trial_id, TrialState::Finished, "", "", &mut out);
        self.release_dependants(trial_id, &mut out);
        out
    }

    /// The current attempt failed. Stale failures return no decisions.
    pub fn fail(&mut self, trial_id: &str, attempt: u32, failure: Failure) -> Vec<Decision> {
        let mut out = Vec::new();
        if !self.is_current(trial_id, attempt) {
            return out;
        }
        let outcome = if failure.preempted {
            AttemptOutcome::Preempted
        } else {
            AttemptOutcome::Failed
        };
        self.with_trial(trial_id, |t| t.lease = None);
        out.push(Decision::Ended {
            trial_id: trial_id.to_string(),
            attempt,
            outcome,
            reason: failure.reason.clone(),
            message: failure.message.clone(),
            metrics_json: None,
        });
        self.after_lost_attempt(trial_id, &failure, &mut out);
        out
    }

    /// Cancel a trial that has not ended. Returns no decisions when it already ended.
    pub fn cancel(&mut self, trial_id: &str) -> Result<Vec<Decision>, SchedError> {
        let t = self
            .trials
            .get(trial_id)
            .ok_or_else(|| SchedError::UnknownTrial(trial_id.to_string()))?;
        let mut out = Vec::new();
        if t.state.is_terminal() {
            return Ok(out);
        }
        if let Some(attempt) = self.with_trial(trial_id, |t| t.lease.take().map(|_| t.attempts)) {
            out.push(Decision::Ended {
                trial_id: trial_id.to_string(),
                attempt,
                outcome: AttemptOutcome::Cancelled,
                reason: "cancelled".into(),
                message: "cancelled by the user".into(),
                metrics_json: None,
            });
        }
        self.set_state(
            trial_id,
            TrialState::Cancelled,
            "cancelled",
            "cancelled by the user",
            &mut out,
        );
        self.cancel_dependants(trial_id, &mut out);
        Ok(out)
    }

    /// Advance the clock: leases past their deadline are lost and their trials queued again.
    pub fn tick(&mut self, now_ms: i64) -> Vec<Decision> {
        let expired: Vec<(String, u32)> = self
            .deadlines
            .iter()
            .take_while(|(d, _)| *d <= now_ms)
            .map(|(_, id)| &self.trials[id])
            .filter(|t| t.state == TrialState::Running)
            .map(|t| (t.spec.id.clone(), t.attempts))
            .collect();
        let mut out = Vec::new();
        for (id, attempt) in expired {
            let restored = self.with_trial(&id, |t| {
                t.lease = None;
                let restored = std::mem::take(&mut t.restored);
                if restored {
                    t.state = TrialState::Queued;
                }
                restored
            });
            if restored {
                // Nobody came back for a lease carried over a restart: lost, no budget spent.
                let t = &self.trials[&id];
                out.push(lost_in_restart(t));
                out.push(state_decision(t, "", ""));
                continue;
            }
            let failure = Failure {
                reason: "lease_expired".into(),
                message: "no heartbeat before the lease deadline".into(),
                deterministic: false,
                preempted: false,
            };
            out.push(Decision::Ended {
                trial_id: id.clone(),
                attempt,
                outcome: AttemptOutcome::Expired,
                reason: failure.reason.clone(),
                message: failure.message.clone(),
                metrics_json: None,
            });
            self.after_lost_attempt(&id, &failure, &mut out);
        }
        out
    }

    /// Earliest lease deadline, so a driver can sleep until then.
    pub fn next_deadline(&self) -> Option<i64> {
        self.deadlines.first().map(|(d, _)| *d)
    }

    fn after_lost_attempt(&mut self, id: &str, failure: &Failure, out: &mut Vec<Decision>) {
        let budget = self.retry_budget;
        let t = self.trials.get_mut(id).expect("trial exists");
        if failure.deterministic && !failure.preempted {
            t.deterministic = true;
            self.set_state(
                id,
                TrialState::Failed,
                &failure.reason,
                &failure.message,
                out,
            );
            self.fail_dependants(id, out);
            return;
        }
        if !failure.preempted {
            t.spent += 1;
        }
        let spent = t.spent;
        if spent >= budget {
            let msg = format!(
                "{} (gave up after {spent} transient failures)",
                failure.message
            );
            self.set_state(id, TrialState::Failed, &failure.reason, &msg, out);
            self.fail_dependants(id, out);
        } else {
            self.set_state(
                id,
                TrialState::Queued,
                &failure.reason,
                &failure.message,
                out,
            );
        }
    }

    fn set_state(
        &mut self,
        id: &str,
        state: TrialState,
        reason: &str,
        message: &str,
        out: &mut Vec<Decision>,
    ) {
        self.with_trial(id, |t| t.state = state);
        out.push(state_decision(&self.trials[id], reason, message));
    }

    fn dependency_status(&self, t: &Trial) -> Dep {
        let Some(dep) = &t.spec.depends_on else {
            return Dep::Ready;
        };
        match self.trials.get(dep).map(|d| d.state) {
            Some(TrialState::Finished) => Dep::Ready,
            Some(TrialState::Failed) | Some(TrialState::Cancelled) => Dep::Failed(dep.clone()),
            _ => Dep::Pending,
        }
    }

    fn resolve_waiting(&mut self, id: &str, out: &mut Vec<Decision>) {
        let Some(t) = self.trials.get(id) else { return };
        if t.state != TrialState::Waiting {
            return;
        }
        match self.dependency_status(t) {
            Dep::Ready => self.set_state(id, TrialState::Queued, "", "", out),
            Dep::Pending => {}
            Dep::Failed(dep) => self.fail_dependency(id, &dep, out),
        }
    }

    fn fail_dependency(&mut self, id: &str, dep: &str, out: &mut Vec<Decision>) {
        let dep_state = self.trials.get(dep).map(|d| d.state);
        if dep_state == Some(TrialState::Cancelled) {
            let msg = format!("base trial {dep} was cancelled");
            self.set_state(id, TrialState::Cancelled, "dependency_cancelled", &msg, out);
            self.cancel_dependants(id, out);
        } else {
            // Deterministic for this submission: it cannot run until the base is resubmitted,
            // and resubmitting the base resubmits this trial too (same sweep).
            self.trials.get_mut(id).expect("trial exists").deterministic = false;
            let msg = format!("base trial {dep} failed");
            self.set_state(id, TrialState::Failed, "dependency_failed", &msg, out);
            self.fail_dependants(id, out);
        }
    }

    fn dependants(&self, id: &str) -> Vec<String> {
        let Some(children) = self.children.get(id) else {
            return Vec::new();
        };
        children
            .iter()
            .filter(|c| self.trials[c.as_str()].state == TrialState::Waiting)
            .cloned()
            .collect()
    }

    fn release_dependants(&mut self, id: &str, out: &mut Vec<Decision>) {
        for d in self.dependants(id) {
            self.resolve_waiting(&d, out);
        }
    }

    fn fail_dependants(&mut self, id: &str, out: &mut Vec<Decision>) {
        self.release_dependants(id, out);
    }

    fn cancel_dependants(&mut self, id: &str, out: &mut Vec<Decision>) {
        self.release_dependants(id, out);
    }
}

enum Dep {
    Ready,
    Pending,
    Failed(String),
}

fn lost_in_restart(t: &Trial) -> Decision {
    Decision::Ended {
        trial_id: t.spec.id.clone(),
        attempt: t.attempts,
        outcome: AttemptOutcome::Lost,
        reason: "coordinator_restart".into(),
        message: "the coordinator restarted and the worker did not come back within the lease ttl"
            .into(),
        metrics_json: None,
    }
}

fn state_decision(t: &Trial, reason: &str, message: &str) -> Decision {
    Decision::State {
        trial_id: t.spec.id.clone(),
        state: t.state,
        attempts: t.attempts,
        spent: t.spent,
        deterministic: t.deterministic,
        reason: reason.to_string(),
        message: message.to_string(),
    }
}
