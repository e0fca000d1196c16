//! ablate's gRPC protocol, generated from `ablate.proto` and re-exported. Nothing else lives here:
//! the coordinator and the worker convert these types to domain types at their service boundary.

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
