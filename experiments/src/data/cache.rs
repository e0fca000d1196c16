//! The token cache: both splits of a data spec encoded once per (tokenizer, corpus content, split
//! rule), stored content-addressed under `cache_dir/tokens/` and read back memory-mapped.

use std::fs;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use sha2::{Digest, Sha256};

use super::atomic::{remove_stale_temps, write_bytes_atomic, write_tokens_atomic};
use super::corpus::resolve_corpus;
use super::documents::{load_documents, split_documents};
use crate::tokenizer::Tok;
use crate::trial::{DataSpec, DocSplit};
use crate::{Error, Result};

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
    write_tokens_atomic(&valid_path, &valid)?;
    write_tokens_atomic(&train_path, &train)?;
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
