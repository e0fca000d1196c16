//! The training loop on a tiny GPT-2 and real English text: loss goes down, frozen parameters stay
//! bit-identical, gradual unfreezing widens the trainable set at stage boundaries, discriminative
//! learning rates reach each group, a NaN is reported as divergence, and data-parallel ranks
//! (`train.ranks`) step exactly like one process accumulating their batches.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Barrier, Mutex};

use candle_core::{Device, Tensor};
use experiments::model::{Gpt2, Gpt2Config};
use experiments::tokenizer::Tok;
use experiments::train::{self, GradSync, TrainJob};
use experiments::trial::{Method, Progress, Schedule, TrainSpec};
use experiments::Error;

/// The opening of *Pride and Prejudice* (public domain).
const TEXT: &str = "It is a truth universally acknowledged, that a single man in possession of a good \
fortune, must be in want of a wife. However little known the feelings or views of such a man may be \
on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding \
families, that he is considered the rightful property of some one or other of their daughters. \
\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is let \
at last?\" Mr. Bennet replied that he had not. \"But it is,\" returned she; \"for Mrs. Long has just \
been here, and she told me all about it.\" Mr. Bennet made no answer. \"Do you not want to know who \
has taken it?\" cried his wife impatiently. \"You want to tell me, and I have no objection to \
hearing it.\" This was invitation enough. \"Why, my dear, you must know, Mrs. Long says that \
Netherfield is taken by a young man of large fortune from the north of England; that he came down \
on Monday in a chaise and four to see the place, and was so much delighted with it, that he agreed \
with Mr. Morris immediately; that he is to take possession before Michaelmas, and some of his \
servants are to be in the house by the end of next week.\" \"What is his name?\" \"Bingley.\" \"Is he \
married or single?\" \"Oh! Single, my dear, to be sure! A single man of large fortune; four or five \
thousand a year. What a fine thing for our girls!\" \"How so? How can it affect them?\" \"My dear Mr. \
Bennet,\" replied his wife, \"how can you be so tiresome! You must know that I am thinking of his \
marrying one of them.\" \"Is that his design in settling here?\" \"Design! Nonsense, how can you talk \
so! But it is very likely that he may fall in love with one of them, and therefore you must visit \
him as soon as he comes.\"";

struct Fixture {
    tokens: Vec<u32>,
    valid: Vec<u32>,
    cfg: Gpt2Config,
}

fn fixture() -> Fixture {
    let sentences: Vec<String> = TEXT.split_inclusive(". ").map(str::to_string).collect();
    let tok = Tok::train_bpe(&sentences, 300).unwrap();
    let all = tok.encode(TEXT).unwrap();
    let cut = all.len() * 9 / 10;
    Fixture {
        tokens: all[..cut].to_vec(),
        valid: all[cut..].to_vec(),
        cfg: Gpt2Config {
            vocab_size: tok.vocab_size(),
            n_positions: 32,
            n_embd: 32,
            n_layer: 2,
            n_head: 2,
            layer_norm_epsilon: 1e-5,
        },
    }
}

fn spec(steps: u64, lr: f64) -> TrainSpec {
    TrainSpec {
        steps,
        batch_size: 4,
        grad_accum: 1,
        lr,
        lr_factor: None,
        weight_decay: 0.0,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        clip_norm: None,
        eval_every: 0,
        eval_windows: 2,
        checkpoint_every: 0,
        ranks: 1,
    }
}

