//! `ablate run`: the whole job on one machine in one command.
//!
//! Loads and validates the sweep, starts the coordinator in-process on loopback (state in
//! `DIR/state`, so running the same command again skips finished trials), spawns local
//! `ablate-worker` processes (one per visible GPU, or a few CPU workers), submits, shows progress,
//! writes the report and prints the summary table. Workers are real child processes talking gRPC
//! to the embedded server — the same path a multi-machine deployment takes — so a crash in one
//! trial cannot take the sweep down, and a worker that dies is restarted while its lease re-queues
//! the trial, by the same rule as `ablate-worker --all-gpus` ([`experiments::supervise`]: growing
//! delays, at most `--max-restarts` in a row, never after the coordinator refused it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use experiments::supervise::{Event, Policy, Standing, Supervisor};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::cli::{Client, DeviceKind, RunArgs, SweepWatch};
use crate::progress::ProgressView;
use crate::report::is_done;

/// Lease TTL of the embedded coordinator: short, because a local worker that died is restarted
/// within a second and its trial should be re-queued soon after.
const LOCAL_LEASE_TTL: Duration = Duration::from_secs(15);
/// How long workers get to checkpoint and report after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// `ablate run`. Returns the exit code: 0 when at least one trial finished (failed trials are
/// shown in the table), 1 when nothing could run, 130 when interrupted.
pub async fn run(args: RunArgs) -> anyhow::Result<u8> {
    let sweep = experiments::spec::load_sweep(&args.sweep)?;
    if sweep.trials.is_empty() {
        bail!("{}: the sweep expands to no trials", args.sweep.display());
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("ablate-out").join(&sweep.name));
    let state = out.join("state");
    std::fs::create_dir_all(&state)
        .with_context(|| format!("creating state directory {}", state.display()))?;
    let bin = match &args.worker_bin {
        Some(b) if b.is_file() => b.clone(),
        Some(b) => bail!("--worker-bin {}: no such file", b.display()),
        None => find_worker_bin()?,
    };
    let plan = plan_workers(&out, args.device, args.workers)?;
    check_ranks_fit(&sweep.trials, plan.len())?;

    // Fresh tokens every run: the embedded coordinator only listens on loopback, but another local
    // user should still not be able to lease trials or submit to it.
    let worker_token = random_token()?;
    let admin_token = random_token()?;
    let token_file = state.join("worker.token");
    write_secret(&token_file, &worker_token)?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the embedded coordinator on 127.0.0.1")?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(crate::cli::serve_on(
        listener,
        state.clone(),
        Some(worker_token),
        Some(admin_token.clone()),
        LOCAL_LEASE_TTL,
        async move {
            let _ = stop_rx.await;
        },
    ));
    let url = format!("http://{addr}");

    let result = drive(
        &args,
        &sweep,
        &out,
        &url,
        &admin_token,
        &token_file,
        &bin,
        plan,
        &mut server,
    )
    .await;

    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(10), &mut server).await {
        Ok(Ok(Err(e))) if result.is_ok() => return Err(e.context("coordinator")),
        Err(_) => server.abort(),
        _ => {}
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &RunArgs,
    sweep: &experiments::spec::Sweep,
    out: &Path,
    url: &str,
    admin_token: &str,
    token_file: &Path,
    bin: &Path,
    plan: Vec<WorkerSpec>,
    server: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<u8> {
    let mut client = connect_retry(url, admin_token).await?;
    let outcome = client.submit(sweep).await.context("submitting the sweep")?;
    eprintln!(
        "sweep {}: {} trials ({} new, {} already in {})",
        sweep.name,
        sweep.trials.len(),
        outcome.added,
        outcome.already_present,
        out.join("state").display()
    );
    let local: std::collections::HashMap<String, experiments::trial::TrialConfig> =
        sweep.trials.iter().map(|t| (t.id(), t.clone())).collect();

    let mut snapshot = client.get(&outcome.sweep_id).await?;
    let mut interrupted = false;
    let mut failure: Option<anyhow::Error> = None;
    if !snapshot.all_terminal() {
        let env = WorkerEnv {
            bin: bin.to_path_buf(),
            coordinator: url.to_string(),
            token_file: Some(token_file.to_path_buf()),
            cache: args.cache.clone(),
        };
        eprintln!(
            "starting {} {} worker(s); logs in {}",
            plan.len(),
            match args.device {
                DeviceKind::Cpu => "CPU",
                DeviceKind::Cuda => "GPU",
            },
            out.join("workers").display()
        );
        let mut spawn = |_: usize, spec: &WorkerSpec| spawn_worker(spec, &env);
        let policy = Policy {
            refused_code: i32::from(ablate_proto::EXIT_CONFIG),
            ..Policy::new(args.max_restarts)
        };
        let mut workers = Supervisor::start(policy, plan, &mut spawn)?;
        let mut view = ProgressView::new(&sweep.name);
        let mut ticker = tokio::time::interval(Duration::from_millis(500));
        let mut signal = std::pin::pin!(crate::cli::shutdown_signal());
        // Progress comes from a Watch stream (a change costs the coordinator one trial's read);
        // the ticker drives the worker supervisor and reopens a stream that ended.
        let mut watch: Option<SweepWatch> = None;
        let mut watch_failures = 0u32;
        loop {
            // Why the stream was lost this turn, if it was.
            let mut lost = None;
            if watch.is_none() {
                match client.watch(&outcome.sweep_id).await {
                    Ok(w) => {
                        view.update(&w.view().statuses());
                        if w.view().all_terminal() {
                            break;
                        }
                        watch = Some(w);
                    }
                    Err(e) => lost = Some(e),
                }
            }
            let mut changed = None;
            tokio::select! {
                _ = &mut signal => { interrupted = true; break; }
                _ = ticker.tick() => {}
                r = next_change(&mut watch) => changed = Some(r),
            }
            if server.is_finished() {
                failure = Some(anyhow::anyhow!(
                    "the embedded coordinator stopped unexpectedly"
                ));
                break;
            }
            match changed {
                Some(Ok(true)) => {
                    watch_failures = 0;
                    if let Some(w) = &watch {
                        view.update(&w.view().statuses());
                        if w.view().all_terminal() {
                            break;
                        }
                    }
                }
                Some(Ok(false)) => lost = Some(anyhow::anyhow!("the stream ended")),
                Some(Err(e)) => lost = Some(e),
                None => {}
            }
            if let Some(e) = lost {
                watch = None;
                watch_failures += 1;
                if watch_failures > 20 {
                    failure = Some(e.context("following the embedded coordinator's progress"));
                    break;
                }
            }
            let events = workers.poll(Instant::now(), &mut spawn);
            report_events(&workers, events, &mut view);
            if let Standing::AllGone { refused } = workers.standing() {
                failure = Some(anyhow::anyhow!(
                    "every worker {}; see the logs in {}",
                    if refused {
                        "was refused by the coordinator"
                    } else {
                        "kept exiting and was given up"
                    },
                    out.join("workers").display()
                ));
                break;
            }
        }
        view.finish();
        stop_all(&mut workers, &env, STOP_GRACE).await;
    }

    // Write the report even after a failure or an interrupt: it shows what did finish.
    if let Ok(s) = client.get(&outcome.sweep_id).await {
        snapshot = s;
    }
    let rows = crate::cli::write_sweep_report(&mut client, &snapshot, Some(&local), out)
        .await
        .context("writing the report")?;
    print!("{}", crate::report::to_terminal_table(&rows));
    if let Some(t) = crate::report::tune::tuning(&snapshot.records(Some(&local))) {
        println!("{}", crate::report::tune::tokens_line(&t));
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    eprintln!(
        "report: {} (open in a browser; also summary.md/csv/json, curves.csv, samples.md, trials/)",
        out.join("report.html").display()
    );
    if let Some(e) = failure {
        return Err(e);
    }
    if interrupted {
        eprintln!(
            "interrupted: state kept in {}; run the same command again to continue",
            out.join("state").display()
        );
        return Ok(130);
    }
    if !rows.iter().any(|r| is_done(&r.status)) {
        eprintln!("no trial finished successfully");
        return Ok(1);
    }
    Ok(0)
}

/// Tell the user what the supervisor did.
fn report_events(
    workers: &Supervisor<WorkerSpec>,
    events: Vec<Event<anyhow::Error>>,
    view: &mut ProgressView,
) {
    let spec = |i: usize| &workers.members()[i].spec;
    let max = workers.policy().max_in_a_row;
    for event in events {
        let line = match event {
            Event::Restarting {
                index,
                status,
                delay,
                in_a_row,
            } => format!(
                "worker {} exited ({status}); restarting in {} s ({in_a_row}/{max} in a row), its trial is re-queued when the lease expires",
                spec(index).name,
                delay.as_secs()
            ),
            Event::Drained { index } => {
                format!("worker {} exited 0 (drained); starting it again", spec(index).name)
            }
            Event::Refused { index, status } => format!(
                "worker {} was refused by the coordinator ({status}); not restarting it, see {}",
                spec(index).name,
                spec(index).log.display()
            ),
            Event::GaveUp { index, status, .. } => format!(
                "worker {} exited ({status}) after {max} restarts in a row; giving it up, see {}",
                spec(index).name,
                spec(index).log.display()
            ),
            Event::Restarted { .. } => continue,
            Event::RestartFailed {
                index,
                error,
                retry_in,
            } => format!(
                "restarting worker {} failed: {error:#}; trying again in {} s",
                spec(index).name,
                retry_in.as_secs()
            ),
        };
        view.println(&line);
    }
}

/// SIGTERM every worker at once, then wait for all of them up to `grace`, then SIGKILL.
async fn stop_all(workers: &mut Supervisor<WorkerSpec>, env: &WorkerEnv, grace: Duration) {
    workers.stop();
    workers.signal(libc::SIGTERM);
    let deadline = Instant::now() + grace;
    let mut spawn = |_: usize, spec: &WorkerSpec| spawn_worker(spec, env);
    loop {
        // Stopped: this only reaps the workers that exited.
        let _ = workers.poll(Instant::now(), &mut spawn);
        if workers.running() == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    workers.kill_all();
}

/// Connect to the embedded server (already bound, so this normally succeeds at once).
async fn connect_retry(url: &str, token: &str) -> anyhow::Result<Client> {
    let mut last = None;
    for _ in 0..50 {
        match Client::connect(url, Some(token.to_string())).await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last
        .unwrap_or_else(|| anyhow::anyhow!("no attempt made"))
        .context(format!("connecting to the embedded coordinator at {url}")))
}

/// Locate `ablate-worker`: next to the running executable (a cargo build puts both binaries in
/// the same target dir), then on PATH.
pub fn find_worker_bin() -> anyhow::Result<PathBuf> {
    let name = format!("ablate-worker{}", std::env::consts::EXE_SUFFIX);
    let exe = std::env::current_exe().ok();
    if let Some(dir) = exe.as_deref().and_then(Path::parent) {
        let candidate = dir.join(&name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        // `cargo test` runs binaries from target/debug/deps; the worker sits one level up.
        if let Some(up) = dir.parent() {
            let candidate = up.join(&name);
            if dir.file_name().is_some_and(|n| n == "deps") && candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(&name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let next_to = exe.as_deref().and_then(Path::parent).map_or_else(
        || "this executable".to_string(),
        |d| d.display().to_string(),
    );
    bail!(
        "ablate-worker not found in {next_to} or on PATH. `ablate run` starts worker processes, so \
         build both binaries: `cargo build --release` (then run target/release/ablate), or pass \
         --worker-bin PATH"
    )
}

/// Default number of CPU workers: two when there are two cores or more; candle uses every thread
/// it is given, so more workers than that only share the same cores.
pub fn default_cpu_workers(cores: usize) -> usize {
    cores.clamp(1, 2)
}

/// Threads per worker so N workers together use every core once.
pub fn threads_per_worker(cores: usize, workers: usize) -> usize {
    (cores / workers.max(1)).max(1)
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// How one local worker is started.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    pub index: usize,
    pub name: String,
    /// `cpu` or `cuda:0` (with `cuda_visible` narrowing the process to one GPU).
    pub device: String,
    pub cuda_visible: Option<String>,
    pub threads: Option<usize>,
    pub work_dir: PathBuf,
    pub log: PathBuf,
}

/// Plan the local workers for a device choice.
/// A trial with `train.ranks = k` waits for k workers of one host: with fewer local workers it
/// would wait forever, so say so before starting anything.
pub fn check_ranks_fit(
    trials: &[experiments::trial::TrialConfig],
    workers: usize,
) -> anyhow::Result<()> {
    if let Some(t) = trials.iter().find(|t| t.train.ranks as usize > workers) {
        bail!(
            "trial {} asks for train.ranks = {} but ablate run starts {workers} worker{}: pass \
             --workers {} (on GPUs, make that many visible) or lower ranks",
            t.name,
            t.train.ranks,
            if workers == 1 { "" } else { "s" },
            t.train.ranks
        );
    }
    Ok(())
}

pub fn plan_workers(
    out: &Path,
    device: DeviceKind,
    workers: Option<usize>,
) -> anyhow::Result<Vec<WorkerSpec>> {
    let cores = cores();
    if workers == Some(0) {
        bail!("--workers must be at least 1");
    }
    let mk = |i: usize, device: String, cuda_visible: Option<String>, threads: Option<usize>| {
        WorkerSpec {
            index: i,
            name: format!("local-{i}"),
            device,
            cuda_visible,
            threads,
            work_dir: out.join("workers").join(i.to_string()),
            log: out.join("workers").join(format!("{i}.log")),
        }
    };
    match device {
        DeviceKind::Cpu => {
            let n = workers.unwrap_or_else(|| default_cpu_workers(cores));
            let threads = threads_per_worker(cores, n);
            Ok((0..n)
                .map(|i| mk(i, "cpu".into(), None, Some(threads)))
                .collect())
        }
        DeviceKind::Cuda => {
            let mut gpus = experiments::gpus::visible_gpus();
            if gpus.is_empty() {
                bail!(
                    "--device cuda: no GPU is visible (CUDA_VISIBLE_DEVICES, nvidia-smi -L, \
                     /proc/driver/nvidia/gpus)"
                );
            }
            if let Some(n) = workers {
                gpus.truncate(n);
            }
            // GPU workers need few CPU threads; give them a fair share for data work.
            let threads = threads_per_worker(cores, gpus.len());
            Ok(gpus
                .into_iter()
                .enumerate()
                .map(|(i, id)| mk(i, "cuda:0".into(), Some(id), Some(threads)))
                .collect())
        }
    }
}

/// What `ablate-worker` needs to reach the embedded coordinator.
#[derive(Clone, Debug)]
pub struct WorkerEnv {
    pub bin: PathBuf,
    pub coordinator: String,
    pub token_file: Option<PathBuf>,
    pub cache: Option<PathBuf>,
}

/// The environment a worker process gets beyond ours: its thread count, and for a GPU worker the
/// one GPU it may see ([`experiments::gpus::pin_to_gpu_env`], as `ablate-worker --all-gpus` does).
fn worker_env(spec: &WorkerSpec) -> Vec<(&'static str, String)> {
    let mut env = Vec::new();
    if let Some(t) = spec.threads {
        env.push(("RAYON_NUM_THREADS", t.to_string()));
    }
    if let Some(v) = &spec.cuda_visible {
        env.extend(experiments::gpus::pin_to_gpu_env(v));
    }
    env
}

fn spawn_worker(spec: &WorkerSpec, env: &WorkerEnv) -> anyhow::Result<Child> {
    std::fs::create_dir_all(&spec.work_dir)
        .with_context(|| format!("creating worker directory {}", spec.work_dir.display()))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("opening worker log {}", spec.log.display()))?;
    let log2 = log
        .try_clone()
        .context("duplicating the worker log handle")?;
    let mut cmd = Command::new(&env.bin);
    cmd.arg("--coordinator")
        .arg(&env.coordinator)
        .arg("--device")
        .arg(&spec.device)
        .arg("--work-dir")
        .arg(&spec.work_dir)
        .arg("--name")
        .arg(&spec.name)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    if let Some(f) = &env.token_file {
        cmd.arg("--token-file").arg(f);
    }
    if let Some(c) = &env.cache {
        cmd.arg("--cache").arg(c);
    }
    cmd.envs(worker_env(spec));
    // Its own process group (a Ctrl-C reaches `ablate run` only, which then stops the workers in
    // order: SIGTERM → checkpoint → exit), and it dies with `ablate run` if that is killed.
    experiments::supervise::isolate(&mut cmd);
    cmd.spawn()
        .with_context(|| format!("starting {}", env.bin.display()))
}

/// A random hex token from the OS (the embedded coordinator authenticates its own workers too,
/// so another local user cannot lease or report on loopback).
pub fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom for a session token")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Write a secret readable only by this user.
pub fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(secret.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The next change of the sweep, or never when there is no stream (the caller reopens it).
async fn next_change(watch: &mut Option<SweepWatch>) -> anyhow::Result<bool> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_workers_see_their_gpu_in_nvidia_smi_order() {
        let spec = |cuda_visible: Option<&str>| WorkerSpec {
            index: 0,
            name: "w".into(),
            device: "cuda:0".into(),
            cuda_visible: cuda_visible.map(str::to_string),
            threads: None,
            work_dir: "/nonexistent".into(),
            log: "/nonexistent/log".into(),
        };
        let env = worker_env(&spec(Some("2")));
        assert!(env.contains(&("CUDA_DEVICE_ORDER", "PCI_BUS_ID".to_string())));
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES", "2".to_string())));
        assert!(worker_env(&spec(None)).is_empty());
    }

    #[test]
    fn cpu_workers_share_the_cores() {
        assert_eq!(default_cpu_workers(1), 1);
        assert_eq!(default_cpu_workers(2), 2);
        assert_eq!(default_cpu_workers(64), 2);
        assert_eq!(threads_per_worker(2, 2), 1);
        assert_eq!(threads_per_worker(16, 3), 5);
        assert_eq!(threads_per_worker(2, 8), 1);
    }

    #[test]
    fn a_sweep_asking_for_more_ranks_than_workers_is_refused_up_front() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../experiments/sweeps/quickstart.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("# ranks = 2 ", "ranks = 2 ");
        let sweep = experiments::spec::parse_sweep(&text, &path).unwrap();
        assert!(sweep.trials.iter().any(|t| t.train.ranks == 2));
        let e = check_ranks_fit(&sweep.trials, 1).unwrap_err().to_string();
        assert!(e.contains("ranks = 2") && e.contains("--workers 2"), "{e}");
        check_ranks_fit(&sweep.trials, 2).unwrap();
    }
}
