//! Rotary position embedding in Hugging Face's rotate-half layout (transformers'
//! `apply_rotary_pos_emb`): a head vector `x = [x₁ | x₂]` (halves of D/2) at position p becomes
//! `[x₁ cos − x₂ sin | x₂ cos + x₁ sin]`, with angle `p · inv_freq[i]` for the pair (i, i + D/2).
//!
//! The rotation is orthogonal, so its backward is the rotation by the opposite angle
//! (`[g₁ cos + g₂ sin | g₂ cos − g₁ sin]`): the fused op's backward is the same kernel with
//! `inverse` set. The angle tables are computed as transformers does in float32 (the angle is the
//! f32 product `p · inv_freq`), then cos and sin of it; the inverse frequencies themselves (default,
//! linear and llama3 scaling) come from the model config ([`crate::model::llama`]).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};

use super::simd::Real;
use super::{contiguous_slice, rows_per_task};
use crate::{Error, Result};

/// cos and sin of `p · inv_freq[i]` for positions `0..positions` and pairs `0..half`, row-major
/// (position, pair), in f32 (what an f32 model uses, as transformers casts them to the model's
/// dtype) and f64 (for the f64 gradient checks).
#[derive(Debug)]
pub struct RopeTables {
    half: usize,
    positions: usize,
    cos32: Vec<f32>,
    sin32: Vec<f32>,
    cos64: Vec<f64>,
    sin64: Vec<f64>,
}

impl RopeTables {
    /// Tables for `positions` positions from the inverse frequencies (one per rotated pair, so
    /// the head width is `2 · inv_freq.len()`).
    pub fn new(inv_freq: &[f32], positions: usize) -> Self {
        let half = inv_freq.len();
        let n = half * positions;
        let (mut cos64, mut sin64) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for p in 0..positions {
            for &f in inv_freq {
                // transformers: `position_ids.float() * inv_freq` in f32, then cos/sin.
                let angle = (p as f32 * f) as f64;
                cos64.push(angle.cos());
                sin64.push(angle.sin());
            }
        }
        RopeTables {
            half,
            positions,
            cos32: cos64.iter().map(|&v| v as f32).collect(),
            sin32: sin64.iter().map(|&v| v as f32).collect(),
            cos64,
            sin64,
        }
    }

    /// Head width the tables rotate (2 × pairs).
    pub fn head_dim(&self) -> usize {
        2 * self.half
    }

    /// Positions covered.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// (cos, sin) of position `p`, pair `i`, in f64.
    pub fn at(&self, p: usize, i: usize) -> (f64, f64) {
        (self.cos64[p * self.half + i], self.sin64[p * self.half + i])
    }

    fn f32(&self) -> (&[f32], &[f32]) {
        (&self.cos32, &self.sin32)
    }
}

/// The tables in the float type of a kernel.
trait Tables<T> {
    fn get(&self) -> (&[T], &[T]);
}
impl Tables<f32> for RopeTables {
    fn get(&self) -> (&[f32], &[f32]) {
        self.f32()
    }
}
impl Tables<f64> for RopeTables {
    fn get(&self) -> (&[f64], &[f64]) {
        (&self.cos64, &self.sin64)
    }
}

simd_kernel! {
    /// Rotates every D-wide row of one task in place; row `first + k` is at position
    /// `((first + k) / inner) % t_len` (`inner` = heads per position in a (B, T, H, D) layout, 1 in
    /// (B, H, T, D)). `inverse`: rotate by the opposite angle (the backward).
    fn rope_chunk<T>(
        xs: &mut [T],
        first: usize,
        t_len: usize,
        inner: usize,
        cos: &[T],
        sin: &[T],
        inverse: bool,
    ) {
        let h = cos.len() / t_len.max(1);
        let d = 2 * h;
        for (k, row) in xs.chunks_exact_mut(d).enumerate() {
            let p = ((first + k) / inner) % t_len;
            let (c, s) = (&cos[p * h..(p + 1) * h], &sin[p * h..(p + 1) * h]);
            let (x1, x2) = row.split_at_mut(h);
            if inverse {
                for i in 0..h {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] + b * s[i];
                    x2[i] = b * c[i] - a * s[i];
                }
            } else {
                for i in 0..h {
                    let (a, b) = (x1[i], x2[i]);
                    x1[i] = a * c[i] - b * s[i];
                    x2[i] = b * c[i] + a * s[i];
                }
            }
        }
    }
}

