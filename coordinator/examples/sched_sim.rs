//! Scheduler + store under a large simulated fleet, in process (no gRPC, no training):
//!
//! ```text
//! cargo run --release -p coordinator --example sched_sim -- [--workers 1000] [--trials 100000]
//! ```
//!
//! It does what the server's Register / Submit / Lease / Report / Heartbeat / Complete handlers do
//! with the scheduler and the SQLite store (the same calls, in the same order, a real `Store` on
//! disk), driven by a virtual clock: every worker leases, "trains" for a random 1–10 virtual
//! minutes, reports one progress event and one heartbeat half way, completes, and leases again.
//! Virtual time costs nothing, so the wall time is the coordinator's own work. The sweep is real:
//! a `[base.pretrain]` stage plus `trials` freeze trials (one per seed) parsed by the sweep parser,
//! so the first wave waits for the pretrain trial like a real one.
//!
//! Prints trials/s, the latency of the lease and complete handlers (p50/p99/max, wall time with
//! the store write), peak memory and the database size.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::Path;
use std::time::Instant;

use coordinator::scheduler::{Scheduler, TrialSpec};
use coordinator::store::{NewTrial, Store, WorkerInfo};
use experiments::trial::Progress;

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} {v:?}: expected a number"))
        })
        .unwrap_or(default)
}

fn status_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(f64::NAN)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(name: &str, v: &mut [f64]) {
    v.sort_by(|a, b| a.total_cmp(b));
    println!(
        "  {name:<22} n={:<7} p50 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms",
        v.len(),
        pct(v, 0.5) * 1e3,
        pct(v, 0.99) * 1e3,
        v.last().copied().unwrap_or(f64::NAN) * 1e3
    );
}

/// SplitMix64: a seeded, dependency-free source of trial durations.
fn next_rand(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Lease,
    Midway { trial: String, attempt: u32 },
    Complete { trial: String, attempt: u32 },
}

