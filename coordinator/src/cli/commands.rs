//! The client commands that act on a coordinator (`submit`, `status`, `list`, `cancel`,
//! `drain`) and the local state commands (`backup`, `restore`).

use std::time::Duration;

use super::client::{connect, Client, SweepView, TrialView};
use super::{BackupArgs, CancelArgs, DrainArgs, ListArgs, RestoreArgs, StatusArgs, SubmitArgs};
use crate::progress::ProgressView;
use crate::scheduler::TrialState;

/// Follow a sweep through `Watch` and show progress until every trial is terminal or
/// `keep_going` says stop. Returns the last view. A stream that ends or fails (a coordinator
/// restart) is opened again, up to 30 times in a row without a change seen in between.
pub async fn watch_sweep(
    client: &mut Client,
    sweep: &str,
    view: &mut ProgressView,
    mut keep_going: impl FnMut(&SweepView) -> anyhow::Result<bool>,
) -> anyhow::Result<SweepView> {
    let mut failures = 0u32;
    loop {
        let why = match client.watch(sweep).await {
            Ok(mut watch) => loop {
                view.update(&watch.view().statuses());
                if watch.view().all_terminal() || !keep_going(watch.view())? {
                    return Ok(watch.into_view());
                }
                match watch.next().await {
                    Ok(true) => failures = 0,
                    Ok(false) => break anyhow::anyhow!("the coordinator ended the stream"),
                    Err(e) => break e,
                }
            },
            Err(e) => e,
        };
        failures += 1;
        if failures > 30 {
            return Err(why.context(format!("watching sweep {sweep}: 30 tries in a row failed")));
        }
        tracing::warn!(cause = %why, "watching the sweep again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `ablate submit`.
pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let sweep = experiments::spec::load_sweep(&args.sweep)?;
    let mut client = connect(&args.conn).await?;
    let out = client.submit(&sweep).await?;
    println!(
        "sweep {} ({}): {} trials added, {} already present",
        sweep.name, out.sweep_id, out.added, out.already_present
    );
    Ok(())
}

/// `ablate status`: exit code 0; with --watch, waits until every trial is terminal.
pub async fn status(args: StatusArgs) -> anyhow::Result<u8> {
    let mut client = connect(&args.conn).await?;
    let sweep = if args.watch {
        let mut view = ProgressView::new(&args.sweep);
        let s = watch_sweep(&mut client, &args.sweep, &mut view, |_| Ok(true)).await?;
        view.finish();
        s
    } else {
        client.get(&args.sweep).await?
    };
    let rows = crate::report::summary_rows(&sweep.records(None));
    println!("sweep {} ({})", sweep.name, sweep.id);
    print!("{}", crate::report::to_terminal_table(&rows));
    let running: Vec<&TrialView> = sweep
        .trials
        .iter()
        .filter(|t| t.state == TrialState::Running)
        .collect();
    for t in running {
        println!(
            "  {}: step {}/{}{}",
            t.name,
            t.step,
            t.total,
            t.loss
                .map_or_else(String::new, |l| format!(", loss {l:.3}"))
        );
    }
    for t in &sweep.trials {
        if let Some(why) = &t.wait_reason {
            println!("  {}: {}: {why}", t.name, t.state);
        }
    }
    Ok(0)
}

/// `ablate list`.
pub async fn list(args: ListArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let sweeps = client.list().await?;
    if sweeps.is_empty() {
        println!("no sweeps");
    }
    for s in sweeps {
        println!("{}  {}  {}", s.id, s.name, s.summary);
    }
    Ok(())
}

/// `ablate cancel`.
pub async fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let n = client.cancel(&args.targets).await?;
    println!("cancelled {n} trial(s) (trials depending on them end too)");
    Ok(())
}

/// `ablate backup`.
pub fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let s = crate::backup::backup(&args.state, &args.out)?;
    println!(
        "backed up {} to {}: {} files, {} bytes{} (manifest {})",
        args.state.display(),
        args.out.display(),
        s.files,
        s.bytes,
        if s.left_out > 0 {
            format!(
                "; {} artifact(s) deleted while copying left out (BACKUP.json left_out)",
                s.left_out
            )
        } else {
            String::new()
        },
        crate::backup::MANIFEST
    );
    Ok(())
}

/// `ablate restore`.
pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let m = crate::backup::restore(&args.backup, &args.state)?;
    println!(
        "restored {} files from {} (taken by ablate {} from {}) into {}; start the coordinator \
         with: ablate serve --state {}",
        m.files.len(),
        args.backup.display(),
        m.ablate_version,
        m.source,
        args.state.display(),
        args.state.display()
    );
    Ok(())
}

/// `ablate drain`.
pub async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let r = client.drain(&args.worker, args.checkpoint).await?;
    let what = if r.running.is_empty() {
        "it runs no trial: it exits at its next request for work".to_string()
    } else if args.checkpoint {
        format!(
            "it checkpoints {} and gives it back, then exits",
            r.running.join(", ")
        )
    } else {
        format!("it finishes {}, then exits", r.running.join(", "))
    };
    println!("drained worker {}: no new trials; {what}", args.worker);
    Ok(())
}
