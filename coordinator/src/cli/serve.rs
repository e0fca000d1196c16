//! `ablate serve`: the listen-address checks (a reachable coordinator needs tokens), the signals
//! that stop it, and starting the server on a bound listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ablate_proto::auth::read_token_file;
use anyhow::{bail, Context as _};

use super::ServeArgs;

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
