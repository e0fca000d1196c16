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

/// Whether the fused CPU kernels take this tensor (f32 or f64 on the CPU).
fn fused_cpu(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
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
pub(crate) trait Real: WithDType {
    fn exp_(self) -> Self;
    fn tanh_(self) -> Self;
}
impl Real for f32 {
    #[inline(always)]
    fn exp_(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn tanh_(self) -> Self {
        tanh_f32(self)
    }
}
impl Real for f64 {
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn tanh_(self) -> Self {
        self.tanh()
    }
}

/// `e^x` in f32 without a libm call: branch-free (so loops over it vectorise), Cody–Waite range
/// reduction `x = n·ln2 + r`, |r| ≤ ln2/2, then a degree-7 Taylor polynomial (truncation error
/// below 5e-9 relative; overall within 2 ulp of `f32::exp`). libm's scalar `expf` was most of the
/// time of the softmax, cross-entropy and GELU kernels. Underflows to 0 below −87.3 (so −∞ gives
/// 0, as a mask needs), saturates to `f32::MAX`·2 = ∞ above 88.7, and keeps NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75; // ln 2 split so n·LN2_HI is exact for |n| < 2^8
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer (to nearest)
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n built in the exponent bits; n is in [-126, 128], 128 only past the clamp's top, where
    // 2^127·2·p overflows to ∞ as exp does.
    let ni = n as i32;
    let half = ni >> 1;
    let s1 = f32::from_bits(((half + 127) as u32) << 23);
    let s2 = f32::from_bits((((ni - half) + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x < -87.3 {
        0.0
    } else if x > 88.7 {
        f32::INFINITY
    } else {
        y
    }
}

/// `tanh` in f32 from [`exp_f32`]: `sign(x)·(1 − e)/(1 + e)`, `e = e^{−2|x|}` (absolute error a
/// few 1e-8; NaN stays NaN).
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    let e = exp_f32(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
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

/// Whether this CPU has AVX2 and FMA (x86-64; cached by std after the first call).
#[inline(always)]
fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines a kernel twice, for the baseline target and for AVX2+FMA, and picks at run time:
/// the default x86-64 target only has SSE2, so the exp/tanh loops would otherwise run 4 lanes
/// wide instead of 8. The body is an ordinary generic function inlined into both.
macro_rules! simd_kernel {
    ($(#[$m:meta])* fn $name:ident<$T:ident>($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[inline(always)]
        fn $name<$T: Real>($($a: $t),*) {
            #[inline(always)]
            fn body<$T: Real>($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$T: Real>($($a: $t),*) {
                    body::<$T>($($a),*)
                }
                if avx2_fma() {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2::<$T>($($a),*) };
                }
            }
            body::<$T>($($a),*)
        }
    };
}

/// Sum of a slice in f64, with 8 running partial sums in the slice's type per block of 512 (so the
/// loop vectorises) folded into f64 between blocks (so long rows keep f64 accuracy).
#[inline(always)]
fn sum_f64<T: Real>(xs: &[T]) -> f64 {
    let mut total = 0f64;
    for block in xs.chunks(512) {
        let mut acc = [T::from_f64(0.0); 8];
        let lanes = block.chunks_exact(8);
        let rest = lanes.remainder();
        for l in lanes {
            for k in 0..8 {
                acc[k] += l[k];
            }
        }
        total += acc.iter().map(|a| a.to_f64()).sum::<f64>();
        total += rest.iter().map(|a| a.to_f64()).sum::<f64>();
    }
    total
}

/// Maximum of a non-empty slice (8 lanes, so the loop vectorises); NaN-free inputs assumed, as
/// everywhere a maximum is only subtracted for stability.
#[inline(always)]
fn max_of<T: Real>(xs: &[T]) -> T {
    let mut acc = [xs[0]; 8];
    let lanes = xs.chunks_exact(8);
    let rest = lanes.remainder();
    for l in lanes {
        for k in 0..8 {
            acc[k] = if l[k] > acc[k] { l[k] } else { acc[k] };
        }
    }
    let mut m = acc[0];
    for &v in acc[1..].iter().chain(rest) {
        if v > m {
            m = v;
        }
    }
    m
}

/// Row-wise softmax of `scale · x` over the last dimension (C), optionally causal: in a stack
/// of (Tq, C) matrices, row i only sees columns `0..=i + C − Tq` (the rest of the output is 0 and
/// never computed). Backward (fused too, [`SoftmaxBwdOp`]): `scale · y ⊙ (g − Σ g⊙y)`.
struct SoftmaxOp {
    scale: f64,
    /// `Some(Tq)`: causal over (Tq, C) matrices.
    causal: Option<usize>,
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

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_A: f64 = 0.044715;

/// transformers' `gelu_new`, elementwise.
struct GeluOp;

/// Elements per parallel task of the elementwise kernels.
const ELEMWISE_CHUNK: usize = 1 << 14;

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

/// Rows per parallel task: enough work per task (~32k elements) that rayon's overhead vanishes.
pub(crate) fn rows_per_task(c: usize) -> usize {
    (32_768 / c.max(1)).max(1)
}

/// Fused per-token cross-entropy on (logits (N, V), targets (N) u32) → (N). The forward keeps
/// each row's log-sum-exp for the backward, which is then one pass:
/// `d logits = (exp(x − lse) − onehot(target)) · g[row]`.
#[derive(Default)]
struct CrossEntropyOp {
    lse: std::sync::Mutex<Vec<f64>>,
}

/// Log-sum-exp of one row: maximum, then Σ exp(x − max) (vectorised, summed in f64).
#[inline(always)]
fn row_lse<T: Real>(row: &[T], scratch: &mut [T]) -> f64 {
    let m = max_of(row);
    if !m.to_f64().is_finite() {
        // All −∞ (or +∞ / NaN somewhere): the plain formula gives the IEEE answer.
        return m.to_f64()
            + row
                .iter()
                .map(|v| (v.to_f64() - m.to_f64()).exp())
                .sum::<f64>()
                .ln();
    }
    for (e, &v) in scratch.iter_mut().zip(row) {
        *e = (v - m).exp_();
    }
    m.to_f64() + sum_f64(scratch).ln()
}

simd_kernel! {
    /// One parallel task of [`ce_fwd`]: per row, the log-sum-exp and the token's NLL.
    fn ce_fwd_chunk<T>(xs: &[T], ls: &mut [f64], os: &mut [T], ts: &[u32], v: usize) {
        let mut scratch = vec![T::from_f64(0.0); v];
        for (((row, l), o), &t) in xs.chunks_exact(v).zip(ls).zip(os).zip(ts) {
            *l = row_lse(row, &mut scratch);
            *o = T::from_f64(*l - row[t as usize].to_f64());
        }
    }
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
        .for_each(|(((xs, ls), os), ts)| ce_fwd_chunk(xs, ls, os, ts, v));
    Ok((out, lse))
}

simd_kernel! {
    /// One parallel task of [`ce_bwd`]: `(exp(x − lse) − onehot(target)) · g[row]`.
    fn ce_bwd_chunk<T>(os: &mut [T], xs: &[T], ls: &[f64], gs: &[T], ts: &[u32], v: usize) {
        for ((((orow, row), &l), &gr), &t) in os
            .chunks_exact_mut(v)
            .zip(xs.chunks_exact(v))
            .zip(ls)
            .zip(gs)
            .zip(ts)
        {
            // exp in the input type: f32 rows stay f32 (the hot loop), f64 rows stay exact.
            let shift = T::from_f64(l);
            for (o, &xv) in orow.iter_mut().zip(row) {
                *o = (xv - shift).exp_() * gr;
            }
            orow[t as usize] -= gr;
        }
    }
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
        .for_each(|((((os, xs), ls), gs), ts)| ce_bwd_chunk(os, xs, ls, gs, ts, v));
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

// ---- fused linear layers ---------------------------------------------------------------------

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

// ---- reductions and in-place kernels shared with the manual backward (model/backward.rs) ----

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
fn col_sum_tensor(t: &Tensor, offset: usize, c: usize) -> candle_core::Result<Tensor> {
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

simd_kernel! {
    /// One parallel task of [`ce_fwd_exp_inplace_f32`].
    fn ce_fwd_exp_chunk<T>(xs: &mut [T], inv: &mut [f64], nll: &mut [f64], ts: &[u32], v: usize) {
        for (((row, iv), nl), &t) in xs.chunks_exact_mut(v).zip(inv).zip(nll).zip(ts) {
            let picked = row[t as usize].to_f64();
            let m = max_of(row);
            if !m.to_f64().is_finite() {
                // All −∞, or ±∞ / NaN somewhere: the IEEE answer of the plain formula, and the
                // softmax as exp(x − lse) (NaN where that is NaN).
                let lse = m.to_f64()
                    + row
                        .iter()
                        .map(|x| (x.to_f64() - m.to_f64()).exp())
                        .sum::<f64>()
                        .ln();
                for x in row.iter_mut() {
                    *x = T::from_f64((x.to_f64() - lse).exp());
                }
                *iv = 1.0;
                *nl = lse - picked;
                continue;
            }
            for x in row.iter_mut() {
                *x = (*x - m).exp_();
            }
            let s = sum_f64(row);
            *iv = 1.0 / s;
            *nl = m.to_f64() + s.ln() - picked;
        }
    }
}

/// Cross-entropy forward that leaves `exp(x − max)` in the logits rows for the backward
/// ([`ce_bwd_from_exp_f32`]), so the vocabulary-wide exp runs once per step, not twice. Returns
/// each row's NLL and 1/Σexp. Targets must be below `v` (checked).
pub(crate) fn ce_fwd_exp_inplace_f32(
    x: &mut [f32],
    tg: &[u32],
    v: usize,
) -> candle_core::Result<(Vec<f64>, Vec<f64>)> {
    use rayon::prelude::*;
    if let Some(&bad) = tg.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("cross_entropy: target {bad} is outside the vocabulary of {v}");
    }
    let n = tg.len();
    let (mut inv, mut nll) = (vec![0f64; n], vec![0f64; n]);
    let rpt = rows_per_task(v);
    x.par_chunks_mut(rpt * v)
        .zip(inv.par_chunks_mut(rpt))
        .zip(nll.par_chunks_mut(rpt))
        .zip(tg.par_chunks(rpt))
        .for_each(|(((xs, is), ns), ts)| ce_fwd_exp_chunk(xs, is, ns, ts, v));
    Ok((nll, inv))
}

simd_kernel! {
    /// One parallel task of [`ce_bwd_from_exp_f32`].
    fn ce_bwd_from_exp_chunk<T>(xs: &mut [T], inv: &[f64], ts: &[u32], v: usize, g: f64) {
        for ((row, &iv), &t) in xs.chunks_exact_mut(v).zip(inv).zip(ts) {
            let k = T::from_f64(iv * g);
            for x in row.iter_mut() {
                *x *= k;
            }
            row[t as usize] -= T::from_f64(g);
        }
    }
}

/// The gradient of the mean-scaled NLL (`g` per token) in place, from [`ce_fwd_exp_inplace_f32`]'s
/// rows: `softmax − onehot(target)`, times `g`.
pub(crate) fn ce_bwd_from_exp_f32(x: &mut [f32], tg: &[u32], inv: &[f64], v: usize, g: f64) {
    use rayon::prelude::*;
    let rpt = rows_per_task(v);
    x.par_chunks_mut(rpt * v)
        .zip(inv.par_chunks(rpt))
        .zip(tg.par_chunks(rpt))
        .for_each(|((xs, is), ts)| ce_bwd_from_exp_chunk(xs, is, ts, v, g));
}
