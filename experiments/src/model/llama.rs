//! Llama in candle (the family of SmolLM2, TinyLlama, Llama 2/3, OpenLLaMA): transformers'
//! `LlamaForCausalLM` with its Hugging Face parameter names, behind the [`super::CausalLm`] seam.
//!
//! A block is pre-norm: `x + o_proj(attn(rope(q_proj(h)), rope(k_proj(h)), v_proj(h)))` with
//! `h = input_layernorm(x)`, then `x + down_proj(silu(gate_proj(h)) ⊙ up_proj(h))` with
//! `h = post_attention_layernorm(x)`. RMS norms ([`crate::ops::rms_norm`]), rotary embeddings in
//! Hugging Face's rotate-half layout ([`crate::ops::rope`]) with `rope_theta` and the `linear` or
//! `llama3` frequency scaling ([`RopeScaling`], computed as transformers' `modeling_rope_utils`
//! does), grouped-query attention (`num_key_value_heads` dividing `num_attention_heads`: key/value
//! head j serves query heads `j·n_rep..(j+1)·n_rep`), bias-free projections, and a head tied to
//! `model.embed_tokens.weight` or a separate `lm_head.weight` (`tie_word_embeddings`). Like the
//! GPT-2 here it has no dropout (`attention_dropout` is a training-time setting only).
//!
//! Parts: `model.embed_tokens.weight` is [`Part::TiedEmbeddings`] when tied, else
//! [`Part::Embeddings`]; `model.layers.{i}.*` is [`Part::Block`]; `model.norm.weight` and
//! `lm_head.weight` are [`Part::Head`].

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use rand::{rngs::StdRng, SeedableRng};

use super::lora::{self, Lora, LoraSpec};
use super::{
    check_ids, linear, normal_vec, p, params_of, vars_from_tensors, with_adapters, CausalLm,
    FamilyRef, ModelConfig, Param, Part, Trainable,
};
use crate::ops::{causal_attention, repeat_kv, rms_norm, rope, swiglu, RopeTables};
use crate::{Error, Result};

/// How the rotary frequencies are scaled (`rope_scaling` / `rope_parameters.rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `default`: `inv_freq[i] = 1 / theta^(2i/d)`.
    None,
    /// `linear`: every inverse frequency divided by `factor`.
    Linear { factor: f64 },
    /// `llama3` (Llama 3.1): low frequencies divided by `factor`, high ones kept, the band between
    /// interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Shape and settings of a Llama model (the fields of transformers' `LlamaConfig` that matter).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Width of one attention head (`head_dim`, by default `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    /// One or several (Llama 3 lists three) ids that end a generation.
    pub eos_token_id: Vec<u32>,
}

const PRESETS: &[&str] = &["tiny-llama", "smollm2"];

impl LlamaConfig {
    /// Named shapes: `tiny-llama` for tests (2 layers, hidden 64, 4 heads, 2 KV heads, vocab
    /// 512); `smollm2` is SmolLM2-135M (30 blocks, hidden 576, intermediate 1536, 9 heads, 3 KV
    /// heads, vocabulary 49152, tied, rope_theta 100000, context 8192).
    pub fn preset(name: &str) -> Option<LlamaConfig> {
        Some(match name {
            "tiny-llama" => LlamaConfig {
                vocab_size: 512,
                hidden_size: 64,
                intermediate_size: 128,
                num_hidden_layers: 2,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 16,
                max_position_embeddings: 128,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                rope_scaling: RopeScaling::None,
                tie_word_embeddings: true,
                bos_token_id: Some(1),
                eos_token_id: vec![2],
            },
            "smollm2" => LlamaConfig {
                vocab_size: 49152,
                hidden_size: 576,
                intermediate_size: 1536,
                num_hidden_layers: 30,
                num_attention_heads: 9,
                num_key_value_heads: 3,
                head_dim: 64,
                max_position_embeddings: 8192,
                rms_norm_eps: 1e-5,
                rope_theta: 100000.0,
                rope_scaling: RopeScaling::None,
                tie_word_embeddings: true,
                bos_token_id: Some(1),
                eos_token_id: vec![2],
            },
            _ => return None,
        })
    }

