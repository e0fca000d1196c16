//! LoRA adapters on a model of either family, in PEFT's format.
//!
//! An adapted linear layer computes `x·Wᵀ (+ b) + s·(x·Aᵀ)·Bᵀ` with A `[rank, in]`, B `[out,
//! rank]` and `s = alpha / rank`, exactly PEFT's `lora.Linear` with `lora_dropout = 0` (ablate
//! trains without dropout, see [`super::gpt2`]). A starts as PEFT's default (Kaiming-uniform with
//! `a = √5`, i.e. U(−1/√in, 1/√in), from the trial's seed) and B at zero, so a fresh adapter leaves
//! the model unchanged.
//!
//! The adapters are [`Var`]s held by the model beside its own parameters and listed by
//! [`super::CausalLm::params`] as [`Part::Adapter`] of their block, under PEFT's names relative
//! to the family's module names (`h.3.attn.c_attn.lora_A.weight`,
//! `model.layers.3.self_attn.q_proj.lora_B.weight`), so checkpoints, gradients and the optimizer
//! handle them like any other parameter. The model's own forward pass ([`super::gpt2`],
//! [`super::llama`]) and the manual backward's tapes ([`crate::backward`]) add the update to the
//! adapted layers.
//!
//! Saving a LoRA model ([`super::hf::save_hf_dir`]) writes the merged weights `W + s·B·A` (a plain
//! Hugging Face directory) and, in `adapter/`, `adapter_config.json` and
//! `adapter_model.safetensors` as `peft.PeftModel.from_pretrained(base, dir / "adapter")` reads
//! them.

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

use super::{linear, p, ModelConfig, Param, Part};
use crate::trial::LoraTarget;
use crate::{Error, Result};

/// What to adapt: rank, alpha, which layers, which blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub targets: Vec<LoraTarget>,
    /// The blocks that get adapters, bottom first.
    pub blocks: Vec<usize>,
}

/// One adapted linear layer.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// `[rank, in]`.
    pub a: Var,
    /// `[out, rank]`.
    pub b: Var,
}

/// One of a family's adaptable linear layers.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    /// The name after the block prefix (`attn.c_attn`, `self_attn.q_proj`).
    pub suffix: &'static str,
    pub target: LoraTarget,
    pub in_features: usize,
    pub out_features: usize,
}

/// The adaptable linear layers of one block of `cfg`'s family, in the order the family's forward
/// pass applies them (the slot index the forward passes use).
pub fn modules(cfg: &ModelConfig) -> Vec<Module> {
    let m = |suffix, target, in_features, out_features| Module {
        suffix,
        target,
        in_features,
        out_features,
    };
    use LoraTarget::{Attn, Mlp};
    match cfg {
        ModelConfig::Gpt2(c) => {
            let c = c.n_embd;
            vec![
                m("attn.c_attn", Attn, c, 3 * c),
                m("attn.c_proj", Attn, c, c),
                m("mlp.c_fc", Mlp, c, 4 * c),
                m("mlp.c_proj", Mlp, 4 * c, c),
            ]
        }
        ModelConfig::Llama(l) => {
            let (c, q, kv, i) = (
                l.hidden_size,
                l.num_attention_heads * l.head_dim,
                l.num_key_value_heads * l.head_dim,
                l.intermediate_size,
            );
            vec![
                m("self_attn.q_proj", Attn, c, q),
                m("self_attn.k_proj", Attn, c, kv),
                m("self_attn.v_proj", Attn, c, kv),
                m("self_attn.o_proj", Attn, q, c),
                m("mlp.gate_proj", Mlp, c, i),
                m("mlp.up_proj", Mlp, c, i),
                m("mlp.down_proj", Mlp, i, c),
            ]
        }
    }
}

/// The name prefix of block `i` in ablate's parameter names.
fn block_prefix(cfg: &ModelConfig, i: usize) -> String {
    match cfg {
        ModelConfig::Gpt2(_) => format!("h.{i}."),
        ModelConfig::Llama(_) => format!("model.layers.{i}."),
    }
}