fn snapshot(model: &Gpt2) -> BTreeMap<String, Vec<f32>> {
    model
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

#[allow(clippy::too_many_arguments)]
fn run(
    model: &Gpt2,
    method: &Method,
    spec: &TrainSpec,
    groups: usize,
    fx: &Fixture,
    out: &Path,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<train::TrainReport, Error> {
    run_ranked(model, method, spec, groups, fx, out, on_progress, None)
}

/// [`run`] as one rank of a data-parallel group.
#[allow(clippy::too_many_arguments)]
fn run_ranked(
    model: &Gpt2,
    method: &Method,
    spec: &TrainSpec,
    groups: usize,
    fx: &Fixture,
    out: &Path,
    on_progress: &mut dyn FnMut(&Progress),
    sync: Option<&dyn GradSync>,
) -> Result<train::TrainReport, Error> {
    let stop = AtomicBool::new(false);
    let job = TrainJob {
        model,
        method,
        spec,
        groups,
        context: 16,
        seed: 1,
        train_tokens: &fx.tokens,
        valid_tokens: &fx.valid,
        out_dir: out,
        stop: &stop,
        device: &Device::Cpu,
        run_key: "test".into(),
        sync,
    };
    train::train(&job, on_progress)
}

#[test]
fn loss_decreases_on_english_text() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt2::new_random(&fx.cfg, 0, &Device::Cpu).unwrap();
    let mut s = spec(60, 3e-3);
    s.eval_every = 20;
    s.clip_norm = Some(1.0);
    s.schedule = Schedule::Cosine { min_ratio: 0.1 };
    s.warmup_steps = 5;
    let mut evals = vec![];
    let mut steps = 0;
    let report = run(
        &model,
        &Method::Pretrain { vocab_size: 300 },
        &s,
        3,
        &fx,
        dir.path(),
        &mut |p| match p {
            Progress::Eval { valid_loss, .. } => evals.push(*valid_loss),
            Progress::Step { tokens_per_sec, .. } => {
                assert!(*tokens_per_sec > 0.0);
                steps += 1
            }
            _ => {}
        },
    )
    .unwrap();
    assert_eq!(steps, 60);
    assert_eq!(report.steps, 60);
    assert_eq!(report.train_tokens, 60 * 4 * 16);
    let first: f64 = report.losses[..5].iter().map(|(_, l)| l).sum::<f64>() / 5.0;
    let last: f64 = report.losses[55..].iter().map(|(_, l)| l).sum::<f64>() / 5.0;
    // Starts near ln(V) ≈ 5.7 for a GPT-2 init; 60 steps on a tiny text must cut it well down.
    assert!(first > 5.0, "first losses {first}");
    assert!(last < first - 1.0, "loss {first} -> {last}");
    assert_eq!(evals.len(), 3);
    assert!(dir.path().join("ckpt/state.json").is_file());
}

#[test]
fn freeze_top_one_of_three_groups_keeps_the_rest_bit_identical() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt2::new_random(&fx.cfg, 0, &Device::Cpu).unwrap();
    let before = snapshot(&model);
    let s = spec(5, 1e-3);
    run(
        &model,
        &Method::Freeze { top: 1 },
        &s,
        3,
        &fx,
        dir.path(),
        &mut |_| {},
    )
    .unwrap();
    let after = snapshot(&model);
    // 2 blocks, 3 groups: group 0 = wte/wpe, group 1 = h.0, group 2 = h.1 + ln_f + tied head.
    for (name, b) in &before {
        let a = &after[name];
        let frozen = name.starts_with("h.0.") || name == "wpe.weight";
        if frozen {
            assert_eq!(a, b, "{name} is frozen but changed");
        } else {
            assert!(
                max_abs_diff(a, b) > 0.0,
                "{name} is trainable but did not change"
            );
        }
    }
    assert_eq!(
        train::count_trainable(&model, &Method::Freeze { top: 1 }, 3, 0).unwrap(),
        model
            .named_vars()
            .iter()
            .filter(|(n, _)| !(n.starts_with("h.0.") || n == "wpe.weight"))
            .map(|(_, v)| v.elem_count() as u64)
            .sum::<u64>()
    );
}

