//! The manual CPU backward (`experiments::backward`, what training runs on the CPU) against
//! candle's autograd through the same model, for both families: the same loss, the same set of
//! gradients (every trainable parameter, no frozen one) and the same values, under every kind of
//! training mask — everything trainable, freeze (top group only), gradual unfreezing mid-way,
//! Inheritune's truncated model, and hand-made masks that split a tied embedding table between
//! its embedding and head uses. The Llama cases run grouped-query attention with tied and untied
//! heads and llama3 RoPE scaling.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor, Var};
use experiments::backward;
use experiments::methods::{self, LayerGroups};
use experiments::model::{
    CausalLm, Gpt2, Gpt2Config, Llama, LlamaConfig, ModelConfig, RopeScaling, Trainable,
};
use experiments::ops;
use experiments::optim::GradAccumulator;
use experiments::train::{to_trainable, trainable_params};
use experiments::trial::{LoraTarget, Method};

type Res<T> = anyhow::Result<T>;

/// Odd sizes on purpose: a vocabulary that is no multiple of 8, a context shorter than the
/// position table, three heads of width 8.
fn cfg() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 97,
        n_positions: 24,
        n_embd: 24,
        n_layer: 4,
        n_head: 3,
        layer_norm_epsilon: 1e-5,
    }
}

/// Deterministic values in [-1, 1) (xorshift).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

/// Moves every parameter off its initialisation (norm weights and biases by more), so a
/// gradient that ignored one would show.
fn perturb(m: &dyn CausalLm) -> Res<()> {
    for (i, (name, var)) in m.named_vars().into_iter().enumerate() {
        let noise = Tensor::from_vec(
            values(var.elem_count(), 100 + i as u64),
            var.dims(),
            &Device::Cpu,
        )?;
        let scale = if name.ends_with("bias") || name.contains("ln_") || name.contains("norm") {
            0.3
        } else {
            0.05
        };
        var.set(&(var.as_tensor() + (noise * scale)?)?)?;
    }
    Ok(())
}

/// A random model whose layer norms and biases are not at their identity/zero initialisation
/// (so a gradient that ignored them would show).
fn model() -> Res<Gpt2> {
    let m = Gpt2::new_random(&cfg(), 7, &Device::Cpu)?;
    perturb(&m)?;
    Ok(m)
}

fn batch(vocab: usize, b: usize, t: usize) -> Res<(Tensor, Tensor)> {
    let ids: Vec<u32> = values(b * t, 1)
        .iter()
        .map(|v| ((v + 1.0) * 1000.0) as u32 % vocab as u32)
        .collect();
    let tg: Vec<u32> = values(b * t, 2)
        .iter()
        .map(|v| ((v + 1.0) * 1000.0) as u32 % vocab as u32)
        .collect();
    Ok((
        Tensor::from_vec(ids, (b, t), &Device::Cpu)?,
        Tensor::from_vec(tg, b * t, &Device::Cpu)?,
    ))
}

/// Names of the parameters `tr` makes live, worked out from the names (not from the model's
/// parts, which are under test too): for GPT-2, see `Trainable` for the tied wte.
fn live_names(m: &dyn CausalLm, tr: &Trainable) -> Vec<String> {
    let mut names = match m.model_config() {
        ModelConfig::Gpt2(c) => live_names_gpt2(&c, tr),
        ModelConfig::Llama(c) => live_names_llama(&c, tr),
    };
    // LoRA adapters: `<module>.lora_A.weight` / `lora_B`, live with their block's flag.
    if let Some(l) = m.lora() {
        for (module, _, blk, _) in l.adapters() {
            if tr.adapter(blk) {
                names.push(format!("{module}.lora_A.weight"));
                names.push(format!("{module}.lora_B.weight"));
            }
        }
    }
    names
}

/// Llama: the embeddings (trained by the head too when tied), `model.layers.{j}.*` by block,
/// `model.norm` and `lm_head` with the top.
fn live_names_llama(c: &LlamaConfig, tr: &Trainable) -> Vec<String> {
    c.param_layout()
        .into_iter()
        .map(|(n, _, _)| n)
        .filter(|n| {
            if n == "model.embed_tokens.weight" {
                tr.embeddings || (c.tie_word_embeddings && tr.top)
            } else if let Some(rest) = n.strip_prefix("model.layers.") {
                let j: usize = rest.split('.').next().unwrap().parse().unwrap();
                tr.blocks[j]
            } else {
                assert!(n == "model.norm.weight" || n == "lm_head.weight", "{n}");
                tr.top
            }
        })
        .collect()
}

