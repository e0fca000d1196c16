//! `ablate-worker`: parse flags, set up tracing, hook signals, then run remote mode.
//!
//! One process per GPU (or CPU); `--all-gpus` starts and supervises one per visible GPU
//! ([`worker::fleet`]). The first SIGTERM/SIGINT asks the running trial to checkpoint and
//! report itself preempted, then the process exits 0 within its stop grace (`--stop-grace`); a
//! repeated SIGTERM is the same request, a later Ctrl-C exits at once ([`worker::signals`]).
//! SIGUSR1 drains: the running trial finishes, no new one is taken, the process exits 0.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use worker::local::{run_local, LocalCommand};
use worker::remote::{run_remote, RemoteOpts};

/// candle allocates a fresh buffer for every op; with glibc's malloc the large ones go back to the
/// kernel on free and page-fault back in on the next step (a quarter of a step's samples in a
/// profile). mimalloc keeps them; see [`keep_freed_memory`].
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `MIMALLOC_PURGE_DELAY=-1` unless the user set it: freed memory is never returned to the OS,
/// so a training step reuses the pages of the previous one. (The peak is unchanged: it is reached
/// inside every step anyway.) mimalloc reads its environment before `main`, hence the call.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (libmimalloc-sys does not name it).
        const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        // SAFETY: sets a process-wide option; called once at start, before other threads exist.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "ablate-worker",
    version,
    about = "Lease ablate trials from a coordinator and train them"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// Run one trial, evaluate or sample locally, without a coordinator.
    #[command(subcommand)]
    local: Option<LocalCommand>,
    /// Coordinator URL, e.g. http://coord:7070 or https://coord:7070 (remote mode).
    #[arg(long, env = "ABLATE_COORDINATOR")]
    coordinator: Option<String>,
    /// PEM CA certificate to trust for an https:// coordinator (default: the system's roots).
    #[arg(long, env = "ABLATE_CA")]
    ca: Option<PathBuf>,
    /// Device to train on: cpu or cuda:N (with CUDA_VISIBLE_DEVICES=K, cuda:0 is GPU K).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Start one worker per visible GPU (CUDA_VISIBLE_DEVICES, nvidia-smi -L or
    /// /proc/driver/nvidia/gpus) and supervise them; each is named <name>-gpu<id>.
    #[arg(long, conflicts_with = "device")]
    all_gpus: bool,
    /// File holding the worker token.
    #[arg(long, env = "ABLATE_WORKER_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Cache shared by the workers of a host (corpora, token caches, base models)
    /// [default: $ABLATE_CACHE, else $XDG_CACHE_HOME/ablate or ~/.cache/ablate].
    #[arg(long, env = "ABLATE_CACHE")]
    cache: Option<PathBuf>,
    /// This worker's scratch directory [default: <cache>/work/<name>].
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Name shown in status tables [default: <host>-<device>].
    #[arg(long)]
    name: Option<String>,
    /// With --all-gpus: restarts in a row after which a GPU whose worker keeps exiting is given
    /// up (the supervisor exits non-zero once every GPU is).
    #[arg(long, env = "ABLATE_MAX_RESTARTS", default_value_t = 5)]
    max_restarts: u32,
    /// What an hour of this worker's device costs (any currency; a 4-GPU machine at 8/h is 2
    /// per GPU worker): the report's cost table multiplies device-hours by it. With --all-gpus
    /// every GPU's worker gets it.
    #[arg(long, env = "ABLATE_PRICE_PER_HOUR", value_parser = parse_price)]
    price_per_hour: Option<f64>,
    /// After the first SIGTERM/SIGINT, exit within this long (60s, 1m30s) even if the checkpoint
    /// upload or the preempted report has not gone through: set it a little under the
    /// supervisor's stop timeout (systemd TimeoutStopSec, compose stop_grace_period, Kubernetes
    /// terminationGracePeriodSeconds, Slurm KillWait). With --all-gpus every child gets it.
    #[arg(long, env = "ABLATE_STOP_GRACE", default_value_t = worker::signals::StopGrace::default())]
    stop_grace: worker::signals::StopGrace,
    /// Serve `/ready`, `/healthz` and Prometheus `/metrics` (plain HTTP) on this address, e.g.
    /// 0.0.0.0:9465 (port 0: a free port, named in the log). `/ready` answers 200 once registered
    /// and until a drain or stop. With --all-gpus the worker of the i-th GPU listens on port+i.
    #[arg(long, env = "ABLATE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Start even when the preflight finds this machine's NVIDIA driver, GPUs or glibc wrong for
    /// this build (the worker would fail later, inside CUDA).
    /// (The variable takes 1/0, true/false, yes/no, on/off.)
    #[arg(long, env = "ABLATE_SKIP_PREFLIGHT", value_parser = clap::builder::BoolishValueParser::new())]
    skip_preflight: bool,
}

