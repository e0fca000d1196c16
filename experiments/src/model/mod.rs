//! The model families behind one seam: [`CausalLm`], which GPT-2 ([`gpt2`]) and Llama
//! ([`llama`]) implement, and through which training, evaluation, sampling, checkpoints, the
//! methods and the manual CPU backward see a model.
//!
//! The design in four points:
//!
//! - **Parts, not names.** Every parameter comes with the [`Part`] of the model it belongs to:
//!   the input embeddings, block i, or the head (final norm and LM head); an embedding table tied
//!   to the head is [`Part::TiedEmbeddings`], which trains when either of its two uses does. Layer
//!   groups, freezing, gradual unfreezing, discriminative learning rates, trainable-parameter
//!   counts and Inheritune ([`truncate`]: keep the parameters of blocks below n) are all worked out
//!   from parts ([`crate::methods`]), so a new family needs no name matching anywhere else.
//! - **One mask.** [`Trainable`] says which parts receive gradients; every family's forward pass
//!   reads frozen parameters through detached tensors and cuts the graph below the lowest
//!   trainable block, so backward does no work for them.
//! - **Config as data.** [`ModelConfig`] is the family's Hugging Face config (what `config.json`
//!   holds); [`build`] turns a config and named tensors into a model, which is how checkpoints are
//!   loaded ([`hf`]), models truncated and families created from scratch.
//! - **A closed set of families.** [`CausalLm::family_ref`] hands back the concrete model, so the
//!   code that is family-specific by nature (the manual backward's tapes in
//!   [`crate::backward`], the Hugging Face layouts in [`hf`]) matches on it, while everything
//!   else stays generic. A third family adds a variant and its own tape and layout.
//!
//! Parameters live in a [`candle_nn::VarMap`] under the family's Hugging Face names (GPT-2 without
//! the `transformer.` prefix, Llama as stored) and are updated in place (`Var::set`, what
//! optimizers and checkpoint loading do): a model keeps handles to the same `Var`s, so do not
//! replace entries of its `VarMap` with new `Var`s.

pub mod gpt2;
pub mod hf;
pub mod llama;
pub mod lora;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{rngs::StdRng, Rng};

pub use gpt2::{Gpt2, Gpt2Config};
pub use llama::{Llama, LlamaConfig, RopeScaling};

use crate::ops::linear_nt;
use crate::{Error, Result};

/// A model family ablate implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Gpt2,
    Llama,
}

impl Family {
    /// The Hugging Face `model_type` of the family.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
        }
    }

    /// The config field that bounds the input length (for messages).
    pub fn positions_field(self) -> &'static str {
        match self {
            Family::Gpt2 => "n_positions",
            Family::Llama => "max_position_embeddings",
        }
    }
}

/// The part of the model a parameter belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Part {
    /// Input embeddings (GPT-2's wte lookup and wpe; an untied Llama's embed_tokens): group 0.
    Embeddings,
    /// Transformer block `i`, 0 at the bottom.
    Block(usize),
    /// The final norm and an untied LM head: the top group.
    Head,
    /// An embedding table that is also the LM head (tied). It trains when the embeddings or the
    /// head train; in PyTorch the head *is* this tensor.
    TiedEmbeddings,
    /// A LoRA adapter of a linear layer of block `i` ([`lora`]): it trains on its own, with the
    /// block's weights frozen.
    Adapter(usize),
}

/// One parameter: its name (the family's Hugging Face name), its storage and its part.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub part: Part,
}

/// Which parts receive gradients. Frozen parts use detached tensors (no gradient work at all); if
/// everything below block j is frozen the activation entering block j is detached too, so backward
/// never walks frozen blocks.
///
/// `top` covers the final norm and the head. With a tied head, `top` true and `embeddings` false,
/// the embedding *lookup* reads a detached table while the head reads the live one: the table then
/// gets gradient only through the head, as in PyTorch where `lm_head.weight` *is* the embedding.
/// With `top` false the head reads a detached table too.
#[derive(Clone, Debug, PartialEq)]
pub struct Trainable {
    /// The input embeddings (as the lookup, for a tied table).
    pub embeddings: bool,
    /// One flag per transformer block, bottom first.
    pub blocks: Vec<bool>,
    /// The final norm and the head.
    pub top: bool,
    /// One flag per block: its LoRA adapters train (if the model has any there). Empty means
    /// none do.
    pub adapters: Vec<bool>,
}

