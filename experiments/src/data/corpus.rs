//! Corpus resolution: the files a [`CorpusSpec`] names (files, folders, glob patterns), inside an
//! installed package when it names one.

use std::fs;
use std::path::{Path, PathBuf};

use super::package::{ensure_package, inside_package};
use crate::trial::CorpusSpec;
use crate::{Error, Result};

/// Resolve a corpus to the sorted, de-duplicated list of files it names.
///
/// Each entry of `spec.paths` is a file, a directory (every regular file below it) or a glob
/// pattern. With `spec.package` the package is installed first (see [`ensure_package`]) and the
/// entries are relative to its root; they may not be absolute or climb out with `..`.
/// An entry that matches no file is an [`Error::Input`] naming it: a silently empty corpus would
/// only show up later as a confusing "not enough tokens".
pub fn resolve_corpus(spec: &CorpusSpec, cache_dir: &Path) -> Result<Vec<PathBuf>> {
    if spec.paths.is_empty() {
        return Err(Error::Config("corpus lists no paths".into()));
    }
    let root = match &spec.package {
        Some(pkg) => Some(ensure_package(pkg, cache_dir)?),
        None => None,
    };
    let mut files = Vec::new();
    for entry in &spec.paths {
        let full = match &root {
            Some(root) => inside_package(root, entry)?,
            None => PathBuf::from(entry),
        };
        let before = files.len();
        // Only the entry is a pattern: glob metacharacters in the cache path must match
        // literally.
        let pattern = match &root {
            Some(root) => format!("{}/{entry}", glob::Pattern::escape(&root.to_string_lossy())),
            None => entry.clone(),
        };
        expand_entry(&full, &pattern, &mut files)?;
        if files.len() == before {
            let shown = match &spec.package {
                Some(p) => format!(
                    "{entry} (in package {}:{}=={})",
                    p.manager, p.name, p.version
                ),
                None => entry.clone(),
            };
            return Err(Error::input(shown, "matches no files"));
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Append the regular files `path` names: itself, everything below it, or its glob matches.
fn expand_entry(path: &Path, pattern: &str, out: &mut Vec<PathBuf>) -> Result<()> {
    if path.is_file() {
        out.push(path.to_path_buf());
        return Ok(());
    }
    if path.is_dir() {
        return walk_dir(path, out);
    }
    if !pattern.contains(['*', '?', '[']) {
        return Ok(()); // A plain path that does not exist: the caller reports "matches no files".
    }
    let matches =
        glob::glob(pattern).map_err(|e| Error::input(path, format!("bad glob pattern: {e}")))?;
    for m in matches {
        let m = m.map_err(|e| {
            let p = e.path().to_path_buf();
            Error::io(p, e.into())
        })?;
        if m.is_file() {
            out.push(m);
        } else if m.is_dir() {
            walk_dir(&m, out)?;
        }
    }
    Ok(())
}

fn walk_dir(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(dir, e))?;
    entries.sort();
    for p in entries {
        // Follows symlinks: a link to a file counts as that file.
        if p.is_file() {
            out.push(p);
        } else if p.is_dir() {
            walk_dir(&p, out)?;
        }
    }
    Ok(())
}
