//! Optimisation: AdamW with per-parameter learning rates, global-norm gradient clipping, gradient
//! accumulation, and the learning-rate schedules a trial can ask for.
//!
//! candle's own `AdamW` has one learning rate and private moment buffers, so it can neither give
//! each layer group its own rate (discriminative fine-tuning) nor be checkpointed for an exact
//! resume. This one keeps its state by parameter *name* (the Hugging Face tensor names), which makes
//! the state file readable, lets the trainable set change between steps (gradual unfreezing: a
//! parameter gets moments and a step count the first time it is updated, exactly like PyTorch
//! skips parameters without gradients), and lets every update carry its own learning rate.
//!
//! The update is PyTorch's `torch.optim.AdamW` (decoupled weight decay), see [`AdamW::step`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};

use crate::trial::Schedule;
use crate::{Error, Result};

/// Hyper-parameters shared by all parameter groups (only the learning rate differs per group).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One parameter to update in this step, with the learning rate of its group.
pub struct ParamUpdate<'a> {
    pub name: &'a str,
    pub var: &'a Var,
    pub lr: f64,
}

/// GPT-2 / nanoGPT convention: weight decay only on matrices (linear weights and embeddings),
/// never on biases or LayerNorm gains, which are all 1-D.
pub fn decays(var: &Var) -> bool {
    var.rank() >= 2
}

#[derive(Clone, Debug)]
struct Moments {
    m: Tensor,
    v: Tensor,
    step: u64,
}

