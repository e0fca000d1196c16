//! Exact resume: a run stopped half-way (stop flag) and continued from its checkpoint ends with the
//! same loss curve and bit-identical weights as a run that was never interrupted.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::Device;
use experiments::model::{CausalLm, Gpt2, Gpt2Config};
use experiments::train::{self, TrainJob, TrainReport};
use experiments::trial::{Method, Progress, Schedule, TrainSpec};
use experiments::Error;

fn tokens() -> Vec<u32> {
    // A deterministic stream with structure (a noisy repeating pattern) so the loss moves.
    let mut state = 11u64;
    (0..3000)
        .map(|i| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (state >> 60) == 0 {
                ((state >> 33) % 97) as u32
            } else {
                (i % 23) as u32 * 4
            }
        })
        .collect()
}

fn cfg() -> Gpt2Config {
    Gpt2Config {
        vocab_size: 97,
        n_positions: 32,
        n_embd: 32,
        n_layer: 2,
        n_head: 2,
        layer_norm_epsilon: 1e-5,
    }
}

/// Exercises every piece of state: gradual unfreezing (moments appear mid-run), discriminative
/// LR, cosine schedule with warmup, clipping, accumulation, decay, periodic checkpoints.
fn spec() -> TrainSpec {
    TrainSpec {
        steps: 12,
        batch_size: 3,
        grad_accum: 2,
        lr: 3e-3,
        lr_factor: Some(2.6),
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        schedule: Schedule::Cosine { min_ratio: 0.1 },
        warmup_steps: 2,
        clip_norm: Some(0.5),
        eval_every: 4,
        eval_windows: 2,
        checkpoint_every: 5,
        ranks: 1,
    }
}

const METHOD: Method = Method::Gradual { stage_steps: 4 };

