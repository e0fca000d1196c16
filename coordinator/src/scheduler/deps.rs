//! Trials that start from another trial's result (a `pretrain` base): they wait until it
//! finished, fail with `dependency_failed` when it failed for good, and are cancelled with it.

use super::*;

impl Scheduler {
    pub(super) fn dependency_status(&self, t: &Trial) -> Dep {
        let Some(dep) = &t.spec.depends_on else {
            return Dep::Ready;
        };
        match self.trials.get(dep).map(|d| d.state) {
            Some(TrialState::Finished) => Dep::Ready,
            Some(TrialState::Failed | TrialState::Cancelled | TrialState::Stopped) => {
                Dep::Failed(dep.clone())
            }
            _ => Dep::Pending,
        }
    }

    pub(super) fn resolve_waiting(&mut self, id: &str, out: &mut Vec<Decision>) {
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

    pub(super) fn fail_dependency(&mut self, id: &str, dep: &str, out: &mut Vec<Decision>) {
        let dep_state = self.trials.get(dep).map(|d| d.state);
        if matches!(dep_state, Some(TrialState::Cancelled | TrialState::Stopped)) {
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

    pub(super) fn dependants(&self, id: &str) -> Vec<String> {
        let Some(children) = self.children.get(id) else {
            return Vec::new();
        };
        children
            .iter()
            .filter(|c| self.trials[c.as_str()].state == TrialState::Waiting)
            .cloned()
            .collect()
    }

    pub(super) fn release_dependants(&mut self, id: &str, out: &mut Vec<Decision>) {
        for d in self.dependants(id) {
            self.resolve_waiting(&d, out);
        }
    }

    pub(super) fn fail_dependants(&mut self, id: &str, out: &mut Vec<Decision>) {
        self.release_dependants(id, out);
    }

    pub(super) fn cancel_dependants(&mut self, id: &str, out: &mut Vec<Decision>) {
        self.release_dependants(id, out);
    }
}

pub(super) enum Dep {
    Ready,
    Pending,
    Failed(String),
}
