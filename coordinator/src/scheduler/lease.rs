//! Leases and gangs: handing the next queued trial to a worker (or forming a gang of `ranks`
//! workers on one host), the rendezvous blob between a gang's ranks, heartbeats that renew
//! deadlines, and the clock ticks that expire them.

use super::*;

impl Scheduler {
    /// Hand the most expensive queued trial this worker can run to `worker_id`, or nothing (see
    /// the module doc for gangs). Call it again while the worker waits: a gang formed by another
    /// member's call is handed out here.
    pub fn lease(
        &mut self,
        worker_id: &str,
        now_ms: i64,
    ) -> Result<(Option<Grant>, Vec<Decision>), SchedError> {
        let Some(host) = self.workers.get(worker_id).cloned() else {
            return Err(SchedError::UnknownWorker(worker_id.to_string()));
        };
        if let Some(g) = self.pending.remove(worker_id) {
            if self.is_current(&g.trial_id, g.attempt) {
                self.idle.remove(worker_id);
                return Ok((Some(g), Vec::new()));
            }
        }
        self.idle.insert(worker_id.to_string(), now_ms);
        let mut chosen = None;
        for (_, _, id) in &self.queue {
            let k = self.trials[id].spec.ranks.max(1) as usize;
            if k == 1 {
                chosen = Some((id.clone(), vec![worker_id.to_string()]));
                break;
            }
            let on_host = self.workers.values().filter(|h| **h == host).count();
            if on_host < k {
                continue; // can never run on this host: look further down
            }
            let mut gang = vec![worker_id.to_string()];
            gang.extend(
                self.idle
                    .iter()
                    .filter(|(w, seen)| {
                        w.as_str() != worker_id
                            && **seen + self.lease_ttl_ms >= now_ms
                            && !self.pending.contains_key(w.as_str())
                            && self.workers.get(w.as_str()) == Some(&host)
                    })
                    .map(|(w, _)| w.clone())
                    .take(k - 1),
            );
            if gang.len() == k {
                chosen = Some((id.clone(), gang));
            }
            // Either way stop here: a worker that could join this gang does not take smaller
            // work that would keep it from forming.
            break;
        }
        let Some((id, gang)) = chosen else {
            return Ok((None, Vec::new()));
        };
        let deadline = now_ms + self.lease_ttl_ms;
        let attempt = self.with_trial(&id, |t| {
            t.attempts += 1;
            t.state = TrialState::Running;
            t.lease = gang.iter().map(|w| (w.clone(), deadline)).collect();
            t.rendezvous = None;
            t.restored = false;
            t.attempts
        });
        let world = gang.len() as u32;
        let mut mine = None;
        for (rank, w) in gang.iter().enumerate() {
            self.idle.remove(w);
            let g = Grant {
                trial_id: id.clone(),
                attempt,
                deadline_ms: deadline,
                rank: rank as u32,
                world,
            };
            if w == worker_id {
                mine = Some(g);
            } else {
                self.pending.insert(w.clone(), g);
            }
        }
        let t = &self.trials[&id];
        let out = vec![
            Decision::Started {
                trial_id: id.clone(),
                attempt,
                worker_id: gang.join(","),
                deadline_ms: deadline,
            },
            state_decision(t, "", ""),
        ];
        Ok((mine, out))
    }

    /// True when a gang lease formed by another member waits for `worker_id`.
    pub fn has_pending(&self, worker_id: &str) -> bool {
        self.pending.contains_key(worker_id)
    }

    /// The worker stopped waiting for work (its lease call ended empty): no longer a gang
    /// candidate until it asks again.
    pub fn not_waiting(&mut self, worker_id: &str) {
        self.idle.remove(worker_id);
    }

    /// Workers of the running attempt in rank order (one for most trials).
    pub fn members(&self, trial_id: &str) -> Vec<&str> {
        self.trials.get(trial_id).map_or(Vec::new(), |t| {
            t.lease.iter().map(|(w, _)| w.as_str()).collect()
        })
    }

    /// Rank 0 of a gang posts the blob the other ranks connect with.
    pub fn post_rendezvous(
        &mut self,
        worker_id: &str,
        trial_id: &str,
        attempt: u32,
        blob: Vec<u8>,
    ) -> Result<(), SchedError> {
        let not_in = || SchedError::NotInGang {
            trial: trial_id.to_string(),
            attempt,
        };
        if !self.is_current(trial_id, attempt) {
            return Err(not_in());
        }
        let t = self.trials.get_mut(trial_id).ok_or_else(not_in)?;
        if t.lease.first().map(|(w, _)| w.as_str()) != Some(worker_id) {
            return Err(not_in());
        }
        t.rendezvous = Some(blob);
        Ok(())
    }

    /// The blob rank 0 posted for this attempt (None until it did); only for members.
    pub fn rendezvous(
        &self,
        worker_id: &str,
        trial_id: &str,
        attempt: u32,
    ) -> Result<Option<&[u8]>, SchedError> {
        let not_in = || SchedError::NotInGang {
            trial: trial_id.to_string(),
            attempt,
        };
        if !self.is_current(trial_id, attempt) {
            return Err(not_in());
        }
        let t = &self.trials[trial_id];
        if !t.lease.iter().any(|(w, _)| w == worker_id) {
            return Err(not_in());
        }
        Ok(t.rendezvous.as_deref())
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
        if !self.workers.contains_key(worker_id) {
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
                let member = t.lease.iter_mut().find(|(w, _)| w == worker_id);
                match member {
                    Some((_, deadline)) if current => {
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
            self.end_lease(&id);
            let restored = self.with_trial(&id, |t| {
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

    /// The running attempt's lease ends for every member; gang grants not yet picked up go too.
    pub(super) fn end_lease(&mut self, id: &str) {
        let members = self.with_trial(id, |t| {
            t.rendezvous = None;
            std::mem::take(&mut t.lease)
        });
        for (w, _) in members {
            if self.pending.get(&w).is_some_and(|g| g.trial_id == id) {
                self.pending.remove(&w);
            }
        }
    }
}

/// The earliest deadline of a lease's members: the attempt is lost when any member is.
pub(super) fn deadline(t: &Trial) -> Option<i64> {
    t.lease.iter().map(|(_, d)| *d).min()
}
