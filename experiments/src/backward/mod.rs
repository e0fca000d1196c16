//! A whole-model manual forward + backward for training on the CPU (f32), without candle's
//! autograd: shared kernels ([`kernels`]) and one tape per family ([`gpt2`], [`llama`]).
//!
//! candle's backward gives every node of the graph a zero-filled gradient buffer and then adds the
//! incoming gradient to it (`GradStore::or_insert` + `add`), reshapes included: on the `tiny`
//! bench that fill-and-add was half of the main thread's backward time, and the 32 MB logits
//! gradient alone went through it three times. Here the forward keeps the activations backward
//! needs, and backward walks the blocks in reverse calling the same hand-written kernels as the
//! fused ops of [`crate::ops`] (layer and RMS norm, GELU, SwiGLU, rotary embeddings, causal
//! softmax, cross-entropy), writing each gradient once: weight gradients straight from GEMM into
//! their stored `[out, in]` layout, norm and bias sums with one column sum, attention per (batch,
//! head) reading q, k and v in place through strides, frozen parameters' gradients skipped and
//! nothing computed below the lowest block that needs a gradient.
//!
//! The result is the `name → gradient` map that candle's autograd plus
//! [`crate::optim::GradAccumulator`] produce (`tests/manual_backward.rs` holds them together for
//! every training mask and both families). Training uses it on the CPU unless `ABLATE_AUTOGRAD=1`;
//! other devices and dtypes use autograd.

pub(crate) mod gpt2;
pub(crate) mod kernels;
pub(crate) mod llama;

use std::collections::BTreeMap;

use candle_core::{DType, Storage, Tensor, Var, D};

use crate::model::{CausalLm, FamilyRef, Trainable};
use crate::optim::GradAccumulator;
use crate::{Error, Result};

/// Loss and gradients of one micro-batch.
pub struct LossGrads {
    /// Mean token negative log-likelihood.
    pub loss: f64,
    /// Gradient of every live parameter under the mask (f32, on the CPU).
    pub grads: BTreeMap<String, Tensor>,
}

/// Whether training should use the manual pass: on the CPU unless `ABLATE_AUTOGRAD=1` asks for
/// candle's autograd (the reference the gradient tests compare with).
pub fn enabled(model: &dyn CausalLm) -> bool {
    model.device().is_cpu() && std::env::var("ABLATE_AUTOGRAD").map_or(true, |v| v != "1")
}

/// The activations of one [`forward`], for its [`Tape::backward`].
pub enum Tape {
    Gpt2(gpt2::Tape),
    Llama(llama::Tape),
}

impl Tape {
    /// Mean token negative log-likelihood.
    pub fn loss(&self) -> f64 {
        match self {
            Tape::Gpt2(t) => t.loss(),
            Tape::Llama(t) => t.loss(),
        }
    }

    /// Gradients of the live parameters; `model` must be the one [`forward`] ran (unchanged).
    pub fn backward(self, model: &dyn CausalLm) -> Result<LossGrads> {
        match (self, model.family_ref()) {
            (Tape::Gpt2(t), FamilyRef::Gpt2(m)) => t.backward(m),
            (Tape::Llama(t), FamilyRef::Llama(m)) => t.backward(m),
            _ => Err(Error::Other(
                "manual backward: the tape belongs to a model of another family".into(),
            )),
        }
    }
}

/// Forward pass and mean cross-entropy of `model` on ids (B, T) u32 and targets (B·T) u32,
/// keeping what [`Tape::backward`] needs for the gradients of the parameters `trainable` marks
/// live. `None` when the model is not a contiguous f32 CPU model (use autograd then).
pub fn forward(
    model: &dyn CausalLm,
    ids: &Tensor,
    targets: &Tensor,
    trainable: &Trainable,
) -> Result<Option<Tape>> {
    if !model.device().is_cpu() {
        return Ok(None);
    }
    Ok(match model.family_ref() {
        FamilyRef::Gpt2(m) => gpt2::forward(m, ids, targets, trainable)?.map(Tape::Gpt2),
        FamilyRef::Llama(m) => llama::forward(m, ids, targets, trainable)?.map(Tape::Llama),
    })
}

