//! Fine-tuning methods as plans over layer groups: which parameters train at a given step, and at
//! which learning rate.
//!
//! A model of `n_layer` blocks is cut into `G` layer groups: group 0 holds the embeddings (GPT-2's
//! wte and wpe, Llama's embed_tokens); groups 1..G-1 hold contiguous runs of blocks, split as
//! evenly as possible with the larger groups at the top when `n_layer` does not divide; the final
//! norm and the head belong to the top group G-1. Every method (freeze-top-k, ULMFiT gradual
//! unfreezing, discriminative learning rates, Inheritune, pretraining) is expressed as "which
//! groups are on at step s" plus "lr per group", so the training loop has one code path for all of
//! them. Which group a parameter is in follows from its [`Part`], which the model family states
//! (`crate::model`): no parameter names are matched here.
//!
//! A tied head makes the embedding table special ([`Part::TiedEmbeddings`]): when the top group
//! trains, the table receives gradient through the head even if the embedding group is frozen. It
//! is then trained at the top group's rate (the head is the top group's parameter); when group 0
//! is on, at group 0's rate.

use std::ops::Range;

use crate::model::Part;
use crate::trial::Method;
use crate::{Error, Result};

/// The split of a model's blocks into layer groups.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerGroups {
    pub n_layer: usize,
    pub groups: usize,
    /// Block ranges of groups 1..G-1: `blocks[g - 1]` belongs to group g.
    pub blocks: Vec<Range<usize>>,
}

/// Which parts of the model are trainable, in the shape the model's forward pass takes
/// (`model::Trainable` has the same three fields).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrainMask {
    pub embeddings: bool,
    pub blocks: Vec<bool>,
    /// The final norm and the head.
    pub top: bool,
    /// Per block: its LoRA adapters train (empty for every method but LoRA).
    pub adapters: Vec<bool>,
}

impl TrainMask {
    pub fn any(&self) -> bool {
        self.embeddings
            || self.top
            || self.blocks.iter().any(|b| *b)
            || self.adapters.iter().any(|b| *b)
    }
}

impl LayerGroups {
    /// Errors (Config) when `groups < 2` (there must be an embedding group and at least one block
    /// group) or when there are more block groups than blocks.
    pub fn new(n_layer: usize, groups: usize) -> Result<Self> {
        if groups < 2 {
            return Err(Error::Config(format!(
                "groups = {groups}: need at least 2 layer groups (embeddings + at least one block group)"
            )));
        }
        let block_groups = groups - 1;
        if block_groups > n_layer {
            return Err(Error::Config(format!(
                "groups = {groups}: {block_groups} block groups but the model has only {n_layer} blocks"
            )));
        }
        let base = n_layer / block_groups;
        let rem = n_layer % block_groups;
        let mut blocks = Vec::with_capacity(block_groups);
        let mut start = 0;
        for i in 0..block_groups {
            // The top `rem` groups take one extra block.
            let size = base + usize::from(i >= block_groups - rem);
            blocks.push(start..start + size);
            start += size;
        }
        Ok(LayerGroups {
            n_layer,
            groups,
            blocks,
        })
    }

    /// The group of block `i`; None for a block the model does not have.
    pub fn group_of_block(&self, i: usize) -> Option<usize> {
        self.blocks
            .iter()
            .position(|r| r.contains(&i))
            .map(|g| g + 1)
    }

    /// Turns per-group on/off flags into the model's trainable mask.
    pub fn mask(&self, on: &[bool]) -> TrainMask {
        let mut blocks = vec![false; self.n_layer];
        for (g, r) in self.blocks.iter().enumerate() {
            for b in r.clone() {
                blocks[b] = on[g + 1];
            }
        }
        TrainMask {
            embeddings: on[0],
            blocks,
            top: on[self.groups - 1],
            adapters: Vec::new(),
        }
    }

    /// LoRA's mask: every base weight frozen, the adapters of the blocks in the groups `on` live.
    pub fn adapter_mask(&self, on: &[bool]) -> TrainMask {
        let m = self.mask(on);
        TrainMask {
            embeddings: false,
            blocks: vec![false; self.n_layer],
            top: false,
            adapters: m.blocks,
        }
    }

    /// The mask of `method` under the group flags `on`.
    pub fn mask_for(&self, method: &Method, on: &[bool]) -> TrainMask {
        match method {
            Method::Lora { .. } => self.adapter_mask(on),
            _ => self.mask(on),
        }
    }

