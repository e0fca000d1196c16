//! GGUF in: a llama.cpp model file becomes a Hugging Face `LlamaForCausalLM` directory.
//!
//! [`import`] does what transformers does when it loads a GGUF with `gguf_file=`: it
//! dequantizes every tensor to f32 ([`dequant`], checked against the `gguf` package's own
//! dequantization), renames llama.cpp's tensors to Hugging Face's, undoes the row permutation
//! that llama.cpp's converter applies to the query and key projections (its RoPE pairs adjacent
//! elements; Hugging Face's rotate-half pairs the two halves of a head), reads the config from
//! the `llama.*` metadata, and builds a `tokenizer.json` from the `tokenizer.ggml.*` metadata the
//! way transformers' `GGUFGPTConverter` does ([`tokenizer`]). The result is an ordinary
//! directory: ablate, transformers and everything else load it as they load any checkpoint.
//!
//! [`ensure_imported`] caches the import per host, keyed by the file's SHA-256, so a sweep that
//! names a GGUF (`[base] gguf = ...`) converts it once.

pub mod dequant;
pub mod reader;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::json;
use sha2::{Digest, Sha256};

pub use reader::{Gguf, TensorInfo, Value};

use crate::data::atomic::{remove_stale_temps, unique_suffix};
use crate::model::hf::llama::config_json as config_json_llama;
use crate::model::hf::{write_json, write_weights};
use crate::model::{LlamaConfig, RopeScaling};
use crate::{Error, Result};

/// What an import produced (printed by `ablate-worker import`).
#[derive(Debug, Clone)]
pub struct Imported {
    pub config: LlamaConfig,
    pub n_tensors: usize,
    pub n_params: u64,
    /// Count of source tensors per GGML type name.
    pub types: BTreeMap<String, usize>,
}

/// The Llama config a GGUF's metadata describes (transformers' mapping of the `llama.*` keys).
pub fn llama_config(g: &Gguf) -> Result<LlamaConfig> {
    let arch = g.get_str("general.architecture")?;
    if arch != "llama" {
        return Err(Error::input(
            g.path(),
            format!(
                "metadata key `general.architecture` is \"{arch}\": ablate imports Llama-architecture GGUF files (\"llama\") only"
            ),
        ));
    }
    let key = |k: &str| format!("llama.{k}");
    let opt_u64 = |k: &str| -> Result<Option<u64>> {
        match g.metadata.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| g.wrong_type(&key(k), v, "an unsigned integer")),
        }
    };
    let usize_of = |k: &str| g.get_u64(&key(k)).map(|v| v as usize);
    let hidden = usize_of("embedding_length")?;
    let heads = usize_of("attention.head_count")?;
    let kv_heads = opt_u64("attention.head_count_kv")?.map_or(heads, |v| v as usize);
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::input(
            g.path(),
            format!("metadata keys `llama.attention.head_count` = {heads} and `llama.attention.head_count_kv` = {kv_heads}: the query heads must be a multiple of the KV heads"),
        ));
    }
    let head_dim = match opt_u64("attention.key_length")? {
        Some(v) => v as usize,
        None if hidden % heads == 0 => hidden / heads,
        None => {
            return Err(Error::input(
                g.path(),
                format!("metadata key `llama.embedding_length` = {hidden} is not divisible by `llama.attention.head_count` = {heads}"),
            ))
        }
    };
    if let Some(rot) = opt_u64("rope.dimension_count")? {
        if rot as usize != head_dim {
            return Err(Error::input(
                g.path(),
                format!("metadata key `llama.rope.dimension_count` = {rot}: partial rotary embeddings (fewer than the head's {head_dim}) are not supported"),
            ));
        }
    }
    let vocab = match opt_u64("vocab_size")? {
        Some(v) => v as usize,
        None => g
            .get("tokenizer.ggml.tokens")?
            .as_array()
            .map(|a| a.len())
            .ok_or_else(|| {
                g.wrong_type(
                    "tokenizer.ggml.tokens",
                    g.get("tokenizer.ggml.tokens").expect("present"),
                    "an array",
                )
            })?,
    };
    let rope_scaling = match g.metadata.get(&key("rope.scaling.type")) {
        None => RopeScaling::None,
        Some(v) => match v.as_str() {
            Some("none") => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: g.get_f64(&key("rope.scaling.factor"))?,
            },
            _ => {
                return Err(Error::input(
                    g.path(),
                    format!("metadata key `llama.rope.scaling.type` = {v:?}: only none and linear are supported"),
                ))
            }
        },
    };
    if g.tensor("rope_freqs.weight").is_some() {
        return Err(Error::input(
            g.path(),
            "tensor `rope_freqs.weight` (llama3-style RoPE frequency factors) is not supported by the GGUF import; use the Hugging Face checkpoint, whose rope_scaling ablate reads",
        ));
    }
    let id = |k: &str| -> Result<Option<u32>> {
        match g.metadata.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|v| Some(v as u32))
                .ok_or_else(|| g.wrong_type(k, v, "a token id")),
        }
    };
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: usize_of("feed_forward_length")?,
        num_hidden_layers: usize_of("block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        max_position_embeddings: opt_u64("context_length")?.map_or(2048, |v| v as usize),
        rms_norm_eps: match g.metadata.get(&key("attention.layer_norm_rms_epsilon")) {
            Some(_) => g.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
            None => 1e-5,
        },
        rope_theta: match g.metadata.get(&key("rope.freq_base")) {
            Some(_) => g.get_f64(&key("rope.freq_base"))?,
            None => 10_000.0,
        },
        rope_scaling,
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        bos_token_id: id("tokenizer.ggml.bos_token_id")?,
        eos_token_id: id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
    };
    cfg.validate().map_err(|e| {
        Error::input(
            g.path(),
            format!("the config its metadata describes is not usable: {e}"),
        )
    })?;
    Ok(cfg)
}

