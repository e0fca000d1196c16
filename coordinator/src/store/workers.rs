//! Registered workers: ids `w<n>` in registration order, with the device and price each one
//! reported.

use rusqlite::{params, OptionalExtension};

use super::{Result, Store, WorkerInfo, WorkerRow};

impl Store {
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
}

pub(super) fn worker_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WorkerRow> {
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
