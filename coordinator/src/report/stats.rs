//! The statistics behind the report's intervals: a paired bootstrap over validation windows for
//! one trial against another, and Student-t intervals across seeds.
//!
//! Why paired over windows: two trials that share data and context are scored on exactly the same
//! validation windows, and most of the spread of a window's loss is the text itself (some windows
//! are hard for every model). Resampling windows and recomputing both trials' losses on the same
//! resample cancels that shared spread, so the interval is about the difference between the
//! models, which is what a reviewer asks. The resampling is seeded, so a report is reproducible.

use serde::Serialize;

/// Resamples of the paired bootstrap.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;
/// Seed of the bootstrap's generator: the same windows give the same interval in every report.
pub const BOOTSTRAP_SEED: u64 = 0x0ab1_a7e5_eed5_2000;

/// A difference between two trials with its paired bootstrap 95 % intervals.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PairedDelta {
    /// perplexity(a) − perplexity(b) over all windows.
    pub perplexity: f64,
    /// 2.5 % and 97.5 % percentiles of the resampled perplexity difference.
    pub perplexity_ci: [f64; 2],
    /// loss(a) − loss(b) (nats per token).
    pub loss: f64,
    pub loss_ci: [f64; 2],
    /// Windows paired.
    pub windows: usize,
}

/// True when the interval contains 0: the two cannot be told apart at this level.
pub fn contains_zero(ci: [f64; 2]) -> bool {
    ci[0] <= 0.0 && 0.0 <= ci[1]
}

/// SplitMix64: small, fast, and good enough to draw bootstrap indices; no dependency needed.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (Lemire's multiply-shift; the bias is below 2^-50 for any window count).
    fn below(&mut self, n: usize) -> usize {
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
}

/// Quantile `q` of sorted values with linear interpolation between order statistics.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Paired bootstrap of trial `a` against trial `b` over their validation windows (summed NLL and
/// predicted tokens per window). Refuses, with the reason, when the windows are not the same:
/// different counts or different token counts per window (other data or context).
pub fn paired_bootstrap(
    a_nll: &[f64],
    a_tokens: &[u64],
    b_nll: &[f64],
    b_tokens: &[u64],
    resamples: usize,
    seed: u64,
) -> Result<PairedDelta, String> {
    if a_nll.len() != a_tokens.len() || b_nll.len() != b_tokens.len() {
        return Err("per-window NLL and token lists differ in length".into());
    }
    if a_nll.is_empty() || b_nll.is_empty() {
        return Err("no per-window NLL recorded".into());
    }
    if a_nll.len() != b_nll.len() {
        return Err(format!(
            "different validation windows: {} vs {}",
            a_nll.len(),
            b_nll.len()
        ));
    }
    if let Some(i) = (0..a_tokens.len()).find(|&i| a_tokens[i] != b_tokens[i]) {
        return Err(format!(
            "validation window {i} has {} tokens in one trial and {} in the other",
            a_tokens[i], b_tokens[i]
        ));
    }
    if !a_nll.iter().chain(b_nll).all(|x| x.is_finite()) {
        return Err("a window's NLL is not finite".into());
    }
    let n = a_nll.len();
    let loss = |idx: &mut dyn Iterator<Item = usize>| {
        let (mut na, mut nb, mut t) = (0.0, 0.0, 0u64);
        for i in idx {
            na += a_nll[i];
            nb += b_nll[i];
            t += a_tokens[i];
        }
        let t = t.max(1) as f64;
        (na / t, nb / t)
    };
    let (la, lb) = loss(&mut (0..n));
    let mut rng = SplitMix64(seed);
    let mut d_loss = Vec::with_capacity(resamples);
    let mut d_ppl = Vec::with_capacity(resamples);
    for _ in 0..resamples.max(1) {
        let (ra, rb) = loss(&mut (0..n).map(|_| rng.below(n)));
        d_loss.push(ra - rb);
        d_ppl.push(ra.exp() - rb.exp());
    }
    d_loss.sort_by(f64::total_cmp);
    d_ppl.sort_by(f64::total_cmp);
    Ok(PairedDelta {
        perplexity: la.exp() - lb.exp(),
        perplexity_ci: [quantile(&d_ppl, 0.025), quantile(&d_ppl, 0.975)],
        loss: la - lb,
        loss_ci: [quantile(&d_loss, 0.025), quantile(&d_loss, 0.975)],
        windows: n,
    })
}

