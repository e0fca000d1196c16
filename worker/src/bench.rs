//! `ablate-worker bench`: the time of one training step, split into forward, backward and optimizer,
//! on a randomly initialised GPT-2 or Llama and a synthetic token stream.
//!
//! It runs the pieces of [`experiments::train::train`] in the same order (model forward with the
//! method's trainable mask, cross-entropy, backward, gradient accumulation, clipping to norm 1,
//! AdamW), with nothing else around them (no evaluation, no checkpoints), so its numbers are the
//! per-step cost of a real trial. On the CPU that is the manual forward/backward of
//! `experiments::backward`; `ABLATE_AUTOGRAD=1` times candle's autograd instead.
//! `scripts/bench.sh` runs it interleaved with the same model in PyTorch
//! (`scripts/bench_torch.py`: transformers' `GPT2LMHeadModel` or `LlamaForCausalLM`, printing
//! the same JSON keys) and prints the ratio.
//!
//! Model FLOP/s is `6 · params · tokens / step time` (the usual estimate; attention scores and
//! frozen parts are not discounted, so a frozen run shows how much cheaper its step is).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use experiments::backward;
use experiments::data::Batcher;
use experiments::methods::{self, LayerGroups};
use experiments::model::{self, Gpt2Config, LlamaConfig, ModelConfig, RopeScaling};
use experiments::ops;
use experiments::optim::{self, AdamW, AdamWConfig, GradAccumulator, ParamUpdate};
use experiments::runner;
use experiments::train::{to_trainable, trainable_params};
use experiments::trial::{LoraTarget, Method};

/// Flags of `ablate-worker bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// GPT-2: `tiny` (4 blocks × 256 wide, 4 heads, vocab 8192; batch 8 × context 128: 5.3 M
    /// params), `gpt2` (124 M; batch 4 × context 256), `gpt2-medium` (355 M; batch 2 × 256).
    /// Llama: `tiny-llama` (tiny's size: 4 blocks × 256, 4 heads / 2 KV heads, intermediate 688,
    /// vocab 8192; batch 8 × 128), `smollm2` (SmolLM2-135M's shape, 134.5 M; batch 4 × 256).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Windows per step [default: the preset's].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Tokens per window [default: the preset's].
    #[arg(long)]
    pub context: Option<usize>,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (allocator and thread-pool warm-up).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Train only the top K of `--groups` layer groups (the `freeze` method); default: all.
    #[arg(long)]
    pub freeze_top: Option<usize>,
    /// Layer groups (embeddings + groups-1 block groups), as in a sweep file.
    #[arg(long, default_value_t = 4)]
    pub groups: usize,
    /// Train LoRA adapters of this rank (attention and MLP, alpha 16) instead of the weights (the
    /// `lora` method).
    #[arg(long, conflicts_with = "freeze_top")]
    pub lora_rank: Option<usize>,
    /// With `--lora-rank`: adapters only in the top K block groups [default: every block].
    #[arg(long, requires = "lora_rank")]
    pub lora_groups: Option<usize>,
    /// Compute threads (sets RAYON_NUM_THREADS before the pool starts) [default: candle's choice].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// The preset names `--preset` takes.
pub const PRESETS: &[&str] = &["tiny", "gpt2", "gpt2-medium", "tiny-llama", "smollm2"];

/// Model shape and batch of a bench preset.
pub fn preset(name: &str) -> Result<(ModelConfig, usize, usize)> {
    let (cfg, batch, context) = match name {
        // facts.md's "tiny" comparison model (not Gpt2Config's test-sized "tiny").
        "tiny" => (
            ModelConfig::Gpt2(Gpt2Config {
                vocab_size: 8192,
                n_positions: 128,
                n_embd: 256,
                n_layer: 4,
                n_head: 4,
                layer_norm_epsilon: 1e-5,
            }),
            8,
            128,
        ),
        "gpt2" => (
            ModelConfig::Gpt2(Gpt2Config::preset("gpt2").expect("preset")),
            4,
            256,
        ),
        "gpt2-medium" => (
            ModelConfig::Gpt2(Gpt2Config::preset("gpt2-medium").expect("preset")),
            2,
            256,
        ),
        // The Llama twin of `tiny`: same width, depth and vocabulary, SwiGLU at ~8/3 the width.
        "tiny-llama" => (
            ModelConfig::Llama(LlamaConfig {
                vocab_size: 8192,
                hidden_size: 256,
                intermediate_size: 688,
                num_hidden_layers: 4,
                num_attention_heads: 4,
                num_key_value_heads: 2,
                head_dim: 64,
                max_position_embeddings: 128,
                rms_norm_eps: 1e-5,
                rope_theta: 10000.0,
                rope_scaling: RopeScaling::None,
                tie_word_embeddings: true,
                bos_token_id: Some(1),
                eos_token_id: vec![2],
            }),
            8,
            128,
        ),
        "smollm2" => (
            ModelConfig::Llama(LlamaConfig::preset("smollm2").expect("preset")),
            4,
            256,
        ),
        other => bail!("--preset {other:?}: expected one of {}", PRESETS.join(", ")),
    };
    Ok((cfg, batch, context))
}