fn live_names_gpt2(c: &Gpt2Config, tr: &Trainable) -> Vec<String> {
    c.param_shapes()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| {
            if n == "wte.weight" {
                tr.embeddings || tr.top
            } else if n == "wpe.weight" {
                tr.embeddings
            } else if let Some(rest) = n.strip_prefix("h.") {
                let j: usize = rest.split('.').next().unwrap().parse().unwrap();
                tr.blocks[j]
            } else {
                tr.top
            }
        })
        .collect()
}

type Grads = BTreeMap<String, Tensor>;

fn autograd(
    m: &dyn CausalLm,
    ids: &Tensor,
    tg: &Tensor,
    tr: &Trainable,
    refs: &[(&str, &Var)],
) -> Res<(f64, Grads)> {
    let logits = m.forward_with(ids, tr)?;
    let v = logits.dim(2)?;
    let logits = logits.reshape((tg.elem_count(), v))?;
    let loss = ops::cross_entropy(&logits, tg)?;
    let mut acc = GradAccumulator::new();
    acc.add(&loss.backward()?, refs)?;
    Ok((loss.to_scalar::<f32>()? as f64, acc.finish()?))
}

fn manual(
    m: &dyn CausalLm,
    ids: &Tensor,
    tg: &Tensor,
    tr: &Trainable,
    refs: &[(&str, &Var)],
) -> Res<(f64, Grads)> {
    let r =
        backward::loss_and_grads(m, ids, tg, tr)?.expect("an f32 CPU model takes the manual path");
    let names: Vec<&String> = r.grads.keys().collect();
    let mut want: Vec<&str> = refs.iter().map(|(n, _)| *n).collect();
    want.sort();
    assert_eq!(
        names, want,
        "the manual backward must return exactly the live parameters"
    );
    let mut acc = GradAccumulator::new();
    acc.add_named(r.grads, refs)?;
    Ok((r.loss, acc.finish()?))
}

/// Both paths on one mask; returns the worst relative difference (max |a − b| / max |b|).
fn compare(what: &str, m: &dyn CausalLm, tr: &Trainable) -> Res<f64> {
    compare_on(what, m, tr, 3, 20)
}

/// [`compare`] on a batch of `b` windows of `t` tokens.
fn compare_on(what: &str, m: &dyn CausalLm, tr: &Trainable, b: usize, t: usize) -> Res<f64> {
    let (ids, tg) = batch(m.dims().vocab_size, b, t)?;
    let names = live_names(m, tr);
    assert!(!names.is_empty(), "{what}: the mask trains nothing");
    let all = m.named_vars();
    let vars: Vec<(String, Var)> = names
        .iter()
        .map(|n| {
            let v = all
                .iter()
                .find(|(k, _)| k == n)
                .expect("a parameter")
                .1
                .clone();
            (n.clone(), v)
        })
        .collect();
    let refs: Vec<(&str, &Var)> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let (la, ga) = autograd(m, &ids, &tg, tr, &refs)?;
    let (lm, gm) = manual(m, &ids, &tg, tr, &refs)?;
    assert!(
        (la - lm).abs() < 1e-5 * la.abs(),
        "{what}: loss {la} (autograd) vs {lm} (manual)"
    );
    assert_eq!(
        ga.keys().collect::<Vec<_>>(),
        gm.keys().collect::<Vec<_>>(),
        "{what}"
    );
    let mut worst = 0f64;
    for (name, a) in &ga {
        let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let b: Vec<f32> = gm[name].flatten_all()?.to_vec1()?;
        assert_eq!(a.len(), b.len(), "{what}: {name}");
        let scale = a.iter().fold(0f32, |s, v| s.max(v.abs())) as f64;
        assert!(
            scale > 0.0,
            "{what}: {name} has an all-zero autograd gradient"
        );
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f32, |s, (x, y)| s.max((x - y).abs())) as f64;
        let rel = diff / scale;
        assert!(
            rel < 1e-5,
            "{what}: {name} differs by {rel:.2e} of its largest entry ({diff:.3e} / {scale:.3e})"
        );
        worst = worst.max(rel);
    }
    eprintln!(
        "{what}: {} gradients, worst relative difference {worst:.2e}",
        ga.len()
    );
    Ok(worst)
}

