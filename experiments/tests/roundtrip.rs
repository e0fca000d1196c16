//! Checkpoints out and back in, for both model families: `save_hf_dir` output loads in Hugging
//! Face transformers (`AutoModelForCausalLM`, so config.json decides the class) with the same
//! logits (via `scripts/roundtrip_check.py`), loads back into ablate bit for bit, and every
//! malformed input directory gives an `Error::Input` that names the file and the field or tensor.
//! The Llama cases cover tied and untied heads, grouped-query attention and every RoPE type
//! (default, linear, llama3), sharded weights and the unsupported settings that must be refused.
//!
//! The transformers tests need the reference Python env (`bash scripts/pyenv.sh`). The interpreter
//! is `$ABLATE_PYTHON`, else `${ABLATE_PYENV:-$HOME/.cache/ablate/pyenv}/bin/python`. Without it
//! they fail, naming the command that makes it (scripts/test runs it first); they never pass
//! without checking.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Tensor};
use experiments::checkpoint::{load_gpt2_dir, load_hf_dir, read_config, save_hf_dir};
use experiments::model::{
    CausalLm, Gpt2, Gpt2Config, Llama, LlamaConfig, ModelConfig, RopeScaling,
};
use experiments::Error;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gpt2")
}

fn python() -> PathBuf {
    crate::common::reference_python(&["torch", "transformers"])
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

fn our_logits(model: &dyn CausalLm, ids: &[Vec<u32>]) -> Vec<f32> {
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

/// Replaces the small init with O(1)-activation weights (as the parity fixtures do), so that a
/// transposed or swapped tensor would move the logits far beyond the tolerance.
fn spread_weights(model: &dyn CausalLm) {
    for (i, (name, var)) in model.named_vars().into_iter().enumerate() {
        let shape = var.dims().to_vec();
        let n: usize = shape.iter().product();
        let u: Vec<f32> = (0..n)
            .map(|j| (((j * 7919 + i * 104729) % 2003) as f32 / 1001.5) - 1.0)
            .collect();
        let (scale, offset) =
            if (name.contains("ln_") || name.contains("norm")) && name.ends_with("weight") {
                (0.3, 1.0)
            } else if name.ends_with(".bias") {
                (0.2, 0.0)
            } else if name.starts_with("wte")
                || name.starts_with("wpe")
                || name.contains("embed_tokens")
            {
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
    let py = python();
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
    let py = python();
    let model = load_gpt2_dir(&fixture(), None, &Device::Cpu).unwrap();
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
    let model = load_gpt2_dir(&fixture(), None, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_hf_dir(&model, dir.path(), Some(&fixture().join("tokenizer.json"))).unwrap();
    assert_eq!(
        read_config(dir.path()).unwrap(),
        ModelConfig::Gpt2(model.config().clone())
    );
    let back = load_gpt2_dir(dir.path(), None, &Device::Cpu).unwrap();
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
    let half = load_gpt2_dir(dir.path(), None, &Device::Cpu).unwrap();
    let full = load_gpt2_dir(&fixture(), None, &Device::Cpu).unwrap();
    let ids = ids_for(full.config().vocab_size, 1, 16);
    let d = max_abs_diff(&our_logits(&half, &ids), &our_logits(&full, &ids));
    assert!(d < 0.1, "f16 weights give logits {d} away");
}

// ---- Llama ------------------------------------------------------------------------------------

fn llama_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// A random tiny Llama (2 blocks, hidden 64, 4 heads / 2 KV heads) with `tied` and `rope`.
fn tiny_llama(tied: bool, rope: RopeScaling, seed: u64) -> Llama {
    let cfg = LlamaConfig {
        tie_word_embeddings: tied,
        rope_scaling: rope,
        ..LlamaConfig::preset("tiny-llama").unwrap()
    };
    let m = Llama::new_random(&cfg, seed, &Device::Cpu).unwrap();
    spread_weights(&m);
    m
}

/// Saves `model`, loads it in transformers, and returns the worst logit difference.
fn llama_via_transformers(py: &Path, model: &Llama, what: &str) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    save_hf_dir(model, dir.path(), None).unwrap();
    let ids = ids_for(model.config().vocab_size, 2, 100);
    let (theirs, v) = transformers_logits(py, dir.path(), &ids);
    assert_eq!(v["model_class"], "LlamaForCausalLM", "{what}");
    assert_eq!(v["tied"], model.config().tie_word_embeddings, "{what}");
    let ours = our_logits(model, &ids);
    let d = max_abs_diff(&ours, &theirs);
    let spread = ours.iter().map(|x| x.abs()).fold(0.0, f32::max);
    println!(
        "{what} via transformers {}: max |logit diff| {d:.3e} (max |logit| {spread:.2}), rope {}",
        v["transformers"], v["rope_parameters"]
    );
    assert!(
        spread > 1.0,
        "{what}: test weights too small to catch layout errors"
    );
    assert!(d < 1e-4, "{what}: max abs logit diff {d}");
    // Reloading what ablate wrote gives the same config.
    assert_eq!(
        read_config(dir.path()).unwrap(),
        ModelConfig::Llama(model.config().clone()),
        "{what}"
    );
    d
}

#[test]
fn random_llamas_round_trip_through_transformers() {
    let py = python();
    llama_via_transformers(
        &py,
        &tiny_llama(true, RopeScaling::None, 1),
        "tied, default rope",
    );
    llama_via_transformers(
        &py,
        &tiny_llama(false, RopeScaling::Linear { factor: 2.5 }, 2),
        "untied, linear rope",
    );
    llama_via_transformers(
        &py,
        &tiny_llama(
            true,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 32,
            },
            3,
        ),
        "tied, llama3 rope",
    );
}

#[test]
fn loaded_llama_fixture_round_trips_through_transformers() {
    let py = python();
    let model = load_hf_dir(&llama_fixture(), None, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_hf_dir(
        &*model,
        dir.path(),
        Some(&llama_fixture().join("tokenizer.json")),
    )
    .unwrap();
    let ids = ids_for(model.dims().vocab_size, 3, 64);
    let (theirs, v) = transformers_logits(&py, dir.path(), &ids);
    let d = max_abs_diff(&our_logits(&*model, &ids), &theirs);
    println!(
        "Llama fixture saved by ablate via transformers {}: max |logit diff| {d:.3e}",
        v["transformers"]
    );
    assert!(d < 1e-4, "max abs logit diff {d}");
    assert_eq!(v["tied"], false);
    // The copied tokenizer loads in transformers too (420 tokens, below the model's 512).
    assert_eq!(v["tokenizer_vocab"].as_u64(), Some(420));
    let tc: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        tc["eos_token"], "<|im_end|>",
        "eos id 2 of the config, by name"
    );
    assert_eq!(tc["bos_token"], "<|im_start|>");
}

#[test]
fn llama_save_then_load_is_exact_and_stored_as_transformers_does() {
    for tied in [true, false] {
        let model = tiny_llama(tied, RopeScaling::Linear { factor: 2.0 }, 9);
        let dir = tempfile::tempdir().unwrap();
        save_hf_dir(&model, dir.path(), None).unwrap();
        let back = experiments::checkpoint::load_llama_dir(dir.path(), None, &Device::Cpu).unwrap();
        assert_eq!(back.config(), model.config());
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
        let st = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu)
            .unwrap();
        // nn.Linear [out, in]: q is [heads·head_dim, hidden], k [kv_heads·head_dim, hidden].
        assert_eq!(
            st["model.layers.0.self_attn.q_proj.weight"].dims(),
            &[64, 64]
        );
        assert_eq!(
            st["model.layers.0.self_attn.k_proj.weight"].dims(),
            &[32, 64]
        );
        assert_eq!(st["model.layers.1.mlp.down_proj.weight"].dims(), &[64, 128]);
        assert_eq!(st.contains_key("lm_head.weight"), !tied, "tied = {tied}");
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["model_type"], "llama");
        assert_eq!(config["architectures"][0], "LlamaForCausalLM");
        assert_eq!(config["tie_word_embeddings"], tied);
        assert_eq!(config["num_key_value_heads"], 2);
        assert_eq!(config["rope_parameters"]["rope_type"], "linear");
        assert_eq!(config["eos_token_id"], 2);
    }
}

#[test]
fn sharded_llama_weights_load_like_one_file() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(llama_fixture().join(f), dir.path().join(f)).unwrap();
    }
    let all =
        candle_core::safetensors::load(llama_fixture().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    // Two shards: block 1 and the head in the second, everything else in the first.
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (k, v) in all {
        let second = k.starts_with("model.layers.1.") || k == "lm_head.weight";
        let file = if second {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        map.insert(k.clone(), Value::from(file));
        if second {
            b.insert(k, v);
        } else {
            a.insert(k, v);
        }
    }
    candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = load_hf_dir(dir.path(), None, &Device::Cpu).unwrap();
    let single = load_hf_dir(&llama_fixture(), None, &Device::Cpu).unwrap();
    let ids = ids_for(512, 1, 20);
    assert_eq!(our_logits(&*sharded, &ids), our_logits(&*single, &ids));
    // A shard that went missing is named.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = match load_hf_dir(dir.path(), None, &Device::Cpu) {
        Ok(_) => panic!("a missing shard must fail"),
        Err(e) => e,
    };
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

/// A private copy of the Llama fixture with its config.json edited by `f`.
fn llama_with_config(f: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(llama_fixture().join(name), dir.path().join(name)).unwrap();
    }
    let text = std::fs::read_to_string(llama_fixture().join("config.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    f(&mut v);
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    dir
}

/// Edits the Llama fixture's config.json with `edit` and expects the load to fail naming
/// config.json and every one of `words`.
fn refused(edit: impl FnOnce(&mut Value), words: &[&str]) {
    let dir = llama_with_config(edit);
    expect_input_error(dir.path(), "config.json", words);
}

#[test]
fn unsupported_llama_settings_are_refused_by_name() {
    refused(
        |v| v["attention_bias"] = Value::Bool(true),
        &["attention_bias"],
    );
    refused(|v| v["mlp_bias"] = Value::Bool(true), &["mlp_bias"]);
    refused(
        |v| v["hidden_act"] = Value::from("gelu"),
        &["hidden_act", "silu"],
    );
    refused(
        |v| v["rope_parameters"]["rope_type"] = Value::from("yarn"),
        &["rope_parameters.rope_type", "yarn"],
    );
    refused(
        |v| {
            v["rope_parameters"]
                .as_object_mut()
                .unwrap()
                .remove("factor");
        },
        &["rope_parameters.factor"],
    );
    refused(
        |v| v["num_key_value_heads"] = Value::from(3),
        &["num_key_value_heads 3"],
    );
    refused(
        |v| v["model_type"] = Value::from("mistral"),
        &["model_type", "mistral"],
    );
    refused(
        |v| {
            v.as_object_mut().unwrap().remove("intermediate_size");
        },
        &["intermediate_size"],
    );
    refused(
        |v| v["partial_rotary_factor"] = Value::from(0.5),
        &["partial_rotary_factor"],
    );
}

#[test]
fn legacy_rope_scaling_and_defaults_read_like_transformers() {
    // transformers 4's form: rope_theta at the top, rope_scaling with "type"; no head_dim, no
    // num_key_value_heads (= the attention heads), no rms_norm_eps (1e-6), no tie flag (untied).
    let dir = tempfile::tempdir().unwrap();
    let v = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "rope_theta": 500000.0,
        "rope_scaling": {"type": "linear", "factor": 4.0},
        "eos_token_id": [7, 8],
    });
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let cfg = match read_config(dir.path()).unwrap() {
        ModelConfig::Llama(c) => c,
        other => panic!("architectures says Llama, got {other:?}"),
    };
    assert_eq!(cfg.rope_theta, 500000.0);
    assert_eq!(cfg.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    assert_eq!((cfg.num_key_value_heads, cfg.head_dim), (4, 8));
    assert_eq!(cfg.rms_norm_eps, 1e-6);
    assert_eq!(cfg.max_position_embeddings, 2048);
    assert!(!cfg.tie_word_embeddings);
    assert_eq!(cfg.eos_token_id, vec![7, 8]);
}

#[test]
fn missing_llama_head_is_named() {
    let dir = llama_with_config(|_| {});
    rewrite_weights(dir.path(), |st| {
        st.remove("lm_head.weight");
    });
    expect_input_error(
        dir.path(),
        "model.safetensors",
        &["missing tensor", "lm_head.weight"],
    );
    // Declared tied, the same file loads: the embeddings are the head.
    let dir2 = llama_with_config(|v| v["tie_word_embeddings"] = Value::Bool(true));
    rewrite_weights(dir2.path(), |st| {
        st.remove("lm_head.weight");
    });
    let m = load_hf_dir(dir2.path(), None, &Device::Cpu).unwrap();
    assert!(m.params().iter().all(|p| p.name != "lm_head.weight"));
}

// ---- LoRA adapters through PEFT ----------------------------------------------------------------

/// Output of scripts/peft_check.py for `base` and a LoRA trial's `dir`.
fn peft_check(py: &Path, base: &Path, dir: &Path, ids: &[Vec<u32>]) -> Value {
    let mut child = Command::new(py)
        .arg(root().join("scripts/peft_check.py"))
        .arg(base)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start peft_check.py");
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
        "peft_check.py failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from peft_check.py")
}

