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

use ablate_proto::auth::read_token_file;
use ablate_proto::connect::read_ca;
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

// ---------------------------------------------------------------------------------------------
// The client side: domain views of what the coordinator returns, and the commands built on them.
// ---------------------------------------------------------------------------------------------

use std::collections::HashMap;

use experiments::trial::{Progress, TrialConfig, TrialMetrics};

use crate::progress::{ProgressView, TrialStatus};
use crate::report::{is_terminal, SummaryRow, TrialEvents, TrialRecord};

/// One trial as `Get` reports it, converted from the proto at the boundary.
#[derive(Clone, Debug, Default)]
pub struct TrialView {
    pub id: String,
    pub name: String,
    pub family: String,
    /// Lower-case state: queued, waiting, running, finished, failed, cancelled.
    pub state: String,
    pub attempts: u32,
    pub config: Option<TrialConfig>,
    pub metrics: Option<TrialMetrics>,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub worker: Option<String>,
    pub step: u64,
    pub total: u64,
    pub loss: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    /// Unix ms; None when the coordinator sent 0 (never started / not finished).
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// Every attempt so far, for the cost table.
    pub attempt_spans: Vec<crate::cost::AttemptSpan>,
    /// Why a queued or waiting trial does not run yet (the coordinator's words).
    pub wait_reason: Option<String>,
    /// The tuner's rung decisions (`[tune]` sweeps).
    pub tune_rungs: Vec<crate::report_tune::TuneRung>,
}

impl TrialView {
    pub fn record(&self) -> TrialRecord {
        TrialRecord {
            id: self.id.clone(),
            config: self.config.clone(),
            name: self.name.clone(),
            state: self.state.clone(),
            attempts: self.attempts,
            metrics: self.metrics.clone(),
            reason: self.reason.clone(),
            message: self.message.clone(),
            worker: self.worker.clone(),
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
            attempt_spans: self.attempt_spans.clone(),
            price_per_hour: None,
            tune_rungs: self.tune_rungs.clone(),
            latest_step: self.step,
        }
    }

    pub fn status(&self) -> TrialStatus {
        TrialStatus {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state.clone(),
            attempts: self.attempts,
            step: self.step,
            total: self.total,
            loss: self.loss,
            tokens_per_sec: self.tokens_per_sec,
            perplexity: self.metrics.as_ref().map(|m| m.perplexity),
            wall_seconds: self.metrics.as_ref().map(|m| m.wall_seconds),
            reason: self.reason.clone(),
            message: self.message.clone(),
            worker: self.worker.clone(),
        }
    }
}

/// A sweep with all its trials.
#[derive(Clone, Debug, Default)]
pub struct SweepView {
    pub id: String,
    pub name: String,
    /// The sweep file as submitted.
    pub text: String,
    pub trials: Vec<TrialView>,
}

impl SweepView {
    pub fn all_terminal(&self) -> bool {
        self.trials.iter().all(|t| is_terminal(&t.state))
    }

    pub fn statuses(&self) -> Vec<TrialStatus> {
        self.trials.iter().map(TrialView::status).collect()
    }

    /// Records for the report; `local` fills configs the server did not return (ablate run has
    /// the parsed sweep at hand).
    pub fn records(&self, local: Option<&HashMap<String, TrialConfig>>) -> Vec<TrialRecord> {
        let price = self.price_per_hour();
        self.trials
            .iter()
            .map(|t| {
                let mut r = t.record();
                if r.config.is_none() {
                    r.config = local.and_then(|m| m.get(&t.id)).cloned();
                }
                r.price_per_hour = price;
                r
            })
            .collect()
    }

    /// The sweep file's `price_per_hour`, read back from the stored text (None when the text does
    /// not parse here, e.g. a sweep from a newer client).
    pub fn price_per_hour(&self) -> Option<f64> {
        let doc: toml::Table = self.text.parse().ok()?;
        let p = doc.get("price_per_hour")?;
        p.as_float()
            .or_else(|| p.as_integer().map(|i| i as f64))
            .filter(|p| p.is_finite() && *p >= 0.0)
    }
}

/// What `Submit` answered.
#[derive(Clone, Debug)]
pub struct SubmitOutcome {
    pub sweep_id: String,
    pub added: u64,
    pub already_present: u64,
}

/// One line of `ablate list`.
#[derive(Clone, Debug)]
pub struct SweepListing {
    pub id: String,
    pub name: String,
    pub summary: String,
}

