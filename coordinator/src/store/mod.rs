//! The coordinator's durable memory: one SQLite database (WAL mode) at `<state_dir>/ablate.sqlite`
//! plus artifact files under `<state_dir>/artifacts/<trial_id>/<name>`.
//!
//! Nothing a user submitted or a worker reported lives only in memory: every method here commits
//! before it returns, and the server answers an RPC only after the store call returned. A restarted
//! coordinator rebuilds its scheduler from [`Store::restored_trials`]. Trials are keyed by the hash of
//! their config, so a trial submitted by several sweeps (or twice) is stored and run once; the
//! `sweep_trials` table records which sweeps include it. Progress events are unique by
//! (trial, attempt, seq), which makes a replayed report a no-op.
//!
//! The store is synchronous (rusqlite); the server serialises access behind one mutex, which is
//! plenty for a few dozen workers reporting a few times per second.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use crate::scheduler::{Decision, RestoredTrial, TrialSpec, TrialState};
use experiments::trial::TrialConfig;

/// Errors of the store. Input problems name the field or artifact at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("not found: {0}")]
    NotFound(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A trial as submitted: its id (recomputed from the config by the caller) and the config.
#[derive(Clone, Debug)]
pub struct NewTrial {
    pub id: String,
    pub config: TrialConfig,
}

/// Result of storing a sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct Submitted {
    pub sweep_id: String,
    pub added: Vec<String>,
    pub already_present: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SweepRow {
    pub id: String,
    pub name: String,
    pub text: String,
    pub created_ms: i64,
}

/// Everything the store keeps about a trial.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialRow {
    pub id: String,
    pub name: String,
    pub method: String,
    pub config_json: String,
    pub state: TrialState,
    pub attempts: u32,
    pub spent: u32,
    pub deterministic: bool,
    pub metrics_json: Option<String>,
    pub failure_reason: String,
    pub failure_message: String,
    pub worker_id: Option<String>,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    pub depends_on: Option<String>,
    pub cost: f64,
}

