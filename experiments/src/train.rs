//! The training loop shared by every method, with checkpoints that resume bit-exactly.
//!
//! One optimizer step: `grad_accum` micro-batches from the [`Batcher`], each `loss.backward()`
//! summed into a [`GradAccumulator`], averaged, clipped to the global norm, then one AdamW update
//! per trainable parameter at its group's scheduled learning rate. What is trainable comes from
//! [`crate::methods`] at every step, so gradual unfreezing is just a mask that grows.
//!
//! Checkpoints live in `OUT/ckpt/`: `model.safetensors` (every parameter by its Hugging Face
//! name), `optimizer.safetensors` (moments and per-parameter step counts) and `state.json` (step,
//! batcher position, loss history, run key). They are written to `ckpt.tmp/` and swapped in by
//! renames (`ckpt` → `ckpt.old`, `ckpt.tmp` → `ckpt`, then `ckpt.old` removed), so a crash at any
//! moment leaves one complete checkpoint behind (`ckpt`, or `ckpt.old` if the crash fell between
//! the renames). There is no randomness in a step besides the batch order (GPT-2 here has no
//! dropout), so restoring weights, optimizer state and batcher state reproduces the uninterrupted
//! run exactly.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::backward;
use crate::data::{Batcher, BatcherState};
use crate::eval;
use crate::methods::{self, LayerGroups, TrainMask};
use crate::model::{CausalLm, Param, Trainable};
use crate::optim::{self, AdamW, AdamWConfig, GradAccumulator, ParamUpdate};
use crate::trial::{Method, Progress, TrainSpec};
use crate::{Error, Result};

/// Data parallelism: how one rank's gradients meet those of the other ranks of its trial.
///
/// Every rank of a trial runs [`train`] on the same config, seed and starting weights, so all
/// ranks hold identical weights and optimizer state at every step. At each micro-batch the
/// [`Batcher`] draws `world` batches and rank `r` keeps the `r`-th: the step sees `world` times
/// the windows of one rank, and with `grad_accum = 1` it computes exactly what one process with
/// `grad_accum = world` computes. After the micro-batches, [`GradSync::all_reduce_mean`] replaces
/// each averaged gradient by its mean over the ranks (NCCL on GPUs, sockets on CPU; both live in
/// the worker, this crate has no networking), before clipping and the update.
pub trait GradSync: Send + Sync {
    /// This process's rank, 0-based; rank 0 reports progress and writes the results.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// Replace every gradient and `loss` by their means over all ranks. Every rank passes the
    /// same names with the same shapes (a `BTreeMap`, so the order is the same everywhere).
    fn all_reduce_mean(&self, grads: &mut BTreeMap<String, Tensor>, loss: &mut f64) -> Result<()>;
}

/// Everything one training run needs. `run_key` identifies the run (the trial id): a checkpoint
/// made by a different run in the same out dir is refused rather than silently continued.
pub struct TrainJob<'a> {
    /// The model to train, of any family (see [`crate::model`]).
    pub model: &'a dyn CausalLm,
    pub method: &'a Method,
    pub spec: &'a TrainSpec,
    pub groups: usize,
    pub context: usize,
    pub seed: u64,
    pub train_tokens: &'a [u32],
    pub valid_tokens: &'a [u32],
    pub out_dir: &'a Path,
    pub stop: &'a AtomicBool,
    pub device: &'a Device,
    pub run_key: String,
    /// Set when the trial trains data parallel across ranks (see [`GradSync`]).
    pub sync: Option<&'a dyn GradSync>,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainReport {
    /// Optimizer steps done (== spec.steps unless stopped).
    pub steps: u64,
    pub stopped: bool,
    /// Training tokens consumed (inputs), including those before a resume.
    pub train_tokens: u64,
    /// (step, mean micro-batch loss) for every step, including those before a resume.
    pub losses: Vec<(u64, f64)>,
    /// Steps that were restored from a checkpoint at start (0 for a fresh run).
    pub resumed_from: u64,
    /// Wall seconds of training done by earlier processes (restored from the checkpoint).
    pub prior_wall_s: f64,
    /// Where the wall time of this process's steps went (not saved in checkpoints).
    pub timing: StepTiming,
    /// Wall seconds of the whole training run (steps, periodic evals, checkpoints), summed over
    /// every process that worked on it: the denominator of a trial's tokens per second.
    pub wall_s: f64,
}

/// Seconds spent per phase, summed over the steps this call ran.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepTiming {
    /// Forward, loss and backward of every micro-batch.
    pub compute_s: f64,
    /// Gradient averaging, clipping and the AdamW update.
    pub optimizer_s: f64,
    pub eval_s: f64,
    pub checkpoint_s: f64,
}

