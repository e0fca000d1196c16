//! `[base] hub = "org/name"`: a model named on the Hugging Face Hub, found in the standard
//! Hugging Face cache as transformers (huggingface_hub) finds it, and downloaded into that cache
//! when it is missing and the machine is online.
//!
//! * The cache is `$HF_HUB_CACHE`, else `$HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
//!   `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
//! * A repository lives in `models--{org}--{name}/`: `refs/{revision}` holds the commit a branch
//!   or tag points at, `snapshots/{commit}/` the files (usually links into `blobs/`). A revision
//!   of 40 hex digits is a commit and is looked up directly; the default revision is `main`.
//! * `HF_HUB_OFFLINE=1` (or `true`/`yes`/`on`) never touches the network: what is not in the
//!   cache is an error naming the repository, the revision and the folder looked in.
//! * Online, the files a checkpoint needs (config.json, tokenizer.json, and model.safetensors or
//!   the shards its index names) are fetched by the `hf-hub` crate, which writes the same layout,
//!   with `$HF_TOKEN` (or the cache's token file) for gated repositories.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where and how to look: read from the environment by [`HubEnv::from_env`]; tests build one.
#[derive(Clone, Debug)]
pub struct HubEnv {
    pub cache: PathBuf,
    pub offline: bool,
    pub token: Option<String>,
    /// `$HF_ENDPOINT` (a mirror), if set.
    pub endpoint: Option<String>,
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

impl HubEnv {
    pub fn from_env() -> HubEnv {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let cache = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
            .or_else(|| var("XDG_CACHE_HOME").map(|x| x.join("huggingface/hub")))
            .unwrap_or_else(|| {
                var("HOME")
                    .unwrap_or_else(|| PathBuf::from("."))
                    .join(".cache/huggingface/hub")
            });
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| truthy(&v));
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty());
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|e| !e.trim().is_empty());
        HubEnv {
            cache,
            offline,
            token,
            endpoint,
        }
    }
}

fn is_commit(r: &str) -> bool {
    r.len() == 40 && r.chars().all(|c| c.is_ascii_hexdigit())
}

/// The files a checkpoint directory needs, given what the snapshot holds so far.
fn needed(snapshot: Option<&Path>) -> Vec<String> {
    let mut files = vec!["config.json".to_string(), "tokenizer.json".to_string()];
    let index = snapshot.map(|s| s.join("model.safetensors.index.json"));
    match index.filter(|i| i.is_file()) {
        Some(i) => {
            files.push("model.safetensors.index.json".into());
            files.extend(shards(&i));
        }
        None => files.push("model.safetensors".into()),
    }
    files
}

