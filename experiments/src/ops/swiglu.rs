//! The gate of Llama's MLP: `silu(gate) ⊙ up` (transformers' `act_fn(gate_proj(x)) * up_proj(x)`
//! with `hidden_act = "silu"`), `silu(z) = z · σ(z)`. A fused CPU op with the exact backward
//! `d gate = g ⊙ up ⊙ σ(z)(1 + z(1 − σ(z)))`, `d up = g ⊙ silu(z)`, and the portable
//! composition used off the CPU.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use super::simd::Real;
use super::{contiguous_slice, ELEMWISE_CHUNK};
use crate::{Error, Result};

/// `silu(gate) ⊙ up` for two tensors of one shape. On the CPU (f32, f64) one fused op;
/// elsewhere [`swiglu_portable`].
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(Error::Other(format!(
            "swiglu: gate {:?} and up {:?} differ in shape",
            gate.dims(),
            up.dims()
        )));
    }
    let fused = gate.device().is_cpu()
        && matches!(gate.dtype(), DType::F32 | DType::F64)
        && up.dtype() == gate.dtype();
    if !fused {
        return swiglu_portable(gate, up);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwigluOp)?)
}

/// [`swiglu`] from candle primitives: runs on every device (used off the CPU).
pub fn swiglu_portable(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let sig = (gate.neg()?.exp()? + 1.0)?.recip()?;
    Ok(((gate * sig)? * up)?)
}

/// σ(z) = 1 / (1 + e^{−z}) (0 for z below about −88, 1 above about 17, as in f32 arithmetic).
#[inline(always)]
fn sigmoid<T: Real>(z: T) -> T {
    let one = T::from_f64(1.0);
    one / (one + (T::from_f64(0.0) - z).exp_())
}

simd_kernel! {
    fn swiglu_chunk<T>(os: &mut [T], gs: &[T], us: &[T]) {
        for ((o, &z), &u) in os.iter_mut().zip(gs).zip(us) {
            *o = z * sigmoid(z) * u;
        }
    }
}

simd_kernel! {
    /// `(d gate, d up)` of one task from the incoming gradient `gr`.
    fn swiglu_bwd_chunk<T>(dg: &mut [T], du: &mut [T], gs: &[T], us: &[T], gr: &[T]) {
        let one = T::from_f64(1.0);
        for ((((a, b), &z), &u), &g) in dg.iter_mut().zip(du.iter_mut()).zip(gs).zip(us).zip(gr) {
            let s = sigmoid(z);
            let silu = z * s;
            *a = g * u * (s * (one + z * (one - s)));
            *b = g * silu;
        }
    }
}

fn swiglu_map<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::from_f64(0.0); g.len()];
    out.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(g.par_chunks(ELEMWISE_CHUNK))
        .zip(u.par_chunks(ELEMWISE_CHUNK))
        .for_each(|((os, gs), us)| swiglu_chunk(os, gs, us));
    out
}

fn swiglu_bwd_map<T: Real>(g: &[T], u: &[T], grad: &[T]) -> (Vec<T>, Vec<T>) {
    use rayon::prelude::*;
    let zero = T::from_f64(0.0);
    let (mut dg, mut du) = (vec![zero; g.len()], vec![zero; g.len()]);
    dg.par_chunks_mut(ELEMWISE_CHUNK)
        .zip(du.par_chunks_mut(ELEMWISE_CHUNK))
        .zip(g.par_chunks(ELEMWISE_CHUNK))
        .zip(u.par_chunks(ELEMWISE_CHUNK))
        .zip(grad.par_chunks(ELEMWISE_CHUNK))
        .for_each(|((((a, b), gs), us), gr)| swiglu_bwd_chunk(a, b, gs, us, gr));
    (dg, du)
}

/// The manual pass's forward, f32.
pub(crate) fn swiglu_f32(gate: &[f32], up: &[f32]) -> Vec<f32> {
    swiglu_map(gate, up)
}

/// The manual pass's backward, f32: `(d gate, d up)`.
pub(crate) fn swiglu_bwd_f32(gate: &[f32], up: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    swiglu_bwd_map(gate, up, grad)
}

/// See [`swiglu`].
struct SwigluOp;

impl CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        "ablate-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(swiglu_map(
                contiguous_slice::<f32>(s1, l1)?,
                contiguous_slice::<f32>(s2, l2)?,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(swiglu_map(
                contiguous_slice::<f64>(s1, l1)?,
                contiguous_slice::<f64>(s2, l2)?,
            )),
            _ => candle_core::bail!("swiglu: only f32 and f64 are supported on the CPU"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if !gate.track_op() && !up.track_op() {
            return Ok((None, None));
        }
        // One kernel writes both gradients, stacked as (2, ..shape).
        let both = gate.apply_op3_no_bwd(up, &g.contiguous()?, &SwigluBwdOp)?;
        let dg = gate.track_op().then(|| both.get(0)).transpose()?;
        let du = up.track_op().then(|| both.get(1)).transpose()?;
        Ok((dg, du))
    }
}

/// Backward kernel of [`SwigluOp`] on (gate, up, grad) → (2, ..shape): `[d gate, d up]`.
struct SwigluBwdOp;

impl CustomOp3 for SwigluBwdOp {
    fn name(&self) -> &'static str {
        "ablate-swiglu-bwd"
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
        fn stacked<T: Real>((mut a, b): (Vec<T>, Vec<T>)) -> Vec<T> {
            a.extend_from_slice(&b);
            a
        }
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(stacked(swiglu_bwd_map(
                contiguous_slice::<f32>(s1, l1)?,
                contiguous_slice::<f32>(s2, l2)?,
                contiguous_slice::<f32>(s3, l3)?,
            ))),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(stacked(swiglu_bwd_map(
                contiguous_slice::<f64>(s1, l1)?,
                contiguous_slice::<f64>(s2, l2)?,
                contiguous_slice::<f64>(s3, l3)?,
            ))),
            _ => candle_core::bail!("swiglu backward: only f32 and f64 are supported on the CPU"),
        };
        let mut dims = vec![2];
        dims.extend_from_slice(l1.dims());
        Ok((out, Shape::from(dims)))
    }
}
