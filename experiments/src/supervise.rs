//! Keeping worker processes running: the one restart rule that `ablate run` (its local workers)
//! and `ablate-worker --all-gpus` (one child per GPU) both follow.
//!
//! The rule, per worker:
//! - A worker that exits on its own is started again after a growing delay (1 s, 2 s, 4 s … capped
//!   at a minute), at most `max_in_a_row` times in a row. A worker that ran for `reset_after` (five
//!   minutes) before it exited starts a fresh count: a crash a day is not a crash loop.
//! - Past the cap the worker is given up; when every worker is, the supervisor says so and the
//!   caller exits non-zero (systemd, Slurm or the user sees the failure, not a restart loop).
//! - A worker that exits with the refused status (78, `EX_CONFIG`: the coordinator refused it for a
//!   reason a restart cannot fix, such as another protocol version) is never restarted.
//! - A worker that exits 0 while the supervisor is not stopping was drained (`ablate drain`, a
//!   rolling upgrade): it starts again after a second with a fresh count, from the binary now at
//!   the supervisor's path.
//! - Once the caller stops the supervisor (a signal, the sweep is done) nothing is restarted.
//!
//! The module holds the bookkeeping only: the caller spawns (it knows the command line, the log
//! files and the environment), polls from its own loop, and reports the [`Event`]s its own way.
//! Candle-free, so the coordinator's `ablate run` uses it without linking the ML.

use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// When to restart and when to give up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Restarts in a row after which a worker is given up.
    pub max_in_a_row: u32,
    /// A worker that ran this long before exiting starts a fresh count.
    pub reset_after: Duration,
    /// The exit status that means "refused, do not restart" (`ablate_proto::EXIT_CONFIG`).
    pub refused_code: i32,
}

impl Policy {
    /// The rule with `max_in_a_row` restarts, a five-minute reset and 78 as the refused status.
    pub fn new(max_in_a_row: u32) -> Policy {
        Policy {
            max_in_a_row,
            reset_after: Duration::from_secs(300),
            refused_code: 78,
        }
    }
}

/// What the supervisor does when a worker exits on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterExit {
    /// Start it again after `delay`; `in_a_row` restarts in a row so far, this one included.
    Restart { delay: Duration, in_a_row: u32 },
    /// It failed more than `max` times in a row: leave it.
    GiveUp { in_a_row: u32 },
}

/// A worker that exited after running `ran_for`, having been restarted `in_a_row` times in a row
/// before. `clean`: it exited 0 (drained).
pub fn after_exit(policy: &Policy, in_a_row: u32, ran_for: Duration, clean: bool) -> AfterExit {
    if clean {
        return AfterExit::Restart {
            delay: Duration::from_secs(1),
            in_a_row: 0,
        };
    }
    let prior = if ran_for >= policy.reset_after {
        0
    } else {
        in_a_row
    };
    let n = prior + 1;
    if n > policy.max_in_a_row {
        AfterExit::GiveUp { in_a_row: prior }
    } else {
        AfterExit::Restart {
            delay: restart_delay(n),
            in_a_row: n,
        }
    }
}

/// Delay before restart number `n` (1-based): 1 s, 2 s, 4 s … capped at a minute.
pub fn restart_delay(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// Why a worker is no longer started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    /// It exited with the refused status.
    Refused,
    /// It exited more than the policy allows in a row.
    GaveUp,
}

/// Something the caller should tell the user about.
#[derive(Debug)]
pub enum Event<E> {
    /// Worker `index` exited and starts again after `delay` (restart `in_a_row` in a row).
    Restarting {
        index: usize,
        status: ExitStatus,
        delay: Duration,
        in_a_row: u32,
    },
    /// Worker `index` exited 0 while not stopping (drained) and starts again in a second.
    Drained { index: usize },
    /// Worker `index` exited with the refused status and is not restarted.
    Refused { index: usize, status: ExitStatus },
    /// Worker `index` exited once more than allowed in a row and is given up.
    GaveUp {
        index: usize,
        status: ExitStatus,
        in_a_row: u32,
    },
    /// Worker `index` was started again.
    Restarted { index: usize },
    /// Starting worker `index` again failed; it is tried again after `retry_in`.
    RestartFailed {
        index: usize,
        error: E,
        retry_in: Duration,
    },
}

