//! Parity with Hugging Face transformers on committed fixtures, one per model family.
//!
//! `scripts/parity_fixture.py` built `fixtures/tiny-gpt2/` and `scripts/parity_fixture_llama.py`
//! built `fixtures/tiny-llama/` (real `save_pretrained` directories with a byte-level BPE
//! `tokenizer.json`; the Llama one with grouped-query attention, an untied head and llama3 RoPE
//! scaling) and recorded what `GPT2LMHeadModel` / `LlamaForCausalLM` compute for two token
//! windows in `fixtures/tiny-*-reference.json`. These tests load the directories with
//! `load_hf_dir` (which picks the family from config.json) and require the same logits (1e-4
//! absolute) and perplexity (1e-4 relative), and for Llama the same rotary inverse frequencies
//! as transformers for every RoPE type. They need no Python: the reference numbers are
//! committed.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use experiments::checkpoint::{load_gpt2_dir, load_hf_dir};
use experiments::model::Trainable;
use experiments::model::{Family, LlamaConfig, RopeScaling};
use experiments::ops::nll_sum;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn reference() -> Value {
    reference_of("tiny-gpt2")
}

fn reference_of(fixture: &str) -> Value {
    let text =
        std::fs::read_to_string(fixtures().join(format!("{fixture}-reference.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_of(r: &Value) -> Vec<Vec<u32>> {
    r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        })
        .collect()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn logits_and_perplexity_match_transformers() -> anyhow::Result<()> {
    check_fixture("tiny-gpt2", Family::Gpt2)
}

#[test]
fn llama_logits_and_perplexity_match_transformers() -> anyhow::Result<()> {
    check_fixture("tiny-llama", Family::Llama)
}

/// Loads `fixtures/NAME/`, runs the reference windows, and holds logits and perplexity to the
/// reference file's.
fn check_fixture(name: &str, family: Family) -> anyhow::Result<()> {
    let r = reference_of(name);
    let dev = Device::Cpu;
    let model = load_hf_dir(&fixtures().join(name), None, &dev)?;
    assert_eq!(model.family(), family);
    let windows = ids_of(&r);
    let (b, t) = (windows.len(), windows[0].len());
    let flat: Vec<u32> = windows.concat();
    let ids = Tensor::from_vec(flat.clone(), (b, t), &dev)?;
    let logits = model.forward(&ids)?; // (B, T, V)
    let v = model.dims().vocab_size;
    let all: Vec<Vec<Vec<f32>>> = logits.to_vec3()?;

    // Full rows at a few positions.
    let mut max_diff = 0f64;
    for row in r["full_rows"].as_array().unwrap() {
        let bi = row["batch"].as_u64().unwrap() as usize;
        let ti = row["pos"].as_u64().unwrap() as usize;
        let want = f64s(&row["logits"]);
        assert_eq!(want.len(), v);
        for (x, w) in all[bi][ti].iter().zip(&want) {
            max_diff = max_diff.max((*x as f64 - w).abs());
        }
    }
    // Row sums and sums of squares cover every logit of every position. A per-logit error of
    // at most 1e-4 bounds |Δ sum| by V·1e-4 and |Δ sum of squares| by ~2·1e-4·Σ|x|; report the
    // measured difference as a fraction of that bound (must stay below 1).
    let mut max_sum_frac = 0f64;
    for (key, square) in [("row_sum", false), ("row_sq_sum", true)] {
        for (bi, rows) in r[key].as_array().unwrap().iter().enumerate() {
            for (ti, want) in f64s(rows).iter().enumerate() {
                let row = &all[bi][ti];
                let got: f64 = row
                    .iter()
                    .map(|&x| if square { (x as f64).powi(2) } else { x as f64 })
                    .sum();
                let bound = if square {
                    2e-4 * row.iter().map(|&x| (x as f64).abs()).sum::<f64>() + v as f64 * 1e-8
                } else {
                    v as f64 * 1e-4
                };
                max_sum_frac = max_sum_frac.max((got - want).abs() / bound);
            }
        }
    }

    // Perplexity over next-token predictions of both windows.
    let inputs = logits
        .narrow(1, 0, t - 1)?
        .contiguous()?
        .reshape((b * (t - 1), v))?;
    let targets: Vec<u32> = windows.iter().flat_map(|w| w[1..].to_vec()).collect();
    let targets = Tensor::from_vec(targets, b * (t - 1), &dev)?;
    let nll = nll_sum(&inputs, &targets)?;
    let count = r["predicted_tokens"].as_f64().unwrap();
    let ppl = (nll / count).exp();
    let want_ppl = r["perplexity"].as_f64().unwrap();
    let ppl_rel = (ppl - want_ppl).abs() / want_ppl;

    println!(
        "{name} parity vs transformers {}: max |logit diff| {max_diff:.3e}, row-sum diff {max_sum_frac:.3e} of the 1e-4 bound, \
         perplexity {ppl:.6} vs {want_ppl:.6} (rel {ppl_rel:.3e})",
        r["transformers"]
    );
    assert!(max_diff < 1e-4, "max abs logit diff {max_diff}");
    assert!(
        max_sum_frac < 1.0,
        "row sums differ: {max_sum_frac} of the bound"
    );
    assert!(ppl_rel < 1e-4, "perplexity {ppl} vs {want_ppl}");
    Ok(())
}

#[test]
fn graph_free_forward_equals_training_forward() -> anyhow::Result<()> {
    let r = reference();
    let dev = Device::Cpu;
    let model = load_gpt2_dir(&fixtures().join("tiny-gpt2"), None, &dev)?;
    let windows = ids_of(&r);
    let ids = Tensor::from_vec(windows.concat(), (windows.len(), windows[0].len()), &dev)?;
    let a = model.forward(&ids)?;
    let frozen = model.forward_with(&ids, &Trainable::none(model.config().n_layer))?;
    let d = (a - frozen)?.abs()?.max_all()?.to_scalar::<f32>()?;
    assert_eq!(d, 0.0);
    Ok(())
}

#[test]
fn fixture_tokenizer_encodes_like_python() -> anyhow::Result<()> {
    let r = reference();
    let tok = tokenizers::Tokenizer::from_file(fixtures().join("tiny-gpt2/tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let enc = tok
        .encode(r["text"].as_str().unwrap(), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let want: Vec<u32> = r["text_ids_prefix"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(&enc.get_ids()[..want.len()], want.as_slice());
    Ok(())
}

#[test]
fn max_blocks_load_equals_truncate() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let dir = fixtures().join("tiny-gpt2");
    let full = load_gpt2_dir(&dir, None, &dev)?;
    let one = load_gpt2_dir(&dir, Some(1), &dev)?;
    assert_eq!(one.config().n_layer, 1);
    let trunc = full.truncate(1)?;
    let a = one.named_vars();
    let b = trunc.named_vars();
    assert_eq!(
        a.iter().map(|x| &x.0).collect::<Vec<_>>(),
        b.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    assert!(a.iter().all(|(n, _)| !n.starts_with("h.1.")));
    for ((n, x), (_, y)) in a.iter().zip(&b) {
        let d = (x.as_tensor() - y.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{n}");
    }
    // The truncated model is a copy: changing it leaves the full model alone.
    let wte = trunc.var("wte.weight")?;
    wte.set(&wte.as_tensor().zeros_like()?)?;
    let full_wte = full
        .var("wte.weight")?
        .as_tensor()
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    assert!(full_wte > 0.0);
    // A 0-block or too-deep request is a config error, not a panic.
    assert!(load_hf_dir(&dir, Some(0), &dev).is_err());
    assert!(load_hf_dir(&dir, Some(3), &dev).is_err());
    // The family-generic truncation gives the same model as the GPT-2 one.
    let generic = experiments::model::truncate(&full, 1)?;
    for ((n, x), (m, y)) in generic.named_vars().iter().zip(&a) {
        assert_eq!(n, m);
        let d = (x.as_tensor() - y.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0, "{n}");
    }
    Ok(())
}

#[test]
fn llama_fixture_tokenizer_encodes_like_python() -> anyhow::Result<()> {
    let r = reference_of("tiny-llama");
    let tok = tokenizers::Tokenizer::from_file(fixtures().join("tiny-llama/tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let enc = tok
        .encode(r["text"].as_str().unwrap(), false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let want: Vec<u32> = r["text_ids_prefix"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(&enc.get_ids()[..want.len()], want.as_slice());
    Ok(())
}

/// The rotary inverse frequencies of every RoPE type ablate implements, at two head widths,
/// against what transformers' `LlamaRotaryEmbedding` computed (committed in the reference): equal
/// bit for bit, as `LlamaConfig::inv_freq` follows torch's order of f32 operations.
#[test]
fn rope_inverse_frequencies_match_transformers() -> anyhow::Result<()> {
    let r = reference_of("tiny-llama");
    let cases = r["inv_freq"].as_array().unwrap();
    assert_eq!(cases.len(), 6, "default, linear, llama3 at two widths");
    let base = LlamaConfig::preset("tiny-llama").unwrap();
    let mut worst_ulps = 0u32;
    for case in cases {
        let sc = &case["rope_scaling"];
        let scaling = match sc["rope_type"].as_str() {
            None => RopeScaling::None,
            Some("linear") => RopeScaling::Linear {
                factor: sc["factor"].as_f64().unwrap(),
            },
            Some("llama3") => RopeScaling::Llama3 {
                factor: sc["factor"].as_f64().unwrap(),
                low_freq_factor: sc["low_freq_factor"].as_f64().unwrap(),
                high_freq_factor: sc["high_freq_factor"].as_f64().unwrap(),
                original_max_position_embeddings: sc["original_max_position_embeddings"]
                    .as_u64()
                    .unwrap() as usize,
            },
            Some(other) => panic!("unexpected rope type {other}"),
        };
        let cfg = LlamaConfig {
            head_dim: case["head_dim"].as_u64().unwrap() as usize,
            rope_theta: case["rope_theta"].as_f64().unwrap(),
            rope_scaling: scaling.clone(),
            ..base.clone()
        };
        let want: Vec<f32> = f64s(&case["inv_freq"]).iter().map(|&x| x as f32).collect();
        let got = cfg.inv_freq();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let ulps = (g.to_bits() as i64 - w.to_bits() as i64).unsigned_abs() as u32;
            worst_ulps = worst_ulps.max(ulps);
            assert!(
                ulps == 0,
                "{scaling:?}, head_dim {}: inv_freq[{i}] = {g:e}, transformers {w:e} ({ulps} ulps)",
                cfg.head_dim
            );
        }
    }
    println!("rope inverse frequencies: worst difference {worst_ulps} f32 ulps");
    Ok(())
}