fn parse_price(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if p.is_finite() && p >= 0.0 => Ok(p),
        _ => Err(format!("{s:?} is not a price (a number >= 0, e.g. 2.49)")),
    }
}

/// candle's element-wise ops run on its own spin-waiting thread pool, next to rayon's pool that
/// runs the matmuls and the fused kernels: after every op its workers spin 25,000 rounds before
/// parking, taking the cores the other pool needs. On a 2-core machine shared with other work
/// that spinning was a quarter of all samples of a training step (README, Benchmarks); 100 rounds
/// keeps the hand-off fast without it. Unless the user set the variable.
fn short_thread_spin() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Before any thread exists (the pool reads it when it starts).
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "100");
    }
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    short_thread_spin();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match real_main() {
        // The trial thread may still be unwinding after a stop; exit without waiting for it.
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<worker::remote::Refused>().is_some()
                || e.downcast_ref::<worker::preflight::Mismatch>().is_some()
            {
                // Restarting cannot help (version skew, the wrong machine or image): say so to
                // the supervisor.
                return std::process::ExitCode::from(ablate_proto::EXIT_CONFIG);
            }
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if let Some(cmd) = cli.local.take() {
        return run_local(cmd);
    }
    // Before registering: a machine that cannot run this build should say why now, not fail
    // inside CUDA minutes into a trial.
    if !cli.skip_preflight {
        worker::preflight::run(if cli.all_gpus { "all" } else { &cli.device })?;
    }
    if cli.all_gpus {
        if let Some(p) = cli.price_per_hour {
            // The children read it from the environment they inherit (no thread runs yet).
            std::env::set_var("ABLATE_PRICE_PER_HOUR", p.to_string());
        }
        let opts = fleet_opts(cli)?;
        let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
        return rt.block_on(worker::fleet::run_fleet(
            opts,
            experiments::gpus::visible_gpus(),
        ));
    }
    let metrics_listen = cli.metrics_listen.clone();
    let opts = remote_opts(cli)?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        if let Some(addr) = &metrics_listen {
            let l = tokio::net::TcpListener::bind(addr.as_str())
                .await
                .with_context(|| format!("--metrics-listen {addr}: binding"))?;
            let bound = l.local_addr().context("reading the metrics address")?;
            tracing::info!("metrics on http://{bound}/metrics (and /ready, /healthz)");
            tokio::spawn(worker::metrics::serve(
                l,
                opts.metrics.clone(),
                std::future::pending::<()>(),
            ));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let drain = Arc::new(AtomicBool::new(false));
        tokio::spawn(watch_signals(stop.clone(), drain.clone()));
        run_remote(opts, stop, drain).await
    })
}

const NEED_COORDINATOR: &str = "--coordinator URL (or $ABLATE_COORDINATOR) is required in \
                                remote mode; or use a local subcommand (see --help)";

