//! Grid expansion: a validated [`RawSweep`] becomes the ordered list of trials (pretrain stage
//! first, then baseline, freeze, gradual and Inheritune trials crossed with seeds and
//! discriminative-LR factors).

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::Path;

use super::location::Ctx;
use super::raw::*;
use super::resolve::{parse_package, resolve_data, resolve_train};
use super::Sweep;
use crate::error::Result;
use crate::trial::{Base, DataSpec, LoraTarget, Method, ModelShape, TrainSpec, TrialConfig};

pub(super) fn expand(ctx: &Ctx, raw: RawSweep) -> Result<Sweep> {
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
    let price_per_hour = match &raw.price_per_hour {
        Some(p) if !(p.get_ref().is_finite() && *p.get_ref() >= 0.0) => {
            return Err(ctx.err(
                p.span(),
                "`price_per_hour` must be a number >= 0 (what an hour of one device costs)",
            ))
        }
        p => p.as_ref().map(|p| *p.get_ref()),
    };
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
    let given = [
        base.path.is_some(),
        base.pretrain.is_some(),
        base.gguf.is_some(),
        base.hub.is_some(),
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    if given > 1 {
        return Err(ctx.err(
            base_span,
            "[base] takes one of `path`, `gguf`, `hub` or `pretrain`, not several",
        ));
    }
    if let (Some(r), None) = (&base.revision, &base.hub) {
        return Err(ctx.err(r.span(), "`revision` goes with `hub`"));
    }
    let (base_ref, n_layer) = if let Some(h) = base.hub {
        let repo = h.get_ref().trim().to_string();
        let revision = base
            .revision
            .as_ref()
            .map(|r| r.get_ref().trim().to_string());
        if let Err(msg) = crate::trial::validate_hub(&repo, revision.as_deref()) {
            let span = match (&base.revision, msg.starts_with("revision")) {
                (Some(r), true) => r.span(),
                _ => h.span(),
            };
            return Err(ctx.err(span, msg));
        }
        // Checked on the worker, whose Hugging Face cache holds the model.
        (Base::Hub { repo, revision }, None)
    } else if let Some(g) = base.gguf {
        let g = g.into_inner();
        let package = g
            .package
            .as_ref()
            .map(|p| parse_package(ctx, p))
            .transpose()?;
        let path = if package.is_some() {
            g.path.get_ref().clone()
        } else {
            ctx.resolve(g.path.get_ref())
        };
        if path.trim().is_empty() {
            return Err(ctx.err(g.path.span(), "`path` of the GGUF file is empty"));
        }
        // The depth is checked on the worker once the file is there (it may be in a package
        // that only the workers install).
        (Base::Gguf { path, package }, None)
    } else {
        match (base.path, base.pretrain) {
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
                tune: None,
            };
            let id = pre.id();
            trials.push(pre);
            check_context(ctx, &data, shape.n_positions, ctx.find("[data]"))?;
            (Base::Trial { id }, Some(shape.n_layer))
        }
        (Some(_), Some(_)) => unreachable!("checked above: one of path, gguf, pretrain"),
        (None, None) => {
            return Err(ctx.err(
                base_span,
                "[base] needs `path` (a Hugging Face directory), `gguf` (a GGUF file), `hub` (\"org/name\") or a [base.pretrain] table",
            ))
        }
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
            tune: None,
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
    if let Some(l) = &m.lora {
        let l = l.get_ref();
        let mut ranks = Vec::new();
        for r in l.ranks.get_ref() {
            if *r.get_ref() == 0 {
                return Err(ctx.err(r.span(), "lora ranks must be at least 1"));
            }
            if !ranks.contains(r.get_ref()) {
                ranks.push(*r.get_ref());
            }
        }
        if ranks.is_empty() {
            return Err(ctx.err(l.ranks.span(), "lora `ranks` must not be empty"));
        }
        // PEFT's default lora_alpha.
        let alpha = match &l.alpha {
            Some(a) if !(a.get_ref().is_finite() && *a.get_ref() > 0.0) => {
                return Err(ctx.err(a.span(), "lora `alpha` must be a positive number"))
            }
            Some(a) => *a.get_ref(),
            None => 8.0,
        };
        if let Some(d) = &l.dropout {
            if *d.get_ref() != 0.0 {
                return Err(ctx.err(
                    d.span(),
                    "lora `dropout` must be 0.0: ablate trains without dropout, so that a trial \
                     is deterministic for its seed",
                ));
            }
        }
        let targets = match &l.targets {
            None => vec![LoraTarget::Attn, LoraTarget::Mlp],
            Some(ts) => {
                let mut v = Vec::new();
                for t in ts.get_ref() {
                    let target = match t.get_ref().as_str() {
                        "attn" => LoraTarget::Attn,
                        "mlp" => LoraTarget::Mlp,
                        other => {
                            return Err(ctx.err(
                                t.span(),
                                format!("lora targets are \"attn\" or \"mlp\", not `{other}`"),
                            ))
                        }
                    };
                    if !v.contains(&target) {
                        v.push(target);
                    }
                }
                if v.is_empty() {
                    return Err(ctx.err(ts.span(), "lora `targets` must not be empty"));
                }
                v.sort();
                v
            }
        };
        let top = match &l.groups {
            Some(k) if *k.get_ref() == 0 || *k.get_ref() >= groups => {
                return Err(ctx.err(
                    k.span(),
                    format!(
                        "lora groups = {} is outside 1..={} (the sweep's block groups)",
                        k.get_ref(),
                        groups - 1
                    ),
                ))
            }
            k => k.as_ref().map(|k| *k.get_ref()),
        };
        let mut ltrain = train.clone();
        if let Some(lr) = &l.lr {
            if !(lr.get_ref().is_finite() && *lr.get_ref() > 0.0) {
                return Err(ctx.err(lr.span(), "lora `lr` must be a positive number"));
            }
            ltrain.lr = *lr.get_ref();
        }
        any = true;
        for rank in ranks {
            let label = match top {
                Some(k) => format!("lora-{rank}-top{k}"),
                None => format!("lora-{rank}"),
            };
            for &seed in &seeds {
                trials.push(mk(
                    format!("{label}{}", suffix(None, seed)),
                    Method::Lora {
                        rank,
                        alpha,
                        targets: targets.clone(),
                        groups: top,
                    },
                    &ltrain,
                    None,
                    seed,
                ));
            }
        }
    }
    if !any {
        return Err(ctx.err(methods_span, "[methods] selects no trial"));
    }
    let trials = match &raw.tune {
        Some(t) => super::tune::apply(ctx, t, trials, m.seeds.as_ref().map(|s| s.span()))?,
        None => trials,
    };
    Ok(Sweep {
        name,
        trials,
        source: ctx.text.to_string(),
        price_per_hour,
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

/// The depth (`n_layer` of GPT-2, `num_hidden_layers` of Llama) from a Hugging Face
/// config.json, if the directory is readable here.
fn read_n_layer(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("n_layer")
        .or_else(|| v.get("num_hidden_layers"))
        .and_then(|n| n.as_u64())
        .map(|n| n as usize)
}