/// The adapters of a model: `slots[block][module]` in [`modules`] order.
#[derive(Clone, Debug)]
pub struct Lora {
    pub spec: LoraSpec,
    /// `alpha / rank`.
    pub scale: f64,
    cfg: ModelConfig,
    slots: Vec<Vec<Option<Adapter>>>,
}

impl Lora {
    /// Fresh adapters for a model of `cfg` on `device` (see the module doc for the start values).
    pub fn new(cfg: &ModelConfig, spec: &LoraSpec, seed: u64, device: &Device) -> Result<Lora> {
        let n_layer = cfg.dims().n_layer;
        if spec.rank == 0 {
            return Err(Error::Config("lora rank must be at least 1".into()));
        }
        if !(spec.alpha.is_finite() && spec.alpha > 0.0) {
            return Err(Error::Config(format!(
                "lora alpha = {}: must be positive",
                spec.alpha
            )));
        }
        if spec.targets.is_empty() {
            return Err(Error::Config(
                "lora targets is empty: name \"attn\" and/or \"mlp\"".into(),
            ));
        }
        if let Some(&b) = spec.blocks.iter().find(|&&b| b >= n_layer) {
            return Err(Error::Config(format!(
                "lora block {b}: the model has only {n_layer} blocks"
            )));
        }
        let mods = modules(cfg);
        // One stream per trial seed, apart from the model's own initialisation streams.
        let mut rng = StdRng::seed_from_u64(seed ^ 0x4c6f_5241_0000_0001);
        let mut slots = vec![vec![None; mods.len()]; n_layer];
        for &blk in &spec.blocks {
            for (s, m) in mods.iter().enumerate() {
                if !spec.targets.contains(&m.target) {
                    continue;
                }
                let bound = 1.0 / (m.in_features as f64).sqrt();
                let a: Vec<f32> = (0..spec.rank * m.in_features)
                    .map(|_| rng.gen_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (spec.rank, m.in_features), device)?;
                let b =
                    Tensor::zeros((m.out_features, spec.rank), candle_core::DType::F32, device)?;
                slots[blk][s] = Some(Adapter {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                });
            }
        }
        Ok(Lora {
            spec: spec.clone(),
            scale: spec.alpha / spec.rank as f64,
            cfg: cfg.clone(),
            slots,
        })
    }

    /// The adapter of module `slot` (a [`modules`] index) in block `block`, if it has one.
    pub fn get(&self, block: usize, slot: usize) -> Option<&Adapter> {
        self.slots.get(block)?.get(slot)?.as_ref()
    }

    /// Whether block `block` has any adapter.
    pub fn in_block(&self, block: usize) -> bool {
        self.slots
            .get(block)
            .is_some_and(|s| s.iter().any(Option::is_some))
    }

    /// Every adapter as (module name without `.weight`, slot, block, adapter).
    pub fn adapters(&self) -> Vec<(String, usize, usize, &Adapter)> {
        let mods = modules(&self.cfg);
        let mut v = Vec::new();
        for (blk, row) in self.slots.iter().enumerate() {
            for (s, ad) in row.iter().enumerate() {
                if let Some(ad) = ad {
                    let name = format!("{}{}", block_prefix(&self.cfg, blk), mods[s].suffix);
                    v.push((name, s, blk, ad));
                }
            }
        }
        v
    }

    /// The adapters as parameters (`<module>.lora_A.weight`, `<module>.lora_B.weight`).
    pub fn params(&self) -> Vec<Param> {
        let mut v = Vec::new();
        for (name, _, blk, ad) in self.adapters() {
            v.push(Param {
                name: format!("{name}.lora_A.weight"),
                var: ad.a.clone(),
                part: Part::Adapter(blk),
            });
            v.push(Param {
                name: format!("{name}.lora_B.weight"),
                var: ad.b.clone(),
                part: Part::Adapter(blk),
            });
        }
        v
    }