/// llama.cpp tensor name → Hugging Face name, and whether it is a permuted Q/K projection.
fn hf_name(name: &str, n_layer: usize) -> Option<(String, Option<Qk>)> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some((t.to_string(), None));
    }
    let rest = name.strip_prefix("blk.")?;
    let (i, part) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    if i >= n_layer {
        return None;
    }
    let (hf, qk) = match part {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", Some(Qk::Q)),
        "attn_k.weight" => ("self_attn.k_proj.weight", Some(Qk::K)),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        _ => return None,
    };
    Some((format!("model.layers.{i}.{hf}"), qk))
}

#[derive(Clone, Copy)]
enum Qk {
    Q,
    K,
}

/// Undoes llama.cpp's `permute(w, n_head, n_head_kv)` on a `[heads·head_dim, in]` projection:
/// within each head, GGUF row `2j + t` is Hugging Face row `t·head_dim/2 + j`
/// (transformers' `_reverse_permute_weights`).
fn unpermute(w: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for j in 0..half {
            for t in 0..2 {
                let src = h * head_dim + 2 * j + t;
                let dst = h * head_dim + t * half + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Converts the GGUF at `src` into a Hugging Face Llama directory `out` (created; written to a
/// temp dir beside it and renamed into place, so a crash leaves no half directory).
pub fn import(src: &Path, out: &Path) -> Result<Imported> {
    let g = Gguf::open(src)?;
    let cfg = llama_config(&g)?;
    let tok = tokenizer::tokenizer_json(&g)?;
    if tok.vocab_len > cfg.vocab_size {
        return Err(Error::input(
            src,
            format!(
                "metadata key `tokenizer.ggml.tokens` has {} tokens but `llama.vocab_size` is {}",
                tok.vocab_len, cfg.vocab_size
            ),
        ));
    }
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    let mut n_params = 0u64;
    for t in &g.tensors {
        let Some((name, qk)) = hf_name(&t.name, cfg.num_hidden_layers) else {
            return Err(Error::input(
                src,
                format!("tensor `{}` is not part of a Llama model of {} blocks (ablate knows token_embd, output_norm, output and blk.N.{{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}})", t.name, cfg.num_hidden_layers),
            ));
        };
        let shape = t.torch_shape();
        let expected = expected_shape(&cfg, &name);
        if shape != expected {
            return Err(Error::input(
                src,
                format!(
                    "tensor `{}` has shape {shape:?} (PyTorch order), expected {expected:?} for the config in the metadata",
                    t.name
                ),
            ));
        }
        let mut data = g.read_f32(t)?;
        if let Some(qk) = qk {
            let heads = match qk {
                Qk::Q => cfg.num_attention_heads,
                Qk::K => cfg.num_key_value_heads,
            };
            data = unpermute(&data, heads, cfg.head_dim, shape[1]);
        }
        n_params += data.len() as u64;
        *types
            .entry(dequant::type_name(t.ggml_type).to_string())
            .or_default() += 1;
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
    }
    for (name, _, _) in cfg.param_layout() {
        let stored = if name == "lm_head.weight" {
            "lm_head.weight"
        } else {
            name.as_str()
        };
        if !tensors.contains_key(stored) {
            return Err(Error::input(
                src,
                format!(
                    "no tensor for `{name}` (llama.cpp name {})",
                    gguf_name(&name)
                ),
            ));
        }
    }

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    if out.exists() {
        return Err(Error::input(
            out,
            "already exists: ablate-worker import writes a new directory",
        ));
    }
    let tmp = parent.join(format!(
        ".tmp-import-{}-{}",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        unique_suffix()
    ));
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = (|| -> Result<()> {
        write_weights(&tmp, &tensors)?;
        write_json(&tmp.join("config.json"), &config_json_llama(&cfg))?;
        write_json(&tmp.join("tokenizer.json"), &tok.json)?;
        write_json(&tmp.join("tokenizer_config.json"), &tok.config)?;
        write_json(
            &tmp.join("generation_config.json"),
            &json!({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id.first()}),
        )?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, out).map_err(|e| {
        let _ = fs::remove_dir_all(&tmp);
        Error::io(out, e)
    })?;
    Ok(Imported {
        config: cfg,
        n_tensors: g.tensors.len(),
        n_params,
        types,
    })
}

fn gguf_name(hf: &str) -> String {
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" => "output.weight".into(),
        other => {
            let rest = other.strip_prefix("model.layers.").unwrap_or(other);
            let (i, part) = rest.split_once('.').unwrap_or((rest, ""));
            let p = match part {
                "input_layernorm.weight" => "attn_norm.weight",
                "post_attention_layernorm.weight" => "ffn_norm.weight",
                "self_attn.q_proj.weight" => "attn_q.weight",
                "self_attn.k_proj.weight" => "attn_k.weight",
                "self_attn.v_proj.weight" => "attn_v.weight",
                "self_attn.o_proj.weight" => "attn_output.weight",
                "mlp.gate_proj.weight" => "ffn_gate.weight",
                "mlp.up_proj.weight" => "ffn_up.weight",
                "mlp.down_proj.weight" => "ffn_down.weight",
                p => p,
            };
            format!("blk.{i}.{p}")
        }
    }
}

fn expected_shape(c: &LlamaConfig, hf: &str) -> Vec<usize> {
    let (h, q, kv, ff) = (
        c.hidden_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
        c.intermediate_size,
    );
    let part = hf
        .rsplit_once("layers.")
        .map_or(hf, |(_, r)| r.split_once('.').map_or(r, |(_, p)| p));
    match part {
        "model.embed_tokens.weight" | "lm_head.weight" => vec![c.vocab_size, h],
        "model.norm.weight" | "input_layernorm.weight" | "post_attention_layernorm.weight" => {
            vec![h]
        }
        "self_attn.q_proj.weight" => vec![q, h],
        "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => vec![kv, h],
        "self_attn.o_proj.weight" => vec![h, q],
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" => vec![ff, h],
        "mlp.down_proj.weight" => vec![h, ff],
        _ => vec![],
    }
}

/// SHA-256 of a file, hex (the cache key of an import).
fn file_sha256(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// The Hugging Face directory of `src` under `cache_dir/gguf/<sha256 prefix>/`, importing it the
/// first time. Several worker processes may race: each imports to its own temp dir and the first
/// rename wins.
pub fn ensure_imported(src: &Path, cache_dir: &Path) -> Result<PathBuf> {
    let sha = file_sha256(src)?;
    let root = cache_dir.join("gguf");
    let dir = root.join(&sha[..16]);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    remove_stale_temps(&root);
    let mine = root.join(format!(".{}.tmp-{}", &sha[..16], unique_suffix()));
    let imported = import(src, &mine)?;
    tracing::info!(gguf = %src.display(), dir = %dir.display(), params = imported.n_params, "imported GGUF");
    match fs::rename(&mine, &dir) {
        Ok(()) => {}
        Err(_) if dir.join("config.json").is_file() => {
            let _ = fs::remove_dir_all(&mine);
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&mine);
            return Err(Error::io(&dir, e));
        }
    }
    Ok(dir)
}