/// The mask a method gives at `step` with 4 layer groups (embeddings, 3 block groups... the last
/// with ln_f and the head), checked against the training loop's parameter list.
fn method_mask(m: &dyn CausalLm, method: &Method, step: u64) -> Res<Trainable> {
    let n_layer = m.dims().n_layer;
    let groups = methods::effective_groups(method, 4, n_layer);
    let lg = LayerGroups::new(n_layer, groups)?;
    let on = methods::active_groups(method, groups, step)?;
    let tr = to_trainable(&lg.mask_for(method, &on));
    let named = m.params();
    let only = methods::adapters_only(method);
    let mut from_loop: Vec<String> = trainable_params(&named, &lg, &on, &vec![1.0; groups], only)
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    from_loop.sort();
    let mut ours = live_names(m, &tr);
    ours.sort();
    assert_eq!(
        from_loop, ours,
        "{method:?}: the mask and the training loop disagree"
    );
    Ok(tr)
}

#[test]
fn manual_backward_matches_autograd_when_everything_trains() -> Res<()> {
    let m = model()?;
    compare("full", &m, &Trainable::all(4))?;
    Ok(())
}

#[test]
fn manual_backward_matches_autograd_under_freeze_and_gradual() -> Res<()> {
    let m = model()?;
    let tr = method_mask(&m, &Method::Freeze { top: 1 }, 0)?;
    assert!(!tr.embeddings && tr.top && tr.blocks.iter().filter(|b| **b).count() < 4);
    compare("freeze top 1", &m, &tr)?;
    let tr = method_mask(&m, &Method::Gradual { stage_steps: 10 }, 15)?;
    assert!(!tr.embeddings && tr.blocks.iter().any(|b| !b) && tr.blocks.iter().any(|b| *b));
    compare("gradual, second stage", &m, &tr)?;
    let tr = method_mask(&m, &Method::Gradual { stage_steps: 10 }, 35)?;
    assert_eq!(tr, Trainable::all(4));
    compare("gradual, last stage", &m, &tr)?;
    Ok(())
}

#[test]
fn manual_backward_matches_autograd_on_an_inheritune_model() -> Res<()> {
    let m = model()?.truncate(2)?;
    let tr = method_mask(&m, &Method::Inheritune { blocks: 2 }, 0)?;
    compare("inheritune (2 of 4 blocks)", &m, &tr)?;
    Ok(())
}

#[test]
fn manual_backward_matches_autograd_when_the_tied_wte_trains_through_one_use() -> Res<()> {
    let m = model()?;
    // Embeddings and one middle block, head frozen: wte gets only its embedding gradient, and
    // the gradient still flows through the frozen ln_f, head and top blocks.
    let tr = Trainable {
        embeddings: true,
        blocks: vec![false, true, false, false],
        top: false,
        adapters: Vec::new(),
    };
    compare("embeddings + block 1", &m, &tr)?;
    // Only ln_f and the head: wte gets only its head gradient, no block is visited.
    let tr = Trainable {
        embeddings: false,
        blocks: vec![false; 4],
        top: true,
        adapters: Vec::new(),
    };
    compare("head only", &m, &tr)?;
    // A lone bottom block under a frozen top.
    let tr = Trainable {
        embeddings: false,
        blocks: vec![true, false, false, false],
        top: false,
        adapters: Vec::new(),
    };
    compare("block 0 only", &m, &tr)?;
    Ok(())
}

