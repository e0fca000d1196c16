//! Sweep files: TOML → validated, expanded [`TrialConfig`]s with stable ids.
//!
//! A sweep names one base model (a Hugging Face GPT-2 directory, or a `pretrain` stage that trains a
//! small base inside the same sweep), one fine-tuning data set, training defaults, the layer-group
//! count, and a grid of methods crossed with seeds and discriminative-LR factors. The expansion is
//! deterministic, and each trial's id is a hash of its fully resolved config (see
//! [`TrialConfig::id`]), so submitting the same sweep twice adds nothing and an edited sweep only
//! adds the trials that changed.
//!
//! Every error names the file, line and column of the offending value. The format is documented by
//! `experiments/sweeps/quickstart.toml` (commented) and in the README.
//!
//! ```toml
//! name = "my-sweep"
//! [base]                      # either a Hugging Face GPT-2 directory ...
//! path = "/models/gpt2"
//! # [base.pretrain]           # ... or a pretrain stage (see quickstart.toml)
//! [data]
//! paths = ["corpus/*.txt"]
//! context = 256
//! [train]
//! steps = 1000
//! lr = 1e-4
//! [methods]
//! baseline = true
//! freeze = [1, 2, 3, "all"]
//! gradual = true
//! inheritune = [4, 6]
//! seeds = [0, 1]
//! lr_factors = [1.0, 2.6]
//! ```

//!
//! The module's parts: [`raw`] (the TOML shapes users write), [`resolve`] (the `[data]` and
//! `[train]` tables with their defaults), [`expand`] (the grid of methods × seeds × factors) and
//! [`location`] (file, line and column for every error).

use std::path::Path;

use crate::error::{Error, Result};
use crate::trial::TrialConfig;

mod expand;
mod location;
mod raw;
mod resolve;
#[cfg(test)]
mod tests;
mod tune;

pub use location::line_col;
use location::{sweep_dir, toml_message, Ctx};
use raw::RawSweep;
pub use tune::{point_name, rungs};

/// A parsed and expanded sweep.
#[derive(Clone, Debug)]
pub struct Sweep {
    pub name: String,
    /// Trials in a stable order: the pretrain stage (if any) first.
    pub trials: Vec<TrialConfig>,
    /// The sweep file's text, stored by the coordinator so a report can show what was asked for.
    pub source: String,
    /// `price_per_hour`: what an hour of one device costs (any currency), for the report's cost
    /// table where a worker did not set its own. Not part of any trial's id.
    pub price_per_hour: Option<f64>,
}

/// Read, validate and expand a sweep file.
pub fn load_sweep(path: &Path) -> Result<Sweep> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_sweep(&text, path)
}

/// Parse sweep text; `path` names the file in errors and anchors relative paths.
pub fn parse_sweep(text: &str, path: &Path) -> Result<Sweep> {
    let ctx = Ctx {
        text,
        file: path.display().to_string(),
        dir: sweep_dir(path),
    };
    let raw: RawSweep = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        ctx.err(span.clone(), toml_message(&e, text, span.start))
    })?;
    expand::expand(&ctx, raw)
}

/// Read a single trial file (a [`TrialConfig`] as TOML), as `ablate-worker train --trial` takes.
pub fn load_trial_file(path: &Path) -> Result<TrialConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let ctx = Ctx {
        text: &text,
        file: path.display().to_string(),
        dir: sweep_dir(path),
    };
    toml::from_str(&text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        ctx.err(span.clone(), toml_message(&e, &text, span.start))
    })
}