fn shards(index: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(index) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    let mut out: Vec<String> = v["weight_map"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// The snapshot folder of `repo` at `revision` in the cache, if the cache has one.
fn cached_snapshot(env: &HubEnv, repo: &str, revision: &str) -> Option<PathBuf> {
    let root = env
        .cache
        .join(format!("models--{}", repo.replace('/', "--")));
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(root.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let dir = root.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}

/// A local checkpoint directory for `repo` at `revision` (default `main`): the cache's snapshot
/// when it holds every file a checkpoint needs; else, online, after downloading what is missing.
pub fn resolve(env: &HubEnv, repo: &str, revision: Option<&str>) -> Result<PathBuf> {
    crate::trial::validate_hub(repo, revision).map_err(Error::Config)?;
    let revision = revision.unwrap_or("main");
    let snapshot = cached_snapshot(env, repo, revision);
    if let Some(s) = &snapshot {
        let missing: Vec<String> = needed(Some(s))
            .into_iter()
            .filter(|f| !s.join(f).is_file())
            .collect();
        if missing.is_empty() {
            return Ok(s.clone());
        }
        if env.offline {
            return Err(Error::input(
                s,
                format!(
                    "hub model {repo}@{revision}: the cached snapshot lacks {} and HF_HUB_OFFLINE is set",
                    missing.join(", ")
                ),
            ));
        }
    } else if env.offline {
        return Err(Error::input(
            &env.cache,
            format!(
                "hub model {repo}@{revision} is not in this Hugging Face cache (models--{}/) and HF_HUB_OFFLINE is set: download it once online, or point HF_HUB_CACHE / HF_HOME at a cache that has it",
                repo.replace('/', "--")
            ),
        ));
    }
    download(env, repo, revision)
}

fn download(env: &HubEnv, repo: &str, revision: &str) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        // Network trouble is worth a retry, unlike a bad config.
        Error::Package(format!("hub model {repo}@{revision}: {what}: {e}"))
    };
    let mut b = ApiBuilder::from_cache(Cache::new(env.cache.clone()))
        .with_progress(false)
        .with_token(env.token.clone());
    if let Some(e) = &env.endpoint {
        b = b.with_endpoint(e.clone());
    }
    let api = b
        .build()
        .map_err(|e| fail("cannot start the hub client", &e))?;
    let r = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        revision.to_string(),
    ));
    let config = r.get("config.json").map_err(|e| fail("config.json", &e))?;
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Other(format!("{}: no parent folder", config.display())))?;
    // Sharded checkpoints list their shards in the index; single-file ones have model.safetensors.
    if r.get("model.safetensors.index.json").is_err() {
        r.get("model.safetensors")
            .map_err(|e| fail("model.safetensors", &e))?;
    }
    for f in needed(Some(&dir)) {
        if !dir.join(&f).is_file() {
            r.get(&f).map_err(|e| fail(&f, &e))?;
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    /// A cache laid out as huggingface_hub writes it: blobs, a snapshot of links, refs.
    fn layout(cache: &Path, repo: &str, files: &[&str], refs: &[&str]) -> PathBuf {
        let root = cache.join(format!("models--{}", repo.replace('/', "--")));
        let snap = root.join("snapshots").join(COMMIT);
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(root.join("blobs")).unwrap();
        for (i, f) in files.iter().enumerate() {
            let blob = root.join("blobs").join(format!("blob{i}"));
            std::fs::write(&blob, f.as_bytes()).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/blob{i}"), snap.join(f)).unwrap();
        }
        for r in refs {
            let p = root.join("refs").join(r);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, COMMIT).unwrap();
        }
        snap
    }

    fn env(cache: &Path) -> HubEnv {
        HubEnv {
            cache: cache.to_path_buf(),
            offline: true,
            token: None,
            endpoint: None,
        }
    }

    const FULL: &[&str] = &["config.json", "tokenizer.json", "model.safetensors"];

    #[test]
    fn finds_branches_tags_and_commits_in_the_cache() {
        let t = tempfile::tempdir().unwrap();
        let snap = layout(t.path(), "org/model", FULL, &["main", "v1.0"]);
        let e = env(t.path());
        assert_eq!(resolve(&e, "org/model", None).unwrap(), snap);
        assert_eq!(resolve(&e, "org/model", Some("v1.0")).unwrap(), snap);
        assert_eq!(resolve(&e, "org/model", Some(COMMIT)).unwrap(), snap);
        assert!(
            snap.join("config.json").is_file(),
            "links resolve into blobs/"
        );
    }

    #[test]
    fn offline_misses_name_what_is_missing() {
        let t = tempfile::tempdir().unwrap();
        let e = env(t.path());
        let err = resolve(&e, "org/absent", None).unwrap_err().to_string();
        assert!(
            err.contains("org/absent@main")
                && err.contains("HF_HUB_OFFLINE")
                && err.contains("models--org--absent"),
            "{err}"
        );
        layout(
            t.path(),
            "org/partial",
            &["config.json", "tokenizer.json"],
            &["main"],
        );
        let err = resolve(&e, "org/partial", None).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        let err = resolve(&e, "org/partial", Some("no-such-branch"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-branch"), "{err}");
    }

    #[test]
    fn sharded_snapshots_need_every_shard() {
        let t = tempfile::tempdir().unwrap();
        let snap = layout(
            t.path(),
            "org/sharded",
            &["config.json", "tokenizer.json"],
            &["main"],
        );
        std::fs::write(
            snap.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(snap.join("model-00001-of-00002.safetensors"), b"x").unwrap();
        let err = resolve(&env(t.path()), "org/sharded", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
        std::fs::write(snap.join("model-00002-of-00002.safetensors"), b"x").unwrap();
        assert_eq!(resolve(&env(t.path()), "org/sharded", None).unwrap(), snap);
    }

    #[test]
    fn repository_names_cannot_leave_the_cache() {
        let t = tempfile::tempdir().unwrap();
        for bad in ["../x", "a/b/c", "a--b/c", "", "org/"] {
            assert!(resolve(&env(t.path()), bad, None).is_err(), "{bad}");
        }
        assert!(resolve(&env(t.path()), "org/m", Some("../../etc")).is_err());
    }
}
