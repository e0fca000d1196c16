//! Llama's Hugging Face layout: `LlamaForCausalLM` checkpoints as transformers writes them.
//!
//! Tensors are stored under the names ablate uses (`model.embed_tokens.weight`,
//! `model.layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `model.layers.{i}.mlp.{gate,up,down}_proj.weight`,
//! `model.layers.{i}.{input,post_attention}_layernorm.weight`, `model.norm.weight`, and
//! `lm_head.weight` for an untied head), `nn.Linear` weights `[out, in]` as in candle; a
//! `LlamaModel` checkpoint (no `model.` prefix) is read too. A tied checkpoint's `lm_head.weight`,
//! if present, is ignored, as transformers ties it to the embeddings.
//!
//! `config.json` is read as transformers 5 reads it: the RoPE settings from `rope_scaling` (older
//! files) or `rope_parameters` (transformers 5), `rope_theta` inside them or at the top level
//! (default 10000), `original_max_position_embeddings` at the top level winning for `llama3`;
//! `num_key_value_heads` defaulting to the attention heads, `head_dim` to
//! `hidden_size / num_attention_heads`, `rms_norm_eps` to 1e-6, `max_position_embeddings` to
//! 2048, `tie_word_embeddings` to false. What this model does not implement is an error naming
//! the field: another `hidden_act` than `silu`, `attention_bias` or `mlp_bias` true, a
//! `partial_rotary_factor` below 1, RoPE types other than `default`, `linear` and `llama3`, or
//! per-layer RoPE settings. Saving writes both forms of the RoPE settings, so transformers 4 and 5
//! read them alike.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{json, Map, Value};

use super::gpt2::{json_usize, required_usize};
use super::{
    copy_tokenizer, token_content, tokenizer_json, write_json, write_weights, Stored, CONFIG,
};
use crate::model::{Llama, LlamaConfig, RopeScaling};
use crate::{Error, Result};

/// Where a parameter is stored: its own name, or without `model.` in a `LlamaModel` file.
pub(crate) fn stored(name: &str) -> Stored {
    let mut names = vec![name.to_string()];
    if let Some(bare) = name.strip_prefix("model.") {
        names.push(bare.to_string());
    }
    Stored {
        names,
        transposed: false,
    }
}

/// What a shape error quotes from the config.
pub(crate) fn shape_hint(c: &LlamaConfig) -> String {
    format!(
        "vocab_size {}, hidden_size {}, intermediate_size {}, num_attention_heads {}, \
         num_key_value_heads {}, head_dim {}",
        c.vocab_size,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    )
}

fn json_f64(v: &Value, field: &str, path: &Path) -> Result<Option<f64>> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or_else(|| {
            Error::input(path, format!("field \"{field}\" must be a number, got {x}"))
        }),
    }
}

fn json_bool(v: &Value, field: &str, path: &Path) -> Result<Option<bool>> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(x) => Err(Error::input(
            path,
            format!("field \"{field}\" must be true or false, got {x}"),
        )),
    }
}