    pub fn preset_names() -> &'static [&'static str] {
        PRESETS
    }

    /// Query heads per key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads.max(1)
    }

    /// Checks the shape is buildable: non-zero sizes, KV heads dividing the query heads, an even
    /// head width (rotate-half pairs), sane norm and RoPE settings.
    #[allow(clippy::manual_is_multiple_of)] // is_multiple_of needs Rust 1.87; MSRV is 1.85
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if c.vocab_size == 0
            || c.hidden_size == 0
            || c.intermediate_size == 0
            || c.num_hidden_layers == 0
            || c.num_attention_heads == 0
            || c.num_key_value_heads == 0
            || c.head_dim == 0
            || c.max_position_embeddings == 0
        {
            return Err(Error::Config(format!(
                "Llama config has a zero size: {c:?}"
            )));
        }
        if c.num_attention_heads % c.num_key_value_heads != 0 {
            return Err(Error::Config(format!(
                "Llama config: num_key_value_heads {} does not divide num_attention_heads {}",
                c.num_key_value_heads, c.num_attention_heads
            )));
        }
        if c.head_dim % 2 != 0 {
            return Err(Error::Config(format!(
                "Llama config: head_dim {} must be even (rotary embeddings rotate pairs)",
                c.head_dim
            )));
        }
        if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0) {
            return Err(Error::Config(format!(
                "Llama config: rms_norm_eps must be positive, got {}",
                c.rms_norm_eps
            )));
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 1.0) {
            return Err(Error::Config(format!(
                "Llama config: rope_theta must be above 1, got {}",
                c.rope_theta
            )));
        }
        match c.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(Error::Config(format!(
                        "Llama config: linear rope factor must be positive, got {factor}"
                    )));
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let ok = factor.is_finite()
                    && factor > 0.0
                    && low_freq_factor.is_finite()
                    && low_freq_factor > 0.0
                    && high_freq_factor.is_finite()
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0;
                if !ok {
                    return Err(Error::Config(format!(
                        "Llama config: llama3 rope scaling needs factor > 0, 0 < low_freq_factor < \
                         high_freq_factor and original_max_position_embeddings > 0, got {:?}",
                        c.rope_scaling
                    )));
                }
            }
        }
        Ok(())
    }

    /// Every parameter's name (as transformers stores it), candle shape (`[out, in]`, which is
    /// also torch's `nn.Linear` layout) and part: embeddings, blocks bottom up, norm, untied head.
    pub fn param_layout(&self) -> Vec<(String, Vec<usize>, Part)> {
        let (c, i, q, kv) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let emb_part = if self.tie_word_embeddings {
            Part::TiedEmbeddings
        } else {
            Part::Embeddings
        };
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, c],
            emb_part,
        )];
        for l in 0..self.num_hidden_layers {
            let blk: [(&str, Vec<usize>); 9] = [
                ("input_layernorm.weight", vec![c]),
                ("self_attn.q_proj.weight", vec![q, c]),
                ("self_attn.k_proj.weight", vec![kv, c]),
                ("self_attn.v_proj.weight", vec![kv, c]),
                ("self_attn.o_proj.weight", vec![c, q]),
                ("post_attention_layernorm.weight", vec![c]),
                ("mlp.gate_proj.weight", vec![i, c]),
                ("mlp.up_proj.weight", vec![i, c]),
                ("mlp.down_proj.weight", vec![c, i]),
            ];
            for (suffix, shape) in blk {
                v.push((format!("model.layers.{l}.{suffix}"), shape, Part::Block(l)));
            }
        }
        v.push(("model.norm.weight".to_string(), vec![c], Part::Head));
        if !self.tie_word_embeddings {
            v.push((
                "lm_head.weight".to_string(),
                vec![self.vocab_size, c],
                Part::Head,
            ));
        }
        v
    }

    /// The rotary inverse frequencies, in f32 and in the order of operations of transformers'
    /// `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters` and
    /// `_compute_llama3_parameters`, so they match theirs bit for bit: `1 / theta^(2i/d)`, then
    /// the scaling. torch evaluates `scalar / tensor` as `scalar · (1 / tensor)` in f32 and
    /// `tensor / scalar` as a true f32 division; both are reproduced.
    pub fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base = self.rope_theta as f32;
        // `scalar / tensor`, as torch computes it.
        let rdiv = |s: f32, t: f32| s * (1.0 / t);
        let plain: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        match self.rope_scaling {
            RopeScaling::None => plain,
            RopeScaling::Linear { factor } => plain.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f64;
                // Python floats (f64) where transformers has them; tensor arithmetic in f32.
                let low_wavelen = (old / low_freq_factor) as f32;
                let high_wavelen = (old / high_freq_factor) as f32;
                let (factor, low) = (factor as f32, low_freq_factor as f32);
                let span = (high_freq_factor - low_freq_factor) as f32;
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                plain
                    .iter()
                    .map(|&f| {
                        let wavelen = rdiv(two_pi, f);
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let smooth = (rdiv(old as f32, wavelen) - low) / span;
                        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                        // neither below the high-frequency nor above the low-frequency wavelength
                        let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                        if medium {
                            smoothed
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// One block's parameters.
pub(crate) struct LlamaBlockVars {
    pub(crate) input_norm: Var,
    pub(crate) q: Var,
    pub(crate) k: Var,
    pub(crate) v: Var,
    pub(crate) o: Var,
    pub(crate) post_norm: Var,
    pub(crate) gate: Var,
    pub(crate) up: Var,
    pub(crate) down: Var,
}

/// A Llama language model, parameters f32.
pub struct Llama {
    cfg: LlamaConfig,
    device: Device,
    varmap: VarMap,
    pub(crate) embed: Var,
    pub(crate) blocks: Vec<LlamaBlockVars>,
    pub(crate) norm: Var,
    /// `lm_head.weight` when the head is not tied to `embed`.
    pub(crate) lm_head: Option<Var>,
    /// cos/sin of every position up to `max_position_embeddings`, built on first use.
    rope: std::sync::OnceLock<Arc<RopeTables>>,
    /// LoRA adapters ([`CausalLm::attach_lora`]).
    pub(crate) lora: Option<Lora>,
}

impl Llama {
    /// transformers' `_init_weights` for Llama: linear weights and embeddings N(0,
    /// initializer_range = 0.02), RMS norm weights 1. Deterministic for a seed.
    pub fn new_random(cfg: &LlamaConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape, _) in cfg.param_layout() {
            let n: usize = shape.iter().product();
            let data = if name.ends_with("norm.weight") {
                vec![1f32; n]
            } else {
                normal_vec(&mut rng, n, 0.02)
            };
            tensors.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Self::from_tensors(cfg, tensors, device)
    }

    /// Builds a model from named tensors (names and candle shapes of
    /// [`LlamaConfig::param_layout`]); each becomes a fresh f32 `Var` on `device`.
    pub fn from_tensors(
        cfg: &LlamaConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()?;
        let (varmap, mut vars) = vars_from_tensors("Llama", &cfg.param_layout(), tensors, device)?;
        let mut take = |name: &str| vars.remove(name).expect("inserted from param_layout");
        let embed = take("model.embed_tokens.weight");
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let mut b = |s: &str| take(&format!("model.layers.{l}.{s}"));
            blocks.push(LlamaBlockVars {
                input_norm: b("input_layernorm.weight"),
                q: b("self_attn.q_proj.weight"),
                k: b("self_attn.k_proj.weight"),
                v: b("self_attn.v_proj.weight"),
                o: b("self_attn.o_proj.weight"),
                post_norm: b("post_attention_layernorm.weight"),
                gate: b("mlp.gate_proj.weight"),
                up: b("mlp.up_proj.weight"),
                down: b("mlp.down_proj.weight"),
            });
        }
        let norm = take("model.norm.weight");
        let lm_head = (!cfg.tie_word_embeddings).then(|| take("lm_head.weight"));
        Ok(Llama {
            cfg: cfg.clone(),
            device: device.clone(),
            varmap,
            embed,
            blocks,
            norm,
            lm_head,
            rope: std::sync::OnceLock::new(),
            lora: None,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Looks a parameter up by its Hugging Face name.
    pub fn var(&self, name: &str) -> Result<Var> {
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        data.get(name)
            .cloned()
            .ok_or_else(|| Error::Config(format!("Llama has no parameter named {name}")))
    }

    /// The rotary tables for `t` positions (all of `max_position_embeddings`, built once).
    pub(crate) fn rope_tables(&self, t: usize) -> Arc<RopeTables> {
        let full = self.rope.get_or_init(|| {
            Arc::new(RopeTables::new(
                &self.cfg.inv_freq(),
                self.cfg.max_position_embeddings,
            ))
        });
        debug_assert!(t <= full.positions());
        full.clone()
    }

    /// The head's weight (`lm_head.weight`, or the tied embeddings).
    pub(crate) fn head_var(&self) -> &Var {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Inheritune's truncation with the concrete type (see [`super::truncate`]).
    pub fn truncate(&self, n_blocks: usize) -> Result<Llama> {
        let (cfg, tensors) = super::truncated_parts(self, n_blocks)?;
        match cfg {
            ModelConfig::Llama(c) => Self::from_tensors(&c, tensors, &self.device),
            _ => unreachable!("a Llama truncates to a Llama"),
        }
    }

    /// One block; `live`: its weights train, `i`: its index (for its LoRA adapters, which train
    /// when `lora_live`).
    fn block(
        &self,
        x: &Tensor,
        blk: &LlamaBlockVars,
        i: usize,
        live: bool,
        lora_live: bool,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps;
        let tables = self.rope_tables(t);
        let scale = self.lora.as_ref().map_or(0.0, |l| l.scale);
        // Slot s in lora::modules order: q, k, v, o, gate, up, down.
        let lin = |x: &Tensor, w: &Var, s: usize| -> Result<Tensor> {
            let y = linear(x, &p(w, live), None)?;
            let ad = self.lora.as_ref().and_then(|l| l.get(i, s));
            lora::add_update(y, x, ad, scale, lora_live)
        };
        let h = rms_norm(x, &p(&blk.input_norm, live), eps)?;
        let heads = |w: &Var, n: usize, s: usize| -> Result<Tensor> {
            // (B, T, n·D) → (B, n, T, D)
            Ok(lin(&h, w, s)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rope(&heads(&blk.q, nh, 0)?, &tables)?;
        let k = rope(&heads(&blk.k, nkv, 1)?, &tables)?;
        let v = heads(&blk.v, nkv, 2)?;
        let n_rep = cfg.n_rep();
        let y = causal_attention(&q, &repeat_kv(&k, n_rep)?, &repeat_kv(&v, n_rep)?)?;
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        let x = (x + lin(&y, &blk.o, 3)?)?;
        let h = rms_norm(&x, &p(&blk.post_norm, live), eps)?;
        let g = lin(&h, &blk.gate, 4)?;
        let u = lin(&h, &blk.up, 5)?;
        let m = lin(&swiglu(&g, &u)?, &blk.down, 6)?;
        Ok((x + m)?)
    }
}

impl CausalLm for Llama {
    fn family_ref(&self) -> FamilyRef<'_> {
        FamilyRef::Llama(self)
    }

    fn model_config(&self) -> ModelConfig {
        ModelConfig::Llama(self.cfg.clone())
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

    fn eos_token_ids(&self) -> Vec<u32> {
        self.cfg.eos_token_id.clone()
    }

    fn forward_with(&self, ids: &Tensor, trainable: &Trainable) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = check_ids(
            "Llama",
            ids,
            cfg.max_position_embeddings,
            "max_position_embeddings",
        )?;
        if trainable.blocks.len() != cfg.num_hidden_layers {
            return Err(Error::Config(format!(
                "Trainable has {} block flags, the model has {} blocks",
                trainable.blocks.len(),
                cfg.num_hidden_layers
            )));
        }
        let c = cfg.hidden_size;
        let emb = trainable.embeddings;
        let mut x = p(&self.embed, emb)
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c))?;
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
        let h = rms_norm(&x, &p(&self.norm, top), cfg.rms_norm_eps)?;
        // The head (tied: the embeddings, live exactly when the top trains).
        let head = p(self.head_var(), top);
        let logits = crate::ops::linear_nt(&h.reshape((b * t, c))?, &head, None)?;
        Ok(logits.reshape((b, t, cfg.vocab_size))?)
    }
}
