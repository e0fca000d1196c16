//! ablate's gRPC protocol, generated from `ablate.proto` and re-exported. Nothing else lives here:
//! the coordinator and the worker convert these types to domain types at their service boundary.

/// Generated messages, clients (`worker_service_client`, `sweep_service_client`) and servers.
pub mod pb {
    tonic::include_proto!("ablate.v1");
}

/// `ablate.proto` as an encoded `FileDescriptorSet`, served by the coordinator's reflection
/// service so that generic clients (grpcurl, Python's reflection client) can call it.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ablate_descriptor");