/// A token id field: an integer, a list of them (`eos_token_id` of Llama 3), or null.
fn token_ids(v: &Value, field: &str, path: &Path) -> Result<Vec<u32>> {
    let one = |x: &Value| -> Result<u32> {
        x.as_u64()
            .filter(|&n| n <= u32::MAX as u64)
            .map(|n| n as u32)
            .ok_or_else(|| {
                Error::input(
                    path,
                    format!("field \"{field}\" must be a token id or a list of them, got {x}"),
                )
            })
    };
    match v.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

/// The RoPE settings (see the module doc for where they are looked up).
fn parse_rope(v: &Value, path: &Path, max_positions: usize) -> Result<(f64, RopeScaling)> {
    let (params, field) = match (v.get("rope_scaling"), v.get("rope_parameters")) {
        (Some(p @ Value::Object(_)), _) => (Some(p), "rope_scaling"),
        (Some(Value::Null) | None, Some(p @ Value::Object(_))) => (Some(p), "rope_parameters"),
        (Some(Value::Null) | None, Some(Value::Null) | None) => (None, ""),
        (Some(x), _) => {
            return Err(Error::input(
                path,
                format!("field \"rope_scaling\" must be an object or null, got {x}"),
            ))
        }
        (_, Some(x)) => {
            return Err(Error::input(
                path,
                format!("field \"rope_parameters\" must be an object or null, got {x}"),
            ))
        }
    };
    let top_theta = json_f64(v, "rope_theta", path)?;
    let Some(params) = params else {
        return Ok((top_theta.unwrap_or(10000.0), RopeScaling::None));
    };
    if params
        .as_object()
        .is_some_and(|o| o.values().any(Value::is_object))
    {
        return Err(Error::input(
            path,
            format!("field \"{field}\" holds per-layer RoPE settings, which are not supported"),
        ));
    }
    let sub = |k: &str| format!("{field}.{k}");
    let num = |k: &str| -> Result<Option<f64>> {
        match params.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x.as_f64().map(Some).ok_or_else(|| {
                Error::input(
                    path,
                    format!("field \"{}\" must be a number, got {x}", sub(k)),
                )
            }),
        }
    };
    let need = |k: &str| -> Result<f64> {
        num(k)?.ok_or_else(|| Error::input(path, format!("missing field \"{}\"", sub(k))))
    };
    let theta = match num("rope_theta")? {
        Some(t) => t,
        None => top_theta.unwrap_or(10000.0),
    };
    if let Some(f) = num("partial_rotary_factor")?.or(json_f64(v, "partial_rotary_factor", path)?) {
        if f != 1.0 {
            return Err(Error::input(
                path,
                format!("field \"partial_rotary_factor\" is {f}; only 1.0 is supported"),
            ));
        }
    }
    let kind = match params.get("rope_type").or_else(|| params.get("type")) {
        None | Some(Value::Null) => "default".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(x) => {
            return Err(Error::input(
                path,
                format!("field \"{}\" must be a string, got {x}", sub("rope_type")),
            ))
        }
    };
    let scaling = match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => {
            let original = match json_usize(v, "original_max_position_embeddings", path)? {
                Some(n) => n,
                None => match num("original_max_position_embeddings")? {
                    Some(n) if n >= 1.0 && n.fract() == 0.0 => n as usize,
                    Some(n) => {
                        return Err(Error::input(
                            path,
                            format!(
                                "field \"{}\" must be a positive integer, got {n}",
                                sub("original_max_position_embeddings")
                            ),
                        ))
                    }
                    None => max_positions,
                },
            };
            RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: original,
            }
        }
        other => {
            return Err(Error::input(
                path,
                format!(
                    "field \"{}\" is \"{other}\"; supported RoPE types are \"default\", \"linear\" and \"llama3\"",
                    sub("rope_type")
                ),
            ))
        }
    };
    Ok((theta, scaling))
}