#[test]
fn gradual_unfreezing_widens_the_trainable_set_at_stage_boundaries() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt2::new_random(&fx.cfg, 0, &Device::Cpu).unwrap();
    let mut snaps = vec![snapshot(&model)];
    let s = spec(6, 1e-3);
    run(
        &model,
        &Method::Gradual { stage_steps: 2 },
        &s,
        3,
        &fx,
        dir.path(),
        &mut |p| {
            if let Progress::Step { .. } = p {
                snaps.push(snapshot(&model));
            }
        },
    )
    .unwrap();
    assert_eq!(snaps.len(), 7);
    let changed =
        |name: &str, step: usize| max_abs_diff(&snaps[step][name], &snaps[step - 1][name]) > 0.0;
    // Stage 0 (steps 1-2): top group only (h.1, ln_f, wte through the tied head).
    for step in 1..=2 {
        assert!(changed("h.1.mlp.c_fc.weight", step) && changed("ln_f.weight", step));
        assert!(changed("wte.weight", step));
        assert!(
            !changed("h.0.mlp.c_fc.weight", step),
            "h.0 trained in stage 0 (step {step})"
        );
        assert!(!changed("wpe.weight", step));
    }
    // Stage 1 (steps 3-4): h.0 joins.
    for step in 3..=4 {
        assert!(changed("h.0.mlp.c_fc.weight", step) && changed("h.1.attn.c_attn.weight", step));
        assert!(
            !changed("wpe.weight", step),
            "wpe trained in stage 1 (step {step})"
        );
    }
    // Stage 2 (steps 5-6): everything.
    for step in 5..=6 {
        assert!(changed("wpe.weight", step) && changed("h.0.ln_1.bias", step));
    }
}

/// First AdamW step with no weight decay moves every element with a non-zero gradient by
/// lr·g/(|g|+eps) ≈ ±lr, so the largest change in a parameter is its group's learning rate.
#[test]
fn discriminative_lr_reaches_each_group() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt2::new_random(&fx.cfg, 0, &Device::Cpu).unwrap();
    let before = snapshot(&model);
    let mut s = spec(1, 1e-3);
    s.lr_factor = Some(2.6);
    let mut lr_seen = 0.0;
    run(
        &model,
        &Method::Freeze { top: 3 },
        &s,
        3,
        &fx,
        dir.path(),
        &mut |p| {
            if let Progress::Step { lr, .. } = p {
                lr_seen = *lr;
            }
        },
    )
    .unwrap();
    assert!((lr_seen - 1e-3).abs() < 1e-12);
    let after = snapshot(&model);
    let expect = [
        ("wte.weight", 1e-3 / (2.6 * 2.6)),
        ("wpe.weight", 1e-3 / (2.6 * 2.6)),
        ("h.0.mlp.c_fc.weight", 1e-3 / 2.6),
        ("h.0.attn.c_attn.bias", 1e-3 / 2.6),
        ("h.1.mlp.c_proj.weight", 1e-3),
        ("ln_f.bias", 1e-3),
    ];
    for (name, lr) in expect {
        let d = max_abs_diff(&after[name], &before[name]);
        assert!(
            (d - lr).abs() < 0.01 * lr,
            "{name}: moved {d}, expected lr {lr}"
        );
    }
}

#[test]
fn nan_weights_are_reported_as_divergence() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt2::new_random(&fx.cfg, 0, &Device::Cpu).unwrap();
    let var = model.var("ln_f.weight").unwrap();
    let nan = Tensor::full(f32::NAN, var.dims(), &Device::Cpu).unwrap();
    var.set(&nan).unwrap();
    let err = run(
        &model,
        &Method::Freeze { top: 1 },
        &spec(3, 1e-3),
        3,
        &fx,
        dir.path(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::Diverged(_)), "{err}");
    assert!(err.to_string().contains("step 1"), "{err}");
}