/// Fetch every trial's recorded events and write the report files into `out`.
pub async fn write_sweep_report(
    client: &mut Client,
    sweep: &SweepView,
    local: Option<&HashMap<String, TrialConfig>>,
    out: &Path,
) -> anyhow::Result<Vec<SummaryRow>> {
    let mut events = Vec::with_capacity(sweep.trials.len());
    for t in &sweep.trials {
        let ev = client
            .events_timed(&t.id)
            .await
            .with_context(|| format!("fetching the events of trial {} ({})", t.name, t.id))?;
        events.push(TrialEvents {
            id: t.id.clone(),
            name: t.name.clone(),
            unix_ms: ev.iter().map(|(ms, _)| *ms).collect(),
            events: ev.into_iter().map(|(_, e)| e).collect(),
        });
    }
    let meta = crate::report::ReportMeta {
        sweep_name: sweep.name.clone(),
        sweep_id: sweep.id.clone(),
        sweep_text: sweep.text.clone(),
        generated_ms: crate::report::now_ms(),
    };
    crate::report_files::write_full_report(out, &meta, &sweep.records(local), &events)
}

/// Poll `Get` and show progress until every trial is terminal or `keep_going` says stop.
/// Returns the last snapshot.
pub async fn watch_sweep(
    client: &mut Client,
    sweep: &str,
    view: &mut ProgressView,
    mut keep_going: impl FnMut(&SweepView) -> anyhow::Result<bool>,
) -> anyhow::Result<SweepView> {
    let mut failures = 0u32;
    loop {
        match client.get(sweep).await {
            Ok(s) => {
                failures = 0;
                view.update(&s.statuses());
                if s.all_terminal() || !keep_going(&s)? {
                    return Ok(s);
                }
            }
            // A coordinator restart should not end a watch: retry for a while.
            Err(e) if failures < 30 => {
                failures += 1;
                tracing::warn!(cause = %e, "status poll failed; retrying");
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn token(conn: &Conn) -> anyhow::Result<Option<String>> {
    Ok(conn
        .token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?)
}

pub(crate) async fn connect(conn: &Conn) -> anyhow::Result<Client> {
    let ca = conn.ca.as_deref().map(read_ca).transpose()?;
    Client::connect_tls(&conn.coordinator, token(conn)?, ca.as_deref()).await
}

/// `ablate submit`.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let sweep = experiments::spec::load_sweep(&args.sweep)?;
    let mut client = connect(&args.conn).await?;
    let out = client.submit(&sweep).await?;
    println!(
        "sweep {} ({}): {} trials added, {} already present",
        sweep.name, out.sweep_id, out.added, out.already_present
    );
    Ok(())
}

/// `ablate status`: exit code 0; with --watch, waits until every trial is terminal.
pub async fn status(args: StatusArgs) -> anyhow::Result<u8> {
    let mut client = connect(&args.conn).await?;
    let sweep = if args.watch {
        let mut view = ProgressView::new(&args.sweep);
        let s = watch_sweep(&mut client, &args.sweep, &mut view, |_| Ok(true)).await?;
        view.finish();
        s
    } else {
        client.get(&args.sweep).await?
    };
    let rows = crate::report::summary_rows(&sweep.records(None));
    println!("sweep {} ({})", sweep.name, sweep.id);
    print!("{}", crate::report::to_terminal_table(&rows));
    let running: Vec<&TrialView> = sweep
        .trials
        .iter()
        .filter(|t| t.state == "running")
        .collect();
    for t in running {
        println!(
            "  {}: step {}/{}{}",
            t.name,
            t.step,
            t.total,
            t.loss
                .map_or_else(String::new, |l| format!(", loss {l:.3}"))
        );
    }
    for t in &sweep.trials {
        if let Some(why) = &t.wait_reason {
            println!("  {}: {}: {why}", t.name, t.state);
        }
    }
    Ok(0)
}

/// `ablate list`.
pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let sweeps = client.list().await?;
    if sweeps.is_empty() {
        println!("no sweeps");
    }
    for s in sweeps {
        println!("{}  {}  {}", s.id, s.name, s.summary);
    }
    Ok(())
}

/// `ablate cancel`.
pub async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let n = client.cancel(&args.targets).await?;
    println!("cancelled {n} trial(s) (trials depending on them end too)");
    Ok(())
}

/// `ablate backup`.
pub fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let s = crate::backup::backup(&args.state, &args.out)?;
    println!(
        "backed up {} to {}: {} files, {} bytes{} (manifest {})",
        args.state.display(),
        args.out.display(),
        s.files,
        s.bytes,
        if s.left_out > 0 {
            format!(
                "; {} artifact(s) deleted while copying left out (BACKUP.json left_out)",
                s.left_out
            )
        } else {
            String::new()
        },
        crate::backup::MANIFEST
    );
    Ok(())
}

