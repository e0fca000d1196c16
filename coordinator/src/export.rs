//! `ablate export`: the trained models of a sweep as Hugging Face directories.
//!
//! Each exported trial becomes `OUT/<trial name>/`: the files of its `model/` artifact (config,
//! weights, tokenizer: what `transformers.AutoModelForCausalLM.from_pretrained` loads), a LoRA
//! trial's PEFT adapter under `adapter/`, and `ablate.json` (trial id, resolved config, final
//! metrics) saying where the weights came from. Two sources, one code path:
//! - a running coordinator (`--coordinator`, the admin token): through the `SweepService`
//!   artifact stream, so it works from a laptop against a remote coordinator;
//! - `--from RUN_OUT`: the state directory of an `ablate run` output folder (or of `ablate serve
//!   --state`), offline.
//!
//! Every file is checked against the SHA-256 the coordinator recorded when it was uploaded, and a
//! trial's directory is written next to its final place and renamed into it when complete, so an
//! interrupted export never leaves a half-written model under a trial's name.

use std::path::{Path, PathBuf};

use ablate_proto::pb;
use anyhow::Context;
use sha2::{Digest, Sha256};

use crate::cli::{Client, Conn};
use crate::scheduler::TrialState;
use crate::store::Store;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// Sweep name or id (with --from: optional, default the latest sweep in that state).
    pub sweep: Option<String>,
    /// Directory to write into: one sub-directory per trial.
    #[arg(long)]
    pub out: PathBuf,
    /// Export only these trials (name or id; repeatable). Default: every finished trial that
    /// trained a model.
    #[arg(long = "trial")]
    pub trials: Vec<String>,
    /// Read an `ablate run` output folder (or an `ablate serve --state` dir) instead of asking a
    /// coordinator.
    #[arg(long)]
    pub from: Option<PathBuf>,
    #[command(flatten)]
    pub conn: Conn,
}

/// One trial of the sweep as export sees it.
#[derive(Clone, Debug)]
pub struct ExportTrial {
    pub id: String,
    pub name: String,
    pub state: TrialState,
    pub config_json: String,
    pub metrics_json: String,
}

/// Where the artifacts come from.
enum Source {
    Remote(Client),
    Local(Store),
}

impl Source {
    async fn trials(&mut self, sweep: Option<&str>) -> anyhow::Result<(String, Vec<ExportTrial>)> {
        match self {
            Source::Remote(c) => {
                let key = sweep.context(
                    "name the sweep to export (`ablate export SWEEP --out DIR`), or use --from",
                )?;
                let r = c.get_raw(key).await?;
                let trials = r
                    .trials
                    .into_iter()
                    .map(|t| {
                        Ok(ExportTrial {
                            state: crate::cli::wire_state(&t.id, &t.state)?,
                            id: t.id,
                            name: t.name,
                            config_json: t.config_json,
                            metrics_json: t.metrics_json,
                        })
                    })
                    .collect::<anyhow::Result<_>>()?;
                Ok((r.name, trials))
            }
            Source::Local(store) => {
                let row = match sweep {
                    Some(k) => store
                        .find_sweep(k)?
                        .with_context(|| format!("no sweep with id or name {k:?} in this state"))?,
                    None => store
                        .sweeps()?
                        .into_iter()
                        .max_by_key(|s| s.created_ms)
                        .context("this state holds no sweep")?,
                };
                let trials = store
                    .sweep_trials(&row.id)?
                    .into_iter()
                    .map(|t| ExportTrial {
                        id: t.id,
                        name: t.name,
                        state: t.state,
                        config_json: t.config_json,
                        metrics_json: t.metrics_json.unwrap_or_default(),
                    })
                    .collect();
                Ok((row.name, trials))
            }
        }
    }

    async fn artifacts(&mut self, trial: &str) -> anyhow::Result<Vec<pb::ArtifactInfo>> {
        match self {
            Source::Remote(c) => c.list_artifacts(trial).await,
            Source::Local(store) => Ok(store
                .artifacts(trial, None)?
                .into_iter()
                .map(|a| pb::ArtifactInfo {
                    name: a.name,
                    size: a.size,
                    sha256: a.sha256,
                })
                .collect()),
        }
    }

