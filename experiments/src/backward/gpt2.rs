//! GPT-2's tape: the manual forward keeps each visited block's activations, the backward walks
//! the blocks top down (see [`super`] for the why). q, k and v are read in place from the qkv
//! projection (row stride 3C) and their gradients written into the matching columns of one dqkv
//! buffer, so no permute or transpose copy is made.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};
use rayon::prelude::*;

use super::kernels::{
    add_into, attention_bwd, attention_fwd, gemm_into, linear_bwd, linear_fwd, ln_bwd, lora_bwd,
    lora_fwd, mat, AttnGradTiles, AttnShape, Heads, LinGrads, LoraW, MatMut,
};
use super::{inputs_needing_grad, put, read_batch, scatter_rows, LoraRead, LossGrads, Weights};
use crate::model::gpt2::BlockVars;
use crate::model::{Gpt2, Trainable};
use crate::ops::{
    ce_bwd_from_exp_f32, ce_fwd_exp_inplace_f32, gelu_grad_map, gelu_map, layer_norm_rows,
};
use crate::{Error, Result};

/// See [`super::forward`]; the GPT-2 case.
pub(crate) fn forward(
    model: &Gpt2,
    ids: &candle_core::Tensor,
    targets: &candle_core::Tensor,
    trainable: &Trainable,
) -> Result<Option<Tape>> {
    let cfg = model.config();
    let (b, t, ids_v, tg_v) = read_batch(
        "GPT-2",
        ids,
        targets,
        cfg.n_positions,
        cfg.vocab_size,
        cfg.n_layer,
        trainable,
    )?;
    let vars = vars_of(model);
    let Some(w) = Weights::read(&vars) else {
        return Ok(None);
    };
    let Some(lr) = LoraRead::read(model.lora.as_ref()) else {
        return Ok(None);
    };
    let mut ws = ModelW::new(&w.slices(), cfg.n_positions);
    ws.lora = lr.slots(cfg.n_layer, SLOTS);
    let run = Run {
        b,
        t,
        c: cfg.n_embd,
        nh: cfg.n_head,
        v: cfg.vocab_size,
        eps: cfg.layer_norm_epsilon,
        threads: candle_core::utils::get_num_threads(),
    };
    run.forward(&ws, ids_v, tg_v, trainable)
        .map(Some)
        .map_err(Error::Other)
}

/// The activations of one GPT-2 [`forward`].
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
    pub(crate) fn loss(&self) -> f64 {
        self.loss
    }

    /// Gradients of the live parameters; `model` must be the one [`forward`] ran (unchanged).
    pub(crate) fn backward(self, model: &Gpt2) -> Result<LossGrads> {
        let vars = vars_of(model);
        let Some(w) = Weights::read(&vars) else {
            return Err(Error::Other(
                "manual backward: the model is no longer f32 on the CPU".into(),
            ));
        };
        let Some(lr) = LoraRead::read(model.lora.as_ref()) else {
            return Err(Error::Other(
                "manual backward: the adapters are no longer f32 on the CPU".into(),
            ));
        };
        let mut ws = ModelW::new(&w.slices(), model.config().n_positions);
        ws.lora = lr.slots(ws.blocks.len(), SLOTS);
        if ws.blocks.len() != self.tr.blocks.len() || ws.wte.len() != self.run.v * self.run.c {
            return Err(Error::Other(
                "manual backward: not the model of the forward pass".into(),
            ));
        }
        let run = self.run;
        run.backward(&ws, self).map_err(Error::Other)
    }
}

// ---- parameter access -------------------------------------------------------------------------

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
    /// LoRA adapters, `lora[block][slot]` (empty when the model has none).
    lora: Vec<Vec<Option<LoraW<'a>>>>,
}

/// Adaptable layers per block, in `model::lora::modules` order: c_attn, attn.c_proj, c_fc,
/// mlp.c_proj; the names of their adapters' gradients (after `h.{j}.`).
const SLOTS: usize = 4;
const LORA_NAMES: [(&str, &str); SLOTS] = [
    ("attn.c_attn.lora_A.weight", "attn.c_attn.lora_B.weight"),
    ("attn.c_proj.lora_A.weight", "attn.c_proj.lora_B.weight"),
    ("mlp.c_fc.lora_A.weight", "mlp.c_fc.lora_B.weight"),
    ("mlp.c_proj.lora_A.weight", "mlp.c_proj.lora_B.weight"),
];

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

/// The parameters in the order [`ModelW::new`] takes them: wte, wpe, blocks, ln_f.
fn vars_of(m: &Gpt2) -> Vec<&Var> {
    let mut vars: Vec<&Var> = vec![&m.wte, &m.wpe];
    for b in &m.blocks {
        vars.extend(block_vars(b));
    }
    vars.push(&m.ln_f_w);
    vars.push(&m.ln_f_b);
    vars
}

