//! The tables, and the columns added to them after the first release (a state directory written
//! by an older coordinator gains them, with their defaults, when it is opened).

use super::{Result, Store};

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sweeps (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    text TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sweep_trials (
    sweep_id TEXT NOT NULL REFERENCES sweeps(id),
    trial_id TEXT NOT NULL REFERENCES trials(id),
    position INTEGER NOT NULL,
    PRIMARY KEY (sweep_id, trial_id)
);
CREATE TABLE IF NOT EXISTS trials (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    name TEXT NOT NULL,
    method TEXT NOT NULL,
    config_json TEXT NOT NULL,
    depends_on TEXT,
    cost REAL NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    spent INTEGER NOT NULL DEFAULT 0,
    deterministic INTEGER NOT NULL DEFAULT 0,
    metrics_json TEXT,
    failure_reason TEXT NOT NULL DEFAULT '',
    failure_message TEXT NOT NULL DEFAULT '',
    worker_id TEXT,
    started_ms INTEGER,
    finished_ms INTEGER
);
CREATE TABLE IF NOT EXISTS attempts (
    trial_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker_id TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    outcome TEXT,
    reason TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (trial_id, attempt)
);
CREATE TABLE IF NOT EXISTS events (
    trial_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    unix_ms INTEGER NOT NULL,
    json TEXT NOT NULL,
    UNIQUE (trial_id, attempt, seq)
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    host TEXT NOT NULL,
    device_kind TEXT NOT NULL,
    device_name TEXT NOT NULL,
    memory_bytes INTEGER NOT NULL,
    registered_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tune_rungs (
    trial_id TEXT NOT NULL,
    rung INTEGER NOT NULL,
    step INTEGER NOT NULL,
    loss REAL,
    verdict TEXT NOT NULL,
    detail TEXT NOT NULL,
    decided_ms INTEGER NOT NULL,
    PRIMARY KEY (trial_id, rung)
);
CREATE TABLE IF NOT EXISTS tune_arms (
    arm_key TEXT PRIMARY KEY,
    arm TEXT NOT NULL,
    best_trial TEXT,
    detail TEXT NOT NULL,
    decided_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS artifacts (
    trial_id TEXT NOT NULL,
    name TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    stored_ms INTEGER NOT NULL,
    PRIMARY KEY (trial_id, name)
);
";

pub(super) const TRIAL_COLS: &str = "id, name, method, config_json, state, attempts, spent, deterministic, \
    metrics_json, failure_reason, failure_message, worker_id, started_ms, finished_ms, depends_on, cost";
impl Store {
    /// Add `column` to `table` unless it is there: SQLite's ALTER TABLE ADD COLUMN keeps the rows.
    pub(super) fn add_column_if_missing(
        &self,
        table: &str,
        column: &str,
        decl: &str,
    ) -> Result<()> {
        let mut st = self
            .conn
            .prepare(&format!("PRAGMA table_info({table})"))
            .map_err(|e| self.db(e))?;
        let names = st
            .query_map([], |r| r.get::<_, String>(1))
            .map_err(|e| self.db(e))?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.db(e))?;
        if !names.iter().any(|n| n == column) {
            self.conn
                .execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))
                .map_err(|e| self.db(e))?;
        }
        Ok(())
    }
}
