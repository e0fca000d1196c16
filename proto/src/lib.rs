//! ablate's gRPC protocol, generated from `ablate.proto` and re-exported. Nothing else lives here:
//! the coordinator and the worker convert these types to domain types at their service boundary.

/// Generated messages, clients (`worker_service_client`, `sweep_service_client`) and servers.
pub mod pb {
    tonic::include_proto!("ablate.v1");
}