/// A tuned arm the tuner decided (`tune_arms`).
#[derive(Clone, Debug, PartialEq)]
pub struct ArmRow {
    pub arm_key: String,
    pub arm: String,
    /// The winning grid trial; None when none finished or a grid trial was cancelled.
    pub best_trial: Option<String>,
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AttemptRow {
    pub trial_id: String,
    pub attempt: u32,
    pub worker_id: String,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub outcome: Option<String>,
    pub reason: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    pub attempt: u32,
    pub seq: u64,
    pub unix_ms: i64,
    pub json: String,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct WorkerInfo {
    pub name: String,
    pub host: String,
    pub device_kind: String,
    pub device_name: String,
    pub memory_bytes: u64,
    /// What an hour of this worker costs (0: not set), for the report's cost table.
    pub price_per_hour: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkerRow {
    pub id: String,
    pub info: WorkerInfo,
    pub registered_ms: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ArtifactRow {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// The SQLite store plus the artifact directory.
pub struct Store {
    conn: Connection,
    dir: PathBuf,
    db_path: PathBuf,
}

/// What [`Store::counts`] returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreCounts {
    pub trials_by_state: std::collections::BTreeMap<String, u64>,
    pub workers: u64,
    pub sweeps: u64,
}

const SCHEMA: &str = "
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

const TRIAL_COLS: &str = "id, name, method, config_json, state, attempts, spent, deterministic, \
    metrics_json, failure_reason, failure_message, worker_id, started_ms, finished_ms, depends_on, cost";

impl Store {
    /// Open (or create) the store in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store> {
        fs::create_dir_all(state_dir).map_err(|e| StoreError::Io {
            path: state_dir.to_path_buf(),
            source: e,
        })?;
        let db_path = state_dir.join("ablate.sqlite");
        let conn = Connection::open(&db_path).map_err(|e| StoreError::Db {
            path: db_path.clone(),
            source: e,
        })?;
        let s = Store {
            conn,
            dir: state_dir.to_path_buf(),
            db_path,
        };
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| s.db(e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Invalid(format!(
                "{}: could not switch to WAL mode (got {mode})",
                s.db_path.display()
            )));
        }
        s.conn
            .execute_batch("PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=5000;")
            .map_err(|e| s.db(e))?;
        s.conn.execute_batch(SCHEMA).map_err(|e| s.db(e))?;
        // Columns added after the first release: a state dir written by an older coordinator
        // gets them with their default on open (SQLite's ALTER TABLE ADD COLUMN keeps the rows).
        s.add_column_if_missing("workers", "price_per_hour", "REAL NOT NULL DEFAULT 0")?;
        Ok(s)
    }

    fn add_column_if_missing(&self, table: &str, column: &str, decl: &str) -> Result<()> {
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

    /// Whether the store in `state_dir` can take a write now, for the health service: its own
    /// connection (no server lock held), the write lock taken for a moment and released
    /// without writing. Fails when the database is gone, read-only, or locked past `wait`.
    pub fn probe(state_dir: &Path, wait: std::time::Duration) -> Result<()> {
        use rusqlite::OpenFlags;
        let db_path = state_dir.join("ablate.sqlite");
        let db = |e| StoreError::Db {
            path: db_path.clone(),
            source: e,
        };
        let conn = Connection::open_with_flags(
            &db_path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db)?;
        conn.busy_timeout(wait).map_err(db)?;
        conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")
            .map_err(db)?;
        Ok(())
    }

    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    fn db(&self, e: rusqlite::Error) -> StoreError {
        StoreError::Db {
            path: self.db_path.clone(),
            source: e,
        }
    }

    /// Store a sweep and the trials it names. A sweep with the same name and text is the same
    /// sweep (its id is reused); trials already stored are linked, not added again.
    pub fn submit(
        &mut self,
        name: &str,
        text: &str,
        trials: &[NewTrial],
        now_ms: i64,
    ) -> Result<Submitted> {
        if name.trim().is_empty() {
            return Err(StoreError::Invalid("sweep_name: must not be empty".into()));
        }
        let db_path = self.db_path.clone();
        let db = |e| StoreError::Db {
            path: db_path.clone(),
            source: e,
        };
        let tx = self.conn.transaction().map_err(db)?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT id FROM sweeps WHERE name = ?1 AND text = ?2 ORDER BY created_ms DESC LIMIT 1",
                params![name, text],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let sweep_id = match existing {
            Some(id) => id,
            None => {
                let n: i64 = tx
                    .query_row("SELECT COUNT(*) FROM sweeps", [], |r| r.get(0))
                    .map_err(db)?;
                let id = format!("{}-{}", slug(name), n + 1);
                tx.execute(
                    "INSERT INTO sweeps (id, name, text, created_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![id, name, text, now_ms],
                )
                .map_err(db)?;
                id
            }
        };
        let mut added = Vec::new();
        let mut already = Vec::new();
        let mut next_seq: i64 = tx
            .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM trials", [], |r| {
                r.get(0)
            })
            .map_err(db)?;
        for (pos, t) in trials.iter().enumerate() {
            let exists: bool = tx
                .query_row("SELECT 1 FROM trials WHERE id = ?1", [&t.id], |_| Ok(()))
                .optional()
                .map_err(db)?
                .is_some();
            if exists {
                already.push(t.id.clone());
            } else {
                let json = serde_json::to_string(&t.config)
                    .map_err(|e| StoreError::Invalid(format!("trial {}: {e}", t.id)))?;
                tx.execute(
                    "INSERT INTO trials (id, seq, name, method, config_json, depends_on, cost, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'waiting')",
                    params![
                        t.id,
                        next_seq,
                        t.config.name,
                        t.config.method.family(),
                        json,
                        t.config.depends_on(),
                        t.config.expected_cost()
                    ],
                )
                .map_err(db)?;
                next_seq += 1;
                added.push(t.id.clone());
            }
            tx.execute(
                "INSERT OR IGNORE INTO sweep_trials (sweep_id, trial_id, position) VALUES (?1, ?2, ?3)",
                params![sweep_id, t.id, pos as i64],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(Submitted {
            sweep_id,
            added,
            already_present: already,
        })
    }

    /// How many trials are in each state (by [`TrialState::as_str`]), and how many workers and sweeps
    /// the store holds: three counting queries, whatever the size of the store (the metrics
    /// endpoint asks at every scrape).
    pub fn counts(&self) -> Result<StoreCounts> {
        let db = |e| self.db(e);
        let mut st = self
            .conn
            .prepare("SELECT state, COUNT(*) FROM trials GROUP BY state")
            .map_err(db)?;
        let trials_by_state = st
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })
            .map_err(db)?
            .collect::<rusqlite::Result<_>>()
            .map_err(db)?;
        let count = |table: &str| -> Result<u64> {
            self.conn
                .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n as u64)
                .map_err(db)
        };
        Ok(StoreCounts {
            trials_by_state,
            workers: count("workers")?,
            sweeps: count("sweeps")?,
        })
    }

