//! A whole-model manual forward + backward for training on the CPU (f32), without candle's
//! autograd.
//!
//! candle's backward gives every node of the graph a zero-filled gradient buffer and then adds the
//! incoming gradient to it (`GradStore::or_insert` + `add`), reshapes included: on the `tiny`
//! bench that fill-and-add was half of the main thread's backward time, and the 32 MB logits
//! gradient alone went through it three times. Here the forward keeps the activations backward
//! needs, and backward walks the blocks in reverse calling the same hand-written kernels as the
//! fused ops of [`crate::ops`] (layer norm, GELU, causal softmax, cross-entropy), writing each
//! gradient once: weight gradients straight from GEMM into their stored `[out, in]` layout, bias
//! and layer-norm sums with one column sum, attention per (batch, head) with q, k, v read in place
//! from the qkv projection through strides (no permute or transpose copies), frozen parameters'
//! gradients skipped and nothing computed below the lowest block that needs a gradient.
//!
//! The result is the `name → gradient` map that candle's autograd plus
//! [`crate::optim::GradAccumulator`] produce (`tests/manual_backward.rs` holds them together for
//! every training mask). Training uses it on the CPU unless `ABLATE_AUTOGRAD=1`; other devices
//! and dtypes use autograd.

use std::collections::BTreeMap;

use candle_core::{DType, Storage, Tensor, Var, D};
use rayon::prelude::*;

use super::{BlockVars, Gpt2, Trainable};
use crate::ops::{
    causal_softmax_f32, ce_bwd_from_exp_f32, ce_fwd_exp_inplace_f32, col_sum, gelu_grad_map,
    gelu_map, layer_norm_bwd_rows, layer_norm_rows, softmax_bwd_f32,
};
use crate::optim::GradAccumulator;
use crate::{Error, Result};

/// Loss and gradients of one micro-batch.
pub struct LossGrads {
    /// Mean token negative log-likelihood.
    pub loss: f64,
    /// Gradient of every live parameter under the mask (f32, on the CPU).
    pub grads: BTreeMap<String, Tensor>,
}

/// Whether training should use [`loss_and_grads`]: on the CPU unless `ABLATE_AUTOGRAD=1` asks
/// for candle's autograd (the reference the gradient tests compare with).
pub fn enabled(model: &Gpt2) -> bool {
    model.device().is_cpu() && std::env::var("ABLATE_AUTOGRAD").map_or(true, |v| v != "1")
}

/// Forward pass and mean cross-entropy of `model` on ids (B, T) u32 and targets (B·T) u32,
/// keeping what [`Tape::backward`] needs for the gradients of the parameters `trainable` marks
/// live (see [`Trainable`] for the tied `wte`). `None` when the model is not a contiguous f32 CPU
/// model (use autograd then).
pub fn forward(
    model: &Gpt2,
    ids: &Tensor,
    targets: &Tensor,
    trainable: &Trainable,
) -> Result<Option<Tape>> {
    if !model.device().is_cpu() {
        return Ok(None);
    }
    let cfg = model.config();
    let (b, t) = ids.dims2().map_err(|_| {
        Error::Config(format!(
            "GPT-2 input ids must be (batch, time), got {:?}",
            ids.dims()
        ))
    })?;
    if ids.dtype() != DType::U32 || targets.dtype() != DType::U32 {
        return Err(Error::Config("GPT-2 ids and targets must be u32".into()));
    }
    if t == 0 || t > cfg.n_positions {
        return Err(Error::Config(format!(
            "GPT-2 input length {t} must be between 1 and n_positions {}",
            cfg.n_positions
        )));
    }
    if targets.elem_count() != b * t {
        return Err(Error::Config(format!(
            "{} targets for {b} x {t} inputs",
            targets.elem_count()
        )));
    }
    if trainable.blocks.len() != cfg.n_layer {
        return Err(Error::Config(format!(
            "Trainable has {} block flags, the model has {} blocks",
            trainable.blocks.len(),
            cfg.n_layer
        )));
    }
    let ids_v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
    let tg_v: Vec<u32> = targets.flatten_all()?.to_vec1()?;
    if let Some(&bad) = ids_v.iter().find(|&&i| i as usize >= cfg.vocab_size) {
        return Err(Error::Config(format!(
            "token id {bad} is outside the vocabulary of {}",
            cfg.vocab_size
        )));
    }
    let Some(w) = Weights::read(model) else {
        return Ok(None);
    };
    let run = Run {
        b,
        t,
        c: cfg.n_embd,
        nh: cfg.n_head,
        v: cfg.vocab_size,
        eps: cfg.layer_norm_epsilon,
        threads: candle_core::utils::get_num_threads(),
    };
    run.forward(&w.slices(), ids_v, tg_v, trainable)
        .map(Some)
        .map_err(Error::Other)
}