/// Where the supervised set stands as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// At least one worker runs or is due to start again.
    Running,
    /// Stopping, and every worker has exited.
    Stopped,
    /// Not stopping, and every worker is gone: `refused` when each one was refused.
    AllGone { refused: bool },
}

/// One supervised worker: the caller's description of it (`spec`) and its process.
pub struct Member<T> {
    pub spec: T,
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    due: Option<Instant>,
    gone: Option<Gone>,
}

impl<T> Member<T> {
    /// The running process, if any.
    pub fn child(&self) -> Option<&Child> {
        self.child.as_ref()
    }

    /// Why it is no longer started, if it is not.
    pub fn gone(&self) -> Option<Gone> {
        self.gone
    }

    /// Restarts in a row so far.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }
}

/// A set of worker processes kept running under one [`Policy`].
pub struct Supervisor<T> {
    policy: Policy,
    members: Vec<Member<T>>,
    stopping: bool,
}

impl<T> Supervisor<T> {
    /// Start one process per spec with `spawn(index, spec)`; the first failure is returned (the
    /// processes already started are killed).
    pub fn start<E>(
        policy: Policy,
        specs: Vec<T>,
        spawn: &mut impl FnMut(usize, &T) -> Result<Child, E>,
    ) -> Result<Supervisor<T>, E> {
        let mut sup = Supervisor {
            policy,
            members: Vec::with_capacity(specs.len()),
            stopping: false,
        };
        for (i, spec) in specs.into_iter().enumerate() {
            match spawn(i, &spec) {
                Ok(child) => sup.members.push(Member {
                    spec,
                    child: Some(child),
                    started: Instant::now(),
                    restarts: 0,
                    due: None,
                    gone: None,
                }),
                Err(e) => {
                    sup.kill_all();
                    return Err(e);
                }
            }
        }
        Ok(sup)
    }