/// `cfg` with room for windows of `context` tokens.
fn with_context(cfg: ModelConfig, context: usize) -> ModelConfig {
    match cfg {
        ModelConfig::Gpt2(c) => ModelConfig::Gpt2(Gpt2Config {
            n_positions: c.n_positions.max(context),
            ..c
        }),
        ModelConfig::Llama(c) => ModelConfig::Llama(LlamaConfig {
            max_position_embeddings: c.max_position_embeddings.max(context),
            ..c
        }),
    }
}

/// Medians of one bench run, in seconds per optimizer step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub impl_name: &'static str,
    pub preset: String,
    pub params: usize,
    pub trainable_params: usize,
    pub batch: usize,
    pub context: usize,
    pub freeze_top: Option<usize>,
    /// `--lora-rank`, when LoRA adapters train instead of the weights.
    pub lora_rank: Option<usize>,
    pub groups: usize,
    pub threads: usize,
    pub steps: usize,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    pub step_s: f64,
    pub tokens_per_s: f64,
    pub model_gflops: f64,
    pub peak_rss_mib: f64,
    pub final_loss: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Peak resident memory of this process (VmHWM), MiB; NaN where /proc is missing.
pub fn peak_rss_mib() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return f64::NAN;
    };
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Runs the benchmark and prints its result.
pub fn run_bench(args: &BenchArgs) -> Result<()> {
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads 0: must be at least 1");
        }
        // Read by rayon and candle when their pools start, which has not happened yet.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    let r = bench(args)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "ablate {} ({} params, {} trainable), batch {} x context {}, {} threads, median of {} steps:",
            r.preset, r.params, r.trainable_params, r.batch, r.context, r.threads, r.steps
        );
        println!(
            "  forward {:.4} s  backward {:.4} s  optimizer {:.4} s  step {:.4} s",
            r.forward_s, r.backward_s, r.optimizer_s, r.step_s
        );
        println!(
            "  {:.0} tokens/s  {:.1} model GFLOP/s  peak memory {:.0} MiB  loss {:.4}",
            r.tokens_per_s, r.model_gflops, r.peak_rss_mib, r.final_loss
        );
    }
    Ok(())
}