/// [`forward`] then [`Tape::backward`].
pub fn loss_and_grads(
    model: &dyn CausalLm,
    ids: &Tensor,
    targets: &Tensor,
    trainable: &Trainable,
) -> Result<Option<LossGrads>> {
    match forward(model, ids, targets, trainable)? {
        Some(tape) => tape.backward(model).map(Some),
        None => Ok(None),
    }
}

/// One training micro-batch: mean cross-entropy of `model` on (ids, targets), its backward, and
/// the gradients of `params` added to `acc`. The manual pass when [`enabled`] and the model is
/// f32 on the CPU, candle's autograd otherwise. Returns the loss (not checked for finiteness).
pub fn accumulate(
    model: &dyn CausalLm,
    ids: &Tensor,
    targets: &Tensor,
    trainable: &Trainable,
    params: &[(&str, &Var)],
    acc: &mut GradAccumulator,
) -> Result<f64> {
    if enabled(model) {
        if let Some(r) = loss_and_grads(model, ids, targets, trainable)? {
            acc.add_named(r.grads, params)?;
            return Ok(r.loss);
        }
    }
    let logits = model.forward_with(ids, trainable)?;
    let v = logits.dim(D::Minus1)?;
    let logits = logits.reshape((targets.elem_count(), v))?;
    let loss = crate::ops::cross_entropy(&logits, targets)?;
    let l = loss.to_scalar::<f32>()? as f64;
    acc.add(&loss.backward()?, params)?;
    Ok(l)
}

// ---- what both tapes share ---------------------------------------------------------------------

