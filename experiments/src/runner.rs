//! The entry point a worker calls for every trial: config in, trained model and metrics out.
//!
//! [`run_trial`] builds the starting model for the trial's base and method, prepares the data
//! (shared token cache), trains with [`crate::train`] (resuming from `OUT/ckpt/` when a previous
//! attempt left one), evaluates perplexity on the validation split with [`crate::eval`], and writes
//! into the trial's out dir:
//!
//! * `model/` — the final Hugging Face directory (config.json, model.safetensors, tokenizer.json),
//!   for every method that trains; a pretrain trial's is what dependent trials start from;
//! * `ckpt/` — the resumable checkpoint;
//! * `metrics.json` — [`TrialMetrics`];
//! * `samples.json` — a few seeded generations from fixed prompts (also sent as
//!   `Progress::Sample`).
//!
//! When the stop flag is set the run checkpoints and returns [`Outcome::Stopped`]; calling
//! `run_trial` again with the same out dir continues where it stopped.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use sha2::{Digest, Sha256};

use crate::checkpoint;
use crate::data;
use crate::eval;
use crate::methods;
use crate::model::{self, CausalLm, Gpt2, Gpt2Config};
use crate::sample::{self, SampleOpts};
use crate::tokenizer::Tok;
use crate::train::{self, GradSync, TrainJob};
use crate::trial::{Base, Method, Progress, TrialConfig, TrialMetrics};
use crate::{Error, Result};

/// Where a trial runs and what it may read.
pub struct TrialEnv {
    pub device: Device,
    /// Checkpoint dir (a `model/` HF directory) of `Base::Trial`, fetched by the worker.
    pub base_dir: Option<PathBuf>,
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub stop: Arc<AtomicBool>,
    /// The other ranks of a data-parallel trial (`train.ranks > 1`); None for one rank.
    pub sync: Option<Arc<dyn GradSync>>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Finished(TrialMetrics),
    Stopped {
        step: u64,
    },
    /// A rank other than 0 of a data-parallel trial finished its steps. Rank 0 evaluates, writes
    /// the model and reports the metrics; the other ranks' weights are identical to it.
    RankDone {
        steps: u64,
    },
}

/// Fixed prompts for `samples.json`: the same for every trial so generations compare.
pub const SAMPLE_PROMPTS: [&str; 3] = ["The", "Once upon a time", "And then he said"];

/// "cpu" or "cuda:N" (CUDA only in builds with the `cuda` feature).
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Config(format!("device `{s}`: expected `cpu`, `cuda` or `cuda:N`"))
            })?,
        None => {
            return Err(Error::Config(format!(
                "device `{s}`: expected `cpu`, `cuda` or `cuda:N`"
            )))
        }
    };
    cuda_device(ordinal, s)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize, s: &str) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| Error::Config(format!("device `{s}`: {e}")))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ordinal: usize, s: &str) -> Result<Device> {
    Err(Error::Config(format!(
        "device `{s}`: this build has no CUDA support (rebuild with `--features cuda`)"
    )))
}

