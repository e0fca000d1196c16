//! GPT-2 in candle, with Hugging Face parameter names and per-part trainability (the GPT-2
//! family of the [`super::CausalLm`] seam).
//!
//! The parameters live in a [`candle_nn::VarMap`] under the names of a Hugging Face GPT-2
//! checkpoint without the `transformer.` prefix (`wte.weight`, `h.3.attn.c_attn.weight`, ...), so
//! checkpoints map one to one ([`crate::checkpoint`]). Linear weights are stored `[out, in]`
//! (candle's layout; HF's Conv1D `[in, out]` is transposed on load and save). The LM head is tied
//! to `wte`, as in GPT-2.
//!
//! The forward pass uses only the gradient-correct ops of [`crate::ops`]. There is no dropout:
//! ablate fine-tunes and evaluates small models for a few thousand steps, where dropout mostly
//! slows convergence, and leaving it out keeps training deterministic for a seed.
//!
//! Freezing is done in the graph, not only in the optimizer: a frozen part is read through a
//! *detached* tensor, so backward never computes gradients for it, and when everything below a
//! block is frozen the activation entering it is detached too, so backward stops there.
//!
//! Parts: `wte` is [`Part::TiedEmbeddings`] (the lookup and the head), `wpe`
//! [`Part::Embeddings`], `h.{i}.*` [`Part::Block`], `ln_f.*` [`Part::Head`].

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::lora::{self, Lora, LoraSpec};
use super::{
    check_ids, linear, normal_vec, p, params_of, vars_from_tensors, with_adapters, CausalLm,
    FamilyRef, ModelConfig, Param, Part, Trainable,
};
use crate::ops::{causal_attention, gelu_new, layer_norm, linear_nt};
use crate::{Error, Result};

/// Shape of a GPT-2 model (the fields of a Hugging Face `GPT2Config` that matter here).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub layer_norm_epsilon: f64,
}

const PRESETS: &[&str] = &["tiny", "gpt2", "gpt2-medium"];

impl Gpt2Config {
    /// Named shapes: `tiny` is for tests (2 layers, 64 wide, 4 heads, 128 context, vocab 512);
    /// `gpt2` and `gpt2-medium` are OpenAI's 124M and 355M models.
    pub fn preset(name: &str) -> Option<Gpt2Config> {
        let (vocab_size, n_positions, n_embd, n_layer, n_head) = match name {
            "tiny" => (512, 128, 64, 2, 4),
            "gpt2" => (50257, 1024, 768, 12, 12),
            "gpt2-medium" => (50257, 1024, 1024, 24, 16),
            _ => return None,
        };
        Some(Gpt2Config {
            vocab_size,
            n_positions,
            n_embd,
            n_layer,
            n_head,
            layer_norm_epsilon: 1e-5,
        })
    }

    pub fn preset_names() -> &'static [&'static str] {
        PRESETS
    }

    /// Checks the shape is buildable (non-zero sizes, heads dividing the width).
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.vocab_size == 0
            || c.n_positions == 0
            || c.n_embd == 0
            || c.n_layer == 0
            || c.n_head == 0
        {
            return Err(Error::Config(format!(
                "GPT-2 config has a zero size: {c:?}"
            )));
        }
        if c.n_embd % c.n_head != 0 {
            return Err(Error::Config(format!(
                "GPT-2 config: n_embd {} is not divisible by n_head {}",
                c.n_embd, c.n_head
            )));
        }
        if !(c.layer_norm_epsilon.is_finite() && c.layer_norm_epsilon > 0.0) {
            return Err(Error::Config(format!(
                "GPT-2 config: layer_norm_epsilon must be positive, got {}",
                c.layer_norm_epsilon
            )));
        }
        Ok(())
    }

    /// Every parameter's name and shape in candle layout (`[out, in]` for linear weights), in a
    /// fixed order: wte, wpe, blocks 0..n_layer, ln_f. Checkpoint loading checks against this.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.param_layout()
            .into_iter()
            .map(|(n, s, _)| (n, s))
            .collect()
    }

    /// [`Self::param_shapes`] with each parameter's part.
    pub fn param_layout(&self) -> Vec<(String, Vec<usize>, Part)> {
        let c = self.n_embd;
        let mut v = vec![
            (
                "wte.weight".to_string(),
                vec![self.vocab_size, c],
                Part::TiedEmbeddings,
            ),
            (
                "wpe.weight".to_string(),
                vec![self.n_positions, c],
                Part::Embeddings,
            ),
        ];
        for i in 0..self.n_layer {
            for (suffix, shape) in block_param_shapes(c) {
                v.push((format!("h.{i}.{suffix}"), shape, Part::Block(i)));
            }
        }
        v.push(("ln_f.weight".to_string(), vec![c], Part::Head));
        v.push(("ln_f.bias".to_string(), vec![c], Part::Head));
        v
    }
}

