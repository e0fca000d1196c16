//! RMS normalisation over the last dimension, as transformers' `LlamaRMSNorm`:
//! `w ⊙ x / sqrt(mean(x²) + eps)`, no mean subtracted and no bias. A fused CPU op with an exact
//! backward, and the portable composition used off the CPU.
//!
//! With `r = 1/sqrt(mean(x²) + eps)` and `x̂ = x·r`, the gradient of `y = w ⊙ x̂` is
//! `dx = r · (g⊙w − x̂ · mean(g⊙w⊙x̂))` and `dw = Σ_rows g⊙x̂`.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType, D};

use super::simd::{dot_f64, Real};
use super::{contiguous_slice, rows_per_task};
use crate::Result;

/// RMS norm of `x` over its last dimension with gain `w` (the size of that dimension). On the CPU
/// (f32, f64) one fused op; elsewhere [`rms_norm_portable`].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    let fused = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && w.dtype() == x.dtype()
        && w.dims() == [c];
    if !fused {
        return rms_norm_portable(x, w, eps);
    }
    Ok(x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNormOp { eps })?)
}

/// [`rms_norm`] composed from candle primitives: runs on every device (used off the CPU).
pub fn rms_norm_portable(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let r = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&r)?.broadcast_mul(w)?)
}

/// `1/sqrt(mean(x²) + eps)` of one row (sum of squares accumulated in f64).
#[inline(always)]
fn inv_rms<T: Real>(row: &[T], eps: f64) -> f64 {
    1.0 / (dot_f64(row, row) / row.len() as f64 + eps).sqrt()
}

simd_kernel! {
    /// Rows of one task: `o = w ⊙ (x · r)` (in this order, as transformers computes it).
    fn rms_fwd_chunk<T>(os: &mut [T], xs: &[T], w: &[T], eps: f64) {
        let c = w.len();
        for (orow, row) in os.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
            let r = T::from_f64(inv_rms(row, eps));
            for ((o, &x), &wi) in orow.iter_mut().zip(row).zip(w) {
                *o = wi * (x * r);
            }
        }
    }
}

/// Forward over rows of `w.len()` elements.
pub(crate) fn rms_norm_rows<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    use rayon::prelude::*;
    let c = w.len();
    if c == 0 {
        return Vec::new();
    }
    let mut out = vec![T::from_f64(0.0); x.len()];
    let chunk = rows_per_task(c) * c;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(os, xs)| rms_fwd_chunk(os, xs, w, eps));
    out
}

simd_kernel! {
    /// Rows of one task of [`rms_norm_bwd_rows`]: dx written (or added, with `add`) into `dxs`,
    /// `Σ g⊙x̂` of these rows added into `dw` when it is not empty.
    fn rms_bwd_chunk<T>(
        dxs: &mut [T],
        xs: &[T],
        gs: &[T],
        w: &[T],
        eps: f64,
        add: bool,
        dw: &mut [T],
    ) {
        let c = w.len();
        let mut scratch = vec![T::from_f64(0.0); c]; // g ⊙ w of one row
        for ((drow, row), grow) in dxs
            .chunks_exact_mut(c)
            .zip(xs.chunks_exact(c))
            .zip(gs.chunks_exact(c))
        {
            let rf = inv_rms(row, eps);
            let r = T::from_f64(rf);
            for ((s, &g), &wi) in scratch.iter_mut().zip(grow).zip(w) {
                *s = g * wi;
            }
            // mean(g⊙w⊙x̂) = r · mean(g⊙w⊙x)
            let m = T::from_f64(rf * dot_f64(&scratch, row) / c as f64);
            if add {
                for ((d, &s), &x) in drow.iter_mut().zip(scratch.iter()).zip(row) {
                    *d += r * (s - x * r * m);
                }
            } else {
                for ((d, &s), &x) in drow.iter_mut().zip(scratch.iter()).zip(row) {
                    *d = r * (s - x * r * m);
                }
            }
            if !dw.is_empty() {
                for ((a, &g), &x) in dw.iter_mut().zip(grow).zip(row) {
                    *a += g * (x * r);
                }
            }
        }
    }
}