/// The activations of one [`forward`], for its [`Tape::backward`].
pub struct Tape {
    run: Run,
    ids: Vec<u32>,
    tg: Vec<u32>,
    tr: Trainable,
    need_in: Vec<bool>,
    saved: Vec<Option<Saved>>,
    /// Input of ln_f, its output, the logits as exp(x − row max) and each row's 1/Σexp.
    x: Vec<f32>,
    hf: Vec<f32>,
    logits: Vec<f32>,
    lse: Vec<f64>,
    loss: f64,
}

impl Tape {
    /// Mean token negative log-likelihood.
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// Gradients of the live parameters; `model` must be the one [`forward`] ran (unchanged).
    pub fn backward(self, model: &Gpt2) -> Result<LossGrads> {
        let Some(w) = Weights::read(model) else {
            return Err(Error::Other(
                "manual backward: the model is no longer f32 on the CPU".into(),
            ));
        };
        let ws = w.slices();
        if ws.blocks.len() != self.tr.blocks.len() || ws.wte.len() != self.run.v * self.run.c {
            return Err(Error::Other(
                "manual backward: not the model of the forward pass".into(),
            ));
        }
        let run = self.run;
        run.backward(&ws, self).map_err(Error::Other)
    }
}

/// One training micro-batch: mean cross-entropy of `model` on (ids, targets), its backward, and
/// the gradients of `params` added to `acc`. The manual pass when [`enabled`] and the model is
/// f32 on the CPU, candle's autograd otherwise. Returns the loss (not checked for finiteness).
pub fn accumulate(
    model: &Gpt2,
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

/// [`forward`] then [`Tape::backward`].
pub fn loss_and_grads(
    model: &Gpt2,
    ids: &Tensor,
    targets: &Tensor,
    trainable: &Trainable,
) -> Result<Option<LossGrads>> {
    match forward(model, ids, targets, trainable)? {
        Some(tape) => tape.backward(model).map(Some),
        None => Ok(None),
    }
}

// ---- parameter access -------------------------------------------------------------------------

/// Read guards on every parameter's storage, held for one forward + backward.
struct Weights<'a> {
    /// (storage read guard, start, end, dims) per parameter.
    guards: Vec<(Guard<'a>, usize, usize, Vec<usize>)>,
}

type Guard<'a> = Box<dyn std::ops::Deref<Target = Storage> + 'a>;

/// Slices of one block's parameters (candle layout, `[out, in]`).
struct BlockW<'a> {
    ln_1_w: &'a [f32],
    ln_1_b: &'a [f32],
    c_attn_w: &'a [f32],
    c_attn_b: &'a [f32],
    attn_proj_w: &'a [f32],
    attn_proj_b: &'a [f32],
    ln_2_w: &'a [f32],
    ln_2_b: &'a [f32],
    c_fc_w: &'a [f32],
    c_fc_b: &'a [f32],
    mlp_proj_w: &'a [f32],
    mlp_proj_b: &'a [f32],
}

struct ModelW<'a> {
    wte: &'a [f32],
    wpe: &'a [f32],
    wpe_rows: usize,
    blocks: Vec<BlockW<'a>>,
    ln_f_w: &'a [f32],
    ln_f_b: &'a [f32],
}

fn block_vars(b: &BlockVars) -> [&Var; 12] {
    [
        &b.ln_1_w,
        &b.ln_1_b,
        &b.c_attn_w,
        &b.c_attn_b,
        &b.attn_proj_w,
        &b.attn_proj_b,
        &b.ln_2_w,
        &b.ln_2_b,
        &b.c_fc_w,
        &b.c_fc_b,
        &b.mlp_proj_w,
        &b.mlp_proj_b,
    ]
}

