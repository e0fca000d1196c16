//! The ablate coordinator: gRPC services, the scheduler (a pure state machine), the SQLite store,
//! reports and the `ablate` command line. It never links candle: sweep files are parsed with the
//! `experiments` crate built without its `ml` feature.

pub mod auth;
pub mod backup;
pub mod cli;
pub mod cost;
pub mod export;
pub mod metrics;
pub mod plan;
pub mod progress;
pub mod report;
pub mod run;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod tensorboard;
pub mod tls;