    /// Write one artifact to `dest`, checking its size and SHA-256.
    async fn fetch(
        &mut self,
        trial: &str,
        a: &pb::ArtifactInfo,
        dest: &Path,
    ) -> anyhow::Result<()> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let (size, digest) = match self {
            Source::Remote(c) => c.download_artifact(trial, &a.name, dest).await?,
            Source::Local(store) => {
                let src = store.artifact_path(trial, &a.name)?;
                copy_hashing(&src, dest)?
            }
        };
        if size != a.size || digest != a.sha256 {
            anyhow::bail!(
                "trial {trial}: artifact {} is {size} bytes with SHA-256 {digest}, but the \
                 coordinator recorded {} bytes with {}: the stored copy is damaged",
                a.name,
                a.size,
                a.sha256
            );
        }
        Ok(())
    }
}

fn copy_hashing(src: &Path, dest: &Path) -> anyhow::Result<(u64, String)> {
    use std::io::{Read, Write};
    let mut from =
        std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut to =
        std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = from
            .read(&mut buf)
            .with_context(|| format!("reading {}", src.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        to.write_all(&buf[..k])
            .with_context(|| format!("writing {}", dest.display()))?;
        n += k as u64;
    }
    to.sync_all().ok();
    Ok((n, hex::encode(h.finalize())))
}

impl Client {
    /// The `Get` answer as the proto has it (export needs the raw JSON fields).
    pub async fn get_raw(&mut self, sweep: &str) -> anyhow::Result<pb::GetResponse> {
        let url = self.url.clone();
        Ok(self
            .inner
            .get(pb::GetRequest {
                sweep: sweep.to_string(),
            })
            .await
            .map_err(|s| crate::cli::status_error(&url, &format!("sweep {sweep}"), s))?
            .into_inner())
    }

    pub async fn list_artifacts(&mut self, trial: &str) -> anyhow::Result<Vec<pb::ArtifactInfo>> {
        let url = self.url.clone();
        Ok(self
            .inner
            .list_artifacts(pb::ListArtifactsRequest {
                trial_id: trial.to_string(),
            })
            .await
            .map_err(|s| crate::cli::status_error(&url, &format!("artifacts of {trial}"), s))?
            .into_inner()
            .artifacts)
    }

    /// Stream one artifact into `dest`; returns its size and SHA-256.
    pub async fn download_artifact(
        &mut self,
        trial: &str,
        name: &str,
        dest: &Path,
    ) -> anyhow::Result<(u64, String)> {
        use std::io::Write;
        let url = self.url.clone();
        let what = format!("artifact {name} of {trial}");
        let mut stream = self
            .inner
            .download_artifact(pb::DownloadArtifactRequest {
                trial_id: trial.to_string(),
                name: name.to_string(),
            })
            .await
            .map_err(|s| crate::cli::status_error(&url, &what, s))?
            .into_inner();
        let mut file =
            std::fs::File::create(dest).with_context(|| format!("creating {}", dest.display()))?;
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| crate::cli::status_error(&url, &what, s))?
        {
            h.update(&chunk.data);
            file.write_all(&chunk.data)
                .with_context(|| format!("writing {}", dest.display()))?;
            n += chunk.data.len() as u64;
        }
        file.sync_all().ok();
        Ok((n, hex::encode(h.finalize())))
    }
}

/// A trial name as a directory name: letters, digits and `.-_=+` kept, anything else (spaces,
/// slashes) becomes `_`; never empty, `.` or `..`.
pub fn dir_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_=+".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        format!("trial{s}")
    } else {
        s
    }
}

/// Where an artifact goes inside the trial's export directory: `model/X` → `X`, the adapter
/// (`adapter/X` or `model/adapter/X`) → `adapter/X`; anything else (checkpoints, metrics,
/// samples) is not part of the exported model.
pub fn export_path(artifact: &str) -> Option<&str> {
    if let Some(rest) = artifact.strip_prefix("model/") {
        return Some(rest);
    }
    artifact.starts_with("adapter/").then_some(artifact)
}

/// What one export did, for the summary line and tests.
#[derive(Debug, Default)]
pub struct ExportReport {
    /// (trial name, directory written, files).
    pub exported: Vec<(String, PathBuf, usize)>,
    /// (trial name, why it was left out).
    pub skipped: Vec<(String, String)>,
}

