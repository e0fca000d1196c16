//! `ablate backup` and `ablate restore`: a coordinator's state folder copied while it runs, and
//! put back into a fresh state folder.
//!
//! A backup folder holds `ablate.sqlite` (made with SQLite's online backup API from a read
//! connection of its own: a consistent snapshot even while the coordinator writes), the
//! artifacts that snapshot lists (`artifacts/<trial>/<name>`, hard-linked when the backup is on
//! the same file system, copied otherwise; artifacts are immutable once renamed into place) and
//! `BACKUP.json`, a manifest with every file's size and SHA-256.
//!
//! The store is copied first, then the artifacts it names. An artifact replaced in between (a
//! newer checkpoint of the same name) is taken as it is now, and the backup's row for it is
//! updated to match; one deleted in between (the checkpoint of a trial that finished) is left
//! out, and its row removed from the backup's store, so that the restored coordinator never
//! offers a worker a file it does not have (that trial then runs again from its start, as the
//! snapshot shows it unfinished). Restore checks every file against the manifest before it writes
//! anything, and only into a state folder without a store.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The manifest's name in a backup folder.
pub const MANIFEST: &str = "BACKUP.json";
const DB: &str = "ablate.sqlite";
/// Bumped when the folder's layout changes; restore refuses a format it does not know.
const FORMAT: u32 = 1;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Manifest {
    pub format: u32,
    /// The `ablate` release that wrote it.
    pub ablate_version: String,
    pub created_unix_ms: i64,
    /// The state folder it was taken from.
    pub source: String,
    /// Every file of the backup but the manifest, by path relative to the backup folder.
    pub files: Vec<FileEntry>,
    /// Artifacts the snapshot listed that were gone by the time they were copied.
    pub left_out: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// What a backup did, for the command's summary line.
#[derive(Debug)]
pub struct BackupSummary {
    pub files: usize,
    pub bytes: u64,
    pub left_out: usize,
}

fn sha256_file(path: &Path) -> anyhow::Result<(u64, String)> {
    let mut f = fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, hex::encode(h.finalize())))
}

/// Hard link `from` to `to`, or copy it where that is not possible (another file system).
fn link_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    if let Some(p) = to.parent() {
        fs::create_dir_all(p)?;
    }
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(e),
        Err(_) => fs::copy(from, to).map(|_| ()),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Back up the state folder `state` into `out` (created; must not hold a backup already).