/// One bench run: see the module doc.
pub fn bench(args: &BenchArgs) -> Result<BenchResult> {
    let (cfg, batch, context) = preset(&args.preset)?;
    let batch = args.batch.unwrap_or(batch);
    let context = args.context.unwrap_or(context);
    if batch == 0 || context == 0 || args.steps == 0 {
        bail!("--batch, --context and --steps must be at least 1");
    }
    // Longer windows than the preset's positions get a longer position table.
    let cfg = with_context(cfg, context);
    let dims = cfg.dims();
    let device = runner::parse_device(&args.device)?;
    let mut model = model::new_random(&cfg, 0, &device).context("building the model")?;
    let method = match (args.freeze_top, args.lora_rank) {
        (Some(top), _) => Method::Freeze { top },
        (None, Some(rank)) => Method::Lora {
            rank,
            alpha: 16.0,
            targets: vec![LoraTarget::Attn, LoraTarget::Mlp],
            groups: args.lora_groups,
        },
        (None, None) => Method::Pretrain {
            vocab_size: dims.vocab_size,
        },
    };
    let groups = methods::effective_groups(&method, args.groups, dims.n_layer);
    methods::validate(&method, groups, dims.n_layer)?;
    if let Some(spec) = methods::lora_spec(&method, groups, dims.n_layer)? {
        model.attach_lora(&spec, 0)?;
    }
    let model = &*model;
    let lg = LayerGroups::new(dims.n_layer, groups)?;
    let on = methods::active_groups(&method, groups, 0)?;
    let trainable = to_trainable(&lg.mask_for(&method, &on));
    let named = model.params();
    let lrs = vec![1e-4; groups];
    let only = methods::adapters_only(&method);
    let params = trainable_params(&named, &lg, &on, &lrs, only);
    let refs: Vec<(&str, &Var)> = params.iter().map(|(n, v, _)| (n.as_str(), v)).collect();
    let updates: Vec<ParamUpdate<'_>> = params
        .iter()
        .map(|(n, v, lr)| ParamUpdate {
            name: n.as_str(),
            var: v,
            lr: *lr,
        })
        .collect();
    let trainable_count: usize = params.iter().map(|(_, v, _)| v.elem_count()).sum();

    // A fixed pseudo-random token stream long enough for every step to see fresh windows.
    let total_steps = args.warmup + args.steps;
    let n_tokens = batch * context * total_steps.max(1) + 1;
    let vocab = dims.vocab_size as u64;
    let tokens: Vec<u32> = (0..n_tokens as u64)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) % vocab) as u32)
        .collect();
    let mut batcher = Batcher::new(&tokens, context, batch, 1)?;
    let mut opt = AdamW::new(AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    });
    let mut acc = GradAccumulator::new();
    let manual = backward::enabled(model);
    let (mut fwd, mut bwd, mut optm, mut tot) = (vec![], vec![], vec![], vec![]);
    let mut final_loss = f64::NAN;
    for i in 0..total_steps {
        let t0 = Instant::now();
        let (x, y) = batcher.next_batch();
        let ids = Tensor::from_vec(x, (batch, context), &device)?;
        let tgt = Tensor::from_vec(y, batch * context, &device)?;
        // What training runs: the manual CPU pass (experiments::backward) unless
        // ABLATE_AUTOGRAD=1 or off the CPU, then candle's autograd.
        let tape = if manual {
            backward::forward(model, &ids, &tgt, &trainable)?
        } else {
            None
        };
        let t1;
        if let Some(tape) = tape {
            final_loss = tape.loss();
            t1 = Instant::now();
            acc.add_named(tape.backward(model)?.grads, &refs)?;
        } else {
            let logits = model.forward_with(&ids, &trainable)?;
            let logits = logits.reshape((batch * context, dims.vocab_size))?;
            let loss = ops::cross_entropy(&logits, &tgt)?;
            final_loss = loss.to_scalar::<f32>()? as f64;
            device.synchronize()?;
            t1 = Instant::now();
            let grads = loss.backward()?;
            acc.add(&grads, &refs)?;
            drop(grads);
            drop((loss, logits));
        }
        device.synchronize()?;
        let t2 = Instant::now();
        let mut g = acc.finish()?;
        optim::clip_grad_norm(&mut g, 1.0)?;
        opt.step(&updates, &g)?;
        drop(g);
        device.synchronize()?;
        let t3 = Instant::now();
        if i >= args.warmup {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            optm.push((t3 - t2).as_secs_f64());
            tot.push((t3 - t0).as_secs_f64());
        }
    }
    let step_s = median(&mut tot);
    let params_all = model.num_params();
    let tokens_per_step = (batch * context) as f64;
    Ok(BenchResult {
        impl_name: "ablate",
        preset: args.preset.clone(),
        params: params_all,
        trainable_params: trainable_count,
        batch,
        context,
        freeze_top: args.freeze_top,
        lora_rank: args.lora_rank,
        groups,
        threads: candle_core::utils::get_num_threads(),
        steps: args.steps,
        forward_s: median(&mut fwd),
        backward_s: median(&mut bwd),
        optimizer_s: median(&mut optm),
        step_s,
        tokens_per_s: tokens_per_step / step_s,
        model_gflops: 6.0 * params_all as f64 * tokens_per_step / step_s / 1e9,
        peak_rss_mib: peak_rss_mib(),
        final_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(freeze_top: Option<usize>) -> BenchArgs {
        BenchArgs {
            preset: "tiny".into(),
            batch: Some(2),
            context: Some(16),
            steps: 2,
            warmup: 1,
            freeze_top,
            groups: 4,
            lora_rank: None,
            lora_groups: None,
            threads: None,
            json: true,
            device: "cpu".into(),
        }
    }

    #[test]
    fn bench_reports_positive_times_and_fewer_trainable_params_when_frozen() {
        let full = bench(&small(None)).unwrap();
        assert!(full.step_s > 0.0 && full.forward_s > 0.0 && full.backward_s > 0.0);
        assert!(full.optimizer_s > 0.0 && full.tokens_per_s > 0.0);
        assert_eq!(full.trainable_params, full.params);
        assert!(full.final_loss.is_finite());
        // Random init starts near ln(V).
        assert!((full.final_loss - (8192f64).ln()).abs() < 1.0, "{full:?}");
        let frozen = bench(&small(Some(1))).unwrap();
        assert!(frozen.trainable_params < full.trainable_params);
        assert!(frozen.trainable_params > 0);
        // LoRA r4 on the 4 × 256 model: per block (256+768)·4 + (256+256)·4 + (256+1024)·4 +
        // (1024+256)·4 adapter parameters, and the params count includes them.
        let mut a = small(None);
        a.lora_rank = Some(4);
        let lora = bench(&a).unwrap();
        assert_eq!(lora.trainable_params, 4 * 4 * (1024 + 512 + 1280 + 1280));
        assert_eq!(lora.params, full.params + lora.trainable_params);
        assert!(lora.final_loss.is_finite());
        assert!(peak_rss_mib() > 1.0);
    }

    #[test]
    fn bad_flags_are_errors() {
        let mut a = small(None);
        a.preset = "huge".into();
        assert!(bench(&a).unwrap_err().to_string().contains("--preset"));
        let mut a = small(Some(5));
        a.groups = 4;
        assert!(bench(&a).unwrap_err().to_string().contains("top = 5"));
        let mut a = small(None);
        a.batch = Some(0);
        assert!(bench(&a).unwrap_err().to_string().contains("--batch"));
    }
}