impl<'a> Weights<'a> {
    /// Guards in the order of [`super::Gpt2Config::param_shapes`]; None unless every parameter
    /// is a contiguous f32 CPU tensor.
    fn read(m: &'a Gpt2) -> Option<Self> {
        let mut vars: Vec<&'a Var> = vec![&m.wte, &m.wpe];
        for b in &m.blocks {
            vars.extend(block_vars(b));
        }
        vars.push(&m.ln_f_w);
        vars.push(&m.ln_f_b);
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
            guards.push((Box::new(st) as Guard<'a>, o1, o2, t.dims().to_vec()));
        }
        Some(Weights { guards })
    }

    fn slices(&self) -> ModelW<'_> {
        let s: Vec<&[f32]> = self
            .guards
            .iter()
            .map(|(st, o1, o2, _)| match &***st {
                Storage::Cpu(c) => &c.as_slice::<f32>().expect("checked f32")[*o1..*o2],
                _ => unreachable!("checked CPU"),
            })
            .collect();
        let n_layer = (s.len() - 4) / 12;
        let blocks = (0..n_layer)
            .map(|i| {
                let p = &s[2 + 12 * i..2 + 12 * (i + 1)];
                BlockW {
                    ln_1_w: p[0],
                    ln_1_b: p[1],
                    c_attn_w: p[2],
                    c_attn_b: p[3],
                    attn_proj_w: p[4],
                    attn_proj_b: p[5],
                    ln_2_w: p[6],
                    ln_2_b: p[7],
                    c_fc_w: p[8],
                    c_fc_b: p[9],
                    mlp_proj_w: p[10],
                    mlp_proj_b: p[11],
                }
            })
            .collect();
        ModelW {
            wte: s[0],
            wpe: s[1],
            wpe_rows: self.guards[1].3[0],
            blocks,
            ln_f_w: s[s.len() - 2],
            ln_f_b: s[s.len() - 1],
        }
    }
}

// ---- GEMM -------------------------------------------------------------------------------------

/// A matrix view: data, row stride, column stride (elements).
#[derive(Clone, Copy)]
struct Mat<'a> {
    d: &'a [f32],
    rs: usize,
    cs: usize,
}

fn mat(d: &[f32], rs: usize, cs: usize) -> Mat<'_> {
    Mat { d, rs, cs }
}

/// Checks that an (r, c) view with strides (rs, cs) fits in `len` elements.
fn fits(len: usize, r: usize, c: usize, rs: usize, cs: usize) -> bool {
    r == 0 || c == 0 || (r - 1) * rs + (c - 1) * cs < len
}

/// `dst (m × n) = a (m × k) · b (k × n)`, or `+=` with `acc`; dst row-major with row stride
/// `dst_rs`. `par`: split over the rayon pool (false inside an already parallel loop).
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    acc: bool,
    a: Mat<'_>,
    b: Mat<'_>,
    threads: usize,
) {
    assert!(fits(dst.len(), m, n, dst_rs, 1), "gemm: dst too small");
    assert!(fits(a.d.len(), m, k, a.rs, a.cs), "gemm: lhs too small");
    assert!(fits(b.d.len(), k, n, b.rs, b.cs), "gemm: rhs too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for r in 0..m {
                dst[r * dst_rs..r * dst_rs + n].fill(0.0);
            }
        }
        return;
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three views were checked to lie inside their slices; dst is borrowed mutably
    // and does not alias the inputs (they are shared borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            acc,
            a.d.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.d.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// A raw pointer that crosses into rayon tasks writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint writes, see the call sites.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The `len` elements from `off`.
    ///
    /// # Safety
    /// In range of the original buffer, and no other live reference to those elements.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, off: usize, len: usize) -> &mut [f32] {
        unsafe { std::slice::from_raw_parts_mut(self.0.add(off), len) }
    }
}

// ---- the pass ---------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Run {
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    v: usize,
    eps: f64,
    threads: usize,
}

/// What one block's backward needs from its forward.
struct Saved {
    x: Vec<f32>,
    h1: Vec<f32>,
    qkv: Vec<f32>,
    /// Attention probabilities, (B·H, T, T).
    p: Vec<f32>,
    y: Vec<f32>,
    x2: Vec<f32>,
    h2: Vec<f32>,
    f: Vec<f32>,
    gf: Vec<f32>,
}