/// `ablate restore`.
pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let m = crate::backup::restore(&args.backup, &args.state)?;
    println!(
        "restored {} files from {} (taken by ablate {} from {}) into {}; start the coordinator \
         with: ablate serve --state {}",
        m.files.len(),
        args.backup.display(),
        m.ablate_version,
        m.source,
        args.state.display(),
        args.state.display()
    );
    Ok(())
}

/// `ablate drain`.
pub async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let r = client.drain(&args.worker, args.checkpoint).await?;
    let what = if r.running.is_empty() {
        "it runs no trial: it exits at its next request for work".to_string()
    } else if args.checkpoint {
        format!(
            "it checkpoints {} and gives it back, then exits",
            r.running.join(", ")
        )
    } else {
        format!("it finishes {}, then exits", r.running.join(", "))
    };
    println!("drained worker {}: no new trials; {what}", args.worker);
    Ok(())
}

/// `ablate report`.
pub async fn report(args: ReportArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let sweep = client.get(&args.sweep).await?;
    let rows = write_sweep_report(&mut client, &sweep, None, &args.out).await?;
    print!("{}", crate::report::to_terminal_table(&rows));
    if let Some(t) = crate::report_tune::tuning(&sweep.records(None)) {
        println!("{}", crate::report_tune::tokens_line(&t));
    }
    eprintln!(
        "report written to {} (open {} in a browser)",
        args.out.display(),
        args.out.join("report.html").display()
    );
    Ok(())
}

/// `ablate serve`: refuses a non-loopback address without tokens, stops on SIGTERM/SIGINT.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let addr = resolve_listen(&args.listen).await?;
    let worker_token = args
        .worker_token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?;
    let admin_token = args
        .admin_token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?;
    check_exposure(addr, worker_token.is_some(), admin_token.is_some())?;
    let lease_ttl = lease_ttl(args.lease_ttl)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(crate::tls::TlsIdentity::from_files(c, k)?),
        _ => None,
    };
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(
            "serving without TLS on a non-loopback address: tokens cross the network in clear \
             text; pass --tls-cert and --tls-key"
        );
    }
    std::fs::create_dir_all(&args.state)
        .with_context(|| format!("creating state directory {}", args.state.display()))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    // The bound address goes to stdout (port 0 picks one) so scripts and tests can read it.
    println!("listening on {local}");
    tracing::info!(
        %local,
        state = %args.state.display(),
        worker_auth = worker_token.is_some(),
        admin_auth = admin_token.is_some(),
        tls = tls.is_some(),
        "coordinator started"
    );
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let opts = crate::server::ServeOpts {
        worker_token,
        admin_token,
        lease_ttl,
        tls,
        worker_token_file: args.worker_token_file.clone(),
        admin_token_file: args.admin_token_file.clone(),
        token_overlap: Duration::from_secs(args.token_overlap),
        tls_files: args.tls_cert.clone().zip(args.tls_key.clone()),
        ..crate::server::ServeOpts::new(args.state)
    };
    let health_listener = match &args.health_listen {
        Some(h) => {
            let haddr = resolve_listen(h).await?;
            let hl = std::net::TcpListener::bind(haddr)
                .with_context(|| format!("--health-listen {h}: binding {haddr}"))?;
            let bound = hl.local_addr().context("reading the health address")?;
            println!("health on {bound}");
            let _ = std::io::stdout().flush();
            Some(std::sync::Arc::new(hl))
        }
        None => None,
    };
    let opts = crate::server::ServeOpts {
        health_listener,
        ..opts
    };
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
    let metrics_task = match &args.metrics_listen {
        Some(m) => {
            let maddr = resolve_listen(m).await?;
            let ml = tokio::net::TcpListener::bind(maddr)
                .await
                .with_context(|| format!("--metrics-listen {m}: binding {maddr}"))?;
            let bound = ml.local_addr().context("reading the metrics address")?;
            println!("metrics on http://{bound}/metrics");
            let _ = std::io::stdout().flush();
            Some(tokio::spawn(crate::metrics::serve_metrics(
                ml,
                metrics.clone(),
                std::future::pending::<()>(),
            )))
        }
        None => None,
    };
    let result =
        crate::server::serve_with_metrics(listener, opts, metrics, shutdown_signal()).await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    result
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown requested");
}

// ---------------------------------------------------------------------------------------------
// gRPC: the one place that knows the proto types.
// ---------------------------------------------------------------------------------------------

