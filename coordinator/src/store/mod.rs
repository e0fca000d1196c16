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
//! The store is synchronous (rusqlite); the server serialises access behind one mutex and runs
//! it on a blocking thread, which is plenty for a few dozen workers reporting a few times per
//! second.
//!
//! One `impl Store` per role: `schema.rs` (tables and added columns), `sweeps.rs` (submitted
//! sweeps and their trials), `trials.rs` (attempts, events, the scheduler's decisions, status
//! details), `tune.rs` (the tuner's decisions), `workers.rs`, and `artifacts.rs` (files and their
//! rows). This file holds the row types, opening, counts and the health probe.

use std::fs;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::scheduler::TrialState;
use experiments::trial::TrialConfig;

mod artifacts;
mod schema;
mod sweeps;
mod trials;
mod tune;
mod workers;

pub use artifacts::{
    sha256_hex, validate_artifact_name, validate_trial_id, ArtifactWriter, SealedArtifact,
};
pub use trials::{Scope, TrialDetails};

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
        s.conn.execute_batch(schema::SCHEMA).map_err(|e| s.db(e))?;
        // Columns added after the first release: a state dir written by an older coordinator
        // gets them with their default on open (SQLite's ALTER TABLE ADD COLUMN keeps the rows).
        s.add_column_if_missing("workers", "price_per_hour", "REAL NOT NULL DEFAULT 0")?;
        Ok(s)
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
}