    pub fn sweeps(&self) -> Result<Vec<SweepRow>> {
        let mut st = self
            .conn
            .prepare("SELECT id, name, text, created_ms FROM sweeps ORDER BY created_ms, rowid")
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(SweepRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    text: r.get(2)?,
                    created_ms: r.get(3)?,
                })
            })
            .map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.db(e))
    }

    /// A sweep by id, or the latest sweep of that name.
    pub fn find_sweep(&self, key: &str) -> Result<Option<SweepRow>> {
        self.conn
            .query_row(
                "SELECT id, name, text, created_ms FROM sweeps WHERE id = ?1 OR name = ?1
                 ORDER BY (id = ?1) DESC, created_ms DESC, rowid DESC LIMIT 1",
                [key],
                |r| {
                    Ok(SweepRow {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        text: r.get(2)?,
                        created_ms: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.db(e))
    }

    /// The trials of a sweep, in the order the sweep file listed them.
    pub fn sweep_trials(&self, sweep_id: &str) -> Result<Vec<TrialRow>> {
        let cols = TRIAL_COLS
            .split(", ")
            .map(|c| format!("t.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {cols} FROM sweep_trials s JOIN trials t ON t.id = s.trial_id
             WHERE s.sweep_id = ?1 ORDER BY s.position"
        );
        self.query_trials(&sql, [sweep_id])
    }

    /// Ids of the sweeps a trial belongs to.
    pub fn sweeps_of(&self, trial_id: &str) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare("SELECT sweep_id FROM sweep_trials WHERE trial_id = ?1")
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([trial_id], |r| r.get(0))
            .map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<Vec<String>>>()
            .map_err(|e| self.db(e))
    }

    pub fn trial(&self, id: &str) -> Result<Option<TrialRow>> {
        let sql = format!("SELECT {TRIAL_COLS} FROM trials WHERE id = ?1");
        Ok(self.query_trials(&sql, [id])?.pop())
    }

    /// All trials in submission order.
    pub fn trials(&self) -> Result<Vec<TrialRow>> {
        let sql = format!("SELECT {TRIAL_COLS} FROM trials ORDER BY seq");
        self.query_trials(&sql, [])
    }

    fn query_trials<P: rusqlite::Params>(&self, sql: &str, p: P) -> Result<Vec<TrialRow>> {
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
            .query_map([trial_id], |r| {
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
            })
            .map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.db(e))
    }

    /// Record the tuner's decision about a trial at a rung, before it is acted on. A decision
    /// already stored for that (trial, rung) is kept: decisions are final.
    pub fn record_rung(
        &mut self,
        d: &crate::scheduler::tune::RungDecision,
        now_ms: i64,
    ) -> Result<()> {
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
    pub fn rung_decisions(
        &self,
        trial_id: Option<&str>,
    ) -> Result<Vec<crate::scheduler::tune::RungDecision>> {
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
    pub fn record_arm(
        &mut self,
        d: &crate::scheduler::tune::ArmDecision,
        now_ms: i64,
    ) -> Result<()> {
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

    /// Add trials to an existing sweep (the confirm runs of a tuned arm), after its other
    /// trials. Trials already stored are linked, not added again. Returns the ids added.
    pub fn add_to_sweep(&mut self, sweep_id: &str, trials: &[NewTrial]) -> Result<Vec<String>> {
        let db_path = self.db_path.clone();
        let db = |e| StoreError::Db {
            path: db_path.clone(),
            source: e,
        };
        let tx = self.conn.transaction().map_err(db)?;
        let mut next_seq: i64 = tx
            .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM trials", [], |r| {
                r.get(0)
            })
            .map_err(db)?;
        let mut pos: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(position), -1) + 1 FROM sweep_trials WHERE sweep_id = ?1",
                [sweep_id],
                |r| r.get(0),
            )
            .map_err(db)?;
        let mut added = Vec::new();
        for t in trials {
            let exists = tx
                .query_row("SELECT 1 FROM trials WHERE id = ?1", [&t.id], |_| Ok(()))
                .optional()
                .map_err(db)?
                .is_some();
            if !exists {
                let json = serde_json::to_string(&t.config)
                    .map_err(|e| StoreError::Invalid(format!("trial {}: {e}", t.id)))?;
                tx.execute(
                    "INSERT INTO trials (id, seq, name, method, config_json, depends_on, cost, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'waiting')",
                    params![
                        t.id,
                        next_seq,
                        t.config.name,
                        t.config.method.family(),
                        json,
                        t.config.depends_on(),
                        t.config.expected_cost()
                    ],
                )
                .map_err(db)?;
                next_seq += 1;
                added.push(t.id.clone());
            }
            let n = tx
                .execute(
                    "INSERT OR IGNORE INTO sweep_trials (sweep_id, trial_id, position) VALUES (?1, ?2, ?3)",
                    params![sweep_id, t.id, pos],
                )
                .map_err(db)?;
            pos += n as i64;
        }
        tx.commit().map_err(db)?;
        Ok(added)
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

    /// Register a worker; ids are `w<n>` in registration order.
    pub fn register_worker(&mut self, info: &WorkerInfo, now_ms: i64) -> Result<String> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM workers", [], |r| r.get(0))
            .map_err(|e| self.db(e))?;
        let id = format!("w{}", n + 1);
        self.conn
            .execute(
                "INSERT INTO workers (id, name, host, device_kind, device_name, memory_bytes,
                 registered_ms, price_per_hour)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    id,
                    info.name,
                    info.host,
                    info.device_kind,
                    info.device_name,
                    info.memory_bytes as i64,
                    now_ms,
                    info.price_per_hour
                ],
            )
            .map_err(|e| self.db(e))?;
        Ok(id)
    }

    pub fn worker(&self, id: &str) -> Result<Option<WorkerRow>> {
        self.conn
            .query_row(
                "SELECT id, name, host, device_kind, device_name, memory_bytes, registered_ms,
                 price_per_hour FROM workers WHERE id = ?1",
                [id],
                worker_row,
            )
            .optional()
            .map_err(|e| self.db(e))
    }

    pub fn workers(&self) -> Result<Vec<WorkerRow>> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, name, host, device_kind, device_name, memory_bytes, registered_ms,
                 price_per_hour FROM workers ORDER BY registered_ms, rowid",
            )
            .map_err(|e| self.db(e))?;
        let rows = st.query_map([], worker_row).map_err(|e| self.db(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.db(e))
    }

    /// Where an artifact's bytes live. Errors when `name` is not a safe relative path.
    pub fn artifact_path(&self, trial_id: &str, name: &str) -> Result<PathBuf> {
        validate_trial_id(trial_id)?;
        validate_artifact_name(name)?;
        Ok(self.dir.join("artifacts").join(trial_id).join(name))
    }

    /// Begin writing an artifact: bytes go to a temporary file that [`ArtifactWriter::finish`]
    /// renames into place, so a reader never sees half a file. Call `record_artifact` after.
    pub fn artifact_writer(&self, trial_id: &str, name: &str) -> Result<ArtifactWriter> {
        let path = self.artifact_path(trial_id, name)?;
        ArtifactWriter::create(path, name.to_string())
    }

    /// Record a finished artifact (replacing an older version of the same name).
    pub fn record_artifact(
        &mut self,
        trial_id: &str,
        art: &ArtifactRow,
        now_ms: i64,
    ) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO artifacts (trial_id, name, size, sha256, stored_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![trial_id, art.name, art.size as i64, art.sha256, now_ms],
            )
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// Put a sealed artifact in place and record it (replacing an older version of the same
    /// name). The caller holds whatever lock decides who may write (the server's).
    pub fn commit_artifact(
        &mut self,
        trial_id: &str,
        sealed: SealedArtifact,
        now_ms: i64,
    ) -> Result<ArtifactRow> {
        let row = sealed.commit()?;
        self.record_artifact(trial_id, &row, now_ms)?;
        Ok(row)
    }

    /// Write a whole artifact at once (tests, small files).
    pub fn put_artifact(
        &mut self,
        trial_id: &str,
        name: &str,
        bytes: &[u8],
        now_ms: i64,
    ) -> Result<ArtifactRow> {
        let mut w = self.artifact_writer(trial_id, name)?;
        w.write(bytes)?;
        let row = w.finish()?;
        self.record_artifact(trial_id, &row, now_ms)?;
        Ok(row)
    }

    /// Forget and delete a trial's artifacts whose names start with `prefix` (a finished trial's
    /// resumable checkpoint is dead weight: model plus optimizer state, several times the model).
    pub fn delete_artifacts(&mut self, trial_id: &str, prefix: &str) -> Result<usize> {
        let doomed = self.artifacts(trial_id, Some(prefix))?;
        for a in &doomed {
            let path = self.artifact_path(trial_id, &a.name)?;
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::Io { path, source: e }),
            }
            self.conn
                .execute(
                    "DELETE FROM artifacts WHERE trial_id = ?1 AND name = ?2",
                    params![trial_id, a.name],
                )
                .map_err(|e| self.db(e))?;
        }
        Ok(doomed.len())
    }

    /// Artifacts of a trial, by name; those whose name starts with `prefix` when given.
    pub fn artifacts(&self, trial_id: &str, prefix: Option<&str>) -> Result<Vec<ArtifactRow>> {
        let mut st = self
            .conn
            .prepare("SELECT name, size, sha256 FROM artifacts WHERE trial_id = ?1 ORDER BY name")
            .map_err(|e| self.db(e))?;
        let rows = st
            .query_map([trial_id], |r| {
                Ok(ArtifactRow {
                    name: r.get(0)?,
                    size: r.get::<_, i64>(1)? as u64,
                    sha256: r.get(2)?,
                })
            })
            .map_err(|e| self.db(e))?;
        let all = rows
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.db(e))?;
        Ok(all
            .into_iter()
            .filter(|a| prefix.is_none_or(|p| a.name.starts_with(p)))
            .collect())
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
            .query_map(params![sweep, trial], |r| {
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
            })
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