    /// Learning rate of a parameter of `part` under the flags `on` and per-group rates `lrs`, or
    /// None when it is frozen (see the module doc for a tied embedding table).
    pub fn param_lr(&self, part: Part, on: &[bool], lrs: &[f64]) -> Option<f64> {
        let top = self.groups - 1;
        let g = match part {
            Part::Embeddings => 0,
            Part::Head => top,
            Part::Block(i) | Part::Adapter(i) => self.group_of_block(i)?,
            Part::TiedEmbeddings => {
                return if on[0] {
                    Some(lrs[0])
                } else if on[top] {
                    Some(lrs[top])
                } else {
                    None
                };
            }
        };
        on[g].then(|| lrs[g])
    }
}

/// Per-group learning rates: group g trains at `lr / factor^(G-1-g)` (ULMFiT discriminative
/// fine-tuning; no factor means one rate for all).
pub fn group_lrs(lr: f64, factor: Option<f64>, groups: usize) -> Vec<f64> {
    (0..groups)
        .map(|g| match factor {
            Some(f) => lr / f.powi((groups - 1 - g) as i32),
            None => lr,
        })
        .collect()
}

/// The number of layer groups actually used for a model of `n_layer` blocks. Methods that train
/// every group (pretrain, Inheritune) or none (baseline) do not depend on the split, so a sweep-wide
/// `groups` larger than a shallow model allows (e.g. Inheritune keeping 2 blocks with `groups = 4`)
/// is reduced to one group per block there instead of failing. Freeze and gradual keep `groups` as
/// given: their meaning depends on it, so a mismatch is an error.
pub fn effective_groups(method: &Method, groups: usize, n_layer: usize) -> usize {
    match method {
        Method::Baseline | Method::Pretrain { .. } | Method::Inheritune { .. } if groups >= 2 => {
            groups.min(n_layer + 1).max(2)
        }
        _ => groups,
    }
}

/// Checks that `method` fits a base of `n_layer` blocks split into `groups` groups; the error names
/// the offending value.
pub fn validate(method: &Method, groups: usize, n_layer: usize) -> Result<()> {
    match method {
        Method::Inheritune { blocks } => {
            if *blocks == 0 || *blocks > n_layer {
                return Err(Error::Config(format!(
                    "inheritune blocks = {blocks}: must be between 1 and the base model's {n_layer} blocks"
                )));
            }
            LayerGroups::new(*blocks, effective_groups(method, groups, *blocks))?;
        }
        Method::Freeze { top } => {
            LayerGroups::new(n_layer, groups)?;
            if *top == 0 || *top > groups {
                return Err(Error::Config(format!(
                    "freeze top = {top}: must be between 1 and the {groups} layer groups"
                )));
            }
        }
        Method::Gradual { stage_steps } => {
            LayerGroups::new(n_layer, groups)?;
            if *stage_steps == 0 {
                return Err(Error::Config(
                    "gradual stage_steps = 0: must be at least 1".into(),
                ));
            }
        }
        Method::Lora {
            rank,
            alpha,
            targets,
            groups: top,
        } => {
            LayerGroups::new(n_layer, groups)?;
            if *rank == 0 {
                return Err(Error::Config("lora rank = 0: must be at least 1".into()));
            }
            if !(alpha.is_finite() && *alpha > 0.0) {
                return Err(Error::Config(format!(
                    "lora alpha = {alpha}: must be positive"
                )));
            }
            if targets.is_empty() {
                return Err(Error::Config(
                    "lora targets is empty: name \"attn\" and/or \"mlp\"".into(),
                ));
            }
            if let Some(k) = top {
                if *k == 0 || *k >= groups {
                    return Err(Error::Config(format!(
                        "lora groups = {k}: must be between 1 and the {} block groups",
                        groups - 1
                    )));
                }
            }
        }
        Method::Baseline | Method::Pretrain { .. } => {}
    }
    Ok(())
}

/// Whether `method` trains adapters only (the base weights stay frozen).
pub fn adapters_only(method: &Method) -> bool {
    matches!(method, Method::Lora { .. })
}

/// The adapters a LoRA `method` puts on a model of `n_layer` blocks split into `groups` layer
/// groups: in the blocks of its top `groups` block groups, all blocks when it names none. None
/// for the other methods.
pub fn lora_spec(
    method: &Method,
    groups: usize,
    n_layer: usize,
) -> Result<Option<crate::model::lora::LoraSpec>> {
    let Method::Lora {
        rank,
        alpha,
        targets,
        ..
    } = method
    else {
        return Ok(None);
    };
    validate(method, groups, n_layer)?;
    let lg = LayerGroups::new(n_layer, groups)?;
    let on = active_groups(method, groups, 0)?;
    let blocks = lg.adapter_mask(&on).adapters;
    Ok(Some(crate::model::lora::LoraSpec {
        rank: *rank,
        alpha: *alpha,
        targets: targets.clone(),
        blocks: (0..n_layer).filter(|&b| blocks[b]).collect(),
    }))
}