/// Rotates `x` in place: rows of `tables.head_dim()`, row r at position `(r / inner) % t_len`.
fn rope_rows<T: Real>(x: &mut [T], t_len: usize, inner: usize, tables: &RopeTables, inverse: bool)
where
    RopeTables: Tables<T>,
{
    use rayon::prelude::*;
    let d = tables.head_dim();
    if d == 0 || x.is_empty() {
        return;
    }
    assert!(
        t_len <= tables.positions,
        "rope: {t_len} positions, tables have {}",
        tables.positions
    );
    let (cos, sin) = Tables::<T>::get(tables);
    let (cos, sin) = (&cos[..t_len * tables.half], &sin[..t_len * tables.half]);
    let rpt = rows_per_task(d);
    x.par_chunks_mut(rpt * d)
        .enumerate()
        .for_each(|(task, xs)| rope_chunk(xs, task * rpt, t_len, inner, cos, sin, inverse));
}

/// The manual pass's forward: rotates q or k in place in its (B·T, H·D) projection layout (row
/// `b·T + t`, head h in columns `h·D..(h+1)·D`).
pub(crate) fn rope_inplace_f32(x: &mut [f32], t_len: usize, heads: usize, tables: &RopeTables) {
    rope_rows(x, t_len, heads, tables, false)
}

/// The manual pass's backward of [`rope_inplace_f32`]: rotates the gradient back in place.
pub(crate) fn rope_bwd_inplace_f32(g: &mut [f32], t_len: usize, heads: usize, tables: &RopeTables) {
    rope_rows(g, t_len, heads, tables, true)
}

/// Rotary embedding of `x` (B, H, T, D), position t for row t of each (batch, head). On the CPU
/// (f32, f64) a fused op whose backward is the inverse rotation; elsewhere [`rope_portable`].
pub fn rope(x: &Tensor, tables: &Arc<RopeTables>) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    if d != tables.head_dim() || t > tables.positions {
        return Err(Error::Other(format!(
            "rope: input {:?} needs head width {} and at most {} positions",
            x.dims(),
            tables.head_dim(),
            tables.positions
        )));
    }
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        let op = RopeOp {
            tables: tables.clone(),
            t,
            inverse: false,
        };
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    rope_portable(x, tables)
}

/// [`rope`] as transformers writes it, `x · cos + rotate_half(x) · sin`, from candle primitives
/// (runs on every device).
pub fn rope_portable(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    let h = d / 2;
    let dev = x.device();
    let full = |v: &[f64]| -> Result<Tensor> {
        let mut out = Vec::with_capacity(t * d);
        for p in 0..t {
            let row = &v[p * h..(p + 1) * h];
            out.extend_from_slice(row);
            out.extend_from_slice(row);
        }
        Ok(Tensor::from_vec(out, (t, d), dev)?.to_dtype(x.dtype())?)
    };
    let cos = full(&tables.cos64)?;
    let sin = full(&tables.sin64)?;
    let x1 = x.narrow(3, 0, h)?;
    let x2 = x.narrow(3, h, h)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    Ok((x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?)?)
}

/// See [`rope`]; `inverse` is its backward.
struct RopeOp {
    tables: Arc<RopeTables>,
    /// Positions per (batch, head).
    t: usize,
    inverse: bool,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "ablate-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => {
                let mut v = contiguous_slice::<f32>(s, l)?.to_vec();
                rope_rows(&mut v, self.t, 1, &self.tables, self.inverse);
                f32::to_cpu_storage_owned(v)
            }
            CpuStorage::F64(_) => {
                let mut v = contiguous_slice::<f64>(s, l)?.to_vec();
                rope_rows(&mut v, self.t, 1, &self.tables, self.inverse);
                f64::to_cpu_storage_owned(v)
            }
            _ => candle_core::bail!("rope: only f32 and f64 are supported on the CPU"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = RopeOp {
            tables: self.tables.clone(),
            t: self.t,
            inverse: !self.inverse,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}
