//! `experiments`: the ML and the experiment vocabulary of ablate, with no networking.
//!
//! Without the default `ml` feature only the vocabulary is compiled ([`trial`], [`spec`],
//! [`error`], [`gpus`], which finds GPUs without linking CUDA, and [`supervise`], the restart rule
//! for worker processes), which is what the coordinator depends on: it validates and expands sweep files but
//! never links candle. With `ml`: the model families (GPT-2, Llama) behind one seam, the fused ops
//! and the manual CPU backward, the data pipeline, methods, training and evaluation.

pub mod error;
pub mod gpus;
pub mod spec;
pub mod supervise;
pub mod trial;

#[cfg(feature = "ml")]
pub mod backward;
#[cfg(feature = "ml")]
pub mod checkpoint;
/// Corpus files and packages are candle-free (`ablate plan` checks them in the coordinator);
/// tokenising and batching need `ml`.
pub mod data;
#[cfg(feature = "ml")]
pub mod eval;
#[cfg(feature = "ml")]
pub mod gguf;
#[cfg(feature = "ml")]
pub mod hub;
#[cfg(feature = "ml")]
pub mod methods;
#[cfg(feature = "ml")]
pub mod model;
#[cfg(feature = "ml")]
pub mod ops;
#[cfg(feature = "ml")]
pub mod optim;
#[cfg(feature = "ml")]
pub mod runner;
#[cfg(feature = "ml")]
pub mod sample;
#[cfg(feature = "ml")]
pub mod tokenizer;
#[cfg(feature = "ml")]
pub mod train;

pub use error::{Error, Result};
