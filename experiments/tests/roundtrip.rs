//! Checkpoints out and back in: `save_hf_dir` output loads in Hugging Face transformers with the
//! same logits (via `scripts/roundtrip_check.py`), loads back into ablate bit for bit, and every
//! malformed input directory gives an `Error::Input` that names the file and the field or tensor.
//!
//! The transformers tests need the reference Python env (`bash scripts/pyenv.sh`). The interpreter
//! is `$ABLATE_PYTHON`, else `${ABLATE_PYENV:-$HOME/.cache/ablate/pyenv}/bin/python`. Without it
//! they print a SKIP line and pass, except when `CI` is set: CI installs the env first, so a
//! missing interpreter there is a failure, not a silent skip.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Tensor};
use experiments::checkpoint::{load_hf_dir, read_config, save_hf_dir};
use experiments::model::{Gpt2, Gpt2Config};
use experiments::Error;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

/// The reference interpreter, or None (after printing why) when the test should be skipped.
fn python(test: &str) -> Option<PathBuf> {
    let py = match std::env::var_os("ABLATE_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => {
            let venv = std::env::var_os("ABLATE_PYENV")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/ablate/pyenv")
                });
            venv.join("bin/python")
        }
    };
    let ok = Command::new(&py)
        .args(["-c", "import torch, transformers"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Some(py);
    }
    let why = format!(
        "{test}: no Python with torch + transformers at {} (run `bash scripts/pyenv.sh`, or set ABLATE_PYTHON)",
        py.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("CI is set, so the transformers reference must run: {why}");
    }
    println!("SKIP {why}");
    None
}

/// Logits transformers computes for `ids` from the checkpoint in `dir`.
fn transformers_logits(py: &Path, dir: &Path, ids: &[Vec<u32>]) -> (Vec<f32>, Value) {
    let mut child = Command::new(py)
        .arg(root().join("scripts/roundtrip_check.py"))
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start roundtrip_check.py");
    let req = serde_json::json!({ "ids": ids });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "roundtrip_check.py failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON from roundtrip_check.py");
    let flat = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b.as_array().unwrap().iter())
        .flat_map(|t| t.as_array().unwrap().iter())
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (flat, v)
}

