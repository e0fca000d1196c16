//! The single-trial commands of `ablate-worker`: `eval`, `train` and `sample`, which run without a
//! coordinator.
//!
//! They exist so one trial can be reproduced, debugged or timed by hand on any machine with the
//! exact code path a leased trial takes ([`experiments::runner::run_trial`] for `train`), and so a
//! researcher can score or sample any Hugging Face GPT-2 or Llama directory. Every bad input (missing file,
//! malformed config.json or trial file, wrong tensor shapes, impossible method settings) ends in
//! one error naming the input; nothing here panics on user input.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use experiments::data;
use experiments::eval;
use experiments::runner::{self, Outcome, TrialEnv};
use experiments::sample::{self, SampleOpts};
use experiments::trial::{CorpusSpec, DocSplit, Progress};

#[derive(clap::Subcommand, Debug, Clone)]
pub enum LocalCommand {
    /// Perplexity of a Hugging Face model directory (GPT-2 or Llama) on text files (the whole
    /// text is validation).
    Eval {
        /// Model directory: config.json, model.safetensors, tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// Text files, directories or glob patterns.
        #[arg(long, required = true, num_args = 1..)]
        data: Vec<String>,
        /// Evaluation window in tokens (default: the model's n_positions / max_position_embeddings).
        #[arg(long)]
        context: Option<usize>,
        /// Windows per forward pass.
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Print a JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Run one trial from a TOML file holding a resolved trial config; resumes from DIR/ckpt.
    Train {
        /// The trial config (a `TrialConfig` serialised as TOML).
        #[arg(long)]
        trial: PathBuf,
        /// Output directory: model/, ckpt/, metrics.json, samples.json.
        #[arg(long)]
        out: PathBuf,
        /// Cache for corpus packages, tokenizers and token streams.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// Model directory of the base trial, for trials with `base = { kind = "trial" }`.
        #[arg(long)]
        base: Option<PathBuf>,
        /// `cpu` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Generate text from a prompt (top-k / top-p sampling, seeded).
    Sample {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 40)]
        top_k: usize,
        #[arg(long, default_value_t = 0.9)]
        top_p: f64,
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long, default_value_t = 50)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Convert a llama.cpp GGUF file (Llama architecture) into a Hugging Face Llama directory:
    /// weights dequantized to f32, config.json from its metadata, tokenizer.json built as
    /// transformers' GGUF loader builds it.
    Import {
        /// The .gguf file.
        #[arg(long)]
        gguf: PathBuf,
        /// Directory to create (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
    /// Time one training step (forward, backward, optimizer) on a random GPT-2 or Llama; see
    /// README, Benchmarks.
    Bench(crate::bench::BenchArgs),
}

/// Runs one local command to completion.
pub fn run_local(cmd: LocalCommand) -> Result<()> {
    match cmd {
        LocalCommand::Eval {
            model,
            data,
            context,
            batch_size,
            json,
            device,
        } => eval_cmd(&model, &data, context, batch_size, json, &device),
        LocalCommand::Train {
            trial,
            out,
            cache,
            base,
            device,
        } => train_cmd(&trial, &out, cache, base, &device),
        LocalCommand::Sample {
            model,
            prompt,
            top_k,
            top_p,
            temperature,
            max_new_tokens,
            seed,
            device,
        } => {
            let opts = SampleOpts {
                max_new_tokens,
                temperature,
                top_k: (top_k > 0).then_some(top_k),
                top_p: (top_p != 1.0).then_some(top_p),
                seed,
            };
            sample_cmd(&model, &prompt, &opts, &device)
        }
        LocalCommand::Import { gguf, out } => import_cmd(&gguf, &out),
        LocalCommand::Bench(args) => crate::bench::run_bench(&args),
    }
}

fn import_cmd(gguf: &Path, out: &Path) -> Result<()> {
    let started = std::time::Instant::now();
    let r = experiments::gguf::import(gguf, out)?;
    let c = &r.config;
    let types: Vec<String> = r.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    println!(
        "imported {} -> {} in {:.1} s",
        gguf.display(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "llama: {} blocks, hidden {}, {} heads ({} KV), vocab {}, {} tied; {:.1} M parameters from {} tensors ({})",
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.vocab_size,
        if c.tie_word_embeddings { "head" } else { "head not" },
        r.n_params as f64 / 1e6,
        r.n_tensors,
        types.join(", ")
    );
    Ok(())
}

fn check_model_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        bail!("{}: model directory not found", dir.display());
    }
    Ok(())
}

