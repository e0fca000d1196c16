//! The `ablate` command line: argument definitions and the client commands (`submit`, `status`,
//! `list`, `cancel`, `report`) that talk to a running coordinator over gRPC, plus `serve`.
//!
//! `main.rs` only parses and dispatches; `ablate run` lives in [`crate::run`]. Defaults come from
//! flags, then the environment (`ABLATE_COORDINATOR`, `ABLATE_TOKEN_FILE`), then built-ins, so a
//! shell on an ops box can set the coordinator once. Tokens are read from files (never flags, which
//! show up in `ps`) and never printed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Default coordinator address for the client commands.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

#[derive(Parser, Debug)]
#[command(
    name = "ablate",
    version,
    about = "Fine-tuning ablation sweeps of GPT-2-family models",
    long_about = "Fine-tuning ablation sweeps of GPT-2-family models.\n\n\
                  `ablate run SWEEP.toml` does the whole job on one machine: coordinator, local \
                  workers, live progress and the summary table."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a sweep on this machine: in-process coordinator, local workers, progress, report.
    Run(RunArgs),
    /// Run a long-lived coordinator that remote workers and clients connect to.
    Serve(ServeArgs),
    /// Submit a sweep file to a coordinator (trials already present are not added again).
    Submit(SubmitArgs),
    /// Show the trials of a sweep (with --watch: until every trial has finished).
    Status(StatusArgs),
    /// List the sweeps a coordinator knows.
    List(ListArgs),
    /// Cancel a whole sweep or single trials.
    Cancel(CancelArgs),
    /// Write the report of a sweep (summary.md/csv/json, curves.csv, samples.md, trials/).
    Report(ReportArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The sweep file (TOML).
    pub sweep: PathBuf,
    /// Number of CPU workers (default: min(2, cores)); with --device cuda, at most this many GPUs.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Output directory: report files, coordinator state (DIR/state), worker dirs and logs.
    /// Default: ablate-out/<sweep name>. Running again with the same DIR reuses finished trials.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu: N CPU workers; cuda: one worker per visible GPU (CUDA_VISIBLE_DEVICES or nvidia-smi).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Cache directory passed to the workers (corpus packages, token caches).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The ablate-worker binary (default: next to this executable, then PATH).
    #[arg(long, env = "ABLATE_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
    /// How often a worker that died unexpectedly is restarted, per worker.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: u32,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:7070 or 0.0.0.0:7070 (non-loopback needs tokens).
    #[arg(long)]
    pub listen: String,
    /// Directory for the SQLite store and trial artefacts.
    #[arg(long)]
    pub state: PathBuf,
    /// File holding the token workers must present.
    #[arg(long)]
    pub worker_token_file: Option<PathBuf>,
    /// File holding the token clients (submit, status, ...) must present.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Seconds a lease lives without a heartbeat before its trial is re-queued.
    #[arg(long, default_value_t = 60)]
    pub lease_ttl: u64,
}

/// How a client command reaches the coordinator.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Coordinator URL.
    #[arg(long, env = "ABLATE_COORDINATOR", default_value = DEFAULT_COORDINATOR)]
    pub coordinator: String,
    /// File holding the admin token.
    #[arg(long, env = "ABLATE_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    pub sweep: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// Sweep name or id.
    pub sweep: String,
    /// Keep showing progress until every trial has finished, then print the table.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    /// Sweep names/ids or trial ids.
    #[arg(required = true)]
    pub targets: Vec<String>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Sweep name or id.
    pub sweep: String,
    /// Directory to write the report into.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
}

/// Read a token file: surrounding whitespace is dropped; an empty file is an error (an empty
/// token would silently disable authentication). The error names the file, never the content.
pub fn read_token_file(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    if token.chars().any(|c| c.is_control() || c == ' ') {
        bail!(
            "token file {} holds more than one token (whitespace or control characters inside)",
            path.display()
        );
    }
    Ok(token.to_string())
}

/// Resolve `--listen`; hostnames (e.g. `localhost:7070`) are looked up.
pub async fn resolve_listen(addr: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("--listen {addr}: not an address (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("--listen {addr}: resolves to no address"))
}

/// A coordinator reachable from other machines must authenticate both kinds of peer: refuse a
/// non-loopback address unless both tokens are configured.
pub fn check_exposure(
    addr: SocketAddr,
    worker_token: bool,
    admin_token: bool,
) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || (worker_token && admin_token) {
        return Ok(());
    }
    let missing: Vec<&str> = [
        (!worker_token).then_some("--worker-token-file"),
        (!admin_token).then_some("--admin-token-file"),
    ]
    .into_iter()
    .flatten()
    .collect();
    bail!(
        "refusing to listen on {addr} without {}: a non-loopback address is reachable from other \
         machines, so workers and clients must authenticate (or listen on 127.0.0.1)",
        missing.join(" and ")
    )
}

/// The lease TTL as a duration, rejecting 0 (every lease would expire at once).
pub fn lease_ttl(secs: u64) -> anyhow::Result<Duration> {
    if secs == 0 {
        bail!("--lease-ttl must be at least 1 second");
    }
    Ok(Duration::from_secs(secs))
}
