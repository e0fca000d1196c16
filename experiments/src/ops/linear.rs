//! Linear layers `x · wᵀ + b` with weights in candle's `[out, in]` layout, as one CPU op whose
//! backward writes each gradient once in the layout it is stored in.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::reduce::col_sum_tensor;
use super::simd::Real;
use super::{contiguous_slice, fused_cpu, rows_per_task};
use crate::{Error, Result};

/// `x · wᵀ + b` for x (N, K), w (Out, K) (candle's `[out, in]` layout), b (Out); with `b` None,
/// `x · wᵀ` (the tied LM head). On the CPU one op whose backward writes each gradient once in the
/// layout it is stored in: `dx = g · w`, `dw = gᵀ · x` (already `[out, in]`, so no transposed
/// copy), `db = Σ_rows g`, each only for inputs that need it. The composition of candle primitives
/// (transpose, matmul, broadcast, add) costs two extra (N, Out)-sized zero-fills and adds in
/// backward plus a strided copy of the weight gradient. Elsewhere: the same composition.
pub fn linear_nt(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (_n, k) = x.dims2()?;
    let (out, k2) = w.dims2()?;
    if k != k2 || b.is_some_and(|b| b.dims() != [out]) {
        return Err(Error::Other(format!(
            "linear: x {:?}, w {:?}, b {:?} do not fit (N, K) · (Out, K)ᵀ + (Out)",
            x.dims(),
            w.dims(),
            b.map(|b| b.dims().to_vec())
        )));
    }
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
    if fused_cpu(x) && same(w) && b.is_none_or(same) {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        return Ok(match b {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, LinearOp)?,
            None => x.apply_op2(&w, MatmulNtOp)?,
        });
    }
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// `x · wᵀ` on CPU storage (contiguous (N, K) and (Out, K)).
fn cpu_matmul_nt(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let (n, k) = l1.shape().dims2()?;
    let (out, _) = l2.shape().dims2()?;
    let wt = l2.transpose(0, 1)?;
    let y = s1.matmul(s2, (1, n, out, k), l1, &wt)?;
    Ok((y, Shape::from((n, out))))
}

/// Gradients of `x · wᵀ` for the inputs that track them.
fn matmul_nt_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
    let dx = if x.track_op() {
        Some(g.matmul(w)?)
    } else {
        None
    };
    let dw = if w.track_op() {
        Some(g.t()?.matmul(x)?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// See [`linear_nt`] (no bias).
struct MatmulNtOp;

impl CustomOp2 for MatmulNtOp {
    fn name(&self) -> &'static str {
        "ablate-matmul-nt"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_matmul_nt(s1, l1, s2, l2)
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        matmul_nt_bwd(x, w, &g.contiguous()?)
    }
}

/// See [`linear_nt`] (with bias).
struct LinearOp;

fn add_bias<T: Real>(y: &mut [T], b: &[T]) {
    use rayon::prelude::*;
    let c = b.len().max(1);
    y.par_chunks_mut(rows_per_task(c) * c).for_each(|ys| {
        for row in ys.chunks_exact_mut(c) {
            for (v, &bi) in row.iter_mut().zip(b) {
                *v += bi;
            }
        }
    });
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "ablate-linear"
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
        let (mut y, shape) = cpu_matmul_nt(s1, l1, s2, l2)?;
        match &mut y {
            CpuStorage::F32(v) => add_bias(v, contiguous_slice::<f32>(s3, l3)?),
            CpuStorage::F64(v) => add_bias(v, contiguous_slice::<f64>(s3, l3)?),
            _ => candle_core::bail!("linear: only f32 and f64 are supported on the CPU"),
        }
        Ok((y, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let (dx, dw) = matmul_nt_bwd(x, w, &g)?;
        let db = if b.track_op() {
            Some(col_sum_tensor(&g, 0, w.dim(0)?)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}
