//! Tensor ops of the GPT-2 forward pass whose backward is known to be right.
//!
//! candle's ready-made `LayerNorm`, `ops::softmax_last_dim`, fused `rms_norm` and sdpa are
//! forward-only (`apply_op*_no_bwd`): a model built on them trains with those parameters silently
//! frozen (shared/facts.md). Everything here is composed from candle primitives whose backward
//! candle implements (arithmetic, `exp`, `log`, reductions, `matmul`, `gather`), so gradients flow
//! to every input. Each op has a finite-difference check in `tests/gradients.rs`, in f64 and f32.
//!
//! Two deliberate shortcuts, both exact for the gradient:
//! - the row maximum subtracted for numerical stability is *detached*: softmax and log-sum-exp are
//!   shift-invariant, so its true gradient contribution is zero and skipping it saves a backward op;
//! - [`gelu_new`] uses candle's fused tanh-GELU kernel (the same formula as transformers'
//!   `gelu_new`), whose backward is implemented in candle with 6-digit constants (relative error
//!   below 1e-6, a few f32 ulps).

use candle_core::{DType, Device, Tensor, D};

use crate::{Error, Result};

/// Layer normalisation over the last dimension, as `torch.nn.LayerNorm`: biased variance, `eps`
/// inside the square root. `w` and `b` have the size of the last dimension of `x`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    let xhat = xc.broadcast_mul(&inv_std)?;
    Ok(xhat.broadcast_mul(w)?.broadcast_add(b)?)
}

/// GPT-2's GELU: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, exactly transformers'
/// `gelu_new` (candle's `gelu` is this tanh approximation; `gelu_erf` would be the exact one).
pub fn gelu_new(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu()?)
}

/// Softmax over the last dimension with a working backward (unlike `softmax_last_dim`).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&sum)?)
}

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
    let scores = (q.matmul(&k.t()?)? * scale)?;
    let scores = scores.broadcast_add(&causal_mask(t, q.dtype(), q.device())?)?;
    let att = softmax_last(&scores)?;
    Ok(att.matmul(&v)?)
}

fn check_ce_inputs(logits: &Tensor, targets: &Tensor, what: &str) -> Result<usize> {
    let (n, _v) = logits.dims2().map_err(|_| {
        Error::Other(format!(
            "{what}: logits must be (N, V), got {:?}",
            logits.dims()
        ))
    })?;
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        return Err(Error::Other(format!(
            "{what}: targets must be u32 of shape ({n}), got {:?} {:?}",
            targets.dtype(),
            targets.dims()
        )));
    }
    Ok(n)
}

/// Per-token negative log-likelihood (N): `logsumexp(row) - row[target]`. Written so that no
/// (N, V) log-probability tensor is materialised beyond the shifted logits and their exp.
fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?; // (N, 1)
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?; // (N, 1)
    Ok((lse - picked)?.squeeze(1)?)
}

/// Mean token NLL. logits (N,V) f32, targets (N) u32. Returns a scalar with gradient.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_ce_inputs(logits, targets, "cross_entropy")?;
    Ok(token_nll(logits, targets)?.mean_all()?)
}

/// Sum of token NLL as f64 without building a graph (evaluation). Per-token values are computed
/// in the logits' dtype and summed in f64, so long validation sets do not lose precision.
pub fn nll_sum(logits: &Tensor, targets: &Tensor) -> Result<f64> {
    let n = check_ce_inputs(logits, targets, "nll_sum")?;
    if n == 0 {
        return Ok(0.0);
    }
    let nll = token_nll(&logits.detach(), targets)?;
    Ok(nll.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}
