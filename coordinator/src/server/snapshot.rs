//! `TrialStatus` and `GetResponse` built from the store (one query per table for a sweep).

use super::*;

/// The status a user sees for one trial, from its row and the details read for it.
pub(super) fn trial_status(d: &TrialDetails, row: &TrialRow) -> pb::TrialStatus {
    let worker = row
        .worker_id
        .as_deref()
        // A gang's attempt lists its members; rank 0 stands for it.
        .and_then(|w| d.workers.get(w.split(',').next().unwrap_or(w)));
    let progress =
        d.latest_step
            .get(&row.id)
            .and_then(|json| match serde_json::from_str::<Progress>(json) {
                Ok(Progress::Step {
                    step,
                    total,
                    loss,
                    tokens_per_sec,
                    ..
                }) => Some(pb::LatestProgress {
                    step,
                    total,
                    loss,
                    tokens_per_sec,
                }),
                _ => None,
            });
    pb::TrialStatus {
        id: row.id.clone(),
        name: row.name.clone(),
        method: row.method.clone(),
        state: row.state.as_str().to_string(),
        attempts: row.attempts,
        metrics_json: row.metrics_json.clone().unwrap_or_default(),
        failure_reason: row.failure_reason.clone(),
        failure_message: row.failure_message.clone(),
        worker_name: worker
            .map(|w| {
                let ranks = row
                    .worker_id
                    .as_deref()
                    .map_or(1, |ids| ids.split(',').count());
                if ranks > 1 {
                    format!("{} +{} ranks", w.info.name, ranks - 1)
                } else {
                    w.info.name.clone()
                }
            })
            .unwrap_or_default(),
        device_name: worker
            .map(|w| w.info.device_name.clone())
            .unwrap_or_default(),
        started_unix_ms: row.started_ms.unwrap_or(0),
        finished_unix_ms: row.finished_ms.unwrap_or(0),
        progress,
        config_json: row.config_json.clone(),
        attempt_costs: attempt_costs(d, &row.id),
        wait_reason: String::new(),
        tune_json: tune_json(d, &row.id),
    }
}

/// The status of one trial, read from the store.
pub(super) fn one_trial_status(store: &Store, row: &TrialRow) -> Result<pb::TrialStatus, Status> {
    let d = store
        .trial_details(Scope::Trial(&row.id), row.worker_id.as_deref())
        .map_err(store_status)?;
    Ok(trial_status(&d, row))
}

/// The tuner's rung decisions about a trial as JSON (empty when it has none).
pub(super) fn tune_json(d: &TrialDetails, trial_id: &str) -> String {
    let Some(rungs) = d.rungs.get(trial_id).filter(|r| !r.is_empty()) else {
        return String::new();
    };
    let list: Vec<serde_json::Value> = rungs
        .iter()
        .map(|d| {
            serde_json::json!({
                "rung": d.rung,
                "step": d.step,
                "loss": d.loss.is_finite().then_some(d.loss),
                "verdict": d.verdict.as_str(),
                "detail": d.detail,
            })
        })
        .collect();
    serde_json::json!({ "rungs": list }).to_string()
}

/// Each attempt's span, devices and price, for the report's cost table.
pub(super) fn attempt_costs(d: &TrialDetails, trial_id: &str) -> Vec<pb::AttemptCost> {
    let Some(attempts) = d.attempts.get(trial_id) else {
        return Vec::new();
    };
    attempts
        .iter()
        .map(|a| {
            let members: Vec<_> = a.worker_id.split(',').map(|w| d.workers.get(w)).collect();
            pb::AttemptCost {
                attempt: a.attempt,
                outcome: a.outcome.clone().unwrap_or_default(),
                started_unix_ms: a.started_ms,
                ended_unix_ms: a.ended_ms.unwrap_or(0),
                devices: members.len() as u32,
                device_kind: members
                    .first()
                    .and_then(|w| w.as_ref())
                    .map(|w| w.info.device_kind.clone())
                    .unwrap_or_default(),
                price_per_hour: members
                    .iter()
                    .flatten()
                    .map(|w| w.info.price_per_hour)
                    .sum(),
            }
        })
        .collect()
}

pub(super) fn sweep_snapshot(
    inner: &Inner,
    clock: &Clock,
    key: &str,
) -> Result<pb::GetResponse, Status> {
    let store = &inner.store;
    let sweep = store
        .find_sweep(key)
        .map_err(store_status)?
        .ok_or_else(|| Status::not_found(format!("no sweep with id or name {key:?}")))?;
    let trials = store.sweep_trials(&sweep.id).map_err(store_status)?;
    // One query per table for the whole sweep, not several per trial.
    let details = store
        .trial_details(
            Scope::Sweep(&sweep.id),
            trials.iter().filter_map(|t| t.worker_id.as_deref()),
        )
        .map_err(store_status)?;
    let mut why = inner
        .sched
        .wait_reasons(trials.iter().map(|t| t.id.as_str()), clock.sched_ms());
    Ok(pb::GetResponse {
        sweep_id: sweep.id,
        name: sweep.name,
        sweep_text: sweep.text,
        created_unix_ms: sweep.created_ms,
        trials: trials
            .iter()
            .map(|t| pb::TrialStatus {
                wait_reason: why.remove(&t.id).unwrap_or_default(),
                ..trial_status(&details, t)
            })
            .collect(),
    })
}

// ------------------------------------------------------------------------------ WorkerService