impl Trainable {
    /// Every weight of the model (LoRA adapters, which only the LoRA method trains, are read as
    /// constants).
    pub fn all(n_layer: usize) -> Self {
        Trainable {
            embeddings: true,
            blocks: vec![true; n_layer],
            top: true,
            adapters: Vec::new(),
        }
    }

    pub fn none(n_layer: usize) -> Self {
        Trainable {
            embeddings: false,
            blocks: vec![false; n_layer],
            top: false,
            adapters: Vec::new(),
        }
    }

    /// Whether the adapters of block `i` train.
    pub fn adapter(&self, i: usize) -> bool {
        self.adapters.get(i).copied().unwrap_or(false)
    }

    /// Whether anything of block `i` trains: its weights or its adapters (a forward pass must then
    /// keep the graph from block `i` up).
    pub fn block_live(&self, i: usize) -> bool {
        self.blocks.get(i).copied().unwrap_or(false) || self.adapter(i)
    }

    /// Whether a parameter of `part` receives a gradient under this mask.
    pub fn trains(&self, part: Part) -> bool {
        match part {
            Part::Embeddings => self.embeddings,
            Part::Block(i) => self.blocks.get(i).copied().unwrap_or(false),
            Part::Head => self.top,
            Part::TiedEmbeddings => self.embeddings || self.top,
            Part::Adapter(i) => self.adapter(i),
        }
    }
}

/// The sizes generic code needs, whatever the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub vocab_size: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Longest input the model takes (GPT-2's `n_positions`, Llama's `max_position_embeddings`).
    pub max_positions: usize,
    /// Width of the residual stream.
    pub hidden: usize,
}

/// A family's configuration, as its Hugging Face `config.json` states it.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelConfig {
    Gpt2(Gpt2Config),
    Llama(LlamaConfig),
}

impl ModelConfig {
    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Gpt2(_) => Family::Gpt2,
            ModelConfig::Llama(_) => Family::Llama,
        }
    }

    pub fn dims(&self) -> Dims {
        match self {
            ModelConfig::Gpt2(c) => Dims {
                vocab_size: c.vocab_size,
                n_layer: c.n_layer,
                max_positions: c.n_positions,
                hidden: c.n_embd,
            },
            ModelConfig::Llama(c) => Dims {
                vocab_size: c.vocab_size,
                n_layer: c.num_hidden_layers,
                max_positions: c.max_position_embeddings,
                hidden: c.hidden_size,
            },
        }
    }

    /// The same configuration with `n` blocks (Inheritune keeps the first n).
    pub fn with_layers(&self, n: usize) -> ModelConfig {
        match self {
            ModelConfig::Gpt2(c) => ModelConfig::Gpt2(Gpt2Config {
                n_layer: n,
                ..c.clone()
            }),
            ModelConfig::Llama(c) => ModelConfig::Llama(LlamaConfig {
                num_hidden_layers: n,
                ..c.clone()
            }),
        }
    }

    /// Every parameter's name, candle shape (`[out, in]` for linear weights) and part, in a fixed
    /// order (embeddings, blocks bottom up, head). Loading checks tensors against this.
    pub fn param_layout(&self) -> Vec<(String, Vec<usize>, Part)> {
        match self {
            ModelConfig::Gpt2(c) => c.param_layout(),
            ModelConfig::Llama(c) => c.param_layout(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            ModelConfig::Gpt2(c) => c.validate(),
            ModelConfig::Llama(c) => c.validate(),
        }
    }
}