fn run(
    model: &dyn CausalLm,
    toks: &[u32],
    out: &Path,
    stop: &AtomicBool,
    key: &str,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<TrainReport, Error> {
    run_method(model, &METHOD, toks, out, stop, key, on_progress)
}

fn run_method(
    model: &dyn CausalLm,
    method: &Method,
    toks: &[u32],
    out: &Path,
    stop: &AtomicBool,
    key: &str,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<TrainReport, Error> {
    let spec = spec();
    let job = TrainJob {
        model,
        method,
        spec: &spec,
        groups: 3,
        context: 16,
        seed: 5,
        train_tokens: &toks[..2500],
        valid_tokens: &toks[2500..],
        out_dir: out,
        stop,
        device: &Device::Cpu,
        run_key: key.into(),
        sync: None,
    };
    train::train(&job, on_progress)
}

fn weights(model: &dyn CausalLm) -> Vec<(String, Vec<u32>)> {
    model
        .named_vars()
        .into_iter()
        .map(|(n, v)| {
            let bits = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n, bits.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

#[test]
fn stopped_and_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let toks = tokens();
    let dev = Device::Cpu;

    let full_dir = tempfile::tempdir().unwrap();
    let full_model = Gpt2::new_random(&cfg(), 42, &dev).unwrap();
    let never = AtomicBool::new(false);
    let full = run(
        &full_model,
        &toks,
        full_dir.path(),
        &never,
        "k",
        &mut |_| {},
    )
    .unwrap();
    assert!(!full.stopped);
    assert_eq!(full.steps, 12);

    // Interrupted run: the flag is raised after step 6 (between steps, like SIGTERM would).
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt2::new_random(&cfg(), 42, &dev).unwrap();
    let stop = AtomicBool::new(false);
    let mut events = vec![];
    let first = run(&model, &toks, dir.path(), &stop, "k", &mut |p| {
        if let Progress::Step { step: 6, .. } = p {
            stop.store(true, Ordering::SeqCst);
        }
        events.push(p.clone());
    })
    .unwrap();
    assert!(first.stopped);
    assert_eq!(first.steps, 6);
    assert!(events.contains(&Progress::Checkpoint {
        step: 5,
        dir: "ckpt".into()
    }));
    assert_eq!(
        events.last(),
        Some(&Progress::Checkpoint {
            step: 6,
            dir: "ckpt".into()
        })
    );
    assert!(dir.path().join("ckpt/model.safetensors").is_file());
    assert!(!dir.path().join("ckpt.tmp").exists() && !dir.path().join("ckpt.old").exists());

    // A new process: fresh model object with *different* initial weights, to prove the
    // checkpoint's weights are what is used.
    let model2 = Gpt2::new_random(&cfg(), 7, &dev).unwrap();
    let go = AtomicBool::new(false);
    let mut resumed_steps = vec![];
    let second = run(&model2, &toks, dir.path(), &go, "k", &mut |p| {
        if let Progress::Step { step, .. } = p {
            resumed_steps.push(*step);
        }
    })
    .unwrap();
    assert_eq!(second.resumed_from, 6);
    assert_eq!(resumed_steps, (7..=12).collect::<Vec<_>>());
    assert_eq!(second.steps, 12);
    assert_eq!(second.train_tokens, full.train_tokens);
    // Same loss curve, exactly.
    assert_eq!(second.losses, full.losses);
    // Bit-identical weights.
    assert_eq!(weights(&model2), weights(&full_model));
}

#[test]
fn a_checkpoint_of_another_run_is_refused() {
    let toks = tokens();
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt2::new_random(&cfg(), 1, &Device::Cpu).unwrap();
    let stop = AtomicBool::new(true); // stop before the first step: checkpoint at step 0
    let r = run(&model, &toks, dir.path(), &stop, "trial-a", &mut |_| {}).unwrap();
    assert!(r.stopped && r.steps == 0);
    let go = AtomicBool::new(false);
    let other = Gpt2::new_random(&cfg(), 2, &Device::Cpu).unwrap();
    let before = weights(&other);
    let err = run(&other, &toks, dir.path(), &go, "trial-b", &mut |_| {}).unwrap_err();
    assert_eq!(
        weights(&other),
        before,
        "a refused checkpoint must not touch the model"
    );
    assert!(matches!(err, Error::Input { .. }), "{err}");
    assert!(err.to_string().contains("trial-a"), "{err}");
}

#[test]
fn a_corrupt_checkpoint_is_an_input_error_naming_the_file() {
    let toks = tokens();
    let dir = tempfile::tempdir().unwrap();
    let model = Gpt2::new_random(&cfg(), 1, &Device::Cpu).unwrap();
    let stop = AtomicBool::new(true);
    run(&model, &toks, dir.path(), &stop, "k", &mut |_| {}).unwrap();
    std::fs::write(
        dir.path().join("ckpt/model.safetensors"),
        b"not safetensors",
    )
    .unwrap();
    let go = AtomicBool::new(false);
    let err = run(&model, &toks, dir.path(), &go, "k", &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

/// A LoRA trial stopped mid-way resumes its adapters from the checkpoint: the same losses and
/// bit-identical adapters and (frozen) base as an uninterrupted run.
#[test]
fn a_stopped_lora_run_resumes_its_adapters_bit_identically() {
    use experiments::methods;
    use experiments::trial::LoraTarget;
    let method = Method::Lora {
        rank: 4,
        alpha: 8.0,
        targets: vec![LoraTarget::Attn, LoraTarget::Mlp],
        groups: Some(1),
    };
    let toks = tokens();
    let dev = Device::Cpu;
    let lora_model = |seed: u64| {
        let mut m: Box<dyn CausalLm> = Box::new(Gpt2::new_random(&cfg(), 42, &dev).unwrap());
        let spec = methods::lora_spec(&method, 3, cfg().n_layer)
            .unwrap()
            .unwrap();
        m.attach_lora(&spec, seed).unwrap();
        m
    };
    let never = AtomicBool::new(false);
    let full_dir = tempfile::tempdir().unwrap();
    let full_model = lora_model(1);
    let before = weights(&*full_model);
    let full = run_method(
        &*full_model,
        &method,
        &toks,
        full_dir.path(),
        &never,
        "l",
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(full.steps, 12);
    let after = weights(&*full_model);
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        // Only the adapters move (B from zero), every base weight stays as it was.
        assert_eq!(name.contains("lora_"), a != b, "{name}");
    }

    let dir = tempfile::tempdir().unwrap();
    let stop = AtomicBool::new(false);
    let first = run_method(
        &*lora_model(1),
        &method,
        &toks,
        dir.path(),
        &stop,
        "l",
        &mut |p| {
            if let Progress::Step { step: 6, .. } = p {
                stop.store(true, Ordering::SeqCst);
            }
        },
    )
    .unwrap();
    assert!(first.stopped && first.steps == 6);
    // Other adapter start values: what resumes is the checkpoint's.
    let model2 = lora_model(9);
    let second = run_method(
        &*model2,
        &method,
        &toks,
        dir.path(),
        &never,
        "l",
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(second.resumed_from, 6);
    assert_eq!(second.losses, full.losses);
    assert_eq!(weights(&*model2), after);
}