/// Which groups train at optimizer step `step` (0-based).
pub fn active_groups(method: &Method, groups: usize, step: u64) -> Result<Vec<bool>> {
    let on_top = |k: usize| -> Vec<bool> { (0..groups).map(|g| g + k >= groups).collect() };
    Ok(match method {
        Method::Baseline => vec![false; groups],
        Method::Pretrain { .. } | Method::Inheritune { .. } => vec![true; groups],
        Method::Freeze { top } => {
            if *top == 0 || *top > groups {
                return Err(Error::Config(format!(
                    "freeze top = {top}: must be between 1 and the {groups} layer groups"
                )));
            }
            on_top(*top)
        }
        Method::Gradual { stage_steps } => {
            let stage = step / (*stage_steps).max(1);
            on_top((stage as usize).saturating_add(1).min(groups))
        }
        // The block groups that hold adapters (never group 0, the embeddings).
        Method::Lora { groups: top, .. } => {
            let k = top.unwrap_or(groups - 1).min(groups - 1);
            (0..groups).map(|g| g >= 1 && g + k >= groups).collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_small_splits_into_three_groups_of_four() {
        let lg = LayerGroups::new(12, 4).unwrap();
        assert_eq!(lg.blocks, vec![0..4, 4..8, 8..12]);
        assert_eq!(lg.group_of_block(0), Some(1));
        assert_eq!(lg.group_of_block(7), Some(2));
        assert_eq!(lg.group_of_block(11), Some(3));
        assert_eq!(lg.group_of_block(12), None);
        let (on, lrs) = ([true; 4], [0.1, 0.2, 0.3, 0.4]);
        assert_eq!(lg.param_lr(Part::Embeddings, &on, &lrs), Some(0.1));
        assert_eq!(lg.param_lr(Part::Block(5), &on, &lrs), Some(0.3));
        assert_eq!(lg.param_lr(Part::Head, &on, &lrs), Some(0.4));
        assert_eq!(lg.param_lr(Part::Block(12), &on, &lrs), None);
    }

    #[test]
    fn uneven_split_puts_larger_groups_on_top() {
        let lg = LayerGroups::new(7, 4).unwrap();
        assert_eq!(lg.blocks, vec![0..2, 2..4, 4..7]);
        let lg = LayerGroups::new(8, 4).unwrap();
        assert_eq!(lg.blocks, vec![0..2, 2..5, 5..8]);
        let lg = LayerGroups::new(2, 3).unwrap();
        assert_eq!(lg.blocks, vec![0..1, 1..2]);
    }

    #[test]
    fn bad_group_counts_are_config_errors() {
        assert!(matches!(LayerGroups::new(12, 1), Err(Error::Config(_))));
        let e = LayerGroups::new(2, 4).unwrap_err();
        assert!(matches!(e, Error::Config(_)));
        assert!(e.to_string().contains("only 2 blocks"), "{e}");
    }

    #[test]
    fn freeze_trains_top_k_groups() {
        let on = active_groups(&Method::Freeze { top: 1 }, 4, 0).unwrap();
        assert_eq!(on, vec![false, false, false, true]);
        let on = active_groups(&Method::Freeze { top: 4 }, 4, 99).unwrap();
        assert_eq!(on, vec![true; 4]);
        let e = active_groups(&Method::Freeze { top: 5 }, 4, 0).unwrap_err();
        assert!(
            e.to_string().contains("top = 5") && e.to_string().contains("4 layer groups"),
            "{e}"
        );
        assert!(validate(&Method::Freeze { top: 5 }, 4, 12).is_err());
    }

    #[test]
    fn gradual_unfreezes_one_group_per_stage() {
        let m = Method::Gradual { stage_steps: 10 };
        assert_eq!(active_groups(&m, 3, 0).unwrap(), vec![false, false, true]);
        assert_eq!(active_groups(&m, 3, 9).unwrap(), vec![false, false, true]);
        assert_eq!(active_groups(&m, 3, 10).unwrap(), vec![false, true, true]);
        assert_eq!(active_groups(&m, 3, 20).unwrap(), vec![true, true, true]);
        assert_eq!(active_groups(&m, 3, 1000).unwrap(), vec![true, true, true]);
    }

    #[test]
    fn discriminative_rates_and_tied_wte() {
        let lrs = group_lrs(1.0, Some(2.0), 4);
        assert_eq!(lrs, vec![0.125, 0.25, 0.5, 1.0]);
        assert_eq!(group_lrs(0.3, None, 3), vec![0.3; 3]);
        let lg = LayerGroups::new(6, 4).unwrap();
        let top1 = [false, false, false, true];
        assert_eq!(lg.param_lr(Part::TiedEmbeddings, &top1, &lrs), Some(1.0));
        assert_eq!(lg.param_lr(Part::Embeddings, &top1, &lrs), None);
        assert_eq!(lg.param_lr(Part::Block(5), &top1, &lrs), Some(1.0));
        assert_eq!(lg.param_lr(Part::Block(3), &top1, &lrs), None);
        let all = [true; 4];
        assert_eq!(lg.param_lr(Part::TiedEmbeddings, &all, &lrs), Some(0.125));
        assert_eq!(lg.param_lr(Part::Block(1), &all, &lrs), Some(0.25));
        // Nothing on: a tied table is frozen too.
        assert_eq!(lg.param_lr(Part::TiedEmbeddings, &[false; 4], &lrs), None);
        // Only the embeddings: the tied table trains at group 0's rate, an untied head not at all.
        let emb = [true, false, false, false];
        assert_eq!(lg.param_lr(Part::TiedEmbeddings, &emb, &lrs), Some(0.125));
        assert_eq!(lg.param_lr(Part::Head, &emb, &lrs), None);
        let m = lg.mask(&top1);
        assert_eq!(
            m,
            TrainMask {
                embeddings: false,
                blocks: vec![false, false, false, false, true, true],
                top: true,
                adapters: Vec::new(),
            }
        );
    }

    #[test]
    fn inheritune_depth_is_checked() {
        assert!(validate(&Method::Inheritune { blocks: 6 }, 4, 12).is_ok());
        // Two blocks under a sweep-wide 4 groups: all groups train anyway, so 3 groups are used.
        assert!(validate(&Method::Inheritune { blocks: 2 }, 4, 12).is_ok());
        assert_eq!(effective_groups(&Method::Inheritune { blocks: 2 }, 4, 2), 3);
        assert_eq!(effective_groups(&Method::Freeze { top: 1 }, 4, 2), 4);
        assert!(validate(&Method::Freeze { top: 1 }, 4, 2).is_err());
        let e = validate(&Method::Inheritune { blocks: 13 }, 4, 12).unwrap_err();
        assert!(
            e.to_string().contains("blocks = 13") && e.to_string().contains("12 blocks"),
            "{e}"
        );
    }

    #[test]
    fn lora_adapts_the_top_block_groups_and_freezes_the_base() {
        use crate::trial::LoraTarget;
        let lora = |groups| Method::Lora {
            rank: 4,
            alpha: 8.0,
            targets: vec![LoraTarget::Attn],
            groups,
        };
        let lg = LayerGroups::new(6, 4).unwrap();
        // No groups: every block group, never the embeddings group.
        let on = active_groups(&lora(None), 4, 0).unwrap();
        assert_eq!(on, vec![false, true, true, true]);
        let m = lg.mask_for(&lora(None), &on);
        assert!(!m.embeddings && !m.top && m.blocks.iter().all(|b| !b));
        assert_eq!(m.adapters, vec![true; 6]);
        let on = active_groups(&lora(Some(1)), 4, 99).unwrap();
        assert_eq!(
            lg.adapter_mask(&on).adapters,
            [false, false, false, false, true, true]
        );
        let spec = lora_spec(&lora(Some(2)), 4, 6).unwrap().unwrap();
        assert_eq!(spec.blocks, vec![2, 3, 4, 5]);
        // An adapter trains at its block's group rate.
        let lrs = [0.1, 0.2, 0.3, 0.4];
        assert_eq!(lg.param_lr(Part::Adapter(5), &on, &lrs), Some(0.4));
        assert_eq!(lg.param_lr(Part::Adapter(0), &on, &lrs), None);
        assert!(adapters_only(&lora(None)) && !adapters_only(&Method::Freeze { top: 1 }));
        let e = validate(&lora(Some(4)), 4, 6).unwrap_err().to_string();
        assert!(
            e.contains("lora groups = 4") && e.contains("3 block groups"),
            "{e}"
        );
        assert!(lora_spec(&Method::Freeze { top: 1 }, 4, 6)
            .unwrap()
            .is_none());
    }
}