/// `x (N × K) · wᵀ + bias` for w `[out, k]`.
fn linear_fwd(x: &[f32], w: &[f32], bias: &[f32], k: usize, threads: usize) -> Vec<f32> {
    let out = bias.len();
    let n = x.len() / k;
    let mut y = Vec::with_capacity(n * out);
    for _ in 0..n {
        y.extend_from_slice(bias);
    }
    gemm_into(
        n,
        out,
        k,
        &mut y,
        out,
        true,
        mat(x, k, 1),
        mat(w, 1, k),
        threads,
    );
    y
}

/// A linear layer's (dw `[out, k]`, db), when it trains.
type LinGrads = Option<(Vec<f32>, Vec<f32>)>;

/// Gradients of `x · wᵀ + b` from `g` (N × out): dx (N × k), and dw `[out, k]` and db when the
/// layer trains.
fn linear_bwd(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    k: usize,
    out: usize,
    want_w: bool,
    threads: usize,
) -> (Vec<f32>, LinGrads) {
    let n = g.len() / out;
    let mut dx = vec![0f32; n * k];
    gemm_into(
        n,
        k,
        out,
        &mut dx,
        k,
        false,
        mat(g, out, 1),
        mat(w, k, 1),
        threads,
    );
    let dw = want_w.then(|| {
        let mut dw = vec![0f32; out * k];
        gemm_into(
            out,
            k,
            n,
            &mut dw,
            k,
            false,
            mat(g, 1, out),
            mat(x, k, 1),
            threads,
        );
        (dw, col_sum(g, out, 0, out))
    });
    (dx, dw)
}

/// Layer norm backward: adds dx into `dx_acc` (if given) and returns (dw, db) when trained.
fn ln_bwd(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f64,
    dx_acc: Option<&mut [f32]>,
    want_w: bool,
) -> Option<(Vec<f32>, Vec<f32>)> {
    let c = w.len();
    let both = layer_norm_bwd_rows(x, w, g, eps); // rows of [dx | g ⊙ x̂]
    if let Some(acc) = dx_acc {
        acc.par_chunks_mut(c * 256)
            .zip(both.par_chunks(2 * c * 256))
            .for_each(|(a, bo)| {
                for (arow, brow) in a.chunks_exact_mut(c).zip(bo.chunks_exact(2 * c)) {
                    for (av, &bv) in arow.iter_mut().zip(&brow[..c]) {
                        *av += bv;
                    }
                }
            });
    }
    want_w.then(|| (col_sum(&both, 2 * c, c, c), col_sum(g, c, 0, c)))
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(1 << 15)
        .zip(x.par_chunks(1 << 15))
        .for_each(|(a, b)| {
            for (av, &bv) in a.iter_mut().zip(b) {
                *av += bv;
            }
        });
}

impl Run {
    fn forward(
        self,
        w: &ModelW<'_>,
        ids: Vec<u32>,
        tg: Vec<u32>,
        tr: &Trainable,
    ) -> std::result::Result<Tape, String> {
        let (b, t, c, v) = (self.b, self.t, self.c, self.v);
        let n = b * t;
        let nl = w.blocks.len();
        // need_in[j]: the input of block j (j = n_layer: of ln_f) needs a gradient, i.e. the
        // embeddings or a block below j train.
        let mut need_in = vec![false; nl + 1];
        let mut below = tr.embeddings;
        for (j, &live) in tr.blocks.iter().enumerate() {
            need_in[j] = below;
            below |= live;
        }
        need_in[nl] = below; // the input of ln_f

        // Embeddings.
        let mut x = vec![0f32; n * c];
        x.par_chunks_mut(c).enumerate().for_each(|(r, row)| {
            let id = ids[r] as usize;
            let pos = r % t;
            let (te, pe) = (&w.wte[id * c..(id + 1) * c], &w.wpe[pos * c..(pos + 1) * c]);
            for ((o, &a), &p) in row.iter_mut().zip(te).zip(pe) {
                *o = a + p;
            }
        });

        // Blocks forward, keeping what backward needs of the blocks it will visit.
        let mut saved: Vec<Option<Saved>> = Vec::with_capacity(nl);
        for (j, bw) in w.blocks.iter().enumerate() {
            let visit = tr.blocks[j] || need_in[j];
            let (x_out, s) = self.block_fwd(x, bw);
            saved.push(visit.then_some(s));
            x = x_out;
        }

        // Head: ln_f, tied logits, cross-entropy.
        let hf = layer_norm_rows(&x, w.ln_f_w, w.ln_f_b, self.eps);
        let mut logits = vec![0f32; n * v];
        gemm_into(
            n,
            v,
            c,
            &mut logits,
            v,
            false,
            mat(&hf, c, 1),
            mat(w.wte, 1, c),
            self.threads,
        );
        let (nll, lse) = ce_fwd_exp_inplace_f32(&mut logits, &tg, v).map_err(|e| e.to_string())?;
        let loss = nll.iter().sum::<f64>() / n as f64;
        Ok(Tape {
            run: self,
            ids,
            tg,
            tr: tr.clone(),
            need_in,
            saved,
            x,
            hf,
            logits,
            lse,
            loss,
        })
    }

