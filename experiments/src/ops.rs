//! Tensor ops of the GPT-2 forward pass whose backward is known to be right.
//!
//! candle's ready-made `LayerNorm`, `ops::softmax_last_dim`, fused `rms_norm` and sdpa are
//! forward-only (`apply_op*_no_bwd`): a model built on them trains with those parameters silently
//! frozen (shared/facts.md). Everything here is composed from candle primitives whose backward
//! candle implements (arithmetic, `exp`, `log`, reductions, `matmul`, `gather`), so gradients flow
//! to every input. Each op has a finite-difference check in `tests/gradients.rs`, in f64 and f32.
//!
//! On the CPU, [`layer_norm`], [`softmax_last`] and [`gelu_new`] run as fused custom ops with hand-written
//! backward passes (one kernel instead of 5–10 primitive ops, each of which costs an allocation
//! and a thread-pool barrier: on small models that overhead, not arithmetic, dominated a step). On
//! other devices they fall back to the portable compositions [`layer_norm_portable`] and
//! [`softmax_last_portable`]; the gradient tests check both.
//!
//! Two deliberate shortcuts, both exact for the gradient:
//! - the row maximum subtracted for numerical stability is *detached*: softmax and log-sum-exp are
//!   shift-invariant, so its true gradient contribution is zero and skipping it saves a backward op;
//! - off the CPU, [`gelu_new`] uses candle's tanh-GELU (the same formula as transformers'
//!   `gelu_new`), whose backward candle implements with 6-digit constants (relative error below
//!   1e-6, a few f32 ulps); the CPU op has the exact derivative.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, WithDType, D,
};

use crate::{Error, Result};

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

/// Softmax over the last dimension with a working backward (unlike `softmax_last_dim`).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return Ok(x.contiguous()?.apply_op1(SoftmaxOp)?);
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

/// Per-token negative log-likelihood (N): `logsumexp(row) - row[target]`. On the CPU (f32, f64)
/// one fused op whose backward writes `softmax - onehot` in a single pass; elsewhere
/// [`token_nll_portable`].
fn token_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if logits.device().is_cpu() && matches!(logits.dtype(), DType::F32 | DType::F64) {
        return Ok(logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, CrossEntropyOp::default())?);
    }
    token_nll_portable(logits, targets)
}

/// [`token_nll`] composed from candle primitives, written so that no (N, V) log-probability
/// tensor is materialised beyond the shifted logits and their exp. Runs on every device.
fn token_nll_portable(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
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

/// [`cross_entropy`] from candle primitives only (what other devices run); kept public so the
/// gradient tests can hold the fused CPU op against it.
pub fn cross_entropy_portable(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    check_ce_inputs(logits, targets, "cross_entropy")?;
    Ok(token_nll_portable(logits, targets)?.mean_all()?)
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

// ---- fused CPU kernels ----------------------------------------------------------------------

/// Float types the fused kernels run on (f32, f64); statistics are accumulated in f64.
trait Real: WithDType {
    fn exp_(self) -> Self;
    fn tanh_(self) -> Self;
}
impl Real for f32 {
    fn exp_(self) -> Self {
        self.exp()
    }
    fn tanh_(self) -> Self {
        self.tanh()
    }
}
impl Real for f64 {
    fn exp_(self) -> Self {
        self.exp()
    }
    fn tanh_(self) -> Self {
        self.tanh()
    }
}

fn contiguous_slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused op expects a contiguous input"),
    }
}

/// Row-wise softmax over the last dimension; backward `y ⊙ (g − Σ g⊙y)` in tensor ops.
struct SoftmaxOp;