/// Checks (ids, targets) and returns (B, T, ids, targets) as vectors.
pub(crate) fn read_batch(
    family: &str,
    ids: &Tensor,
    targets: &Tensor,
    max_positions: usize,
    vocab: usize,
    n_layer: usize,
    trainable: &Trainable,
) -> Result<(usize, usize, Vec<u32>, Vec<u32>)> {
    let (b, t) = ids.dims2().map_err(|_| {
        Error::Config(format!(
            "{family} input ids must be (batch, time), got {:?}",
            ids.dims()
        ))
    })?;
    if ids.dtype() != DType::U32 || targets.dtype() != DType::U32 {
        return Err(Error::Config(format!(
            "{family} ids and targets must be u32"
        )));
    }
    if t == 0 || t > max_positions {
        return Err(Error::Config(format!(
            "{family} input length {t} must be between 1 and the model's {max_positions} positions"
        )));
    }
    if targets.elem_count() != b * t {
        return Err(Error::Config(format!(
            "{} targets for {b} x {t} inputs",
            targets.elem_count()
        )));
    }
    if trainable.blocks.len() != n_layer {
        return Err(Error::Config(format!(
            "Trainable has {} block flags, the model has {n_layer} blocks",
            trainable.blocks.len(),
        )));
    }
    let ids_v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    let tg_v: Vec<u32> = targets.flatten_all()?.to_vec1()?;
    if let Some(&bad) = ids_v.iter().find(|&&i| i as usize >= vocab) {
        return Err(Error::Config(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok((b, t, ids_v, tg_v))
}

/// `need_in[j]`: the input of block j (j = n_layer: of the final norm) needs a gradient, i.e.
/// the embeddings or a block below j (its weights or its adapters) train.
pub(crate) fn inputs_needing_grad(tr: &Trainable) -> Vec<bool> {
    let nl = tr.blocks.len();
    let mut need_in = vec![false; nl + 1];
    let mut below = tr.embeddings;
    for (j, need) in need_in.iter_mut().take(nl).enumerate() {
        *need = below;
        below |= tr.block_live(j);
    }
    need_in[nl] = below;
    need_in
}

/// Read guards on parameters' storage, held for one forward or backward.
pub(crate) struct Weights<'a> {
    /// (storage read guard, start, end) per parameter.
    guards: Vec<(Guard<'a>, usize, usize)>,
}

type Guard<'a> = Box<dyn std::ops::Deref<Target = Storage> + 'a>;

impl<'a> Weights<'a> {
    /// Guards in the order of `vars`; None unless every one is a contiguous f32 CPU tensor.
    pub(crate) fn read(vars: &[&'a Var]) -> Option<Self> {
        let mut guards = Vec::with_capacity(vars.len());
        for v in vars {
            let t = v.as_tensor();
            if t.dtype() != DType::F32 {
                return None;
            }
            let (st, l) = t.storage_and_layout();
            let (o1, o2) = l.contiguous_offsets()?;
            if !matches!(&*st, Storage::Cpu(_)) {
                return None;
            }
            guards.push((Box::new(st) as Guard<'a>, o1, o2));
        }
        Some(Weights { guards })
    }

    /// The parameters' elements, in the order they were read.
    pub(crate) fn slices(&self) -> Vec<&[f32]> {
        self.guards
            .iter()
            .map(|(st, o1, o2)| match &***st {
                Storage::Cpu(c) => &c.as_slice::<f32>().expect("checked f32")[*o1..*o2],
                _ => unreachable!("checked CPU"),
            })
            .collect()
    }
}

/// A model's LoRA adapters read for one pass (see [`crate::model::lora`]).
pub(crate) struct LoraRead<'a> {
    w: Weights<'a>,
    /// (block, slot) of each adapter, in the order of `w`'s (A, B) pairs.
    idx: Vec<(usize, usize)>,
    r: usize,
    scale: f32,
}

impl<'a> LoraRead<'a> {
    /// The adapters of `lora` (none when it is None); None unless all are contiguous f32 CPU.
    pub(crate) fn read(lora: Option<&'a crate::model::lora::Lora>) -> Option<Self> {
        let (mut vars, mut idx) = (Vec::new(), Vec::new());
        let (mut r, mut scale) = (0, 0.0);
        if let Some(l) = lora {
            r = l.spec.rank;
            scale = l.scale as f32;
            for (_, slot, blk, ad) in l.adapters() {
                vars.push(&ad.a);
                vars.push(&ad.b);
                idx.push((blk, slot));
            }
        }
        Some(LoraRead {
            w: Weights::read(&vars)?,
            idx,
            r,
            scale,
        })
    }

    /// `slots[block][slot]` for a model of `n_layer` blocks with `n_slots` adaptable layers each.
    pub(crate) fn slots(
        &self,
        n_layer: usize,
        n_slots: usize,
    ) -> Vec<Vec<Option<kernels::LoraW<'_>>>> {
        let s = self.w.slices();
        let mut out = vec![vec![None; n_slots]; n_layer];
        for (i, &(blk, slot)) in self.idx.iter().enumerate() {
            out[blk][slot] = Some(kernels::LoraW {
                a: s[2 * i],
                b: s[2 * i + 1],
                r: self.r,
                scale: self.scale,
            });
        }
        out
    }
}

/// Inserts one gradient tensor (CPU, f32) into the map.
pub(crate) fn put(
    grads: &mut BTreeMap<String, Tensor>,
    name: &str,
    data: Vec<f32>,
    shape: &[usize],
) -> std::result::Result<(), String> {
    let t = Tensor::from_vec(data, shape, &candle_core::Device::Cpu).map_err(|e| e.to_string())?;
    grads.insert(name.to_string(), t);
    Ok(())
}

/// Adds the embedding lookup's gradient (rows of `dx`, one per token) into `d_table`.
pub(crate) fn scatter_rows(d_table: &mut [f32], dx: &[f32], ids: &[u32], c: usize) {
    for (row, &id) in dx.chunks_exact(c).zip(ids) {
        let id = id as usize;
        for (o, &g) in d_table[id * c..(id + 1) * c].iter_mut().zip(row) {
            *o += g;
        }
    }
}
