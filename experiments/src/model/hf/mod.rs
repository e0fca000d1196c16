//! Hugging Face model directories in and out, for every family: `config.json` +
//! `model.safetensors` (or shards named by `model.safetensors.index.json`) + `tokenizer.json`.
//!
//! [`read_config`] dispatches on `config.json`'s `model_type` (`gpt2`, `llama`; `architectures`
//! as a fallback when `model_type` is absent) to the family's reader ([`gpt2`], [`llama`]), which
//! rejects settings the model does not implement rather than silently computing something else.
//! [`load_hf_dir`] then reads every parameter of the config's layout from the weight files: f32,
//! f16, bf16 or f64 values (converted to f32), under the family's stored names (GPT-2 with or
//! without `transformer.` and with Conv1D weights transposed; Llama as transformers writes it).
//! Every problem with the input is an [`Error::Input`] that names the file and the field or
//! tensor, because users point ablate at directories they downloaded or converted by hand.
//!
//! [`save_hf_dir`] writes the inverse, so `AutoModelForCausalLM.from_pretrained(dir)` (and the
//! family's own class) loads an ablate checkpoint with the same logits; `tests/roundtrip.rs`
//! checks that with the real `transformers` for both families. Files are written to a temporary
//! name and renamed, so a worker stopped mid-save never leaves a half-written checkpoint.

pub mod gpt2;
pub mod llama;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::{build, CausalLm, FamilyRef, Gpt2, Llama, ModelConfig};
use crate::{Error, Result};

pub(crate) const CONFIG: &str = "config.json";
pub(crate) const WEIGHTS: &str = "model.safetensors";
pub(crate) const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// Reads `config.json` as a JSON object (missing, unreadable and malformed files named).
fn read_config_json(dir: &Path) -> Result<(PathBuf, Value)> {
    let path = dir.join(CONFIG);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::input(
                &path,
                "missing: not a Hugging Face model directory",
            ))
        }
        Err(e) => return Err(Error::input(&path, format!("cannot read: {e}"))),
    };
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::input(&path, format!("malformed JSON: {e}")))?;
    if !v.is_object() {
        return Err(Error::input(&path, "must be a JSON object"));
    }
    Ok((path, v))
}

/// Which family a `config.json` describes: `model_type`, else the first of `architectures`.
fn family_of(v: &Value, path: &Path) -> Result<&'static str> {
    match v.get("model_type") {
        Some(Value::String(t)) => match t.as_str() {
            "gpt2" => return Ok("gpt2"),
            "llama" => return Ok("llama"),
            other => {
                return Err(Error::input(
                    path,
                    format!(
                        "field \"model_type\" is \"{other}\"; supported model types are \"gpt2\" and \"llama\""
                    ),
                ))
            }
        },
        Some(Value::Null) | None => {}
        Some(x) => {
            return Err(Error::input(
                path,
                format!("field \"model_type\" must be a string, got {x}"),
            ))
        }
    }
    let arch = v
        .get("architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    match arch {
        Some("GPT2LMHeadModel" | "GPT2Model") => Ok("gpt2"),
        Some("LlamaForCausalLM" | "LlamaModel") => Ok("llama"),
        Some(other) => Err(Error::input(
            path,
            format!(
                "no field \"model_type\", and \"architectures\" names {other}; supported are \
                 GPT2LMHeadModel and LlamaForCausalLM"
            ),
        )),
        // Older GPT-2 exports carry neither; their fields say what they are.
        None if v.get("n_embd").is_some() => Ok("gpt2"),
        None => Err(Error::input(
            path,
            "missing field \"model_type\" (and no \"architectures\"): cannot tell the model family",
        )),
    }
}

/// Reads and checks `config.json` of a Hugging Face directory of a supported family.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let (path, v) = read_config_json(dir)?;
    Ok(match family_of(&v, &path)? {
        "gpt2" => ModelConfig::Gpt2(gpt2::parse_config(&v, &path)?),
        _ => ModelConfig::Llama(llama::parse_config(&v, &path)?),
    })
}

// ---- reading weights ---------------------------------------------------------------------------

/// The weight files of a directory: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
pub(crate) fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
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

/// How a family stores one parameter: the names to look for (first found wins) and whether the
/// stored matrix is the transpose of candle's `[out, in]`.
pub(crate) struct Stored {
    pub(crate) names: Vec<String>,
    pub(crate) transposed: bool,
}