/// AdamW whose state is keyed by parameter name; see the module doc.
pub struct AdamW {
    cfg: AdamWConfig,
    state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW {
            cfg,
            state: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> AdamWConfig {
        self.cfg
    }

    /// Number of updates applied so far to `name` (0 if it was never trained).
    pub fn param_steps(&self, name: &str) -> u64 {
        self.state.get(name).map_or(0, |m| m.step)
    }

    /// One AdamW update of every parameter in `params` with its gradient from `grads` (already
    /// averaged over micro-batches and clipped). Parameters without a gradient are an error: the
    /// caller decides what is trainable, and a missing gradient means the graph was cut.
    ///
    /// Per parameter with step t (1-based), exactly `torch.optim.AdamW`:
    /// ```text
    /// p ← p − lr·wd·p                        (decoupled decay, only if decays(p))
    /// m ← β1·m + (1−β1)·g
    /// v ← β2·v + (1−β2)·g²
    /// p ← p − lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)
    /// ```
    pub fn step(
        &mut self,
        params: &[ParamUpdate<'_>],
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        self.step_impl(params, grads, true)
    }

    /// `fused` allows the single-pass CPU loop for contiguous f32 parameters (several times faster
    /// than the dozen whole-tensor ops of the generic path on GPT-2 small; see the bench below).
    /// Both paths compute the same formula; a test checks they agree.
    fn step_impl(
        &mut self,
        params: &[ParamUpdate<'_>],
        grads: &BTreeMap<String, Tensor>,
        fused: bool,
    ) -> Result<()> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        for p in params {
            let g = grads.get(p.name).ok_or_else(|| {
                Error::Other(format!("no gradient for trainable parameter {}", p.name))
            })?;
            let theta = p.var.as_tensor();
            if g.dims() != theta.dims() {
                return Err(Error::Other(format!(
                    "gradient of {} has shape {:?}, parameter has {:?}",
                    p.name,
                    g.dims(),
                    theta.dims()
                )));
            }
            let st = match self.state.get_mut(p.name) {
                Some(st) => st,
                None => {
                    let m = theta.zeros_like()?;
                    let v = theta.zeros_like()?;
                    self.state
                        .entry(p.name.to_string())
                        .or_insert(Moments { m, v, step: 0 })
                }
            };
            st.step += 1;
            let t = st.step as i32;
            let bc1 = 1.0 - beta1.powi(t);
            let bc2 = 1.0 - beta2.powi(t);
            let decay = if weight_decay != 0.0 && decays(p.var) {
                1.0 - p.lr * weight_decay
            } else {
                1.0
            };
            if fused {
                let coef = FusedCoef {
                    beta1,
                    beta2,
                    eps,
                    bc2_sqrt: bc2.sqrt(),
                    step_size: p.lr / bc1,
                    decay,
                };
                if fused_cpu_update(theta, g, &st.m, &st.v, &coef)? {
                    continue;
                }
            }
            let m = ((&st.m * beta1)? + (g * (1.0 - beta1))?)?;
            let v = ((&st.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
            let update = ((&m / &denom)? * (p.lr / bc1))?;
            let decayed = if decay != 1.0 {
                (theta * decay)?
            } else {
                theta.clone()
            };
            let new = (decayed - update)?;
            p.var.set(&new)?;
            st.m = m;
            st.v = v;
        }
        Ok(())
    }

    /// Writes the moments (`<name>.m`, `<name>.v`) and step counts (`<name>.step`, an i64
    /// scalar) to one safetensors file, so a resumed run continues with the same bias correction.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (name, st) in &self.state {
            map.insert(format!("{name}.m"), st.m.clone());
            map.insert(format!("{name}.v"), st.v.clone());
            let step = Tensor::new(&[st.step as i64], &Device::Cpu)?;
            map.insert(format!("{name}.step"), step);
        }
        candle_core::safetensors::save(&map, path)
            .map_err(|e| Error::input(path, format!("cannot write optimizer state: {e}")))
    }

    /// Replaces the state with the one saved by [`AdamW::save`].
    pub fn load(&mut self, path: &Path, device: &Device) -> Result<()> {
        let map = candle_core::safetensors::load(path, device)
            .map_err(|e| Error::input(path, format!("cannot read optimizer state: {e}")))?;
        let mut state = BTreeMap::new();
        for (key, step) in map.iter() {
            let Some(name) = key.strip_suffix(".step") else {
                continue;
            };
            let get = |suffix: &str| {
                map.get(&format!("{name}.{suffix}"))
                    .cloned()
                    .ok_or_else(|| Error::input(path, format!("missing {name}.{suffix}")))
            };
            let step = step
                .to_dtype(DType::I64)?
                .flatten_all()?
                .to_vec1::<i64>()?
                .first()
                .copied()
                .ok_or_else(|| Error::input(path, format!("empty {key}")))?;
            state.insert(
                name.to_string(),
                Moments {
                    m: get("m")?,
                    v: get("v")?,
                    step: step as u64,
                },
            );
        }
        self.state = state;
        Ok(())
    }
}

struct FusedCoef {
    beta1: f64,
    beta2: f64,
    eps: f64,
    bc2_sqrt: f64,
    step_size: f64,
    decay: f64,
}

/// Runs `f` on the f32 data of a contiguous CPU tensor, without copying; None otherwise.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if t.dtype() != DType::F32 {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let (o1, o2) = layout.contiguous_offsets()?;
    match &*storage {
        candle_core::Storage::Cpu(cpu) => cpu.as_slice::<f32>().ok().map(|s| f(&s[o1..o2])),
        _ => None,
    }
}

/// An in-place op that hands the f32 data of a contiguous CPU tensor to a closure, mutably.
struct MutF32<F>(std::cell::RefCell<Option<F>>);

impl<F: FnOnce(&mut [f32])> candle_core::InplaceOp1 for MutF32<F> {
    fn name(&self) -> &'static str {
        "ablate-mut-f32"
    }

    fn cpu_fwd(
        &self,
        s: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("in-place update of a non-contiguous tensor");
        };
        let candle_core::CpuStorage::F32(v) = s else {
            candle_core::bail!("in-place update expects f32");
        };
        if let Some(f) = self.0.borrow_mut().take() {
            f(&mut v[a..b]);
        }
        Ok(())
    }
}