    fn backward(&self, w: &ModelW<'_>, tape: Tape) -> std::result::Result<LossGrads, String> {
        let (t, c, v) = (self.t, self.c, self.v);
        let Tape {
            ids,
            tg,
            tr,
            need_in,
            mut saved,
            x,
            hf,
            mut logits,
            lse,
            loss,
            ..
        } = tape;
        let tr = &tr;
        let n = tg.len();
        let nl = w.blocks.len();
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        ce_bwd_from_exp_f32(&mut logits, &tg, &lse, v, 1.0 / n as f64);
        drop(lse);
        let dlogits = logits;
        let mut d_wte: Option<Vec<f32>> = None;
        if tr.top {
            let mut dw = vec![0f32; v * c];
            gemm_into(
                v,
                c,
                n,
                &mut dw,
                c,
                false,
                mat(&dlogits, 1, v),
                mat(&hf, c, 1),
                self.threads,
            );
            d_wte = Some(dw);
        }
        if !need_in[nl] && !tr.top {
            return self.finish(grads, put_all(d_wte, None, loss));
        }
        let mut dhf = vec![0f32; n * c];
        gemm_into(
            n,
            c,
            v,
            &mut dhf,
            c,
            false,
            mat(&dlogits, v, 1),
            mat(w.wte, c, 1),
            self.threads,
        );
        drop(dlogits);
        let mut dx = vec![0f32; if need_in[nl] { n * c } else { 0 }];
        let dx_acc = need_in[nl].then_some(dx.as_mut_slice());
        if let Some((dw, db)) = ln_bwd(&x, w.ln_f_w, &dhf, self.eps, dx_acc, tr.top) {
            put(&mut grads, "ln_f.weight", dw, &[c])?;
            put(&mut grads, "ln_f.bias", db, &[c])?;
        }
        drop(dhf);
        if !need_in[nl] {
            return self.finish(grads, put_all(d_wte, None, loss));
        }

        // Blocks backward, top down, while something below needs the gradient.
        for j in (0..nl).rev() {
            let Some(s) = saved[j].take() else { break };
            let live = tr.blocks[j];
            let (dx_in, bgrads) = self.block_bwd(&w.blocks[j], s, dx, live, need_in[j]);
            for (suffix, (data, shape)) in bgrads {
                put(&mut grads, &format!("h.{j}.{suffix}"), data, &shape)?;
            }
            match dx_in {
                Some(d) => dx = d,
                None => {
                    dx = Vec::new();
                    break;
                }
            }
        }

        // Embeddings backward.
        let mut d_emb = None;
        if tr.embeddings && !dx.is_empty() {
            let mut dwpe = vec![0f32; w.wpe_rows * c];
            for (r, row) in dx.chunks_exact(c).enumerate() {
                let pos = r % t;
                for (o, &g) in dwpe[pos * c..(pos + 1) * c].iter_mut().zip(row) {
                    *o += g;
                }
            }
            put(&mut grads, "wpe.weight", dwpe, &[w.wpe_rows, c])?;
            let mut dwte = d_wte.take().unwrap_or_else(|| vec![0f32; v * c]);
            for (r, row) in dx.chunks_exact(c).enumerate() {
                let id = ids[r] as usize;
                for (o, &g) in dwte[id * c..(id + 1) * c].iter_mut().zip(row) {
                    *o += g;
                }
            }
            d_emb = Some(dwte);
        }
        self.finish(grads, put_all(d_wte, d_emb, loss))
    }

