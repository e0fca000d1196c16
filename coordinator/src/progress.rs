//! Live progress of a sweep while `ablate run` (or `ablate status --watch`) waits on it.
//!
//! The caller polls the coordinator and hands [`ProgressView::update`] a snapshot of every trial;
//! the view works out what changed. On an interactive terminal it draws indicatif bars (one per
//! running trial with step/total, loss, tokens/s and ETA, plus an overall sweep bar); otherwise —
//! CI logs, `> file`, pipes — it prints one plain line per event (trial started, every tenth of
//! its steps, finished or failed), because redrawn bars make unreadable logs.
//!
//! Progress goes to stderr in both modes so stdout carries only the summary table and can be
//! redirected or parsed.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::human_duration;
use crate::scheduler::TrialState;

/// What the view needs to know about one trial at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrialStatus {
    pub id: String,
    pub name: String,
    /// Parsed once, where the client receives the coordinator's answer.
    pub state: TrialState,
    pub attempts: u32,
    pub step: u64,
    pub total: u64,
    pub loss: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    pub perplexity: Option<f64>,
    pub wall_seconds: Option<f64>,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub worker: Option<String>,
}

/// Counts by state, for the overall line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub done: usize,
    pub failed: usize,
    /// Stopped early by the tuner (`[tune]`): ended, not failed.
    pub stopped: usize,
    pub running: usize,
    pub queued: usize,
    pub total: usize,
}

impl Counts {
    pub fn of(trials: &[TrialStatus]) -> Counts {
        let mut c = Counts {
            total: trials.len(),
            ..Counts::default()
        };
        for t in trials {
            match t.state {
                TrialState::Finished => c.done += 1,
                TrialState::Stopped => c.stopped += 1,
                TrialState::Failed | TrialState::Cancelled => c.failed += 1,
                TrialState::Running => c.running += 1,
                TrialState::Queued | TrialState::Waiting => c.queued += 1,
            }
        }
        c
    }

    pub fn finished(&self) -> usize {
        self.done + self.failed + self.stopped
    }

    pub fn summary(&self) -> String {
        let stopped = if self.stopped > 0 {
            format!(" · {} stopped by the tuner", self.stopped)
        } else {
            String::new()
        };
        format!(
            "{}/{} finished · {} done · {} failed{stopped} · {} running · {} queued",
            self.finished(),
            self.total,
            self.done,
            self.failed,
            self.running,
            self.queued
        )
    }
}

fn step_text(t: &TrialStatus) -> String {
    let mut s = String::new();
    if let Some(l) = t.loss {
        s.push_str(&format!("loss {l:.3}"));
    }
    if let Some(tps) = t.tokens_per_sec {
        if !s.is_empty() {
            s.push_str(" · ");
        }
        s.push_str(&format!("{tps:.0} tok/s"));
    }
    if t.attempts > 1 {
        s.push_str(&format!(" · attempt {}", t.attempts));
    }
    s
}

/// One line for a trial that reached a terminal state.
pub fn final_line(t: &TrialStatus) -> String {
    if t.state == TrialState::Finished {
        let ppl = t
            .perplexity
            .map_or_else(String::new, |p| format!(" perplexity {p:.2}"));
        let wall = t
            .wall_seconds
            .map_or_else(String::new, |w| format!(" in {}", human_duration(w)));
        format!("✓ {} done{ppl}{wall}", t.name)
    } else if t.state == TrialState::Stopped {
        // The message says where and why ("stopped by the tuner at step 10 ...").
        format!(
            "■ {} {}",
            t.name,
            t.message.as_deref().unwrap_or("stopped by the tuner")
        )
    } else {
        let why = match (&t.reason, &t.message) {
            (Some(r), Some(m)) => format!(": {r}: {m}"),
            (Some(r), None) => format!(": {r}"),
            (None, Some(m)) => format!(": {m}"),
            (None, None) => String::new(),
        };
        format!("✗ {} {}{why}", t.name, t.state)
    }
}

/// Progress display; see the module docs for the two modes.
pub struct ProgressView {
    mode: Mode,
    last: HashMap<String, TrialStatus>,
}

enum Mode {
    Bars {
        multi: MultiProgress,
        overall: ProgressBar,
        bars: HashMap<String, ProgressBar>,
    },
    Plain {
        out: Box<dyn Write + Send>,
        /// Per trial: the last step printed and when.
        printed: HashMap<String, (u64, Instant)>,
        last_counts: Option<Counts>,
    },
}

