//! The SQLite store against a real temporary database file: submit, decisions, events, workers,
//! artifacts, and reopening after drop (a coordinator restart).

use coordinator::scheduler::{AttemptOutcome, Decision, TrialState};
use coordinator::store::*;
use experiments::trial::*;

fn config(name: &str, base: Base) -> TrialConfig {
    TrialConfig {
        name: name.into(),
        method: Method::Freeze { top: 1 },
        base,
        data: DataSpec {
            train: CorpusSpec {
                paths: vec!["/tmp/x.txt".into()],
                package: None,
                documents: DocSplit::File,
            },
            valid: None,
            valid_fraction: 0.1,
            context: 32,
            max_train_tokens: None,
            max_valid_windows: None,
        },
        train: TrainSpec {
            steps: 10,
            batch_size: 2,
            grad_accum: 1,
            lr: 1e-3,
            lr_factor: None,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            clip_norm: None,
            eval_every: 0,
            eval_windows: 1,
            checkpoint_every: 0,
            ranks: 1,
        },
        groups: 2,
        seed: 0,
        tune: None,
    }
}

fn new_trial(c: TrialConfig) -> NewTrial {
    NewTrial {
        id: c.id(),
        config: c,
    }
}

fn state(t: &str, s: TrialState, attempts: u32) -> Decision {
    Decision::State {
        trial_id: t.into(),
        state: s,
        attempts,
        spent: 0,
        deterministic: false,
        reason: String::new(),
        message: String::new(),
    }
}

#[test]
fn submit_is_idempotent_and_trials_are_shared_between_sweeps() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let a = new_trial(config("a", Base::HfDir { path: "/m".into() }));
    let b = new_trial(config("b", Base::Trial { id: a.id.clone() }));
    let s1 = store
        .submit("sw", "text", &[a.clone(), b.clone()], 1)
        .unwrap();
    assert_eq!(s1.added, vec![a.id.clone(), b.id.clone()]);
    let again = store
        .submit("sw", "text", &[a.clone(), b.clone()], 2)
        .unwrap();
    assert_eq!(
        again.sweep_id, s1.sweep_id,
        "same name and text is the same sweep"
    );
    assert!(again.added.is_empty());
    assert_eq!(again.already_present.len(), 2);
    let other = store
        .submit("sw", "edited", std::slice::from_ref(&b), 3)
        .unwrap();
    assert_ne!(other.sweep_id, s1.sweep_id);
    assert_eq!(store.trials().unwrap().len(), 2);
    assert_eq!(store.sweep_trials(&other.sweep_id).unwrap().len(), 1);
    // By name, the latest sweep of that name.
    assert_eq!(store.find_sweep("sw").unwrap().unwrap().id, other.sweep_id);
    let row = store.trial(&b.id).unwrap().unwrap();
    assert_eq!(row.depends_on.as_deref(), Some(a.id.as_str()));
    assert_eq!(row.method, "freeze");
    assert_eq!(row.state, TrialState::Waiting);
    // What the metrics endpoint reads at each scrape: counts, agreeing with the rows.
    let counts = store.counts().unwrap();
    assert_eq!(counts.sweeps, 2);
    assert_eq!(counts.workers, 0);
    let by_state: std::collections::BTreeMap<String, u64> =
        store
            .trials()
            .unwrap()
            .iter()
            .fold(Default::default(), |mut m, t| {
                *m.entry(t.state.as_str().to_string()).or_default() += 1;
                m
            });
    assert_eq!(counts.trials_by_state, by_state);
    assert_eq!(
        counts.trials_by_state.get("waiting"),
        Some(&2),
        "{counts:?}"
    );
    assert!(
        store.submit(" ", "t", &[], 4).is_err(),
        "empty sweep name is rejected"
    );
}

