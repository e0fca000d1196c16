//! The one error type of the crate. Each variant says what input was wrong, and
//! [`Error::is_deterministic`] tells a scheduler whether retrying could help.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A sweep or trial file is malformed: `file:line:col: message`.
    #[error("{file}:{line}:{col}: {msg}")]
    Spec {
        file: String,
        line: usize,
        col: usize,
        msg: String,
    },
    /// A configuration is inconsistent (e.g. freeze k larger than the groups).
    #[error("invalid config: {0}")]
    Config(String),
    /// An input file (checkpoint, config.json, tokenizer, corpus) is missing or malformed.
    #[error("{path}: {msg}")]
    Input { path: PathBuf, msg: String },
    /// Training produced NaN or infinite loss.
    #[error("diverged: {0}")]
    Diverged(String),
    /// The device ran out of memory.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// Installing a corpus package failed (network or client problem: may be transient).
    #[error("package {0}")]
    Package(String),
    /// The run was asked to stop (preemption, cancel).
    #[error("stopped")]
    Stopped,
    #[error("io error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[cfg(feature = "ml")]
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// True when running the same trial again would fail the same way (bad config, bad input,
    /// divergence); false for faults that a retry may survive (I/O, package install, OOM on a
    /// busy device).
    pub fn is_deterministic(&self) -> bool {
        matches!(
            self,
            Error::Spec { .. } | Error::Config(_) | Error::Input { .. } | Error::Diverged(_)
        )
    }

    /// Short machine-readable reason for the summary table.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Spec { .. } | Error::Config(_) => "bad_config",
            Error::Input { .. } => "bad_input",
            Error::Diverged(_) => "diverged",
            Error::OutOfMemory(_) => "out_of_memory",
            Error::Package(_) => "package",
            Error::Stopped => "stopped",
            Error::Io { .. } => "io",
            #[cfg(feature = "ml")]
            Error::Candle(_) => "compute",
            Error::Other(_) => "error",
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn input(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Input {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
