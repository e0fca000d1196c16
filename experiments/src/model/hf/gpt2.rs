//! GPT-2's Hugging Face layout: `GPT2LMHeadModel` / `GPT2Model` checkpoints.
//!
//! Tensor names carry a `transformer.` prefix (a `GPT2Model` has none: both are read); the four
//! linear layers of a block are Conv1D, stored `[in, out]`, transposed here to candle's
//! `[out, in]` and back on save. The `attn.bias` / `attn.masked_bias` buffers and
//! `lm_head.weight` are ignored (the head is tied to `wte`). Saving writes prefixed names, the
//! Conv1D layout, no `lm_head`, so `GPT2LMHeadModel.from_pretrained(dir)` loads it.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use super::{copy_tokenizer, token_id, tokenizer_json, write_json, write_weights, Stored, CONFIG};
use crate::model::{Gpt2, Gpt2Config};
use crate::{Error, Result};

const PREFIX: &str = "transformer.";

/// Linear layers that transformers stores as Conv1D `[in, out]`.
fn is_conv1d(name: &str) -> bool {
    name.ends_with("attn.c_attn.weight")
        || name.ends_with("attn.c_proj.weight")
        || name.ends_with("mlp.c_fc.weight")
        || name.ends_with("mlp.c_proj.weight")
}

/// Where a parameter (ablate's name, without the prefix) is stored.
pub(crate) fn stored(name: &str) -> Stored {
    Stored {
        names: vec![format!("{PREFIX}{name}"), name.to_string()],
        transposed: is_conv1d(name),
    }
}

/// What a shape error quotes from the config.
pub(crate) fn shape_hint(c: &Gpt2Config) -> String {
    format!(
        "vocab_size {}, n_positions {}, n_embd {}",
        c.vocab_size, c.n_positions, c.n_embd
    )
}

pub(crate) fn json_usize(v: &Value, field: &str, path: &Path) -> Result<Option<usize>> {
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

pub(crate) fn required_usize(v: &Value, fields: &[&str], path: &Path) -> Result<usize> {
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

/// A GPT-2 `config.json` (already known to be GPT-2). Settings that would change the computation
/// in ways this model does not implement (another activation, `n_inner` other than 4·n_embd,
/// unscaled or layer-scaled attention) are rejected rather than silently ignored.
pub(crate) fn parse_config(v: &Value, path: &Path) -> Result<Gpt2Config> {
    let cfg = Gpt2Config {
        vocab_size: required_usize(v, &["vocab_size"], path)?,
        n_positions: required_usize(v, &["n_positions", "n_ctx"], path)?,
        n_embd: required_usize(v, &["n_embd"], path)?,
        n_layer: required_usize(v, &["n_layer"], path)?,
        n_head: required_usize(v, &["n_head"], path)?,
        layer_norm_epsilon: match v.get("layer_norm_epsilon") {
            None | Some(Value::Null) => 1e-5,
            Some(x) => x.as_f64().ok_or_else(|| {
                Error::input(
                    path,
                    format!("field \"layer_norm_epsilon\" must be a number, got {x}"),
                )
            })?,
        },
    };
    if let Some(act) = v.get("activation_function") {
        if !matches!(act.as_str(), Some("gelu_new" | "gelu_pytorch_tanh")) {
            return Err(Error::input(
                path,
                format!("field \"activation_function\" is {act}; only GPT-2's \"gelu_new\" is supported"),
            ));
        }
    }
    if let Some(inner) = json_usize(v, "n_inner", path)? {
        if inner != 4 * cfg.n_embd {
            return Err(Error::input(
                path,
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
                    path,
                    format!("field \"{field}\" is {x}; only {want} is supported"),
                ));
            }
        }
    }
    cfg.validate()
        .map_err(|e| Error::input(path, e.to_string()))?;
    Ok(cfg)
}

/// Writes a GPT-2 directory (see the module doc).
pub(crate) fn save(model: &Gpt2, dir: &Path, tokenizer: Option<&Path>) -> Result<()> {
    let cfg = model.config();
    const EOT: &str = "<|endoftext|>";
    let eot = match tokenizer {
        Some(t) => token_id(&tokenizer_json(t)?, EOT).filter(|&id| (id as usize) < cfg.vocab_size),
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
    write_weights(dir, &tensors)?;

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
    write_json(&dir.join(CONFIG), &config)?;

    if let Some(tok) = tokenizer {
        copy_tokenizer(tok, dir)?;
        let mut tc = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.n_positions,
        });
        if eot.is_some() {
            tc["bos_token"] = json!(EOT);
            tc["eos_token"] = json!(EOT);
        }
        write_json(&dir.join("tokenizer_config.json"), &tc)?;
    }
    Ok(())
}
