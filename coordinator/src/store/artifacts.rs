//! Artifact files under `<state_dir>/artifacts/<trial_id>/<name>` and their rows: bytes go to a
//! temporary sibling, hashed as they arrive, and are renamed into place only when complete, so a
//! reader never sees half a file and an abandoned upload leaves nothing behind.

use std::fs;
use std::io::Write;
use std::path::PathBuf;

use rusqlite::params;
use sha2::{Digest, Sha256};

use super::{ArtifactRow, Result, Store, StoreError};

impl Store {
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
