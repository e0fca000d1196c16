//! The one error type of the wire conventions. Every variant is about input (a file, a URL, a
//! name) that retrying cannot fix; each names the file, flag or value at fault, never a token.

use std::path::PathBuf;

/// What is wrong with the text of a token (never shown: a token must not reach a log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenProblem {
    /// Nothing but whitespace: an empty token would silently switch authentication off.
    Empty,
    /// Whitespace or control characters between other characters: more than one token, or a
    /// file that is not a token file.
    InnerWhitespace,
    /// A character that cannot travel in a gRPC header (only visible ASCII can).
    NotHeaderSafe,
}

impl std::fmt::Display for TokenProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TokenProblem::Empty => "is empty",
            TokenProblem::InnerWhitespace => {
                "holds more than one token (whitespace or control characters inside)"
            }
            TokenProblem::NotHeaderSafe => {
                "holds characters that cannot travel in a gRPC header (only visible ASCII)"
            }
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        /// "token file", "--ca".
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {} {problem}", path.display())]
    TokenFile {
        path: PathBuf,
        problem: TokenProblem,
    },
    #[error("the token {0}")]
    Token(TokenProblem),
    #[error(
        "--ca {}: no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)",
        path.display()
    )]
    NotPem { path: PathBuf },
    #[error("--coordinator {url:?}: not a URL (expected http(s)://HOST:PORT): {source}")]
    BadUrl {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("--ca is set but the coordinator URL {url} is not https://: use https:// to talk TLS")]
    CaWithoutTls { url: String },
    #[error("TLS settings for {url}: {source}")]
    Tls {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("trial id {id:?}: must be 16 lowercase hex digits (what `TrialConfig::id` produces)")]
    TrialId { id: String },
    #[error("artifact name {name:?}: {why}")]
    ArtifactName { name: String, why: &'static str },
}
