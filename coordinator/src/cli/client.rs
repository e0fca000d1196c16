//! The client side of `SweepService`: a client speaking in domain types, and the views of what
//! the coordinator returns, converted from the proto at the boundary.

use std::collections::HashMap;
use std::time::Duration;

use ablate_proto::auth::{read_token_file, BearerToken};
use ablate_proto::connect::{read_ca, AuthChannel};
use ablate_proto::pb;
use anyhow::Context as _;
use experiments::trial::{Progress, TrialConfig, TrialMetrics};
use pb::sweep_service_client::SweepServiceClient;

use super::Conn;
use crate::progress::TrialStatus;
use crate::report::TrialRecord;
use crate::scheduler::TrialState;

/// One trial as `Get` reports it, converted from the proto at the boundary.
#[derive(Clone, Debug, Default)]
pub struct TrialView {
    pub id: String,
    pub name: String,
    pub family: String,
    /// Parsed once from the coordinator's lower-case state name.
    pub state: TrialState,
    pub attempts: u32,
    pub config: Option<TrialConfig>,
    pub metrics: Option<TrialMetrics>,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub worker: Option<String>,
    pub step: u64,
    pub total: u64,
    pub loss: Option<f64>,
    pub tokens_per_sec: Option<f64>,
    /// Unix ms; None when the coordinator sent 0 (never started / not finished).
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// Every attempt so far, for the cost table.
    pub attempt_spans: Vec<crate::cost::AttemptSpan>,
    /// Why a queued or waiting trial does not run yet (the coordinator's words).
    pub wait_reason: Option<String>,
    /// The tuner's rung decisions (`[tune]` sweeps).
    pub tune_rungs: Vec<crate::report::tune::TuneRung>,
}

impl TrialView {
    /// The latest training step as the coordinator reports it: a loss that is not finite and a
    /// throughput of 0 are "not known yet".
    fn set_step(&mut self, step: u64, total: u64, loss: f64, tokens_per_sec: f64) {
        self.step = step;
        self.total = total;
        self.loss = loss.is_finite().then_some(loss);
        self.tokens_per_sec = (tokens_per_sec > 0.0).then_some(tokens_per_sec);
    }

    pub fn record(&self) -> TrialRecord {
        TrialRecord {
            id: self.id.clone(),
            config: self.config.clone(),
            name: self.name.clone(),
            state: self.state.as_str().to_string(),
            attempts: self.attempts,
            metrics: self.metrics.clone(),
            reason: self.reason.clone(),
            message: self.message.clone(),
            worker: self.worker.clone(),
            started_ms: self.started_ms,
            finished_ms: self.finished_ms,
            attempt_spans: self.attempt_spans.clone(),
            price_per_hour: None,
            tune_rungs: self.tune_rungs.clone(),
            latest_step: self.step,
        }
    }

    pub fn status(&self) -> TrialStatus {
        TrialStatus {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            attempts: self.attempts,
            step: self.step,
            total: self.total,
            loss: self.loss,
            tokens_per_sec: self.tokens_per_sec,
            perplexity: self.metrics.as_ref().map(|m| m.perplexity),
            wall_seconds: self.metrics.as_ref().map(|m| m.wall_seconds),
            reason: self.reason.clone(),
            message: self.message.clone(),
            worker: self.worker.clone(),
        }
    }
}

/// A sweep with all its trials.
#[derive(Clone, Debug, Default)]
pub struct SweepView {
    pub id: String,
    pub name: String,
    /// The sweep file as submitted.
    pub text: String,
    pub trials: Vec<TrialView>,
}

impl SweepView {
    pub fn all_terminal(&self) -> bool {
        self.trials.iter().all(|t| t.state.is_terminal())
    }

    pub fn statuses(&self) -> Vec<TrialStatus> {
        self.trials.iter().map(TrialView::status).collect()
    }

    /// Records for the report; `local` fills configs the server did not return (ablate run has
    /// the parsed sweep at hand).
    pub fn records(&self, local: Option<&HashMap<String, TrialConfig>>) -> Vec<TrialRecord> {
        let price = self.price_per_hour();
        self.trials
            .iter()
            .map(|t| {
                let mut r = t.record();
                if r.config.is_none() {
                    r.config = local.and_then(|m| m.get(&t.id)).cloned();
                }
                r.price_per_hour = price;
                r
            })
            .collect()
    }

