//! Trials, their attempts and progress events: the scheduler's decisions persisted in one
//! transaction, what a restart rebuilds the scheduler from, and what status tables read.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension};

use super::schema::TRIAL_COLS;
use super::tune::rung_row;
use super::workers::worker_row;
use super::{AttemptRow, EventRow, Result, Store, StoreError, TrialRow, WorkerRow};
use crate::scheduler::{Decision, RestoredTrial, TrialSpec, TrialState};

impl Store {
    pub fn trial(&self, id: &str) -> Result<Option<TrialRow>> {
        let sql = format!("SELECT {TRIAL_COLS} FROM trials WHERE id = ?1");
        Ok(self.query_trials(&sql, [id])?.pop())
    }

    /// All trials in submission order.
    pub fn trials(&self) -> Result<Vec<TrialRow>> {
        let sql = format!("SELECT {TRIAL_COLS} FROM trials ORDER BY seq");
        self.query_trials(&sql, [])
    }

    pub(super) fn query_trials<P: rusqlite::Params>(
        &self,
        sql: &str,
        p: P,
    ) -> Result<Vec<TrialRow>> {
        let mut st = self.conn.prepare(sql).map_err(|e| self.db(e))?;
        let rows = st
            .query_map(p, |r| {
                let state: String = r.get(4)?;
                Ok(TrialRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    method: r.get(2)?,
                    config_json: r.get(3)?,
                    state: TrialState::parse(&state).unwrap_or(TrialState::Failed),
                    attempts: r.get(5)?,
                    spent: r.get(6)?,
                    deterministic: r.get::<_, i64>(7)? != 0,
                    metrics_json: r.get(8)?,
                    failure_reason: r.get(9)?,
                    failure_message: r.get(10)?,
                    worker_id: r.get(11)?,
                    started_ms: r.get(12)?,
                    finished_ms: r.get(13)?,
                    depends_on: r.get(14)?,
                    cost: r.get(15)?,
                })
            })
            .map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.db(e))
    }

    /// What the scheduler needs to rebuild itself after a restart.
    pub fn restored_trials(&self) -> Result<Vec<RestoredTrial>> {
        Ok(self
            .trials()?
            .into_iter()
            .map(|t| RestoredTrial {
                spec: TrialSpec {
                    ranks: serde_json::from_str::<experiments::trial::TrialConfig>(&t.config_json)
                        .map_or(1, |c| c.train.ranks),
                    id: t.id,
                    depends_on: t.depends_on,
                    cost: t.cost,
                },
                state: t.state,
                attempts: t.attempts,
                spent: t.spent,
                deterministic: t.deterministic,
                worker_id: t.worker_id,
            })
            .collect())
    }

    /// Persist the scheduler's decisions, all in one transaction.
    pub fn apply(&mut self, decisions: &[Decision], now_ms: i64) -> Result<()> {
        if decisions.is_empty() {
            return Ok(());
        }
        let db_path = self.db_path.clone();
        let db = |e| StoreError::Db {
            path: db_path.clone(),
            source: e,
        };
        let tx = self.conn.transaction().map_err(db)?;
        for d in decisions {
            match d {
                Decision::Started {
                    trial_id,
                    attempt,
                    worker_id,
                    ..
                } => {
                    tx.execute(
                        "INSERT OR REPLACE INTO attempts (trial_id, attempt, worker_id, started_ms)
                         VALUES (?1, ?2, ?3, ?4)",
                        params![trial_id, attempt, worker_id, now_ms],
                    )
                    .map_err(db)?;
                    tx.execute(
                        "UPDATE trials SET worker_id = ?2, started_ms = ?3, finished_ms = NULL,
                         failure_reason = '', failure_message = '' WHERE id = ?1",
                        params![trial_id, worker_id, now_ms],
                    )
                    .map_err(db)?;
                }
                Decision::Ended {
                    trial_id,
                    attempt,
                    outcome,
                    reason,
                    message,
                    metrics_json,
                } => {
                    tx.execute(
                        "UPDATE attempts SET ended_ms = ?3, outcome = ?4, reason = ?5, message = ?6
                         WHERE trial_id = ?1 AND attempt = ?2",
                        params![trial_id, attempt, now_ms, outcome.as_str(), reason, message],
                    )
                    .map_err(db)?;
                    if let Some(m) = metrics_json {
                        tx.execute(
                            "UPDATE trials SET metrics_json = ?2 WHERE id = ?1",
                            params![trial_id, m],
                        )
                        .map_err(db)?;
                    }
                }
                Decision::State {
                    trial_id,
                    state,
                    attempts,
                    spent,
                    deterministic,
                    reason,
                    message,
                } => {
                    let finished = if state.is_terminal() {
                        Some(now_ms)
                    } else {
                        None
                    };
                    tx.execute(
                        "UPDATE trials SET state = ?2, attempts = ?3, spent = ?4, deterministic = ?5,
                         failure_reason = ?6, failure_message = ?7,
                         finished_ms = COALESCE(?8, finished_ms) WHERE id = ?1",
                        params![
                            trial_id,
                            state.as_str(),
                            attempts,
                            spent,
                            *deterministic as i64,
                            reason,
                            message,
                            finished
                        ],
                    )
                    .map_err(db)?;
                }
            }
        }
        tx.commit().map_err(db)
    }

    pub fn attempts(&self, trial_id: &str) -> Result<Vec<AttemptRow>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT trial_id, attempt, worker_id, started_ms, ended_ms, outcome, reason, message
                 FROM attempts WHERE trial_id = ?1 ORDER BY attempt",
            )
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([trial_id], attempt_row)
            .map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.db(e))
    }

    /// Record one progress event. Returns false when (trial, attempt, seq) was already recorded.
    pub fn record_event(
        &mut self,
        trial_id: &str,
        attempt: u32,
        seq: u64,
        json: &str,
        now_ms: i64,
    ) -> Result<bool> {
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO events (trial_id, attempt, seq, unix_ms, json)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![trial_id, attempt, seq as i64, now_ms, json],
            )
            .map_err(|e| self.db(e))?;
        Ok(n == 1)
    }

    /// All events of a trial, by attempt then sequence number.
    pub fn events(&self, trial_id: &str) -> Result<Vec<EventRow>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT attempt, seq, unix_ms, json FROM events WHERE trial_id = ?1
                 ORDER BY attempt, seq",
            )
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([trial_id], |r| {
                Ok(EventRow {
                    attempt: r.get(0)?,
                    seq: r.get::<_, i64>(1)? as u64,
                    unix_ms: r.get(2)?,
                    json: r.get(3)?,
                })
            })
            .map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.db(e))
    }

    /// The latest `step` progress event of a trial (JSON), for status tables.
    pub fn latest_step_event(&self, trial_id: &str) -> Result<Option<String>> {
        self.conn
            .query_row(
                "SELECT json FROM events WHERE trial_id = ?1 AND json LIKE '{\"kind\":\"step\"%'
                 ORDER BY attempt DESC, seq DESC LIMIT 1",
                [trial_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.db(e))
    }
}

