//! Layer normalisation (`torch.nn.LayerNorm`: biased variance, eps inside the root) as a fused CPU
//! op with an exact backward, and the portable composition used off the CPU.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType, D};

use super::reduce::col_sum_tensor;
use super::simd::Real;
use super::{contiguous_slice, rows_per_task};
use crate::Result;

/// Layer normalisation over the last dimension, as `torch.nn.LayerNorm`: biased variance, `eps`
/// inside the square root. `w` and `b` have the size of the last dimension of `x`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    let fused = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && w.dtype() == x.dtype()
        && b.dtype() == x.dtype()
        && w.dims() == [c]
        && b.dims() == [c];
    if !fused {
        return layer_norm_portable(x, w, b, eps);
    }
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })?)
}

/// [`layer_norm`] composed from candle primitives: runs on every device (used off the CPU).
pub fn layer_norm_portable(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&inv_std)?;
    Ok(xhat.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Fused layer norm over the last dimension of (x, w, b).
struct LayerNormOp {
    eps: f64,
}

/// Mean and 1/sqrt(var + eps) of one row, in f64.
fn row_stats<T: Real>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

pub(crate) fn layer_norm_rows<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    use rayon::prelude::*;
    let c = w.len();
    if c == 0 {
        return Vec::new();
    }
    let mut out = vec![T::from_f64(0.0); x.len()];
    let chunk = rows_per_task(c) * c;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(os, xs)| {
            for (orow, row) in os.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                let (mean, inv) = row_stats(row, eps);
                for i in 0..c {
                    let xhat = (row[i].to_f64() - mean) * inv;
                    orow[i] = T::from_f64(xhat * w[i].to_f64() + b[i].to_f64());
                }
            }
        });
    out
}

/// Per row: `[dx (C) | g ⊙ x̂ (C)]`, from which backward takes dx and sums dw over rows.
/// dx = inv_std · (g⊙w − mean(g⊙w) − x̂ · mean(g⊙w⊙x̂)).
pub(crate) fn layer_norm_bwd_rows<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    use rayon::prelude::*;
    let c = w.len();
    if c == 0 {
        return Vec::new();
    }
    let mut out = vec![T::from_f64(0.0); 2 * x.len()];
    let rows = rows_per_task(2 * c);
    out.par_chunks_mut(rows * 2 * c)
        .zip(x.par_chunks(rows * c))
        .zip(g.par_chunks(rows * c))
        .for_each(|((os, xs), gs)| {
            let mut xhat = vec![0f64; c];
            let mut gw = vec![0f64; c];
            for ((orow, row), grow) in os
                .chunks_exact_mut(2 * c)
                .zip(xs.chunks_exact(c))
                .zip(gs.chunks_exact(c))
            {
                let (mean, inv) = row_stats(row, eps);
                let (mut m_gw, mut m_gwx) = (0f64, 0f64);
                for i in 0..c {
                    xhat[i] = (row[i].to_f64() - mean) * inv;
                    gw[i] = grow[i].to_f64() * w[i].to_f64();
                    m_gw += gw[i];
                    m_gwx += gw[i] * xhat[i];
                }
                m_gw /= c as f64;
                m_gwx /= c as f64;
                let (dx, gx) = orow.split_at_mut(c);
                for i in 0..c {
                    dx[i] = T::from_f64(inv * (gw[i] - m_gw - xhat[i] * m_gwx));
                    gx[i] = T::from_f64(grow[i].to_f64() * xhat[i]);
                }
            }
        });
    out
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ablate-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(layer_norm_rows(
                contiguous_slice::<f32>(s1, l1)?,
                contiguous_slice::<f32>(s2, l2)?,
                contiguous_slice::<f32>(s3, l3)?,
                self.eps,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(layer_norm_rows(
                contiguous_slice::<f64>(s1, l1)?,
                contiguous_slice::<f64>(s2, l2)?,
                contiguous_slice::<f64>(s3, l3)?,
                self.eps,
            )),
            _ => candle_core::bail!("layer_norm: only f32 and f64 are supported on the CPU"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = w.dim(0)?;
        let g = g.contiguous()?;
        let both = x.apply_op3_no_bwd(w, &g, &LayerNormBwdOp { eps: self.eps })?; // (.., 2C)
        let last = both.rank() - 1;
        let dx = if x.track_op() {
            Some(both.narrow(last, 0, c)?.contiguous()?)
        } else {
            None
        };
        let dw = if w.track_op() {
            // The g ⊙ x̂ half of each (2C) row, summed over rows.
            Some(col_sum_tensor(&both, c, c)?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(col_sum_tensor(&g, 0, c)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Backward kernel of [`LayerNormOp`] on (x, w, grad): see [`layer_norm_bwd_rows`].
struct LayerNormBwdOp {
    eps: f64,
}

impl CustomOp3 for LayerNormBwdOp {
    fn name(&self) -> &'static str {
        "ablate-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(layer_norm_bwd_rows(
                contiguous_slice::<f32>(s1, l1)?,
                contiguous_slice::<f32>(s2, l2)?,
                contiguous_slice::<f32>(s3, l3)?,
                self.eps,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(layer_norm_bwd_rows(
                contiguous_slice::<f64>(s1, l1)?,
                contiguous_slice::<f64>(s2, l2)?,
                contiguous_slice::<f64>(s3, l3)?,
                self.eps,
            )),
            _ => {
                candle_core::bail!("layer_norm backward: only f32 and f64 are supported on the CPU")
            }
        };
        let mut dims = l1.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last *= 2;
        }
        Ok((out, Shape::from(dims)))
    }
}