/// Names (after `h.{i}.`) and candle shapes of one block's parameters.
fn block_param_shapes(c: usize) -> [(&'static str, Vec<usize>); 12] {
    [
        ("ln_1.weight", vec![c]),
        ("ln_1.bias", vec![c]),
        ("attn.c_attn.weight", vec![3 * c, c]),
        ("attn.c_attn.bias", vec![3 * c]),
        ("attn.c_proj.weight", vec![c, c]),
        ("attn.c_proj.bias", vec![c]),
        ("ln_2.weight", vec![c]),
        ("ln_2.bias", vec![c]),
        ("mlp.c_fc.weight", vec![4 * c, c]),
        ("mlp.c_fc.bias", vec![4 * c]),
        ("mlp.c_proj.weight", vec![c, 4 * c]),
        ("mlp.c_proj.bias", vec![c]),
    ]
}

pub(crate) struct BlockVars {
    pub(crate) ln_1_w: Var,
    pub(crate) ln_1_b: Var,
    pub(crate) c_attn_w: Var,
    pub(crate) c_attn_b: Var,
    pub(crate) attn_proj_w: Var,
    pub(crate) attn_proj_b: Var,
    pub(crate) ln_2_w: Var,
    pub(crate) ln_2_b: Var,
    pub(crate) c_fc_w: Var,
    pub(crate) c_fc_b: Var,
    pub(crate) mlp_proj_w: Var,
    pub(crate) mlp_proj_b: Var,
}

/// A GPT-2 language model (tied head, no dropout), parameters f32.
pub struct Gpt2 {
    cfg: Gpt2Config,
    device: Device,
    varmap: VarMap,
    pub(crate) wte: Var,
    pub(crate) wpe: Var,
    pub(crate) blocks: Vec<BlockVars>,
    pub(crate) ln_f_w: Var,
    pub(crate) ln_f_b: Var,
    /// LoRA adapters ([`CausalLm::attach_lora`]).
    pub(crate) lora: Option<Lora>,
}

impl Gpt2 {
    /// GPT-2 initialisation (as transformers' `_init_weights`): weights and embeddings N(0, 0.02);
    /// the residual projections (`c_proj`, attn and mlp) N(0, 0.02/sqrt(2·n_layer)); LayerNorm
    /// weight 1, bias 0; all biases 0. Deterministic for a seed.
    pub fn new_random(cfg: &Gpt2Config, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let resid_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        let mut tensors = HashMap::new();
        for (name, shape) in cfg.param_shapes() {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("ln_1.weight")
                || name.ends_with("ln_2.weight")
                || name == "ln_f.weight"
            {
                vec![1f32; n]
            } else if name.ends_with(".bias") {
                vec![0f32; n]
            } else if name.ends_with("c_proj.weight") {
                normal_vec(&mut rng, n, resid_std)
            } else {
                normal_vec(&mut rng, n, 0.02)
            };
            tensors.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Self::from_tensors(cfg, tensors, device)
    }

    /// Builds a model from named tensors (names and candle shapes of
    /// [`Gpt2Config::param_shapes`]); each becomes a fresh f32 `Var` on `device` (copied, so the
    /// inputs are not aliased). Missing or mis-shaped tensors are an `Error::Config`; checkpoint
    /// loading checks them first to name the file.
    pub fn from_tensors(
        cfg: &Gpt2Config,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let (varmap, mut vars) = vars_from_tensors("GPT-2", &cfg.param_layout(), tensors, device)?;
        let mut take = |name: &str| vars.remove(name).expect("inserted above from param_shapes");
        let wte = take("wte.weight");
        let wpe = take("wpe.weight");
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let mut b = |s: &str| take(&format!("h.{i}.{s}"));
            blocks.push(BlockVars {
                ln_1_w: b("ln_1.weight"),
                ln_1_b: b("ln_1.bias"),
                c_attn_w: b("attn.c_attn.weight"),
                c_attn_b: b("attn.c_attn.bias"),
                attn_proj_w: b("attn.c_proj.weight"),
                attn_proj_b: b("attn.c_proj.bias"),
                ln_2_w: b("ln_2.weight"),
                ln_2_b: b("ln_2.bias"),
                c_fc_w: b("mlp.c_fc.weight"),
                c_fc_b: b("mlp.c_fc.bias"),
                mlp_proj_w: b("mlp.c_proj.weight"),
                mlp_proj_b: b("mlp.c_proj.bias"),
            });
        }
        let ln_f_w = take("ln_f.weight");
        let ln_f_b = take("ln_f.bias");
        Ok(Gpt2 {
            cfg: cfg.clone(),
            device: device.clone(),
            varmap,
            wte,
            wpe,
            blocks,
            ln_f_w,
            ln_f_b,
            lora: None,
        })
    }

    pub fn config(&self) -> &Gpt2Config {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// All parameters with their Hugging Face names (no `transformer.` prefix), sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        CausalLm::named_vars(self)
    }

    /// ids (B,T) u32 → logits (B,T,V) f32, everything trainable.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with(ids, &Trainable::all(self.cfg.n_layer))
    }

    /// ids (B,T) u32 → logits (B,T,V) f32, with gradients only for the parts `trainable` marks
    /// (see [`Trainable`]). `Trainable::none` gives a graph-free forward for evaluation.
    pub fn forward_with(&self, ids: &Tensor, trainable: &Trainable) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = check_ids("GPT-2", ids, cfg.n_positions, "n_positions")?;
        if trainable.blocks.len() != cfg.n_layer {
            return Err(Error::Config(format!(
                "Trainable has {} block flags, the model has {} blocks",
                trainable.blocks.len(),
                cfg.n_layer
            )));
        }
        let c = cfg.n_embd;
        let emb = trainable.embeddings;
        let tok = p(&self.wte, emb)
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c))?;
        let pos = p(&self.wpe, emb).narrow(0, 0, t)?;
        let mut x = tok.broadcast_add(&pos)?;
        let mut below_trainable = emb;
        for (i, (blk, &live)) in self.blocks.iter().zip(&trainable.blocks).enumerate() {
            if !below_trainable {
                // Nothing below needs gradient: cut the graph so backward stops here.
                x = x.detach();
            }
            x = self.block(&x, blk, i, live, trainable.adapter(i))?;
            below_trainable |= trainable.block_live(i);
        }
        if !below_trainable {
            x = x.detach();
        }
        let top = trainable.top;
        let h = layer_norm(
            &x,
            &p(&self.ln_f_w, top),
            &p(&self.ln_f_b, top),
            cfg.layer_norm_epsilon,
        )?;
        // Tied head: logits = h · wteᵀ, with the live wte exactly when the top group trains.
        let head = p(&self.wte, top);
        let logits = linear_nt(&h.reshape((b * t, c))?, &head, None)?;
        Ok(logits.reshape((b, t, cfg.vocab_size))?)
    }

    /// One block; `live`: its weights train, `i`: its index (for its LoRA adapters, which train
    /// when `lora_live`).
    fn block(
        &self,
        x: &Tensor,
        blk: &BlockVars,
        i: usize,
        live: bool,
        lora_live: bool,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, c) = x.dims3()?;
        let nh = cfg.n_head;
        let hd = c / nh;
        let eps = cfg.layer_norm_epsilon;
        let scale = self.lora.as_ref().map_or(0.0, |l| l.scale);
        // The adapter of slot s (lora::modules order: c_attn, attn.c_proj, c_fc, mlp.c_proj).
        let ad = |s: usize| self.lora.as_ref().and_then(|l| l.get(i, s));
        let lin = |x: &Tensor, w: &Var, bias: &Var, s: usize| -> Result<Tensor> {
            let y = linear(x, &p(w, live), Some(&p(bias, live)))?;
            lora::add_update(y, x, ad(s), scale, lora_live)
        };
        let h = layer_norm(x, &p(&blk.ln_1_w, live), &p(&blk.ln_1_b, live), eps)?;
        let qkv = lin(&h, &blk.c_attn_w, &blk.c_attn_b, 0)?; // (B,T,3C)
                                                             // One copy to (3, B, H, T, D); q, k and v are then contiguous slices of it.
        let qkv = qkv
            .reshape((b, t, 3, nh, hd))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let q = qkv.get(0)?;
        let k = qkv.get(1)?;
        let v = qkv.get(2)?;
        let y = causal_attention(&q, &k, &v)?; // (B,H,T,D)
        let y = y.transpose(1, 2)?.reshape((b, t, c))?;
        let y = lin(&y, &blk.attn_proj_w, &blk.attn_proj_b, 1)?;
        let x = (x + y)?;
        let h = layer_norm(&x, &p(&blk.ln_2_w, live), &p(&blk.ln_2_b, live), eps)?;
        let h = gelu_new(&lin(&h, &blk.c_fc_w, &blk.c_fc_b, 2)?)?;
        let h = lin(&h, &blk.mlp_proj_w, &blk.mlp_proj_b, 3)?;
        Ok((x + h)?)
    }

    /// Inheritune: a new model holding copies of the first n blocks plus wte, wpe, ln_f (tied
    /// head); the family-generic [`super::truncate`] with the concrete type.
    pub fn truncate(&self, n_blocks: usize) -> Result<Gpt2> {
        let (cfg, tensors) = super::truncated_parts(self, n_blocks)?;
        match cfg {
            ModelConfig::Gpt2(c) => Self::from_tensors(&c, tensors, &self.device),
            _ => unreachable!("a GPT-2 truncates to a GPT-2"),
        }
    }

    /// Looks a parameter up by its Hugging Face name (without `transformer.`).
    pub fn var(&self, name: &str) -> Result<Var> {
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        data.get(name)
            .cloned()
            .ok_or_else(|| Error::Config(format!("GPT-2 has no parameter named {name}")))
    }

    /// Number of parameters, the tied head counted once.
    pub fn num_params(&self) -> usize {
        CausalLm::num_params(self)
    }
}

impl CausalLm for Gpt2 {
    fn family_ref(&self) -> FamilyRef<'_> {
        FamilyRef::Gpt2(self)
    }

    fn model_config(&self) -> ModelConfig {
        ModelConfig::Gpt2(self.cfg.clone())
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn params(&self) -> Vec<Param> {
        with_adapters(
            params_of(&self.varmap, &self.cfg.param_layout()),
            self.lora.as_ref(),
        )
    }

    fn lora(&self) -> Option<&Lora> {
        self.lora.as_ref()
    }

    fn attach_lora(&mut self, spec: &LoraSpec, seed: u64) -> Result<()> {
        if self.lora.is_some() {
            return Err(Error::Config("the model already has LoRA adapters".into()));
        }
        self.lora = Some(Lora::new(&self.model_config(), spec, seed, &self.device)?);
        Ok(())
    }

    fn forward_with(&self, ids: &Tensor, trainable: &Trainable) -> Result<Tensor> {
        Gpt2::forward_with(self, ids, trainable)
    }
}