/// Which trials [`Store::trial_details`] reads for.
#[derive(Clone, Copy, Debug)]
pub enum Scope<'a> {
    /// Every trial of a sweep.
    Sweep(&'a str),
    /// One trial.
    Trial(&'a str),
}

/// What a status table needs about trials beyond their rows, read with one query per table
/// (attempts, latest step events, rung decisions, workers) rather than several per trial.
#[derive(Clone, Debug, Default)]
pub struct TrialDetails {
    /// Attempts of each trial, in attempt order.
    pub attempts: HashMap<String, Vec<AttemptRow>>,
    /// The latest `step` progress event of each trial that has one (JSON).
    pub latest_step: HashMap<String, String>,
    /// The tuner's rung decisions about each trial, in the order they were taken.
    pub rungs: HashMap<String, Vec<crate::scheduler::tune::RungDecision>>,
    /// The workers named by the trials' rows and attempts.
    pub workers: HashMap<String, WorkerRow>,
}

impl Store {
    /// The attempts, latest step events, rung decisions and workers of the trials in `scope`.
    /// `worker_ids` are worker ids (a gang's are joined with commas) to read besides those the
    /// attempts name, such as the trial rows' current workers.
    pub fn trial_details<'a>(
        &self,
        scope: Scope<'_>,
        worker_ids: impl IntoIterator<Item = &'a str>,
    ) -> Result<TrialDetails> {
        let db = |e| self.db(e);
        let (sweep, trial) = match scope {
            Scope::Sweep(s) => (Some(s), None),
            Scope::Trial(t) => (None, Some(t)),
        };
        const IDS: &str = "WITH ids(trial_id) AS (
                SELECT trial_id FROM sweep_trials WHERE sweep_id = ?1
                UNION SELECT ?2 WHERE ?2 IS NOT NULL)";
        let mut d = TrialDetails::default();
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "{IDS} SELECT a.trial_id, a.attempt, a.worker_id, a.started_ms, a.ended_ms,
                 a.outcome, a.reason, a.message
                 FROM attempts a JOIN ids ON ids.trial_id = a.trial_id
                 ORDER BY a.trial_id, a.attempt"
            ))
            .map_err(db)?;
        let rows = st
            .query_map(params![sweep, trial], attempt_row)
            .map_err(db)?;
        for a in rows {
            let a = a.map_err(db)?;
            d.attempts.entry(a.trial_id.clone()).or_default().push(a);
        }
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "{IDS} SELECT ids.trial_id, (SELECT e.json FROM events e
                     WHERE e.trial_id = ids.trial_id AND e.json LIKE '{{\"kind\":\"step\"%'
                     ORDER BY e.attempt DESC, e.seq DESC LIMIT 1)
                 FROM ids"
            ))
            .map_err(db)?;
        let rows = st
            .query_map(params![sweep, trial], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
            })
            .map_err(db)?;
        for row in rows {
            if let (id, Some(json)) = row.map_err(db)? {
                d.latest_step.insert(id, json);
            }
        }
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "{IDS} SELECT r.trial_id, r.rung, r.step, r.loss, r.verdict, r.detail
                 FROM tune_rungs r JOIN ids ON ids.trial_id = r.trial_id ORDER BY r.rowid"
            ))
            .map_err(db)?;
        let rows = st.query_map(params![sweep, trial], rung_row).map_err(db)?;
        for r in rows {
            let r = r.map_err(db)?;
            d.rungs.entry(r.trial_id.clone()).or_default().push(r);
        }
        let mut wanted: Vec<&str> = worker_ids.into_iter().flat_map(|w| w.split(',')).collect();
        wanted.extend(
            d.attempts
                .values()
                .flatten()
                .flat_map(|a| a.worker_id.split(',')),
        );
        wanted.retain(|w| !w.is_empty());
        wanted.sort_unstable();
        wanted.dedup();
        if !wanted.is_empty() {
            let list = serde_json::to_string(&wanted).expect("strings serialise");
            let mut st = self
                .conn
                .prepare_cached(
                    "SELECT id, name, host, device_kind, device_name, memory_bytes, registered_ms,
                     price_per_hour FROM workers WHERE id IN (SELECT value FROM json_each(?1))",
                )
                .map_err(db)?;
            let rows = st
                .query_map([list], worker_row)
                .map_err(db)?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(db)?;
            d.workers = rows.into_iter().map(|w| (w.id.clone(), w)).collect();
        }
        Ok(d)
    }
}

fn attempt_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AttemptRow> {
    Ok(AttemptRow {
        trial_id: r.get(0)?,
        attempt: r.get(1)?,
        worker_id: r.get(2)?,
        started_ms: r.get(3)?,
        ended_ms: r.get(4)?,
        outcome: r.get(5)?,
        reason: r.get(6)?,
        message: r.get(7)?,
    })
}
