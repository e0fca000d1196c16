//! What each trial and each arm cost: device time over every attempt, GPU-hours, money where a
//! price is known, peak memory, throughput, and the time lost to preemption and retries on its
//! own line.
//!
//! The coordinator records every attempt (worker, start, end, how it ended); a worker may say at
//! registration what an hour of its device costs (`ablate-worker --price-per-hour`), and a sweep
//! file may set `price_per_hour` for workers that did not. Device time counts every device an
//! attempt held (a gang of 4 for 10 minutes is 40 device-minutes), including attempts that were
//! preempted, expired or failed: that is what a rented machine bills. The time of attempts that
//! did not finish is also shown apart ("lost"), so the price of preemption is visible.

use experiments::trial::TrialMetrics;
use serde::Serialize;

/// One attempt as the cost table sees it (from the coordinator's attempts table).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct AttemptSpan {
    pub attempt: u32,
    /// finished | failed | preempted | expired | lost | cancelled; empty while it runs.
    pub outcome: String,
    pub started_ms: i64,
    /// None while it runs.
    pub ended_ms: Option<i64>,
    /// Devices the attempt held (the gang's size; 1 for most trials).
    pub devices: u32,
    /// cpu | cuda | metal (the device kind of rank 0's worker).
    pub device_kind: String,
    /// Summed price per hour of the attempt's workers; 0 when none was set.
    pub price_per_hour: f64,
}

impl AttemptSpan {
    /// Device-seconds held, up to `now_ms` for an attempt still running.
    pub fn device_seconds(&self, now_ms: i64) -> f64 {
        let end = self.ended_ms.unwrap_or(now_ms);
        (end - self.started_ms).max(0) as f64 / 1000.0 * f64::from(self.devices.max(1))
    }

    /// An attempt whose time bought nothing that was kept: it was stopped from outside, lost its
    /// lease, or failed (a retry then started over from its last checkpoint).
    pub fn is_lost(&self) -> bool {
        matches!(
            self.outcome.as_str(),
            "preempted" | "expired" | "lost" | "failed"
        )
    }
}

/// What one trial cost.
#[derive(Clone, Debug, PartialEq, Default, Serialize)]
pub struct TrialCost {
    /// Device-seconds over every attempt (each device of a gang counts).
    pub device_seconds: f64,
    /// Hours on CUDA devices (part of `device_seconds`).
    pub gpu_hours: f64,
    /// Device-seconds of attempts that did not finish (preempted, expired, lost, failed).
    pub lost_device_seconds: f64,
    /// Attempts that did not finish.
    pub lost_attempts: u32,
    /// Money over every attempt; None when an attempt had no price (no worker or sweep price).
    pub cost: Option<f64>,
    /// The part of `cost` spent on attempts that did not finish.
    pub lost_cost: Option<f64>,
    /// Training tokens per second of training wall time (TrialMetrics::train_seconds).
    pub tokens_per_s: Option<f64>,
    /// Peak memory of the finishing attempt, bytes.
    pub peak_memory_bytes: Option<u64>,
}

/// Sums the attempts of one trial. `sweep_price` is the sweep file's `price_per_hour` per
/// device, used for attempts whose workers set none.
pub fn trial_cost(
    attempts: &[AttemptSpan],
    metrics: Option<&TrialMetrics>,
    sweep_price: Option<f64>,
    now_ms: i64,
) -> TrialCost {
    let mut c = TrialCost::default();
    let mut money = Some(0.0);
    let mut lost_money = Some(0.0);
    for a in attempts {
        let s = a.device_seconds(now_ms);
        c.device_seconds += s;
        if a.device_kind == "cuda" {
            c.gpu_hours += s / 3600.0;
        }
        // The attempt's rate for all its devices: the workers' own prices, else the sweep's.
        let rate = if a.price_per_hour > 0.0 {
            Some(a.price_per_hour)
        } else {
            sweep_price.map(|p| p * f64::from(a.devices.max(1)))
        };
        let wall_h = s / f64::from(a.devices.max(1)) / 3600.0;
        let spent = rate.map(|r| r * wall_h);
        money = money.zip(spent).map(|(m, x)| m + x);
        if a.is_lost() {
            c.lost_device_seconds += s;
            c.lost_attempts += 1;
            lost_money = lost_money.zip(spent).map(|(m, x)| m + x);
        }
    }
    if !attempts.is_empty() {
        c.cost = money;
        c.lost_cost = lost_money;
    }
    if let Some(m) = metrics {
        c.tokens_per_s = m
            .train_seconds
            .filter(|s| *s > 0.0 && m.train_tokens > 0)
            .map(|s| m.train_tokens as f64 / s);
        c.peak_memory_bytes = m.peak_memory_bytes;
    }
    c
}

