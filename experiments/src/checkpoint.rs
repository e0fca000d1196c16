//! Hugging Face model directories in and out, for every model family; the implementation lives
//! in [`crate::model::hf`] (one layout per family), this module is the name the rest of ablate
//! and its users know.
//!
//! [`load_hf_dir`] reads `config.json`, dispatches on its `model_type` (GPT-2 or Llama) and
//! returns the model behind the [`crate::model::CausalLm`] seam; [`load_gpt2_dir`] and
//! [`load_llama_dir`] return the concrete family. [`save_hf_dir`] writes what transformers'
//! `from_pretrained` loads with the same logits.

pub use crate::model::hf::{load_gpt2_dir, load_hf_dir, load_llama_dir, read_config, save_hf_dir};