/// The concrete model behind a [`CausalLm`], for the code that is family-specific by nature.
#[derive(Clone, Copy)]
pub enum FamilyRef<'a> {
    Gpt2(&'a Gpt2),
    Llama(&'a Llama),
}

/// A causal language model of one of the families: the one interface the rest of the crate uses.
pub trait CausalLm: Send + Sync {
    /// The concrete model (see the module doc).
    fn family_ref(&self) -> FamilyRef<'_>;

    /// Its configuration (what `config.json` holds).
    fn model_config(&self) -> ModelConfig;

    fn device(&self) -> &Device;

    /// Every parameter with its name and part, sorted by name; the tied head counted once. LoRA
    /// adapters, when attached, are included ([`Part::Adapter`]).
    fn params(&self) -> Vec<Param>;

    /// The LoRA adapters, when [`Self::attach_lora`] added some.
    fn lora(&self) -> Option<&lora::Lora>;

    /// Adds fresh LoRA adapters (see [`lora`]); an error if the model already has some.
    fn attach_lora(&mut self, spec: &lora::LoraSpec, seed: u64) -> Result<()>;

    /// ids (B, T) u32 → logits (B, T, V) f32, with gradients only for the parts `trainable`
    /// marks (see [`Trainable`]). `Trainable::none` gives a graph-free forward for evaluation.
    fn forward_with(&self, ids: &Tensor, trainable: &Trainable) -> Result<Tensor>;

    /// Token ids that end a generation (the config's `eos_token_id`); empty when the config
    /// names none, and the tokenizer's end-of-text token is used instead.
    fn eos_token_ids(&self) -> Vec<u32> {
        Vec::new()
    }

    /// The family: which [`FamilyRef`] variant this is.
    fn family(&self) -> Family {
        match self.family_ref() {
            FamilyRef::Gpt2(_) => Family::Gpt2,
            FamilyRef::Llama(_) => Family::Llama,
        }
    }

    fn dims(&self) -> Dims {
        self.model_config().dims()
    }

    /// [`Self::params`] as (name, var) pairs, sorted by name.
    fn named_vars(&self) -> Vec<(String, Var)> {
        self.params().into_iter().map(|p| (p.name, p.var)).collect()
    }

    /// Number of parameters, a tied head counted once.
    fn num_params(&self) -> usize {
        self.params().iter().map(|p| p.var.elem_count()).sum()
    }

    /// ids (B, T) → logits (B, T, V), everything trainable.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with(ids, &Trainable::all(self.dims().n_layer))
    }
}

/// Builds a model of `cfg`'s family from named tensors (the names and candle shapes of
/// [`ModelConfig::param_layout`]); each becomes a fresh f32 `Var` on `device`.
pub fn build(
    cfg: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    device: &Device,
) -> Result<Box<dyn CausalLm>> {
    Ok(match cfg {
        ModelConfig::Gpt2(c) => Box::new(Gpt2::from_tensors(c, tensors, device)?),
        ModelConfig::Llama(c) => Box::new(Llama::from_tensors(c, tensors, device)?),
    })
}

/// A freshly initialised model of `cfg`'s family (the family's own initialisation, deterministic
/// for a seed).
pub fn new_random(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Box<dyn CausalLm>> {
    Ok(match cfg {
        ModelConfig::Gpt2(c) => Box::new(Gpt2::new_random(c, seed, device)?),
        ModelConfig::Llama(c) => Box::new(Llama::new_random(c, seed, device)?),
    })
}

/// Inheritune: a new model holding copies of the first `n_blocks` blocks and of everything that
/// is not a block (embeddings, final norm, head). Worked out from the parts, for every family.
pub fn truncate(model: &dyn CausalLm, n_blocks: usize) -> Result<Box<dyn CausalLm>> {
    let (cfg, tensors) = truncated_parts(model, n_blocks)?;
    build(&cfg, tensors, model.device())
}

/// The config and tensors of [`truncate`].
pub(crate) fn truncated_parts(
    model: &dyn CausalLm,
    n_blocks: usize,
) -> Result<(ModelConfig, HashMap<String, Tensor>)> {
    let n_layer = model.dims().n_layer;
    if n_blocks == 0 || n_blocks > n_layer {
        return Err(Error::Config(format!(
            "cannot keep {n_blocks} blocks of a {n_layer}-block model"
        )));
    }
    let cfg = model.model_config().with_layers(n_blocks);
    let tensors = model
        .params()
        .into_iter()
        .filter(|p| !matches!(p.part, Part::Block(i) if i >= n_blocks))
        .filter(|p| !matches!(p.part, Part::Adapter(_)))
        .map(|p| (p.name, p.var.as_detached_tensor()))
        .collect();
    Ok((cfg, tensors))
}

// ---- helpers shared by the families -----------------------------------------------------------

/// The parameter tensor, live (gradient flows to the Var) or detached (treated as a constant).
pub(crate) fn p(v: &Var, live: bool) -> Tensor {
    if live {
        v.as_tensor().clone()
    } else {
        v.as_detached_tensor()
    }
}

/// `x (.., in) · wᵀ (+ b)` with `w` stored `[out, in]`. The batch dims are folded into one so a
/// single 2-D GEMM runs (the weight is read transposed through strides, without a copy; on the CPU
/// one fused op with its own backward, [`linear_nt`]).
pub(crate) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().expect("linear input has a last dim");
    let n: usize = dims.iter().product::<usize>() / k;
    let out = w.dim(0)?;
    let y = linear_nt(&x.reshape((n, k))?, w, b)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("non-empty") = out;
    Ok(y.reshape(out_dims)?)
}

