//! The real `ablate-worker` binary's local commands (`eval`, `train`, `sample`) on the committed
//! Hugging Face fixture `experiments/tests/fixtures/tiny-gpt2` (saved by `transformers`), and the
//! errors it gives for bad input: one line naming the input, non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use experiments::checkpoint;
use experiments::eval;
use experiments::tokenizer::Tok;

const BIN: &str = env!("CARGO_BIN_EXE_ablate-worker");

const TEXT: &str = "The ablation study freezes one group of layers at a time and measures perplexity on held-out text.

A small model learns the shape of words before it learns their meaning; the first layers settle early, the last layers keep moving.

When the top group alone is trained, the loss falls quickly and then stalls. When every layer is trained, the loss falls slowly at first and then further than before.

Gradual unfreezing opens one more group at each stage, from the top down, so the lower layers move only after the upper ones have settled.

Inheritune keeps the first few blocks of a large model and trains them again on a slice of the text the large model saw.";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/tests/fixtures/tiny-gpt2")
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run ablate-worker")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Bad input: non-zero exit, an error mentioning `needle`, and no panic.
fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr:\n{err}"
    );
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    assert!(
        err.contains(needle),
        "error does not mention {needle:?}:\n{err}"
    );
}

fn copy_fixture(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), to.join(f)).unwrap();
    }
}

