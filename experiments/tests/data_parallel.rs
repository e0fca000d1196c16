//! Data-parallel training (`train.ranks`): two ranks with one micro-batch each compute exactly the
//! step one process computes with `grad_accum = 2`, because each rank keeps its own batch of the
//! step's draw and the gradients are averaged across ranks before clipping and the update.
//!
//! The ranks here are two threads of this test joined by an in-memory all-reduce, so the test
//! checks the training loop's side of the contract (batch sharding, where the mean is taken, what
//! every rank reports) without sockets or GPUs; the worker's socket and NCCL collectives are tested
//! through real processes in the e2e suite.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Barrier, Mutex};

use candle_core::{Device, Tensor};
use experiments::model::{Gpt2, Gpt2Config};
use experiments::tokenizer::Tok;
use experiments::train::{self, GradSync, TrainJob, TrainReport};
use experiments::trial::{Method, Schedule, TrainSpec};
use experiments::{Error, Result};

const TEXT: &str = "It is a truth universally acknowledged, that a single man in possession of a good \
fortune, must be in want of a wife. However little known the feelings or views of such a man may be \
on his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding \
families, that he is considered the rightful property of some one or other of their daughters. \
\"My dear Mr. Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is let \
at last?\" Mr. Bennet replied that he had not. \"But it is,\" returned she; \"for Mrs. Long has just \
been here, and she told me all about it.\" Mr. Bennet made no answer.";

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
    fn all_reduce_mean(&self, grads: &mut BTreeMap<String, Tensor>, loss: &mut f64) -> Result<()> {
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

fn setup() -> (Vec<u32>, Gpt2Config) {
    let sentences: Vec<String> = TEXT.split_inclusive(". ").map(str::to_string).collect();
    let tok = Tok::train_bpe(&sentences, 300).unwrap();
    let tokens = tok.encode(TEXT).unwrap();
    let cfg = Gpt2Config {
        vocab_size: tok.vocab_size(),
        n_positions: 32,
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
    };
    (tokens, cfg)
}

fn spec(grad_accum: usize, ranks: u32) -> TrainSpec {
    TrainSpec {
        steps: 6,
        batch_size: 2,
        grad_accum,
        lr: 3e-3,
        lr_factor: None,
        weight_decay: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        schedule: Schedule::Constant,
        warmup_steps: 0,
        clip_norm: Some(1.0),
        eval_every: 0,
        eval_windows: 2,
        checkpoint_every: 0,
        ranks,
    }
}

fn train_one(
    model: &Gpt2,
    spec: &TrainSpec,
    tokens: &[u32],
    sync: Option<&dyn GradSync>,
) -> Result<TrainReport> {
    let dir = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    let method = Method::Freeze { top: 2 };
    let job = TrainJob {
        model,
        method: &method,
        spec,
        groups: 2,
        context: 16,
        seed: 3,
        train_tokens: tokens,
        valid_tokens: &[],
        out_dir: dir.path(),
        stop: &stop,
        device: &Device::Cpu,
        run_key: "dp".into(),
        sync,
    };
    train::train(&job, &mut |_| {})
}

fn weights(model: &Gpt2) -> BTreeMap<String, Vec<f32>> {
    model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

fn max_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f32 {
    a.iter()
        .flat_map(|(n, x)| x.iter().zip(&b[n]).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn two_ranks_step_like_one_process_with_twice_the_accumulation() {
    let (tokens, cfg) = setup();
    let single = Gpt2::new_random(&cfg, 7, &Device::Cpu).unwrap();
    let start = weights(&single);
    let one = train_one(&single, &spec(2, 1), &tokens, None).unwrap();

    let group = ThreadGroup {
        world: 2,
        barrier: Barrier::new(2),
        sum: Mutex::new((BTreeMap::new(), 0.0)),
    };
    let models: Vec<Gpt2> = (0..2)
        .map(|_| Gpt2::new_random(&cfg, 7, &Device::Cpu).unwrap())
        .collect();
    let reports: Vec<TrainReport> = std::thread::scope(|s| {
        let handles: Vec<_> = models
            .iter()
            .enumerate()
            .map(|(rank, m)| {
                let group = &group;
                let tokens = &tokens;
                s.spawn(move || {
                    let r = Rank { group, rank };
                    train_one(m, &spec(1, 2), tokens, Some(&r)).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let w_single = weights(&single);
    assert!(
        max_diff(&start, &w_single) > 1e-4,
        "training changed nothing"
    );
    for (rank, (m, r)) in models.iter().zip(&reports).enumerate() {
        let d = max_diff(&w_single, &weights(m));
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
    let alone = Gpt2::new_random(&cfg, 7, &Device::Cpu).unwrap();
    let half = train_one(&alone, &spec(1, 1), &tokens, None).unwrap();
    assert!(
        (half.losses[0].1 - one.losses[0].1).abs() > 1e-6,
        "rank 0's batch alone gave the same first loss as both ranks together"
    );
}

#[test]
fn a_multi_rank_trial_needs_its_ranks() {
    let (tokens, cfg) = setup();
    let model = Gpt2::new_random(&cfg, 7, &Device::Cpu).unwrap();
    let e = train_one(&model, &spec(1, 2), &tokens, None).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e}");
    assert!(e.to_string().contains("ranks = 2"), "{e}");
}