/// Runs one trial; see the module doc for what it writes. A device allocation failure comes back
/// as [`Error::OutOfMemory`] (the table shows it as such, e.g. gpt2-medium on a small GPU).
pub fn run_trial(
    cfg: &TrialConfig,
    env: &TrialEnv,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<Outcome> {
    run_trial_inner(cfg, env, on_progress).map_err(classify_oom)
}

/// candle reports CUDA allocation failures as driver errors; give them their own variant.
pub fn classify_oom(e: Error) -> Error {
    match e {
        Error::Candle(inner) => {
            let msg = inner.to_string();
            let lower = msg.to_ascii_lowercase();
            if lower.contains("out of memory") || lower.contains("out_of_memory") {
                Error::OutOfMemory(msg)
            } else {
                Error::Candle(inner)
            }
        }
        other => other,
    }
}

fn run_trial_inner(
    cfg: &TrialConfig,
    env: &TrialEnv,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<Outcome> {
    let started = Instant::now();
    let out = &env.out_dir;
    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let dev = &env.device;
    let peak = dev.is_cpu().then(PeakMemory::start);

    // 1. Starting model and tokenizer.
    let (mut model, tok, tok_path) = match (&cfg.base, &cfg.method) {
        (Base::Scratch { shape }, Method::Pretrain { vocab_size }) => {
            let (tok, tok_path) = pretrain_tokenizer(cfg, *vocab_size, &env.cache_dir)?;
            let mcfg = Gpt2Config {
                vocab_size: tok.vocab_size(),
                n_positions: shape.n_positions,
                n_embd: shape.n_embd,
                n_layer: shape.n_layer,
                n_head: shape.n_head,
                layer_norm_epsilon: 1e-5,
            };
            let m: Box<dyn CausalLm> = Box::new(Gpt2::new_random(&mcfg, cfg.seed, dev)?);
            (m, tok, tok_path)
        }
        (Base::Scratch { .. }, m) => {
            return Err(Error::Config(format!(
                "base `scratch` needs method `pretrain` (got `{}`): other methods start from trained weights",
                m.family()
            )))
        }
        (Base::HfDir { path }, _) => load_base(Path::new(path), dev)?,
        (Base::Gguf { path, package }, _) => {
            let file = match package {
                Some(pkg) => {
                    let root = data::ensure_package(pkg, &env.cache_dir)?;
                    data::inside_package(&root, path)?
                }
                None => PathBuf::from(path),
            };
            if !file.is_file() {
                return Err(Error::input(&file, "GGUF file not found"));
            }
            let dir = crate::gguf::ensure_imported(&file, &env.cache_dir)?;
            load_base(&dir, dev)?
        }
        (Base::Hub { repo, revision }, _) => {
            let dir = crate::hub::resolve(&crate::hub::HubEnv::from_env(), repo, revision.as_deref())?;
            load_base(&dir, dev)?
        }
        (Base::Trial { id }, _) => {
            let dir = env.base_dir.as_ref().ok_or_else(|| {
                Error::input(
                    format!("trial {id}"),
                    "this trial starts from another trial's model, but no base checkpoint dir was given",
                )
            })?;
            load_base(dir, dev)?
        }
    };
    let base_layers = eval::n_layer_of(&*model);
    methods::validate(&cfg.method, cfg.groups, base_layers)?;
    if let Method::Inheritune { blocks } = cfg.method {
        model = model::truncate(&*model, blocks)?;
    }
    if let Some(spec) = methods::lora_spec(&cfg.method, cfg.groups, base_layers)? {
        model.attach_lora(&spec, cfg.seed)?;
    }
    let dims = model.dims();
    let n_positions = dims.max_positions;
    if cfg.data.context > n_positions || cfg.data.context < 2 {
        return Err(Error::Config(format!(
            "data.context = {}: must be between 2 and the model's {} ({n_positions})",
            cfg.data.context,
            model.family().positions_field()
        )));
    }
    if tok.vocab_size() > dims.vocab_size {
        return Err(Error::input(
            &tok_path,
            format!(
                "tokenizer has {} tokens but the model's vocabulary is {}",
                tok.vocab_size(),
                dims.vocab_size
            ),
        ));
    }

    // 2. Data.
    let data = data::prepare(&cfg.data, &tok, &env.cache_dir)?;
    let train_tokens = data.train.capped(cfg.data.max_train_tokens);
    let valid_tokens = data.valid.as_slice();

    // 3. Train.
    let trains = !matches!(cfg.method, Method::Baseline);
    let mut report = None;
    if trains {
        let job = TrainJob {
            model: &*model,
            method: &cfg.method,
            spec: &cfg.train,
            groups: cfg.groups,
            context: cfg.data.context,
            seed: cfg.seed,
            train_tokens,
            valid_tokens,
            out_dir: out,
            stop: &env.stop,
            device: dev,
            run_key: cfg.id(),
            sync: env.sync.as_deref(),
        };
        let r = train::train(&job, on_progress)?;
        if r.stopped {
            return Ok(Outcome::Stopped { step: r.steps });
        }
        if env.sync.as_ref().is_some_and(|s| s.rank() != 0) {
            return Ok(Outcome::RankDone { steps: r.steps });
        }
        report = Some(r);
    }

    // 4. Final evaluation on the whole validation split (or max_valid_windows chunks).
    let (ev, windows) = eval::perplexity_by_window(
        &*model,
        valid_tokens,
        cfg.data.context,
        cfg.train.batch_size.max(1),
        cfg.data.max_valid_windows,
        dev,
    )?;
    on_progress(&Progress::Eval {
        step: report.as_ref().map_or(0, |r| r.steps),
        valid_loss: ev.loss,
    });

    // 5. Model directory for everything that trained.
    if trains {
        let final_dir = out.join("model");
        let tmp = out.join("model.tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        checkpoint::save_hf_dir(&*model, &tmp, Some(&tok_path))?;
        if final_dir.exists() {
            fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
        }
        fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&tmp, e))?;
    }

    // 6. Samples.
    let samples = make_samples(&*model, &tok, cfg.seed)?;
    for (prompt, text) in &samples {
        on_progress(&Progress::Sample {
            prompt: prompt.clone(),
            text: text.clone(),
        });
    }
    let samples_json: Vec<_> = samples
        .iter()
        .map(|(p, t)| serde_json::json!({"prompt": p, "text": t}))
        .collect();
    write_json(
        &out.join("samples.json"),
        &serde_json::Value::Array(samples_json),
    )?;

    // 7. Metrics.
    let trainable_params = train::count_trainable(
        &*model,
        &cfg.method,
        cfg.groups,
        cfg.train.steps.saturating_sub(1),
    )?;
    let finite = windows.nll.iter().all(|x| x.is_finite());
    let metrics = TrialMetrics {
        perplexity: ev.perplexity,
        valid_loss: ev.loss,
        valid_tokens: ev.tokens,
        train_tokens: report.as_ref().map_or(0, |r| r.train_tokens),
        steps: report.as_ref().map_or(0, |r| r.steps),
        trainable_params,
        // The saved model's size: a LoRA trial's adapters are merged into it, so they are not
        // counted twice (its `trainable_params` are the adapters).
        total_params: model
            .params()
            .iter()
            .filter(|p| !matches!(p.part, model::Part::Adapter(_)))
            .map(|p| p.var.elem_count() as u64)
            .sum(),
        final_train_loss: report.as_ref().and_then(|r| r.final_loss()),
        // Includes training done by earlier (stopped or preempted) attempts.
        wall_seconds: started.elapsed().as_secs_f64()
            + report.as_ref().map_or(0.0, |r| r.prior_wall_s),
        environment: environment(&env.device),
        // For the report's paired intervals; left out when not finite (JSON has no NaN, and
        // such a trial has no meaningful interval anyway).
        valid_window_nll: if finite { windows.nll } else { Vec::new() },
        valid_window_tokens: if finite { windows.tokens } else { Vec::new() },
        train_seconds: report.as_ref().map(|r| r.wall_s),
        peak_memory_bytes: peak.and_then(|p| p.peak_bytes()),
    };
    write_json(&out.join("metrics.json"), &metrics)?;
    Ok(Outcome::Finished(metrics))
}

/// Peak resident memory of this process during one trial, for the report's cost table.
///
/// Linux keeps the peak resident set (`VmHWM` in `/proc/self/status`) for the life of the
/// process, and a worker runs many trials; writing `5` to `/proc/self/clear_refs` (Linux 4.0+)
/// resets it to the current resident set, so the value read at the end is this trial's peak.
/// Where the reset is refused (another OS, a locked-down /proc) nothing is reported rather than
/// a figure that would include earlier trials. GPU memory is not measured here.
pub struct PeakMemory {
    reset: bool,
}

impl PeakMemory {
    pub fn start() -> PeakMemory {
        PeakMemory {
            reset: fs::write("/proc/self/clear_refs", "5").is_ok(),
        }
    }

    /// Peak resident bytes since [`PeakMemory::start`], if it could be measured.
    pub fn peak_bytes(&self) -> Option<u64> {
        if !self.reset {
            return None;
        }
        let status = fs::read_to_string("/proc/self/status").ok()?;
        parse_vm_hwm(&status)
    }
}

/// `VmHWM:   123456 kB` → bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut parts = line["VmHWM:".len()..].split_whitespace();
    let kb: u64 = parts.next()?.parse().ok()?;
    (parts.next() == Some("kB")).then_some(kb * 1024)
}