    /// The sweep file's `price_per_hour`, read back from the stored text (None when the text does
    /// not parse here, e.g. a sweep from a newer client).
    pub fn price_per_hour(&self) -> Option<f64> {
        let doc: toml::Table = self.text.parse().ok()?;
        let p = doc.get("price_per_hour")?;
        p.as_float()
            .or_else(|| p.as_integer().map(|i| i as f64))
            .filter(|p| p.is_finite() && *p >= 0.0)
    }
}

/// A sweep followed through `Watch` ([`Client::watch`]): the view is the coordinator's snapshot
/// with every change since applied to it.
pub struct SweepWatch {
    stream: tonic::Streaming<pb::WatchEvent>,
    view: SweepView,
    url: String,
    what: String,
}

impl SweepWatch {
    pub fn view(&self) -> &SweepView {
        &self.view
    }

    pub fn into_view(self) -> SweepView {
        self.view
    }

    /// Wait for the next change and apply it. `Ok(false)`: the coordinator ended the stream (it
    /// is shutting down); watch again to go on.
    pub async fn next(&mut self) -> anyhow::Result<bool> {
        let Some(event) = self
            .stream
            .message()
            .await
            .map_err(|s| status_error(&self.url, &self.what, s))?
        else {
            return Ok(false);
        };
        match event.event {
            Some(pb::watch_event::Event::Snapshot(s)) => self.view = sweep_view(s)?,
            Some(pb::watch_event::Event::Trial(t)) => {
                let mut new = trial_view(t)?;
                match self.view.trials.iter_mut().find(|t| t.id == new.id) {
                    Some(old) => {
                        // A change carries no wait reason (the coordinator works those out for
                        // Get only): a trial still waiting keeps the one it had.
                        if matches!(new.state, TrialState::Queued | TrialState::Waiting) {
                            new.wait_reason = old.wait_reason.take();
                        }
                        *old = new;
                    }
                    None => self.view.trials.push(new),
                }
            }
            Some(pb::watch_event::Event::Progress(p)) => {
                let step = serde_json::from_str::<Progress>(&p.progress_json);
                let trial = self.view.trials.iter_mut().find(|t| t.id == p.trial_id);
                if let (
                    Ok(Progress::Step {
                        step,
                        total,
                        loss,
                        tokens_per_sec,
                        ..
                    }),
                    Some(t),
                ) = (step, trial)
                {
                    t.set_step(step, total, loss, tokens_per_sec);
                }
            }
            None => {}
        }
        Ok(true)
    }
}

/// What `Submit` answered.
#[derive(Clone, Debug)]
pub struct SubmitOutcome {
    pub sweep_id: String,
    pub added: u64,
    pub already_present: u64,
}

/// One line of `ablate list`.
#[derive(Clone, Debug)]
pub struct SweepListing {
    pub id: String,
    pub name: String,
    pub summary: String,
}

/// A `SweepService` client speaking in domain types.
pub struct Client {
    pub(crate) inner: SweepServiceClient<AuthChannel>,
    pub(crate) url: String,
}

/// Turn a gRPC status into an error a user can act on.
pub(crate) fn status_error(url: &str, what: &str, s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => anyhow::anyhow!(
            "{what}: the coordinator at {url} rejected the token ({}); check --token-file / \
             ABLATE_TOKEN_FILE",
            s.message()
        ),
        tonic::Code::Unavailable => anyhow::anyhow!(
            "{what}: the coordinator at {url} is unreachable ({}); check --coordinator / \
             ABLATE_COORDINATOR",
            s.message()
        ),
        code => anyhow::anyhow!("{what}: {code:?}: {}", s.message()),
    }
}