impl<'a> ModelW<'a> {
    fn new(s: &[&'a [f32]], wpe_rows: usize) -> Self {
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
            wpe_rows,
            blocks,
            ln_f_w: s[s.len() - 2],
            ln_f_b: s[s.len() - 1],
            lora: Vec::new(),
        }
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
    /// Per adapted slot, `s·x·Aᵀ` of its adapter.
    lu: [Option<Vec<f32>>; SLOTS],
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
        if let Some(db) = db {
            g.push((bn, (db, vec![out])));
        }
    }
}

impl Run {
    fn attn(&self) -> AttnShape {
        AttnShape {
            b: self.b,
            t: self.t,
            nh: self.nh,
            nkv: self.nh,
            hd: self.c / self.nh,
        }
    }

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
        let need_in = inputs_needing_grad(tr);

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
            let visit = tr.block_live(j) || need_in[j];
            let (x_out, s) = self.block_fwd(x, bw, lora_of(w, j));
            saved.push(visit.then_some(s));
            x = x_out;
        }

        // Head: ln_f, tied logits, cross-entropy.
        let hf = layer_norm_rows(&x, w.ln_f_w, w.ln_f_b, self.eps);
        let mut logits = vec![0f32; n * v];
        gemm_into(
            &mut MatMut::dense(&mut logits, v),
            c,
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
        // The tied wte's gradient: the head's part, then the lookup's added into it.
        let mut d_wte: Option<Vec<f32>> = None;
        if tr.top {
            let mut dw = vec![0f32; v * c];
            gemm_into(
                &mut MatMut::dense(&mut dw, c),
                n,
                false,
                mat(&dlogits, 1, v),
                mat(&hf, c, 1),
                self.threads,
            );
            d_wte = Some(dw);
        }
        if need_in[nl] || tr.top {
            let mut dhf = vec![0f32; n * c];
            gemm_into(
                &mut MatMut::dense(&mut dhf, c),
                v,
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
            if need_in[nl] {
                // Blocks backward, top down, while something below needs the gradient.
                for j in (0..nl).rev() {
                    let Some(s) = saved[j].take() else { break };
                    let live = (tr.blocks[j], tr.adapter(j));
                    let lw = lora_of(w, j);
                    let (dx_in, bgrads) = self.block_bwd(&w.blocks[j], lw, s, dx, live, need_in[j]);
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
                if tr.embeddings && !dx.is_empty() {
                    let mut dwpe = vec![0f32; w.wpe_rows * c];
                    for (r, row) in dx.chunks_exact(c).enumerate() {
                        let pos = r % t;
                        for (o, &g) in dwpe[pos * c..(pos + 1) * c].iter_mut().zip(row) {
                            *o += g;
                        }
                    }
                    put(&mut grads, "wpe.weight", dwpe, &[w.wpe_rows, c])?;
                    let dwte = d_wte.get_or_insert_with(|| vec![0f32; v * c]);
                    scatter_rows(dwte, &dx, &ids, c);
                }
            }
        }
        if let Some(d) = d_wte {
            put(&mut grads, "wte.weight", d, &[v, c])?;
        }
        Ok(LossGrads { loss, grads })
    }

    /// One block forward: x (N × C) → block output, and what its backward needs.
    fn block_fwd(
        &self,
        x: Vec<f32>,
        w: &BlockW<'_>,
        lw: &[Option<LoraW<'_>>; SLOTS],
    ) -> (Vec<f32>, Saved) {
        let (b, t, c) = (self.b, self.t, self.c);
        let th = self.threads;
        let mut lu: [Option<Vec<f32>>; SLOTS] = Default::default();
        // The adapter of `slot`, if any, adds its update to y and keeps its u.
        let mut adapt = |slot: usize, x: &[f32], k: usize, out: usize, y: &mut [f32]| {
            if let Some(l) = &lw[slot] {
                lu[slot] = Some(lora_fwd(x, l, k, out, y, th));
            }
        };
        let h1 = layer_norm_rows(&x, w.ln_1_w, w.ln_1_b, self.eps);
        let mut qkv = linear_fwd(&h1, w.c_attn_w, Some(w.c_attn_b), c, 3 * c, th);
        adapt(0, &h1, c, 3 * c, &mut qkv);
        // Per (batch, head): q, k, v read in place from qkv (row stride 3C).
        let mut y = vec![0f32; b * t * c];
        let heads = |off| Heads {
            d: &qkv,
            rs: 3 * c,
            off,
        };
        let p = attention_fwd(&self.attn(), heads(0), heads(c), heads(2 * c), &mut y);
        let mut x2 = linear_fwd(&y, w.attn_proj_w, Some(w.attn_proj_b), c, c, th);
        adapt(1, &y, c, c, &mut x2);
        add_into(&mut x2, &x);
        let h2 = layer_norm_rows(&x2, w.ln_2_w, w.ln_2_b, self.eps);
        let mut f = linear_fwd(&h2, w.c_fc_w, Some(w.c_fc_b), c, 4 * c, th);
        adapt(2, &h2, c, 4 * c, &mut f);
        let gf = gelu_map(&f);
        let mut out = linear_fwd(&gf, w.mlp_proj_w, Some(w.mlp_proj_b), 4 * c, c, th);
        adapt(3, &gf, 4 * c, c, &mut out);
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
            lu,
        };
        (out, s)
    }

    /// One block backward from d(out). Returns d(input) when `need_dx`, the weight gradients
    /// (suffix after `h.{j}.`, data, shape) when `live.0` and its adapters' when `live.1`.
    fn block_bwd(
        &self,
        w: &BlockW<'_>,
        lw: &[Option<LoraW<'_>>; SLOTS],
        mut s: Saved,
        dout: Vec<f32>,
        (live, lora_live): (bool, bool),
        need_dx: bool,
    ) -> (Option<Vec<f32>>, BlockGrads) {
        let (b, t, c) = (self.b, self.t, self.c);
        let shape = self.attn();
        let hd = shape.hd;
        let th = self.threads;
        let mut g: BlockGrads = Vec::new();
        let mut lu = std::mem::take(&mut s.lu);
        // The adapter of `slot`, if any: its share of d(input) into dx, its gradients into g.
        let mut adapt = |g: &mut BlockGrads,
                         slot: usize,
                         x: &[f32],
                         dy: &[f32],
                         k: usize,
                         out: usize,
                         dx: &mut [f32]| {
            if let (Some(l), Some(u)) = (&lw[slot], lu[slot].take()) {
                if let Some((da, db)) = lora_bwd(x, &u, l, dy, k, out, dx, lora_live, th) {
                    let (an, bn) = LORA_NAMES[slot];
                    g.push((an, (da, vec![l.r, k])));
                    g.push((bn, (db, vec![out, l.r])));
                }
            }
        };
        // MLP: out = x2 + proj(gelu(fc(ln_2(x2)))).
        let (mut dgf, r) = linear_bwd(&s.gf, w.mlp_proj_w, &dout, 4 * c, c, live, true, th);
        push_lin(&mut g, "mlp.c_proj.weight", "mlp.c_proj.bias", r, c, 4 * c);
        adapt(&mut g, 3, &s.gf, &dout, 4 * c, c, &mut dgf);
        let df = gelu_grad_map(&s.f, &dgf);
        drop(s.gf);
        let (mut dh2, r) = linear_bwd(&s.h2, w.c_fc_w, &df, c, 4 * c, live, true, th);
        push_lin(&mut g, "mlp.c_fc.weight", "mlp.c_fc.bias", r, 4 * c, c);
        adapt(&mut g, 2, &s.h2, &df, c, 4 * c, &mut dh2);
        drop(df);
        let mut dx2 = dout;
        let r = ln_bwd(&s.x2, w.ln_2_w, &dh2, self.eps, Some(&mut dx2), live);
        if let Some((dw, db)) = r {
            g.push(("ln_2.weight", (dw, vec![c])));
            g.push(("ln_2.bias", (db, vec![c])));
        }
        // Attention: x2 = x + proj(attn(ln_1(x))).
        let (mut dy, r) = linear_bwd(&s.y, w.attn_proj_w, &dx2, c, c, live, true, th);
        push_lin(&mut g, "attn.c_proj.weight", "attn.c_proj.bias", r, c, c);
        adapt(&mut g, 1, &s.y, &dx2, c, c, &mut dy);
        let mut dqkv = vec![0f32; b * t * 3 * c];
        {
            // Tiles of dqkv (N × 3C) of T rows × D columns: per window, the q heads, then the
            // k heads, then the v heads; head h's task writes tiles h, H + h and 2H + h.
            let nh = shape.nh;
            let mut tiles = Vec::with_capacity(b * nh);
            for row in MatMut::dense(&mut dqkv, 3 * c).grid(t, hd) {
                let mut row: Vec<Option<MatMut<'_>>> = row.into_iter().map(Some).collect();
                for h in 0..nh {
                    let mut take = |i: usize| row[i].take().expect("each tile taken once");
                    tiles.push(AttnGradTiles {
                        dq: take(h),
                        dk: take(nh + h),
                        dv: take(2 * nh + h),
                    });
                }
            }
            let heads = |off| Heads {
                d: &s.qkv,
                rs: 3 * c,
                off,
            };
            let dyh = Heads {
                d: &dy,
                rs: c,
                off: 0,
            };
            attention_bwd(&shape, heads(0), heads(c), heads(2 * c), &s.p, dyh, tiles);
        }
        drop(dy);
        let (mut dh1, r) = linear_bwd(&s.h1, w.c_attn_w, &dqkv, c, 3 * c, live, true, th);
        push_lin(
            &mut g,
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            r,
            3 * c,
            c,
        );
        adapt(&mut g, 0, &s.h1, &dqkv, c, 3 * c, &mut dh1);
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

/// Block `j`'s adapters (none when the model has no LoRA).
fn lora_of<'w, 'a>(w: &'w ModelW<'a>, j: usize) -> &'w [Option<LoraW<'a>>; SLOTS] {
    const NONE: [Option<LoraW<'static>>; SLOTS] = [None; SLOTS];
    match w.lora.get(j) {
        Some(v) => v.as_slice().try_into().expect("SLOTS adapters per block"),
        None => &NONE,
    }
}
