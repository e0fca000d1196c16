//! TLS for the coordinator's port (rustls with the ring provider, through tonic's `tls-ring`).
//!
//! The server side is a certificate chain and key in PEM files (`ablate serve --tls-cert --tls-key`).
//! The client side (CLI commands, tests, workers) is [`ablate_proto::connect::endpoint`]: it trusts
//! either the CA in a PEM file (`--ca`) or the system's roots when the URL is `https://`. Tokens travel in request headers, so a
//! coordinator reachable beyond loopback should use TLS: without it the tokens cross the network in
//! clear text (`ablate serve` warns).
//!
//! The server terminates TLS itself (tokio-rustls, HTTP/2 by ALPN) rather than through tonic's
//! `tls_config`, so that its certificate is a [`ReloadableCert`]: `ablate serve` swaps in a new
//! pair when the files change (or on SIGHUP) without closing the connections already open.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;

use anyhow::{bail, Context as _};
use tonic::transport::{Identity, ServerTlsConfig};

/// A PEM certificate chain and its private key, checked on load.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TlsIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Read `--tls-cert` and `--tls-key`; errors name the file and what is wrong with it.
    pub fn from_files(cert: &Path, key: &Path) -> anyhow::Result<TlsIdentity> {
        let cert_pem = std::fs::read(cert)
            .with_context(|| format!("reading TLS certificate {}", cert.display()))?;
        let key_pem =
            std::fs::read(key).with_context(|| format!("reading TLS key {}", key.display()))?;
        if !contains(&cert_pem, b"-----BEGIN CERTIFICATE-----") {
            bail!(
                "--tls-cert {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
                cert.display()
            );
        }
        if !contains(&key_pem, b"PRIVATE KEY-----") {
            bail!(
                "--tls-key {}: no PEM private key in it (expected -----BEGIN PRIVATE KEY-----)",
                key.display()
            );
        }
        let id = TlsIdentity { cert_pem, key_pem };
        // Build the server config once now, so a key that does not match or parse is reported
        // before anything is bound.
        id.server_config_checked().with_context(|| {
            format!(
                "--tls-cert {} / --tls-key {}",
                cert.display(),
                key.display()
            )
        })?;
        Ok(id)
    }

    /// tonic's server configuration for this identity.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }

    /// The certificate chain and key as rustls serves them; errors say what does not parse or
    /// match (never the key's bytes).
    pub fn certified_key(&self) -> anyhow::Result<CertifiedKey> {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("certificate: {e}"))?;
        if certs.is_empty() {
            bail!("certificate: no certificate in the PEM");
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| anyhow::anyhow!("key: {e}"))?;
        let signer = tokio_rustls::rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| anyhow::anyhow!("key: {e}"))?;
        let ck = CertifiedKey::new(certs, signer);
        ck.keys_match()
            .map_err(|e| anyhow::anyhow!("the key does not belong to the certificate: {e}"))?;
        Ok(ck)
    }

    fn server_config_checked(&self) -> anyhow::Result<()> {
        self.certified_key()?;
        tonic::transport::Server::builder()
            .tls_config(self.server_config())
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("unusable certificate or key: {e}"))
    }
}

/// The server certificate of a running coordinator: every new TLS handshake asks it, so a
/// certificate loaded later ([`ReloadableCert::set`]) reaches new connections while the ones
/// already open (workers mid-trial) go on with the certificate they started with.
#[derive(Debug)]
pub struct ReloadableCert(std::sync::RwLock<Arc<CertifiedKey>>);

impl ReloadableCert {
    pub fn new(id: &TlsIdentity) -> anyhow::Result<Arc<ReloadableCert>> {
        Ok(Arc::new(ReloadableCert(std::sync::RwLock::new(Arc::new(
            id.certified_key()?,
        )))))
    }

    /// Serve `id` to the handshakes from now on.
    pub fn set(&self, id: &TlsIdentity) -> anyhow::Result<()> {
        let k = Arc::new(id.certified_key()?);
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = k;
        Ok(())
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A rustls acceptor (HTTP/2 by ALPN) whose certificate comes from `cert`.
pub fn acceptor(cert: Arc<ReloadableCert>) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_certificate_and_key_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let (cert, key) = (d.path().join("server.pem"), d.path().join("server.key"));
        let err = TlsIdentity::from_files(&cert, &key).unwrap_err();
        assert!(format!("{err:#}").contains("server.pem"), "{err:#}");

        std::fs::write(&cert, "not a certificate").unwrap();
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = format!("{:#}", TlsIdentity::from_files(&cert, &key).unwrap_err());
        assert!(
            err.contains("--tls-cert") && err.contains("server.pem"),
            "{err}"
        );

        // PEM markers around garbage: refused before anything is bound, naming both files.
        std::fs::write(
            &cert,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = format!("{:#}", TlsIdentity::from_files(&cert, &key).unwrap_err());
        assert!(
            err.contains("server.pem") && err.contains("server.key"),
            "{err}"
        );
        // The key's bytes never appear in errors or Debug output.
        let id = TlsIdentity {
            cert_pem: b"c".to_vec(),
            key_pem: b"SECRET-KEY-BYTES".to_vec(),
        };
        assert!(!format!("{id:?}").contains("SECRET"));
    }
}