impl TrainReport {
    pub fn final_loss(&self) -> Option<f64> {
        self.losses.last().map(|(_, l)| *l)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct CkptState {
    run_key: String,
    step: u64,
    total: u64,
    train_tokens: u64,
    batcher: BatcherState,
    losses: Vec<(u64, f64)>,
    /// Wall seconds of training (steps, periodic evals, checkpoints) before this checkpoint,
    /// summed over every process that worked on the run.
    #[serde(default)]
    wall_s: f64,
}

/// What a checkpoint records about progress so far.
struct Tally<'a> {
    step: u64,
    train_tokens: u64,
    losses: &'a [(u64, f64)],
    wall_s: f64,
}

/// Converts the method plan's mask into the model's.
pub fn to_trainable(m: &TrainMask) -> Trainable {
    Trainable {
        embeddings: m.embeddings,
        blocks: m.blocks.clone(),
        top: m.top,
        adapters: m.adapters.clone(),
    }
}

/// Parameters that train under the group flags `on`, with their (unscheduled) learning rates,
/// decided by each parameter's part (see [`LayerGroups::param_lr`]); only LoRA adapters when
/// `adapters_only` (see [`methods::adapters_only`]).
pub fn trainable_params(
    params: &[Param],
    lg: &LayerGroups,
    on: &[bool],
    lrs: &[f64],
    adapters_only: bool,
) -> Vec<(String, Var, f64)> {
    params
        .iter()
        .filter(|p| !adapters_only || matches!(p.part, crate::model::Part::Adapter(_)))
        .filter_map(|p| {
            lg.param_lr(p.part, on, lrs)
                .map(|lr| (p.name.clone(), p.var.clone(), lr))
        })
        .collect()
}

/// Number of parameters that train at step `step` (a tied embedding table counted once).
pub fn count_trainable(
    model: &dyn CausalLm,
    method: &Method,
    groups: usize,
    step: u64,
) -> Result<u64> {
    let named = model.params();
    let n_layer = eval::n_layer_of(model);
    if matches!(method, Method::Baseline) {
        return Ok(0);
    }
    let groups = methods::effective_groups(method, groups, n_layer);
    let lg = LayerGroups::new(n_layer, groups)?;
    let on = methods::active_groups(method, groups, step)?;
    let lrs = vec![1.0; groups];
    let only = methods::adapters_only(method);
    Ok(trainable_params(&named, &lg, &on, &lrs, only)
        .iter()
        .map(|(_, v, _)| v.elem_count() as u64)
        .sum())
}

pub fn ckpt_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("ckpt")
}

/// The checkpoint to resume from, if any (see the module doc for `ckpt.old`).
pub fn find_checkpoint(out_dir: &Path) -> Option<PathBuf> {
    let cur = out_dir.join("ckpt");
    if cur.join("state.json").is_file() {
        return Some(cur);
    }
    let old = out_dir.join("ckpt.old");
    old.join("state.json").is_file().then_some(old)
}