fn rung_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<crate::scheduler::tune::RungDecision> {
    let verdict: String = r.get(4)?;
    Ok(crate::scheduler::tune::RungDecision {
        trial_id: r.get(0)?,
        rung: r.get::<_, i64>(1)? as usize,
        step: r.get::<_, i64>(2)? as u64,
        loss: r.get::<_, Option<f64>>(3)?.unwrap_or(f64::NAN),
        verdict: crate::scheduler::tune::Verdict::parse(&verdict)
            .unwrap_or(crate::scheduler::tune::Verdict::Continue),
        detail: r.get(5)?,
    })
}

fn worker_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WorkerRow> {
    Ok(WorkerRow {
        id: r.get(0)?,
        info: WorkerInfo {
            name: r.get(1)?,
            host: r.get(2)?,
            device_kind: r.get(3)?,
            device_name: r.get(4)?,
            memory_bytes: r.get::<_, i64>(5)? as u64,
            price_per_hour: r.get(7)?,
        },
        registered_ms: r.get(6)?,
    })
}

fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    if s.is_empty() {
        "sweep".into()
    } else {
        s
    }
}

/// Trial ids become directory names: [`ablate_proto::names::check_trial_id`], the rule the
/// worker applies too (16 lowercase hex digits, what `TrialConfig::id` produces).
pub fn validate_trial_id(id: &str) -> Result<()> {
    ablate_proto::names::check_trial_id(id).map_err(|e| StoreError::Invalid(e.to_string()))
}

