//! Softmax over the last dimension, plain or causal and scaled (attention's probabilities), with
//! a fused backward `scale · y ⊙ (g − Σ g⊙y)`; plus the in-place f32 kernels the manual backward
//! runs per attention head ([`causal_softmax_f32`], [`softmax_bwd_f32`]).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, WithDType, D};

use super::simd::{max_of, sum_f64, Real};
use super::{contiguous_slice, rows_per_task};
use crate::Result;

/// Softmax over the last dimension with a working backward (unlike `softmax_last_dim`).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        let op = SoftmaxOp {
            scale: 1.0,
            causal: None,
        };
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    softmax_last_portable(x)
}

/// [`softmax_last`] composed from candle primitives: runs on every device (used off the CPU).
pub fn softmax_last_portable(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

/// Row-wise softmax of `scale · x` over the last dimension (C), optionally causal: in a stack
/// of (Tq, C) matrices, row i only sees columns `0..=i + C − Tq` (the rest of the output is 0 and
/// never computed). Backward (fused too, [`SoftmaxBwdOp`]): `scale · y ⊙ (g − Σ g⊙y)`.
pub(super) struct SoftmaxOp {
    pub(super) scale: f64,
    /// `Some(Tq)`: causal over (Tq, C) matrices.
    pub(super) causal: Option<usize>,
}

/// Visible columns of global row `r` (see [`SoftmaxOp`]).
#[inline(always)]
fn visible(r: usize, c: usize, causal: Option<usize>) -> usize {
    match causal {
        Some(tq) => (r % tq + 1 + c - tq).min(c),
        None => c,
    }
}

simd_kernel! {
    /// Rows `first..` of [`softmax_rows`] (one parallel task).
    fn softmax_chunk<T>(os: &mut [T], xs: &[T], c: usize, first: usize, sc: T, causal: Option<usize>) {
        for (k, (orow, row)) in os.chunks_exact_mut(c).zip(xs.chunks_exact(c)).enumerate() {
            let n = visible(first + k, c, causal);
            let (orow, row) = (&mut orow[..n], &row[..n]);
            // scale > 0, so max(scale·x) = scale·max(x).
            let max = max_of(row);
            for (o, &v) in orow.iter_mut().zip(row) {
                *o = ((v - max) * sc).exp_();
            }
            let inv = T::from_f64(1.0 / sum_f64(orow));
            for e in orow.iter_mut() {
                *e *= inv;
            }
        }
    }
}

fn softmax_rows<T: Real>(x: &[T], c: usize, scale: f64, causal: Option<usize>) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::from_f64(0.0); x.len()];
    let rpt = rows_per_task(c);
    let sc = T::from_f64(scale);
    out.par_chunks_mut(rpt * c)
        .zip(x.par_chunks(rpt * c))
        .enumerate()
        .for_each(|(task, (os, xs))| softmax_chunk(os, xs, c, task * rpt, sc, causal));
    out
}

simd_kernel! {
    /// One parallel task of [`softmax_bwd_rows`].
    fn softmax_bwd_chunk<T>(os: &mut [T], ys: &[T], gs: &[T], c: usize, sc: T) {
        for ((orow, yrow), grow) in os
            .chunks_exact_mut(c)
            .zip(ys.chunks_exact(c))
            .zip(gs.chunks_exact(c))
        {
            for ((o, &yv), &gv) in orow.iter_mut().zip(yrow).zip(grow) {
                *o = yv * gv;
            }
            let dot = T::from_f64(sum_f64(orow));
            for ((o, &yv), &gv) in orow.iter_mut().zip(yrow).zip(grow) {
                *o = sc * yv * (gv - dot);
            }
        }
    }
}

