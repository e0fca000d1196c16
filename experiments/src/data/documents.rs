//! Documents, the unit of the train/valid split: files cut by a [`DocSplit`] rule, and the split
//! by a hash of each document's text.

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::corpus::resolve_corpus;
use crate::trial::{DataSpec, DocSplit};
use crate::{Error, Result};

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
/// Uses the same resolution, document cut and split as [`prepare`](super::prepare), so no validation text leaks
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