#[test]
fn eval_prints_the_same_perplexity_as_the_library() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT).unwrap();
    let fx = fixture();

    let o = run(&[
        "eval",
        "--model",
        fx.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--context",
        "32",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let line = out
        .lines()
        .find(|l| l.starts_with("perplexity: "))
        .expect("perplexity line");
    let printed: f64 = line["perplexity: ".len()..].trim().parse().unwrap();

    let o = run(&[
        "eval",
        "--model",
        fx.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--context",
        "32",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let ppl = v["perplexity"].as_f64().unwrap();
    let nll = v["nll"].as_f64().unwrap();
    let tokens = v["tokens"].as_u64().unwrap();
    assert!(((nll / tokens as f64).exp() - ppl).abs() < 1e-9 * ppl);
    assert!((printed - ppl).abs() < 1e-3);

    // The same number from the library: whole text + <|endoftext|>, chunks of 32.
    let dev = experiments::runner::parse_device("cpu").unwrap();
    let model = checkpoint::load_hf_dir(&fx, None, &dev).unwrap();
    let tok = Tok::load(&fx.join("tokenizer.json")).unwrap();
    let mut ids = tok.encode(TEXT).unwrap();
    ids.extend(tok.eot_id());
    let r = eval::perplexity(&*model, &ids, 32, 4, None, &dev).unwrap();
    assert_eq!(r.tokens, tokens);
    assert!(
        (r.perplexity - ppl).abs() < 1e-6 * ppl,
        "{} vs {ppl}",
        r.perplexity
    );

    // A directory and a glob name the same file.
    let o = run(&[
        "eval",
        "--model",
        fx.to_str().unwrap(),
        "--data",
        &format!("{}/*.txt", dir.path().display()),
        "--context",
        "32",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v2: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v2["tokens"], v["tokens"]);
}

#[test]
fn eval_rejects_bad_inputs_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, TEXT).unwrap();
    let t = text.to_str().unwrap();

    // Missing model directory.
    let missing = dir.path().join("no-such-model");
    assert_clean_failure(
        &run(&["eval", "--model", missing.to_str().unwrap(), "--data", t]),
        "no-such-model",
    );

    // Malformed config.json.
    let bad_cfg = dir.path().join("bad-config");
    copy_fixture(&bad_cfg);
    std::fs::write(bad_cfg.join("config.json"), "{ \"n_layer\": ").unwrap();
    assert_clean_failure(
        &run(&["eval", "--model", bad_cfg.to_str().unwrap(), "--data", t]),
        "config.json",
    );

    // config.json that disagrees with the tensors (wrong shapes).
    let bad_shape = dir.path().join("bad-shape");
    copy_fixture(&bad_shape);
    let cfg = std::fs::read_to_string(bad_shape.join("config.json")).unwrap();
    std::fs::write(
        bad_shape.join("config.json"),
        cfg.replace("\"n_embd\": 48", "\"n_embd\": 64"),
    )
    .unwrap();
    assert_clean_failure(
        &run(&["eval", "--model", bad_shape.to_str().unwrap(), "--data", t]),
        "model.safetensors",
    );

    // Missing tokenizer.
    let no_tok = dir.path().join("no-tok");
    copy_fixture(&no_tok);
    std::fs::remove_file(no_tok.join("tokenizer.json")).unwrap();
    assert_clean_failure(
        &run(&["eval", "--model", no_tok.to_str().unwrap(), "--data", t]),
        "tokenizer.json",
    );

    // Missing data file.
    let fx = fixture();
    assert_clean_failure(
        &run(&[
            "eval",
            "--model",
            fx.to_str().unwrap(),
            "--data",
            "/no/such/text.txt",
        ]),
        "/no/such/text.txt",
    );

    // Context beyond the model's positions.
    assert_clean_failure(
        &run(&[
            "eval",
            "--model",
            fx.to_str().unwrap(),
            "--data",
            t,
            "--context",
            "999",
        ]),
        "n_positions",
    );
}

/// A trial file as `ablate-worker train` takes it: a TrialConfig in TOML.
fn trial_toml(method: &str, base: &Path, train: &Path, valid: &Path) -> String {
    format!(
        r#"name = "cli-trial"
groups = 3
seed = 0

[method]
{method}

[base]
kind = "hf_dir"
path = "{base}"

[data]
valid_fraction = 0.1
context = 32

[data.train]
paths = ["{train}"]
documents = {{ kind = "paragraphs" }}

[data.valid]
paths = ["{valid}"]
documents = {{ kind = "file" }}

[train]
steps = 6
batch_size = 2
grad_accum = 1
lr = 1e-3
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
eps = 1e-8
schedule = {{ kind = "constant" }}
warmup_steps = 0
clip_norm = 1.0
eval_every = 3
eval_windows = 2
checkpoint_every = 0
"#,
        base = base.display(),
        train = train.display(),
        valid = valid.display(),
    )
}

struct TrainSetup {
    dir: tempfile::TempDir,
    train: PathBuf,
    valid: PathBuf,
}

fn train_setup() -> TrainSetup {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.txt");
    let valid = dir.path().join("valid.txt");
    std::fs::write(&train, TEXT.repeat(3)).unwrap();
    std::fs::write(&valid, TEXT.lines().next().unwrap()).unwrap();
    TrainSetup { dir, train, valid }
}

#[test]
fn train_runs_one_trial_and_writes_metrics_and_model() {
    let s = train_setup();
    let trial = s.dir.path().join("trial.toml");
    std::fs::write(
        &trial,
        trial_toml("kind = \"freeze\"\ntop = 1", &fixture(), &s.train, &s.valid),
    )
    .unwrap();
    let out = s.dir.path().join("out");
    let cache = s.dir.path().join("cache");
    let o = run(&[
        "train",
        "--trial",
        trial.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("step 6/6"), "progress lines on stderr:\n{err}");
    assert!(err.contains("eval step 3"), "{err}");
    assert!(stdout(&o).contains("perplexity: "));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["steps"], 6);
    assert!(m["perplexity"].as_f64().unwrap().is_finite());
    assert!(m["trainable_params"].as_u64().unwrap() < m["total_params"].as_u64().unwrap());
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(out.join("model").join(f).is_file(), "model/{f}");
    }
    assert!(out.join("samples.json").is_file());
    // The written model loads back and evaluates through the eval command.
    let o = run(&[
        "eval",
        "--model",
        out.join("model").to_str().unwrap(),
        "--data",
        s.valid.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Running the same command again finds the finished checkpoint and does no more steps.
    let o = run(&[
        "train",
        "--trial",
        trial.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("step 1/6"), "{}", stderr(&o));
}

/// `[base] kind = "hub"` through the CLI: the model comes from a Hugging Face cache laid out as
/// huggingface_hub writes it (blobs, a snapshot of links, refs/main), found through `HF_HOME`
/// with `HF_HUB_OFFLINE=1`, as transformers would find it; a repository the cache lacks is a
/// clear error naming it.
#[test]
fn train_starts_from_a_hub_model_in_the_hf_cache() {
    let s = train_setup();
    let hf = s.dir.path().join("hf");
    let repo = hf.join("hub/models--acme--tiny-llama");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let llama =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiments/tests/fixtures/tiny-llama");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let blob = repo.join("blobs").join(format!("sha-{f}"));
        std::fs::copy(llama.join(f), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/sha-{f}"), snap.join(f)).unwrap();
    }
    let body = trial_toml("kind = \"freeze\"\ntop = 1", &fixture(), &s.train, &s.valid);
    let base = format!(
        "[base]\nkind = \"hf_dir\"\npath = \"{}\"\n",
        fixture().display()
    );
    assert!(body.contains(&base));
    let go = |name: &str, repo_id: &str| {
        let trial = s.dir.path().join(format!("{name}.toml"));
        let hub = format!("[base]\nkind = \"hub\"\nrepo = \"{repo_id}\"\n");
        std::fs::write(&trial, body.replace(&base, &hub)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_ablate-worker"))
            .args(["train", "--trial"])
            .arg(&trial)
            .arg("--out")
            .arg(s.dir.path().join(name))
            .arg("--cache")
            .arg(s.dir.path().join("cache"))
            .env("HF_HOME", &hf)
            .env_remove("HF_HUB_CACHE")
            .env_remove("HUGGINGFACE_HUB_CACHE")
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap()
    };
    let o = go("hub-ok", "acme/tiny-llama");
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(s.dir.path().join("hub-ok/metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["steps"], 6);
    let cfg = std::fs::read_to_string(s.dir.path().join("hub-ok/model/config.json")).unwrap();
    assert!(cfg.contains("LlamaForCausalLM"), "{cfg}");

    let o = go("hub-missing", "acme/not-cached");
    assert_clean_failure(&o, "acme/not-cached@main");
    assert!(stderr(&o).contains("HF_HUB_OFFLINE"), "{}", stderr(&o));
}

#[test]
fn train_rejects_bad_trials_by_name() {
    let s = train_setup();
    let out = s.dir.path().join("out");
    let cache = s.dir.path().join("cache");
    let go = |name: &str, body: String| {
        let trial = s.dir.path().join(name);
        std::fs::write(&trial, body).unwrap();
        run(&[
            "train",
            "--trial",
            trial.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--cache",
            cache.to_str().unwrap(),
        ])
    };
    // Unknown method: the file, line and column of the bad value.
    let o = go(
        "unknown.toml",
        trial_toml("kind = \"shrink\"", &fixture(), &s.train, &s.valid),
    );
    assert_clean_failure(&o, "unknown.toml:6:");
    assert_clean_failure(&o, "shrink");
    // Freeze more groups than there are.
    let o = go(
        "freeze9.toml",
        trial_toml("kind = \"freeze\"\ntop = 9", &fixture(), &s.train, &s.valid),
    );
    assert_clean_failure(&o, "top = 9");
    // Inheritune deeper than the 2-block fixture.
    let o = go(
        "inh5.toml",
        trial_toml(
            "kind = \"inheritune\"\nblocks = 5",
            &fixture(),
            &s.train,
            &s.valid,
        ),
    );
    assert_clean_failure(&o, "blocks = 5");
    // Missing trial file.
    let o = run(&[
        "train",
        "--trial",
        "/no/such/trial.toml",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "/no/such/trial.toml");
    // Missing base directory.
    let o = go(
        "nobase.toml",
        trial_toml(
            "kind = \"baseline\"",
            &s.dir.path().join("gone"),
            &s.train,
            &s.valid,
        ),
    );
    assert_clean_failure(&o, "gone");
}

#[test]
fn sample_is_seeded_and_continues_the_prompt() {
    let fx = fixture();
    let f = fx.to_str().unwrap();
    let args = |seed: &str| {
        run(&[
            "sample",
            "--model",
            f,
            "--prompt",
            "The ablation",
            "--max-new-tokens",
            "20",
            "--seed",
            seed,
            "--top-k",
            "40",
            "--top-p",
            "0.9",
            "--temperature",
            "1.0",
        ])
    };
    let a = args("1");
    assert!(a.status.success(), "{}", stderr(&a));
    assert!(stdout(&a).starts_with("The ablation"), "{}", stdout(&a));
    assert!(stdout(&a).len() > "The ablation".len() + 1);
    let b = args("1");
    assert_eq!(stdout(&a), stdout(&b), "same seed, same text");
    let outs: std::collections::HashSet<String> =
        ["2", "3", "4"].iter().map(|s| stdout(&args(s))).collect();
    assert!(
        outs.len() > 1 || !outs.contains(&stdout(&a)),
        "seeds change the sample"
    );

    assert_clean_failure(
        &run(&["sample", "--model", "/no/model", "--prompt", "x"]),
        "/no/model",
    );
    assert_clean_failure(
        &run(&["sample", "--model", f, "--prompt", "x", "--top-p", "1.5"]),
        "top_p",
    );
}

/// `--all-gpus` gives up on a GPU whose worker keeps exiting instead of restarting it forever:
/// here every child fails at once (this CPU build cannot open `cuda:0`), so after
/// `--max-restarts 2` restarts each GPU is given up and the supervisor exits non-zero, which is
/// what systemd, Slurm or a container runtime needs to see.
#[test]
fn all_gpus_supervisor_caps_restarts_and_fails() {
    let t0 = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_ablate-worker"))
        .args([
            "--all-gpus",
            "--coordinator",
            "http://127.0.0.1:1",
            "--max-restarts",
            "2",
        ])
        .env("CUDA_VISIBLE_DEVICES", "0,1")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert_eq!(err.matches("giving this GPU up").count(), 2, "{err}");
    assert!(err.contains("exited 3 times in a row"), "{err}");
    // Two restarts per GPU (1 s and 2 s of backoff), then the third exit gives up.
    assert_eq!(err.matches("worker exited; restarting").count(), 4, "{err}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(30));
}

/// `--metrics-listen` that cannot be bound fails before the worker dials anyone, naming the flag;
/// `ABLATE_SKIP_PREFLIGHT=1` is a valid way to say `--skip-preflight`.
#[test]
fn a_bad_metrics_address_is_a_clear_error() {
    let o = Command::new(BIN)
        .args(["--coordinator", "http://127.0.0.1:9"])
        .args(["--metrics-listen", "no-such-host.invalid:x9465"])
        .env("ABLATE_SKIP_PREFLIGHT", "1")
        .output()
        .expect("run ablate-worker");
    assert_clean_failure(&o, "--metrics-listen no-such-host.invalid:x9465");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}
