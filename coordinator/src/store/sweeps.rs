//! Sweeps and their trials: storing a submitted sweep (a trial already stored is linked, not
//! added again), adding a tuned arm's confirm runs, and reading sweeps back.

use rusqlite::{params, OptionalExtension};

use super::schema::TRIAL_COLS;
use super::{NewTrial, Result, Store, StoreError, Submitted, SweepRow, TrialRow};

impl Store {
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
        let mut next_seq = next_trial_seq(&tx).map_err(db)?;
        for (pos, t) in trials.iter().enumerate() {
            if insert_trial(&tx, t, &mut next_seq, db)? {
                added.push(t.id.clone());
            } else {
                already.push(t.id.clone());
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

    /// Add trials to an existing sweep (the confirm runs of a tuned arm), after its other
    /// trials. Trials already stored are linked, not added again. Returns the ids added.
    pub fn add_to_sweep(&mut self, sweep_id: &str, trials: &[NewTrial]) -> Result<Vec<String>> {
        let db_path = self.db_path.clone();
        let db = |e| StoreError::Db {
            path: db_path.clone(),
            source: e,
        };
        let tx = self.conn.transaction().map_err(db)?;
        let mut next_seq = next_trial_seq(&tx).map_err(db)?;
        let mut pos: i64 = tx
            .query_row(
                "SELECT COALESCE(MAX(position), -1) + 1 FROM sweep_trials WHERE sweep_id = ?1",
                [sweep_id],
                |r| r.get(0),
            )
            .map_err(db)?;
        let mut added = Vec::new();
        for t in trials {
            if insert_trial(&tx, t, &mut next_seq, db)? {
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

    pub fn sweeps(&self) -> Result<Vec<SweepRow>> {
        let mut st = self
            .conn
            .prepare("SELECT id, name, text, created_ms FROM sweeps ORDER BY created_ms, rowid")
            .map_err(|e| self.db(e))?;
        let rows = st.query_map([], sweep_row).map_err(|e| self.db(e))?;
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
                sweep_row,
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
}

fn sweep_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SweepRow> {
    Ok(SweepRow {
        id: r.get(0)?,
        name: r.get(1)?,
        text: r.get(2)?,
        created_ms: r.get(3)?,
    })
}

/// The `seq` the next new trial gets: trials are listed in the order they were first stored.
fn next_trial_seq(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<i64> {
    tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM trials", [], |r| {
        r.get(0)
    })
}

/// Store `t` as a new, waiting trial numbered `next_seq` (then advanced) unless a trial with its
/// id is stored already. Returns whether it was added.
fn insert_trial(
    tx: &rusqlite::Transaction<'_>,
    t: &NewTrial,
    next_seq: &mut i64,
    db: impl Fn(rusqlite::Error) -> StoreError,
) -> Result<bool> {
    let exists = tx
        .query_row("SELECT 1 FROM trials WHERE id = ?1", [&t.id], |_| Ok(()))
        .optional()
        .map_err(&db)?
        .is_some();
    if exists {
        return Ok(false);
    }
    let json = serde_json::to_string(&t.config)
        .map_err(|e| StoreError::Invalid(format!("trial {}: {e}", t.id)))?;
    tx.execute(
        "INSERT INTO trials (id, seq, name, method, config_json, depends_on, cost, state)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'waiting')",
        params![
            t.id,
            *next_seq,
            t.config.name,
            t.config.method.family(),
            json,
            t.config.depends_on(),
            t.config.expected_cost()
        ],
    )
    .map_err(&db)?;
    *next_seq += 1;
    Ok(true)
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