/// `scale · y ⊙ (g − Σ g⊙y)` per row of C (the softmax backward); zero where y is zero.
fn softmax_bwd_rows<T: Real>(y: &[T], g: &[T], c: usize, scale: f64) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::from_f64(0.0); y.len()];
    let rpt = rows_per_task(c);
    let sc = T::from_f64(scale);
    out.par_chunks_mut(rpt * c)
        .zip(y.par_chunks(rpt * c))
        .zip(g.par_chunks(rpt * c))
        .for_each(|((os, ys), gs)| softmax_bwd_chunk(os, ys, gs, c, sc));
    out
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "ablate-softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let c = dims.last().copied().unwrap_or(1);
        if c == 0 || l.shape().elem_count() == 0 {
            return Ok((s.clone(), l.shape().clone()));
        }
        if let Some(tq) = self.causal {
            let rows = dims.len().checked_sub(2).map(|i| dims[i]);
            if rows != Some(tq) || tq > c {
                candle_core::bail!("causal softmax: expected (.., {tq}, >= {tq}), got {dims:?}");
            }
        }
        let out = match s {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(softmax_rows(
                contiguous_slice::<f32>(s, l)?,
                c,
                self.scale,
                self.causal,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(softmax_rows(
                contiguous_slice::<f64>(s, l)?,
                c,
                self.scale,
                self.causal,
            )),
            _ => candle_core::bail!("softmax_last: only f32 and f64 are supported on the CPU"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let op = SoftmaxBwdOp { scale: self.scale };
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// Backward kernel of [`SoftmaxOp`] on (y, grad): see [`softmax_bwd_rows`].
struct SoftmaxBwdOp {
    scale: f64,
}

impl CustomOp2 for SoftmaxBwdOp {
    fn name(&self) -> &'static str {
        "ablate-softmax-last-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = l1.dims().last().copied().unwrap_or(1).max(1);
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(softmax_bwd_rows(
                contiguous_slice::<f32>(s1, l1)?,
                contiguous_slice::<f32>(s2, l2)?,
                c,
                self.scale,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(softmax_bwd_rows(
                contiguous_slice::<f64>(s1, l1)?,
                contiguous_slice::<f64>(s2, l2)?,
                c,
                self.scale,
            )),
            _ => candle_core::bail!("softmax backward: only f32 and f64 are supported on the CPU"),
        };
        Ok((out, l1.shape().clone()))
    }
}

simd_kernel! {
    /// In place on a (T, T) score matrix: row i becomes softmax(scale · s[i, 0..=i]) followed by
    /// zeros (causal attention's probabilities, as [`SoftmaxOp`] with `causal: Some(T)`).
    fn causal_softmax_inplace<T>(s: &mut [T], t: usize, sc: T) {
        for (i, row) in s.chunks_exact_mut(t).enumerate() {
            let (vis, hidden) = row.split_at_mut(i + 1);
            let max = max_of(vis);
            for e in vis.iter_mut() {
                *e = ((*e - max) * sc).exp_();
            }
            let inv = T::from_f64(1.0 / sum_f64(vis));
            for e in vis.iter_mut() {
                *e *= inv;
            }
            for e in hidden.iter_mut() {
                *e = T::from_f64(0.0);
            }
        }
    }
}

/// f32 entry point of [`causal_softmax_inplace`].
pub(crate) fn causal_softmax_f32(s: &mut [f32], t: usize, scale: f32) {
    causal_softmax_inplace(s, t, scale)
}

simd_kernel! {
    /// In place: `g ← scale · y ⊙ (g − Σ_row g ⊙ y)` per row of `c` (the softmax backward of
    /// [`SoftmaxBwdOp`], without a separate output).
    fn softmax_bwd_inplace<T>(g: &mut [T], y: &[T], c: usize, sc: T) {
        for (grow, yrow) in g.chunks_exact_mut(c).zip(y.chunks_exact(c)) {
            let mut acc = [T::from_f64(0.0); 8];
            let mut total = 0f64;
            for (gb, yb) in grow.chunks(512).zip(yrow.chunks(512)) {
                let lanes = gb.chunks_exact(8).zip(yb.chunks_exact(8));
                for (gl, yl) in lanes {
                    for k in 0..8 {
                        acc[k] += gl[k] * yl[k];
                    }
                }
                let done = gb.len() / 8 * 8;
                for (&gv, &yv) in gb[done..].iter().zip(&yb[done..]) {
                    total += (gv * yv).to_f64();
                }
                total += acc.iter().map(|a| a.to_f64()).sum::<f64>();
                acc = [T::from_f64(0.0); 8];
            }
            let dot = T::from_f64(total);
            for (gv, &yv) in grow.iter_mut().zip(yrow) {
                *gv = sc * yv * (*gv - dot);
            }
        }
    }
}

/// f32 entry point of [`softmax_bwd_inplace`].
pub(crate) fn softmax_bwd_f32(g: &mut [f32], y: &[f32], c: usize, scale: f32) {
    softmax_bwd_inplace(g, y, c, scale)
}
