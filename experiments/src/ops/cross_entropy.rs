//! Token cross-entropy: the fused CPU op (forward keeps each row's log-sum-exp, backward is one
//! pass writing `softmax − onehot`), the portable composition other devices run, the graph-free
//! NLL sum of evaluation, and the in-place f32 kernels of the manual backward that compute the
//! vocabulary-wide exp once per step.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};

use super::simd::{max_of, sum_f64, Real};
use super::{contiguous_slice, rows_per_task};
use crate::{Error, Result};

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