/// Reads every parameter of `cfg`'s layout from the weight files of `dir`, converted to f32 on
/// the CPU, with shapes checked against the config. `stored` maps a parameter to where it is.
fn read_tensors(
    dir: &Path,
    cfg: &ModelConfig,
    stored: &dyn Fn(&str) -> Stored,
    shape_hint: &str,
) -> Result<HashMap<String, Tensor>> {
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
    for (name, shape, _) in cfg.param_layout() {
        let how = stored(&name);
        let found = how
            .names
            .iter()
            .find_map(|n| location.get(n.as_str()).map(|&i| (n.clone(), i)));
        let Some((stored_name, fi)) = found else {
            let wanted = match how.names.as_slice() {
                [one] => format!("\"{one}\""),
                [first, rest @ ..] => format!("\"{first}\" (or \"{}\")", rest.join("\" or \"")),
                [] => format!("\"{name}\""),
            };
            return Err(Error::input(
                shown(None),
                format!("missing tensor {wanted}"),
            ));
        };
        let path = shown(Some(fi));
        let view = sts[fi]
            .tensor(&stored_name)
            .map_err(|e| Error::input(&path, format!("tensor \"{stored_name}\": {e}")))?;
        if !matches!(
            view.dtype(),
            Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64
        ) {
            return Err(Error::input(
                &path,
                format!(
                    "tensor \"{stored_name}\" has dtype {:?}, expected a float type (F32, F16, BF16, F64)",
                    view.dtype()
                ),
            ));
        }
        let want: Vec<usize> = if how.transposed {
            vec![shape[1], shape[0]]
        } else {
            shape.clone()
        };
        if view.shape() != want.as_slice() {
            return Err(Error::input(
                &path,
                format!(
                    "tensor \"{stored_name}\" has shape {:?}, expected {want:?} (from {CONFIG}: {shape_hint})",
                    view.shape(),
                ),
            ));
        }
        let t = view
            .load(&Device::Cpu)
            .map_err(|e| Error::input(&path, format!("tensor \"{stored_name}\": {e}")))?
            .to_dtype(DType::F32)?;
        let t = if how.transposed {
            t.t()?.contiguous()?
        } else {
            t
        };
        tensors.insert(name, t);
    }
    Ok(tensors)
}

/// The config of `dir`, optionally cut to its first `max_blocks` blocks (Inheritune loads only
/// what it keeps).
fn config_for(dir: &Path, max_blocks: Option<usize>) -> Result<ModelConfig> {
    let cfg = read_config(dir)?;
    let Some(n) = max_blocks else {
        return Ok(cfg);
    };
    let n_layer = cfg.dims().n_layer;
    if n == 0 || n > n_layer {
        return Err(Error::Config(format!(
            "cannot keep {n} blocks of the {n_layer}-block model in {}",
            dir.display()
        )));
    }
    Ok(cfg.with_layers(n))
}

fn tensors_for(dir: &Path, cfg: &ModelConfig) -> Result<HashMap<String, Tensor>> {
    match cfg {
        ModelConfig::Gpt2(c) => read_tensors(dir, cfg, &gpt2::stored, &gpt2::shape_hint(c)),
        ModelConfig::Llama(c) => read_tensors(dir, cfg, &llama::stored, &llama::shape_hint(c)),
    }
}

/// Loads a Hugging Face directory of any supported family (see the module doc). `max_blocks`
/// loads only the first n blocks (Inheritune). Every problem is an `Error::Input` naming the file
/// and the tensor or field (missing file, malformed JSON, unsupported setting, missing tensor,
/// wrong shape, wrong dtype).
pub fn load_hf_dir(
    dir: &Path,
    max_blocks: Option<usize>,
    device: &Device,
) -> Result<Box<dyn CausalLm>> {
    let cfg = config_for(dir, max_blocks)?;
    let tensors = tensors_for(dir, &cfg)?;
    build(&cfg, tensors, device)
}

/// [`load_hf_dir`] for a directory that must hold a GPT-2.
pub fn load_gpt2_dir(dir: &Path, max_blocks: Option<usize>, device: &Device) -> Result<Gpt2> {
    match config_for(dir, max_blocks)? {
        ModelConfig::Gpt2(c) => {
            let tensors = tensors_for(dir, &ModelConfig::Gpt2(c.clone()))?;
            Gpt2::from_tensors(&c, tensors, device)
        }
        other => Err(Error::input(
            dir.join(CONFIG),
            format!(
                "field \"model_type\" is \"{}\", expected \"gpt2\"",
                other.family().model_type()
            ),
        )),
    }
}

/// [`load_hf_dir`] for a directory that must hold a Llama.
pub fn load_llama_dir(dir: &Path, max_blocks: Option<usize>, device: &Device) -> Result<Llama> {
    match config_for(dir, max_blocks)? {
        ModelConfig::Llama(c) => {
            let tensors = tensors_for(dir, &ModelConfig::Llama(c.clone()))?;
            Llama::from_tensors(&c, tensors, device)
        }
        other => Err(Error::input(
            dir.join(CONFIG),
            format!(
                "field \"model_type\" is \"{}\", expected \"llama\"",
                other.family().model_type()
            ),
        )),
    }
}