#[test]
fn bad_group_settings_are_config_errors() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt2::new_random(&fx.cfg, 0, &Device::Cpu).unwrap();
    let err = run(
        &model,
        &Method::Freeze { top: 4 },
        &spec(1, 1e-3),
        3,
        &fx,
        dir.path(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("top = 4"), "{err}");
    let err = run(
        &model,
        &Method::Freeze { top: 1 },
        &spec(1, 1e-3),
        4,
        &fx,
        dir.path(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
}

/// Step-time measurement through the real loop (not a correctness test; run by hand):
/// `ABLATE_BENCH_PRESETS=tiny,gpt2 cargo test -p experiments --test training -- --ignored --nocapture step_time`
/// Batch 8 × context 128 for tiny, batch 4 × context 256 for gpt2 (facts.md's shapes), all layers
/// trained, AdamW, clipping; the first step (allocation warm-up) is reported separately.
#[test]
#[ignore]
fn step_time() {
    let presets = std::env::var("ABLATE_BENCH_PRESETS").unwrap_or_else(|_| "tiny".into());
    for preset in presets.split(',') {
        let cfg = Gpt2Config::preset(preset).expect("preset name");
        let (batch, context, steps) = if preset == "tiny" {
            (8, 128, 12)
        } else {
            (4, 256, 3)
        };
        let tokens: Vec<u32> = (0..(batch * context * (steps + 1) + 1) as u64)
            .map(|i| ((i * 2654435761) % cfg.vocab_size as u64) as u32)
            .collect();
        let fx = Fixture {
            tokens,
            valid: vec![],
            cfg: cfg.clone(),
        };
        let model = Gpt2::new_random(&cfg, 0, &Device::Cpu).unwrap();
        let mut s = spec(steps as u64, 1e-4);
        s.batch_size = batch;
        s.clip_norm = Some(1.0);
        s.weight_decay = 0.01;
        let dir = tempfile::tempdir().unwrap();
        let stop = AtomicBool::new(false);
        let mut times = vec![];
        let mut last = std::time::Instant::now();
        let job = TrainJob {
            model: &model,
            method: &Method::Pretrain {
                vocab_size: cfg.vocab_size,
            },
            spec: &s,
            groups: 4.min(cfg.n_layer + 1),
            context,
            seed: 1,
            train_tokens: &fx.tokens,
            valid_tokens: &fx.valid,
            out_dir: dir.path(),
            stop: &stop,
            device: &Device::Cpu,
            run_key: "bench".into(),
            sync: None,
        };
        let job = TrainJob {
            method: &Method::Pretrain {
                vocab_size: cfg.vocab_size,
            },
            ..job
        };
        let report = train::train(&job, &mut |p| {
            if let Progress::Step { .. } = p {
                times.push(last.elapsed().as_secs_f64());
                last = std::time::Instant::now();
            }
        })
        .unwrap();
        let t = &report.timing;
        let rest = &times[1..];
        let mean = rest.iter().sum::<f64>() / rest.len() as f64;
        println!(
            "{preset}: {} params, batch {batch} x context {context}: first step {:.2} s, then {mean:.3} s/step ({:.0} tokens/s) over {} steps",
            model.num_params(),
            times[0],
            (batch * context) as f64 / mean,
            rest.len()
        );
        println!(
            "  all {} steps: forward+backward {:.2} s, optimizer (clip + AdamW) {:.2} s, final checkpoint {:.2} s",
            times.len(),
            t.compute_s,
            t.optimizer_s,
            t.checkpoint_s
        );
    }
}

// ------------------------------------------------------------------ data parallelism (train.ranks)

/// Ranks as threads: each adds its gradients into a shared sum (f64, so the order the threads
/// arrive in does not change the result), waits for the others, then reads the mean.
struct ThreadGroup {
    world: usize,
    barrier: Barrier,
    sum: Mutex<(BTreeMap<String, Vec<f64>>, f64)>,
}

struct Rank<'a> {
    group: &'a ThreadGroup,
    rank: usize,
}

impl GradSync for Rank<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.group.world
    }
    fn all_reduce_mean(
        &self,
        grads: &mut BTreeMap<String, Tensor>,
        loss: &mut f64,
    ) -> Result<(), Error> {
        {
            let mut s = self.group.sum.lock().unwrap();
            for (name, g) in grads.iter() {
                let v = g.flatten_all()?.to_vec1::<f32>()?;
                let acc =
                    s.0.entry(name.clone())
                        .or_insert_with(|| vec![0.0; v.len()]);
                for (a, x) in acc.iter_mut().zip(v) {
                    *a += x as f64;
                }
            }
            s.1 += *loss;
        }
        self.group.barrier.wait();
        {
            let s = self.group.sum.lock().unwrap();
            let n = self.group.world as f64;
            for (name, g) in grads.iter_mut() {
                let mean: Vec<f32> = s.0[name].iter().map(|x| (x / n) as f32).collect();
                *g = Tensor::from_vec(mean, g.shape(), g.device())?;
            }
            *loss = s.1 / n;
        }
        // Everyone has read the sum before the next step's contributions start.
        if self.group.barrier.wait().is_leader() {
            let mut s = self.group.sum.lock().unwrap();
            s.0.clear();
            s.1 = 0.0;
        }
        self.group.barrier.wait();
        Ok(())
    }
}