/// The candle-core version the workspace pins (`Cargo.toml`); a test checks `Cargo.lock` agrees.
pub const CANDLE_VERSION: &str = "0.11.1";

/// What a report needs to say where a trial ran, so numbers from different builds or devices
/// are not compared unknowingly: ablate and candle versions, OS, CPU architecture (with the SIMD
/// level the kernels use), the device and the compute threads.
pub fn environment(device: &Device) -> std::collections::BTreeMap<String, String> {
    let mut env = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: String| {
        env.insert(k.to_string(), v);
    };
    put("ablate", env!("CARGO_PKG_VERSION").to_string());
    put("candle", CANDLE_VERSION.to_string());
    put("os", std::env::consts::OS.to_string());
    let mut arch = std::env::consts::ARCH.to_string();
    #[cfg(target_arch = "x86_64")]
    for (feature, on) in [
        ("avx2", std::is_x86_feature_detected!("avx2")),
        ("avx512f", std::is_x86_feature_detected!("avx512f")),
    ] {
        if on {
            arch.push('+');
            arch.push_str(feature);
        }
    }
    put("arch", arch);
    put(
        "device",
        match device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            other => format!("{other:?}"),
        },
    );
    put("threads", candle_core::utils::get_num_threads().to_string());
    env
}

/// Reads a trial file: a [`TrialConfig`] serialised as TOML (what `ablate-worker train --trial`
/// takes). A syntax or schema error is an [`Error::Spec`] with the file, line and column; the
/// parsing itself is the sweep module's ([`crate::spec::load_trial_file`]).
pub fn read_trial_file(path: &Path) -> Result<TrialConfig> {
    crate::spec::load_trial_file(path)
}

