//! A `tokenizer.json` from a GGUF's `tokenizer.ggml.*` metadata, built as transformers'
//! GGUF loader builds its fast tokenizer (`GGUFGPTConverter`, a `GPT2Converter`), so that
//! ablate, transformers loading the GGUF, and transformers loading the imported directory split
//! every text into the same ids.
//!
//! For `tokenizer.ggml.model = "gpt2"` (byte-level BPE: SmolLM2, Llama 3, Qwen), as transformers
//! 5's `byte_level_tokenizer` + `add_gguf_special_tokens`: a BPE model over
//! `tokenizer.ggml.tokens` (id = position; a token spelled outside GPT-2's byte alphabet respelled
//! from its UTF-8 bytes) and `tokenizer.ggml.merges` (`"a b"` pairs, in rank order); no
//! normalizer; the byte-level pre-tokenizer with GPT-2's split regex; the byte-level decoder; a
//! template post-processor that adds BOS/EOS only when `tokenizer.ggml.add_bos_token` /
//! `add_eos_token` say so; tokens typed CONTROL as special added tokens (never split, skipped when
//! decoding) and USER_DEFINED as plain added tokens. The `tokenizer.ggml.pre` names whose split
//! regex transformers replaces (llama-bpe, qwen2, …) are an error rather than a silent
//! difference; SentencePiece GGUFs (`"llama"`: TinyLlama, Llama 2) are not converted either.

use serde_json::{json, Map, Value as Json};

use super::reader::{Gguf, Value};
use crate::{Error, Result};

/// `tokenizer.ggml.pre` values for which transformers uses another split regex than GPT-2's
/// (its `GGUF_PRE_TOKENIZER_SPLITS`).
const OTHER_SPLITS: &[&str] = &[
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "dbrx",
    "smaug-bpe",
    "tekken",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "megrez",
    "qwen35",
    "gpt-4o",
    "llama4",
    "kanana2",
    "talkie",
    "minimax-m2",
];

/// The files an import writes for the tokenizer.
pub struct TokenizerFiles {
    pub json: Json,
    pub config: Json,
    pub vocab_len: usize,
}

fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>> {
    let v = g.get(key)?;
    let arr = v
        .as_array()
        .ok_or_else(|| g.wrong_type(key, v, "an array of strings"))?;
    arr.iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str().ok_or_else(|| {
                Error::input(
                    g.path(),
                    format!("metadata key `{key}`: element {i} is not a string"),
                )
            })
        })
        .collect()
}

fn opt_bool(g: &Gguf, key: &str) -> Result<Option<bool>> {
    match g.metadata.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| g.wrong_type(key, v, "a bool")),
    }
}

fn opt_id(g: &Gguf, key: &str, n: usize) -> Result<Option<u32>> {
    match g.metadata.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(id) if (id as usize) < n => Ok(Some(id as u32)),
            Some(id) => Err(Error::input(
                g.path(),
                format!("metadata key `{key}` = {id} is not a token id (the vocabulary has {n})"),
            )),
            None => Err(g.wrong_type(key, v, "a token id")),
        },
    }
}