/// Two-sided 95 % critical value of Student's t with `df` degrees of freedom (the 0.975
/// quantile): a table to 30, then the Cornish-Fisher expansion around the normal quantile
/// (error below 1e-3 there).
pub fn t_critical_95(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::NAN,
        1..=30 => TABLE[df - 1],
        _ => {
            let z = 1.959_964f64;
            let v = df as f64;
            z + (z.powi(3) + z) / (4.0 * v)
                + (5.0 * z.powi(5) + 16.0 * z.powi(3) + 3.0 * z) / (96.0 * v * v)
        }
    }
}

/// Mean, sample standard deviation and the 95 % t-interval of the mean; None below two values.
pub fn t_interval(xs: &[f64]) -> Option<(f64, f64, [f64; 2])> {
    if xs.len() < 2 {
        return None;
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let sd = (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let half = t_critical_95(xs.len() - 1) * sd / n.sqrt();
    Some((mean, sd, [mean - half, mean + half]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_trials_differ_by_exactly_zero() {
        let nll = [10.0, 20.0, 5.0, 7.5];
        let tok = [10, 10, 10, 6];
        let d = paired_bootstrap(&nll, &tok, &nll, &tok, 500, 1).unwrap();
        assert_eq!((d.loss, d.loss_ci), (0.0, [0.0, 0.0]));
        assert_eq!((d.perplexity, d.perplexity_ci), (0.0, [0.0, 0.0]));
        assert!(contains_zero(d.loss_ci));
    }

    /// Every window of `a` is worse by exactly c nats per token: every resample says c.
    #[test]
    fn a_constant_shift_has_a_zero_width_interval() {
        let b: Vec<f64> = (0..50).map(|i| 10.0 + (i % 7) as f64 * 3.0).collect();
        let tok = vec![9u64; 50];
        let a: Vec<f64> = b.iter().map(|x| x + 0.25 * 9.0).collect();
        let d = paired_bootstrap(&a, &tok, &b, &tok, 300, 2).unwrap();
        assert!((d.loss - 0.25).abs() < 1e-12);
        assert!((d.loss_ci[0] - 0.25).abs() < 1e-9 && (d.loss_ci[1] - 0.25).abs() < 1e-9);
        assert!(d.perplexity > 0.0 && d.perplexity_ci[0] > 0.0);
        assert!(!contains_zero(d.loss_ci));
    }

    /// Per-window loss differences of mean 0.5 and standard deviation 1 over 400 equal windows:
    /// the interval is the normal one, 0.5 ± 1.96/√400 = [0.402, 0.598], to resampling noise.
    #[test]
    fn the_interval_has_the_textbook_width() {
        let n = 400;
        let tok = vec![1u64; n];
        let b: Vec<f64> = (0..n).map(|i| 3.0 + (i % 5) as f64).collect();
        let a: Vec<f64> = (0..n)
            .map(|i| b[i] + 0.5 + if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let d = paired_bootstrap(&a, &tok, &b, &tok, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED).unwrap();
        assert!((d.loss - 0.5).abs() < 1e-12);
        assert!((d.loss_ci[0] - 0.402).abs() < 0.015, "{:?}", d.loss_ci);
        assert!((d.loss_ci[1] - 0.598).abs() < 0.015, "{:?}", d.loss_ci);
        // Fixed seed: the same interval every time.
        let again =
            paired_bootstrap(&a, &tok, &b, &tok, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED).unwrap();
        assert_eq!(d, again);
    }

    #[test]
    fn different_windows_are_refused() {
        let e = paired_bootstrap(&[1.0, 2.0], &[3, 3], &[1.0], &[3], 10, 0).unwrap_err();
        assert!(e.contains("2 vs 1"), "{e}");
        let e = paired_bootstrap(&[1.0, 2.0], &[3, 3], &[1.0, 2.0], &[3, 2], 10, 0).unwrap_err();
        assert!(e.contains("window 1"), "{e}");
        let e = paired_bootstrap(&[], &[], &[], &[], 10, 0).unwrap_err();
        assert!(e.contains("no per-window"), "{e}");
    }

    /// 1..5: mean 3, s = √2.5, t(4) = 2.776: 3 ± 1.963.
    #[test]
    fn t_interval_of_a_known_sample() {
        let (m, s, ci) = t_interval(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(m, 3.0);
        assert!((s - 2.5f64.sqrt()).abs() < 1e-12);
        let half = 2.776 * 2.5f64.sqrt() / 5f64.sqrt();
        assert!((ci[0] - (3.0 - half)).abs() < 1e-12 && (ci[1] - (3.0 + half)).abs() < 1e-12);
        assert!((half - 1.963).abs() < 1e-3);
        assert!(t_interval(&[1.0]).is_none());
        // Beyond the table the expansion meets the known values.
        assert!((t_critical_95(40) - 2.021).abs() < 1e-3);
        assert!((t_critical_95(120) - 1.980).abs() < 1e-3);
    }
}