fn our_logits(model: &Gpt2, ids: &[Vec<u32>]) -> Vec<f32> {
    let t = Tensor::from_vec(ids.concat(), (ids.len(), ids[0].len()), model.device()).unwrap();
    model
        .forward(&t)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn ids_for(vocab: usize, b: usize, t: usize) -> Vec<Vec<u32>> {
    (0..b)
        .map(|r| {
            (0..t)
                .map(|i| ((i * 37 + r * 101 + 5) % vocab) as u32)
                .collect()
        })
        .collect()
}

/// Replaces GPT-2's small init with O(1)-activation weights (as the parity fixture does), so that
/// a transposed or swapped tensor would move the logits far beyond the tolerance.
fn spread_weights(model: &Gpt2) {
    for (i, (name, var)) in model.named_vars().into_iter().enumerate() {
        let shape = var.dims().to_vec();
        let n: usize = shape.iter().product();
        let u: Vec<f32> = (0..n)
            .map(|j| (((j * 7919 + i * 104729) % 2003) as f32 / 1001.5) - 1.0)
            .collect();
        let (scale, offset) = if name.contains("ln_") && name.ends_with("weight") {
            (0.3, 1.0)
        } else if name.ends_with(".bias") {
            (0.2, 0.0)
        } else if name.starts_with("wte") || name.starts_with("wpe") {
            (0.5, 0.0)
        } else {
            (1.7 / (*shape.last().unwrap() as f32).sqrt(), 0.0)
        };
        let v: Vec<f32> = u.iter().map(|x| x * scale + offset).collect();
        var.set(&Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
            .unwrap();
    }
}

#[test]
fn random_model_round_trips_through_transformers() {
    let Some(py) = python("random_model_round_trips_through_transformers") else {
        return;
    };
    let cfg = Gpt2Config::preset("tiny").unwrap();
    let model = Gpt2::new_random(&cfg, 17, &Device::Cpu).unwrap();
    spread_weights(&model);
    let dir = tempfile::tempdir().unwrap();
    save_hf_dir(&model, dir.path(), None).unwrap();
    let ids = ids_for(cfg.vocab_size, 2, 40);
    let (theirs, _) = transformers_logits(&py, dir.path(), &ids);
    let ours = our_logits(&model, &ids);
    let d = max_abs_diff(&ours, &theirs);
    let spread = ours.iter().map(|x| x.abs()).fold(0.0, f32::max);
    println!(
        "random tiny model via transformers: max |logit diff| {d:.3e} (max |logit| {spread:.2})"
    );
    assert!(
        spread > 1.0,
        "test weights too small to catch layout errors"
    );
    assert!(d < 1e-4, "max abs logit diff {d}");
}

#[test]
fn loaded_fixture_round_trips_through_transformers() {
    let Some(py) = python("loaded_fixture_round_trips_through_transformers") else {
        return;
    };
    let model = load_hf_dir(&fixture(), None, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_hf_dir(&model, dir.path(), Some(&fixture().join("tokenizer.json"))).unwrap();
    let ids = ids_for(model.config().vocab_size, 3, 64);
    let (theirs, v) = transformers_logits(&py, dir.path(), &ids);
    let d = max_abs_diff(&our_logits(&model, &ids), &theirs);
    println!(
        "fixture saved by ablate via transformers {}: max |logit diff| {d:.3e}",
        v["transformers"]
    );
    assert!(d < 1e-4, "max abs logit diff {d}");
    // The copied tokenizer loads in transformers too.
    assert_eq!(
        v["tokenizer_vocab"].as_u64(),
        Some(model.config().vocab_size as u64)
    );
}

#[test]
fn save_then_load_is_exact() {
    let model = load_hf_dir(&fixture(), None, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_hf_dir(&model, dir.path(), Some(&fixture().join("tokenizer.json"))).unwrap();
    assert_eq!(read_config(dir.path()).unwrap(), *model.config());
    let back = load_hf_dir(dir.path(), None, &Device::Cpu).unwrap();
    for ((n, a), (m, b)) in model.named_vars().iter().zip(back.named_vars().iter()) {
        assert_eq!(n, m);
        let d = (a.as_tensor() - b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{n}");
    }
    // Tensors are stored the way transformers writes them: prefixed, Conv1D [in, out], no lm_head.
    let st =
        candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let c = model.config().n_embd;
    assert_eq!(st["transformer.h.0.attn.c_attn.weight"].dims(), &[c, 3 * c]);
    assert_eq!(st["transformer.h.1.mlp.c_proj.weight"].dims(), &[4 * c, c]);
    assert!(!st.contains_key("lm_head.weight"));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(
        config["eos_token_id"], 0,
        "<|endoftext|> is id 0 in the fixture tokenizer"
    );
    assert!(dir.path().join("tokenizer.json").is_file());
    assert!(!dir.path().join("model.tmp").exists());
}

// ---- malformed inputs -------------------------------------------------------------------------

/// A private copy of the fixture directory to break.
fn broken_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// Asserts `Error::Input` on `file` whose message mentions every one of `words`.
fn expect_input_error(dir: &Path, file: &str, words: &[&str]) {
    let err = match load_hf_dir(dir, None, &Device::Cpu) {
        Ok(_) => panic!("loading should fail (expected an error about {file}: {words:?})"),
        Err(e) => e,
    };
    let shown = err.to_string();
    match &err {
        Error::Input { path, msg } => {
            assert_eq!(
                path.file_name().unwrap(),
                file,
                "error names the wrong file: {shown}"
            );
            for w in words {
                assert!(msg.contains(w), "error {shown:?} should mention {w:?}");
            }
        }
        other => panic!("expected Error::Input, got {other:?}"),
    }
    assert!(shown.contains(file), "{shown}");
    assert!(err.is_deterministic());
}

fn rewrite_weights(dir: &Path, f: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut st = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    f(&mut st);
    candle_core::safetensors::save(&st, &path).unwrap();
}

#[test]
fn missing_config_is_named() {
    let dir = broken_copy();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    expect_input_error(dir.path(), "config.json", &["missing"]);
}

#[test]
fn malformed_config_is_named() {
    let dir = broken_copy();
    std::fs::write(dir.path().join("config.json"), "{\"n_embd\": 48,").unwrap();
    expect_input_error(dir.path(), "config.json", &["malformed JSON", "line 1"]);

    let text = std::fs::read_to_string(fixture().join("config.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v.as_object_mut().unwrap().remove("n_head");
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    expect_input_error(dir.path(), "config.json", &["n_head"]);

    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["n_embd"] = Value::from("wide");
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    expect_input_error(dir.path(), "config.json", &["n_embd"]);

    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["activation_function"] = Value::from("relu");
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    expect_input_error(dir.path(), "config.json", &["activation_function"]);
}

#[test]
fn wrong_shape_is_named() {
    let dir = broken_copy();
    rewrite_weights(dir.path(), |st| {
        // Stored [out, in] instead of Conv1D [in, out]: the usual hand-conversion mistake.
        let w = st["transformer.h.1.attn.c_attn.weight"]
            .t()
            .unwrap()
            .contiguous()
            .unwrap();
        st.insert("transformer.h.1.attn.c_attn.weight".into(), w);
    });
    expect_input_error(
        dir.path(),
        "model.safetensors",
        &[
            "transformer.h.1.attn.c_attn.weight",
            "shape",
            "[144, 48]",
            "expected [48, 144]",
        ],
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = broken_copy();
    rewrite_weights(dir.path(), |st| {
        st.remove("transformer.ln_f.bias");
    });
    expect_input_error(
        dir.path(),
        "model.safetensors",
        &["missing tensor", "ln_f.bias"],
    );
}

#[test]
fn wrong_dtype_is_named() {
    let dir = broken_copy();
    rewrite_weights(dir.path(), |st| {
        let w = st["transformer.wpe.weight"].to_dtype(DType::I64).unwrap();
        st.insert("transformer.wpe.weight".into(), w);
    });
    expect_input_error(
        dir.path(),
        "model.safetensors",
        &["transformer.wpe.weight", "dtype", "I64"],
    );
}

#[test]
fn missing_or_corrupt_weights_are_named() {
    let dir = broken_copy();
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .unwrap();
    expect_input_error(
        dir.path(),
        "model.safetensors",
        &["not a valid safetensors file"],
    );
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    expect_input_error(dir.path(), "model.safetensors", &["missing"]);
}

#[test]
fn unprefixed_names_and_half_precision_load() {
    // GPT2Model checkpoints have no "transformer." prefix; some are stored in f16.
    let dir = broken_copy();
    rewrite_weights(dir.path(), |st| {
        let old: Vec<(String, Tensor)> = st.drain().collect();
        for (k, v) in old {
            let k = k.strip_prefix("transformer.").unwrap_or(&k).to_string();
            st.insert(k, v.to_dtype(DType::F16).unwrap());
        }
    });
    let half = load_hf_dir(dir.path(), None, &Device::Cpu).unwrap();
    let full = load_hf_dir(&fixture(), None, &Device::Cpu).unwrap();
    let ids = ids_for(full.config().vocab_size, 1, 16);
    let d = max_abs_diff(&our_logits(&half, &ids), &our_logits(&full, &ids));
    assert!(d < 0.1, "f16 weights give logits {d} away");
}