use ablate_proto::auth::BearerToken;
use ablate_proto::connect::AuthChannel;
use ablate_proto::pb;
use pb::sweep_service_client::SweepServiceClient;

/// A `SweepService` client speaking in domain types.
pub struct Client {
    pub(crate) inner: SweepServiceClient<AuthChannel>,
    pub(crate) url: String,
}

/// Turn a gRPC status into an error a user can act on.
pub(crate) fn status_error(url: &str, what: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => anyhow::anyhow!(
            "{what}: the coordinator at {url} rejected the token ({}); check --token-file / \
             ABLATE_TOKEN_FILE",
            s.message()
        ),
        tonic::Code::Unavailable => anyhow::anyhow!(
            "{what}: the coordinator at {url} is unreachable ({}); check --coordinator / \
             ABLATE_COORDINATOR",
            s.message()
        ),
        code => anyhow::anyhow!("{what}: {code:?}: {}", s.message()),
    }
}

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn trial_view(t: pb::TrialStatus) -> anyhow::Result<TrialView> {
    let metrics = if t.metrics_json.is_empty() {
        None
    } else {
        Some(
            serde_json::from_str::<TrialMetrics>(&t.metrics_json).with_context(|| {
                format!("trial {}: malformed metrics from the coordinator", t.id)
            })?,
        )
    };
    // A config this build cannot read (a newer coordinator) still shows in the table.
    let config = serde_json::from_str::<TrialConfig>(&t.config_json).ok();
    let worker = match (opt(t.worker_name), opt(t.device_name)) {
        (Some(w), Some(d)) => Some(format!("{w} ({d})")),
        (w, d) => w.or(d),
    };
    let p = t.progress.unwrap_or_default();
    let has_progress = p.total > 0 || p.step > 0;
    Ok(TrialView {
        id: t.id,
        name: t.name,
        family: t.method,
        state: t.state.to_ascii_lowercase(),
        attempts: t.attempts,
        config,
        metrics,
        reason: opt(t.failure_reason),
        message: opt(t.failure_message),
        worker,
        step: p.step,
        total: p.total,
        loss: (has_progress && p.loss.is_finite()).then_some(p.loss),
        tokens_per_sec: (has_progress && p.tokens_per_sec > 0.0).then_some(p.tokens_per_sec),
        started_ms: (t.started_unix_ms > 0).then_some(t.started_unix_ms),
        finished_ms: (t.finished_unix_ms > 0).then_some(t.finished_unix_ms),
        wait_reason: opt(t.wait_reason),
        tune_rungs: crate::report_tune::parse_tune_json(&t.tune_json),
        attempt_spans: t
            .attempt_costs
            .into_iter()
            .map(|a| crate::cost::AttemptSpan {
                attempt: a.attempt,
                outcome: a.outcome,
                started_ms: a.started_unix_ms,
                ended_ms: (a.ended_unix_ms > 0).then_some(a.ended_unix_ms),
                devices: a.devices.max(1),
                device_kind: a.device_kind,
                price_per_hour: a.price_per_hour,
            })
            .collect(),
    })
}

impl Client {
    /// Connect to `url` (http://HOST:PORT) with an optional admin token.
    pub async fn connect(url: &str, token: Option<String>) -> anyhow::Result<Client> {
        Client::connect_tls(url, token, None).await
    }