/// Loads a Hugging Face model directory of any supported family (config.json's `model_type`)
/// and its tokenizer.json.
pub fn load_base(dir: &Path, dev: &Device) -> Result<(Box<dyn CausalLm>, Tok, PathBuf)> {
    let model = checkpoint::load_hf_dir(dir, None, dev)?;
    let tok_path = dir.join("tokenizer.json");
    let tok = Tok::load(&tok_path)?;
    Ok((model, tok, tok_path))
}

/// The tokens that end a generation: the model config's `eos_token_id` (one or several) when it
/// names any, else the tokenizer's `<|endoftext|>`.
pub fn stop_tokens(model: &dyn CausalLm, tok: &Tok) -> Vec<u32> {
    let eos = model.eos_token_ids();
    if eos.is_empty() {
        tok.eot_id().into_iter().collect()
    } else {
        eos
    }
}

/// Seeded top-k 40 / top-p 0.9 generations of ~40 tokens from [`SAMPLE_PROMPTS`].
pub fn make_samples(model: &dyn CausalLm, tok: &Tok, seed: u64) -> Result<Vec<(String, String)>> {
    let stops = stop_tokens(model, tok);
    let mut out = Vec::new();
    for (i, prompt) in SAMPLE_PROMPTS.iter().enumerate() {
        let ids = tok.encode(prompt)?;
        if ids.is_empty() {
            continue;
        }
        let opts = SampleOpts {
            max_new_tokens: 40,
            temperature: 1.0,
            top_k: Some(40),
            top_p: Some(0.9),
            seed: seed.wrapping_add(i as u64),
        };
        let gen = sample::generate(model, &ids, &opts, &stops)?;
        out.push((prompt.to_string(), tok.decode(&gen)?));
    }
    Ok(out)
}

