//! Why a queued or waiting trial does not run yet, in words for `ablate status`.

use super::*;

impl Scheduler {
    /// Why each of `ids` that is not running waits, in words for `ablate status` (absent for
    /// running and finished trials). One pass over the queue and the leases for all of them.
    pub fn wait_reasons<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a str>,
        now_ms: i64,
    ) -> BTreeMap<String, String> {
        let position: BTreeMap<&str, usize> = self
            .queue
            .iter()
            .enumerate()
            .map(|(i, (_, _, id))| (id.as_str(), i + 1))
            .collect();
        let leased: BTreeSet<&str> = self
            .deadlines
            .iter()
            .filter(|(d, _)| *d >= now_ms)
            .flat_map(|(_, id)| self.trials[id].lease.iter().map(|(w, _)| w.as_str()))
            .collect();
        // Connected: waiting in a lease call within the ttl, or holding a live lease.
        let live: BTreeSet<&str> = self
            .idle
            .iter()
            .filter(|(_, seen)| **seen + self.lease_ttl_ms >= now_ms)
            .map(|(w, _)| w.as_str())
            .chain(leased.iter().copied())
            .collect();
        let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
        for h in self.workers.values() {
            *per_host.entry(h.as_str()).or_default() += 1;
        }
        let largest = per_host.values().copied().max().unwrap_or(0);
        let mut out = BTreeMap::new();
        for id in ids {
            let Some(t) = self.trials.get(id) else {
                continue;
            };
            let reason = match t.state {
                TrialState::Waiting => format!(
                    "waits for its base trial {} to finish",
                    t.spec.depends_on.as_deref().unwrap_or("?")
                ),
                TrialState::Queued => {
                    let k = t.spec.ranks.max(1) as usize;
                    let pos = position.get(id).copied().unwrap_or(0);
                    let retry = if t.spent > 0 {
                        format!(
                            "; retry after {} transient failure{} ({} of {} spent)",
                            t.spent,
                            if t.spent == 1 { "" } else { "s" },
                            t.spent,
                            self.retry_budget
                        )
                    } else {
                        String::new()
                    };
                    let why = if self.workers.is_empty() {
                        "no worker has registered".to_string()
                    } else if k > largest {
                        format!(
                            "needs {k} workers on one host (ranks = {k}); the largest host has \
                             {largest}: start more workers there (ablate-worker --all-gpus)"
                        )
                    } else if live.is_empty() {
                        format!(
                            "no worker is connected ({} registered, none heard from within the \
                             lease ttl)",
                            self.workers.len()
                        )
                    } else if k > 1 {
                        format!("gang of {k}: waits until {k} workers of one host are free")
                    } else if live.iter().all(|w| leased.contains(w)) {
                        format!(
                            "all {} connected worker{} busy; #{pos} in the queue",
                            live.len(),
                            if live.len() == 1 { " is" } else { "s are" }
                        )
                    } else {
                        format!("#{pos} in the queue")
                    };
                    why + &retry
                }
                _ => continue,
            };
            out.insert(id.to_string(), reason);
        }
        out
    }
}