pub fn backup(state: &Path, out: &Path) -> anyhow::Result<BackupSummary> {
    let src_db = state.join(DB);
    if !src_db.is_file() {
        bail!(
            "--state {}: no {DB} there (the coordinator's --state folder)",
            state.display()
        );
    }
    if out.join(MANIFEST).exists() || out.join(DB).exists() {
        bail!(
            "--out {}: holds a backup already; choose a new folder",
            out.display()
        );
    }
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let dst_db = out.join(DB);

    // 1. The store, from a read-only connection of our own, in one step: a consistent snapshot
    // (retried while the coordinator holds a lock it cannot share).
    {
        let src = rusqlite::Connection::open_with_flags(
            &src_db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {}", src_db.display()))?;
        src.busy_timeout(Duration::from_secs(10))?;
        let mut dst = rusqlite::Connection::open(&dst_db)
            .with_context(|| format!("creating {}", dst_db.display()))?;
        let b = rusqlite::backup::Backup::new(&src, &mut dst)
            .with_context(|| format!("starting the online backup of {}", src_db.display()))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            use rusqlite::backup::StepResult;
            match b
                .step(-1)
                .with_context(|| format!("backing up {}", src_db.display()))?
            {
                StepResult::Done => break,
                StepResult::More => {}
                // Busy, Locked (the enum is non-exhaustive).
                _ => {
                    if std::time::Instant::now() > deadline {
                        bail!(
                            "{} stayed locked for 60 s: backup not taken",
                            src_db.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    // 2. The artifacts the snapshot lists.
    let db = rusqlite::Connection::open(&dst_db)?;
    // A plain rollback-journal file: one file to copy and restore, nothing beside it.
    db.query_row("PRAGMA journal_mode=DELETE", [], |_| Ok(()))?;
    let rows: Vec<(String, String, String)> = db
        .prepare("SELECT trial_id, name, sha256 FROM artifacts ORDER BY trial_id, name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut files = Vec::new();
    let mut left_out = Vec::new();
    let mut bytes = 0u64;
    for (trial, name, want) in rows {
        crate::store::validate_trial_id(&trial)
            .and_then(|()| crate::store::validate_artifact_name(&name))
            .with_context(|| format!("{}: artifact row {trial}/{name}", dst_db.display()))?;
        let rel = format!("artifacts/{trial}/{name}");
        let from = state.join(&rel);
        let to = out.join(&rel);
        match link_or_copy(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                db.execute(
                    "DELETE FROM artifacts WHERE trial_id = ?1 AND name = ?2",
                    [&trial, &name],
                )?;
                left_out.push(rel);
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("copying {}", from.display())),
        }
        let (size, sha) = sha256_file(&to)?;
        if sha != want {
            // Replaced since the snapshot (a newer checkpoint): the backup's store describes
            // the file the backup holds.
            db.execute(
                "UPDATE artifacts SET size = ?3, sha256 = ?4 WHERE trial_id = ?1 AND name = ?2",
                rusqlite::params![trial, name, size as i64, sha],
            )?;
        }
        bytes += size;
        files.push(FileEntry {
            path: rel,
            size,
            sha256: sha,
        });
    }
    drop(db);
    let (size, sha) = sha256_file(&dst_db)?;
    bytes += size;
    files.insert(
        0,
        FileEntry {
            path: DB.into(),
            size,
            sha256: sha,
        },
    );
    let manifest = Manifest {
        format: FORMAT,
        ablate_version: env!("CARGO_PKG_VERSION").into(),
        created_unix_ms: now_ms(),
        source: state.display().to_string(),
        files,
        left_out,
    };
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    let tmp = out.join(format!("{MANIFEST}.tmp"));
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, out.join(MANIFEST))?;
    Ok(BackupSummary {
        files: manifest.files.len(),
        bytes,
        left_out: manifest.left_out.len(),
    })
}

/// Read and check a backup folder's manifest: the format, and that every file it names is a
/// plain relative path that is there with its size and SHA-256.
pub fn verify(dir: &Path) -> anyhow::Result<Manifest> {
    let mpath = dir.join(MANIFEST);
    let text = fs::read_to_string(&mpath).with_context(|| {
        format!(
            "{}: not a backup folder ({MANIFEST} is missing)",
            dir.display()
        )
    })?;
    let m: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", mpath.display()))?;
    if m.format != FORMAT {
        bail!(
            "{}: format {} (this ablate reads format {FORMAT}; use the ablate {} that wrote it)",
            mpath.display(),
            m.format,
            m.ablate_version
        );
    }
    if !m.files.iter().any(|f| f.path == DB) {
        bail!("{}: files: no {DB}", mpath.display());
    }
    for (i, f) in m.files.iter().enumerate() {
        let p = Path::new(&f.path);
        let plain = p
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain || !(f.path == DB || f.path.starts_with("artifacts/")) {
            bail!(
                "{}: files[{i}].path {:?} is not a path inside the backup",
                mpath.display(),
                f.path
            );
        }
        let (size, sha) = sha256_file(&dir.join(p))
            .with_context(|| format!("{}: files[{i}] ({})", mpath.display(), f.path))?;
        if size != f.size || sha != f.sha256 {
            bail!(
                "{}: {} does not match the manifest (size {size}, sha256 {sha}; the manifest \
                 says {} and {}): the backup is damaged",
                dir.display(),
                f.path,
                f.size,
                f.sha256
            );
        }
    }
    Ok(m)
}

/// Restore the backup in `dir` into `state`, which must not hold a store yet.
pub fn restore(dir: &Path, state: &Path) -> anyhow::Result<Manifest> {
    if state.join(DB).exists() {
        bail!(
            "--state {}: holds a store already ({DB}); restore into a new, empty folder (or \
             move that one away first)",
            state.display()
        );
    }
    if state.join("artifacts").exists() {
        bail!(
            "--state {}: holds an artifacts folder already; restore into a new, empty folder",
            state.display()
        );
    }
    let m = verify(dir)?;
    fs::create_dir_all(state).with_context(|| format!("creating {}", state.display()))?;
    for f in &m.files {
        if f.path == DB {
            continue;
        }
        let to = state.join(&f.path);
        link_or_copy(&dir.join(&f.path), &to)
            .with_context(|| format!("restoring {}", to.display()))?;
    }
    // The store last, under a temporary name: a coordinator started on a half-restored folder
    // finds no store rather than one whose artifacts are missing.
    let tmp = state.join(format!("{DB}.restoring"));
    fs::copy(dir.join(DB), &tmp).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, state.join(DB))?;
    // It opens as a store (and switches back to WAL).
    crate::store::Store::open(state)
        .with_context(|| format!("opening the restored store in {}", state.display()))?;
    Ok(m)
}
