//! Llama's tape: RMS norms, rotary embeddings applied in place in the projections' (B·T, H·D)
//! layout, grouped-query attention (one task per window and key/value head, looping over the
//! query heads that share it), the SwiGLU MLP, and a tied or untied head. Same masks and the same
//! rules as the GPT-2 tape ([`super::gpt2`]): frozen weights get no gradient, and nothing is
//! computed below the lowest block whose input needs one.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Tensor, Var};
use rayon::prelude::*;

use super::kernels::{
    add_into, attention_bwd, attention_fwd, gemm_into, linear_bwd, linear_bwd_into, linear_fwd,
    lora_bwd, lora_fwd, mat, AttnGradTiles, AttnShape, Heads, LinGrads, LoraW, MatMut,
};
use super::{inputs_needing_grad, put, read_batch, scatter_rows, LoraRead, LossGrads, Weights};
use crate::model::{Llama, Trainable};
use crate::ops::{
    ce_bwd_from_exp_f32, ce_fwd_exp_inplace_f32, rms_norm_bwd_rows, rms_norm_rows,
    rope_bwd_inplace_f32, rope_inplace_f32, swiglu_bwd_f32, swiglu_f32, RopeTables,
};
use crate::{Error, Result};

/// See [`super::forward`]; the Llama case.
pub(crate) fn forward(
    model: &Llama,
    ids: &Tensor,
    targets: &Tensor,
    trainable: &Trainable,
) -> Result<Option<Tape>> {
    let cfg = model.config();
    let (b, t, ids_v, tg_v) = read_batch(
        "Llama",
        ids,
        targets,
        cfg.max_position_embeddings,
        cfg.vocab_size,
        cfg.num_hidden_layers,
        trainable,
    )?;
    let vars = vars_of(model);
    let Some(w) = Weights::read(&vars) else {
        return Ok(None);
    };
    let Some(lr) = LoraRead::read(model.lora.as_ref()) else {
        return Ok(None);
    };
    let mut ws = ModelW::new(&w.slices(), model);
    ws.lora = lr.slots(cfg.num_hidden_layers, SLOTS);
    let run = Run {
        b,
        t,
        c: cfg.hidden_size,
        inter: cfg.intermediate_size,
        nh: cfg.num_attention_heads,
        nkv: cfg.num_key_value_heads,
        hd: cfg.head_dim,
        v: cfg.vocab_size,
        eps: cfg.rms_norm_eps,
        threads: candle_core::utils::get_num_threads(),
    };
    let tables = model.rope_tables(t);
    run.forward(&ws, tables, ids_v, tg_v, trainable)
        .map(Some)
        .map_err(Error::Other)
}

/// The activations of one Llama [`forward`].
pub struct Tape {
    run: Run,
    tables: Arc<RopeTables>,
    ids: Vec<u32>,
    tg: Vec<u32>,
    tr: Trainable,
    need_in: Vec<bool>,
    saved: Vec<Option<Saved>>,
    /// Input of the final norm, its output, the logits as exp(x − row max), each row's 1/Σexp.
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
    pub(crate) fn backward(self, model: &Llama) -> Result<LossGrads> {
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
        let mut ws = ModelW::new(&w.slices(), model);
        ws.lora = lr.slots(ws.blocks.len(), SLOTS);
        if ws.blocks.len() != self.tr.blocks.len() || ws.embed.len() != self.run.v * self.run.c {
            return Err(Error::Other(
                "manual backward: not the model of the forward pass".into(),
            ));
        }
        let run = self.run;
        run.backward(&ws, self).map_err(Error::Other)
    }
}

// ---- parameter access -------------------------------------------------------------------------

/// Slices of one block's parameters (`[out, in]`).
struct BlockW<'a> {
    input_norm: &'a [f32],
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    post_norm: &'a [f32],
    gate: &'a [f32],
    up: &'a [f32],
    down: &'a [f32],
}

struct ModelW<'a> {
    embed: &'a [f32],
    /// The head's weight: `lm_head` when untied, else `embed`.
    head: &'a [f32],
    tied: bool,
    blocks: Vec<BlockW<'a>>,
    norm: &'a [f32],
    /// LoRA adapters, `lora[block][slot]` (empty when the model has none).
    lora: Vec<Vec<Option<LoraW<'a>>>>,
}

