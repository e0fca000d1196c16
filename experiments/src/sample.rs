//! Text generation for the report's sample section: temperature, top-k and top-p (nucleus)
//! sampling from a [`Gpt2`], reproducible for a seed.
//!
//! The filtering is a pure function ([`filter_probs`]) so its rules are tested on hand-made logits;
//! [`generate`] only runs the model and draws from what it returns. There is no KV cache: samples
//! are short and generated a few times per trial, so recomputing the window is simpler and cheap.

use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::model::{Gpt2, Trainable};
use crate::{Error, Result};

/// How to draw tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleOpts {
    pub max_new_tokens: usize,
    /// Logits are divided by this; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the k most likely tokens (k >= 1).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose mass reaches p (0 < p <= 1).
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl SampleOpts {
    fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Config(format!(
                "sampling temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if self.top_k == Some(0) {
            return Err(Error::Config("sampling top_k must be at least 1".into()));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::Config(format!(
                    "sampling top_p must be in (0, 1], got {p}"
                )));
            }
        }
        Ok(())
    }
}

/// Index of the largest value (the first one on ties; NaN never wins).
fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || xs[best].is_nan() {
            best = i;
        }
    }
    best
}

/// Pure filtering used by generate (unit-testable): returns probabilities after temperature,
/// top-k, top-p (smallest nucleus whose mass reaches p), renormalised.
///
/// Temperature <= 0 gives a one-hot at the argmax (greedy). `top_k` of 0 is treated as 1; `top_p`
/// <= 0 keeps only the most likely token, >= 1 keeps everything. Ties at the cut-off are broken by
/// token index (lower first), so the result is deterministic.
pub fn filter_probs(
    logits: &[f32],
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
) -> Vec<f32> {
    let n = logits.len();
    let mut out = vec![0f32; n];
    if n == 0 {
        return out;
    }
    if !(temperature > 0.0) {
        out[argmax(logits)] = 1.0;
        return out;
    }
    // Softmax in f64 of logits / temperature.
    let scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / temperature).collect();
    let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        out[argmax(logits)] = 1.0;
        return out;
    }
    let mut probs: Vec<f64> = scaled.iter().map(|&s| (s - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);

    // Token indices, most likely first (stable: lower index first on ties).
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        probs[b]
            .partial_cmp(&probs[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut keep = n;
    if let Some(k) = top_k {
        keep = keep.min(k.max(1));
    }
    if let Some(p) = top_p {
        // As transformers applies top-k before top-p: the nucleus is measured on the top-k
        // distribution renormalised.
        let topk_mass: f64 = order[..keep].iter().map(|&i| probs[i]).sum();
        let p = p * topk_mass;
        let mut mass = 0.0;
        let mut nucleus = 0;
        for &i in &order[..keep] {
            mass += probs[i];
            nucleus += 1;
            // Tolerance so that p = 1.0 keeps everything despite rounding in the sum.
            if mass >= p - 1e-12 {
                break;
            }
        }
        keep = nucleus.max(1);
    }
    let kept_mass: f64 = order[..keep].iter().map(|&i| probs[i]).sum();
    for &i in &order[..keep] {
        out[i] = (probs[i] / kept_mass) as f32;
    }
    out
}

/// Draw an index from probabilities summing to ~1.
fn draw(probs: &[f32], rng: &mut StdRng) -> usize {
    let u: f64 = rng.gen::<f64>();
    let mut acc = 0.0f64;
    let mut last_nonzero = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += p as f64;
            last_nonzero = i;
            if u < acc {
                return i;
            }
        }
    }
    last_nonzero
}

/// Generates up to `max_new_tokens` tokens after `prompt` and returns the new tokens only (the
/// stop token, when produced, is included and ends generation). The model sees at most its last
/// `n_positions` tokens. Same model, prompt, options and seed → same output.
pub fn generate(
    model: &Gpt2,
    prompt: &[u32],
    opts: &SampleOpts,
    stop_token: Option<u32>,
) -> Result<Vec<u32>> {
    opts.validate()?;
    if prompt.is_empty() {
        return Err(Error::Config(
            "generation needs a non-empty prompt (e.g. the end-of-text token)".into(),
        ));
    }
    let cfg = model.config();
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
        return Err(Error::Config(format!(
            "prompt token {bad} is outside the model's vocabulary of {}",
            cfg.vocab_size
        )));
    }
    let frozen = Trainable::none(cfg.n_layer);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut tokens = prompt.to_vec();
    let mut new = Vec::with_capacity(opts.max_new_tokens);
    for _ in 0..opts.max_new_tokens {
        let start = tokens.len().saturating_sub(cfg.n_positions);
        let window = &tokens[start..];
        let ids = Tensor::from_slice(window, (1, window.len()), model.device())?;
        let logits = model.forward_with(&ids, &frozen)?; // (1, T, V)
        let last: Vec<f32> = logits.get(0)?.get(window.len() - 1)?.to_vec1()?;
        let probs = filter_probs(&last, opts.temperature, opts.top_k, opts.top_p);
        let next = draw(&probs, &mut rng) as u32;
        tokens.push(next);
        new.push(next);
        if Some(next) == stop_token {
            break;
        }
    }
    Ok(new)
}