fn softmax_rows<T: Real>(x: &[T], c: usize) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::from_f64(0.0); x.len()];
    let chunk = rows_per_task(c) * c;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(os, xs)| {
            for (orow, row) in os.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                let max = row
                    .iter()
                    .copied()
                    .fold(row[0], |m, v| if v > m { v } else { m });
                let mut sum = 0f64;
                for (o, &v) in orow.iter_mut().zip(row) {
                    let e = (v - max).exp_();
                    sum += e.to_f64();
                    *o = e;
                }
                let inv = T::from_f64(1.0 / sum);
                for e in orow.iter_mut() {
                    *e *= inv;
                }
            }
        });
    out
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "ablate-softmax-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = l.dims().last().copied().unwrap_or(1).max(1);
        let out = match s {
            CpuStorage::F32(_) => {
                f32::to_cpu_storage_owned(softmax_rows(contiguous_slice::<f32>(s, l)?, c))
            }
            CpuStorage::F64(_) => {
                f64::to_cpu_storage_owned(softmax_rows(contiguous_slice::<f64>(s, l)?, c))
            }
            _ => candle_core::bail!("softmax_last: only f32 and f64 are supported on the CPU"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let gy_sum = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((g.broadcast_sub(&gy_sum)? * y)?))
    }
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

