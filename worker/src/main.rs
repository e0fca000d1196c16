//! `ablate-worker`: parse flags, set up tracing, hook signals, then run remote mode.
//!
//! One process per GPU (or CPU). The first SIGTERM/SIGINT asks the running trial to checkpoint and
//! report itself preempted, then the process exits 0 (spot machines get a short notice); a second
//! signal exits at once.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use worker::local::{run_local, LocalCommand};
use worker::remote::{run_remote, RemoteOpts};

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
    /// Coordinator URL, e.g. http://coord:7070 (remote mode).
    #[arg(long, env = "ABLATE_COORDINATOR")]
    coordinator: Option<String>,
    /// Device to train on: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
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
}

fn main() -> std::process::ExitCode {
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
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if let Some(cmd) = cli.local.take() {
        return run_local(cmd);
    }
    let opts = remote_opts(cli)?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        tokio::spawn(watch_signals(stop.clone()));
        run_remote(opts, stop).await
    })
}

fn remote_opts(cli: Cli) -> anyhow::Result<RemoteOpts> {
    let token = match &cli.token_file {
        None => None,
        Some(f) => Some(read_token(f)?),
    };
    let coordinator = cli.coordinator.context(
        "--coordinator URL (or $ABLATE_COORDINATOR) is required in remote mode; \
         or use a local subcommand (see --help)",
    )?;
    let cache_dir = cli.cache.unwrap_or_else(worker::local::default_cache_dir);
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let name = cli.name.unwrap_or_else(|| {
        let host = if host.is_empty() {
            "worker".to_string()
        } else {
            host
        };
        format!("{host}-{}", cli.device.replace(':', ""))
    });
    if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
        anyhow::bail!("--name {name:?}: must be non-empty and contain no path separators");
    }
    let work_dir = cli
        .work_dir
        .unwrap_or_else(|| cache_dir.join("work").join(&name));
    Ok(RemoteOpts {
        coordinator,
        device: cli.device,
        token,
        cache_dir,
        work_dir,
        name,
    })
}

/// A token file holds one token; surrounding whitespace is dropped. Errors name the file only.
fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let t = text.trim();
    if t.is_empty() {
        anyhow::bail!("token file {} is empty", path.display());
    }
    if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        anyhow::bail!("token file {} holds more than one token", path.display());
    }
    Ok(t.to_string())
}

async fn watch_signals(stop: Arc<AtomicBool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    let mut count = 0;
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        count += 1;
        if count == 1 {
            tracing::info!(
                "signal received: checkpointing and stopping (send again to exit at once)"
            );
            stop.store(true, Ordering::SeqCst);
        } else {
            tracing::warn!("second signal: exiting now");
            std::process::exit(130);
        }
    }
}