/// Adaptable layers per block, in `model::lora::modules` order: q, k, v, o, gate, up, down; the
/// names of their adapters' gradients (after `model.layers.{j}.`).
const SLOTS: usize = 7;
const LORA_NAMES: [(&str, &str); SLOTS] = [
    (
        "self_attn.q_proj.lora_A.weight",
        "self_attn.q_proj.lora_B.weight",
    ),
    (
        "self_attn.k_proj.lora_A.weight",
        "self_attn.k_proj.lora_B.weight",
    ),
    (
        "self_attn.v_proj.lora_A.weight",
        "self_attn.v_proj.lora_B.weight",
    ),
    (
        "self_attn.o_proj.lora_A.weight",
        "self_attn.o_proj.lora_B.weight",
    ),
    ("mlp.gate_proj.lora_A.weight", "mlp.gate_proj.lora_B.weight"),
    ("mlp.up_proj.lora_A.weight", "mlp.up_proj.lora_B.weight"),
    ("mlp.down_proj.lora_A.weight", "mlp.down_proj.lora_B.weight"),
];

/// Block `j`'s adapters (none when the model has no LoRA).
fn lora_of<'w, 'a>(w: &'w ModelW<'a>, j: usize) -> &'w [Option<LoraW<'a>>; SLOTS] {
    const NONE: [Option<LoraW<'static>>; SLOTS] = [None; SLOTS];
    match w.lora.get(j) {
        Some(v) => v.as_slice().try_into().expect("SLOTS adapters per block"),
        None => &NONE,
    }
}

/// The parameters in the order [`ModelW::new`] takes them: embed, lm_head (untied), blocks, norm.
fn vars_of(m: &Llama) -> Vec<&Var> {
    let mut vars: Vec<&Var> = vec![&m.embed];
    if let Some(h) = &m.lm_head {
        vars.push(h);
    }
    for b in &m.blocks {
        vars.extend([
            &b.input_norm,
            &b.q,
            &b.k,
            &b.v,
            &b.o,
            &b.post_norm,
            &b.gate,
            &b.up,
            &b.down,
        ]);
    }
    vars.push(&m.norm);
    vars
}

impl<'a> ModelW<'a> {
    fn new(s: &[&'a [f32]], m: &Llama) -> Self {
        let tied = m.lm_head.is_none();
        let first = if tied { 1 } else { 2 };
        let n_layer = (s.len() - first - 1) / 9;
        let blocks = (0..n_layer)
            .map(|i| {
                let p = &s[first + 9 * i..first + 9 * (i + 1)];
                BlockW {
                    input_norm: p[0],
                    q: p[1],
                    k: p[2],
                    v: p[3],
                    o: p[4],
                    post_norm: p[5],
                    gate: p[6],
                    up: p[7],
                    down: p[8],
                }
            })
            .collect();
        ModelW {
            embed: s[0],
            head: if tied { s[0] } else { s[1] },
            tied,
            blocks,
            norm: s[s.len() - 1],
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
    inter: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    v: usize,
    eps: f64,
    threads: usize,
}

/// What one block's backward needs from its forward.
struct Saved {
    x: Vec<f32>,
    h1: Vec<f32>,
    /// q and k after the rotary embedding, v as projected.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention probabilities, (B·H, T, T).
    p: Vec<f32>,
    y: Vec<f32>,
    x2: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
    /// Per adapted slot, `s·x·Aᵀ` of its adapter.
    lu: [Option<Vec<f32>>; SLOTS],
}

/// Block gradients: (suffix after `model.layers.{j}.`, (data, shape)).
type BlockGrads = Vec<(&'static str, (Vec<f32>, Vec<usize>))>;

fn push_w(g: &mut BlockGrads, name: &'static str, r: LinGrads, out: usize, k: usize) {
    if let Some((dw, _)) = r {
        g.push((name, (dw, vec![out, k])));
    }
}

impl Run {
    fn attn(&self) -> AttnShape {
        AttnShape {
            b: self.b,
            t: self.t,
            nh: self.nh,
            nkv: self.nkv,
            hd: self.hd,
        }
    }

    fn forward(
        self,
        w: &ModelW<'_>,
        tables: Arc<RopeTables>,
        ids: Vec<u32>,
        tg: Vec<u32>,
        tr: &Trainable,
    ) -> std::result::Result<Tape, String> {
        let (n, c, v) = (self.b * self.t, self.c, self.v);
        let nl = w.blocks.len();
        let need_in = inputs_needing_grad(tr);

        // Embeddings.
        let mut x = vec![0f32; n * c];
        x.par_chunks_mut(c).enumerate().for_each(|(r, row)| {
            let id = ids[r] as usize;
            row.copy_from_slice(&w.embed[id * c..(id + 1) * c]);
        });

        // Blocks forward, keeping what backward needs of the blocks it will visit.
        let mut saved: Vec<Option<Saved>> = Vec::with_capacity(nl);
        for (j, bw) in w.blocks.iter().enumerate() {
            let visit = tr.block_live(j) || need_in[j];
            let (x_out, s) = self.block_fwd(x, bw, lora_of(w, j), &tables);
            saved.push(visit.then_some(s));
            x = x_out;
        }

        // Head: final norm, logits, cross-entropy.
        let hf = rms_norm_rows(&x, w.norm, self.eps);
        let mut logits = vec![0f32; n * v];
        gemm_into(
            &mut MatMut::dense(&mut logits, v),
            c,
            false,
            mat(&hf, c, 1),
            mat(w.head, 1, c),
            self.threads,
        );
        let (nll, lse) = ce_fwd_exp_inplace_f32(&mut logits, &tg, v).map_err(|e| e.to_string())?;
        let loss = nll.iter().sum::<f64>() / n as f64;
        Ok(Tape {
            run: self,
            tables,
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
        let (c, v) = (self.c, self.v);
        let Tape {
            tables,
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
        // The head's weight gradient (for a tied head the embeddings', the lookup's added later).
        let mut d_head: Option<Vec<f32>> = None;
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
            d_head = Some(dw);
        }
        let mut d_embed: Option<Vec<f32>> = None;
        if need_in[nl] || tr.top {
            let mut dhf = vec![0f32; n * c];
            gemm_into(
                &mut MatMut::dense(&mut dhf, c),
                v,
                false,
                mat(&dlogits, v, 1),
                mat(w.head, c, 1),
                self.threads,
            );
            drop(dlogits);
            let mut dx = vec![0f32; n * c];
            if let Some(dw) = rms_norm_bwd_rows(&x, w.norm, &dhf, self.eps, &mut dx, false, tr.top)
            {
                put(&mut grads, "model.norm.weight", dw, &[c])?;
            }
            drop(dhf);
            if need_in[nl] {
                // Blocks backward, top down, while something below needs the gradient.
                for j in (0..nl).rev() {
                    let Some(s) = saved[j].take() else { break };
                    let live = (tr.blocks[j], tr.adapter(j));
                    let lw = lora_of(w, j);
                    let (dx_in, bgrads) =
                        self.block_bwd(&w.blocks[j], lw, s, dx, live, need_in[j], &tables);
                    for (suffix, (data, shape)) in bgrads {
                        put(
                            &mut grads,
                            &format!("model.layers.{j}.{suffix}"),
                            data,
                            &shape,
                        )?;
                    }
                    match dx_in {
                        Some(d) => dx = d,
                        None => {
                            dx = Vec::new();
                            break;
                        }
                    }
                }
                // Embeddings backward (into the head's gradient when tied).
                if tr.embeddings && !dx.is_empty() {
                    let table = if w.tied {
                        d_head.get_or_insert_with(|| vec![0f32; v * c])
                    } else {
                        d_embed.get_or_insert_with(|| vec![0f32; v * c])
                    };
                    scatter_rows(table, &dx, &ids, c);
                }
            }
        }
        if let Some(d) = d_head {
            let name = if w.tied {
                "model.embed_tokens.weight"
            } else {
                "lm_head.weight"
            };
            put(&mut grads, name, d, &[v, c])?;
        }
        if let Some(d) = d_embed {
            put(&mut grads, "model.embed_tokens.weight", d, &[v, c])?;
        }
        Ok(LossGrads { loss, grads })
    }

    /// One block forward: x (N × C) → block output, and what its backward needs.
    fn block_fwd(
        &self,
        x: Vec<f32>,
        w: &BlockW<'_>,
        lw: &[Option<LoraW<'_>>; SLOTS],
        tables: &RopeTables,
    ) -> (Vec<f32>, Saved) {
        let (n, c, t, inter) = (self.b * self.t, self.c, self.t, self.inter);
        let (qw, kvw) = (self.nh * self.hd, self.nkv * self.hd);
        let th = self.threads;
        let mut lu: [Option<Vec<f32>>; SLOTS] = Default::default();
        // The adapter of `slot`, if any, adds its update to y and keeps its u.
        let mut adapt = |slot: usize, x: &[f32], k: usize, out: usize, y: &mut [f32]| {
            if let Some(l) = &lw[slot] {
                lu[slot] = Some(lora_fwd(x, l, k, out, y, th));
            }
        };
        let h1 = rms_norm_rows(&x, w.input_norm, self.eps);
        let mut q = linear_fwd(&h1, w.q, None, c, qw, th);
        adapt(0, &h1, c, qw, &mut q);
        let mut k = linear_fwd(&h1, w.k, None, c, kvw, th);
        adapt(1, &h1, c, kvw, &mut k);
        let mut v = linear_fwd(&h1, w.v, None, c, kvw, th);
        adapt(2, &h1, c, kvw, &mut v);
        rope_inplace_f32(&mut q, t, self.nh, tables);
        rope_inplace_f32(&mut k, t, self.nkv, tables);
        let mut y = vec![0f32; n * qw];
        let p = attention_fwd(
            &self.attn(),
            heads(&q, qw),
            heads(&k, kvw),
            heads(&v, kvw),
            &mut y,
        );
        let mut x2 = linear_fwd(&y, w.o, None, qw, c, th);
        adapt(3, &y, qw, c, &mut x2);
        add_into(&mut x2, &x);
        let h2 = rms_norm_rows(&x2, w.post_norm, self.eps);
        let mut gate = linear_fwd(&h2, w.gate, None, c, inter, th);
        adapt(4, &h2, c, inter, &mut gate);
        let mut up = linear_fwd(&h2, w.up, None, c, inter, th);
        adapt(5, &h2, c, inter, &mut up);
        let act = swiglu_f32(&gate, &up);
        let mut out = linear_fwd(&act, w.down, None, inter, c, th);
        adapt(6, &act, inter, c, &mut out);
        add_into(&mut out, &x2);
        let s = Saved {
            x,
            h1,
            q,
            k,
            v,
            p,
            y,
            x2,
            h2,
            gate,
            up,
            act,
            lu,
        };
        (out, s)
    }

    /// One block backward from d(out). Returns d(input) when `need_dx`, and the weight gradients
    /// (suffix after `model.layers.{j}.`, data, shape) when `live`.
    #[allow(clippy::too_many_arguments)]
    fn block_bwd(
        &self,
        w: &BlockW<'_>,
        lw: &[Option<LoraW<'_>>; SLOTS],
        mut s: Saved,
        dout: Vec<f32>,
        (live, lora_live): (bool, bool),
        need_dx: bool,
        tables: &RopeTables,
    ) -> (Option<Vec<f32>>, BlockGrads) {
        let (n, c, t, inter) = (self.b * self.t, self.c, self.t, self.inter);
        let (qw, kvw, hd) = (self.nh * self.hd, self.nkv * self.hd, self.hd);
        let shape = self.attn();
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
        // MLP: out = x2 + down(silu(gate(h2)) ⊙ up(h2)), h2 = post_norm(x2).
        let (mut dact, r) = linear_bwd(&s.act, w.down, &dout, inter, c, live, false, th);
        push_w(&mut g, "mlp.down_proj.weight", r, c, inter);
        adapt(&mut g, 6, &s.act, &dout, inter, c, &mut dact);
        drop(s.act);
        let (dgate, dup) = swiglu_bwd_f32(&s.gate, &s.up, &dact);
        drop(dact);
        drop((s.gate, s.up));
        let mut dh2 = vec![0f32; n * c];
        let r = linear_bwd_into(
            &s.h2,
            w.gate,
            &dgate,
            c,
            inter,
            Some((&mut dh2, false)),
            live,
            false,
            th,
        );
        push_w(&mut g, "mlp.gate_proj.weight", r, inter, c);
        adapt(&mut g, 4, &s.h2, &dgate, c, inter, &mut dh2);
        let r = linear_bwd_into(
            &s.h2,
            w.up,
            &dup,
            c,
            inter,
            Some((&mut dh2, true)),
            live,
            false,
            th,
        );
        push_w(&mut g, "mlp.up_proj.weight", r, inter, c);
        adapt(&mut g, 5, &s.h2, &dup, c, inter, &mut dh2);
        drop((dgate, dup));
        let mut dx2 = dout;
        if let Some(dw) =
            rms_norm_bwd_rows(&s.x2, w.post_norm, &dh2, self.eps, &mut dx2, true, live)
        {
            g.push(("post_attention_layernorm.weight", (dw, vec![c])));
        }
        drop(dh2);
        // Attention: x2 = x + o(attn(rope(q(h1)), rope(k(h1)), v(h1))), h1 = input_norm(x).
        let (mut dy, r) = linear_bwd(&s.y, w.o, &dx2, qw, c, live, false, th);
        push_w(&mut g, "self_attn.o_proj.weight", r, c, qw);
        adapt(&mut g, 3, &s.y, &dx2, qw, c, &mut dy);
        let mut dq = vec![0f32; n * qw];
        let mut dk = vec![0f32; n * kvw];
        let mut dv = vec![0f32; n * kvw];
        {
            // One task per (window, key/value head): its query heads' dq columns, its dk, dv.
            let n_rep = self.nh / self.nkv;
            let dq_t = MatMut::dense(&mut dq, qw).grid(t, n_rep * hd);
            let dk_t = MatMut::dense(&mut dk, kvw).grid(t, hd);
            let dv_t = MatMut::dense(&mut dv, kvw).grid(t, hd);
            let tiles: Vec<AttnGradTiles<'_>> = dq_t
                .into_iter()
                .zip(dk_t)
                .zip(dv_t)
                .flat_map(|((q, k), v)| {
                    q.into_iter()
                        .zip(k)
                        .zip(v)
                        .map(|((dq, dk), dv)| AttnGradTiles { dq, dk, dv })
                })
                .collect();
            attention_bwd(
                &shape,
                heads(&s.q, qw),
                heads(&s.k, kvw),
                heads(&s.v, kvw),
                &s.p,
                heads(&dy, qw),
                tiles,
            );
        }
        drop(dy);
        // Back through the rotation: the gradient of the pre-rope q and k.
        rope_bwd_inplace_f32(&mut dq, t, self.nh, tables);
        rope_bwd_inplace_f32(&mut dk, t, self.nkv, tables);
        let mut dh1 = vec![0f32; n * c];
        let r = linear_bwd_into(
            &s.h1,
            w.q,
            &dq,
            c,
            qw,
            Some((&mut dh1, false)),
            live,
            false,
            th,
        );
        push_w(&mut g, "self_attn.q_proj.weight", r, qw, c);
        adapt(&mut g, 0, &s.h1, &dq, c, qw, &mut dh1);
        let r = linear_bwd_into(
            &s.h1,
            w.k,
            &dk,
            c,
            kvw,
            Some((&mut dh1, true)),
            live,
            false,
            th,
        );
        push_w(&mut g, "self_attn.k_proj.weight", r, kvw, c);
        adapt(&mut g, 1, &s.h1, &dk, c, kvw, &mut dh1);
        let r = linear_bwd_into(
            &s.h1,
            w.v,
            &dv,
            c,
            kvw,
            Some((&mut dh1, true)),
            live,
            false,
            th,
        );
        push_w(&mut g, "self_attn.v_proj.weight", r, kvw, c);
        adapt(&mut g, 2, &s.h1, &dv, c, kvw, &mut dh1);
        drop((dq, dk, dv));
        let mut dx = dx2;
        if let Some(dw) = rms_norm_bwd_rows(&s.x, w.input_norm, &dh1, self.eps, &mut dx, true, live)
        {
            g.push(("input_layernorm.weight", (dw, vec![c])));
        }
        (need_dx.then_some(dx), g)
    }
}

/// Heads laid out from column 0 of rows `rs` apart.
fn heads(d: &[f32], rs: usize) -> Heads<'_> {
    Heads { d, rs, off: 0 }
}
