//! The scheduler: a pure, deterministic state machine deciding which trial runs where and when.
//!
//! It never touches a socket, a file or the clock. The server feeds it events (a trial submitted, a
//! lease request, a heartbeat, a report, a completion or failure, a cancel, a clock tick with the
//! current time in milliseconds of a monotonic clock: the server never feeds it wall time, so a
//! clock step cannot expire leases) and applies the [`Decision`]s it returns to the store, exactly
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
//!   without spending budget;
//! - a trial with `ranks = k > 1` is a gang: it runs on k workers of one host at once or not at
//!   all. A worker asking for work while such a trial heads the queue joins the trial's gang if
//!   k idle workers of its host (workers waiting in a lease call, seen within the ttl) are there;
//!   otherwise it waits, holding its place, rather than take smaller work that would keep the
//!   gang from ever forming, unless its host has fewer than k workers, in which case the trial
//!   cannot run there and the worker looks further down the queue. The members get the same
//!   attempt and ranks 0..k in the order they asked; each renews its own deadline, and the end of
//!   any member (failure, preemption, a missed heartbeat) ends the attempt for all of them: the
//!   others are told to stop at their next heartbeat. Rank 0 completes the trial. Before training,
//!   rank 0 posts a rendezvous blob (the NCCL unique id, or the address of the CPU collective) and
//!   the other ranks read it ([`Scheduler::post_rendezvous`], [`Scheduler::rendezvous`]). A gang
//!   running across a coordinator restart is lost at once (the blob lived in memory), without
//!   spending budget.
//!
//! The rules live in one file each: `lease.rs` (leases, gangs, rendezvous, heartbeats, ticks),
//! `ends.rs` (completion, failure, cancel, the tuner's stop), `deps.rs` (trials that start from
//! another trial), `wait.rs` (why a trial waits), `tune.rs` (the tuning rungs); the types,
//! submission and restore are here.
//!
//! [`TrialConfig::expected_cost`]: experiments::trial::TrialConfig::expected_cost

/// ASHA and median stopping for `[tune]` sweeps: the tuning rungs, as pure as the rest.
pub mod tune;

mod deps;
mod ends;
mod lease;
mod wait;

use deps::Dep;
use lease::deadline;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// Default number of transient failures (errors, lost leases) after which a trial fails for good.
pub const DEFAULT_RETRY_BUDGET: u32 = 3;

/// Where a trial is in its life. Stored as the lowercase name ([`TrialState::as_str`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TrialState {
    /// Ready to be leased.
    #[default]
    Queued,
    /// Waiting for the trial it starts from to finish.
    Waiting,
    /// Leased to a worker.
    Running,
    Finished,
    /// Failed for good (deterministic, budget spent, or dependency failed).
    Failed,
    Cancelled,
    /// Stopped early by the tuner at a rung (`[tune]`): not a failure, never retried.
    Stopped,
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
            TrialState::Stopped => "stopped",
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
            "stopped" => TrialState::Stopped,
            _ => return None,
        })
    }

    /// No further attempt will be made without a new submission.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TrialState::Finished | TrialState::Failed | TrialState::Cancelled | TrialState::Stopped
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
    /// The tuner stopped the trial at a rung.
    Stopped,
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
            AttemptOutcome::Stopped => "stopped",
        }
    }
}

/// What the scheduler needs to know about a trial: its id, what it waits for, how long it runs.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialSpec {
    pub id: String,
    pub depends_on: Option<String>,
    pub cost: f64,
    /// Workers of one host the trial runs on together (`train.ranks`); 1 for most trials.
    pub ranks: u32,
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
    /// Worker holding the lease when `state` is running (for a gang, the members joined by `,`).
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
    /// This worker's rank in the trial's gang, and the gang's size (0 and 1 for one worker).
    pub rank: u32,
    pub world: u32,
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
    /// An attempt began on a worker (a gang's members joined by `,` in rank order).
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
    #[error("trial {trial} attempt {attempt} is not a gang this worker belongs to")]
    NotInGang { trial: String, attempt: u32 },
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
    /// (worker, deadline) of each rank while running; empty otherwise.
    lease: Vec<(String, i64)>,
    /// Rank 0's rendezvous blob for the current attempt of a gang.
    rendezvous: Option<Vec<u8>>,
    /// The lease was carried over a coordinator restart and not yet renewed by a heartbeat.
    restored: bool,
}

/// The scheduling state machine. See the module documentation for its rules.
#[derive(Clone, Debug)]
pub struct Scheduler {
    trials: BTreeMap<String, Trial>,
    /// Registered workers and their hosts.
    workers: BTreeMap<String, String>,
    /// Workers waiting for work (in a lease call), with the time they last asked: the candidates
    /// for a gang. A worker leaves it when it gets a lease.
    idle: BTreeMap<String, i64>,
    /// Gang leases formed by another member's call, not yet picked up by their worker.
    pending: BTreeMap<String, Grant>,
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
            workers: BTreeMap::new(),
            idle: BTreeMap::new(),
            pending: BTreeMap::new(),
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
        if let Some(d) = deadline(t) {
            self.deadlines.remove(&(d, id.to_string()));
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
        if let Some(d) = deadline(t) {
            self.deadlines.insert((d, id.to_string()));
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
        workers: Vec<(String, String)>,
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
                lease: Vec::new(),
                rendezvous: None,
                restored: false,
            };
            if trial.state == TrialState::Running {
                let single = trial.spec.ranks <= 1;
                match t.worker_id.filter(|w| single && s.workers.contains_key(w)) {
                    Some(w) => {
                        trial.lease = vec![(w, now_ms + s.lease_ttl_ms)];
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

    /// Worker and deadline of the running attempt (rank 0's for a gang).
    pub fn lease_of(&self, trial_id: &str) -> Option<(&str, i64)> {
        self.trials
            .get(trial_id)?
            .lease
            .first()
            .map(|(w, d)| (w.as_str(), *d))
    }

    /// Number of trials leasable right now.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// A worker on `host` (the machine name it reported: gangs form among workers of one host).
    pub fn register_worker(&mut self, worker_id: &str, host: &str) {
        self.workers.insert(worker_id.to_string(), host.to_string());
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
                    lease: Vec::new(),
                    rendezvous: None,
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