#[test]
fn manual_backward_matches_autograd_when_sums_and_gemms_are_split_across_tasks() -> Res<()> {
    // 8 × 64 rows of 64 wide: the column sums of the bias and layer-norm gradients run in
    // several parallel tasks and the GEMMs are big enough to be split, so the two paths no
    // longer add in the same order; they must still agree to float rounding.
    let cfg = Gpt2Config {
        vocab_size: 500,
        n_positions: 64,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        layer_norm_epsilon: 1e-5,
    };
    let m = Gpt2::new_random(&cfg, 3, &Device::Cpu)?;
    compare_on("wider model, full", &m, &Trainable::all(2), 8, 64)?;
    let tr = Trainable {
        embeddings: false,
        blocks: vec![false, true],
        top: true,
        adapters: Vec::new(),
    };
    compare_on("wider model, top block and head", &m, &tr, 8, 64)?;
    Ok(())
}

#[test]
fn manual_backward_rejects_out_of_vocabulary_ids() -> Res<()> {
    let m = model()?;
    let ids = Tensor::from_vec(vec![0u32, 5, 97, 1], (1, 4), &Device::Cpu)?;
    let tg = Tensor::from_vec(vec![1u32, 2, 3, 4], 4, &Device::Cpu)?;
    let err = backward::loss_and_grads(&m, &ids, &tg, &Trainable::all(4))
        .err()
        .expect("id 97 is outside a vocabulary of 97");
    assert!(err.to_string().contains("97"), "{err}");
    let tg = Tensor::from_vec(vec![1u32, 2, 300, 4], 4, &Device::Cpu)?;
    let ids = Tensor::from_vec(vec![0u32, 5, 6, 1], (1, 4), &Device::Cpu)?;
    let err = backward::loss_and_grads(&m, &ids, &tg, &Trainable::all(4))
        .err()
        .expect("target 300 is outside the vocabulary");
    assert!(err.to_string().contains("300"), "{err}");
    Ok(())
}

// ---- Llama ------------------------------------------------------------------------------------

/// Odd sizes again: vocabulary 97, 6 query heads of width 6 sharing 2 key/value heads (3 each),
/// intermediate 40, four blocks, llama3 RoPE over a short original context.
fn llama_cfg(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 97,
        hidden_size: 24,
        intermediate_size: 40,
        num_hidden_layers: 4,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        head_dim: 6,
        max_position_embeddings: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::Llama3 {
            factor: 4.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8,
        },
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_id: vec![],
    }
}

fn llama(tied: bool) -> Res<Llama> {
    let m = Llama::new_random(&llama_cfg(tied), 11, &Device::Cpu)?;
    perturb(&m)?;
    Ok(m)
}

#[test]
fn llama_manual_backward_matches_autograd_when_everything_trains() -> Res<()> {
    for tied in [true, false] {
        let m = llama(tied)?;
        compare(&format!("llama tied={tied}, full"), &m, &Trainable::all(4))?;
    }
    Ok(())
}

#[test]
fn llama_manual_backward_matches_autograd_under_freeze_gradual_and_inheritune() -> Res<()> {
    for tied in [true, false] {
        let m = llama(tied)?;
        let tr = method_mask(&m, &Method::Freeze { top: 1 }, 0)?;
        assert!(!tr.embeddings && tr.top);
        compare(&format!("llama tied={tied}, freeze top 1"), &m, &tr)?;
        let tr = method_mask(&m, &Method::Gradual { stage_steps: 10 }, 15)?;
        assert!(tr.blocks.iter().any(|b| !b) && tr.blocks.iter().any(|b| *b));
        compare(&format!("llama tied={tied}, gradual second stage"), &m, &tr)?;
        let small = m.truncate(2)?;
        let tr = method_mask(&small, &Method::Inheritune { blocks: 2 }, 0)?;
        compare(
            &format!("llama tied={tied}, inheritune 2 of 4"),
            &small,
            &tr,
        )?;
    }
    Ok(())
}

#[test]
fn llama_manual_backward_matches_autograd_under_hand_made_masks() -> Res<()> {
    for tied in [true, false] {
        let m = llama(tied)?;
        let masks = [
            ("head only", false, vec![false; 4], true),
            (
                "embeddings + block 1",
                true,
                vec![false, true, false, false],
                false,
            ),
            (
                "block 0 only",
                false,
                vec![true, false, false, false],
                false,
            ),
            ("embeddings only", true, vec![false; 4], false),
        ];
        for (what, embeddings, blocks, top) in masks {
            let tr = Trainable {
                embeddings,
                blocks,
                top,
                adapters: Vec::new(),
            };
            compare(&format!("llama tied={tied}, {what}"), &m, &tr)?;
        }
    }
    Ok(())
}