    /// `s·B·A` (`[out, in]`, candle layout) of one adapter, on the CPU.
    pub fn delta(&self, ad: &Adapter) -> Result<Tensor> {
        let a = ad.a.as_detached_tensor().to_device(&Device::Cpu)?;
        let b = ad.b.as_detached_tensor().to_device(&Device::Cpu)?;
        Ok((b.matmul(&a)? * self.scale)?)
    }

    /// PEFT's `adapter_config.json` for these adapters on a base at `base_path`.
    pub fn peft_config(&self, base_path: Option<&str>) -> serde_json::Value {
        let mods = modules(&self.cfg);
        let chosen: Vec<&Module> = mods
            .iter()
            .filter(|m| self.spec.targets.contains(&m.target))
            .collect();
        // PEFT matches a target against a module name or its dotted suffix: GPT-2's `c_proj`
        // is in both the attention and the MLP, so it is qualified unless both are adapted.
        let both = self.spec.targets.contains(&LoraTarget::Attn)
            && self.spec.targets.contains(&LoraTarget::Mlp);
        let mut targets: Vec<String> = Vec::new();
        for m in &chosen {
            let last = m.suffix.rsplit('.').next().expect("non-empty suffix");
            let shared = mods
                .iter()
                .filter(|o| o.suffix.rsplit('.').next() == Some(last))
                .count()
                > 1;
            let t = if shared && !both {
                m.suffix.to_string()
            } else {
                last.to_string()
            };
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        let n_layer = self.slots.len();
        let all_blocks = (0..n_layer).all(|b| self.in_block(b));
        let (layers, pattern) = if all_blocks {
            (serde_json::Value::Null, serde_json::Value::Null)
        } else {
            let pattern = match self.cfg {
                ModelConfig::Gpt2(_) => "h",
                ModelConfig::Llama(_) => "layers",
            };
            (json!(self.spec.blocks), json!(pattern))
        };
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_path,
            "revision": null,
            "inference_mode": true,
            "r": self.spec.rank,
            "lora_alpha": self.spec.alpha,
            "lora_dropout": 0.0,
            "target_modules": targets,
            // GPT-2's layers are transformers' Conv1D, which stores its weight [in, out].
            "fan_in_fan_out": matches!(self.cfg, ModelConfig::Gpt2(_)),
            "bias": "none",
            "modules_to_save": null,
            "init_lora_weights": true,
            "layers_to_transform": layers,
            "layers_pattern": pattern,
            "use_rslora": false,
            "use_dora": false,
        })
    }

    /// PEFT's `adapter_model.safetensors` names: `base_model.model.<HF module name>.lora_A.weight`.
    pub fn peft_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let hf_prefix = match self.cfg {
            ModelConfig::Gpt2(_) => "transformer.",
            ModelConfig::Llama(_) => "",
        };
        let mut v = Vec::new();
        for (name, _, _, ad) in self.adapters() {
            for (ab, var) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
                let t = var
                    .as_detached_tensor()
                    .to_device(&Device::Cpu)?
                    .contiguous()?;
                v.push((format!("base_model.model.{hf_prefix}{name}.{ab}.weight"), t));
            }
        }
        Ok(v)
    }
}

/// `y + s·(x·Aᵀ)·Bᵀ` when `ad` is an adapter, else `y`; A and B live (gradient) when `live`.
pub(crate) fn add_update(
    y: Tensor,
    x: &Tensor,
    ad: Option<&Adapter>,
    scale: f64,
    live: bool,
) -> Result<Tensor> {
    let Some(ad) = ad else { return Ok(y) };
    let u = linear(x, &p(&ad.a, live), None)?;
    let d = linear(&u, &p(&ad.b, live), None)?;
    Ok((y + (d * scale)?)?)
}
