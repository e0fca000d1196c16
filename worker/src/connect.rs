//! How the worker reaches its coordinator: plain `http://`, or `https://` with rustls, trusting
//! the CA given with `--ca` (a self-signed or private CA: the usual case for a coordinator on a
//! rented machine) or, without it, the system's roots.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Read the PEM CA bundle of `--ca`; the error names the file.
pub fn read_ca(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading --ca {}", path.display()))?;
    let marker: &[u8] = b"-----BEGIN CERTIFICATE-----";
    if !pem.windows(marker.len()).any(|w| w == marker) {
        bail!(
            "--ca {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        );
    }
    Ok(pem)
}

/// The endpoint for `url` with the worker's connection settings (keep-alives so a silent network
/// cut is noticed; a connect timeout so an unreachable coordinator is a failed call, retried).
pub fn endpoint(url: &str, ca_pem: Option<&[u8]>) -> anyhow::Result<Endpoint> {
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|e| anyhow::anyhow!("--coordinator {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    match (url.starts_with("https://"), ca_pem) {
        (false, None) => Ok(ep),
        (false, Some(_)) => {
            bail!("--ca is set but --coordinator {url} is not https://: use https:// to talk TLS")
        }
        (true, ca) => {
            let tls = match ca {
                Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                None => ClientTlsConfig::new().with_native_roots(),
            };
            ep.tls_config(tls)
                .with_context(|| format!("TLS settings for --coordinator {url}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_tls_urls() {
        assert!(endpoint("http://10.0.0.1:7070", None).is_ok());
        assert!(endpoint("https://coord.example:7070", None).is_ok());
        let err = endpoint("http://10.0.0.1:7070", Some(b"x")).unwrap_err();
        assert!(format!("{err:#}").contains("not https://"), "{err:#}");
        assert!(endpoint("not a url", None).is_err());
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ca.pem");
        std::fs::write(&f, "hello").unwrap();
        let err = read_ca(&f).unwrap_err();
        assert!(format!("{err:#}").contains("ca.pem"), "{err:#}");
        assert!(read_ca(&d.path().join("missing.pem")).is_err());
    }
}
