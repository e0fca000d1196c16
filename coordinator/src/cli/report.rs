//! Fetching a sweep's recorded events from a coordinator and writing its report files: `ablate
//! report`, and the end of `ablate run`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context as _;
use experiments::trial::TrialConfig;

use super::client::{connect, Client, SweepView};
use super::ReportArgs;
use crate::report::{SummaryRow, TrialEvents};

/// Fetch every trial's recorded events and write the report files into `out`.
pub async fn write_sweep_report(
    client: &mut Client,
    sweep: &SweepView,
    local: Option<&HashMap<String, TrialConfig>>,
    out: &Path,
) -> anyhow::Result<Vec<SummaryRow>> {
    let mut events = Vec::with_capacity(sweep.trials.len());
    for t in &sweep.trials {
        let ev = client
            .events_timed(&t.id)
            .await
            .with_context(|| format!("fetching the events of trial {} ({})", t.name, t.id))?;
        events.push(TrialEvents {
            id: t.id.clone(),
            name: t.name.clone(),
            unix_ms: ev.iter().map(|(ms, _)| *ms).collect(),
            events: ev.into_iter().map(|(_, e)| e).collect(),
        });
    }
    let meta = crate::report::ReportMeta {
        sweep_name: sweep.name.clone(),
        sweep_id: sweep.id.clone(),
        sweep_text: sweep.text.clone(),
        generated_ms: crate::report::now_ms(),
    };
    crate::report::files::write_full_report(out, &meta, &sweep.records(local), &events)
}

/// `ablate report`.
pub async fn report(args: ReportArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.conn).await?;
    let sweep = client.get(&args.sweep).await?;
    let rows = write_sweep_report(&mut client, &sweep, None, &args.out).await?;
    print!("{}", crate::report::to_terminal_table(&rows));
    if let Some(t) = crate::report::tune::tuning(&sweep.records(None)) {
        println!("{}", crate::report::tune::tokens_line(&t));
    }
    eprintln!(
        "report written to {} (open {} in a browser)",
        args.out.display(),
        args.out.join("report.html").display()
    );
    Ok(())
}
