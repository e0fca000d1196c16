//! Perplexity: the one number every method is compared on.
//!
//! Definition (the same for baseline, every fine-tuning method, Inheritune and pretraining):
//! the validation token stream is cut into **non-overlapping** chunks of `context` tokens, in
//! order; a last, shorter chunk is included when it has at least 2 tokens (a 1-token chunk predicts
//! nothing). Inside each chunk every token after the first is predicted from its prefix within the
//! chunk, so a chunk of n tokens contributes n − 1 predictions and context never crosses a chunk
//! boundary. Then
//!
//! ```text
//! perplexity = exp( Σ NLL over all predictions / number of predictions )
//! ```
//!
//! Periodic evaluations during training may cap the number of chunks (the first `max_chunks`);
//! the final evaluation of a trial uses the whole split (or `data.max_valid_windows`). Full chunks
//! are evaluated in batches; the short tail chunk on its own.

use candle_core::{Device, Tensor};

use crate::model::{CausalLm, Trainable};
use crate::ops;
use crate::{Error, Result};

/// Result of one evaluation.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalResult {
    /// Total negative log-likelihood (nats) over all predicted tokens.
    pub nll: f64,
    /// Number of predicted tokens.
    pub tokens: u64,
    /// nll / tokens.
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Chunks evaluated.
    pub chunks: usize,
}

/// Most logits one evaluation forward pass may produce (2^28 floats = 1 GiB).
const MAX_LOGITS: usize = 1 << 28;

/// The chunk boundaries of the definition above: `(start, len)` pairs, at most `max_chunks`.
pub fn chunks(n_tokens: usize, context: usize, max_chunks: Option<usize>) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    if context < 2 {
        return out;
    }
    let mut start = 0;
    while start < n_tokens {
        let len = context.min(n_tokens - start);
        if len >= 2 {
            out.push((start, len));
        }
        start += context;
    }
    if let Some(m) = max_chunks {
        out.truncate(m);
    }
    out
}

/// A trainable mask with everything frozen: evaluation builds no gradient graph.
pub fn frozen(n_layer: usize) -> Trainable {
    Trainable::none(n_layer)
}

/// Perplexity of `model` on `tokens` by the definition in the module doc. `batch_size` bounds how
/// many full chunks go through the model at once (memory: batch·context·vocab logits).
pub fn perplexity(
    model: &dyn CausalLm,
    tokens: &[u32],
    context: usize,
    batch_size: usize,
    max_chunks: Option<usize>,
    device: &Device,
) -> Result<EvalResult> {
    evaluate(model, tokens, context, batch_size, max_chunks, device, None)
}

/// Summed NLL and prediction count of each evaluation window (chunk), in chunk order: what a
/// paired comparison of two trials on the same validation windows resamples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WindowNll {
    pub nll: Vec<f64>,
    pub tokens: Vec<u64>,
}

/// [`perplexity`] that also keeps each window's summed NLL (for the report's paired bootstrap
/// intervals). The totals are the sums of the windows, so `result.nll == windows.nll.sum()`.
/// Costs one host sync per window more than [`perplexity`], so periodic evaluations do not use it.
pub fn perplexity_by_window(
    model: &dyn CausalLm,
    tokens: &[u32],
    context: usize,
    batch_size: usize,
    max_chunks: Option<usize>,
    device: &Device,
) -> Result<(EvalResult, WindowNll)> {
    let mut windows = WindowNll::default();
    let r = evaluate(
        model,
        tokens,
        context,
        batch_size,
        max_chunks,
        device,
        Some(&mut windows),
    )?;
    Ok((r, windows))
}

fn evaluate(
    model: &dyn CausalLm,
    tokens: &[u32],
    context: usize,
    batch_size: usize,
    max_chunks: Option<usize>,
    device: &Device,
    mut windows: Option<&mut WindowNll>,
) -> Result<EvalResult> {
    if context < 2 {
        return Err(Error::Config(format!(
            "evaluation context {context} must be at least 2"
        )));
    }
    let all = chunks(tokens.len(), context, max_chunks);
    if all.is_empty() {
        return Err(Error::Config(format!(
            "validation text has {} tokens: too few for one evaluation chunk (need at least 2)",
            tokens.len()
        )));
    }
    let n_layer = n_layer_of(model);
    let none = frozen(n_layer);
    // Bound the logits of one forward pass (batch·context·vocab floats, plus the same again for the
    // log-softmax) so GPT-2's 50k vocabulary at context 1024 does not need gigabytes at once.
    let per_chunk = context * model.dims().vocab_size;
    let batch_size = batch_size.clamp(1, (MAX_LOGITS / per_chunk.max(1)).max(1));
    let mut nll = 0f64;
    let mut predicted = 0u64;
    // Full chunks share a length and batch together; a short tail is evaluated alone.
    let full: Vec<(usize, usize)> = all.iter().copied().filter(|c| c.1 == context).collect();
    let tail: Vec<(usize, usize)> = all.iter().copied().filter(|c| c.1 != context).collect();
    for group in full.chunks(batch_size).chain(tail.chunks(1)) {
        let len = group[0].1;
        let b = group.len();
        let mut inputs = Vec::with_capacity(b * (len - 1));
        let mut targets = Vec::with_capacity(b * (len - 1));
        for &(start, len) in group {
            let c = &tokens[start..start + len];
            inputs.extend_from_slice(&c[..len - 1]);
            targets.extend_from_slice(&c[1..]);
        }
        let ids = Tensor::from_vec(inputs, (b, len - 1), device)?;
        let tgt = Tensor::from_vec(targets, b * (len - 1), device)?;
        let logits = model.forward_with(&ids, &none)?;
        let v = logits.dim(2)?;
        let logits = logits.reshape((b * (len - 1), v))?;
        match windows.as_deref_mut() {
            None => nll += ops::nll_sum(&logits, &tgt)?,
            // Full chunks come first, in order, then the tail: window order is chunk order.
            Some(w) => {
                for i in 0..b {
                    let rows = logits.narrow(0, i * (len - 1), len - 1)?;
                    let t = tgt.narrow(0, i * (len - 1), len - 1)?;
                    let x = ops::nll_sum(&rows, &t)?;
                    nll += x;
                    w.nll.push(x);
                    w.tokens.push((len - 1) as u64);
                }
            }
        }
        predicted += (b * (len - 1)) as u64;
    }
    let loss = nll / predicted as f64;
    Ok(EvalResult {
        nll,
        tokens: predicted,
        loss,
        perplexity: loss.exp(),
        chunks: all.len(),
    })
}