/// Runs `f` on the f32 data of a contiguous CPU tensor, mutably and without copying (every
/// handle to the tensor sees the change, as with `Var::set`); false when the tensor is not of
/// that kind.
fn with_cpu_f32_mut(t: &Tensor, f: impl FnOnce(&mut [f32])) -> Result<bool> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() || !t.is_contiguous() {
        return Ok(false);
    }
    t.inplace_op1(&MutF32(std::cell::RefCell::new(Some(f))))?;
    Ok(true)
}

/// Elements per parallel task of the update loop.
const UPDATE_CHUNK: usize = 1 << 16;

/// One pass over parameter, gradient and moments, updating all three in place, for contiguous
/// f32 CPU tensors (no allocation: on GPT-2 small a step used to allocate and copy 1.5 GB).
/// Returns false, touching nothing, when the tensors are not of that kind.
fn fused_cpu_update(
    theta: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    c: &FusedCoef,
) -> Result<bool> {
    let n = theta.elem_count();
    // A gradient that reaches here through a transpose may be strided: one copy, not the slow path.
    let g = &if g.device().is_cpu() && !g.is_contiguous() {
        g.contiguous()?
    } else {
        g.clone()
    };
    let all_f32_cpu = [theta, g, m, v].iter().all(|t| {
        t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() && t.elem_count() == n
    });
    if !all_f32_cpu {
        return Ok(false);
    }
    let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
    let (one_b1, one_b2) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
    let (bc2_sqrt, eps) = (c.bc2_sqrt as f32, c.eps as f32);
    let (step_size, decay) = (c.step_size as f32, c.decay as f32);
    let mut inner: Result<bool> = Ok(false);
    with_cpu_f32_mut(m, |ms| {
        inner = with_cpu_f32_mut(v, |vs| {
            let r = with_cpu_f32_mut(theta, |th| {
                with_cpu_f32(g, |gs| {
                    use rayon::prelude::*;
                    th.par_chunks_mut(UPDATE_CHUNK)
                        .zip(ms.par_chunks_mut(UPDATE_CHUNK))
                        .zip(vs.par_chunks_mut(UPDATE_CHUNK))
                        .zip(gs.par_chunks(UPDATE_CHUNK))
                        .for_each(|(((th, ms), vs), gs)| {
                            for (((p, m), v), &gi) in th.iter_mut().zip(ms).zip(vs).zip(gs) {
                                let mi = b1 * *m + one_b1 * gi;
                                let vi = b2 * *v + one_b2 * gi * gi;
                                *m = mi;
                                *v = vi;
                                let denom = vi.sqrt() / bc2_sqrt + eps;
                                *p = *p * decay - step_size * (mi / denom);
                            }
                        });
                });
            });
            debug_assert!(matches!(r, Ok(true)), "checked above");
        });
    })?;
    inner
}

/// Sums gradients over micro-batches, then averages: the mean loss of `accum` micro-batches of B
/// windows has the gradient of one batch of `accum·B` windows.
#[derive(Default)]
pub struct GradAccumulator {
    sums: BTreeMap<String, Tensor>,
    micro: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the gradient of every named parameter found in `grads`. A parameter with no gradient in
    /// this backward pass is an error (it would silently stay untrained).
    pub fn add(
        &mut self,
        grads: &candle_core::backprop::GradStore,
        params: &[(&str, &Var)],
    ) -> Result<()> {
        for (name, var) in params {
            let g = grads.get(var.as_tensor()).ok_or_else(|| {
                Error::Other(format!("trainable parameter {name} received no gradient"))
            })?;
            self.accumulate(name, g.detach())?;
        }
        self.micro += 1;
        Ok(())
    }

