//! `ablate-worker`: one process per GPU (or CPU). In remote mode it dials the coordinator, leases one
//! trial at a time and runs it with [`experiments::runner`]; its local subcommands run one trial,
//! evaluate or sample without any coordinator.

pub mod bench;
pub mod collective;
pub mod fleet;
pub mod local;
pub mod metrics;
pub mod preflight;
pub mod remote;
pub mod signals;