/// Number of transformer blocks of `model`.
pub fn n_layer_of(model: &dyn CausalLm) -> usize {
    model.dims().n_layer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Gpt2, Gpt2Config};

    /// The batched evaluation equals the definition computed by hand: each chunk on its own,
    /// `nll_sum` of its shifted predictions, summed, divided by the prediction count.
    #[test]
    fn perplexity_matches_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = Gpt2Config {
            vocab_size: 50,
            n_positions: 16,
            n_embd: 32,
            n_layer: 2,
            n_head: 2,
            layer_norm_epsilon: 1e-5,
        };
        let model = Gpt2::new_random(&cfg, 3, &dev)?;
        let tokens: Vec<u32> = (0..22u32).map(|i| (i * 7 + 3) % 50).collect();
        // context 8: chunks [0,8) [8,16) [16,22) → 7 + 7 + 5 predictions.
        let mut nll = 0.0;
        for (start, len) in [(0usize, 8usize), (8, 8), (16, 6)] {
            let c = &tokens[start..start + len];
            let ids = Tensor::from_slice(&c[..len - 1], (1, len - 1), &dev)?;
            let tgt = Tensor::from_slice(&c[1..], len - 1, &dev)?;
            let logits = model.forward(&ids)?.reshape((len - 1, 50))?;
            nll += ops::nll_sum(&logits, &tgt)?;
        }
        for batch in [1, 2, 5] {
            let r = perplexity(&model, &tokens, 8, batch, None, &dev)?;
            assert_eq!(r.tokens, 19);
            assert_eq!(r.chunks, 3);
            assert!(
                (r.nll - nll).abs() < 1e-4 * nll,
                "batch {batch}: {} vs {nll}",
                r.nll
            );
            assert!((r.perplexity - (nll / 19.0).exp()).abs() < 1e-3 * r.perplexity);
        }
        // A random model is close to uniform: perplexity near the vocabulary size.
        let r = perplexity(&model, &tokens, 8, 4, None, &dev)?;
        assert!(
            r.perplexity > 25.0 && r.perplexity < 100.0,
            "{}",
            r.perplexity
        );
        // Per window: the hand-computed chunks, and the same totals.
        let (r, w) = perplexity_by_window(&model, &tokens, 8, 2, None, &dev)?;
        assert_eq!(w.tokens, vec![7, 7, 5]);
        assert_eq!(w.nll.len(), 3);
        assert_eq!(r.nll, w.nll.iter().sum::<f64>());
        assert!((r.nll - nll).abs() < 1e-4 * nll);
        let first = {
            let c = &tokens[..8];
            let ids = Tensor::from_slice(&c[..7], (1, 7), &dev)?;
            let tgt = Tensor::from_slice(&c[1..], 7, &dev)?;
            ops::nll_sum(&model.forward(&ids)?.reshape((7, 50))?, &tgt)?
        };
        assert!(
            (w.nll[0] - first).abs() < 1e-4 * first,
            "{} vs {first}",
            w.nll[0]
        );
        // Capped: only the first chunk.
        let capped = perplexity(&model, &tokens, 8, 4, Some(1), &dev)?;
        assert_eq!(capped.tokens, 7);
        assert!(matches!(
            perplexity(&model, &tokens[..1], 8, 4, None, &dev),
            Err(Error::Config(_))
        ));
        Ok(())
    }

    #[test]
    fn chunking_follows_the_definition() {
        assert_eq!(chunks(10, 4, None), vec![(0, 4), (4, 4), (8, 2)]);
        // A 1-token tail predicts nothing and is dropped.
        assert_eq!(chunks(9, 4, None), vec![(0, 4), (4, 4)]);
        assert_eq!(chunks(8, 4, None), vec![(0, 4), (4, 4)]);
        assert_eq!(chunks(3, 4, None), vec![(0, 3)]);
        assert_eq!(chunks(1, 4, None), vec![]);
        assert_eq!(chunks(100, 4, Some(2)), vec![(0, 4), (4, 4)]);
    }
}