fn sweep_text(n: usize) -> String {
    let seeds: Vec<String> = (0..n).map(|s| s.to_string()).collect();
    format!(
        r#"name = "sim"
groups = 3
[base.pretrain]
shape = {{ n_layer = 2, n_head = 2, n_embd = 32, n_positions = 64 }}
vocab_size = 320
[base.pretrain.data]
paths = ["corpus.txt"]
context = 64
[base.pretrain.train]
steps = 10
[data]
paths = ["corpus.txt"]
context = 64
[train]
steps = 10
[methods]
freeze = [1]
seeds = [{}]
"#,
        seeds.join(", ")
    )
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n_workers = arg(&args, "--workers", 1000);
    let n_trials = arg(&args, "--trials", 100_000);
    let ttl_ms: i64 = 60_000;
    let tmp = tempfile::tempdir()?;
    let wall = Instant::now();

    let text = sweep_text(n_trials);
    let sweep = experiments::spec::parse_sweep(&text, Path::new("sim.toml"))?;
    let trials: Vec<NewTrial> = sweep
        .trials
        .into_iter()
        .map(|config| NewTrial {
            id: config.id(),
            config,
        })
        .collect();
    let total = trials.len();
    let parsed_s = wall.elapsed().as_secs_f64();

    let mut store = Store::open(tmp.path())?;
    let mut sched = Scheduler::new(ttl_ms, 3);
    let mut now: i64 = 1_700_000_000_000;
    let t = Instant::now();
    store.submit("sim", &text, &trials, now)?;
    let mut decisions = Vec::new();
    for nt in &trials {
        decisions.extend(sched.submit(TrialSpec {
            id: nt.id.clone(),
            depends_on: nt.config.depends_on().map(str::to_string),
            cost: nt.config.expected_cost(),
            ranks: nt.config.train.ranks,
        }));
    }
    store.apply(&decisions, now)?;
    let submit_s = t.elapsed().as_secs_f64();
    drop(trials);

    let t = Instant::now();
    let mut workers = Vec::with_capacity(n_workers);
    for i in 0..n_workers {
        let info = WorkerInfo {
            name: format!("w{i}"),
            host: format!("host{}", i / 8),
            device_kind: "cuda".into(),
            device_name: "sim".into(),
            memory_bytes: 80 << 30,
            price_per_hour: 0.0,
        };
        let id = store.register_worker(&info, now)?;
        sched.register_worker(&id, &info.host);
        workers.push(id);
    }
    let register_s = t.elapsed().as_secs_f64();

    let mut heap: BinaryHeap<Reverse<(i64, usize, Ev)>> = BinaryHeap::new();
    for w in 0..n_workers {
        heap.push(Reverse((now + w as i64, w, Ev::Lease)));
    }
    let (mut lease_granted, mut lease_empty, mut complete, mut midway) =
        (vec![], vec![], vec![], vec![]);
    let mut finished = 0usize;
    let mut rng = 7u64;
    // Where the loop's time goes: the scheduler's decisions, and the store's writes of them.
    let (mut in_sched, mut in_store) = (0.0f64, 0.0f64);
    let step_json = serde_json::to_string(&Progress::Step {
        step: 5,
        total: 10,
        loss: 3.5,
        lr: 1e-3,
        tokens_per_sec: 1000.0,
    })?;
    let sim_start = Instant::now();
    while finished < total {
        let Some(Reverse((at, w, ev))) = heap.pop() else {
            anyhow::bail!("simulation stalled with {finished}/{total} trials finished");
        };
        now = at;
        let wid = &workers[w];
        match ev {
            Ev::Lease => {
                let t = Instant::now();
                let (grant, d) = sched.lease(wid, now)?;
                let decided = t.elapsed().as_secs_f64();
                store.apply(&d, now)?;
                let dt = t.elapsed().as_secs_f64();
                in_sched += decided;
                in_store += dt - decided;
                match grant {
                    Some(g) => {
                        lease_granted.push(dt);
                        let dur = 60_000 + (next_rand(&mut rng) % 540_000) as i64;
                        heap.push(Reverse((
                            now + dur / 2,
                            w,
                            Ev::Midway {
                                trial: g.trial_id.clone(),
                                attempt: g.attempt,
                            },
                        )));
                        heap.push(Reverse((
                            now + dur,
                            w,
                            Ev::Complete {
                                trial: g.trial_id,
                                attempt: g.attempt,
                            },
                        )));
                    }
                    None => {
                        lease_empty.push(dt);
                        // The real worker long-polls; here it asks again in 30 virtual s.
                        heap.push(Reverse((now + 30_000, w, Ev::Lease)));
                    }
                }
            }
            Ev::Midway { trial, attempt } => {
                let t = Instant::now();
                sched.heartbeat(wid, &[(trial.clone(), attempt)], now)?;
                let current = sched.report(&trial, attempt);
                let decided = t.elapsed().as_secs_f64();
                if current {
                    store.record_event(&trial, attempt, 1, &step_json, now)?;
                }
                let dt = t.elapsed().as_secs_f64();
                in_sched += decided;
                in_store += dt - decided;
                midway.push(dt);
            }
            Ev::Complete { trial, attempt } => {
                let t = Instant::now();
                let d = sched.complete(
                    &trial,
                    attempt,
                    r#"{"perplexity":42.0,"loss":3.74,"tokens":1000}"#.to_string(),
                );
                if d.is_empty() {
                    anyhow::bail!("completion of {trial} was refused");
                }
                let decided = t.elapsed().as_secs_f64();
                store.apply(&d, now)?;
                let dt = t.elapsed().as_secs_f64();
                in_sched += decided;
                in_store += dt - decided;
                complete.push(dt);
                finished += 1;
                heap.push(Reverse((now, w, Ev::Lease)));
            }
        }
    }
    let sim_s = sim_start.elapsed().as_secs_f64();
    let db_bytes: u64 = std::fs::read_dir(tmp.path())?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();

    println!("sched_sim: {n_workers} workers, {total} trials (1 pretrain + {n_trials} freeze)");
    println!(
        "  parse sweep {parsed_s:.2} s, submit (store + scheduler) {submit_s:.2} s, register workers {register_s:.2} s"
    );
    println!(
        "  scheduling loop: {sim_s:.2} s wall for {total} trials = {:.0} trials/s ({:.1} virtual hours)",
        total as f64 / sim_s,
        (now - 1_700_000_000_000) as f64 / 3.6e6
    );
    summary("lease (granted)", &mut lease_granted);
    summary("lease (nothing queued)", &mut lease_empty);
    summary("report + heartbeat", &mut midway);
    summary("complete", &mut complete);
    println!(
        "  where the loop's time went: scheduler decisions {in_sched:.2} s ({:.1} us per call), \
         SQLite writes {in_store:.2} s, the simulation itself {:.2} s",
        in_sched * 1e6
            / (lease_granted.len() + lease_empty.len() + midway.len() + complete.len()) as f64,
        sim_s - in_sched - in_store
    );
    println!(
        "  memory: peak RSS {:.0} MiB (now {:.0} MiB); SQLite files {:.0} MiB; total wall {:.2} s",
        status_kib("VmHWM:") / 1024.0,
        status_kib("VmRSS:") / 1024.0,
        db_bytes as f64 / (1 << 20) as f64,
        wall.elapsed().as_secs_f64()
    );
    Ok(())
}
