//! Sizes both sides must agree on: a message larger than the receiver's limit is refused with
//! `RESOURCE_EXHAUSTED`, so the coordinator's services and every client use these.

/// Largest gRPC message either side sends or accepts (decoding and encoding).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Bytes of artifact data in one `ArtifactChunk`, uploads and downloads alike: well under
/// [`MAX_MESSAGE_BYTES`], so a chunk with its names and digest always fits in a message.
pub const CHUNK_BYTES: usize = 1 << 20;

const _: () = assert!(CHUNK_BYTES * 2 <= MAX_MESSAGE_BYTES);
