//! What a stop signal means: the first asks for a clean stop, a repeat soon after is the same
//! request arriving twice, and only a later one means "exit now".
//!
//! A worker often gets one stop request twice within milliseconds: Slurm signals every process of
//! a job (`scancel`, preemption, the time limit) while the batch shell or `--all-gpus` supervisor
//! forwards its own copy; a terminal's Ctrl-C reaches the whole process group; `docker stop`
//! after `kill`. Treating the second as "exit now" threw away the checkpoint the first one
//! asked for. So a repeat within [`REPEAT_WINDOW`] of the first is logged and ignored; an
//! operator who means "now" sends it again after that (or SIGKILL).

use std::time::{Duration, Instant};

/// Signals this close after the first are the same stop request.
pub const REPEAT_WINDOW: Duration = Duration::from_secs(3);

/// What to do about one received stop signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopAction {
    /// The first: checkpoint, report, exit cleanly.
    Stop,
    /// A repeat inside the window: nothing more to do.
    Repeat,
    /// A later one: exit at once.
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

    /// A stop signal arrived at `now`.
    pub fn received(&mut self, now: Instant) -> StopAction {
        match self.first {
            None => {
                self.first = Some(now);
                StopAction::Stop
            }
            Some(t) if now.saturating_duration_since(t) < REPEAT_WINDOW => StopAction::Repeat,
            Some(_) => StopAction::ExitNow,
        }
    }

    /// Whether a stop was asked for.
    pub fn stopping(&self) -> bool {
        self.first.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_within_the_window_is_the_same_request() {
        let t0 = Instant::now();
        let mut s = StopSignals::new();
        assert!(!s.stopping());
        assert_eq!(s.received(t0), StopAction::Stop);
        assert!(s.stopping());
        // Slurm's and the supervisor's SIGTERM, milliseconds apart.
        assert_eq!(
            s.received(t0 + Duration::from_millis(5)),
            StopAction::Repeat
        );
        assert_eq!(
            s.received(t0 + REPEAT_WINDOW - Duration::from_millis(1)),
            StopAction::Repeat
        );
        // An operator who means it, later.
        assert_eq!(s.received(t0 + REPEAT_WINDOW), StopAction::ExitNow);
        assert_eq!(
            s.received(t0 + Duration::from_secs(60)),
            StopAction::ExitNow
        );
    }
}