    fn finish(
        &self,
        mut grads: BTreeMap<String, Tensor>,
        tail: Tail,
    ) -> std::result::Result<LossGrads, String> {
        let dev = candle_core::Device::Cpu;
        if let Some(d) = tail.wte {
            let t = Tensor::from_vec(d, (self.v, self.c), &dev).map_err(|e| e.to_string())?;
            grads.insert("wte.weight".into(), t);
        }
        Ok(LossGrads {
            loss: tail.loss,
            grads,
        })
    }

    /// One block forward: x (N × C) → block output, and what its backward needs.
    fn block_fwd(&self, x: Vec<f32>, w: &BlockW<'_>) -> (Vec<f32>, Saved) {
        let (b, t, c, nh) = (self.b, self.t, self.c, self.nh);
        let hd = c / nh;
        let th = self.threads;
        let h1 = layer_norm_rows(&x, w.ln_1_w, w.ln_1_b, self.eps);
        let qkv = linear_fwd(&h1, w.c_attn_w, w.c_attn_b, c, th);
        // Per (batch, head): scores = q kᵀ, causal softmax, y = P v written into its columns of
        // y (N × C); q, k, v read in place from qkv (row stride 3C).
        let mut p = vec![0f32; b * nh * t * t];
        let mut y = vec![0f32; b * t * c];
        let yp = SendPtr(y.as_mut_ptr());
        let y_len = y.len();
        let scale = 1.0 / (hd as f32).sqrt();
        p.par_chunks_mut(t * t).enumerate().for_each(|(bh, pm)| {
            let (bi, hi) = (bh / nh, bh % nh);
            let base = bi * t * 3 * c + hi * hd;
            let q = mat(&qkv[base..], 3 * c, 1);
            let kt = mat(&qkv[base + c..], 1, 3 * c);
            let vv = mat(&qkv[base + 2 * c..], 3 * c, 1);
            gemm_into(t, t, hd, pm, t, false, q, kt, 1);
            causal_softmax_f32(pm, t, scale);
            let off = bi * t * c + hi * hd;
            // SAFETY: head (bi, hi) writes only rows bi·T.. and columns hi·D..(hi+1)·D of y.
            let ys = unsafe { yp.slice(off, y_len - off) };
            gemm_into(t, hd, t, ys, c, false, mat(pm, t, 1), vv, 1);
        });
        let a = linear_fwd(&y, w.attn_proj_w, w.attn_proj_b, c, th);
        let mut x2 = a;
        add_into(&mut x2, &x);
        let h2 = layer_norm_rows(&x2, w.ln_2_w, w.ln_2_b, self.eps);
        let f = linear_fwd(&h2, w.c_fc_w, w.c_fc_b, c, th);
        let gf = gelu_map(&f);
        let mut out = linear_fwd(&gf, w.mlp_proj_w, w.mlp_proj_b, 4 * c, th);
        add_into(&mut out, &x2);
        let s = Saved {
            x,
            h1,
            qkv,
            p,
            y,
            x2,
            h2,
            f,
            gf,
        };
        (out, s)
    }