/// Builds tokenizer.json and tokenizer_config.json from the metadata.
pub fn tokenizer_json(g: &Gguf) -> Result<TokenizerFiles> {
    let model = g.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(Error::input(
            g.path(),
            format!(
                "metadata key `tokenizer.ggml.model` is \"{model}\": ablate builds byte-level BPE tokenizers (\"gpt2\") from GGUF metadata; SentencePiece (\"llama\") and others are not supported"
            ),
        ));
    }
    if let Some(Value::Str(pre)) = g.metadata.get("tokenizer.ggml.pre") {
        if OTHER_SPLITS.contains(&pre.as_str()) {
            return Err(Error::input(
                g.path(),
                format!("metadata key `tokenizer.ggml.pre` is \"{pre}\": that vocabulary splits text with its own regex, which ablate's GGUF import does not build yet (GPT-2's split is what it builds, as for \"smollm\" and \"gpt2\")"),
            ));
        }
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let n = tokens.len();
    let merges_raw = strings(g, "tokenizer.ggml.merges")?;
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let Some((a, b)) = m.split_once(' ') else {
            return Err(Error::input(
                g.path(),
                format!("metadata key `tokenizer.ggml.merges`: element {i} ({m:?}) is not two tokens separated by a space"),
            ));
        };
        merges.push(json!([a, b]));
    }
    let alphabet_v = byte_alphabet();
    let mut vocab = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        // A token spelled outside GPT-2's byte alphabet is respelled from its UTF-8 bytes, and
        // a token listed twice keeps its last id, as transformers' `byte_level_tokenizer` does.
        let key = if t.chars().all(|c| alphabet_v.contains(&c)) {
            (*t).to_string()
        } else {
            t.bytes().map(byte_char).collect()
        };
        vocab.insert(key, json!(i));
    }
    let add_prefix_space = opt_bool(g, "tokenizer.ggml.add_space_prefix")?.unwrap_or(false);
    let add_bos = opt_bool(g, "tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let bos = opt_id(g, "tokenizer.ggml.bos_token_id", n)?;
    let eos = opt_id(g, "tokenizer.ggml.eos_token_id", n)?;
    let unk = opt_id(g, "tokenizer.ggml.unknown_token_id", n)?;
    let pad = opt_id(g, "tokenizer.ggml.padding_token_id", n)?;

    // As transformers' `add_gguf_special_tokens`: tokens typed CONTROL (3) are special added
    // tokens, USER_DEFINED (4) plain added tokens; a control token spelled outside the byte
    // alphabet is a llama.cpp mislabel and is left out.
    let types: Vec<u64> = match g.metadata.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .ok_or_else(|| g.wrong_type("tokenizer.ggml.token_type", v, "an array"))?
            .iter()
            .map(|x| x.as_u64().unwrap_or(0))
            .collect(),
    };
    let alphabet = byte_alphabet();
    let spelled = |s: &str| s.chars().all(|c| alphabet.contains(&c));
    let mut added: Vec<Json> = Vec::new();
    for (id, (tok, ty)) in tokens.iter().zip(types.iter()).enumerate() {
        let special = match ty {
            3 if spelled(tok) => true,
            4 => false,
            _ => continue,
        };
        added.push(json!({
            "id": id,
            "content": tok,
            "single_word": false,
            "lstrip": false,
            "rstrip": false,
            "normalized": false,
            "special": special,
        }));
    }
    let add_eos = opt_bool(g, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    // transformers 5 writes the post-processor from add_bos_token/add_eos_token: a template
    // with the BOS/EOS tokens when asked for, else the sequences alone.
    let piece = |id: u32| json!({"SpecialToken": {"id": tokens[id as usize], "type_id": 0}});
    let seq = |s: &str, ty: u32| json!({"Sequence": {"id": s, "type_id": ty}});
    let mut single = Vec::new();
    let mut specials = Map::new();
    let bos_used = bos.filter(|_| add_bos);
    let eos_used = eos.filter(|_| add_eos);
    for id in [bos_used, eos_used].into_iter().flatten() {
        let c = tokens[id as usize];
        specials.insert(c.to_string(), json!({"id": c, "ids": [id], "tokens": [c]}));
    }
    single.extend(bos_used.map(piece));
    single.push(seq("A", 0));
    single.extend(eos_used.map(piece));
    let mut pair = single.clone();
    pair.extend(
        bos_used.map(|b| json!({"SpecialToken": {"id": tokens[b as usize], "type_id": 1}})),
    );
    pair.push(seq("B", 1));
    pair.extend(
        eos_used.map(|e| json!({"SpecialToken": {"id": tokens[e as usize], "type_id": 1}})),
    );
    let post = json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": specials,
    });
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": true},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });
    let name = |id: Option<u32>| id.map(|i| Json::from(tokens[i as usize]));
    let mut cfg = Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    cfg.insert("add_bos_token".into(), json!(add_bos));
    cfg.insert("add_eos_token".into(), json!(add_eos));
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    for (k, id) in [
        ("bos_token", bos),
        ("eos_token", eos),
        ("unk_token", unk),
        ("pad_token", pad),
    ] {
        if let Some(v) = name(id) {
            cfg.insert(k.into(), v);
        }
    }
    if let Some(max) = g
        .metadata
        .get("llama.context_length")
        .and_then(Value::as_u64)
    {
        cfg.insert("model_max_length".into(), json!(max));
    }
    if let Some(Value::Str(t)) = g.metadata.get("tokenizer.chat_template") {
        cfg.insert("chat_template".into(), json!(t));
    }
    Ok(TokenizerFiles {
        json: tj,
        config: Json::Object(cfg),
        vocab_len: n,
    })
}

/// GPT-2's `bytes_to_unicode`: the printable character that stands for each byte.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(b) {
        return char::from(b);
    }
    // The other bytes map, in order, to 256, 257, ...
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).expect("valid code point")
}

fn byte_alphabet() -> std::collections::HashSet<char> {
    (0..=255u8).map(byte_char).collect()
}