fn dp_spec(grad_accum: usize, ranks: u32) -> TrainSpec {
    TrainSpec {
        batch_size: 2,
        grad_accum,
        weight_decay: 0.01,
        clip_norm: Some(1.0),
        ranks,
        ..spec(6, 3e-3)
    }
}

fn train_dp(
    model: &Gpt2,
    spec: &TrainSpec,
    fx: &Fixture,
    sync: Option<&dyn GradSync>,
) -> Result<train::TrainReport, Error> {
    let dir = tempfile::tempdir().unwrap();
    let method = Method::Freeze { top: 2 };
    run_ranked(model, &method, spec, 2, fx, dir.path(), &mut |_| {}, sync)
}

/// Two ranks with one micro-batch each compute exactly the step one process computes with
/// `grad_accum = 2`: each rank keeps its own batch of the step's draw and the gradients are
/// averaged across ranks before clipping and the update. The ranks are two threads joined by an
/// in-memory all-reduce; the worker's socket and NCCL collectives are tested through real
/// processes in the e2e suite.
#[test]
fn two_ranks_step_like_one_process_with_twice_the_accumulation() {
    let fx = fixture();
    let single = Gpt2::new_random(&fx.cfg, 7, &Device::Cpu).unwrap();
    let start = snapshot(&single);
    let one = train_dp(&single, &dp_spec(2, 1), &fx, None).unwrap();

    let group = ThreadGroup {
        world: 2,
        barrier: Barrier::new(2),
        sum: Mutex::new((BTreeMap::new(), 0.0)),
    };
    let models: Vec<Gpt2> = (0..2)
        .map(|_| Gpt2::new_random(&fx.cfg, 7, &Device::Cpu).unwrap())
        .collect();
    let reports: Vec<train::TrainReport> = std::thread::scope(|s| {
        let handles: Vec<_> = models
            .iter()
            .enumerate()
            .map(|(rank, m)| {
                let group = &group;
                let fx = &fx;
                s.spawn(move || {
                    let r = Rank { group, rank };
                    train_dp(m, &dp_spec(1, 2), fx, Some(&r)).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let w_single = snapshot(&single);
    let changed = start
        .iter()
        .map(|(n, w)| max_abs_diff(w, &w_single[n]))
        .fold(0.0, f64::max);
    assert!(changed > 1e-4, "training changed nothing");
    for (rank, (m, r)) in models.iter().zip(&reports).enumerate() {
        let w = snapshot(m);
        let d = w_single
            .iter()
            .map(|(n, x)| max_abs_diff(x, &w[n]))
            .fold(0.0, f64::max);
        println!("rank {rank}: max |w - w_single| = {d:e}");
        assert!(
            d <= 1e-6,
            "rank {rank} drifted from the single process by {d}"
        );
        assert_eq!(r.steps, one.steps);
        // Tokens count every rank's windows: the same global batch as the single process.
        assert_eq!(r.train_tokens, one.train_tokens, "rank {rank}");
        for ((s1, l1), (s2, l2)) in one.losses.iter().zip(&r.losses) {
            assert_eq!(s1, s2);
            assert!(
                (l1 - l2).abs() < 1e-6,
                "step {s1}: {l1} vs {l2} on rank {rank}"
            );
        }
    }
    // The two ranks really trained on different windows: one rank's loss alone differs from the
    // mean both report (checked by training rank 0's share without the other rank).
    let alone = Gpt2::new_random(&fx.cfg, 7, &Device::Cpu).unwrap();
    let half = train_dp(&alone, &dp_spec(1, 1), &fx, None).unwrap();
    assert!(
        (half.losses[0].1 - one.losses[0].1).abs() > 1e-6,
        "rank 0's batch alone gave the same first loss as both ranks together"
    );
}

#[test]
fn a_multi_rank_trial_needs_its_ranks() {
    let fx = fixture();
    let model = Gpt2::new_random(&fx.cfg, 7, &Device::Cpu).unwrap();
    let e = train_dp(&model, &dp_spec(1, 2), &fx, None).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(e.to_string().contains("ranks = 2"), "{e}");
}