/// `ablate export`.
pub async fn export(args: ExportArgs) -> anyhow::Result<ExportReport> {
    let mut source = match &args.from {
        Some(dir) => {
            let state = if dir.join("state").join("ablate.sqlite").is_file() {
                dir.join("state")
            } else if dir.join("ablate.sqlite").is_file() {
                dir.clone()
            } else {
                anyhow::bail!(
                    "{}: not an `ablate run` output folder (no state/ablate.sqlite) or a \
                     coordinator state dir (no ablate.sqlite)",
                    dir.display()
                );
            };
            Source::Local(Store::open(&state)?)
        }
        None => Source::Remote(crate::cli::connect(&args.conn).await?),
    };
    let (sweep_name, trials) = source.trials(args.sweep.as_deref()).await?;
    // Which trials: the named ones (each must exist), else all.
    let mut chosen: Vec<&ExportTrial> = Vec::new();
    for want in &args.trials {
        let t = trials
            .iter()
            .find(|t| &t.name == want || &t.id == want)
            .with_context(|| {
                let names: Vec<&str> = trials.iter().map(|t| t.name.as_str()).collect();
                format!(
                    "sweep {sweep_name} has no trial named {want:?} (its trials: {})",
                    names.join(", ")
                )
            })?;
        chosen.push(t);
    }
    let explicit = !chosen.is_empty();
    if !explicit {
        chosen = trials.iter().collect();
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut report = ExportReport::default();
    let mut used = std::collections::HashSet::new();
    for t in chosen {
        if t.state != TrialState::Finished {
            let why = format!("its state is {}", t.state);
            if explicit {
                anyhow::bail!("trial {} cannot be exported: {why}", t.name);
            }
            report.skipped.push((t.name.clone(), why));
            continue;
        }
        let artifacts = source.artifacts(&t.id).await?;
        let files: Vec<(&pb::ArtifactInfo, &str)> = artifacts
            .iter()
            .filter_map(|a| Some((a, export_path(&a.name)?)))
            .collect();
        if files.is_empty() {
            let why = "it trained no model (a baseline evaluates the base as it is)".to_string();
            if explicit {
                anyhow::bail!("trial {} cannot be exported: {why}", t.name);
            }
            report.skipped.push((t.name.clone(), why));
            continue;
        }
        let mut name = dir_name(&t.name);
        if !used.insert(name.clone()) {
            // Two trials whose names map to the same directory: the id tells them apart.
            name = format!("{name}-{}", t.id);
            used.insert(name.clone());
        }
        let dest = args.out.join(&name);
        let tmp = args.out.join(format!(".{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
        }
        for (a, rel) in &files {
            source.fetch(&t.id, a, &tmp.join(rel)).await?;
        }
        let provenance = serde_json::json!({
            "trial": t.id,
            "name": t.name,
            "sweep": sweep_name,
            "config": serde_json::from_str::<serde_json::Value>(&t.config_json).unwrap_or_default(),
            "metrics": serde_json::from_str::<serde_json::Value>(&t.metrics_json).unwrap_or_default(),
        });
        std::fs::write(
            tmp.join("ablate.json"),
            serde_json::to_string_pretty(&provenance)? + "\n",
        )
        .with_context(|| format!("writing {}", tmp.join("ablate.json").display()))?;
        if dest.exists() {
            std::fs::remove_dir_all(&dest)
                .with_context(|| format!("replacing {}", dest.display()))?;
        }
        std::fs::rename(&tmp, &dest).with_context(|| format!("renaming to {}", dest.display()))?;
        report.exported.push((t.name.clone(), dest, files.len()));
    }
    Ok(report)
}

/// `ablate export` as a command: runs it and prints what was written.
pub async fn export_command(args: ExportArgs) -> anyhow::Result<()> {
    let out = args.out.clone();
    let r = export(args).await?;
    for (name, dir, files) in &r.exported {
        println!("{name}: {} ({files} files)", dir.display());
    }
    for (name, why) in &r.skipped {
        eprintln!("{name}: not exported: {why}");
    }
    if r.exported.is_empty() {
        anyhow::bail!("nothing exported to {}", out.display());
    }
    eprintln!(
        "{} trial(s) exported to {}; load one with transformers' from_pretrained(DIR/<trial>)",
        r.exported.len(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_safe_directories() {
        assert_eq!(dir_name("freeze-2 seed=1"), "freeze-2_seed=1");
        assert_eq!(dir_name("../x"), ".._x");
        assert_eq!(dir_name(".."), "trial..");
        assert_eq!(dir_name(""), "trial");
        assert_eq!(dir_name("lora-16"), "lora-16");
    }

    #[test]
    fn only_the_model_and_the_adapter_are_exported() {
        assert_eq!(export_path("model/config.json"), Some("config.json"));
        assert_eq!(
            export_path("model/adapter/adapter_config.json"),
            Some("adapter/adapter_config.json")
        );
        assert_eq!(
            export_path("adapter/adapter_model.safetensors"),
            Some("adapter/adapter_model.safetensors")
        );
        assert_eq!(export_path("ckpt/state.json"), None);
        assert_eq!(export_path("metrics.json"), None);
    }
}