    /// [`Self::add`] for gradients already keyed by name (the manual CPU backward,
    /// [`crate::model::backward`]). Only the names in `params` are kept; one missing is an error.
    pub fn add_named(
        &mut self,
        mut grads: BTreeMap<String, Tensor>,
        params: &[(&str, &Var)],
    ) -> Result<()> {
        for (name, _) in params {
            let g = grads.remove(*name).ok_or_else(|| {
                Error::Other(format!("trainable parameter {name} received no gradient"))
            })?;
            self.accumulate(name, g)?;
        }
        self.micro += 1;
        Ok(())
    }

    /// Adds one micro-batch's gradient of `name` to its running sum.
    fn accumulate(&mut self, name: &str, g: Tensor) -> Result<()> {
        let sum = match self.sums.remove(name) {
            Some(s) => (s + g)?,
            None => g,
        };
        self.sums.insert(name.to_string(), sum);
        Ok(())
    }

    /// The averaged gradients; resets the accumulator.
    pub fn finish(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let n = self.micro.max(1) as f64;
        self.micro = 0;
        let sums = std::mem::take(&mut self.sums);
        let mut out = BTreeMap::new();
        for (k, s) in sums {
            let s = if n == 1.0 { s } else { (s / n)? };
            out.insert(k, s);
        }
        Ok(out)
    }
}

/// Global L2 norm of all gradients (sums of squares accumulated in f64). Contiguous f32 CPU
/// gradients are read in place (no squared copy); others go through tensor ops.
pub fn grad_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        let host = if g.device().is_cpu() {
            with_cpu_f32(g, |s| {
                use rayon::prelude::*;
                s.par_chunks(UPDATE_CHUNK)
                    .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                    .sum::<f64>()
            })
        } else {
            None
        };
        total += match host {
            Some(sq) => sq,
            None => g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()? as f64,
        };
    }
    Ok(total.sqrt())
}