/// Artifact names become paths under the trial's directory:
/// [`ablate_proto::names::check_artifact_name`], the rule the worker applies too.
pub fn validate_artifact_name(name: &str) -> Result<()> {
    ablate_proto::names::check_artifact_name(name).map_err(|e| StoreError::Invalid(e.to_string()))
}

/// An artifact being written: bytes to a temporary sibling file, hashed as they arrive.
pub struct ArtifactWriter {
    path: PathBuf,
    tmp: PathBuf,
    file: fs::File,
    hash: Sha256,
    size: u64,
    name: String,
}

impl ArtifactWriter {
    fn create(path: PathBuf, name: String) -> Result<Self> {
        let parent = path
            .parent()
            .expect("artifact path has a parent")
            .to_path_buf();
        fs::create_dir_all(&parent).map_err(|e| StoreError::Io {
            path: parent.clone(),
            source: e,
        })?;
        let file_name = path
            .file_name()
            .expect("artifact has a file name")
            .to_string_lossy();
        let tmp = parent.join(format!(
            ".{file_name}.tmp-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let file = fs::File::create(&tmp).map_err(|e| StoreError::Io {
            path: tmp.clone(),
            source: e,
        })?;
        Ok(ArtifactWriter {
            path,
            tmp,
            file,
            hash: Sha256::new(),
            size: 0,
            name,
        })
    }

    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).map_err(|e| StoreError::Io {
            path: self.tmp.clone(),
            source: e,
        })?;
        self.hash.update(bytes);
        self.size += bytes.len() as u64;
        Ok(())
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Flush, fsync and rename into place; the row is ready for [`Store::record_artifact`].
    pub fn finish(self) -> Result<ArtifactRow> {
        self.seal()?.commit()
    }

    /// Flush and fsync (slow), without putting the file in place: [`Store::commit_artifact`]
    /// does that quickly, after the caller checked it may.
    pub fn seal(mut self) -> Result<SealedArtifact> {
        self.file.sync_all().map_err(|e| StoreError::Io {
            path: self.tmp.clone(),
            source: e,
        })?;
        let digest = std::mem::replace(&mut self.hash, Sha256::new()).finalize();
        Ok(SealedArtifact {
            path: std::mem::take(&mut self.path),
            tmp: std::mem::take(&mut self.tmp),
            row: ArtifactRow {
                name: std::mem::take(&mut self.name),
                size: self.size,
                sha256: hex::encode(digest),
            },
        })
    }
}

impl Drop for ArtifactWriter {
    fn drop(&mut self) {
        // An abandoned upload leaves no temporary file behind (after seal it is SealedArtifact's).
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A complete, fsynced artifact in its temporary file, not yet visible under its name.
pub struct SealedArtifact {
    path: PathBuf,
    tmp: PathBuf,
    row: ArtifactRow,
}

impl SealedArtifact {
    fn commit(mut self) -> Result<ArtifactRow> {
        fs::rename(&self.tmp, &self.path).map_err(|e| StoreError::Io {
            path: self.path.clone(),
            source: e,
        })?;
        self.tmp = PathBuf::new();
        Ok(self.row.clone())
    }
}

impl Drop for SealedArtifact {
    fn drop(&mut self) {
        // Refused (a stale attempt) or failed: the bytes go.
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

static TMP_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// SHA-256 of a byte string as lowercase hex (artifact digests).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