#[test]
fn llama_manual_backward_matches_autograd_when_work_is_split_across_tasks() -> Res<()> {
    // 8 × 64 rows 64 wide, 8 heads over 4 KV heads: the norms' weight sums, the GEMMs, the rope
    // and the attention tasks all split, and the two paths add in different orders.
    let cfg = LlamaConfig {
        vocab_size: 500,
        hidden_size: 64,
        intermediate_size: 160,
        num_hidden_layers: 2,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        head_dim: 8,
        max_position_embeddings: 64,
        rope_scaling: RopeScaling::None,
        ..llama_cfg(true)
    };
    let m = Llama::new_random(&cfg, 3, &Device::Cpu)?;
    compare_on("wider llama, full", &m, &Trainable::all(2), 8, 64)?;
    Ok(())
}

/// A LoRA model: adapters attached as the trial runner attaches them, then every parameter
/// (adapters included, so B is not zero) moved off its start.
fn with_lora(mut m: Box<dyn CausalLm>, method: &Method) -> Res<Box<dyn CausalLm>> {
    let n_layer = m.dims().n_layer;
    let spec = methods::lora_spec(method, 4, n_layer)?.expect("a LoRA method");
    m.attach_lora(&spec, 3)?;
    perturb(&*m)?;
    Ok(m)
}

fn lora(rank: usize, targets: &[LoraTarget], groups: Option<usize>) -> Method {
    Method::Lora {
        rank,
        alpha: 16.0,
        targets: targets.to_vec(),
        groups,
    }
}

#[test]
fn manual_backward_matches_autograd_for_lora_adapters() -> Res<()> {
    use LoraTarget::{Attn, Mlp};
    let cases = [
        ("all layers, every block", lora(4, &[Attn, Mlp], None)),
        ("attention, top group", lora(2, &[Attn], Some(1))),
        ("mlp, top two groups", lora(3, &[Mlp], Some(2))),
    ];
    for (what, method) in &cases {
        let m = with_lora(Box::new(model()?), method)?;
        let tr = method_mask(&*m, method, 0)?;
        assert!(!tr.embeddings && !tr.top && tr.blocks.iter().all(|b| !b));
        compare(&format!("gpt2 lora {what}"), &*m, &tr)?;
        for tied in [true, false] {
            let m = with_lora(Box::new(llama(tied)?), method)?;
            let tr = method_mask(&*m, method, 0)?;
            compare(&format!("llama tied={tied} lora {what}"), &*m, &tr)?;
        }
    }
    Ok(())
}

#[test]
fn a_fresh_lora_adapter_leaves_the_model_unchanged_and_a_trained_one_merges() -> Res<()> {
    let (ids, _) = batch(97, 2, 12)?;
    let base = model()?;
    let before: Vec<f32> = base.forward(&ids)?.flatten_all()?.to_vec1()?;
    let mut m: Box<dyn CausalLm> = Box::new(base);
    let method = lora(4, &[LoraTarget::Attn, LoraTarget::Mlp], None);
    m.attach_lora(&methods::lora_spec(&method, 4, 4)?.unwrap(), 1)?;
    let fresh: Vec<f32> = m.forward(&ids)?.flatten_all()?.to_vec1()?;
    assert_eq!(before, fresh, "B starts at zero: no change");
    perturb(&*m)?;
    let adapted: Vec<f32> = m.forward(&ids)?.flatten_all()?.to_vec1()?;
    let merged = experiments::model::hf::merged(&*m, m.lora().unwrap())?;
    assert!(merged.lora().is_none());
    let out: Vec<f32> = merged.forward(&ids)?.flatten_all()?.to_vec1()?;
    let worst = adapted
        .iter()
        .zip(&out)
        .fold(0f32, |w, (a, b)| w.max((a - b).abs()));
    assert!(worst < 1e-4, "merged model differs by {worst}");
    // A perturbed model (base weights too) differs from the one before.
    assert!(adapted
        .iter()
        .zip(&before)
        .any(|(a, b)| (a - b).abs() > 1e-3));
    Ok(())
}