/// Backward over rows of `w.len()` elements: writes dx into `dx` (or adds it, with `add`), and
/// returns dw when `want_w`. Rows are split into tasks whose dw partial sums are added in task
/// order, so the result does not depend on scheduling.
pub(crate) fn rms_norm_bwd_rows<T: Real>(
    x: &[T],
    w: &[T],
    g: &[T],
    eps: f64,
    dx: &mut [T],
    add: bool,
    want_w: bool,
) -> Option<Vec<T>> {
    use rayon::prelude::*;
    let c = w.len();
    assert!(
        x.len() == g.len() && x.len() == dx.len(),
        "rms_norm backward: x, g and dx differ in length"
    );
    if c == 0 {
        return want_w.then(Vec::new);
    }
    let rows = x.len() / c;
    let rpt = rows_per_task(c).max(rows.div_ceil(64)).max(1);
    let zero = T::from_f64(0.0);
    let parts: Vec<Vec<T>> = dx
        .par_chunks_mut(rpt * c)
        .zip(x.par_chunks(rpt * c))
        .zip(g.par_chunks(rpt * c))
        .map(|((ds, xs), gs)| {
            let mut dw = if want_w { vec![zero; c] } else { Vec::new() };
            rms_bwd_chunk(ds, xs, gs, w, eps, add, &mut dw);
            dw
        })
        .collect();
    want_w.then(|| {
        let mut out = vec![zero; c];
        for p in parts {
            for (o, v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
        out
    })
}

/// Fused RMS norm over the last dimension of (x, w).
struct RmsNormOp {
    eps: f64,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "ablate-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(rms_norm_rows(
                contiguous_slice::<f32>(s1, l1)?,
                contiguous_slice::<f32>(s2, l2)?,
                self.eps,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(rms_norm_rows(
                contiguous_slice::<f64>(s1, l1)?,
                contiguous_slice::<f64>(s2, l2)?,
                self.eps,
            )),
            _ => candle_core::bail!("rms_norm: only f32 and f64 are supported on the CPU"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_x, want_w) = (x.track_op(), w.track_op());
        if !want_x && !want_w {
            return Ok((None, None));
        }
        let g = g.contiguous()?;
        let c = w.dim(0)?;
        let (xs, ls) = x.storage_and_layout();
        let (ws, lw) = w.storage_and_layout();
        let (gs, lg) = g.storage_and_layout();
        let (dx, dw) = match (&*xs, &*ws, &*gs) {
            (
                candle_core::Storage::Cpu(xs @ CpuStorage::F32(_)),
                candle_core::Storage::Cpu(ws),
                candle_core::Storage::Cpu(gs),
            ) => {
                let xv = contiguous_slice::<f32>(xs, ls)?;
                let mut dx = vec![0f32; xv.len()];
                let dw = rms_norm_bwd_rows(
                    xv,
                    contiguous_slice::<f32>(ws, lw)?,
                    contiguous_slice::<f32>(gs, lg)?,
                    self.eps,
                    &mut dx,
                    false,
                    want_w,
                );
                (
                    Tensor::from_vec(dx, x.shape(), x.device())?,
                    dw.map(|d| Tensor::from_vec(d, c, w.device())).transpose()?,
                )
            }
            (
                candle_core::Storage::Cpu(xs @ CpuStorage::F64(_)),
                candle_core::Storage::Cpu(ws),
                candle_core::Storage::Cpu(gs),
            ) => {
                let xv = contiguous_slice::<f64>(xs, ls)?;
                let mut dx = vec![0f64; xv.len()];
                let dw = rms_norm_bwd_rows(
                    xv,
                    contiguous_slice::<f64>(ws, lw)?,
                    contiguous_slice::<f64>(gs, lg)?,
                    self.eps,
                    &mut dx,
                    false,
                    want_w,
                );
                (
                    Tensor::from_vec(dx, x.shape(), x.device())?,
                    dw.map(|d| Tensor::from_vec(d, c, w.device())).transpose()?,
                )
            }
            _ => candle_core::bail!("rms_norm backward: only f32 and f64 CPU tensors"),
        };
        Ok((want_x.then_some(dx), dw))
    }
}
