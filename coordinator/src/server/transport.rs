//! TLS accept with a handshake time limit, and the reload loops for certificates and tokens.

use super::*;

/// Accept TCP connections and hand the server those whose TLS handshake succeeded (each
/// handshake in a task of its own, with a time limit, so one slow client holds up nobody).
pub(super) fn tls_incoming(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> (
    ReceiverStream<Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, cause = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

/// Certificate rotation: re-read the certificate and key files every second and on SIGHUP; a
/// changed pair that loads (parses, and the key matches) is served to new connections, while
/// the connections already open keep theirs, so no worker is cut off. A pair that does not load
/// (one file written, not yet the other) changes nothing and is reported once.
pub(super) async fn tls_reload_loop(
    (cert, key): (PathBuf, PathBuf),
    mut current: crate::tls::TlsIdentity,
    served: Arc<crate::tls::ReloadableCert>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut bad = false;
    loop {
        tokio::select! {
            _ = async {
                match hup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
        let (Ok(c), Ok(k)) = (std::fs::read(&cert), std::fs::read(&key)) else {
            continue;
        };
        if c == current.cert_pem && k == current.key_pem {
            bad = false;
            continue;
        }
        let next = crate::tls::TlsIdentity {
            cert_pem: c,
            key_pem: k,
        };
        match served.set(&next) {
            Ok(()) => {
                tracing::info!(cert = %cert.display(), "TLS certificate changed: new connections get the new one, open ones keep theirs");
                current = next;
                bad = false;
            }
            Err(e) if !bad => {
                bad = true;
                tracing::warn!(cert = %cert.display(), key = %key.display(), cause = %format!("{e:#}"), "TLS certificate or key changed but does not load: still serving the previous one");
            }
            Err(_) => {}
        }
    }
}

/// Token rotation: re-read each token file every second and on SIGHUP; a token that changed
/// becomes current and the one it replaces stays valid for `overlap` (so the workers can be
/// given the new one while they train). A file that cannot be read or holds no valid token
/// (half written) changes nothing and is reported once until it is good again.
pub(super) async fn token_reload_loop(
    files: Vec<(PathBuf, RequireToken, &'static str)>,
    overlap: Duration,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut bad = vec![false; files.len()];
    loop {
        let by_signal = tokio::select! {
            _ = async {
                match hup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => true,
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            _ = stop.changed() => return,
        };
        if by_signal {
            tracing::info!("SIGHUP: re-reading the token files");
        }
        for (i, (path, auth, role)) in files.iter().enumerate() {
            match ablate_proto::auth::read_token_file(path) {
                Ok(t) => {
                    bad[i] = false;
                    if auth.rotate(&t, overlap) {
                        tracing::info!(
                            file = %path.display(), ?overlap,
                            "{role} token changed: the new one is in effect, the previous one is \
                             accepted for the overlap"
                        );
                    }
                }
                Err(e) if !bad[i] => {
                    bad[i] = true;
                    tracing::warn!(cause = %format!("{e:#}"), "{role} token file unreadable: keeping the current token");
                }
                Err(_) => {}
            }
        }
    }
}
