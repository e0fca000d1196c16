//! Hugging Face GPT-2 directories in and out: `config.json` + `model.safetensors` (+ `tokenizer.json`).
//!
//! Loading accepts what `transformers` writes for `GPT2LMHeadModel` / `GPT2Model`: tensor names with
//! or without the `transformer.` prefix, Conv1D weights stored `[in, out]` (transposed here to
//! candle's `[out, in]`), f32/f16/bf16/f64 values (converted to f32), a single file or a sharded
//! `model.safetensors.index.json`. The `attn.bias` / `attn.masked_bias` buffers and `lm_head.weight`
//! are ignored (the head is tied to `wte`). Every problem with the input is an [`Error::Input`] that
//! names the file and the field or tensor, because users point ablate at directories they
//! downloaded or converted by hand.
//!
//! Saving writes the inverse (prefixed names, Conv1D layout, `{"format": "pt"}` metadata), so
//! `GPT2LMHeadModel.from_pretrained(dir)` loads an ablate checkpoint; `tests/roundtrip.rs` checks
//! that with the real `transformers`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use crate::model::{Gpt2, Gpt2Config};
use crate::{Error, Result};

const CONFIG: &str = "config.json";
const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
const PREFIX: &str = "transformer.";

/// Linear layers that transformers stores as Conv1D `[in, out]`.
fn is_conv1d(name: &str) -> bool {
    name.ends_with("attn.c_attn.weight")
        || name.ends_with("attn.c_proj.weight")
        || name.ends_with("mlp.c_fc.weight")
        || name.ends_with("mlp.c_proj.weight")
}

fn json_usize(v: &Value, field: &str, path: &Path) -> Result<Option<usize>> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
            Error::input(
                path,
                format!("field \"{field}\" must be a non-negative integer, got {x}"),
            )
        }),
    }
}

fn required_usize(v: &Value, fields: &[&str], path: &Path) -> Result<usize> {
    for f in fields {
        if let Some(n) = json_usize(v, f, path)? {
            return Ok(n);
        }
    }
    Err(Error::input(
        path,
        format!("missing field \"{}\"", fields.join("\" or \"")),
    ))
}

/// Reads and checks `config.json` of a Hugging Face GPT-2 directory. Settings that would change
/// the computation in ways this model does not implement (another activation, `n_inner` other than
/// 4·n_embd, unscaled or layer-scaled attention) are rejected rather than silently ignored.
pub fn read_config(dir: &Path) -> Result<Gpt2Config> {
    let path = dir.join(CONFIG);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::input(
                &path,
                "missing: not a Hugging Face GPT-2 directory",
            ))
        }
        Err(e) => return Err(Error::input(&path, format!("cannot read: {e}"))),
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(&path, format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::input(&path, "must be a JSON object"));
    }
    if let Some(mt) = v.get("model_type") {
        if mt.as_str() != Some("gpt2") {
            return Err(Error::input(
                &path,
                format!("field \"model_type\" is {mt}, expected \"gpt2\""),
            ));
        }
    }
    let cfg = Gpt2Config {
        vocab_size: required_usize(&v, &["vocab_size"], &path)?,
        n_positions: required_usize(&v, &["n_positions", "n_ctx"], &path)?,
        n_embd: required_usize(&v, &["n_embd"], &path)?,
        n_layer: required_usize(&v, &["n_layer"], &path)?,
        n_head: required_usize(&v, &["n_head"], &path)?,
        layer_norm_epsilon: match v.get("layer_norm_epsilon") {
            None | Some(Value::Null) => 1e-5,
            Some(x) => x.as_f64().ok_or_else(|| {
                Error::input(
                    &path,
                    format!("field \"layer_norm_epsilon\" must be a number, got {x}"),
                )
            })?,
        },
    };
    if let Some(act) = v.get("activation_function") {
        if !matches!(act.as_str(), Some("gelu_new" | "gelu_pytorch_tanh")) {
            return Err(Error::input(
                &path,
                format!("field \"activation_function\" is {act}; only GPT-2's \"gelu_new\" is supported"),
            ));
        }
    }
    if let Some(inner) = json_usize(&v, "n_inner", &path)? {
        if inner != 4 * cfg.n_embd {
            return Err(Error::input(
                &path,
                format!(
                    "field \"n_inner\" is {inner}; only 4 * n_embd = {} is supported",
                    4 * cfg.n_embd
                ),
            ));
        }
    }
    for (field, want) in [
        ("scale_attn_weights", true),
        ("scale_attn_by_inverse_layer_idx", false),
    ] {
        if let Some(x) = v.get(field) {
            if x.as_bool() != Some(want) {
                return Err(Error::input(
                    &path,
                    format!("field \"{field}\" is {x}; only {want} is supported"),
                ));
            }
        }
    }
    cfg.validate()
        .map_err(|e| Error::input(&path, e.to_string()))?;
    Ok(cfg)
}

