//! Every integration test of `coordinator` in one test binary: each file under tests/ is a module
//! here. One binary links the dependencies once instead of once per file, which keeps a clean
//! `cargo test` build within CI's disk and time (a dozen copies of candle with debug info filled
//! the CI disk). Run one file's tests with `cargo test -p coordinator --test integration <file>::`.

mod cli;
mod fuzz;
mod report;
mod scheduler;
mod server;
mod store;
mod tensorboard;
mod tune;