#[test]
fn decisions_events_and_workers_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = new_trial(config("a", Base::HfDir { path: "/m".into() }));
    let wid;
    {
        let mut store = Store::open(dir.path()).unwrap();
        store
            .submit("sw", "t", std::slice::from_ref(&a), 1)
            .unwrap();
        let info = WorkerInfo {
            name: "gpu0".into(),
            host: "h".into(),
            device_kind: "cuda".into(),
            device_name: "H100".into(),
            memory_bytes: 80 << 30,
            price_per_hour: 0.0,
        };
        wid = store.register_worker(&info, 1).unwrap();
        store
            .apply(
                &[
                    state(&a.id, TrialState::Queued, 0),
                    Decision::Started {
                        trial_id: a.id.clone(),
                        attempt: 1,
                        worker_id: wid.clone(),
                        deadline_ms: 100,
                    },
                    state(&a.id, TrialState::Running, 1),
                ],
                10,
            )
            .unwrap();
        assert!(store.record_event(&a.id, 1, 0, r#"{"kind":"step","step":1,"total":10,"loss":5.0,"lr":0.001,"tokens_per_sec":100.0}"#, 11).unwrap());
        assert!(!store.record_event(&a.id, 1, 0, r#"{"kind":"step","step":1,"total":10,"loss":9.0,"lr":0.001,"tokens_per_sec":1.0}"#, 12).unwrap(), "same (trial, attempt, seq) is recorded once");
        assert!(store
            .record_event(
                &a.id,
                1,
                1,
                r#"{"kind":"eval","step":1,"valid_loss":4.0}"#,
                13
            )
            .unwrap());
    } // dropped: as if the coordinator died
    let mut store = Store::open(dir.path()).unwrap();
    let row = store.trial(&a.id).unwrap().unwrap();
    assert_eq!(
        (row.state, row.attempts, row.worker_id.as_deref()),
        (TrialState::Running, 1, Some(wid.as_str()))
    );
    let events = store.events(&a.id).unwrap();
    assert_eq!(events.len(), 2);
    assert!(
        events[0].json.contains("\"loss\":5.0"),
        "the first copy wins"
    );
    assert!(store
        .latest_step_event(&a.id)
        .unwrap()
        .unwrap()
        .contains("\"step\":1"));
    assert_eq!(
        store.worker(&wid).unwrap().unwrap().info.device_name,
        "H100"
    );
    let restored = store.restored_trials().unwrap();
    assert_eq!(restored.len(), 1);
    assert_eq!(restored[0].state, TrialState::Running);

    store
        .apply(
            &[
                Decision::Ended {
                    trial_id: a.id.clone(),
                    attempt: 1,
                    outcome: AttemptOutcome::Finished,
                    reason: String::new(),
                    message: String::new(),
                    metrics_json: Some(r#"{"perplexity":12.5}"#.into()),
                },
                state(&a.id, TrialState::Finished, 1),
            ],
            20,
        )
        .unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let row = store.trial(&a.id).unwrap().unwrap();
    assert_eq!(row.state, TrialState::Finished);
    assert_eq!(row.finished_ms, Some(20));
    assert!(row.metrics_json.unwrap().contains("12.5"));
    let attempts = store.attempts(&a.id).unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].outcome.as_deref(), Some("finished"));
    assert_eq!(attempts[0].ended_ms, Some(20));
}

#[test]
fn artifacts_are_validated_hashed_and_stored_under_the_trial() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let row = store
        .put_artifact("0123456789abc123", "model/config.json", b"abc", 1)
        .unwrap();
    // FIPS 180-2 test vector.
    assert_eq!(
        row.sha256,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(row.size, 3);
    assert_eq!(
        std::fs::read(
            dir.path()
                .join("artifacts/0123456789abc123/model/config.json")
        )
        .unwrap(),
        b"abc"
    );
    store
        .put_artifact(
            "0123456789abc123",
            "ckpt/state.safetensors",
            &vec![7u8; 200_000],
            2,
        )
        .unwrap();
    let ckpt = store.artifacts("0123456789abc123", Some("ckpt/")).unwrap();
    assert_eq!(ckpt.len(), 1);
    assert_eq!(ckpt[0].size, 200_000);
    assert_eq!(store.artifacts("0123456789abc123", None).unwrap().len(), 2);
    assert_eq!(
        store.delete_artifacts("0123456789abc123", "ckpt/").unwrap(),
        1
    );
    assert!(!dir
        .path()
        .join("artifacts/0123456789abc123/ckpt/state.safetensors")
        .exists());
    assert!(store
        .artifacts("0123456789abc123", Some("ckpt/"))
        .unwrap()
        .is_empty());
    store
        .put_artifact("0123456789abc123", "ckpt/state.safetensors", b"again", 2)
        .unwrap();
    // Replacing keeps one row.
    store
        .put_artifact("0123456789abc123", "model/config.json", b"abcd", 3)
        .unwrap();
    assert_eq!(store.artifacts("0123456789abc123", None).unwrap().len(), 2);
    for bad in [
        "/etc/passwd",
        "../x",
        "model/../../x",
        "a//b",
        "",
        "model/.hidden",
        "sp ace",
        "a\\b",
    ] {
        let err = store
            .put_artifact("0123456789abc123", bad, b"x", 4)
            .unwrap_err();
        assert!(err.to_string().contains("artifact name"), "{bad}: {err}");
    }
    assert!(store.put_artifact("../etc", "x", b"x", 4).is_err());
    // No temporary files are left behind.
    let leftovers: Vec<_> = walk(dir.path().join("artifacts"))
        .into_iter()
        .filter(|p| p.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        sha256_hex(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
}

fn walk(p: std::path::PathBuf) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(path));
            } else {
                out.push(path.display().to_string());
            }
        }
    }
    out
}
