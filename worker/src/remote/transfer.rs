//! Artifacts in and out: uploads retried through network cuts, downloads of the base model and
//! checkpoints, and the local file walks they use.

use std::path::Path;
use std::sync::atomic::Ordering;

use ablate_proto::limits::CHUNK_BYTES;
use ablate_proto::pb;
use anyhow::Context;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::Status;

use super::attempt::check_name_from_coordinator;
use super::call::{retry, transient, Backoff};
use super::lease::Worker;
use super::Client;

impl Worker {
    pub(super) async fn list(&self, trial_id: &str) -> anyhow::Result<Vec<pb::ArtifactInfo>> {
        let client = self.client.clone();
        let req = pb::ListArtifactsRequest {
            trial_id: trial_id.into(),
        };
        let stop = self.stop.clone();
        let r = retry("list_artifacts", &|| stop.load(Ordering::SeqCst), || {
            let mut c = client.clone();
            let req = req.clone();
            async move { c.list_artifacts(req).await }
        })
        .await
        .map_err(|e| anyhow::anyhow!("listing artifacts of {trial_id}: {}", e.message()))?;
        Ok(r.into_inner().artifacts)
    }

    pub(super) async fn download(
        &self,
        trial_id: &str,
        name: &str,
        dest: &Path,
    ) -> anyhow::Result<()> {
        check_name_from_coordinator(name)?;
        let mut backoff = Backoff::new();
        let mut tries = 0;
        loop {
            tries += 1;
            match download_once(&self.client, trial_id, name, dest).await {
                Ok(()) => return Ok(()),
                Err(e) if tries < 6 && !self.stopping() => {
                    tracing::warn!(cause = %format!("{e:#}"), name, "download failed, retrying");
                    backoff.wait().await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Upload results, retrying through network cuts until the coordinator takes them or says
    /// the attempt no longer owns the trial (a preempted worker stops trying at the watchdog).
    pub(super) async fn upload_dir(
        &self,
        trial_id: &str,
        attempt: u32,
        dir: &Path,
        prefix: &str,
    ) -> bool {
        upload_dir(&self.client, trial_id, attempt, dir, prefix, &|| false).await
    }

    pub(super) async fn upload_file(
        &self,
        trial_id: &str,
        attempt: u32,
        name: &str,
        path: &Path,
    ) -> bool {
        upload_file_retrying(&self.client, trial_id, attempt, name, path, &|| false).await
    }
}

pub(super) async fn upload_dir(
    client: &Client,
    trial_id: &str,
    attempt: u32,
    dir: &Path,
    prefix: &str,
    give_up: &(dyn Fn() -> bool + Sync),
) -> bool {
    let files = match list_files(dir) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), cause = %e, "cannot list files to upload");
            return false;
        }
    };
    let mut ok = true;
    for rel in files {
        let name = format!("{prefix}/{rel}");
        ok &=
            upload_file_retrying(client, trial_id, attempt, &name, &dir.join(&rel), give_up).await;
    }
    ok
}

/// Upload one file, retrying transient failures with backoff until `give_up` says stop.
pub(super) async fn upload_file_retrying(
    client: &Client,
    trial_id: &str,
    attempt: u32,
    name: &str,
    path: &Path,
    give_up: &(dyn Fn() -> bool + Sync),
) -> bool {
    let mut backoff = Backoff::new();
    loop {
        match upload_once(client, trial_id, attempt, name, path).await {
            Ok(()) => return true,
            Err(e) if transient(&e) && !give_up() => {
                tracing::warn!(name, cause = %e.message(), "upload failed, retrying");
                backoff.wait().await;
            }
            Err(e) => {
                tracing::warn!(name, cause = %e.message(), "upload refused");
                return false;
            }
        }
    }
}

pub(super) async fn upload_once(
    client: &Client,
    trial_id: &str,
    attempt: u32,
    name: &str,
    path: &Path,
) -> Result<(), Status> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| Status::failed_precondition(format!("{}: {e}", path.display())))?;
    let (tx, rx) = mpsc::channel::<pb::ArtifactChunk>(4);
    let (t, n) = (trial_id.to_string(), name.to_string());
    let reader = tokio::spawn(async move {
        let mut first = true;
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let k = file.read(&mut buf).await?;
            if k == 0 && !first {
                return Ok::<(), std::io::Error>(());
            }
            buf.truncate(k);
            let chunk = pb::ArtifactChunk {
                trial_id: t.clone(),
                attempt,
                name: n.clone(),
                data: buf,
            };
            first = false;
            if tx.send(chunk).await.is_err() || k == 0 {
                return Ok(());
            }
        }
    });
    let mut c = client.clone();
    let r = c.upload_artifact(ReceiverStream::new(rx)).await;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(Status::failed_precondition(format!(
                "reading {}: {e}",
                path.display()
            )))
        }
        Err(e) => return Err(Status::internal(format!("upload reader: {e}"))),
    }
    r.map(|_| ())
}

pub(super) async fn download_once(
    client: &Client,
    trial_id: &str,
    name: &str,
    dest: &Path,
) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let parent = dest
        .parent()
        .context("download destination has no parent")?;
    tokio::fs::create_dir_all(parent)
        .await
        .with_context(|| format!("creating {}", parent.display()))?;
    let tmp = dest.with_extension(format!("part-{}", std::process::id()));
    let mut c = client.clone();
    let mut stream = c
        .download_artifact(pb::DownloadArtifactRequest {
            trial_id: trial_id.into(),
            name: name.into(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("downloading {trial_id}/{name}: {}", e.message()))?
        .into_inner();
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("creating {}", tmp.display()))?;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| anyhow::anyhow!("downloading {trial_id}/{name}: {}", e.message()))?;
        f.write_all(&chunk.data)
            .await
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    f.sync_all()
        .await
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(f);
    tokio::fs::rename(&tmp, dest)
        .await
        .with_context(|| format!("renaming to {}", dest.display()))?;
    Ok(())
}

/// Regular files below `dir`, as sorted `/`-separated relative paths.
pub(super) fn list_files(dir: &Path) -> std::io::Result<Vec<String>> {
    pub(super) fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(root, &p, out)?;
            } else if ft.is_file() {
                let rel = p.strip_prefix(root).expect("below root");
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push(rel.join("/"));
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

pub(super) fn copy_dir(src: &Path, dst: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_dir_all(dst);
    for rel in list_files(src)? {
        let to = dst.join(&rel);
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::copy(src.join(&rel), to)?;
    }
    Ok(())
}