/// Trains (or reuses from `cache_dir/tokenizers/<hash>/tokenizer.json`) the byte-level BPE of a
/// pretrain trial, on the training documents only, so validation text never shapes the vocabulary.
fn pretrain_tokenizer(
    cfg: &TrialConfig,
    vocab_size: usize,
    cache_dir: &Path,
) -> Result<(Tok, PathBuf)> {
    let files = data::resolve_corpus(&cfg.data.train, cache_dir)?;
    let mut h = Sha256::new();
    h.update(b"ablate-bpe-v1\0");
    h.update((vocab_size as u64).to_le_bytes());
    h.update(serde_json::to_vec(&cfg.data.train.documents).unwrap_or_default());
    let separate_valid = cfg.data.valid.is_some();
    h.update([separate_valid as u8]);
    h.update(cfg.data.valid_fraction.to_bits().to_le_bytes());
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        let bytes = fs::read(f).map_err(|e| Error::io(f, e))?;
        h.update(Sha256::digest(&bytes));
    }
    let key = hex::encode(&h.finalize()[..16]);
    let dir = cache_dir.join("tokenizers").join(&key);
    let path = dir.join("tokenizer.json");
    if path.is_file() {
        if let Ok(tok) = Tok::load(&path) {
            return Ok((tok, path));
        }
    }
    let docs = data::load_documents(&files, &cfg.data.train.documents)?;
    let docs = if separate_valid {
        docs
    } else {
        data::split_documents(docs, cfg.data.valid_fraction).0
    };
    let tok = Tok::train_bpe(&docs, vocab_size)?;
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    // Private temp name then rename: concurrent workers training the same tokenizer are harmless.
    let tmp = dir.join(format!(".tokenizer.json.tmp-{}", std::process::id()));
    tok.save(&tmp)?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    Ok((tok, path))
}

fn write_json<T: serde::Serialize>(path: &Path, v: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| Error::Other(e.to_string()))?;
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_memory_follows_an_allocation_after_the_reset() {
        assert_eq!(
            parse_vm_hwm("Name:\tx\nVmHWM:\t  2048 kB\nVmRSS: 1 kB\n"),
            Some(2 << 20)
        );
        assert_eq!(parse_vm_hwm("VmHWM: 12 MB\n"), None);
        if !cfg!(target_os = "linux") {
            return;
        }
        let p = PeakMemory::start();
        let before = p.peak_bytes().expect("linux resets and reads VmHWM");
        // Touch 64 MiB so it becomes resident, then free it: the peak stays up.
        let mut v = vec![0u8; 64 << 20];
        for i in (0..v.len()).step_by(4096) {
            v[i] = 1;
        }
        std::hint::black_box(&v);
        drop(v);
        let after = p.peak_bytes().unwrap();
        // (Other tests run in this process too and can only raise the peak further.)
        assert!(after >= before + (60 << 20), "peak {before} -> {after}");
    }

    #[test]
    fn candle_version_matches_the_lock_file() {
        let lock = include_str!("../../Cargo.lock");
        let entry = format!("name = \"candle-core\"\nversion = \"{CANDLE_VERSION}\"");
        assert!(lock.contains(&entry), "Cargo.lock has no {entry:?}");
    }

    #[test]
    fn environment_names_versions_and_device() {
        let env = environment(&Device::Cpu);
        assert_eq!(env["candle"], CANDLE_VERSION);
        assert_eq!(env["ablate"], env!("CARGO_PKG_VERSION"));
        assert_eq!(env["device"], "cpu");
        assert!(env["threads"].parse::<usize>().unwrap() >= 1);
        assert!(env["arch"].starts_with(std::env::consts::ARCH));
    }

    #[test]
    fn device_allocation_failures_are_out_of_memory() {
        let e = classify_oom(Error::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        )));
        assert!(matches!(e, Error::OutOfMemory(_)), "{e}");
        assert_eq!(e.reason(), "out_of_memory");
        let e = classify_oom(Error::Candle(candle_core::Error::Msg(
            "shape mismatch".into(),
        )));
        assert!(matches!(e, Error::Candle(_)));
    }

    #[test]
    fn trial_file_errors_carry_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        fs::write(
            &p,
            "name = \"x\"\ngroups = 4\nseed = 0\n\n[method]\nkind = \"shrink\"\n",
        )
        .unwrap();
        let e = read_trial_file(&p).unwrap_err();
        match &e {
            Error::Spec { file, line, .. } => {
                assert!(file.ends_with("t.toml"));
                assert_eq!(*line, 6, "{e}");
            }
            other => panic!("expected a spec error, got {other}"),
        }
        assert!(e.to_string().contains("shrink"), "{e}");
        let e = read_trial_file(&dir.path().join("missing.toml")).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
    }
}
