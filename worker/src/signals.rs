//! What a stop signal means, and how long a stop may take.
//!
//! The first SIGTERM or SIGINT asks for a clean stop: checkpoint, report the attempt preempted,
//! exit 0, all within the stop grace ([`StopGrace`], `--stop-grace` / `ABLATE_STOP_GRACE`,
//! default [`DEFAULT_STOP_GRACE`]); whatever the network does, the process is gone when the grace
//! runs out. Set it a little under the supervisor's own budget (systemd's `TimeoutStopSec`,
//! compose's `stop_grace_period`, Kubernetes' `terminationGracePeriodSeconds`, Slurm's
//! `KillWait`), so that the worker, not SIGKILL, ends the stop.
//!
//! A worker often gets one stop request more than once: Slurm signals every process of a job
//! (`scancel`, preemption, the time limit) while the batch shell or `--all-gpus` supervisor
//! forwards its own copy; `docker stop` after the provider's own SIGTERM; an operator who runs
//! `systemctl stop` twice. So a repeated SIGTERM is always the same request: it changes nothing,
//! and the grace already bounds the stop. Only SIGINT, a person at a terminal, can escalate:
//! a Ctrl-C more than [`REPEAT_WINDOW`] after the first stop signal exits at once (within the
//! window it is the same keypress reaching the process group twice).

use std::time::{Duration, Instant};

/// A SIGINT this close after the first stop signal is the same request.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(3);

/// The stop grace when none is configured: spot machines often give 30 s of notice.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(25);

/// Which stop signal arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: from a supervisor (systemd, Docker, Kubernetes, Slurm, the fleet supervisor).
    Term,
    /// SIGINT: Ctrl-C at a terminal.
    Int,
}

/// What to do about one received stop signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopAction {
    /// The first: checkpoint, report, exit cleanly.
    Stop,
    /// The same request again: nothing more to do (the grace bounds the stop).
    Repeat,
    /// A later Ctrl-C: exit at once.
    ExitNow,
}

/// Counts stop signals and tells them apart.
#[derive(Debug, Default)]
pub struct StopSignals {
    first: Option<Instant>,
}

impl StopSignals {
    pub fn new() -> StopSignals {
        StopSignals::default()
    }

    /// Stop signal `sig` arrived at `now`.
    pub fn received(&mut self, sig: Signal, now: Instant) -> StopAction {
        match (self.first, sig) {
            (None, _) => {
                self.first = Some(now);
                StopAction::Stop
            }
            (Some(_), Signal::Term) => StopAction::Repeat,
            (Some(t), Signal::Int) if now.saturating_duration_since(t) < REPEAT_WINDOW => {
                StopAction::Repeat
            }
            (Some(_), Signal::Int) => StopAction::ExitNow,
        }
    }

    /// Whether a stop was asked for.
    pub fn stopping(&self) -> bool {
        self.first.is_some()
    }
}

/// How long a stopping worker may take before it exits anyway: a duration such as `60s`,
/// `1m30s`, `2m` or plain seconds (`60`), at least 1 s and at most an hour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopGrace(pub Duration);

impl Default for StopGrace {
    fn default() -> Self {
        StopGrace(DEFAULT_STOP_GRACE)
    }
}

impl std::fmt::Display for StopGrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}s", self.0.as_secs())
    }
}

impl std::str::FromStr for StopGrace {
    type Err = String;

    fn from_str(s: &str) -> Result<StopGrace, String> {
        let d = parse_duration(s)?;
        if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
            return Err(format!(
                "{s:?}: a stop grace must be between 1s and 1h (a little under the supervisor's \
                 stop timeout)"
            ));
        }
        Ok(StopGrace(d))
    }
}

/// `90`, `90s`, `1m30s`, `2m`, `1h` -> a duration (whole seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a duration (e.g. 60s, 1m30s, 90)");
    if t.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let (mut total, mut num) = (0u64, String::new());
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        let n: u64 = num.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_sigterm_is_always_the_same_request() {
        let t0 = Instant::now();
        let mut s = StopSignals::new();
        assert!(!s.stopping());
        assert_eq!(s.received(Signal::Term, t0), StopAction::Stop);
        assert!(s.stopping());
        // Slurm's and the supervisor's SIGTERM, milliseconds apart.
        assert_eq!(
            s.received(Signal::Term, t0 + Duration::from_millis(5)),
            StopAction::Repeat
        );
        // A second scancel or `systemctl stop` well into a long grace: still one stop.
        assert_eq!(
            s.received(Signal::Term, t0 + Duration::from_secs(50)),
            StopAction::Repeat
        );
    }

    #[test]
    fn a_later_ctrl_c_exits_at_once() {
        let t0 = Instant::now();
        let mut s = StopSignals::new();
        assert_eq!(s.received(Signal::Int, t0), StopAction::Stop);
        // The same keypress reaching the process group twice.
        assert_eq!(
            s.received(Signal::Int, t0 + REPEAT_WINDOW - Duration::from_millis(1)),
            StopAction::Repeat
        );
        assert_eq!(
            s.received(Signal::Int, t0 + REPEAT_WINDOW),
            StopAction::ExitNow
        );
        // A supervisor's SIGTERM, then an impatient person.
        let mut s = StopSignals::new();
        assert_eq!(s.received(Signal::Term, t0), StopAction::Stop);
        assert_eq!(
            s.received(Signal::Int, t0 + Duration::from_secs(10)),
            StopAction::ExitNow
        );
    }

    #[test]
    fn stop_grace_parses_durations_and_refuses_nonsense() {
        let g = |s: &str| s.parse::<StopGrace>().map(|g| g.0.as_secs());
        assert_eq!(g("60s"), Ok(60));
        assert_eq!(g("60"), Ok(60));
        assert_eq!(g("1m30s"), Ok(90));
        assert_eq!(g(" 2m "), Ok(120));
        assert_eq!(g("1h"), Ok(3600));
        assert!(g("0s").unwrap_err().contains("between 1s and 1h"));
        assert!(g("2h").unwrap_err().contains("between 1s and 1h"));
        for bad in ["", "s", "10x", "1.5s", "-5", "30 s5"] {
            assert!(g(bad).unwrap_err().contains("not a duration"), "{bad}");
        }
        assert_eq!(StopGrace::default().to_string(), "25s");
    }
}
