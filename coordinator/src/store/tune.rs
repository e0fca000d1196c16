//! The tuner's decisions (`[tune]` sweeps): one row per trial and rung, written before the
//! decision is acted on, and one per decided arm. Decisions are final: a second record of the
//! same (trial, rung) or arm is ignored.

use rusqlite::params;

use super::{ArmRow, Result, Store};
use crate::scheduler::tune::{ArmDecision, RungDecision, Verdict};

impl Store {
    /// Record the tuner's decision about a trial at a rung, before it is acted on. A decision
    /// already stored for that (trial, rung) is kept: decisions are final.
    pub fn record_rung(&mut self, d: &RungDecision, now_ms: i64) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO tune_rungs (trial_id, rung, step, loss, verdict, detail, decided_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    d.trial_id,
                    d.rung as i64,
                    d.step as i64,
                    // SQLite keeps no NaN (it would read back as NULL): NULL is "not finite".
                    d.loss.is_finite().then_some(d.loss),
                    d.verdict.as_str(),
                    d.detail,
                    now_ms
                ],
            )
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// The tuner's rung decisions, in the order they were taken (of one trial, or all).
    pub fn rung_decisions(&self, trial_id: Option<&str>) -> Result<Vec<RungDecision>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT trial_id, rung, step, loss, verdict, detail FROM tune_rungs
                 WHERE ?1 IS NULL OR trial_id = ?1 ORDER BY rowid",
            )
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map(params![trial_id], rung_row)
            .map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.db(e))
    }

    /// Record that an arm was decided (after its confirm trials were added).
    pub fn record_arm(&mut self, d: &ArmDecision, now_ms: i64) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR IGNORE INTO tune_arms (arm_key, arm, best_trial, detail, decided_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![d.arm_key, d.arm, d.best, d.detail, now_ms],
            )
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// Decided arms, in the order they were decided.
    pub fn arm_decisions(&self) -> Result<Vec<ArmRow>> {
        let mut st = self
            .conn
            .prepare("SELECT arm_key, arm, best_trial, detail FROM tune_arms ORDER BY rowid")
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(ArmRow {
                    arm_key: r.get(0)?,
                    arm: r.get(1)?,
                    best_trial: r.get(2)?,
                    detail: r.get(3)?,
                })
            })
            .map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.db(e))
    }
}

pub(super) fn rung_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RungDecision> {
    let verdict: String = r.get(4)?;
    Ok(RungDecision {
        trial_id: r.get(0)?,
        rung: r.get::<_, i64>(1)? as usize,
        step: r.get::<_, i64>(2)? as u64,
        loss: r.get::<_, Option<f64>>(3)?.unwrap_or(f64::NAN),
        verdict: Verdict::parse(&verdict).unwrap_or(Verdict::Continue),
        detail: r.get(5)?,
    })
}