fn layer_norm_rows<T: Real>(x: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
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
fn layer_norm_bwd_rows<T: Real>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
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
        let rows = x.elem_count() / c.max(1);
        let g = g.contiguous()?;
        let both = x.apply_op3_no_bwd(w, &g, &LayerNormBwdOp { eps: self.eps })?; // (.., 2C)
        let last = both.rank() - 1;
        let dx = if x.track_op() {
            Some(both.narrow(last, 0, c)?.contiguous()?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(both.narrow(last, c, c)?.reshape((rows, c))?.sum(0)?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(g.reshape((rows, c))?.sum(0)?)
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

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044715;

/// transformers' `gelu_new`, elementwise.
struct GeluOp;

fn gelu_map<T: Real>(x: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    let (half, one, c, a) = (
        T::from_f64(0.5),
        T::from_f64(1.0),
        T::from_f64(SQRT_2_OVER_PI),
        T::from_f64(GELU_A),
    );
    x.par_iter()
        .with_min_len(1 << 14)
        .map(|&v| half * v * (one + (c * (v + a * v * v * v)).tanh_()))
        .collect()
}

/// g · d/dx gelu_new(x) = g · (0.5 (1 + t) + 0.5 x (1 − t²) c (1 + 3a x²)), t = tanh(c (x + a x³)).
fn gelu_grad_map<T: Real>(x: &[T], g: &[T]) -> Vec<T> {
    use rayon::prelude::*;
    let (half, one, c, a) = (
        T::from_f64(0.5),
        T::from_f64(1.0),
        T::from_f64(SQRT_2_OVER_PI),
        T::from_f64(GELU_A),
    );
    let a3 = T::from_f64(3.0 * GELU_A);
    x.par_iter()
        .zip(g.par_iter())
        .with_min_len(1 << 14)
        .map(|(&v, &g)| {
            let v2 = v * v;
            let t = (c * (v + a * v2 * v)).tanh_();
            g * (half * (one + t) + half * v * (one - t * t) * c * (one + a3 * v2))
        })
        .collect()
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

/// Rows per parallel task: enough work per task (~32k elements) that rayon's overhead vanishes.
fn rows_per_task(c: usize) -> usize {
    (32_768 / c.max(1)).max(1)
}

/// Fused per-token cross-entropy on (logits (N, V), targets (N) u32) → (N). The forward keeps
/// each row's log-sum-exp for the backward, which is then one pass:
/// `d logits = (exp(x − lse) − onehot(target)) · g[row]`.
#[derive(Default)]
struct CrossEntropyOp {
    lse: std::sync::Mutex<Vec<f64>>,
}

/// Online log-sum-exp of one row (one pass: running maximum and rescaled sum), in f64.
fn row_lse<T: Real>(row: &[T]) -> f64 {
    let (mut m, mut s) = (f64::NEG_INFINITY, 0f64);
    for &v in row {
        let v = v.to_f64();
        if v > m {
            s = s * (m - v).exp() + 1.0;
            m = v;
        } else {
            s += (v - m).exp();
        }
    }
    m + s.ln()
}

fn ce_fwd<T: Real>(x: &[T], tg: &[u32], v: usize) -> candle_core::Result<(Vec<T>, Vec<f64>)> {
    use rayon::prelude::*;
    let n = tg.len();
    if let Some(&bad) = tg.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross_entropy: target {bad} is outside the vocabulary of {v}");
    }
    let mut lse = vec![0f64; n];
    let mut out = vec![T::from_f64(0.0); n];
    let rpt = rows_per_task(v);
    x.par_chunks(rpt * v)
        .zip(lse.par_chunks_mut(rpt))
        .zip(out.par_chunks_mut(rpt))
        .zip(tg.par_chunks(rpt))
        .for_each(|(((xs, ls), os), ts)| {
            for (((row, l), o), &t) in xs.chunks_exact(v).zip(ls).zip(os).zip(ts) {
                *l = row_lse(row);
                *o = T::from_f64(*l - row[t as usize].to_f64());
            }
        });
    Ok((out, lse))
}

fn ce_bwd<T: Real>(x: &[T], tg: &[u32], lse: &[f64], g: &[T], v: usize) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = vec![T::from_f64(0.0); x.len()];
    let rpt = rows_per_task(v);
    out.par_chunks_mut(rpt * v)
        .zip(x.par_chunks(rpt * v))
        .zip(lse.par_chunks(rpt))
        .zip(g.par_chunks(rpt))
        .zip(tg.par_chunks(rpt))
        .for_each(|((((os, xs), ls), gs), ts)| {
            for ((((orow, row), &l), &gr), &t) in os
                .chunks_exact_mut(v)
                .zip(xs.chunks_exact(v))
                .zip(ls)
                .zip(gs)
                .zip(ts)
            {
                let gr = gr.to_f64();
                // exp in the input type: f32 rows stay f32 (the hot loop), f64 rows stay exact.
                let shift = T::from_f64(l);
                let gt = T::from_f64(gr);
                for (o, &xv) in orow.iter_mut().zip(row) {
                    *o = (xv - shift).exp_() * gt;
                }
                orow[t as usize] -= gt;
            }
        });
    out
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "ablate-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        if v == 0 {
            candle_core::bail!("cross_entropy: the vocabulary is empty");
        }
        let tg = contiguous_slice::<u32>(s2, l2)?;
        if tg.len() != n {
            candle_core::bail!("cross_entropy: {} targets for {n} rows", tg.len());
        }
        let (out, lse) = match s1 {
            CpuStorage::F32(_) => {
                let (o, l) = ce_fwd(contiguous_slice::<f32>(s1, l1)?, tg, v)?;
                (f32::to_cpu_storage_owned(o), l)
            }
            CpuStorage::F64(_) => {
                let (o, l) = ce_fwd(contiguous_slice::<f64>(s1, l1)?, tg, v)?;
                (f64::to_cpu_storage_owned(o), l)
            }
            _ => candle_core::bail!("cross_entropy: only f32 and f64 are supported on the CPU"),
        };
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let op = CrossEntropyBwdOp { lse };
        let dx = x.apply_op3_no_bwd(targets, &g.contiguous()?, &op)?;
        Ok((Some(dx), None))
    }
}

/// Backward kernel of [`CrossEntropyOp`] on (logits, targets, grad of the per-token output).
struct CrossEntropyBwdOp {
    lse: Vec<f64>,
}

impl CustomOp3 for CrossEntropyBwdOp {
    fn name(&self) -> &'static str {
        "ablate-cross-entropy-bwd"
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
        let (n, v) = l1.shape().dims2()?;
        let tg = contiguous_slice::<u32>(s2, l2)?;
        if v == 0 || tg.len() != n || self.lse.len() != n {
            candle_core::bail!("cross_entropy backward: row counts differ");
        }
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(ce_bwd(
                contiguous_slice::<f32>(s1, l1)?,
                tg,
                &self.lse,
                contiguous_slice::<f32>(s3, l3)?,
                v,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(ce_bwd(
                contiguous_slice::<f64>(s1, l1)?,
                tg,
                &self.lse,
                contiguous_slice::<f64>(s3, l3)?,
                v,
            )),
            _ => candle_core::bail!(
                "cross_entropy backward: only f32 and f64 are supported on the CPU"
            ),
        };
        Ok((out, l1.shape().clone()))
    }
}
