//! Fuzzing the coordinator's readers of untrusted input: artifact names (which become paths under
//! the state directory), proto messages off the wire, and the SQLite store file itself. Every
//! input must give `Ok` or a clear error — never a panic, and never a path outside the state dir.
//!
//! Inputs that once failed live under `tests/fuzz-regressions/<reader>/` and are replayed on every
//! run; add a file there for each new finding.
//! `PROPTEST_CASES=5000 cargo test -p coordinator --test fuzz` searches harder than CI does.

use std::path::{Component, Path, PathBuf};

use ablate_proto::pb;
use coordinator::store::{validate_artifact_name, Store, StoreError};
use proptest::prelude::*;
use prost::Message;

const TRIAL: &str = "0123456789abcdef";

fn regressions(reader: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-regressions")
        .join(reader);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{} holds no inputs", dir.display());
    out
}

/// An artifact name either is refused with an error naming it, or maps to a path strictly inside
/// `<state>/artifacts/<trial>/` with only normal components; a write through it stays there.
fn check_artifact_name(store: &Store, state: &Path, name: &str) {
    let root = state.join("artifacts").join(TRIAL);
    match store.artifact_path(TRIAL, name) {
        Ok(p) => {
            assert!(validate_artifact_name(name).is_ok());
            let rel = p
                .strip_prefix(&root)
                .unwrap_or_else(|_| panic!("{name:?} escaped to {}", p.display()));
            assert!(
                rel.components().all(|c| matches!(c, Component::Normal(_))),
                "{name:?} -> {}",
                p.display()
            );
            assert!(rel.components().count() >= 1);
            // Writing it really lands inside the trial's directory.
            let mut w = store.artifact_writer(TRIAL, name).unwrap();
            w.write(b"x").unwrap();
            let row = w.finish().unwrap();
            assert_eq!(row.name, name);
            let real = p.canonicalize().unwrap();
            assert!(real.starts_with(state.canonicalize().unwrap()));
        }
        Err(StoreError::Invalid(msg)) => {
            assert!(
                msg.contains("artifact name"),
                "error names the field: {msg}"
            );
        }
        Err(other) => panic!("{name:?}: unexpected error {other}"),
    }
}

fn name_part() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        Just("/".to_string()),
        Just("\\".to_string()),
        Just("%2e%2e".to_string()),
        Just("\u{0}".to_string()),
        Just("ckpt".to_string()),
        Just("model.safetensors".to_string()),
        Just("~".to_string()),
        Just(".hidden".to_string()),
        "[a-zA-Z0-9._-]{1,12}",
        "\\PC{1,6}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn artifact_names_never_escape_the_state_dir(
        parts in proptest::collection::vec(name_part(), 1..6),
        seps in proptest::collection::vec(prop::sample::select(vec!["/", "//", "/./", "\\"]), 6),
        lead in prop::sample::select(vec!["", "/", "./", "../"]),
    ) {
        let mut name = lead.to_string();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                name += seps[i];
            }
            name += p;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Store::open(&state).unwrap();
        check_artifact_name(&store, &state, &name);
    }

    #[test]
    fn arbitrary_artifact_names_never_escape(name in "\\PC{0,220}") {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Store::open(&state).unwrap();
        check_artifact_name(&store, &state, &name);
    }

    #[test]
    fn trial_ids_are_checked_before_they_become_paths(id in "\\PC{0,80}") {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let store = Store::open(&state).unwrap();
        if let Ok(p) = store.artifact_path(&id, "metrics.json") {
            let rel = p.strip_prefix(state.join("artifacts")).unwrap();
            prop_assert!(rel.components().all(|c| matches!(c, Component::Normal(_))));
            prop_assert_eq!(rel.components().count(), 2);
        }
    }

    /// Garbage off the wire decodes to an error or to some message, never a panic; a message that
    /// decodes re-encodes to something that decodes to the same message.
    #[test]
    fn proto_messages_survive_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }
}

fn roundtrip<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(m) = M::decode(bytes) {
        let again = M::decode(m.encode_to_vec().as_slice()).expect("re-encoded message decodes");
        assert_eq!(again, m);
    }
}

fn decode_all(bytes: &[u8]) {
    roundtrip::<pb::RegisterRequest>(bytes);
    roundtrip::<pb::LeaseRequest>(bytes);
    roundtrip::<pb::HeartbeatRequest>(bytes);
    roundtrip::<pb::ReportRequest>(bytes);
    roundtrip::<pb::CompleteRequest>(bytes);
    roundtrip::<pb::FailRequest>(bytes);
    roundtrip::<pb::ArtifactChunk>(bytes);
    roundtrip::<pb::DownloadArtifactRequest>(bytes);
    roundtrip::<pb::SubmitRequest>(bytes);
    roundtrip::<pb::CancelRequest>(bytes);
    roundtrip::<pb::GetRequest>(bytes);
}

#[test]
fn artifact_name_regressions() {
    let mut refused = 0;
    for (path, bytes) in regressions("artifact-names") {
        // One name per line; the file name says what the inputs try.
        for name in String::from_utf8_lossy(&bytes).lines() {
            eprintln!("{}: {name:?}", path.display());
            let dir = tempfile::tempdir().unwrap();
            let state = dir.path().join("state");
            let store = Store::open(&state).unwrap();
            check_artifact_name(&store, &state, name);
            refused += usize::from(store.artifact_path(TRIAL, name).is_err());
        }
    }
    assert!(refused > 0, "the corpus holds hostile names");
}

#[test]
fn proto_regressions() {
    for (path, bytes) in regressions("proto") {
        eprintln!("{}", path.display());
        decode_all(&bytes);
    }
}

/// A state dir whose SQLite file is garbage: opening fails with an error naming the file.
#[test]
fn a_corrupt_store_file_is_refused_with_its_path() {
    for (path, bytes) in regressions("sqlite") {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("ablate.sqlite"), &bytes).unwrap();
        match Store::open(&state) {
            Ok(s) => {
                // SQLite may accept some inputs (an empty file is a valid empty database).
                s.trials().unwrap();
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("ablate.sqlite"),
                    "{}: error names the file: {msg}",
                    path.display()
                );
            }
        }
    }
}