fn opt(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// The one place a trial state from the wire (`TrialStatus.state`) becomes a [`TrialState`].
pub(crate) fn wire_state(trial: &str, state: &str) -> anyhow::Result<TrialState> {
    TrialState::parse(&state.to_ascii_lowercase()).with_context(|| {
        format!("trial {trial}: unknown state {state:?} from the coordinator (a newer version?)")
    })
}

fn sweep_view(r: pb::GetResponse) -> anyhow::Result<SweepView> {
    Ok(SweepView {
        id: r.sweep_id,
        name: r.name,
        text: r.sweep_text,
        trials: r
            .trials
            .into_iter()
            .map(trial_view)
            .collect::<anyhow::Result<_>>()?,
    })
}

fn trial_view(t: pb::TrialStatus) -> anyhow::Result<TrialView> {
    let metrics = if t.metrics_json.is_empty() {
        None
    } else {
        Some(
            serde_json::from_str::<TrialMetrics>(&t.metrics_json).with_context(|| {
                format!("trial {}: malformed metrics from the coordinator", t.id)
            })?,
        )
    };
    // A config this build cannot read (a newer coordinator) still shows in the table.
    let config = serde_json::from_str::<TrialConfig>(&t.config_json).ok();
    let worker = match (opt(t.worker_name), opt(t.device_name)) {
        (Some(w), Some(d)) => Some(format!("{w} ({d})")),
        (w, d) => w.or(d),
    };
    let state = wire_state(&t.id, &t.state)?;
    let p = t.progress.unwrap_or_default();
    let mut view = TrialView {
        id: t.id,
        name: t.name,
        family: t.method,
        state,
        attempts: t.attempts,
        config,
        metrics,
        reason: opt(t.failure_reason),
        message: opt(t.failure_message),
        worker,
        step: 0,
        total: 0,
        loss: None,
        tokens_per_sec: None,
        started_ms: (t.started_unix_ms > 0).then_some(t.started_unix_ms),
        finished_ms: (t.finished_unix_ms > 0).then_some(t.finished_unix_ms),
        wait_reason: opt(t.wait_reason),
        tune_rungs: crate::report::tune::parse_tune_json(&t.tune_json),
        attempt_spans: t
            .attempt_costs
            .into_iter()
            .map(|a| crate::cost::AttemptSpan {
                attempt: a.attempt,
                outcome: a.outcome,
                started_ms: a.started_unix_ms,
                ended_ms: (a.ended_unix_ms > 0).then_some(a.ended_unix_ms),
                devices: a.devices.max(1),
                device_kind: a.device_kind,
                price_per_hour: a.price_per_hour,
            })
            .collect(),
    };
    // No progress yet when the coordinator sent neither a step nor a total.
    if p.total > 0 || p.step > 0 {
        view.set_step(p.step, p.total, p.loss, p.tokens_per_sec);
    }
    Ok(view)
}

impl Client {
    /// Connect to `url` (http://HOST:PORT) with an optional admin token.
    pub async fn connect(url: &str, token: Option<String>) -> anyhow::Result<Client> {
        Client::connect_tls(url, token, None).await
    }

    /// Connect to `url`; an `https://` URL trusts the PEM CA `ca_pem` (system roots if `None`).
    pub async fn connect_tls(
        url: &str,
        token: Option<String>,
        ca_pem: Option<&[u8]>,
    ) -> anyhow::Result<Client> {
        let auth = BearerToken::new(token.as_deref())?;
        let endpoint =
            ablate_proto::connect::endpoint(url, ca_pem)?.connect_timeout(Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("connecting to the coordinator at {url}"))?;
        Ok(Client {
            inner: ablate_proto::connect::sweep_client(channel, auth),
            url: url.to_string(),
        })
    }

    pub async fn submit(
        &mut self,
        sweep: &experiments::spec::Sweep,
    ) -> anyhow::Result<SubmitOutcome> {
        let trials = sweep
            .trials
            .iter()
            .map(|t| pb::SubmittedTrial {
                id: t.id(),
                config_json: serde_json::to_string(t).expect("TrialConfig serialises"),
            })
            .collect();
        let r = self
            .inner
            .submit(pb::SubmitRequest {
                sweep_name: sweep.name.clone(),
                sweep_text: sweep.source.clone(),
                trials,
            })
            .await
            .map_err(|s| status_error(&self.url, "submit", s))?
            .into_inner();
        Ok(SubmitOutcome {
            sweep_id: r.sweep_id,
            added: r.added.len() as u64,
            already_present: r.already_present.len() as u64,
        })
    }

    pub async fn get(&mut self, sweep: &str) -> anyhow::Result<SweepView> {
        let r = self
            .inner
            .get(pb::GetRequest {
                sweep: sweep.to_string(),
            })
            .await
            .map_err(|s| status_error(&self.url, &format!("sweep {sweep}"), s))?
            .into_inner();
        sweep_view(r)
    }

    /// Follow a sweep through `Watch`: its snapshot now, then each change as it happens (see
    /// [`SweepWatch`]). Following a sweep this way costs the coordinator a query per change,
    /// where polling `Get` read every trial each time.
    pub async fn watch(&mut self, sweep: &str) -> anyhow::Result<SweepWatch> {
        let what = format!("watching sweep {sweep}");
        let mut stream = self
            .inner
            .watch(pb::WatchRequest {
                sweep: sweep.to_string(),
            })
            .await
            .map_err(|s| status_error(&self.url, &what, s))?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(|s| status_error(&self.url, &what, s))?
            .with_context(|| format!("{what}: the stream ended before its snapshot"))?;
        let view = match first.event {
            Some(pb::watch_event::Event::Snapshot(s)) => sweep_view(s)?,
            other => anyhow::bail!("{what}: the stream began with {other:?}, not a snapshot"),
        };
        Ok(SweepWatch {
            stream,
            view,
            url: self.url.clone(),
            what,
        })
    }

    pub async fn list(&mut self) -> anyhow::Result<Vec<SweepListing>> {
        let r = self
            .inner
            .list(pb::ListRequest {})
            .await
            .map_err(|s| status_error(&self.url, "list", s))?
            .into_inner();
        Ok(r.sweeps
            .into_iter()
            .map(|s| SweepListing {
                summary: format!(
                    "{} trials: {} finished, {} failed, {} running, {} queued, {} cancelled{}",
                    s.trials,
                    s.finished,
                    s.failed,
                    s.running,
                    s.queued,
                    s.cancelled,
                    if s.stopped > 0 {
                        format!(", {} stopped by the tuner", s.stopped)
                    } else {
                        String::new()
                    }
                ),
                id: s.sweep_id,
                name: s.name,
            })
            .collect())
    }

    /// All recorded progress events of a trial, oldest attempt first. Events this build cannot
    /// parse are skipped rather than failing the whole report.
    pub async fn events(&mut self, trial: &str) -> anyhow::Result<Vec<Progress>> {
        Ok(self
            .events_timed(trial)
            .await?
            .into_iter()
            .map(|(_, e)| e)
            .collect())
    }

    /// [`Client::events`] with the Unix ms at which the coordinator recorded each event.
    pub async fn events_timed(&mut self, trial: &str) -> anyhow::Result<Vec<(i64, Progress)>> {
        let r = self
            .inner
            .events(pb::EventsRequest {
                trial_id: trial.to_string(),
            })
            .await
            .map_err(|s| status_error(&self.url, &format!("events of {trial}"), s))?
            .into_inner();
        let mut events = r.events;
        events.sort_by_key(|e| (e.attempt, e.seq));
        Ok(events
            .iter()
            .filter_map(|e| {
                serde_json::from_str::<Progress>(&e.progress_json)
                    .ok()
                    .map(|p| (e.unix_ms, p))
            })
            .collect())
    }

    /// Drain the worker named `worker` (see `ablate drain`).
    pub async fn drain(
        &mut self,
        worker: &str,
        checkpoint: bool,
    ) -> anyhow::Result<pb::DrainResponse> {
        Ok(self
            .inner
            .drain(pb::DrainRequest {
                worker_name: worker.to_string(),
                checkpoint,
            })
            .await
            .map_err(|s| status_error(&self.url, &format!("drain {worker}"), s))?
            .into_inner())
    }

    /// Cancel sweeps (by id or name) and trials (by id); returns how many trials were cancelled.
    /// A target that `Get` knows as a sweep is cancelled as a sweep, anything else as a trial id.
    pub async fn cancel(&mut self, targets: &[String]) -> anyhow::Result<usize> {
        let mut sweeps = Vec::new();
        let mut trials = Vec::new();
        for t in targets {
            match self.get(t).await {
                Ok(_) => sweeps.push(t.clone()),
                Err(_) => trials.push(t.clone()),
            }
        }
        let mut cancelled = 0;
        for s in sweeps {
            let r = self
                .inner
                .cancel(pb::CancelRequest {
                    sweep: s.clone(),
                    trial_ids: vec![],
                })
                .await
                .map_err(|st| status_error(&self.url, &format!("cancel {s}"), st))?
                .into_inner();
            cancelled += r.cancelled.len();
        }
        if !trials.is_empty() {
            let r = self
                .inner
                .cancel(pb::CancelRequest {
                    sweep: String::new(),
                    trial_ids: trials,
                })
                .await
                .map_err(|st| status_error(&self.url, "cancel", st))?
                .into_inner();
            cancelled += r.cancelled.len();
        }
        Ok(cancelled)
    }
}

fn token(conn: &Conn) -> anyhow::Result<Option<String>> {
    Ok(conn
        .token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?)
}

pub(crate) async fn connect(conn: &Conn) -> anyhow::Result<Client> {
    let ca = conn.ca.as_deref().map(read_ca).transpose()?;
    Client::connect_tls(&conn.coordinator, token(conn)?, ca.as_deref()).await
}
