//! Every integration test of `experiments` in one test binary: each file under tests/ is a module
//! here. One binary links the dependencies once instead of once per file, which keeps a clean
//! `cargo test` build within CI's disk and time (a dozen copies of candle with debug info filled
//! the CI disk). Run one file's tests with `cargo test -p experiments --test integration <file>::`.

mod common;
mod data;
mod fuzz;
mod gguf;
mod gradients;
mod manual_backward;
mod methods;
mod parity;
mod resume;
mod roundtrip;
mod tokenizer;
mod training;
mod trial_ids;
