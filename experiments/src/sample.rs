//! Text generation for the report's sample section: temperature, top-k and top-p (nucleus)
//! sampling from a model of any family, reproducible for a seed.
//!
//! The filtering is a pure function ([`filter_probs`]) so its rules are tested on hand-made logits;
//! [`generate`] only runs the model and draws from what it returns. There is no KV cache: samples
//! are short and generated a few times per trial, so recomputing the window is simpler and cheap.

use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::model::{CausalLm, Trainable};
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
    if temperature.is_nan() || temperature <= 0.0 {
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

/// Generates up to `max_new_tokens` tokens after `prompt` and returns the new tokens only (a stop
/// token, when produced, is included and ends generation). The model sees at most its last
/// `max_positions` tokens. Same model, prompt, options and seed → same output.
pub fn generate(
    model: &dyn CausalLm,
    prompt: &[u32],
    opts: &SampleOpts,
    stop_tokens: &[u32],
) -> Result<Vec<u32>> {
    opts.validate()?;
    if prompt.is_empty() {
        return Err(Error::Config(
            "generation needs a non-empty prompt (e.g. the end-of-text token)".into(),
        ));
    }
    let dims = model.dims();
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= dims.vocab_size) {
        return Err(Error::Config(format!(
            "prompt token {bad} is outside the model's vocabulary of {}",
            dims.vocab_size
        )));
    }
    let frozen = Trainable::none(dims.n_layer);
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut tokens = prompt.to_vec();
    let mut new = Vec::with_capacity(opts.max_new_tokens);
    for _ in 0..opts.max_new_tokens {
        let start = tokens.len().saturating_sub(dims.max_positions);
        let window = &tokens[start..];
        let ids = Tensor::from_slice(window, (1, window.len()), model.device())?;
        let logits = model.forward_with(&ids, &frozen)?; // (1, T, V)
        let last: Vec<f32> = logits.get(0)?.get(window.len() - 1)?.to_vec1()?;
        let probs = filter_probs(&last, opts.temperature, opts.top_k, opts.top_p);
        let next = draw(&probs, &mut rng) as u32;
        tokens.push(next);
        new.push(next);
        if stop_tokens.contains(&next) {
            break;
        }
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Gpt2, Gpt2Config};
    use candle_core::Device;

    fn tiny_model() -> Gpt2 {
        let cfg = Gpt2Config {
            vocab_size: 50,
            n_positions: 8,
            n_embd: 16,
            n_layer: 1,
            n_head: 2,
            layer_norm_epsilon: 1e-5,
        };
        Gpt2::new_random(&cfg, 3, &Device::Cpu).unwrap()
    }

    fn opts(temperature: f64, top_k: Option<usize>, top_p: Option<f64>, seed: u64) -> SampleOpts {
        SampleOpts {
            max_new_tokens: 12,
            temperature,
            top_k,
            top_p,
            seed,
        }
    }

    fn greedy(model: &Gpt2, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut toks = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..n {
            let start = toks.len().saturating_sub(model.config().n_positions);
            let w = &toks[start..];
            let ids = Tensor::from_slice(w, (1, w.len()), model.device()).unwrap();
            let logits = model.forward(&ids).unwrap();
            let last: Vec<f32> = logits
                .get(0)
                .unwrap()
                .get(w.len() - 1)
                .unwrap()
                .to_vec1()
                .unwrap();
            let next = argmax(&last) as u32;
            toks.push(next);
            out.push(next);
        }
        out
    }

    #[test]
    fn top_k_one_is_greedy() {
        let model = tiny_model();
        let prompt = [1u32, 7, 3];
        // 12 new tokens with an 8-token context also exercises the cropping.
        let want = greedy(&model, &prompt, 12);
        for seed in [0, 1, 2] {
            let got = generate(&model, &prompt, &opts(1.0, Some(1), None, seed), &[]).unwrap();
            assert_eq!(got, want, "seed {seed}");
        }
        let zero_t = generate(&model, &prompt, &opts(0.0, None, None, 9), &[]).unwrap();
        assert_eq!(zero_t, want);
    }

    #[test]
    fn top_p_keeps_smallest_nucleus() {
        // softmax of ln(p) is p: probabilities 0.5, 0.2, 0.15, 0.1, 0.05 (shuffled positions).
        let p = [0.1f32, 0.5, 0.05, 0.2, 0.15];
        let logits: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        let keep = |top_p: f64| -> Vec<usize> {
            let out = filter_probs(&logits, 1.0, None, Some(top_p));
            let s: f32 = out.iter().sum();
            assert!((s - 1.0).abs() < 1e-6);
            (0..5).filter(|&i| out[i] > 0.0).collect()
        };
        assert_eq!(keep(0.49), vec![1]); // 0.5 alone reaches 0.49
        assert_eq!(keep(0.51), vec![1, 3]); // 0.7
        assert_eq!(keep(0.69), vec![1, 3]);
        assert_eq!(keep(0.71), vec![1, 3, 4]); // 0.85
        assert_eq!(keep(0.9), vec![0, 1, 3, 4]); // 0.95
        assert_eq!(keep(1.0), vec![0, 1, 2, 3, 4]);
        assert_eq!(keep(0.01), vec![1]);
        // Renormalised within the nucleus: 0.5/0.7 and 0.2/0.7.
        let out = filter_probs(&logits, 1.0, None, Some(0.6));
        assert!((out[1] - 0.5 / 0.7).abs() < 1e-6 && (out[3] - 0.2 / 0.7).abs() < 1e-6);
        // top-k first, then top-p on the renormalised top-k (transformers' order): top-2 gives
        // 0.714/0.286, so p = 0.7 already keeps only the first.
        let out = filter_probs(&logits, 1.0, Some(2), Some(0.7));
        assert_eq!(
            (0..5).filter(|&i| out[i] > 0.0).collect::<Vec<_>>(),
            vec![1]
        );
    }

    #[test]
    fn top_k_keeps_k_most_likely() {
        let logits = [0.0f32, 3.0, 1.0, 2.0, -1.0];
        let out = filter_probs(&logits, 1.0, Some(2), None);
        assert_eq!(
            (0..5).filter(|&i| out[i] > 0.0).collect::<Vec<_>>(),
            vec![1, 3]
        );
        let e = 1f32.exp();
        assert!((out[1] - e / (e + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn temperature_scales_logits() {
        let logits = [1.0f32, 2.0, 4.0];
        let soft = |t: f64| -> Vec<f64> {
            let z: Vec<f64> = logits.iter().map(|&l| (l as f64 / t).exp()).collect();
            let s: f64 = z.iter().sum();
            z.iter().map(|x| x / s).collect()
        };
        for t in [0.5, 1.0, 2.0] {
            let out = filter_probs(&logits, t, None, None);
            for (a, b) in out.iter().zip(soft(t)) {
                assert!((*a as f64 - b).abs() < 1e-6, "t={t}");
            }
        }
        // Lower temperature sharpens: the top token's probability rises.
        let top = |t| filter_probs(&logits, t, None, None)[2];
        assert!(top(0.5) > top(1.0) && top(1.0) > top(2.0));
        assert_eq!(filter_probs(&logits, 0.0, None, None), vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn same_seed_same_output() {
        let model = tiny_model();
        let o = opts(1.5, Some(20), Some(0.95), 11);
        let a = generate(&model, &[4, 5], &o, &[]).unwrap();
        let b = generate(&model, &[4, 5], &o, &[]).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 12);
        // Different seeds give a different stream for a near-uniform random model.
        let c = generate(
            &model,
            &[4, 5],
            &SampleOpts {
                seed: 12,
                ..o.clone()
            },
            &[],
        )
        .unwrap();
        assert_ne!(a, c);
    }

    #[test]
    fn stops_at_stop_token_and_rejects_bad_options() {
        let model = tiny_model();
        let first = greedy(&model, &[2, 2], 1)[0];
        let out = generate(&model, &[2, 2], &opts(0.0, None, None, 0), &[first]).unwrap();
        assert_eq!(out, vec![first]);
        assert!(generate(&model, &[], &opts(1.0, None, None, 0), &[]).is_err());
        assert!(generate(&model, &[99], &opts(1.0, None, None, 0), &[]).is_err());
        assert!(generate(&model, &[1], &opts(-1.0, None, None, 0), &[]).is_err());
        assert!(generate(&model, &[1], &opts(1.0, Some(0), None, 0), &[]).is_err());
        assert!(generate(&model, &[1], &opts(1.0, None, Some(1.5), 0), &[]).is_err());
    }
}
