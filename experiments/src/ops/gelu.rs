//! GPT-2's tanh GELU (`gelu_new`) as a fused CPU op with the exact derivative.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, WithDType};

use super::simd::Real;
use super::{contiguous_slice, ELEMWISE_CHUNK};
use crate::Result;

/// GPT-2's GELU: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, exactly transformers'
/// `gelu_new` (candle's `gelu` is this tanh approximation; `gelu_erf` would be the exact one).
/// On the CPU a fused op with an exact backward; elsewhere candle's `gelu` (same forward, backward
/// with 6-digit constants).
pub fn gelu_new(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return Ok(x.contiguous()?.apply_op1(GeluOp)?);
    }
    Ok(x.gelu()?)
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044715;

/// transformers' `gelu_new`, elementwise.
struct GeluOp;

simd_kernel! {
    fn gelu_chunk<T>(os: &mut [T], xs: &[T]) {
        let (half, one, c, a) = (
            T::from_f64(0.5),
            T::from_f64(1.0),
            T::from_f64(SQRT_2_OVER_PI),
            T::from_f64(GELU_A),
        );
        for (o, &v) in os.iter_mut().zip(xs) {
            *o = half * v * (one + (c * (v + a * v * v * v)).tanh_());
        }
    }
}

pub(crate) fn gelu_map<T: Real>(x: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(x.par_chunks(ELEMWISE_CHUNK))
        .for_each(|(os, xs)| gelu_chunk(os, xs));
    out
}

simd_kernel! {
    /// g · d/dx gelu_new(x) = g · (0.5 (1 + t) + 0.5 x (1 − t²) c (1 + 3a x²)),
    /// t = tanh(c (x + a x³)).
    fn gelu_grad_chunk<T>(os: &mut [T], xs: &[T], gs: &[T]) {
        let (half, one, c, a) = (
            T::from_f64(0.5),
            T::from_f64(1.0),
            T::from_f64(SQRT_2_OVER_PI),
            T::from_f64(GELU_A),
        );
        let a3 = T::from_f64(3.0 * GELU_A);
        for ((o, &v), &g) in os.iter_mut().zip(xs).zip(gs) {
            let v2 = v * v;
            let t = (c * (v + a * v2 * v)).tanh_();
            *o = g * (half * (one + t) + half * v * (one - t * t) * c * (one + a3 * v2));
        }
    }
}

pub(crate) fn gelu_grad_map<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::from_f64(0.0); x.len()];
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(x.par_chunks(ELEMWISE_CHUNK))
        .zip(g.par_chunks(ELEMWISE_CHUNK))
        .for_each(|((os, xs), gs)| gelu_grad_chunk(os, xs, gs));
    out
}

impl CustomOp1 for GeluOp {
    fn name(&self) -> &'static str {
        "ablate-gelu-new"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(gelu_map(contiguous_slice::<f32>(s, l)?))
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(gelu_map(contiguous_slice::<f64>(s, l)?))
            }
            _ => candle_core::bail!("gelu_new: only f32 and f64 are supported on the CPU"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluGradOp)?))
    }
}

/// Backward kernel of [`GeluOp`] on (x, grad).
struct GeluGradOp;

impl CustomOp2 for GeluGradOp {
    fn name(&self) -> &'static str {
        "ablate-gelu-new-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(gelu_grad_map(
                contiguous_slice::<f32>(s1, l1)?,
                contiguous_slice::<f32>(s2, l2)?,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(gelu_grad_map(
                contiguous_slice::<f64>(s1, l1)?,
                contiguous_slice::<f64>(s2, l2)?,
            )),
            _ => candle_core::bail!("gelu_new backward: only f32 and f64 are supported on the CPU"),
        };
        Ok((out, l1.shape().clone()))
    }
}
