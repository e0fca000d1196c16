//! How attempts and trials end: completion, failure (retried or final), cancel, the tuner's stop,
//! and lost attempts, each returning the [`Decision`]s the server persists.

use super::*;

impl Scheduler {
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
        self.end_lease(trial_id);
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
        self.end_lease(trial_id);
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
        self.end_early(
            trial_id,
            AttemptOutcome::Cancelled,
            TrialState::Cancelled,
            "cancelled by the user",
        )
    }

    /// The tuner stopped the trial at a rung: its running attempt ends (the worker is told at its
    /// next report or heartbeat) and the trial ends `stopped`, with `message` saying where and why.
    /// Trials that start from it are cancelled. A trial already ended is left as it is.
    pub fn stop(&mut self, trial_id: &str, message: &str) -> Result<Vec<Decision>, SchedError> {
        self.end_early(
            trial_id,
            AttemptOutcome::Stopped,
            TrialState::Stopped,
            message,
        )
    }

    /// End a trial that has not ended from outside (the user, the tuner): its running attempt
    /// ends with `outcome`, the trial takes `state` (whose name is also the reason), and the
    /// trials that start from it are cancelled. No decisions when it already ended.
    fn end_early(
        &mut self,
        trial_id: &str,
        outcome: AttemptOutcome,
        state: TrialState,
        message: &str,
    ) -> Result<Vec<Decision>, SchedError> {
        let t = self
            .trials
            .get(trial_id)
            .ok_or_else(|| SchedError::UnknownTrial(trial_id.to_string()))?;
        let mut out = Vec::new();
        if t.state.is_terminal() {
            return Ok(out);
        }
        let (held, attempt) = (!t.lease.is_empty(), t.attempts);
        let reason = state.as_str();
        if held {
            self.end_lease(trial_id);
            out.push(Decision::Ended {
                trial_id: trial_id.to_string(),
                attempt,
                outcome,
                reason: reason.into(),
                message: message.to_string(),
                metrics_json: None,
            });
        }
        self.set_state(trial_id, state, reason, message, &mut out);
        self.cancel_dependants(trial_id, &mut out);
        Ok(out)
    }

    pub(super) fn after_lost_attempt(
        &mut self,
        id: &str,
        failure: &Failure,
        out: &mut Vec<Decision>,
    ) {
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

    pub(super) fn set_state(
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
}
