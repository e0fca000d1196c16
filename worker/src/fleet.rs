//! `ablate-worker --all-gpus`: one worker process per visible GPU, for machines without systemd
//! (rented containers, a shell on a 4-GPU box).
//!
//! Each child is this same binary with `--device cuda:0`, `CUDA_VISIBLE_DEVICES=<id>` and
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID` (so the id means what nvidia-smi shows), named `<name>-gpu<id>`.
//! Children are kept running by [`experiments::supervise`], the same rule `ablate run` uses for
//! its local workers: a child that exits on its own (crash, driver fault) starts again after a
//! capped, growing delay, at most `max_restarts` times in a row (five minutes of running starts a
//! fresh count); a GPU that keeps failing is given up with an error in the log, and when every
//! GPU has been given up the supervisor exits non-zero, so systemd, Slurm or the container
//! runtime sees the failure instead of a restart loop. A child the coordinator refused (exit 78,
//! version skew) is never restarted; when every child was, the supervisor exits 78 too. A child
//! that exits 0 (drained) starts again.
//!
//! On SIGTERM/SIGINT the supervisor forwards SIGTERM to every child (each checkpoints and reports
//! its attempt as preempted within the stop grace the children were given) and exits when they
//! all have. A repeated SIGTERM is the same request (Slurm signals every process of the job, the
//! supervisor included) and is not forwarded again; a later Ctrl-C is forwarded as SIGINT, which
//! makes the children exit at once ([`crate::signals`]). SIGUSR1 is forwarded to every child (each
//! finishes its trial, takes no new one and exits 0), and the supervisor exits when they all have.
//! Children die with the supervisor if it is killed outright ([`experiments::supervise::isolate`]).

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

/// Run one worker per GPU in `gpus` until a signal stops them.
pub async fn run_fleet(opts: FleetOpts, gpus: Vec<String>) -> anyhow::Result<()> {
    use experiments::supervise::{Event, Policy, Standing, Supervisor};
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
    let mut spawn = |i: usize, gpu: &String| -> anyhow::Result<Child> {
        let (args, env) = child_command(&opts, i, gpu)?;
        let mut cmd = Command::new(&exe);
        cmd.args(&args).envs(env).stdin(Stdio::null());
        experiments::supervise::isolate(&mut cmd);
        cmd.spawn()
            .with_context(|| format!("starting the worker for GPU {gpu}"))
    };
    let policy = Policy {
        refused_code: i32::from(ablate_proto::EXIT_CONFIG),
        ..Policy::new(opts.max_restarts)
    };
    let mut fleet = Supervisor::start(policy, gpus, &mut spawn)?;
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut stops = crate::signals::StopSignals::new();
    loop {
        let got = tokio::select! {
            _ = term.recv() => Some(crate::signals::Signal::Term),
            _ = int.recv() => Some(crate::signals::Signal::Int),
            _ = usr1.recv() => {
                if !fleet.stopping() {
                    tracing::info!("SIGUSR1: draining every worker (each finishes its trial, then exits)");
                    fleet.stop();
                }
                fleet.signal(libc::SIGUSR1);
                None
            }
            _ = tick.tick() => None,
        };
        if let Some(sig) = got {
            use crate::signals::StopAction;
            match stops.received(sig, Instant::now()) {
                StopAction::Stop => {
                    tracing::info!("stop signal: asking every worker to checkpoint and stop");
                    fleet.stop();
                    fleet.signal(libc::SIGTERM);
                }
                StopAction::Repeat => {
                    tracing::info!(signal = ?sig, "the same stop request again: already stopping");
                }
                StopAction::ExitNow => {
                    tracing::warn!("another Ctrl-C: telling every worker to exit now");
                    fleet.signal(libc::SIGINT);
                }
            }
        }
        for event in fleet.poll(Instant::now(), &mut spawn) {
            let gpu = |i: usize| fleet_gpu(&fleet, i);
            match event {
                Event::Refused { index, status } => {
                    tracing::error!(gpu = %gpu(index), %status, "the coordinator refused this GPU's worker (see its log above: version skew?); not restarting it")
                }
                Event::Drained { index } => {
                    tracing::info!(gpu = %gpu(index), "worker exited 0 (drained): starting it again")
                }
                Event::Restarting {
                    index,
                    status,
                    delay,
                    in_a_row,
                } => {
                    tracing::warn!(gpu = %gpu(index), %status, ?delay, restart = in_a_row, max = opts.max_restarts, "worker exited; restarting")
                }
                Event::GaveUp {
                    index,
                    status,
                    in_a_row,
                } => {
                    tracing::error!(gpu = %gpu(index), %status, restarts = in_a_row, "worker keeps exiting: giving this GPU up (see its log above; raise --max-restarts to try longer)")
                }
                Event::Restarted { .. } => {}
                Event::RestartFailed {
                    index,
                    error,
                    retry_in,
                } => {
                    tracing::warn!(gpu = %gpu(index), cause = %format!("{error:#}"), ?retry_in, "restart failed")
                }
            }
        }
        match fleet.standing() {
            Standing::Running => {}
            Standing::Stopped => {
                tracing::info!("every worker stopped");
                return Ok(());
            }
            Standing::AllGone { refused: true } => {
                return Err(anyhow::Error::new(crate::remote::Refused(
                    "the coordinator refused every GPU's worker (version skew: see above)".into(),
                )));
            }
            Standing::AllGone { refused: false } => bail!(
                "every GPU's worker exited {} times in a row or was refused; giving up",
                opts.max_restarts + 1
            ),
        }
    }
}

fn fleet_gpu(fleet: &experiments::supervise::Supervisor<String>, i: usize) -> &str {
    &fleet.members()[i].spec
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
}