/// A Llama `config.json` (already known to be Llama); see the module doc.
#[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
pub(crate) fn parse_config(v: &Value, path: &Path) -> Result<LlamaConfig> {
    let hidden = required_usize(v, &["hidden_size"], path)?;
    let heads = required_usize(v, &["num_attention_heads"], path)?;
    if heads == 0 || hidden % heads != 0 {
        return Err(Error::input(
            path,
            format!(
                "field \"hidden_size\" ({hidden}) must be a multiple of \"num_attention_heads\" ({heads})"
            ),
        ));
    }
    let max_positions = json_usize(v, "max_position_embeddings", path)?.unwrap_or(2048);
    let (rope_theta, rope_scaling) = parse_rope(v, path, max_positions)?;
    if let Some(act) = v.get("hidden_act") {
        if act.as_str() != Some("silu") {
            return Err(Error::input(
                path,
                format!("field \"hidden_act\" is {act}; only \"silu\" is supported"),
            ));
        }
    }
    for field in ["attention_bias", "mlp_bias"] {
        if json_bool(v, field, path)? == Some(true) {
            return Err(Error::input(
                path,
                format!("field \"{field}\" is true; only bias-free projections are supported"),
            ));
        }
    }
    let cfg = LlamaConfig {
        vocab_size: required_usize(v, &["vocab_size"], path)?,
        hidden_size: hidden,
        intermediate_size: required_usize(v, &["intermediate_size"], path)?,
        num_hidden_layers: required_usize(v, &["num_hidden_layers"], path)?,
        num_attention_heads: heads,
        num_key_value_heads: json_usize(v, "num_key_value_heads", path)?.unwrap_or(heads),
        head_dim: json_usize(v, "head_dim", path)?.unwrap_or(hidden / heads),
        max_position_embeddings: max_positions,
        rms_norm_eps: json_f64(v, "rms_norm_eps", path)?.unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        tie_word_embeddings: json_bool(v, "tie_word_embeddings", path)?.unwrap_or(false),
        bos_token_id: token_ids(v, "bos_token_id", path)?.first().copied(),
        eos_token_id: token_ids(v, "eos_token_id", path)?,
    };
    cfg.validate()
        .map_err(|e| Error::input(path, e.to_string()))?;
    Ok(cfg)
}

/// `config.json` for a Llama, in the form transformers writes (see the module doc for RoPE).
pub(crate) fn config_json(cfg: &LlamaConfig) -> Value {
    let mut rope = Map::new();
    rope.insert("rope_theta".into(), json!(cfg.rope_theta));
    let legacy = match cfg.rope_scaling {
        RopeScaling::None => {
            rope.insert("rope_type".into(), json!("default"));
            Value::Null
        }
        RopeScaling::Linear { factor } => {
            rope.insert("rope_type".into(), json!("linear"));
            rope.insert("factor".into(), json!(factor));
            json!({"rope_type": "linear", "factor": factor})
        }
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let s = json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            });
            for (k, v) in s.as_object().expect("object") {
                rope.insert(k.clone(), v.clone());
            }
            s
        }
    };
    let eos = match cfg.eos_token_id.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": legacy,
        "rope_parameters": Value::Object(rope),
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "mlp_bias": false,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    })
}

/// Writes a Llama directory (see the module doc). With a tokenizer, its tokenizer_config.json
/// (and special_tokens_map.json) are copied from beside it when they exist (a chat template
/// survives fine-tuning), else a minimal one naming the bos/eos tokens is written.
pub(crate) fn save(model: &Llama, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
    let cfg = model.config();
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, var) in crate::model::CausalLm::named_vars(model) {
        let t = var
            .as_detached_tensor()
            .to_device(&Device::Cpu)?
            .contiguous()?;
        tensors.insert(name, t);
    }
    write_weights(dir, &tensors)?;
    write_json(&dir.join(CONFIG), &config_json(cfg))?;

    let Some(tok) = tokenizer else {
        return Ok(());
    };
    copy_tokenizer(tok, dir)?;
    let src = tok.parent().unwrap_or(Path::new("."));
    let mut copied = false;
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        let (from, to) = (src.join(f), dir.join(f));
        if !from.is_file() {
            continue;
        }
        if from != to {
            let bytes =
                fs::read(&from).map_err(|e| Error::input(&from, format!("cannot read: {e}")))?;
            super::write_atomic(&to, &bytes)?;
        }
        copied |= f == "tokenizer_config.json";
    }
    if !copied {
        let tj = tokenizer_json(tok)?;
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_position_embeddings,
            "add_bos_token": false,
        });
        if let Some(b) = cfg
            .bos_token_id
            .and_then(|id| token_content(&tj, id as u64))
        {
            tc["bos_token"] = json!(b);
        }
        if let Some(e) = cfg
            .eos_token_id
            .first()
            .and_then(|&id| token_content(&tj, id as u64))
        {
            tc["eos_token"] = json!(e);
        }
        write_json(&dir.join("tokenizer_config.json"), &tc)?;
    }
    Ok(())
}
