//! The on-disk report spool of an attempt: progress and checkpoint uploads appended in order,
//! replayed to the coordinator until delivered, so a network cut costs disk, not memory.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ablate_proto::pb;
use experiments::trial::Progress;
use tokio::sync::Notify;

use super::call::{retry, timed};
use super::transfer::upload_dir;
use super::Client;

/// One line of an attempt's report spool.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Spooled {
    /// A progress event (as JSON) with its sequence number.
    Report { seq: u64, progress_json: String },
    /// Upload every file below `local` as `<prefix>/<relative path>`, then delete `local`.
    /// `snapshot` numbers the checkpoint snapshots of the attempt.
    Upload {
        local: PathBuf,
        prefix: String,
        snapshot: u64,
    },
    /// The attempt will produce nothing more.
    End,
}

/// Write side of the spool, owned by the training thread: appends whole lines and wakes the
/// sender. Dropping it marks the end, so the sender stops even if training panicked.
pub(super) struct SpoolWriter {
    file: std::fs::File,
    path: PathBuf,
    seq: u64,
    wake: Arc<Notify>,
}

impl SpoolWriter {
    pub(super) fn create(path: &Path, wake: Arc<Notify>) -> std::io::Result<Self> {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        Ok(SpoolWriter {
            file,
            path: path.to_path_buf(),
            seq: 0,
            wake,
        })
    }

    pub(super) fn report(&mut self, p: &Progress) {
        let seq = self.seq;
        self.seq += 1;
        let progress_json = serde_json::to_string(p).expect("progress serialises");
        self.push(&Spooled::Report { seq, progress_json });
    }

    pub(super) fn push(&mut self, entry: &Spooled) {
        let mut line = serde_json::to_vec(entry).expect("spool entry serialises");
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            // Disk full or gone: the event is lost to the coordinator, training goes on.
            tracing::warn!(spool = %self.path.display(), cause = %e, "could not spool a report");
        }
        self.wake.notify_one();
    }
}

impl Drop for SpoolWriter {
    fn drop(&mut self) {
        self.push(&Spooled::End);
    }
}

/// Read side of the spool: yields entries in the order they were written, waiting for more.
pub(super) struct SpoolReader {
    file: std::fs::File,
    path: PathBuf,
    buf: Vec<u8>,
    wake: Arc<Notify>,
}

impl SpoolReader {
    pub(super) fn open(path: &Path, wake: Arc<Notify>) -> std::io::Result<Self> {
        Ok(SpoolReader {
            file: std::fs::File::open(path)?,
            path: path.to_path_buf(),
            buf: Vec::new(),
            wake,
        })
    }

    /// The next entry; `End` once the writer is gone.
    pub(super) async fn next(&mut self) -> Spooled {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                match serde_json::from_slice(&line[..i]) {
                    Ok(e) => return e,
                    Err(e) => {
                        tracing::warn!(spool = %self.path.display(), cause = %e, "skipping a corrupt spool line");
                        continue;
                    }
                }
            }
            let mut chunk = [0u8; 64 << 10];
            match self.file.read(&mut chunk) {
                Ok(0) => {}
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(spool = %self.path.display(), cause = %e, "cannot read the spool");
                    return Spooled::End;
                }
            }
            // Nothing new: wait for the writer (a permit is stored if it wrote meanwhile).
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Send the spool in order: reports (retried until delivered, or until the lease is known lost)
/// and checkpoint uploads (skipped when a newer snapshot is already waiting).
pub(super) async fn report_loop(
    client: Client,
    trial_id: String,
    attempt: u32,
    mut spool: SpoolReader,
    latest_snapshot: Arc<AtomicU64>,
    trial_stop: Arc<AtomicBool>,
    lost: Arc<AtomicBool>,
) {
    let lost_flag = lost.clone();
    let give_up = move || lost_flag.load(Ordering::SeqCst);
    loop {
        match spool.next().await {
            Spooled::End => return,
            Spooled::Upload {
                local, snapshot, ..
            } if lost.load(Ordering::SeqCst)
                || snapshot < latest_snapshot.load(Ordering::SeqCst) =>
            {
                // The attempt no longer counts, or a newer checkpoint supersedes this one.
                let _ = std::fs::remove_dir_all(local);
            }
            Spooled::Upload { local, prefix, .. } => {
                upload_dir(&client, &trial_id, attempt, &local, &prefix, &give_up).await;
                let _ = std::fs::remove_dir_all(&local);
            }
            Spooled::Report { .. } if lost.load(Ordering::SeqCst) => {}
            Spooled::Report { seq, progress_json } => {
                let req = pb::ReportRequest {
                    trial_id: trial_id.clone(),
                    attempt,
                    seq,
                    progress_json,
                };
                // Keep trying while the coordinator is away: the lease decides who owns the trial.
                let r = retry("report", &give_up, || {
                    let mut c = client.clone();
                    let req = req.clone();
                    async move { timed(c.report(req)).await }
                })
                .await;
                match r {
                    Ok(resp) if !resp.get_ref().accepted => {
                        tracing::warn!(
                            "report refused: the lease was taken away; stopping the trial"
                        );
                        lost.store(true, Ordering::SeqCst);
                        trial_stop.store(true, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(cause = %e.message(), "report not delivered"),
                }
            }
        }
    }
}