fn flat(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|b| b.as_array().unwrap().iter())
        .flat_map(|t| t.as_array().unwrap().iter())
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Attaches adapters for `method` to the model in `base`, gives them non-zero values (B starts at
/// zero), saves, and has PEFT load the adapter onto the base: the same logits and perplexity as
/// ablate's forward with the adapters, as the merged directory in transformers, and as PEFT's own
/// merge.
fn lora_round_trip(base: &Path, method: experiments::trial::Method, groups: usize, what: &str) {
    use experiments::methods;
    use experiments::model::Part;
    let py = crate::common::reference_python(&["torch", "transformers", "peft"]);
    let mut model = load_hf_dir(base, None, &Device::Cpu).unwrap();
    let n_layer = model.dims().n_layer;
    let spec = methods::lora_spec(&method, groups, n_layer)
        .unwrap()
        .unwrap();
    model.attach_lora(&spec, 11).unwrap();
    for (i, p) in model.params().into_iter().enumerate() {
        if matches!(p.part, Part::Adapter(_)) && p.name.contains("lora_B") {
            let n = p.var.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|j| ((((j * 7919 + i * 104729) % 2003) as f32 / 1001.5) - 1.0) * 0.5)
                .collect();
            p.var
                .set(&Tensor::from_vec(v, p.var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let adapters = model.lora().unwrap().adapters().len();
    let dir = tempfile::tempdir().unwrap();
    save_hf_dir(&*model, dir.path(), Some(&base.join("tokenizer.json"))).unwrap();
    let cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"].as_u64(), Some(spec.rank as u64));
    let ids = ids_for(model.dims().vocab_size, 2, 24);
    let v = peft_check(&py, base, dir.path(), &ids);
    let ours = our_logits(&*model, &ids);
    let base_logits = our_logits(&*load_hf_dir(base, None, &Device::Cpu).unwrap(), &ids);
    let moved = max_abs_diff(&ours, &base_logits);
    let d_adapter = max_abs_diff(&ours, &flat(&v["adapter_logits"]));
    let d_merged = max_abs_diff(&ours, &flat(&v["merged_logits"]));
    let d_peft_merged = max_abs_diff(&ours, &flat(&v["peft_merged_logits"]));
    let (pa, pm) = (
        v["adapter_ppl"].as_f64().unwrap(),
        v["merged_ppl"].as_f64().unwrap(),
    );
    println!(
        "{what}: PEFT {} placed {} LoRA layers; max |logit diff| adapter {d_adapter:.2e}, merged \
         {d_merged:.2e}, PEFT-merged {d_peft_merged:.2e} (the adapters move logits by {moved:.2}); \
         perplexity {pa:.6} vs {pm:.6}",
        v["peft"], v["lora_modules"]
    );
    assert!(moved > 0.05, "{what}: the adapters barely change the model");
    assert_eq!(v["lora_modules"].as_u64(), Some(adapters as u64), "{what}");
    let ours_trainable: usize = model
        .params()
        .iter()
        .filter(|p| matches!(p.part, Part::Adapter(_)))
        .map(|p| p.var.elem_count())
        .sum();
    assert_eq!(v["trainable"].as_u64(), Some(ours_trainable as u64));
    for (d, which) in [
        (d_adapter, "adapter"),
        (d_merged, "merged"),
        (d_peft_merged, "PEFT-merged"),
    ] {
        assert!(d < 1e-4, "{what}: {which} logits differ by {d}");
    }
    assert!(
        (pa - pm).abs() < 1e-5 * pa,
        "{what}: perplexity {pa} vs {pm}"
    );
}

#[test]
fn gpt2_lora_adapter_loads_in_peft_with_the_same_logits() {
    use experiments::trial::{LoraTarget, Method};
    let all = Method::Lora {
        rank: 4,
        alpha: 8.0,
        targets: vec![LoraTarget::Attn, LoraTarget::Mlp],
        groups: None,
    };
    lora_round_trip(&fixture(), all, 3, "gpt2 lora r4 attn+mlp");
    // Attention only, top block group only: the qualified `attn.c_proj` target and
    // layers_to_transform must keep PEFT off the MLP's c_proj and off block 0.
    let attn_top = Method::Lora {
        rank: 2,
        alpha: 16.0,
        targets: vec![LoraTarget::Attn],
        groups: Some(1),
    };
    lora_round_trip(&fixture(), attn_top, 3, "gpt2 lora r2 attn top group");
}

#[test]
fn llama_lora_adapter_loads_in_peft_with_the_same_logits() {
    use experiments::trial::{LoraTarget, Method};
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
    let all = Method::Lora {
        rank: 4,
        alpha: 8.0,
        targets: vec![LoraTarget::Attn, LoraTarget::Mlp],
        groups: None,
    };
    lora_round_trip(&base, all, 3, "llama lora r4 attn+mlp");
    let mlp_top = Method::Lora {
        rank: 3,
        alpha: 6.0,
        targets: vec![LoraTarget::Mlp],
        groups: Some(1),
    };
    lora_round_trip(&base, mlp_top, 3, "llama lora r3 mlp top group");
}
