//! The `ablate` command line: argument definitions (here) and the client commands (`submit`,
//! `status`, `list`, `cancel`, `report`) that talk to a running coordinator over gRPC, plus `serve`.
//!
//! `main.rs` only parses and dispatches; `ablate run` lives in [`crate::run`]. Defaults come from
//! flags, then the environment (`ABLATE_COORDINATOR`, `ABLATE_TOKEN_FILE`), then built-ins, so a
//! shell on an ops box can set the coordinator once. Tokens are read from files (never flags, which
//! show up in `ps`) and never printed.
//!
//! - [`client`]: the `SweepService` client and the domain views ([`TrialView`], [`SweepView`]) it
//!   converts the proto into; the one place in the command line that knows the proto types.
//! - [`commands`]: `submit`, `status` (and the watch loop), `list`, `cancel`, `drain`, `backup`,
//!   `restore`.
//! - [`report`]: fetching a sweep's events and writing its report (`ablate report`, `ablate run`).
//! - [`serve`]: `ablate serve`: listen-address checks, signals, the server on a bound listener.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub mod client;
pub mod commands;
pub mod report;
pub mod serve;

pub(crate) use client::{connect, status_error, wire_state};
pub use client::{Client, SubmitOutcome, SweepListing, SweepView, SweepWatch, TrialView};
pub use commands::{backup, cancel, drain, list, restore, status, submit, watch_sweep};
pub use report::{report, write_sweep_report};
pub use serve::{check_exposure, lease_ttl, resolve_listen, serve, serve_on, shutdown_signal};

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
    /// Print the trials a sweep file expands to and check what running it needs (corpora, base
    /// models, ranks against workers) without training anything; exit status 1 when a check fails.
    Plan(crate::plan::PlanArgs),
    /// Submit a sweep file to a coordinator (trials already present are not added again).
    Submit(SubmitArgs),
    /// Show the trials of a sweep (with --watch: until every trial has finished).
    Status(StatusArgs),
    /// List the sweeps a coordinator knows.
    List(ListArgs),
    /// Cancel a whole sweep or single trials.
    Cancel(CancelArgs),
    /// Copy a coordinator's state (SQLite online backup, artifacts, BACKUP.json with
    /// SHA-256s) into a new folder, while it runs; on the coordinator's host.
    Backup(BackupArgs),
    /// Put a backup into a new, empty state folder (checked against BACKUP.json first); then
    /// `ablate serve --state DIR`.
    Restore(RestoreArgs),
    /// Stop giving a worker trials: it finishes its trial (or, with --checkpoint, checkpoints
    /// it and gives it back), then exits 0. For maintenance and rolling upgrades.
    Drain(DrainArgs),
    /// Write the report of a sweep (report.html, summary.md/csv/json, curves.csv, samples.md,
    /// trials/).
    Report(ReportArgs),
    /// Copy the trained models of a sweep out as Hugging Face directories (OUT/<trial name>/),
    /// from a coordinator or, with --from, from an `ablate run` output folder.
    Export(crate::export::ExportArgs),
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
    /// Restarts in a row (1 s, 2 s, 4 s … apart) after which a local worker that keeps exiting is
    /// given up; a worker that ran five minutes starts a fresh count.
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
    /// Token rotation: the token files are re-read every second (and on SIGHUP); when one
    /// changes, the token it held is still accepted for this many seconds, time to give the
    /// workers (or clients) the new one.
    #[arg(long, default_value_t = 600)]
    pub token_overlap: u64,
    /// Seconds a lease lives without a heartbeat before its trial is re-queued.
    #[arg(long, default_value_t = 60)]
    pub lease_ttl: u64,
    /// Serve TLS with this PEM certificate chain (with --tls-key); clients then use https:// and
    /// `--ca` for a self-signed or private CA.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics (`GET /metrics`, plain HTTP) on this address, e.g. 127.0.0.1:9464.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Also serve only `grpc.health.v1.Health`, in plain HTTP/2, on this address (e.g.
    /// 0.0.0.0:7071): for Kubernetes gRPC probes, which cannot speak TLS to the main port.
    #[arg(long)]
    pub health_listen: Option<String>,
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
    /// PEM CA certificate to trust for an https:// coordinator (default: the system's roots).
    #[arg(long, env = "ABLATE_CA")]
    pub ca: Option<PathBuf>,
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
pub struct BackupArgs {
    /// The coordinator's state folder (its `serve --state`).
    #[arg(long)]
    pub state: PathBuf,
    /// The backup folder to create.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// A folder written by `ablate backup`.
    pub backup: PathBuf,
    /// The new state folder (must not hold a store).
    #[arg(long)]
    pub state: PathBuf,
}

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The worker's name (its --name; e.g. box1-gpu0).
    pub worker: String,
    /// Checkpoint the running trial now and give it back (another worker resumes it) instead of
    /// letting it finish.
    #[arg(long)]
    pub checkpoint: bool,
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