/// Runs (or resumes) the training of `job`. Returns when all steps are done or, after writing a
/// checkpoint, when `job.stop` is set.
// `%` rather than `is_multiple_of`: the workspace's rust-version is 1.85.
#[allow(clippy::manual_is_multiple_of)]
pub fn train(job: &TrainJob<'_>, on_progress: &mut dyn FnMut(&Progress)) -> Result<TrainReport> {
    let spec = job.spec;
    let total = spec.steps;
    let named = job.model.named_vars();
    let parts = job.model.params();
    let n_layer = eval::n_layer_of(job.model);
    let groups = methods::effective_groups(job.method, job.groups, n_layer);
    let lg = LayerGroups::new(n_layer, groups)?;
    if let Method::Freeze { .. } | Method::Gradual { .. } | Method::Lora { .. } = job.method {
        methods::validate(job.method, groups, n_layer)?;
    }
    if spec.batch_size == 0 || spec.grad_accum == 0 {
        return Err(Error::Config(format!(
            "train.batch_size ({}) and train.grad_accum ({}) must be positive",
            spec.batch_size, spec.grad_accum
        )));
    }
    let (rank, world) = job.sync.map_or((0, 1), |s| (s.rank(), s.world()));
    if world != spec.ranks.max(1) as usize || rank >= world {
        return Err(Error::Config(format!(
            "train.ranks = {} but this process is rank {rank} of {world}: a multi-rank trial runs \
             only through the coordinator, which leases all its ranks together",
            spec.ranks
        )));
    }
    let lrs = methods::group_lrs(spec.lr, spec.lr_factor, groups);
    let mut opt = AdamW::new(AdamWConfig {
        beta1: spec.beta1,
        beta2: spec.beta2,
        eps: spec.eps,
        weight_decay: spec.weight_decay,
    });
    let mut batcher = Batcher::new(job.train_tokens, job.context, spec.batch_size, job.seed)?;

    let mut step = 0u64;
    let mut train_tokens = 0u64;
    let mut losses: Vec<(u64, f64)> = Vec::new();
    let mut prior_wall_s = 0.0;
    let call_started = Instant::now();
    if let Some(dir) = find_checkpoint(job.out_dir) {
        let st = load_checkpoint(&dir, &job.run_key, &named, &mut opt, job.device)?;
        batcher.restore(&st.batcher)?;
        step = st.step;
        train_tokens = st.train_tokens;
        losses = st.losses;
        prior_wall_s = st.wall_s;
        tracing::info!(step, dir = %dir.display(), "resumed from checkpoint");
    }
    let resumed_from = step;

    let per_step_tokens = (spec.batch_size * spec.grad_accum * job.context * world) as u64;
    let mut acc = GradAccumulator::new();
    let mut timing = StepTiming::default();
    while step < total {
        if job.stop.load(Ordering::SeqCst) {
            let tally = Tally {
                step,
                train_tokens,
                losses: &losses,
                wall_s: prior_wall_s + call_started.elapsed().as_secs_f64(),
            };
            write_checkpoint(job, &named, &opt, &batcher, &tally)?;
            on_progress(&Progress::Checkpoint {
                step,
                dir: "ckpt".into(),
            });
            return Ok(TrainReport {
                steps: step,
                stopped: true,
                train_tokens,
                losses,
                resumed_from,
                prior_wall_s,
                timing,
                wall_s: prior_wall_s + call_started.elapsed().as_secs_f64(),
            });
        }
        let started = Instant::now();
        let on = methods::active_groups(job.method, groups, step)?;
        let mask = lg.mask_for(job.method, &on);
        let trainable = to_trainable(&mask);
        let only = methods::adapters_only(job.method);
        let params = trainable_params(&parts, &lg, &on, &lrs, only);
        if params.is_empty() {
            return Err(Error::Config(format!(
                "method {} trains no parameters",
                job.method.family()
            )));
        }
        let refs: Vec<(&str, &Var)> = params.iter().map(|(n, v, _)| (n.as_str(), v)).collect();
        let mut loss_sum = 0f64;
        for _ in 0..spec.grad_accum {
            // Every rank draws the step's `world` batches and keeps its own (see GradSync).
            let mut mine = None;
            for r in 0..world {
                let b = batcher.next_batch();
                if r == rank {
                    mine = Some(b);
                }
            }
            let (x, y) = mine.expect("rank < world");
            let ids = Tensor::from_vec(x, (spec.batch_size, job.context), job.device)?;
            let tgt = Tensor::from_vec(y, spec.batch_size * job.context, job.device)?;
            // Forward, loss, backward and `acc.add` (on the CPU one manual pass, crate::backward).
            let l = backward::accumulate(job.model, &ids, &tgt, &trainable, &refs, &mut acc)?;
            // With other ranks waiting in the all-reduce, a rank must not leave alone: its NaN
            // reaches every rank through the mean and all of them stop below.
            if !l.is_finite() && job.sync.is_none() {
                return Err(Error::Diverged(format!("loss {l} at step {}", step + 1)));
            }
            loss_sum += l;
        }
        timing.compute_s += started.elapsed().as_secs_f64();
        let opt_started = Instant::now();
        let mut grads = acc.finish()?;
        let mut loss = loss_sum / spec.grad_accum as f64;
        if let Some(sync) = job.sync {
            sync.all_reduce_mean(&mut grads, &mut loss)?;
            if !loss.is_finite() {
                return Err(Error::Diverged(format!(
                    "loss {loss} (mean over {world} ranks) at step {}",
                    step + 1
                )));
            }
        }
        if let Some(max) = spec.clip_norm {
            let norm = optim::clip_grad_norm(&mut grads, max)?;
            if !norm.is_finite() {
                return Err(Error::Diverged(format!(
                    "gradient norm {norm} at step {}",
                    step + 1
                )));
            }
        }
        let scale = optim::lr_at(&spec.schedule, 1.0, spec.warmup_steps, step, total);
        let updates: Vec<ParamUpdate<'_>> = params
            .iter()
            .map(|(n, v, lr)| ParamUpdate {
                name: n.as_str(),
                var: v,
                lr: lr * scale,
            })
            .collect();
        opt.step(&updates, &grads)?;
        timing.optimizer_s += opt_started.elapsed().as_secs_f64();
        step += 1;
        train_tokens += per_step_tokens;
        losses.push((step, loss));
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        on_progress(&Progress::Step {
            step,
            total,
            loss,
            lr: lrs[groups - 1] * scale,
            tokens_per_sec: per_step_tokens as f64 / secs,
        });
        if spec.eval_every > 0 && step % spec.eval_every == 0 && !job.valid_tokens.is_empty() {
            let eval_started = Instant::now();
            let r = eval::perplexity(
                job.model,
                job.valid_tokens,
                job.context,
                spec.batch_size,
                Some(spec.eval_windows.max(1)),
                job.device,
            )?;
            timing.eval_s += eval_started.elapsed().as_secs_f64();
            on_progress(&Progress::Eval {
                step,
                valid_loss: r.loss,
            });
        }
        if spec.checkpoint_every > 0 && step % spec.checkpoint_every == 0 && step < total {
            let ckpt_started = Instant::now();
            let tally = Tally {
                step,
                train_tokens,
                losses: &losses,
                wall_s: prior_wall_s + call_started.elapsed().as_secs_f64(),
            };
            write_checkpoint(job, &named, &opt, &batcher, &tally)?;
            timing.checkpoint_s += ckpt_started.elapsed().as_secs_f64();
            on_progress(&Progress::Checkpoint {
                step,
                dir: "ckpt".into(),
            });
        }
    }
    if step > resumed_from || find_checkpoint(job.out_dir).is_none() {
        let ckpt_started = Instant::now();
        let tally = Tally {
            step,
            train_tokens,
            losses: &losses,
            wall_s: prior_wall_s + call_started.elapsed().as_secs_f64(),
        };
        write_checkpoint(job, &named, &opt, &batcher, &tally)?;
        timing.checkpoint_s += ckpt_started.elapsed().as_secs_f64();
        on_progress(&Progress::Checkpoint {
            step,
            dir: "ckpt".into(),
        });
    }
    Ok(TrainReport {
        steps: step,
        stopped: false,
        train_tokens,
        losses,
        resumed_from,
        prior_wall_s,
        timing,
        wall_s: prior_wall_s + call_started.elapsed().as_secs_f64(),
    })
}

