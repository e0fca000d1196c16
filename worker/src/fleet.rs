//! `ablate-worker --all-gpus`: one worker process per visible GPU, for machines without systemd
//! (rented containers, a shell on a 4-GPU box).
//!
//! Each child is this same binary with `--device cuda:0`, `CUDA_VISIBLE_DEVICES=<id>` and
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID` (so the id means what nvidia-smi shows), named `<name>-gpu<id>`.
//! The supervisor restarts a child that exits on its own (crash, driver fault) with a capped,
//! growing delay, at most `max_restarts` times in a row (a child that ran five minutes starts a
//! fresh count): a GPU that keeps failing is given up with an error in the log, and when every
//! GPU has been given up the supervisor exits non-zero, so systemd, Slurm or the container
//! runtime sees the failure instead of a restart loop. A child the coordinator refused (exit 78,
//! version skew) is never restarted; when every child was, the supervisor exits 78 too. On SIGTERM/SIGINT it forwards SIGTERM to
//! every child (each checkpoints and reports its attempt as preempted within the stop grace the
//! children were given) and exits when they all have. A repeated SIGTERM is the same request
//! (Slurm signals every process of the job, the supervisor included) and is not forwarded again;
//! a later Ctrl-C is forwarded as SIGINT, which makes the children exit at once
//! ([`crate::signals`]). SIGUSR1 is forwarded to every child (each finishes its trial, takes no
//! new one and exits 0), and the supervisor exits when they all have.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// What every child gets; the token stays in its file (children read `--token-file`).
#[derive(Clone, Debug)]
pub struct FleetOpts {
    pub coordinator: String,
    pub token_file: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cache: Option<PathBuf>,
    /// Parent of the children's work dirs (`<dir>/gpu<id>`); default: each child's own default.
    pub work_dir: Option<PathBuf>,
    /// Prefix of the children's names (`<prefix>-gpu<id>`).
    pub name: String,
    /// Restarts in a row after which a GPU's worker is given up.
    pub max_restarts: u32,
    /// Each child's `--stop-grace`.
    pub stop_grace: Duration,
    /// `--metrics-listen` of the first GPU's worker; the i-th listens on port+i.
    pub metrics_listen: Option<String>,
    /// Pass `--skip-preflight` to the children.
    pub skip_preflight: bool,
}

/// The `--metrics-listen` of the `i`-th child: `base`'s port plus `i` (port 0 stays 0: each
/// picks a free one).
pub fn metrics_listen_for(base: &str, i: usize) -> anyhow::Result<String> {
    let (host, port) = base
        .rsplit_once(':')
        .with_context(|| format!("--metrics-listen {base:?}: not HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--metrics-listen {base:?}: port {port:?} is not a number"))?;
    if port == 0 {
        return Ok(base.to_string());
    }
    let p = u16::try_from(port as usize + i)
        .ok()
        .with_context(|| format!("--metrics-listen {base:?}: port {port}+{i} is over 65535"))?;
    Ok(format!("{host}:{p}"))
}

/// What the supervisor does when a child exits on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterExit {
    /// Start it again after this delay (the count of restarts in a row so far is returned too).
    Restart { delay: Duration, in_a_row: u32 },
    /// It failed `max` times in a row: leave this GPU alone.
    GiveUp { in_a_row: u32 },
}

/// A child that exited after running `ran_for`, having been restarted `in_a_row` times in a row
/// before: restart it (a run of five minutes or more resets the count) unless that would exceed
/// `max` restarts in a row. A clean exit (status 0 while the supervisor is not stopping: the
/// coordinator drained that worker, as in a rolling upgrade) is no crash: it starts again after
/// a second, with a fresh count, running the binary now at the supervisor's path.
pub fn after_exit(in_a_row: u32, ran_for: Duration, max: u32, clean: bool) -> AfterExit {
    if clean {
        return AfterExit::Restart {
            delay: Duration::from_secs(1),
            in_a_row: 0,
        };
    }
    let prior = if ran_for >= Duration::from_secs(300) {
        0
    } else {
        in_a_row
    };
    let n = prior + 1;
    if n > max {
        AfterExit::GiveUp { in_a_row: prior }
    } else {
        AfterExit::Restart {
            delay: restart_delay(n),
            in_a_row: n,
        }
    }
}

/// Environment variables a child gets on top of the supervisor's.
pub type ChildEnv = Vec<(String, String)>;

/// How the `i`-th child (GPU `gpu`) is started: argv after the binary, and its environment
/// additions.
pub fn child_command(
    opts: &FleetOpts,
    i: usize,
    gpu: &str,
) -> anyhow::Result<(Vec<String>, ChildEnv)> {
    let tag = gpu.replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "_");
    let mut args = vec![
        "--coordinator".to_string(),
        opts.coordinator.clone(),
        "--device".into(),
        "cuda:0".into(),
        "--name".into(),
        format!("{}-gpu{tag}", opts.name),
        format!("--stop-grace={}s", opts.stop_grace.as_secs()),
    ];
    if let Some(base) = &opts.metrics_listen {
        args.push(format!("--metrics-listen={}", metrics_listen_for(base, i)?));
    }
    if opts.skip_preflight {
        args.push("--skip-preflight".into());
    }
    let mut path_arg = |flag: &str, p: &Option<PathBuf>| {
        if let Some(p) = p {
            args.push(flag.to_string());
            args.push(p.display().to_string());
        }
    };
    path_arg("--token-file", &opts.token_file);
    path_arg("--ca", &opts.ca);
    path_arg("--cache", &opts.cache);
    path_arg(
        "--work-dir",
        &opts.work_dir.as_ref().map(|d| d.join(format!("gpu{tag}"))),
    );
    let env = experiments::gpus::pin_to_gpu_env(gpu)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    Ok((args, env))
}

struct Member {
    gpu: String,
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    /// When a child that exited is due to start again.
    due: Option<Instant>,
}

/// Delay before restart number `n` (1-based): 1 s, 2 s, 4 s ... capped at a minute.
pub fn restart_delay(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// Run one worker per GPU in `gpus` until a signal stops them.
pub async fn run_fleet(opts: FleetOpts, gpus: Vec<String>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    if gpus.is_empty() {
        bail!(
            "--all-gpus: no GPU is visible (CUDA_VISIBLE_DEVICES, nvidia-smi -L, \
             /proc/driver/nvidia/gpus); run without it for a CPU worker"
        );
    }
    let exe = std::env::current_exe().context("locating the ablate-worker binary")?;
    tracing::info!(gpus = %gpus.join(","), "starting one worker per GPU");
    // A --metrics-listen port that would run past 65535 is refused before any child starts.
    for (i, g) in gpus.iter().enumerate() {
        child_command(&opts, i, g)?;
    }
    let spawn = |i: usize, gpu: &str| -> anyhow::Result<Child> {
        let (args, env) = child_command(&opts, i, gpu)?;
        let mut cmd = Command::new(&exe);
        cmd.args(&args).envs(env).stdin(Stdio::null());
        // Own process group: a terminal's Ctrl-C reaches the supervisor, which stops the children
        // in order rather than racing them.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        cmd.spawn()
            .with_context(|| format!("starting the worker for GPU {gpu}"))
    };
    let mut members = Vec::new();
    for (i, g) in gpus.iter().enumerate() {
        members.push(Member {
            gpu: g.clone(),
            child: Some(spawn(i, g)?),
            started: Instant::now(),
            restarts: 0,
            due: None,
        });
    }
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut stops = crate::signals::StopSignals::new();
    let mut stopping = false;
    let mut given_up = 0usize;
    // Of those, children the coordinator refused (exit 78): restarting cannot help.
    let mut refused = 0usize;
    loop {
        let got = tokio::select! {
            _ = term.recv() => Some(crate::signals::Signal::Term),
            _ = int.recv() => Some(crate::signals::Signal::Int),
            _ = usr1.recv() => {
                if !stopping {
                    tracing::info!("SIGUSR1: draining every worker (each finishes its trial, then exits)");
                    stopping = true;
                }
                forward(&members, libc::SIGUSR1);
                None
            }
            _ = tick.tick() => None,
        };
        if let Some(sig) = got {
            use crate::signals::StopAction;
            match stops.received(sig, Instant::now()) {
                StopAction::Stop => {
                    tracing::info!("stop signal: asking every worker to checkpoint and stop");
                    stopping = true;
                    forward(&members, libc::SIGTERM);
                }
                StopAction::Repeat => {
                    tracing::info!(signal = ?sig, "the same stop request again: already stopping");
                }
                StopAction::ExitNow => {
                    tracing::warn!("another Ctrl-C: telling every worker to exit now");
                    forward(&members, libc::SIGINT);
                }
            }
        }
        let now = Instant::now();
        for (i, m) in members.iter_mut().enumerate() {
            if let Some(c) = &mut m.child {
                if let Ok(Some(status)) = c.try_wait() {
                    m.child = None;
                    if !stopping && status.code() == Some(i32::from(ablate_proto::EXIT_CONFIG)) {
                        given_up += 1;
                        refused += 1;
                        tracing::error!(gpu = %m.gpu, %status, "the coordinator refused this GPU's worker (see its log above: version skew?); not restarting it");
                    } else if !stopping {
                        match after_exit(
                            m.restarts,
                            m.started.elapsed(),
                            opts.max_restarts,
                            status.success(),
                        ) {
                            AfterExit::Restart { delay, in_a_row } => {
                                m.restarts = in_a_row;
                                if status.success() {
                                    tracing::info!(gpu = %m.gpu, "worker exited 0 (drained): starting it again");
                                } else {
                                    tracing::warn!(gpu = %m.gpu, %status, ?delay, restart = in_a_row, max = opts.max_restarts, "worker exited; restarting");
                                }
                                m.due = Some(now + delay);
                            }
                            AfterExit::GiveUp { in_a_row } => {
                                given_up += 1;
                                tracing::error!(gpu = %m.gpu, %status, restarts = in_a_row, "worker keeps exiting: giving this GPU up (see its log above; raise --max-restarts to try longer)");
                            }
                        }
                    }
                }
            }
            if !stopping && m.child.is_none() && m.due.is_some_and(|d| d <= now) {
                m.due = None;
                match spawn(i, &m.gpu) {
                    Ok(c) => {
                        m.child = Some(c);
                        m.started = Instant::now();
                    }
                    Err(e) => {
                        tracing::warn!(gpu = %m.gpu, cause = %format!("{e:#}"), "restart failed");
                        m.due = Some(now + restart_delay(m.restarts + 1));
                    }
                }
            }
        }
        if stopping && members.iter().all(|m| m.child.is_none()) {
            tracing::info!("every worker stopped");
            return Ok(());
        }
        if given_up == members.len() && refused == members.len() {
            return Err(anyhow::Error::new(crate::remote::Refused(
                "the coordinator refused every GPU's worker (version skew: see above)".into(),
            )));
        }
        if given_up == members.len() {
            bail!(
                "every GPU's worker exited {} times in a row; giving up",
                opts.max_restarts + 1
            );
        }
    }
}

fn forward(members: &[Member], sig: i32) {
    for m in members {
        if let Some(c) = &m.child {
            // SAFETY: kill(2) on the pid of a child we own and have not reaped.
            unsafe {
                libc::kill(c.id() as libc::pid_t, sig);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_get_one_gpu_each_and_no_token_on_the_command_line() {
        let opts = FleetOpts {
            coordinator: "https://coord:7070".into(),
            token_file: Some("/etc/ablate/worker.token".into()),
            ca: Some("/etc/ablate/ca.pem".into()),
            cache: None,
            work_dir: Some("/var/lib/ablate-worker".into()),
            name: "box1".into(),
            max_restarts: 5,
            stop_grace: Duration::from_secs(60),
            metrics_listen: Some("0.0.0.0:9465".into()),
            skip_preflight: false,
        };
        let (args, env) = child_command(&opts, 2, "2").unwrap();
        let joined = args.join(" ");
        assert!(joined.contains("--device cuda:0"), "{joined}");
        assert!(joined.contains("--name box1-gpu2"), "{joined}");
        assert!(joined.contains("--stop-grace=60s"), "{joined}");
        assert!(
            joined.contains("--token-file /etc/ablate/worker.token"),
            "{joined}"
        );
        assert!(joined.contains("--ca /etc/ablate/ca.pem"), "{joined}");
        assert!(
            joined.contains("--work-dir /var/lib/ablate-worker/gpu2"),
            "{joined}"
        );
        assert!(!joined.contains("--cache"), "{joined}");
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES".into(), "2".into())));
        assert!(env.contains(&("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into())));
        // UUIDs are fine as CUDA_VISIBLE_DEVICES but make names without odd characters.
        let (args, _) = child_command(&opts, 0, "GPU-8f2c:1").unwrap();
        assert!(args.contains(&"box1-gpuGPU-8f2c_1".to_string()), "{args:?}");
        // The i-th child listens on port+i; port 0 lets each pick its own.
        assert!(joined.contains("--metrics-listen=0.0.0.0:9467"), "{joined}");
        assert!(
            args.contains(&"--metrics-listen=0.0.0.0:9465".to_string()),
            "{args:?}"
        );
        assert!(!joined.contains("--skip-preflight"), "{joined}");
        assert_eq!(metrics_listen_for("[::1]:0", 3).unwrap(), "[::1]:0");
        assert_eq!(metrics_listen_for("[::1]:9000", 3).unwrap(), "[::1]:9003");
        let e = metrics_listen_for("0.0.0.0:65535", 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("over 65535"), "{e}");
        assert!(metrics_listen_for("9465", 0).is_err());
    }

    #[test]
    fn restarts_in_a_row_are_capped_and_a_long_run_resets_the_count() {
        let short = Duration::from_secs(2);
        let mut n = 0;
        for i in 1..=3 {
            match after_exit(n, short, 3, false) {
                AfterExit::Restart { delay, in_a_row } => {
                    assert_eq!(in_a_row, i);
                    assert_eq!(delay, restart_delay(i));
                    n = in_a_row;
                }
                other => panic!("restart {i}: {other:?}"),
            }
        }
        assert_eq!(
            after_exit(n, short, 3, false),
            AfterExit::GiveUp { in_a_row: 3 }
        );
        // A drained child exits 0: started again at once, not counted as a crash.
        assert_eq!(
            after_exit(n, short, 3, true),
            AfterExit::Restart {
                delay: Duration::from_secs(1),
                in_a_row: 0
            }
        );
        // Five minutes of work since the last start: a new crash is the first in a row.
        assert!(matches!(
            after_exit(3, Duration::from_secs(301), 3, false),
            AfterExit::Restart { in_a_row: 1, .. }
        ));
        assert_eq!(
            after_exit(0, short, 0, false),
            AfterExit::GiveUp { in_a_row: 0 }
        );
    }

    #[test]
    fn restart_delay_grows_and_is_capped() {
        assert_eq!(restart_delay(1), Duration::from_secs(1));
        assert_eq!(restart_delay(2), Duration::from_secs(2));
        assert_eq!(restart_delay(4), Duration::from_secs(8));
        assert_eq!(restart_delay(50), Duration::from_secs(60));
    }
}
