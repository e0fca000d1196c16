pub mod pb { tonic::include_proto!("ablate.v1"); }