    pub fn members(&self) -> &[Member<T>] {
        &self.members
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Reap the workers that exited, decide for each, and start those that are due.
    pub fn poll<E>(
        &mut self,
        now: Instant,
        spawn: &mut impl FnMut(usize, &T) -> Result<Child, E>,
    ) -> Vec<Event<E>> {
        let mut events = Vec::new();
        let policy = self.policy;
        for (index, m) in self.members.iter_mut().enumerate() {
            let status = match m.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status),
                // try_wait fails only for a pid that is not our child any more: treat it as gone.
                Some(Err(_)) => {
                    m.child = None;
                    None
                }
                _ => None,
            };
            if let Some(status) = status {
                m.child = None;
                if !self.stopping {
                    if status.code() == Some(policy.refused_code) {
                        m.gone = Some(Gone::Refused);
                        events.push(Event::Refused { index, status });
                    } else {
                        let clean = status.success();
                        match after_exit(
                            &policy,
                            m.restarts,
                            now.saturating_duration_since(m.started),
                            clean,
                        ) {
                            AfterExit::Restart { delay, in_a_row } => {
                                m.restarts = in_a_row;
                                m.due = Some(now + delay);
                                events.push(if clean {
                                    Event::Drained { index }
                                } else {
                                    Event::Restarting {
                                        index,
                                        status,
                                        delay,
                                        in_a_row,
                                    }
                                });
                            }
                            AfterExit::GiveUp { in_a_row } => {
                                m.gone = Some(Gone::GaveUp);
                                events.push(Event::GaveUp {
                                    index,
                                    status,
                                    in_a_row,
                                });
                            }
                        }
                    }
                }
            }
            if self.stopping || m.child.is_some() || m.due.is_none_or(|d| d > now) {
                continue;
            }
            m.due = None;
            match spawn(index, &m.spec) {
                Ok(c) => {
                    m.child = Some(c);
                    m.started = now;
                    events.push(Event::Restarted { index });
                }
                Err(error) => {
                    let retry_in = restart_delay(m.restarts + 1);
                    m.due = Some(now + retry_in);
                    events.push(Event::RestartFailed {
                        index,
                        error,
                        retry_in,
                    });
                }
            }
        }
        events
    }

    /// From now on nothing is restarted (and a worker that exits is not counted against it).
    pub fn stop(&mut self) {
        self.stopping = true;
        for m in &mut self.members {
            m.due = None;
        }
    }

    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// Processes still running.
    pub fn running(&self) -> usize {
        self.members.iter().filter(|m| m.child.is_some()).count()
    }

    pub fn standing(&self) -> Standing {
        if self.stopping {
            return if self.running() == 0 {
                Standing::Stopped
            } else {
                Standing::Running
            };
        }
        if !self.members.is_empty() && self.members.iter().all(|m| m.gone.is_some()) {
            let refused = self.members.iter().all(|m| m.gone == Some(Gone::Refused));
            return Standing::AllGone { refused };
        }
        Standing::Running
    }

    /// Send `signal` (SIGTERM, SIGINT, SIGUSR1 …) to every running worker.
    pub fn signal(&self, signal: i32) {
        for c in self.members.iter().filter_map(|m| m.child.as_ref()) {
            send_signal(c, signal);
        }
    }

    /// SIGKILL and reap every worker still running.
    pub fn kill_all(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Send a signal to a child we own and have not reaped.
pub fn send_signal(child: &Child, signal: i32) {
    #[cfg(unix)]
    // SAFETY: kill(2) takes plain integers and has no memory effects in this process; the pid is
    // that of a child we own and have not reaped (Child::wait/try_wait reap it), so it cannot
    // name an unrelated process that reused the number.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
    #[cfg(not(unix))]
    let _ = (child, signal);
}

/// Start `cmd` in its own process group (a terminal's Ctrl-C reaches only the supervisor, which
/// then stops the workers in order instead of racing them) and, on Linux, have it receive SIGTERM
/// if the supervisor dies (SIGKILL, OOM), rather than leaving orphans that keep leasing trials.
///
/// Linux sends that signal when the *thread* that spawned the child exits, so spawn from a thread
/// that lives as long as the supervisor (the main thread, a runtime's worker thread), never from
/// a pool thread that is retired when idle (tokio's `spawn_blocking`).
pub fn isolate(cmd: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure runs in the forked child before exec; prctl(2) is async-signal-safe,
        // allocates nothing and changes only the child's own attributes.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> std::io::Result<Child> {
        Command::new("sh").arg("-c").arg(script).spawn()
    }

    /// Poll until `done` holds, faking the clock forward so restart delays pass at once.
    fn drive<T>(
        sup: &mut Supervisor<T>,
        spawn: &mut impl FnMut(usize, &T) -> std::io::Result<Child>,
        mut done: impl FnMut(&Supervisor<T>, &[String]) -> bool,
    ) -> Vec<String> {
        let mut log = Vec::new();
        let mut now = Instant::now();
        for _ in 0..2000 {
            for e in sup.poll(now, spawn) {
                log.push(match e {
                    Event::Restarting {
                        index,
                        in_a_row,
                        delay,
                        ..
                    } => {
                        format!("{index} restarting {in_a_row} after {}s", delay.as_secs())
                    }
                    Event::Drained { index } => format!("{index} drained"),
                    Event::Refused { index, .. } => format!("{index} refused"),
                    Event::GaveUp {
                        index, in_a_row, ..
                    } => format!("{index} gave up after {in_a_row}"),
                    Event::Restarted { index } => format!("{index} restarted"),
                    Event::RestartFailed { index, .. } => format!("{index} restart failed"),
                });
            }
            if done(sup, &log) {
                return log;
            }
            std::thread::sleep(Duration::from_millis(5));
            now += Duration::from_secs(1);
        }
        panic!("did not settle: {log:?}");
    }

    #[test]
    fn crashes_are_restarted_with_backoff_then_given_up_and_refused_is_never_restarted() {
        let mut spawn = |_: usize, script: &&str| sh(script);
        let mut sup =
            Supervisor::start(Policy::new(2), vec!["exit 3", "exit 78"], &mut spawn).unwrap();
        let log = drive(&mut sup, &mut spawn, |s, _| {
            s.standing() != Standing::Running
        });
        assert_eq!(sup.standing(), Standing::AllGone { refused: false });
        assert_eq!(
            log.iter()
                .filter(|l| l.starts_with('0'))
                .cloned()
                .collect::<Vec<_>>(),
            [
                "0 restarting 1 after 1s",
                "0 restarted",
                "0 restarting 2 after 2s",
                "0 restarted",
                "0 gave up after 2",
            ]
        );
        assert_eq!(
            log.iter()
                .filter(|l| l.starts_with('1'))
                .collect::<Vec<_>>(),
            ["1 refused"]
        );
        assert_eq!(sup.members()[1].gone(), Some(Gone::Refused));

        let mut sup = Supervisor::start(Policy::new(5), vec!["exit 78"], &mut spawn).unwrap();
        drive(&mut sup, &mut spawn, |s, _| {
            s.standing() != Standing::Running
        });
        assert_eq!(sup.standing(), Standing::AllGone { refused: true });
    }

    #[test]
    fn a_drained_worker_starts_again_with_a_fresh_count_and_stop_restarts_nothing() {
        let mut starts = 0;
        let mut spawn = |_: usize, _: &()| {
            starts += 1;
            // First run crashes, second exits 0 (drained), third keeps running.
            sh(match starts {
                1 => "exit 1",
                2 => "exit 0",
                _ => "sleep 30",
            })
        };
        let mut sup = Supervisor::start(Policy::new(3), vec![()], &mut spawn).unwrap();
        let log = drive(&mut sup, &mut spawn, |_, log| {
            log.iter().filter(|l| l.ends_with("restarted")).count() == 2
        });
        assert_eq!(
            log,
            [
                "0 restarting 1 after 1s",
                "0 restarted",
                "0 drained",
                "0 restarted"
            ]
        );
        assert_eq!(sup.members()[0].restarts(), 0, "a drain resets the count");
        sup.stop();
        sup.signal(libc::SIGTERM);
        let log = drive(&mut sup, &mut spawn, |s, _| {
            s.standing() == Standing::Stopped
        });
        assert!(log.is_empty(), "nothing restarted while stopping: {log:?}");
    }

    #[test]
    fn a_failed_start_is_retried_and_a_failed_first_start_kills_the_others() {
        let mut calls = 0;
        let mut spawn = |_: usize, _: &()| {
            calls += 1;
            match calls {
                1 => sh("exit 1"),
                2 => Err(std::io::Error::other("no binary")),
                _ => sh("sleep 30"),
            }
        };
        let mut sup = Supervisor::start(Policy::new(3), vec![()], &mut spawn).unwrap();
        let log = drive(&mut sup, &mut spawn, |s, _| {
            s.running() == 1 && s.members()[0].restarts() == 1
        });
        assert_eq!(
            log,
            ["0 restarting 1 after 1s", "0 restart failed", "0 restarted"]
        );
        sup.kill_all();
        assert_eq!(sup.running(), 0);

        let mut n = 0;
        let e = Supervisor::start(Policy::new(1), vec![(), ()], &mut |_, _: &()| {
            n += 1;
            if n == 2 {
                Err("second")
            } else {
                Ok(Command::new("sleep").arg("30").spawn().unwrap())
            }
        });
        assert_eq!(e.err(), Some("second"));
    }

    #[test]
    fn the_count_resets_after_a_long_run_and_the_delay_is_capped() {
        let p = Policy::new(3);
        let short = Duration::from_secs(2);
        assert_eq!(
            after_exit(&p, 3, short, false),
            AfterExit::GiveUp { in_a_row: 3 }
        );
        assert!(matches!(
            after_exit(&p, 3, Duration::from_secs(301), false),
            AfterExit::Restart { in_a_row: 1, .. }
        ));
        assert_eq!(
            after_exit(&Policy::new(0), 0, short, false),
            AfterExit::GiveUp { in_a_row: 0 }
        );
        assert_eq!(restart_delay(1), Duration::from_secs(1));
        assert_eq!(restart_delay(4), Duration::from_secs(8));
        assert_eq!(restart_delay(50), Duration::from_secs(60));
    }
}
