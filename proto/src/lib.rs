//! ablate's gRPC protocol, generated from `ablate.proto` and re-exported, with the few wire
//! conventions the coordinator, the `ablate` CLI and the worker must agree on, each written once:
//!
//! - [`auth`]: how a token file is read and the client-side `authorization: Bearer` interceptor;
//! - [`connect`]: the endpoint for a coordinator URL (plain or TLS with `--ca`) and the clients
//!   with the message limits applied;
//! - [`limits`]: message and chunk sizes;
//! - [`names`]: which trial ids and artifact names may become paths on either side.
//!
//! Nothing else lives here (no candle, no domain types): the coordinator and the worker convert
//! these messages to domain types at their service boundary.

pub mod auth;
pub mod connect;
mod error;
pub mod limits;
pub mod names;

pub use error::{Error, TokenProblem};

/// Generated messages, clients (`worker_service_client`, `sweep_service_client`) and servers.
pub mod pb {
    tonic::include_proto!("ablate.v1");
}

/// `ablate.proto` as an encoded `FileDescriptorSet`, served by the coordinator's reflection
/// service so that generic clients (grpcurl, Python's reflection client) can call it.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ablate_descriptor");

/// The version of the worker protocol both sides speak, sent in `RegisterRequest` and answered in
/// `RegisterResponse`. Raise it when a change makes an older worker and a newer coordinator (or
/// the reverse) misunderstand each other; the coordinator then refuses a worker that speaks
/// another version at registration, with a message that names both and what to upgrade.
pub const PROTOCOL_VERSION: u32 = 1;

/// The exit status of an `ablate-worker` that the coordinator refused for a reason restarting
/// cannot fix (another protocol version): `EX_CONFIG` from sysexits.h. The systemd unit lists it
/// in `RestartPreventExitStatus=`, `--all-gpus` and the Slurm script do not restart it.
pub const EXIT_CONFIG: u8 = 78;