/// The weight files of a directory: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(WEIGHTS_INDEX);
    if index.is_file() {
        let text = fs::read_to_string(&index)
            .map_err(|e| Error::input(&index, format!("cannot read: {e}")))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::input(&index, format!("malformed JSON: {e}")))?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::input(&index, "missing object field \"weight_map\""))?;
        let mut files: Vec<String> = Vec::new();
        for (name, f) in map {
            let f = f.as_str().ok_or_else(|| {
                Error::input(
                    &index,
                    format!("weight_map entry \"{name}\" must be a file name"),
                )
            })?;
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(Error::input(
                    &index,
                    format!("weight_map entry \"{name}\" names a file outside the directory: {f}"),
                ));
            }
            if !files.iter().any(|x| x == f) {
                files.push(f.to_string());
            }
        }
        files.sort();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let hint = if dir.join("pytorch_model.bin").exists() {
        " (pytorch_model.bin is not supported: re-save with save_pretrained(dir, safe_serialization=True))"
    } else {
        ""
    };
    Err(Error::input(&single, format!("missing{hint}")))
}

/// Load a Hugging Face GPT-2 directory: config.json, model.safetensors (tensor names with or without
/// the "transformer." prefix; Conv1D [in,out] weights transposed; attn.bias/masked_bias buffers and
/// lm_head.weight ignored). `max_blocks` loads only the first n blocks (Inheritune). Every problem is
/// an Error::Input naming the file and the tensor/field (missing file, malformed JSON, missing
/// tensor, wrong shape, wrong dtype).
pub fn load_hf_dir(dir: &Path, max_blocks: Option<usize>, device: &Device) -> Result<Gpt2> {
    let mut cfg = read_config(dir)?;
    if let Some(n) = max_blocks {
        if n == 0 || n > cfg.n_layer {
            return Err(Error::Config(format!(
                "cannot keep {n} blocks of the {}-block model in {}",
                cfg.n_layer,
                dir.display()
            )));
        }
        cfg.n_layer = n;
    }
    let files = weight_files(dir)?;
    let mut maps = Vec::with_capacity(files.len());
    for f in &files {
        let file = fs::File::open(f).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::input(f, "missing")
            } else {
                Error::input(f, format!("cannot open: {e}"))
            }
        })?;
        // SAFETY: the mapping is read-only and lives only while this function runs; a checkpoint
        // modified by another process during loading is the same hazard as with any reader.
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::input(f, format!("cannot map: {e}")))?;
        maps.push(mmap);
    }
    let mut sts = Vec::with_capacity(files.len());
    for (f, m) in files.iter().zip(&maps) {
        sts.push(
            SafeTensors::deserialize(m)
                .map_err(|e| Error::input(f, format!("not a valid safetensors file: {e}")))?,
        );
    }
    // Where each stored tensor lives.
    let mut location: HashMap<&str, usize> = HashMap::new();
    for (i, st) in sts.iter().enumerate() {
        for name in st.names() {
            location.insert(name, i);
        }
    }
    let shown = |i: Option<usize>| -> PathBuf {
        match (files.len(), i) {
            (1, _) => files[0].clone(),
            (_, Some(i)) => files[i].clone(),
            _ => dir.join(WEIGHTS_INDEX),
        }
    };
    let mut tensors = HashMap::new();
    for (name, shape) in cfg.param_shapes() {
        let prefixed = format!("{PREFIX}{name}");
        let (stored, fi) = match (location.get(prefixed.as_str()), location.get(name.as_str())) {
            (Some(&i), _) => (prefixed.clone(), i),
            (None, Some(&i)) => (name.clone(), i),
            (None, None) => {
                return Err(Error::input(
                    shown(None),
                    format!("missing tensor \"{prefixed}\" (or \"{name}\")"),
                ))
            }
        };
        let path = shown(Some(fi));
        let view = sts[fi]
            .tensor(&stored)
            .map_err(|e| Error::input(&path, format!("tensor \"{stored}\": {e}")))?;
        if !matches!(
            view.dtype(),
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        ) {
            return Err(Error::input(
                &path,
                format!("tensor \"{stored}\" has dtype {:?}, expected a float type (F32, F16, BF16, F64)", view.dtype()),
            ));
        }
        let conv = is_conv1d(&name);
        let want: Vec<usize> = if conv {
            vec![shape[1], shape[0]]
        } else {
            shape.clone()
        };
        if view.shape() != want.as_slice() {
            return Err(Error::input(
                &path,
                format!(
                    "tensor \"{stored}\" has shape {:?}, expected {want:?} (from {CONFIG}: vocab_size {}, n_positions {}, n_embd {})",
                    view.shape(),
                    cfg.vocab_size,
                    cfg.n_positions,
                    cfg.n_embd
                ),
            ));
        }
        let t = view
            .load(&Device::Cpu)
            .map_err(|e| Error::input(&path, format!("tensor \"{stored}\": {e}")))?
            .to_dtype(DType::F32)?;
        let t = if conv { t.t()?.contiguous()? } else { t };
        tensors.insert(name, t);
    }
    Gpt2::from_tensors(&cfg, tensors, device)
}

