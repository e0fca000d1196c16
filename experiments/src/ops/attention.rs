//! Causal scaled dot-product attention from candle's matmuls and the fused causal softmax
//! ([`super::softmax`]); grouped-query attention repeats the key/value heads first
//! ([`repeat_kv`]).

use candle_core::{DType, Device, Tensor};

use super::fused_cpu;
use super::softmax::{softmax_last_portable, SoftmaxOp};
use crate::{Error, Result};

/// Additive causal mask (T, T): 0 on and below the diagonal, -inf above. Every row keeps its
/// diagonal, so no softmax row is all -inf (which would give NaN).
fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; t * t];
    for i in 0..t {
        for j in (i + 1)..t {
            m[i * t + j] = f32::NEG_INFINITY;
        }
    }
    Ok(Tensor::from_vec(m, (t, t), device)?.to_dtype(dtype)?)
}

/// Causal scaled dot-product attention. `q`, `k`, `v`: (B, H, T, D) → (B, H, T, D).
/// Scores are scaled by 1/sqrt(D) (GPT-2's `scale_attn_weights`); no dropout.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (_, _, t, d) = q.dims4()?;
    if k.dims() != q.dims() || v.dims() != q.dims() {
        return Err(Error::Other(format!(
            "causal_attention: q {:?}, k {:?}, v {:?} must have the same (B, H, T, D) shape",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    // candle's batched matmul needs mergeable batch strides: make inputs contiguous (no-op when
    // they already are, which is the case in the model).
    let q = q.contiguous()?;
    let k = k.contiguous()?;
    let v = v.contiguous()?;
    let scale = 1.0 / (d as f64).sqrt();
    let scores = q.matmul(&k.t()?)?;
    let att = if fused_cpu(&scores) {
        // One op for scale, mask and softmax, forward and backward; masked entries are never
        // computed.
        scores.apply_op1(SoftmaxOp {
            scale,
            causal: Some(t),
        })?
    } else {
        let scores = (scores * scale)?.broadcast_add(&causal_mask(t, q.dtype(), q.device())?)?;
        softmax_last_portable(&scores)?
    };
    Ok(att.matmul(&v)?)
}

/// Grouped-query attention's key/value heads repeated for the query heads they serve, as
/// transformers' `repeat_kv`: (B, Hkv, T, D) → (B, Hkv·n_rep, T, D), key/value head j serving
/// query heads `j·n_rep .. (j+1)·n_rep`. A broadcast and one copy; candle's backward of the
/// broadcast sums the copies' gradients.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep <= 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, h, n_rep, t, d))?
        .contiguous()?
        .reshape((b, h * n_rep, t, d))?)
}