fn eval_cmd(
    model_dir: &Path,
    paths: &[String],
    context: Option<usize>,
    batch_size: usize,
    json: bool,
    device: &str,
) -> Result<()> {
    let device = runner::parse_device(device)?;
    check_model_dir(model_dir)?;
    let (model, tok, _) = runner::load_base(model_dir, &device)?;
    let n_positions = model.dims().max_positions;
    let context = context.unwrap_or(n_positions);
    if context < 2 || context > n_positions {
        bail!(
            "--context {context}: must be between 2 and the model's {} ({n_positions})",
            model.family().positions_field()
        );
    }
    let spec = CorpusSpec {
        paths: paths.to_vec(),
        package: None,
        documents: DocSplit::File,
    };
    // No package is named, so the cache dir is never touched.
    let files = data::resolve_corpus(&spec, Path::new("."))?;
    let docs = data::load_documents(&files, &DocSplit::File)?;
    let mut tokens = Vec::new();
    for ids in tok.encode_batch(&docs)? {
        tokens.extend_from_slice(&ids);
        tokens.extend(tok.eot_id());
    }
    let r = eval::perplexity(&*model, &tokens, context, batch_size.max(1), None, &device)?;
    if json {
        let v = serde_json::json!({
            "perplexity": r.perplexity,
            "loss": r.loss,
            "nll": r.nll,
            "tokens": r.tokens,
            "chunks": r.chunks,
            "context": context,
            "files": files.len(),
        });
        println!("{v}");
    } else {
        println!("perplexity: {:.4}", r.perplexity);
        println!("loss: {:.6}", r.loss);
        println!("tokens: {}", r.tokens);
    }
    Ok(())
}

/// Default cache: `$ABLATE_CACHE`, else `$XDG_CACHE_HOME/ablate`, else `~/.cache/ablate`
/// (experiments::data::default_cache_dir, which `ablate plan` uses too).
pub fn default_cache_dir() -> PathBuf {
    experiments::data::default_cache_dir()
}

static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// SIGINT / SIGTERM set the trial's stop flag, so `train` checkpoints and exits cleanly; running
/// the same command again resumes.
fn install_stop_handler(stop: Arc<AtomicBool>) {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    std::thread::spawn(move || loop {
        if SIGNALLED.load(Ordering::SeqCst) {
            stop.store(true, Ordering::SeqCst);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    });
}

fn train_cmd(
    trial: &Path,
    out: &Path,
    cache: Option<PathBuf>,
    base: Option<PathBuf>,
    device: &str,
) -> Result<()> {
    let cfg = runner::read_trial_file(trial)?;
    let device = runner::parse_device(device)?;
    let stop = Arc::new(AtomicBool::new(false));
    install_stop_handler(stop.clone());
    let env = TrialEnv {
        device,
        base_dir: base,
        out_dir: out.to_path_buf(),
        cache_dir: cache.unwrap_or_else(default_cache_dir),
        stop,
        sync: None,
    };
    eprintln!("trial {} ({}) -> {}", cfg.name, cfg.id(), out.display());
    let outcome = runner::run_trial(&cfg, &env, &mut |p| eprintln!("{}", progress_line(p)))
        .with_context(|| format!("trial {}", trial.display()))?;
    match outcome {
        Outcome::Finished(m) => {
            println!("perplexity: {:.4}", m.perplexity);
            println!("metrics: {}", out.join("metrics.json").display());
            Ok(())
        }
        Outcome::Stopped { step } => {
            eprintln!("stopped at step {step}; run the same command again to resume");
            Ok(())
        }
        // Unreachable: a local run has no other ranks (train.ranks > 1 is refused before).
        Outcome::RankDone { steps } => {
            eprintln!("rank finished after {steps} steps");
            Ok(())
        }
    }
}

/// One human-readable line per progress event.
pub fn progress_line(p: &Progress) -> String {
    match p {
        Progress::Step {
            step,
            total,
            loss,
            lr,
            tokens_per_sec,
        } => {
            format!("step {step}/{total} loss {loss:.4} lr {lr:.3e} {tokens_per_sec:.0} tok/s")
        }
        Progress::Eval { step, valid_loss } => {
            format!(
                "eval step {step} valid_loss {valid_loss:.4} ppl {:.3}",
                valid_loss.exp()
            )
        }
        Progress::Checkpoint { step, dir } => format!("checkpoint step {step} -> {dir}"),
        Progress::Sample { prompt, text } => format!("sample {prompt:?} -> {text:?}"),
    }
}

fn sample_cmd(model_dir: &Path, prompt: &str, opts: &SampleOpts, device: &str) -> Result<()> {
    let device = runner::parse_device(device)?;
    check_model_dir(model_dir)?;
    let (model, tok, _) = runner::load_base(model_dir, &device)?;
    let ids = tok.encode(prompt)?;
    let ids = if ids.is_empty() {
        match tok.eot_id() {
            Some(e) => vec![e],
            None => bail!("--prompt is empty and the tokenizer has no <|endoftext|> to start from"),
        }
    } else {
        ids
    };
    let stops = runner::stop_tokens(&*model, &tok);
    let gen = sample::generate(&*model, &ids, opts, &stops)?;
    println!("{prompt}{}", tok.decode(&gen)?);
    Ok(())
}