impl ProgressView {
    /// Bars when stderr and stdout are both terminals, plain lines on stderr otherwise.
    pub fn new(title: &str) -> ProgressView {
        if std::io::stderr().is_terminal() && std::io::stdout().is_terminal() {
            Self::bars(title)
        } else {
            Self::plain(Box::new(std::io::stderr()))
        }
    }

    /// Plain lines into `out` (also what tests use).
    pub fn plain(out: Box<dyn Write + Send>) -> ProgressView {
        ProgressView {
            mode: Mode::Plain {
                out,
                printed: HashMap::new(),
                last_counts: None,
            },
            last: HashMap::new(),
        }
    }

    fn bars(title: &str) -> ProgressView {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(4));
        let overall = multi.add(
            ProgressBar::new(0).with_style(
                ProgressStyle::with_template(
                    "{prefix:.bold} [{bar:30.green/white}] {pos}/{len} trials {msg} ({elapsed})",
                )
                .expect("valid template")
                .progress_chars("=> "),
            ),
        );
        overall.set_prefix(title.to_string());
        overall.enable_steady_tick(Duration::from_millis(500));
        ProgressView {
            mode: Mode::Bars {
                multi,
                overall,
                bars: HashMap::new(),
            },
            last: HashMap::new(),
        }
    }

    /// Print a line above the bars (or as a plain line).
    pub fn println(&mut self, line: &str) {
        match &mut self.mode {
            Mode::Bars { multi, .. } => {
                let _ = multi.println(line);
            }
            Mode::Plain { out, .. } => {
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }

    /// Show a new snapshot of every trial of the sweep.
    pub fn update(&mut self, trials: &[TrialStatus]) {
        let counts = Counts::of(trials);
        let mut lines = Vec::new();
        for t in trials {
            let prev = self.last.get(&t.id);
            let changed_state = prev.is_none_or(|p| p.state != t.state || p.attempts != t.attempts);
            if changed_state && t.state.is_terminal() && prev.is_some() {
                lines.push(final_line(t));
            }
            if changed_state && t.state == TrialState::Running {
                let on = t
                    .worker
                    .as_deref()
                    .map_or_else(String::new, |w| format!(" on {w}"));
                let attempt = if t.attempts > 1 {
                    format!(" (attempt {})", t.attempts)
                } else {
                    String::new()
                };
                lines.push(format!("▶ {} started{on}{attempt}", t.name));
            }
        }
        match &mut self.mode {
            Mode::Bars {
                multi,
                overall,
                bars,
            } => {
                for line in &lines {
                    let _ = multi.println(line);
                }
                overall.set_length(counts.total as u64);
                overall.set_position(counts.finished() as u64);
                overall.set_message(format!(
                    "· {} running · {} failed",
                    counts.running, counts.failed
                ));
                for t in trials {
                    let running = t.state == TrialState::Running;
                    match (running, bars.get(&t.id)) {
                        (true, None) => {
                            let bar = multi.add(
                                ProgressBar::new(t.total.max(1)).with_style(
                                    ProgressStyle::with_template(
                                        "  {prefix:<18} [{bar:30.cyan/blue}] {pos:>6}/{len:6} {msg} ETA {eta}",
                                    )
                                    .expect("valid template")
                                    .progress_chars("=> "),
                                ),
                            );
                            bar.set_prefix(t.name.clone());
                            bar.set_position(t.step);
                            bar.reset_eta();
                            bar.set_message(step_text(t));
                            bars.insert(t.id.clone(), bar);
                        }
                        (true, Some(bar)) => {
                            if t.total > 0 {
                                bar.set_length(t.total);
                            }
                            // A new attempt resumes from a checkpoint: restart the rate estimate.
                            if self
                                .last
                                .get(&t.id)
                                .is_some_and(|p| p.attempts != t.attempts)
                            {
                                bar.reset_eta();
                            }
                            bar.set_position(t.step);
                            bar.set_message(step_text(t));
                        }
                        (false, Some(_)) => {
                            if let Some(bar) = bars.remove(&t.id) {
                                bar.finish_and_clear();
                                multi.remove(&bar);
                            }
                        }
                        (false, None) => {}
                    }
                }
            }
            Mode::Plain {
                out,
                printed,
                last_counts,
            } => {
                for line in &lines {
                    let _ = writeln!(out, "{line}");
                }
                for t in trials
                    .iter()
                    .filter(|t| t.state == TrialState::Running && t.total > 0)
                {
                    // A line every tenth of the steps, or every 30 s on slow trials.
                    let tenth = (t.total / 10).max(1);
                    let (last_step, at) =
                        printed.get(&t.id).copied().unwrap_or((0, Instant::now()));
                    let due = t.step >= last_step + tenth
                        || (t.step > last_step && at.elapsed() >= Duration::from_secs(30));
                    if due {
                        let _ = writeln!(
                            out,
                            "  {} step {}/{} {}",
                            t.name,
                            t.step,
                            t.total,
                            step_text(t)
                        );
                        printed.insert(t.id.clone(), (t.step, Instant::now()));
                    } else if !printed.contains_key(&t.id) {
                        printed.insert(t.id.clone(), (t.step, Instant::now()));
                    }
                }
                if *last_counts != Some(counts) && (!lines.is_empty() || last_counts.is_none()) {
                    let _ = writeln!(out, "[{}]", counts.summary());
                    *last_counts = Some(counts);
                }
                let _ = out.flush();
            }
        }
        self.last = trials.iter().map(|t| (t.id.clone(), t.clone())).collect();
    }

    /// Remove the bars (before the summary table is printed).
    pub fn finish(&mut self) {
        if let Mode::Bars {
            multi,
            overall,
            bars,
        } = &mut self.mode
        {
            for (_, bar) in bars.drain() {
                bar.finish_and_clear();
            }
            overall.finish_and_clear();
            let _ = multi.clear();
        }
    }
}

impl Drop for ProgressView {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    impl Buf {
        fn take(&self) -> String {
            String::from_utf8(std::mem::take(&mut *self.0.lock().unwrap())).unwrap()
        }
    }

    fn t(id: &str, state: &str, step: u64) -> TrialStatus {
        TrialStatus {
            id: id.into(),
            name: format!("trial-{id}"),
            state: TrialState::parse(state).expect("a trial state"),
            attempts: 1,
            step,
            total: 100,
            loss: Some(2.5),
            tokens_per_sec: Some(1000.0),
            ..TrialStatus::default()
        }
    }

    #[test]
    fn counts_put_every_state_in_one_bucket() {
        let all = [
            "queued",
            "waiting",
            "running",
            "finished",
            "failed",
            "cancelled",
            "stopped",
        ]
        .map(|s| t(s, s, 0));
        let c = Counts::of(&all);
        assert_eq!(
            c,
            Counts {
                done: 1,
                failed: 2,
                stopped: 1,
                running: 1,
                queued: 2,
                total: 7,
            }
        );
        assert_eq!(c.finished(), 4);
    }

    #[test]
    fn plain_mode_prints_transitions_and_every_tenth_of_the_steps() {
        let buf = Buf::default();
        let mut view = ProgressView::plain(Box::new(buf.clone()));
        view.update(&[t("a", "queued", 0), t("b", "finished", 0)]);
        let first = buf.take();
        // Already-finished trials from an earlier run are not announced again.
        assert!(!first.contains("trial-b"), "{first}");
        assert!(first.contains("[1/2 finished · 1 done · 0 failed · 0 running · 1 queued]"));

        view.update(&[t("a", "running", 3), t("b", "finished", 0)]);
        assert!(buf.take().contains("▶ trial-a started"));
        view.update(&[t("a", "running", 9), t("b", "finished", 0)]);
        assert_eq!(buf.take(), "", "less than a tenth of the steps: no line");
        view.update(&[t("a", "running", 14), t("b", "finished", 0)]);
        assert!(buf
            .take()
            .contains("trial-a step 14/100 loss 2.500 · 1000 tok/s"));

        let mut failed = t("a", "failed", 14);
        failed.reason = Some("diverged".into());
        failed.message = Some("NaN at step 15".into());
        view.update(&[failed, t("b", "finished", 0)]);
        let out = buf.take();
        assert!(
            out.contains("✗ trial-a failed: diverged: NaN at step 15"),
            "{out}"
        );
        assert!(out.contains("[2/2 finished · 1 done · 1 failed"), "{out}");
    }
}
