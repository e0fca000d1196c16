//! How a client reaches the coordinator, the same for the `ablate` CLI, the coordinator's own
//! clients (`ablate run`, tests) and the worker: plain `http://`, or `https://` with rustls,
//! trusting the CA given with `--ca` (a self-signed or private CA: the usual case for a
//! coordinator on a rented machine) or, without it, the system's roots. The clients carry a
//! [`BearerToken`] and the [`limits`](crate::limits) both sides agree on.

use std::path::Path;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::auth::BearerToken;
use crate::limits::MAX_MESSAGE_BYTES;
use crate::pb::sweep_service_client::SweepServiceClient;
use crate::pb::worker_service_client::WorkerServiceClient;
use crate::Error;

/// How long connecting may take before the call fails (and a retrying caller tries again).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A channel with the bearer token attached to every call.
pub type AuthChannel = InterceptedService<Channel, BearerToken>;

/// Read the PEM CA bundle of `--ca`; the error names the file.
pub fn read_ca(path: &Path) -> Result<Vec<u8>, Error> {
    let pem = std::fs::read(path).map_err(|source| Error::Read {
        what: "--ca",
        path: path.to_path_buf(),
        source,
    })?;
    let marker: &[u8] = b"-----BEGIN CERTIFICATE-----";
    if !pem.windows(marker.len()).any(|w| w == marker) {
        return Err(Error::NotPem {
            path: path.to_path_buf(),
        });
    }
    Ok(pem)
}

/// The endpoint for `url`: `http://` as is; `https://` trusting `ca_pem` when given, otherwise
/// the system's roots. A CA with an `http://` URL is refused rather than silently unused.
/// HTTP/2 keep-alives (also while idle) notice a silently cut network; the connect timeout makes
/// an unreachable coordinator a failed call.
pub fn endpoint(url: &str, ca_pem: Option<&[u8]>) -> Result<Endpoint, Error> {
    let ep = Endpoint::from_shared(url.to_string())
        .map_err(|source| Error::BadUrl {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    match (url.starts_with("https://"), ca_pem) {
        (false, None) => Ok(ep),
        (false, Some(_)) => Err(Error::CaWithoutTls {
            url: url.to_string(),
        }),
        (true, ca) => {
            let tls = match ca {
                Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
                None => ClientTlsConfig::new().with_native_roots(),
            };
            ep.tls_config(tls).map_err(|source| Error::Tls {
                url: url.to_string(),
                source,
            })
        }
    }
}

/// A `SweepService` client on `channel` sending `auth`, with the shared message limits.
pub fn sweep_client(channel: Channel, auth: BearerToken) -> SweepServiceClient<AuthChannel> {
    SweepServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A `WorkerService` client on `channel` sending `auth`, with the shared message limits.
pub fn worker_client(channel: Channel, auth: BearerToken) -> WorkerServiceClient<AuthChannel> {
    WorkerServiceClient::with_interceptor(channel, auth)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_follow_the_scheme() {
        assert!(endpoint("http://127.0.0.1:7070", None).is_ok());
        assert!(endpoint("https://coord.example:7070", None).is_ok());
        let pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(endpoint("https://10.0.0.1:7070", Some(pem)).is_ok());
        let err = endpoint("http://10.0.0.1:7070", Some(pem)).unwrap_err();
        assert!(err.to_string().contains("not https://"), "{err}");
        let err = endpoint("coord:7070 and more", None).unwrap_err();
        assert!(err.to_string().contains("not a URL"), "{err}");
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("ca.pem");
        std::fs::write(&f, "hello").unwrap();
        let err = read_ca(&f).unwrap_err().to_string();
        assert!(err.contains("ca.pem") && err.contains("no PEM"), "{err}");
        let err = read_ca(&d.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }
}