fn write_checkpoint(
    job: &TrainJob<'_>,
    named: &[(String, Var)],
    opt: &AdamW,
    batcher: &Batcher<'_>,
    tally: &Tally<'_>,
) -> Result<()> {
    let out = job.out_dir;
    fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tmp = out.join("ckpt.tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let weights: HashMap<String, Tensor> = named
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let model_path = tmp.join("model.safetensors");
    candle_core::safetensors::save(&weights, &model_path)
        .map_err(|e| Error::input(&model_path, format!("cannot write checkpoint weights: {e}")))?;
    opt.save(&tmp.join("optimizer.safetensors"))?;
    let st = CkptState {
        run_key: job.run_key.clone(),
        step: tally.step,
        total: job.spec.steps,
        train_tokens: tally.train_tokens,
        batcher: batcher.state(),
        losses: tally.losses.to_vec(),
        wall_s: tally.wall_s,
    };
    let state_path = tmp.join("state.json");
    let json = serde_json::to_vec_pretty(&st).map_err(|e| Error::Other(e.to_string()))?;
    fs::write(&state_path, json).map_err(|e| Error::io(&state_path, e))?;
    let cur = out.join("ckpt");
    let old = out.join("ckpt.old");
    if old.exists() {
        fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    if cur.exists() {
        fs::rename(&cur, &old).map_err(|e| Error::io(&cur, e))?;
    }
    fs::rename(&tmp, &cur).map_err(|e| Error::io(&tmp, e))?;
    if old.exists() {
        fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    Ok(())
}

/// Restores weights and optimizer state; refuses (before touching anything) a checkpoint whose
/// run key is not `run_key`.
fn load_checkpoint(
    dir: &Path,
    run_key: &str,
    named: &[(String, Var)],
    opt: &mut AdamW,
    device: &Device,
) -> Result<CkptState> {
    let state_path = dir.join("state.json");
    let text = fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let st: CkptState = serde_json::from_str(&text)
        .map_err(|e| Error::input(&state_path, format!("malformed checkpoint state: {e}")))?;
    if st.run_key != run_key {
        return Err(Error::input(
            &state_path,
            format!(
                "checkpoint belongs to run {} but this is run {run_key}: remove it or use another out dir",
                st.run_key
            ),
        ));
    }
    let model_path = dir.join("model.safetensors");
    let weights = candle_core::safetensors::load(&model_path, device)
        .map_err(|e| Error::input(&model_path, format!("cannot read checkpoint weights: {e}")))?;
    let weights: BTreeMap<String, Tensor> = weights.into_iter().collect();
    for (name, var) in named {
        let t = weights
            .get(name)
            .ok_or_else(|| Error::input(&model_path, format!("missing tensor {name}")))?;
        if t.dims() != var.dims() {
            return Err(Error::input(
                &model_path,
                format!(
                    "tensor {name} has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    opt.load(&dir.join("optimizer.safetensors"), device)?;
    Ok(st)
}