    /// Connect to `url`; an `https://` URL trusts the PEM CA `ca_pem` (system roots if `None`).
    pub async fn connect_tls(
        url: &str,
        token: Option<String>,
        ca_pem: Option<&[u8]>,
    ) -> anyhow::Result<Client> {
        let auth = BearerToken::new(token.as_deref())?;
        let endpoint =
            ablate_proto::connect::endpoint(url, ca_pem)?.connect_timeout(Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the coordinator at {url}"))?;
        Ok(Client {
            inner: ablate_proto::connect::sweep_client(channel, auth),
            url: url.to_string(),
        })
    }

    pub async fn submit(
        &mut self,
        sweep: &experiments::spec::Sweep,
    ) -> anyhow::Result<SubmitOutcome> {
        let trials = sweep
            .trials
            .iter()
            .map(|t| pb::SubmittedTrial {
                id: t.id(),
                config_json: serde_json::to_string(t).expect("TrialConfig serialises"),
            })
            .collect();
        let r = self
            .inner
            .submit(pb::SubmitRequest {
                sweep_name: sweep.name.clone(),
                sweep_text: sweep.source.clone(),
                trials,
            })
            .await
            .map_err(|s| status_error(&self.url, "submit", s))?
            .into_inner();
        Ok(SubmitOutcome {
            sweep_id: r.sweep_id,
            added: r.added.len() as u64,
            already_present: r.already_present.len() as u64,
        })
    }

    pub async fn get(&mut self, sweep: &str) -> anyhow::Result<SweepView> {
        let r = self
            .inner
            .get(pb::GetRequest {
                sweep: sweep.to_string(),
            })
            .await
            .map_err(|s| status_error(&self.url, &format!("sweep {sweep}"), s))?
            .into_inner();
        Ok(SweepView {
            id: r.sweep_id,
            name: r.name,
            text: r.sweep_text,
            trials: r
                .trials
                .into_iter()
                .map(trial_view)
                .collect::<anyhow::Result<_>>()?,
        })
    }

    pub async fn list(&mut self) -> anyhow::Result<Vec<SweepListing>> {
        let r = self
            .inner
            .list(pb::ListRequest {})
            .await
            .map_err(|s| status_error(&self.url, "list", s))?
            .into_inner();
        Ok(r.sweeps
            .into_iter()
            .map(|s| SweepListing {
                summary: format!(
                    "{} trials: {} finished, {} failed, {} running, {} queued, {} cancelled{}",
                    s.trials,
                    s.finished,
                    s.failed,
                    s.running,
                    s.queued,
                    s.cancelled,
                    if s.stopped > 0 {
                        format!(", {} stopped by the tuner", s.stopped)
                    } else {
                        String::new()
                    }
                ),
                id: s.sweep_id,
                name: s.name,
            })
            .collect())
    }

    /// All recorded progress events of a trial, oldest attempt first. Events this build cannot
    /// parse are skipped rather than failing the whole report.
    pub async fn events(&mut self, trial: &str) -> anyhow::Result<Vec<Progress>> {
        Ok(self
            .events_timed(trial)
            .await?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    /// [`Client::events`] with the Unix ms at which the coordinator recorded each event.
    pub async fn events_timed(&mut self, trial: &str) -> anyhow::Result<Vec<(i64, Progress)>> {
        let r = self
            .inner
            .events(pb::EventsRequest {
                trial_id: trial.to_string(),
            })
            .await
            .map_err(|s| status_error(&self.url, &format!("events of {trial}"), s))?
            .into_inner();
        let mut events = r.events;
        events.sort_by_key(|e| (e.attempt, e.seq));
        Ok(events
            .iter()
            .filter_map(|e| {
                serde_json::from_str::<Progress>(&e.progress_json)
                    .ok()
                    .map(|p| (e.unix_ms, p))
            })
            .collect())
    }

    /// Drain the worker named `worker` (see `ablate drain`).
    pub async fn drain(
        &mut self,
        worker: &str,
        checkpoint: bool,
    ) -> anyhow::Result<pb::DrainResponse> {
        Ok(self
            .inner
            .drain(pb::DrainRequest {
                worker_name: worker.to_string(),
                checkpoint,
            })
            .await
            .map_err(|s| status_error(&self.url, &format!("drain {worker}"), s))?
            .into_inner())
    }

    /// Cancel sweeps (by id or name) and trials (by id); returns how many trials were cancelled.
    /// A target that `Get` knows as a sweep is cancelled as a sweep, anything else as a trial id.
    pub async fn cancel(&mut self, targets: &[String]) -> anyhow::Result<usize> {
        let mut sweeps = Vec::new();
        let mut trials = Vec::new();
        for t in targets {
            match self.get(t).await {
                Ok(_) => sweeps.push(t.clone()),
                Err(_) => trials.push(t.clone()),
            }
        }
        let mut cancelled = 0;
        for s in sweeps {
            let r = self
                .inner
                .cancel(pb::CancelRequest {
                    sweep: s.clone(),
                    trial_ids: vec![],
                })
                .await
                .map_err(|st| status_error(&self.url, &format!("cancel {s}"), st))?
                .into_inner();
            cancelled += r.cancelled.len();
        }
        if !trials.is_empty() {
            let r = self
                .inner
                .cancel(pb::CancelRequest {
                    sweep: String::new(),
                    trial_ids: trials,
                })
                .await
                .map_err(|st| status_error(&self.url, "cancel", st))?
                .into_inner();
            cancelled += r.cancelled.len();
        }
        Ok(cancelled)
    }
}

/// Start the coordinator on a bound listener until `shutdown` resolves.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    state_dir: PathBuf,
    worker_token: Option<String>,
    admin_token: Option<String>,
    lease_ttl: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let opts = crate::server::ServeOpts {
        worker_token,
        admin_token,
        lease_ttl,
        ..crate::server::ServeOpts::new(state_dir)
    };
    crate::server::serve(listener, opts, shutdown).await
}