/// Scales all gradients so their global L2 norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`: coefficient max_norm / (norm + 1e-6), capped at 1).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// Learning rate for optimizer step `step` (0-based) of `total`, with base (peak) rate `base_lr`.
///
/// * Warmup (Constant, Linear, Cosine): steps `0..warmup` rise linearly, `lr·(step+1)/warmup`, so
///   the last warmup step runs at the peak; decay then runs over the remaining `total − warmup`
///   steps with progress `p = (step − warmup)/(total − warmup)`.
/// * Constant: `lr`. Linear: `lr·(1 − p)`. Cosine: `min + (lr − min)·(1 + cos πp)/2`,
///   `min = min_ratio·lr`.
/// * SlantedTriangular (ULMFiT, Howard & Ruder 2018, eq. 3) has its own rise and ignores `warmup`:
///   `cut = ⌊T·cut_frac⌋`, `p = t/cut` if `t < cut` else `1 − (t − cut)/(cut·(1/cut_frac − 1))`,
///   `lr_t = lr·(1 + p·(ratio − 1))/ratio`.
pub fn lr_at(schedule: &Schedule, base_lr: f64, warmup: u64, step: u64, total: u64) -> f64 {
    if let Schedule::SlantedTriangular { cut_frac, ratio } = *schedule {
        let t = step as f64;
        let cut = (total as f64 * cut_frac).floor().max(1.0);
        let p = if t < cut {
            t / cut
        } else {
            let fall = cut * (1.0 / cut_frac - 1.0);
            if fall <= 0.0 {
                1.0
            } else {
                (1.0 - (t - cut) / fall).max(0.0)
            }
        };
        return base_lr * (1.0 + p * (ratio - 1.0)) / ratio;
    }
    if step < warmup {
        return base_lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    match *schedule {
        Schedule::Constant => base_lr,
        Schedule::Linear => base_lr * (1.0 - p),
        Schedule::Cosine { min_ratio } => {
            let min = min_ratio * base_lr;
            min + (base_lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos())
        }
        Schedule::SlantedTriangular { .. } => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9 * (1.0 + b.abs())
    }

    #[test]
    fn warmup_then_constant() {
        let s = Schedule::Constant;
        assert!(close(lr_at(&s, 1.0, 4, 0, 10), 0.25));
        assert!(close(lr_at(&s, 1.0, 4, 3, 10), 1.0));
        assert!(close(lr_at(&s, 1.0, 4, 9, 10), 1.0));
        assert!(close(lr_at(&s, 2.0, 0, 0, 10), 2.0));
    }

    #[test]
    fn linear_decays_to_zero() {
        let s = Schedule::Linear;
        // warmup 2, total 10: decay span 8.
        assert!(close(lr_at(&s, 1.0, 2, 2, 10), 1.0));
        assert!(close(lr_at(&s, 1.0, 2, 6, 10), 0.5));
        assert!(close(lr_at(&s, 1.0, 2, 9, 10), 1.0 / 8.0));
        assert!(close(lr_at(&s, 1.0, 2, 10, 10), 0.0));
    }

    #[test]
    fn cosine_hits_peak_mid_and_floor() {
        let s = Schedule::Cosine { min_ratio: 0.1 };
        assert!(close(lr_at(&s, 1.0, 0, 0, 100), 1.0));
        assert!(close(lr_at(&s, 1.0, 0, 50, 100), 0.55));
        assert!(close(lr_at(&s, 1.0, 0, 100, 100), 0.1));
        assert!(close(lr_at(&s, 1.0, 10, 10, 110), 1.0));
    }

    #[test]
    fn slanted_triangular_matches_ulmfit() {
        // T = 100, cut_frac 0.1 → cut 10, ratio 32.
        let s = Schedule::SlantedTriangular {
            cut_frac: 0.1,
            ratio: 32.0,
        };
        assert!(close(lr_at(&s, 0.01, 0, 0, 100), 0.01 / 32.0));
        assert!(close(lr_at(&s, 0.01, 0, 10, 100), 0.01));
        // t = 5: p = 0.5 → lr (1 + 0.5·31)/32
        assert!(close(lr_at(&s, 0.01, 0, 5, 100), 0.01 * 16.5 / 32.0));
        // t = 55: p = 1 − 45/90 = 0.5
        assert!(close(lr_at(&s, 0.01, 0, 55, 100), 0.01 * 16.5 / 32.0));
        assert!(close(lr_at(&s, 0.01, 0, 100, 100), 0.01 / 32.0));
        // warmup is ignored
        assert!(close(lr_at(&s, 0.01, 7, 10, 100), 0.01));
    }

    /// Two AdamW steps against `torch.optim.AdamW`, computed by hand:
    ///
    /// ```python
    /// import torch
    /// w = torch.nn.Parameter(torch.tensor([[1.0, -2.0]]))   # 2-D: decays
    /// b = torch.nn.Parameter(torch.tensor([0.5]))           # 1-D: no decay
    /// opt = torch.optim.AdamW([{"params": [w], "weight_decay": 0.1},
    ///                          {"params": [b], "weight_decay": 0.0}],
    ///                         lr=0.1, betas=(0.9, 0.999), eps=1e-8)
    /// for g_w, g_b in [([[0.5, -1.0]], [2.0]), ([[0.1, 0.3]], [-1.0])]:
    ///     w.grad = torch.tensor(g_w); b.grad = torch.tensor(g_b); opt.step()
    /// ```
    /// Step 1 (t=1): m = 0.1·g, v = 0.001·g², m̂ = g, v̂ = g², so the step is lr·g/(|g|+eps) = ±0.1:
    ///   w = [1·(1−0.01) − 0.1, −2·0.99 + 0.1] = [0.89, −1.88]; b = 0.5 − 0.1 = 0.4.
    /// Step 2 for w[0]: m = 0.9·0.05 + 0.1·0.1 = 0.055, v = 0.999·0.00025 + 0.001·0.01 = 0.00025975,
    ///   m̂ = 0.055/0.19, v̂ = 0.00025975/0.001999; w = 0.89·0.99 − 0.1·m̂/(sqrt(v̂)+1e-8).
    #[test]
    fn adamw_matches_pytorch_formula() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::from_slice(&[1.0f32, -2.0], (1, 2), &dev)?;
        let b = Var::from_slice(&[0.5f32], 1, &dev)?;
        let mut opt = AdamW::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        });
        let steps: [([f32; 2], f32); 2] = [([0.5, -1.0], 2.0), ([0.1, 0.3], -1.0)];
        let mut results = vec![];
        for (gw, gb) in steps {
            let mut grads = BTreeMap::new();
            grads.insert("w".to_string(), Tensor::from_slice(&gw, (1, 2), &dev)?);
            grads.insert("b".to_string(), Tensor::from_slice(&[gb], 1, &dev)?);
            let params = [
                ParamUpdate {
                    name: "w",
                    var: &w,
                    lr: 0.1,
                },
                ParamUpdate {
                    name: "b",
                    var: &b,
                    lr: 0.1,
                },
            ];
            opt.step(&params, &grads)?;
            results.push((
                w.as_tensor().flatten_all()?.to_vec1::<f32>()?,
                b.as_tensor().to_vec1::<f32>()?,
            ));
        }
        let (w1, b1) = &results[0];
        assert!((w1[0] as f64 - 0.89).abs() < 1e-6, "{w1:?}");
        assert!((w1[1] as f64 + 1.88).abs() < 1e-6, "{w1:?}");
        assert!((b1[0] as f64 - 0.4).abs() < 1e-6, "{b1:?}");
        // Step 2, the reference computed in f64 from the formula in the doc comment.
        let reference = |p: f64, g1: f64, g2: f64, wd: f64| {
            let (b1_, b2_, lr, eps) = (0.9f64, 0.999f64, 0.1f64, 1e-8f64);
            let m = b1_ * (1.0 - b1_) * g1 + (1.0 - b1_) * g2;
            let v = b2_ * (1.0 - b2_) * g1 * g1 + (1.0 - b2_) * g2 * g2;
            let mh = m / (1.0 - b1_ * b1_);
            let vh = v / (1.0 - b2_ * b2_);
            p * (1.0 - lr * wd) - lr * mh / (vh.sqrt() + eps)
        };
        let (w2, b2) = &results[1];
        let e0 = reference(0.89, 0.5, 0.1, 0.1);
        let e1 = reference(-1.88, -1.0, 0.3, 0.1);
        let eb = reference(0.4, 2.0, -1.0, 0.0);
        assert!((w2[0] as f64 - e0).abs() < 1e-5, "{} vs {e0}", w2[0]);
        assert!((w2[1] as f64 - e1).abs() < 1e-5, "{} vs {e1}", w2[1]);
        assert!((b2[0] as f64 - eb).abs() < 1e-5, "{} vs {eb}", b2[0]);
        assert_eq!(opt.param_steps("w"), 2);
        Ok(())
    }

    /// The fused CPU loop and the generic tensor path compute the same update.
    #[test]
    fn fused_and_generic_paths_agree() -> Result<()> {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 0.5, (7, 5), &dev)?;
        let a = Var::from_tensor(&init.copy()?)?;
        let b = Var::from_tensor(&init.copy()?)?;
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (mut fa, mut fb) = (AdamW::new(cfg), AdamW::new(cfg));
        for i in 0..4 {
            let mut grads = BTreeMap::new();
            grads.insert(
                "w".to_string(),
                Tensor::randn(0f32, 1.0 + i as f32, (7, 5), &dev)?,
            );
            fa.step_impl(
                &[ParamUpdate {
                    name: "w",
                    var: &a,
                    lr: 0.01,
                }],
                &grads,
                true,
            )?;
            fb.step_impl(
                &[ParamUpdate {
                    name: "w",
                    var: &b,
                    lr: 0.01,
                }],
                &grads,
                false,
            )?;
        }
        let diff = (a.as_tensor() - b.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "paths differ by {diff}");
        let moved = (a.as_tensor() - &init)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(moved > 0.01, "the parameter moved {moved}");
        Ok(())
    }

    #[test]
    fn optimizer_state_round_trips() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let w = Var::from_slice(&[1.0f32, -2.0, 3.0, 4.0], (2, 2), &dev)?;
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut opt = AdamW::new(cfg);
        let mut grads = BTreeMap::new();
        grads.insert(
            "h.0.w".to_string(),
            Tensor::from_slice(&[0.5f32, -1.0, 0.2, 0.0], (2, 2), &dev)?,
        );
        let params = [ParamUpdate {
            name: "h.0.w",
            var: &w,
            lr: 0.01,
        }];
        opt.step(&params, &grads)?;
        let path = dir.path().join("opt.safetensors");
        opt.save(&path)?;
        let mut other = AdamW::new(cfg);
        other.load(&path, &dev)?;
        assert_eq!(other.param_steps("h.0.w"), 1);
        let w2 = Var::from_tensor(&w.as_tensor().copy()?)?;
        opt.step(&params, &grads)?;
        other.step(
            &[ParamUpdate {
                name: "h.0.w",
                var: &w2,
                lr: 0.01,
            }],
            &grads,
        )?;
        assert_eq!(
            w.as_tensor().flatten_all()?.to_vec1::<f32>()?,
            w2.as_tensor().flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }

    #[test]
    fn clipping_scales_to_max_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut grads = BTreeMap::new();
        grads.insert("a".to_string(), Tensor::from_slice(&[3.0f32], 1, &dev)?);
        grads.insert("b".to_string(), Tensor::from_slice(&[4.0f32], 1, &dev)?);
        let n = clip_grad_norm(&mut grads, 1.0)?;
        assert!((n - 5.0).abs() < 1e-6);
        assert!((grad_norm(&grads)? - 1.0).abs() < 1e-5);
        // Below the limit nothing changes.
        let n2 = clip_grad_norm(&mut grads, 10.0)?;
        assert!((n2 - 1.0).abs() < 1e-5);
        assert!((grad_norm(&grads)? - 1.0).abs() < 1e-5);
        Ok(())
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// `cargo test -p experiments --lib optim::bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn adamw_step_time_gpt2_sized() -> Result<()> {
        let dev = Device::Cpu;
        // GPT-2 small's parameter count in a few large tensors.
        let shapes: [(usize, usize); 4] = [
            (50257, 768),
            (12 * 768, 2304),
            (12 * 768, 3072),
            (12 * 3072, 768),
        ];
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| Var::randn(0f32, 0.02, *s, &dev))
            .collect::<candle_core::Result<_>>()?;
        let mut grads = BTreeMap::new();
        for (i, v) in vars.iter().enumerate() {
            grads.insert(format!("p{i}"), (v.as_tensor() * 0.1)?);
        }
        let names: Vec<String> = (0..vars.len()).map(|i| format!("p{i}")).collect();
        let params: Vec<ParamUpdate> = vars
            .iter()
            .zip(&names)
            .map(|(v, n)| ParamUpdate {
                name: n,
                var: v,
                lr: 1e-4,
            })
            .collect();
        let mut opt = AdamW::new(AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        });
        for i in 0..3 {
            let t = std::time::Instant::now();
            opt.step(&params, &grads)?;
            println!("adamw step {i}: {:.3} s", t.elapsed().as_secs_f64());
        }
        let t = std::time::Instant::now();
        let mut g2 = grads.clone();
        clip_grad_norm(&mut g2, 1e-3)?;
        println!("clip: {:.3} s", t.elapsed().as_secs_f64());
        Ok(())
    }
}
