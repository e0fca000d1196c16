//! Column sums (bias, norm-weight and GEMM-free gradient reductions), parallel over row blocks
//! with a result that does not depend on scheduling; shared by the ops and the manual backward.

use candle_core::{CpuStorage, Tensor, D};

use super::simd::Real;
use super::{contiguous_slice, rows_per_task};

simd_kernel! {
    /// `acc[j] += Σ_rows xs[row · stride + offset + j]` over the rows of one task.
    fn col_sum_chunk<T>(acc: &mut [T], xs: &[T], stride: usize, offset: usize) {
        let c = acc.len();
        for row in xs.chunks(stride) {
            for (a, &v) in acc.iter_mut().zip(&row[offset..offset + c]) {
                *a += v;
            }
        }
    }
}

/// Column sums of the `c` columns starting at `offset` of a row-major matrix with rows of
/// `stride` elements (a bias or layer-norm gradient: Σ over rows). Rows are split into tasks whose
/// partial sums are added in task order, so the result does not depend on scheduling. candle's
/// `sum(0)` walks the columns one at a time on one thread (a tenth of a tiny step's backward).
pub(crate) fn col_sum<T: Real>(x: &[T], stride: usize, offset: usize, c: usize) -> Vec<T> {
    use rayon::prelude::*;
    let stride = stride.max(1);
    let rows = x.len() / stride;
    let rpt = rows_per_task(stride).max(rows.div_ceil(64)).max(1);
    let parts: Vec<Vec<T>> = x[..rows * stride]
        .par_chunks(rpt * stride)
        .map(|xs| {
            let mut acc = vec![T::from_f64(0.0); c];
            col_sum_chunk(&mut acc, xs, stride, offset);
            acc
        })
        .collect();
    let mut out = vec![T::from_f64(0.0); c];
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// [`col_sum`] of a contiguous CPU tensor whose last dimension is the row (`stride` elements).
pub(crate) fn col_sum_tensor(t: &Tensor, offset: usize, c: usize) -> candle_core::Result<Tensor> {
    let t = t.contiguous()?;
    let stride = t.dim(D::Minus1)?;
    let (st, l) = t.storage_and_layout();
    let out = match &*st {
        candle_core::Storage::Cpu(s @ CpuStorage::F32(_)) => Tensor::from_vec(
            col_sum(contiguous_slice::<f32>(s, l)?, stride, offset, c),
            c,
            t.device(),
        )?,
        candle_core::Storage::Cpu(s @ CpuStorage::F64(_)) => Tensor::from_vec(
            col_sum(contiguous_slice::<f64>(s, l)?, stride, offset, c),
            c,
            t.device(),
        )?,
        _ => {
            drop(st);
            let rows = t.elem_count() / stride.max(1);
            return t.reshape((rows, stride))?.narrow(1, offset, c)?.sum(0);
        }
    };
    Ok(out)
}