/// The id of `<|endoftext|>` in a tokenizer.json, if it has one (GPT-2's bos/eos token).
fn endoftext_id(tokenizer_json: &Path) -> Result<Option<u64>> {
    let text = fs::read_to_string(tokenizer_json)
        .map_err(|e| Error::input(tokenizer_json, format!("cannot read: {e}")))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(tokenizer_json, format!("malformed JSON: {e}")))?;
    const EOT: &str = "<|endoftext|>";
    if let Some(added) = v.get("added_tokens").and_then(Value::as_array) {
        for t in added {
            if t.get("content").and_then(Value::as_str) == Some(EOT) {
                if let Some(id) = t.get("id").and_then(Value::as_u64) {
                    return Ok(Some(id));
                }
            }
        }
    }
    Ok(v.pointer("/model/vocab")
        .and_then(|voc| voc.get(EOT))
        .and_then(Value::as_u64))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Write config.json + model.safetensors (+ copies tokenizer.json if given) so that
/// transformers.GPT2LMHeadModel.from_pretrained(dir) loads it. Files are written to a temporary
/// name and renamed, so a worker stopped mid-save never leaves a half-written checkpoint.
pub fn save_hf_dir(model: &Gpt2, dir: &Path, tokenizer_json: Option<&Path>) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let cfg = model.config();
    let eot = match tokenizer_json {
        Some(t) => endoftext_id(t)?.filter(|&id| (id as usize) < cfg.vocab_size),
        None => None,
    };

    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, var) in model.named_vars() {
        let t = var.as_detached_tensor().to_device(&Device::Cpu)?;
        let t = if is_conv1d(&name) {
            t.t()?.contiguous()?
        } else {
            t.contiguous()?
        };
        tensors.insert(format!("{PREFIX}{name}"), t);
    }
    let weights = dir.join(WEIGHTS);
    let tmp = weights.with_extension("tmp");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter(), Some(metadata), &tmp)
        .map_err(|e| Error::Other(format!("{}: cannot write safetensors: {e}", tmp.display())))?;
    fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))?;

    let config = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": null,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": 0.02,
        // ablate trains without dropout; these are transformers' defaults for further training.
        "resid_pdrop": 0.1,
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "scale_attn_weights": true,
        "tie_word_embeddings": true,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "torch_dtype": "float32",
    });
    let text = serde_json::to_string_pretty(&config).expect("config serialises");
    write_atomic(&dir.join(CONFIG), text.as_bytes())?;

    if let Some(tok) = tokenizer_json {
        let dst = dir.join("tokenizer.json");
        if tok != dst {
            let bytes =
                fs::read(tok).map_err(|e| Error::input(tok, format!("cannot read: {e}")))?;
            write_atomic(&dst, &bytes)?;
        }
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.n_positions,
        });
        if eot.is_some() {
            tc["bos_token"] = json!("<|endoftext|>");
            tc["eos_token"] = json!("<|endoftext|>");
        }
        let text = serde_json::to_string_pretty(&tc).expect("tokenizer config serialises");
        write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())?;
    }
    Ok(())
}