// ---- writing -----------------------------------------------------------------------------------

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Writes `model.safetensors` from stored-name → tensor, with transformers' `{"format": "pt"}`.
pub(crate) fn write_weights(dir: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let weights = dir.join(WEIGHTS);
    let tmp = weights.with_extension("tmp");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter(), Some(metadata), &tmp)
        .map_err(|e| Error::Other(format!("{}: cannot write safetensors: {e}", tmp.display())))?;
    fs::rename(&tmp, &weights).map_err(|e| Error::io(&weights, e))
}

pub(crate) fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialise");
    write_atomic(path, text.as_bytes())
}

/// Copies `tokenizer.json` into `dir` (unless it is already that file).
pub(crate) fn copy_tokenizer(tok: &Path, dir: &Path) -> Result<()> {
    let dst = dir.join("tokenizer.json");
    if tok != dst {
        let bytes = fs::read(tok).map_err(|e| Error::input(tok, format!("cannot read: {e}")))?;
        write_atomic(&dst, &bytes)?;
    }
    Ok(())
}

/// Reads a tokenizer.json as JSON (for token ids by content and back).
pub(crate) fn tokenizer_json(path: &Path) -> Result<Value> {
    let text =
        fs::read_to_string(path).map_err(|e| Error::input(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::input(path, format!("malformed JSON: {e}")))
}

/// The id of the token `content` in a tokenizer.json (added tokens first, then the vocabulary).
pub(crate) fn token_id(tok: &Value, content: &str) -> Option<u64> {
    if let Some(added) = tok.get("added_tokens").and_then(Value::as_array) {
        for t in added {
            if t.get("content").and_then(Value::as_str) == Some(content) {
                if let Some(id) = t.get("id").and_then(Value::as_u64) {
                    return Some(id);
                }
            }
        }
    }
    tok.pointer("/model/vocab")
        .and_then(|voc| voc.get(content))
        .and_then(Value::as_u64)
}

/// The content of token `id` in a tokenizer.json (added tokens first, then the vocabulary).
pub(crate) fn token_content(tok: &Value, id: u64) -> Option<String> {
    if let Some(added) = tok.get("added_tokens").and_then(Value::as_array) {
        for t in added {
            if t.get("id").and_then(Value::as_u64) == Some(id) {
                return t.get("content").and_then(Value::as_str).map(str::to_string);
            }
        }
    }
    tok.pointer("/model/vocab")
        .and_then(Value::as_object)
        .and_then(|voc| {
            voc.iter()
                .find(|(_, v)| v.as_u64() == Some(id))
                .map(|(k, _)| k.clone())
        })
}

/// Writes a Hugging Face directory for `model` (see the module doc): config.json and
/// model.safetensors, plus tokenizer.json (copied) and tokenizer_config.json when a tokenizer is
/// given.
///
/// A model with LoRA adapters is saved merged (`W + s·B·A`, a plain directory of its family) with
/// the adapters in PEFT's format under `adapter/` (see [`super::lora`]).
pub fn save_hf_dir(model: &dyn CausalLm, dir: &Path, tokenizer_json: Option<&Path>) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    if let Some(lora) = model.lora() {
        let merged = merged(model, lora)?;
        save_hf_dir(&*merged, dir, tokenizer_json)?;
        return save_adapter(lora, &dir.join(ADAPTER_DIR));
    }
    match model.family_ref() {
        FamilyRef::Gpt2(m) => gpt2::save(m, dir, tokenizer_json),
        FamilyRef::Llama(m) => llama::save(m, dir, tokenizer_json),
    }
}

/// Where a LoRA model's directory keeps its adapter, in PEFT's layout.
pub const ADAPTER_DIR: &str = "adapter";

/// A copy of `model` without adapters, each adapted weight replaced by `W + s·B·A` (on the CPU).
pub fn merged(model: &dyn CausalLm, lora: &super::lora::Lora) -> Result<Box<dyn CausalLm>> {
    let mut tensors: HashMap<String, Tensor> = model
        .params()
        .into_iter()
        .filter(|p| !matches!(p.part, super::Part::Adapter(_)))
        .map(|p| {
            let t = p.var.as_detached_tensor().to_device(&Device::Cpu)?;
            Ok((p.name, t))
        })
        .collect::<Result<_>>()?;
    for (module, _, _, ad) in lora.adapters() {
        let name = format!("{module}.weight");
        let w = tensors.get(&name).ok_or_else(|| {
            Error::Other(format!("LoRA adapter {module}: the model has no {name}"))
        })?;
        let w = (w + lora.delta(ad)?)?;
        tensors.insert(name, w);
    }
    build(&model.model_config(), tensors, &Device::Cpu)
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (PEFT's format).
pub fn save_adapter(lora: &super::lora::Lora, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors: BTreeMap<String, Tensor> = lora.peft_tensors()?.into_iter().collect();
    let path = dir.join("adapter_model.safetensors");
    let tmp = path.with_extension("tmp");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter(), Some(metadata), &tmp)
        .map_err(|e| Error::Other(format!("{}: cannot write safetensors: {e}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    write_json(&dir.join("adapter_config.json"), &lora.peft_config(None))
}