    /// One block backward from d(out). Returns d(input) when `need_dx`, and the weight gradients
    /// (suffix after `h.{j}.`, data, shape) when `live`.
    fn block_bwd(
        &self,
        w: &BlockW<'_>,
        s: Saved,
        dout: Vec<f32>,
        live: bool,
        need_dx: bool,
    ) -> (Option<Vec<f32>>, BlockGrads) {
        let (b, t, c, nh) = (self.b, self.t, self.c, self.nh);
        let hd = c / nh;
        let th = self.threads;
        let mut g: BlockGrads = Vec::new();
        // MLP: out = x2 + proj(gelu(fc(ln_2(x2)))).
        let (dgf, r) = linear_bwd(&s.gf, w.mlp_proj_w, &dout, 4 * c, c, live, th);
        push_lin(&mut g, "mlp.c_proj.weight", "mlp.c_proj.bias", r, c, 4 * c);
        let df = gelu_grad_map(&s.f, &dgf);
        drop(s.gf);
        let (dh2, r) = linear_bwd(&s.h2, w.c_fc_w, &df, c, 4 * c, live, th);
        push_lin(&mut g, "mlp.c_fc.weight", "mlp.c_fc.bias", r, 4 * c, c);
        drop(df);
        let mut dx2 = dout;
        let r = ln_bwd(&s.x2, w.ln_2_w, &dh2, self.eps, Some(&mut dx2), live);
        if let Some((dw, db)) = r {
            g.push(("ln_2.weight", (dw, vec![c])));
            g.push(("ln_2.bias", (db, vec![c])));
        }
        // Attention: x2 = x + proj(attn(ln_1(x))).
        let (dy, r) = linear_bwd(&s.y, w.attn_proj_w, &dx2, c, c, live, th);
        push_lin(&mut g, "attn.c_proj.weight", "attn.c_proj.bias", r, c, c);
        let mut dqkv = vec![0f32; b * t * 3 * c];
        let dp = SendPtr(dqkv.as_mut_ptr());
        let d_len = dqkv.len();
        let scale = 1.0 / (hd as f32).sqrt();
        let qkv = &s.qkv;
        s.p.par_chunks(t * t).enumerate().for_each(|(bh, pm)| {
            let (bi, hi) = (bh / nh, bh % nh);
            let base = bi * t * 3 * c + hi * hd;
            let dyh = &dy[bi * t * c + hi * hd..];
            let mut ds = vec![0f32; t * t];
            // dP = dy vᵀ
            gemm_into(
                t,
                t,
                hd,
                &mut ds,
                t,
                false,
                mat(dyh, c, 1),
                mat(&qkv[base + 2 * c..], 1, 3 * c),
                1,
            );
            // SAFETY: head (bi, hi) writes only rows bi·T.. and its D columns of the q, k and v
            // thirds of dqkv.
            let dv = unsafe { dp.slice(base + 2 * c, d_len - base - 2 * c) };
            gemm_into(t, hd, t, dv, 3 * c, false, mat(pm, 1, t), mat(dyh, c, 1), 1);
            softmax_bwd_f32(&mut ds, pm, t, scale);
            let dq = unsafe { dp.slice(base, d_len - base) };
            gemm_into(
                t,
                hd,
                t,
                dq,
                3 * c,
                false,
                mat(&ds, t, 1),
                mat(&qkv[base + c..], 3 * c, 1),
                1,
            );
            let dk = unsafe { dp.slice(base + c, d_len - base - c) };
            gemm_into(
                t,
                hd,
                t,
                dk,
                3 * c,
                false,
                mat(&ds, 1, t),
                mat(&qkv[base..], 3 * c, 1),
                1,
            );
        });
        drop(dy);
        let (dh1, r) = linear_bwd(&s.h1, w.c_attn_w, &dqkv, c, 3 * c, live, th);
        push_lin(
            &mut g,
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            r,
            3 * c,
            c,
        );
        drop(dqkv);
        let mut dx = dx2;
        let r = ln_bwd(&s.x, w.ln_1_w, &dh1, self.eps, Some(&mut dx), live);
        if let Some((dw, db)) = r {
            g.push(("ln_1.weight", (dw, vec![c])));
            g.push(("ln_1.bias", (db, vec![c])));
        }
        (need_dx.then_some(dx), g)
    }
}

/// The tied `wte`'s gradient (head part, embedding part already added into it) and the loss.
struct Tail {
    wte: Option<Vec<f32>>,
    loss: f64,
}

fn put_all(head: Option<Vec<f32>>, emb: Option<Vec<f32>>, loss: f64) -> Tail {
    Tail {
        wte: emb.or(head),
        loss,
    }
}

/// Inserts one gradient tensor (CPU, f32) into the map.
fn put(
    grads: &mut BTreeMap<String, Tensor>,
    name: &str,
    data: Vec<f32>,
    shape: &[usize],
) -> std::result::Result<(), String> {
    let t = Tensor::from_vec(data, shape, &candle_core::Device::Cpu).map_err(|e| e.to_string())?;
    grads.insert(name.to_string(), t);
    Ok(())
}

/// Block gradients: (suffix after `h.{j}.`, (data, shape)).
type BlockGrads = Vec<(&'static str, (Vec<f32>, Vec<usize>))>;

/// Adds a linear layer's (dw `[out, k]`, db) to `g` when it was computed.
fn push_lin(
    g: &mut BlockGrads,
    wn: &'static str,
    bn: &'static str,
    r: LinGrads,
    out: usize,
    k: usize,
) {
    if let Some((dw, db)) = r {
        g.push((wn, (dw, vec![out, k])));
        g.push((bn, (db, vec![out])));
    }
}
