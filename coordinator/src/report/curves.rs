//! Per-step losses and sample generations of each trial, from its stored progress events.

use super::*;

/// One trial's recorded progress events, in the order the coordinator stored them.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialEvents {
    pub id: String,
    pub name: String,
    pub events: Vec<Progress>,
    /// When the coordinator recorded each event (Unix ms), parallel to `events`; empty when not
    /// known. TensorBoard's wall-time axis comes from here.
    pub unix_ms: Vec<i64>,
}

/// A trial's (train loss, validation loss) per step. A retried attempt replays steps from its
/// checkpoint; the latest value for a step wins.
pub fn losses_by_step(t: &TrialEvents) -> BTreeMap<u64, (Option<f64>, Option<f64>)> {
    let mut by_step: BTreeMap<u64, (Option<f64>, Option<f64>)> = BTreeMap::new();
    for e in &t.events {
        match e {
            Progress::Step { step, loss, .. } => by_step.entry(*step).or_default().0 = Some(*loss),
            Progress::Eval { step, valid_loss } => {
                by_step.entry(*step).or_default().1 = Some(*valid_loss)
            }
            _ => {}
        }
    }
    by_step
}

/// `curves.csv` (trial, step, train_loss, valid_loss): one row per trial and step that has a
/// train loss or a validation loss. A retried attempt replays steps from its checkpoint; the
/// latest value for a step wins.
pub fn curves_csv(trials: &[TrialEvents]) -> String {
    let mut out = String::from("trial,step,train_loss,valid_loss\n");
    for t in trials {
        for (step, (train, valid)) in losses_by_step(t) {
            let _ = writeln!(
                out,
                "{},{step},{},{}",
                csv_field(&t.id),
                csv_opt(train),
                csv_opt(valid)
            );
        }
    }
    out
}

/// `samples.md`: the generations each trial reported, under one heading per trial.
pub fn samples_md(trials: &[TrialEvents]) -> String {
    let mut out = String::from("# Samples\n");
    let mut any = false;
    for t in trials {
        let samples: Vec<(&String, &String)> = t
            .events
            .iter()
            .filter_map(|e| match e {
                Progress::Sample { prompt, text } => Some((prompt, text)),
                _ => None,
            })
            .collect();
        if samples.is_empty() {
            continue;
        }
        any = true;
        let _ = write!(out, "\n## {} (`{}`)\n", md_escape(&t.name), t.id);
        for (prompt, text) in samples {
            let _ = write!(out, "\n**Prompt:** {}\n\n", md_escape(prompt));
            // Fence longer than any backtick run in the text, so generated text cannot end it.
            let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
            let fence = "`".repeat(longest.max(2) + 1);
            let _ = write!(out, "{fence}text\n{text}\n{fence}\n");
        }
    }
    if !any {
        out.push_str("\nNo trial reported samples.\n");
    }
    out
}