/// N(0, std) samples from a seeded generator (Box–Muller), so initialisation is the same for a
/// seed on every machine and device (the device RNGs are not seedable portably).
pub(crate) fn normal_vec(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let th = 2.0 * std::f64::consts::PI * u2;
        v.push((r * th.cos()) as f32);
        if v.len() < n {
            v.push((r * th.sin()) as f32);
        }
    }
    v
}

/// Turns named tensors into the f32 `Var`s of a `VarMap`, checking each against the layout: every
/// parameter present with its shape (an `Error::Config` naming it otherwise; checkpoint loading
/// checks first to name the file). Returns the map and the Vars by name.
pub(crate) fn vars_from_tensors(
    family: &str,
    layout: &[(String, Vec<usize>, Part)],
    mut tensors: HashMap<String, Tensor>,
    device: &Device,
) -> Result<(VarMap, HashMap<String, Var>)> {
    let varmap = VarMap::new();
    let mut vars: HashMap<String, Var> = HashMap::new();
    for (name, shape, _) in layout {
        let t = tensors
            .remove(name)
            .ok_or_else(|| Error::Config(format!("{family} parameter {name} is missing")))?;
        if t.dims() != shape.as_slice() {
            return Err(Error::Config(format!(
                "{family} parameter {name} has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        // `detach` guarantees `from_tensor` copies into new storage, even if `t` is a Var.
        let t = t.to_device(device)?.to_dtype(DType::F32)?.detach();
        vars.insert(name.clone(), Var::from_tensor(&t)?);
    }
    {
        let mut data = varmap.data().lock().expect("fresh VarMap lock");
        for (k, v) in &vars {
            data.insert(k.clone(), v.clone());
        }
    }
    Ok((varmap, vars))
}

/// The parameters of a `VarMap` with their parts (from the layout), sorted by name.
pub(crate) fn params_of(varmap: &VarMap, layout: &[(String, Vec<usize>, Part)]) -> Vec<Param> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut v: Vec<Param> = layout
        .iter()
        .filter_map(|(name, _, part)| {
            data.get(name).map(|var| Param {
                name: name.clone(),
                var: var.clone(),
                part: *part,
            })
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// `params` plus the adapters' (when there are any), sorted by name.
pub(crate) fn with_adapters(mut params: Vec<Param>, lora: Option<&lora::Lora>) -> Vec<Param> {
    if let Some(l) = lora {
        params.extend(l.params());
        params.sort_by(|a, b| a.name.cmp(&b.name));
    }
    params
}

/// Checks ids for a forward pass: (B, T) u32 with 1 ≤ T ≤ `max_positions`.
pub(crate) fn check_ids(
    family: &str,
    ids: &Tensor,
    max_positions: usize,
    what_positions: &str,
) -> Result<(usize, usize)> {
    let (b, t) = ids.dims2().map_err(|_| {
        Error::Config(format!(
            "{family} input ids must be (batch, time), got {:?}",
            ids.dims()
        ))
    })?;
    if ids.dtype() != DType::U32 {
        return Err(Error::Config(format!(
            "{family} input ids must be u32, got {:?}",
            ids.dtype()
        )));
    }
    if t == 0 || t > max_positions {
        return Err(Error::Config(format!(
            "{family} input length {t} must be between 1 and {what_positions} {max_positions}"
        )));
    }
    Ok((b, t))
}