fn fleet_opts(cli: Cli) -> anyhow::Result<worker::fleet::FleetOpts> {
    // Check what each child would check, once, before starting any.
    if let Some(f) = &cli.token_file {
        ablate_proto::auth::read_token_file(f)?;
    }
    let ca_pem = cli
        .ca
        .as_deref()
        .map(ablate_proto::connect::read_ca)
        .transpose()?;
    let coordinator = cli.coordinator.context(NEED_COORDINATOR)?;
    ablate_proto::connect::endpoint(&coordinator, ca_pem.as_deref())?;
    let name = cli
        .name
        .unwrap_or_else(|| worker::remote::hostname().unwrap_or_else(|| "worker".into()));
    check_name(&name)?;
    Ok(worker::fleet::FleetOpts {
        coordinator,
        token_file: cli.token_file,
        ca: cli.ca,
        cache: cli.cache,
        work_dir: cli.work_dir,
        name,
        max_restarts: cli.max_restarts,
        stop_grace: cli.stop_grace.0,
        metrics_listen: cli.metrics_listen,
        skip_preflight: cli.skip_preflight,
    })
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
        anyhow::bail!("--name {name:?}: must be non-empty and contain no path separators");
    }
    Ok(())
}

fn remote_opts(cli: Cli) -> anyhow::Result<RemoteOpts> {
    let token = match &cli.token_file {
        None => None,
        Some(f) => Some(ablate_proto::auth::read_token_file(f)?),
    };
    let ca_pem = cli
        .ca
        .as_deref()
        .map(ablate_proto::connect::read_ca)
        .transpose()?;
    let coordinator = cli.coordinator.context(NEED_COORDINATOR)?;
    let cache_dir = cli.cache.unwrap_or_else(worker::local::default_cache_dir);
    let name = cli.name.unwrap_or_else(|| {
        let host = worker::remote::hostname().unwrap_or_else(|| "worker".into());
        format!("{host}-{}", cli.device.replace(':', ""))
    });
    check_name(&name)?;
    let work_dir = cli
        .work_dir
        .unwrap_or_else(|| cache_dir.join("work").join(&name));
    Ok(RemoteOpts {
        metrics: worker::metrics::WorkerMetrics::new(&name, &cli.device),
        name,
        coordinator,
        ca_pem,
        device: cli.device,
        token,
        token_file: cli.token_file.clone(),
        cache_dir,
        work_dir,
        price_per_hour: cli.price_per_hour.unwrap_or(0.0),
        stop_grace: cli.stop_grace.0,
    })
}

async fn watch_signals(stop: Arc<AtomicBool>, drain: Arc<AtomicBool>) {
    use tokio::signal::unix::{signal, SignalKind};
    use worker::signals::{Signal, StopAction};
    let (Ok(mut term), Ok(mut int), Ok(mut usr1)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    // Slurm signals every process of a job and a supervisor forwards its own copy: a repeated
    // SIGTERM is the same request (worker::signals); only a later Ctrl-C exits at once.
    let mut stops = worker::signals::StopSignals::new();
    loop {
        let sig = tokio::select! {
            _ = term.recv() => Signal::Term,
            _ = int.recv() => Signal::Int,
            _ = usr1.recv() => {
                // Drain: finish the running trial, take no new one, exit 0.
                tracing::info!("SIGUSR1: draining (finishing the running trial, taking no new one, then exiting)");
                drain.store(true, Ordering::SeqCst);
                continue;
            }
        };
        match stops.received(sig, std::time::Instant::now()) {
            StopAction::Stop => {
                tracing::info!(
                    signal = ?sig,
                    "stop signal: checkpointing and stopping within the stop grace (Ctrl-C again \
                     after {:?} exits at once)",
                    worker::signals::REPEAT_WINDOW
                );
                stop.store(true, Ordering::SeqCst);
            }
            StopAction::Repeat => {
                tracing::info!(signal = ?sig, "the same stop request again: already stopping");
            }
            StopAction::ExitNow => {
                tracing::warn!("another Ctrl-C: exiting now, without a checkpoint");
                std::process::exit(130);
            }
        }
    }
}