/// Several trials' costs summed (an arm's seeds): times and money add, throughput is the mean of
/// the trials that measured it, peak memory the largest.
pub fn sum_costs<'a>(costs: impl IntoIterator<Item = &'a TrialCost>) -> TrialCost {
    let mut out = TrialCost {
        cost: Some(0.0),
        lost_cost: Some(0.0),
        ..TrialCost::default()
    };
    let mut tps = Vec::new();
    let mut any = false;
    for c in costs {
        any = true;
        out.device_seconds += c.device_seconds;
        out.gpu_hours += c.gpu_hours;
        out.lost_device_seconds += c.lost_device_seconds;
        out.lost_attempts += c.lost_attempts;
        out.cost = out.cost.zip(c.cost).map(|(a, b)| a + b);
        out.lost_cost = out.lost_cost.zip(c.lost_cost).map(|(a, b)| a + b);
        tps.extend(c.tokens_per_s);
        out.peak_memory_bytes = out.peak_memory_bytes.max(c.peak_memory_bytes);
    }
    if !any {
        out.cost = None;
        out.lost_cost = None;
    }
    if !tps.is_empty() {
        out.tokens_per_s = Some(tps.iter().sum::<f64>() / tps.len() as f64);
    }
    out
}

/// "1.2 GiB" / "340 MiB".
pub fn human_bytes(b: u64) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    let mib = b as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.2} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

/// Money with two decimals (no currency: the price's own).
pub fn fmt_money(m: Option<f64>) -> String {
    m.map_or_else(|| "—".into(), |m| format!("{m:.2}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(outcome: &str, secs: i64, devices: u32, kind: &str, price: f64) -> AttemptSpan {
        AttemptSpan {
            attempt: 1,
            outcome: outcome.into(),
            started_ms: 1_000,
            ended_ms: Some(1_000 + secs * 1000),
            devices,
            device_kind: kind.into(),
            price_per_hour: price,
        }
    }

    #[test]
    fn device_time_counts_every_attempt_and_device_and_keeps_the_lost_part_apart() {
        let attempts = [
            span("preempted", 600, 1, "cuda", 2.0),
            span("finished", 1800, 4, "cuda", 8.0),
        ];
        let m = TrialMetrics {
            train_tokens: 9_000,
            train_seconds: Some(1_500.0),
            peak_memory_bytes: Some(3 << 30),
            ..TrialMetrics::default()
        };
        let c = trial_cost(&attempts, Some(&m), None, 0);
        assert_eq!(c.device_seconds, 600.0 + 4.0 * 1800.0);
        assert!((c.gpu_hours - 7800.0 / 3600.0).abs() < 1e-12);
        assert_eq!(c.lost_device_seconds, 600.0);
        assert_eq!(c.lost_attempts, 1);
        // 10 minutes at 2/h + 30 minutes at 8/h (the gang's summed price).
        assert!((c.cost.unwrap() - (2.0 / 6.0 + 4.0)).abs() < 1e-12);
        assert!((c.lost_cost.unwrap() - 2.0 / 6.0).abs() < 1e-12);
        assert_eq!(c.tokens_per_s, Some(6.0));
        assert_eq!(c.peak_memory_bytes, Some(3 << 30));
    }

    #[test]
    fn the_sweep_price_covers_workers_without_one_and_no_price_means_no_money() {
        let cpu = [span("finished", 3600, 2, "cpu", 0.0)];
        let c = trial_cost(&cpu, None, Some(1.5), 0);
        assert_eq!(c.gpu_hours, 0.0, "CPU time is not GPU time");
        assert!((c.cost.unwrap() - 3.0).abs() < 1e-12, "{:?}", c.cost);
        let unpriced = trial_cost(&cpu, None, None, 0);
        assert_eq!(unpriced.cost, None);
        assert_eq!(trial_cost(&[], None, Some(1.0), 0).cost, None);
    }

    #[test]
    fn a_running_attempt_counts_up_to_now() {
        let mut a = span("", 0, 1, "cpu", 0.0);
        a.ended_ms = None;
        assert_eq!(a.device_seconds(11_000), 10.0);
        assert!(!a.is_lost());
    }

    #[test]
    fn an_arm_sums_its_seeds() {
        let a = TrialCost {
            device_seconds: 10.0,
            cost: Some(1.0),
            tokens_per_s: Some(100.0),
            peak_memory_bytes: Some(5),
            ..TrialCost::default()
        };
        let b = TrialCost {
            device_seconds: 30.0,
            cost: Some(2.0),
            tokens_per_s: Some(300.0),
            peak_memory_bytes: Some(9),
            lost_device_seconds: 4.0,
            lost_attempts: 1,
            ..TrialCost::default()
        };
        let s = sum_costs([&a, &b]);
        assert_eq!(s.device_seconds, 40.0);
        assert_eq!(s.cost, Some(3.0));
        assert_eq!(s.tokens_per_s, Some(200.0));
        assert_eq!(s.peak_memory_bytes, Some(9));
        assert_eq!(s.lost_attempts, 1);
        let unpriced = TrialCost::default();
        assert_eq!(sum_costs([&a, &unpriced]).cost, None);
    }
}
