//! The gRPC server in-process on 127.0.0.1:0, driven by the generated tonic clients.

use std::time::Duration;

use ablate_proto::pb;
use coordinator::server::{
    admin_client, serve, worker_client, AdminClient, Clock, ServeOpts, WorkerClient,
};
use experiments::trial::*;
use tokio::sync::oneshot;
use tokio_stream::StreamExt;

const WORKER_TOKEN: &str = "worker-secret";
const ADMIN_TOKEN: &str = "admin-secret";

struct Server {
    url: String,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(state_dir: &std::path::Path, ttl: Duration) -> Server {
        Server::start_with_clock(state_dir, ttl, Clock::default()).await
    }

    async fn start_with_clock(state_dir: &std::path::Path, ttl: Duration, clock: Clock) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut opts = ServeOpts::new(state_dir);
        opts.worker_token = Some(WORKER_TOKEN.into());
        opts.admin_token = Some(ADMIN_TOKEN.into());
        opts.lease_ttl = ttl;
        opts.clock = clock;
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(serve(listener, opts, async move {
            let _ = rx.await;
        }));
        Server {
            url,
            stop: Some(tx),
            handle,
        }
    }

    async fn admin(&self) -> AdminClient {
        admin_client(&self.url, Some(ADMIN_TOKEN)).await.unwrap()
    }

    async fn worker(&self) -> WorkerClient {
        worker_client(&self.url, Some(WORKER_TOKEN)).await.unwrap()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.handle)
            .await
            .expect("server stops within 10 s")
            .unwrap()
            .unwrap();
    }
}

fn config(name: &str, base: Base, steps: u64) -> TrialConfig {
    TrialConfig {
        name: name.into(),
        method: Method::Freeze { top: 1 },
        base,
        data: DataSpec {
            train: CorpusSpec {
                paths: vec!["/tmp/x.txt".into()],
                package: None,
                documents: DocSplit::File,
            },
            valid: None,
            valid_fraction: 0.1,
            context: 32,
            max_train_tokens: None,
            max_valid_windows: None,
        },
        train: TrainSpec {
            steps,
            batch_size: 2,
            grad_accum: 1,
            lr: 1e-3,
            lr_factor: None,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            clip_norm: None,
            eval_every: 0,
            eval_windows: 1,
            checkpoint_every: 0,
            ranks: 1,
        },
        groups: 2,
        seed: 0,
        tune: None,
    }
}

fn submitted(c: &TrialConfig) -> pb::SubmittedTrial {
    pb::SubmittedTrial {
        id: c.id(),
        config_json: serde_json::to_string(c).unwrap(),
    }
}

async fn register(w: &mut WorkerClient, name: &str) -> String {
    w.register(pb::RegisterRequest {
        device_kind: "cpu".into(),
        device_name: "cpu".into(),
        memory_bytes: 1 << 30,
        host: "localhost".into(),
        worker_name: name.into(),
        protocol_version: ablate_proto::PROTOCOL_VERSION,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .worker_id
}

async fn lease(w: &mut WorkerClient, worker_id: &str, wait_ms: u64) -> Option<pb::Lease> {
    w.lease(pb::LeaseRequest {
        worker_id: worker_id.into(),
        wait_ms,
    })
    .await
    .unwrap()
    .into_inner()
    .lease
}

/// Complete attempt `attempt` of `trial_id` with `metrics`; whether the coordinator accepted it.
async fn complete(
    w: &mut WorkerClient,
    trial_id: &str,
    attempt: u32,
    metrics: &TrialMetrics,
) -> bool {
    w.complete(pb::CompleteRequest {
        trial_id: trial_id.into(),
        attempt,
        metrics_json: serde_json::to_string(metrics).unwrap(),
    })
    .await
    .unwrap()
    .into_inner()
    .accepted
}

fn step_json(step: u64) -> String {
    serde_json::to_string(&Progress::Step {
        step,
        total: 10,
        loss: 4.5,
        lr: 1e-3,
        tokens_per_sec: 123.0,
    })
    .unwrap()
}

#[tokio::test]
async fn submit_lease_report_complete_get() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    let mut admin = server.admin().await;
    let mut w = server.worker().await;

    let pre = config("pre", Base::HfDir { path: "/m".into() }, 10);
    let ft = config("ft", Base::Trial { id: pre.id() }, 1000);
    let req = pb::SubmitRequest {
        sweep_name: "sw".into(),
        sweep_text: "# sweep".into(),
        trials: vec![submitted(&ft), submitted(&pre)],
    };
    let sub = admin.submit(req.clone()).await.unwrap().into_inner();
    assert_eq!(sub.added.len(), 2);
    let again = admin.submit(req).await.unwrap().into_inner();
    assert_eq!(
        (
            again.sweep_id.as_str(),
            again.added.len(),
            again.already_present.len()
        ),
        (sub.sweep_id.as_str(), 0, 2)
    );

    let wid = register(&mut w, "w-test").await;
    // The costlier trial waits for its base, so the base comes first.
    let l = lease(&mut w, &wid, 1000).await.expect("a lease");
    assert_eq!(l.trial_id, pre.id());
    assert_eq!(l.attempt, 1);
    assert!(l.base_trial_id.is_empty());
    let cfg: TrialConfig = serde_json::from_str(&l.config_json).unwrap();
    assert_eq!(cfg, pre);

    // The same (trial, attempt, seq) twice is counted once.
    for _ in 0..2 {
        let r = w
            .report(pb::ReportRequest {
                trial_id: l.trial_id.clone(),
                attempt: 1,
                seq: 0,
                progress_json: step_json(1),
            })
            .await
            .unwrap();
        assert!(r.into_inner().accepted);
    }
    w.report(pb::ReportRequest {
        trial_id: l.trial_id.clone(),
        attempt: 1,
        seq: 1,
        progress_json: step_json(2),
    })
    .await
    .unwrap();
    let bad = w
        .report(pb::ReportRequest {
            trial_id: l.trial_id.clone(),
            attempt: 1,
            seq: 2,
            progress_json: "{nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("progress_json"));
    let events = admin
        .events(pb::EventsRequest {
            trial_id: l.trial_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![0, 1]);

    // Artifacts: upload in chunks, list, download.
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let chunks: Vec<pb::ArtifactChunk> = data
        .chunks(1 << 20)
        .enumerate()
        .map(|(i, c)| pb::ArtifactChunk {
            trial_id: if i == 0 {
                l.trial_id.clone()
            } else {
                String::new()
            },
            attempt: 1,
            name: if i == 0 {
                "model/model.safetensors".into()
            } else {
                String::new()
            },
            data: c.to_vec(),
        })
        .collect();
    let up = w
        .upload_artifact(tokio_stream::iter(chunks))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(up.size, data.len() as u64);
    let bad_name = pb::ArtifactChunk {
        trial_id: l.trial_id.clone(),
        attempt: 1,
        name: "../../etc/x".into(),
        data: vec![1],
    };
    let err = w
        .upload_artifact(tokio_stream::iter(vec![bad_name]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let list = w
        .list_artifacts(pb::ListArtifactsRequest {
            trial_id: l.trial_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.artifacts.len(), 1);
    assert_eq!(list.artifacts[0].sha256, up.sha256);
    let mut down = w
        .download_artifact(pb::DownloadArtifactRequest {
            trial_id: l.trial_id.clone(),
            name: "model/model.safetensors".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(c) = down.next().await {
        got.extend(c.unwrap().data);
    }
    assert!(got == data, "downloaded bytes equal uploaded bytes");

    let ckpt = pb::ArtifactChunk {
        trial_id: l.trial_id.clone(),
        attempt: 1,
        name: "ckpt/state.json".into(),
        data: b"{}".to_vec(),
    };
    w.upload_artifact(tokio_stream::iter(vec![ckpt]))
        .await
        .unwrap();
    let metrics = TrialMetrics {
        perplexity: 42.5,
        steps: 10,
        ..Default::default()
    };
    assert!(complete(&mut w, &l.trial_id, 1, &metrics).await);
    // The finished trial keeps its model but not its resumable checkpoint.
    let names: Vec<String> = w
        .list_artifacts(pb::ListArtifactsRequest {
            trial_id: l.trial_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .artifacts
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, vec!["model/model.safetensors".to_string()]);
    // A late report from the finished attempt is not accepted.
    let late = w
        .report(pb::ReportRequest {
            trial_id: l.trial_id.clone(),
            attempt: 1,
            seq: 5,
            progress_json: step_json(9),
        })
        .await
        .unwrap();
    assert!(!late.into_inner().accepted);

    // Now the dependant is released, with its base named in the lease.
    let l2 = lease(&mut w, &wid, 1000).await.expect("dependant released");
    assert_eq!(
        (l2.trial_id.as_str(), l2.base_trial_id.as_str()),
        (ft.id().as_str(), pre.id().as_str())
    );

    let got = admin
        .get(pb::GetRequest { sweep: "sw".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.sweep_id, sub.sweep_id);
    let by_id = |id: &str| got.trials.iter().find(|t| t.id == id).unwrap().clone();
    let p = by_id(&pre.id());
    assert_eq!(
        (p.state.as_str(), p.attempts, p.worker_name.as_str()),
        ("finished", 1, "w-test")
    );
    let m: TrialMetrics = serde_json::from_str(&p.metrics_json).unwrap();
    assert_eq!(m.perplexity, 42.5);
    assert_eq!(p.progress.unwrap().step, 2);
    assert!(p.finished_unix_ms >= p.started_unix_ms && p.started_unix_ms > 0);
    assert_eq!(by_id(&ft.id()).state, "running");
    let list = admin.list(pb::ListRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (
            list.sweeps.len(),
            list.sweeps[0].finished,
            list.sweeps[0].running
        ),
        (1, 1, 1)
    );

    // Nothing left: a short long-poll comes back empty.
    assert!(lease(&mut w, &wid, 100).await.is_none());
    server.shutdown().await;
}

#[tokio::test]
async fn stale_attempts_are_ignored_and_expired_leases_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_millis(300)).await;
    let mut admin = server.admin().await;
    let mut w = server.worker().await;
    let a = config("a", Base::HfDir { path: "/m".into() }, 10);
    admin
        .submit(pb::SubmitRequest {
            sweep_name: "s".into(),
            sweep_text: String::new(),
            trials: vec![submitted(&a)],
        })
        .await
        .unwrap();
    let w1 = register(&mut w, "one").await;
    let w2 = register(&mut w, "two").await;
    let l1 = lease(&mut w, &w1, 1000).await.unwrap();
    // Heartbeats keep it alive past the ttl...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let hb = w
            .heartbeat(pb::HeartbeatRequest {
                worker_id: w1.clone(),
                held: vec![pb::HeldLease {
                    trial_id: a.id(),
                    attempt: 1,
                }],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(hb.renewed.len(), 1);
    }
    // ...then silence: the second worker's long poll receives attempt 2 once the lease expires.
    let l2 = tokio::time::timeout(Duration::from_secs(5), lease(&mut w, &w2, 5000))
        .await
        .unwrap()
        .expect("re-queued");
    assert_eq!(
        (l2.trial_id.as_str(), l2.attempt),
        (l1.trial_id.as_str(), 2)
    );
    // The first worker's messages about attempt 1 are ignored and it is told to stop.
    let r = w
        .report(pb::ReportRequest {
            trial_id: a.id(),
            attempt: 1,
            seq: 0,
            progress_json: step_json(1),
        })
        .await
        .unwrap();
    assert!(!r.into_inner().accepted);
    let c = w.complete(pb::CompleteRequest { trial_id: a.id(), attempt: 1, metrics_json: "{\"perplexity\":1.0,\"valid_loss\":0,\"valid_tokens\":0,\"train_tokens\":0,\"steps\":0,\"trainable_params\":0,\"total_params\":0,\"final_train_loss\":null,\"wall_seconds\":0}".into() }).await.unwrap();
    assert!(!c.into_inner().accepted);
    let hb = w
        .heartbeat(pb::HeartbeatRequest {
            worker_id: w1.clone(),
            held: vec![pb::HeldLease {
                trial_id: a.id(),
                attempt: 1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.cancel.len(), 1);
    let up = pb::ArtifactChunk {
        trial_id: a.id(),
        attempt: 1,
        name: "ckpt/x".into(),
        data: vec![1],
    };
    assert_eq!(
        w.upload_artifact(tokio_stream::iter(vec![up]))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::FailedPrecondition
    );
    let got = admin
        .events(pb::EventsRequest { trial_id: a.id() })
        .await
        .unwrap()
        .into_inner();
    assert!(got.events.is_empty());
    // The current attempt fails transiently: retried as attempt 3.
    let f = w
        .fail(pb::FailRequest {
            trial_id: a.id(),
            attempt: 2,
            reason: "io".into(),
            message: "disk".into(),
            deterministic: false,
            preempted: false,
        })
        .await
        .unwrap();
    assert!(f.into_inner().accepted);
    let l3 = lease(&mut w, &w2, 1000).await.unwrap();
    assert_eq!(l3.attempt, 3);
    server.shutdown().await;
}

#[tokio::test]
async fn wrong_or_missing_tokens_are_rejected() {
    let mut opts = ServeOpts::new("/tmp/x");
    opts.admin_token = Some(ADMIN_TOKEN.into());
    assert!(
        !format!("{opts:?}").contains(ADMIN_TOKEN),
        "tokens never reach a log line"
    );
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    // The worker token does not open the sweep service, nor the admin token the worker service.
    let mut as_worker = admin_client(&server.url, Some(WORKER_TOKEN)).await.unwrap();
    let err = as_worker.list(pb::ListRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(!err.message().contains(ADMIN_TOKEN) && !err.message().contains(WORKER_TOKEN));
    let mut as_admin = worker_client(&server.url, Some(ADMIN_TOKEN)).await.unwrap();
    let req = pb::RegisterRequest {
        device_kind: "cpu".into(),
        ..Default::default()
    };
    assert_eq!(
        as_admin.register(req.clone()).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    let mut anon = worker_client(&server.url, None).await.unwrap();
    assert_eq!(
        anon.register(req.clone()).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    // The right tokens work, and bad input is named.
    let mut w = server.worker().await;
    let bad = RegisterReqExt::kind(req.clone(), "tpu");
    let err = w.register(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("device_kind"));
    assert!(w.register(req).await.is_ok());
    let mut admin = server.admin().await;
    let err = admin
        .submit(pb::SubmitRequest {
            sweep_name: "s".into(),
            sweep_text: String::new(),
            trials: vec![pb::SubmittedTrial {
                id: "x".into(),
                config_json: "{}".into(),
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("trials[0].config_json"),
        "{}",
        err.message()
    );
    let mut c = submitted(&config("a", Base::HfDir { path: "/m".into() }, 1));
    c.id = "0000000000000000".into();
    let err = admin
        .submit(pb::SubmitRequest {
            sweep_name: "s".into(),
            sweep_text: String::new(),
            trials: vec![c],
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("trials[0].id"), "{}", err.message());
    server.shutdown().await;
}

trait RegisterReqExt {
    fn kind(self, k: &str) -> Self;
}
impl RegisterReqExt for pb::RegisterRequest {
    fn kind(mut self, k: &str) -> Self {
        self.device_kind = k.into();
        self
    }
}

#[tokio::test]
async fn restart_keeps_results_and_leases_for_one_ttl_then_requeues_and_watch_streams() {
    let dir = tempfile::tempdir().unwrap();
    let a = config("a", Base::HfDir { path: "/m".into() }, 100);
    let b = config("b", Base::HfDir { path: "/m".into() }, 10);
    {
        let server = Server::start(dir.path(), Duration::from_secs(30)).await;
        let mut admin = server.admin().await;
        let mut w = server.worker().await;
        admin
            .submit(pb::SubmitRequest {
                sweep_name: "s".into(),
                sweep_text: "t".into(),
                trials: vec![submitted(&a), submitted(&b)],
            })
            .await
            .unwrap();
        let wid = register(&mut w, "one").await;
        let la = lease(&mut w, &wid, 1000).await.unwrap();
        assert_eq!(la.trial_id, a.id());
        let lb = lease(&mut w, &wid, 1000).await.unwrap();
        let seven = TrialMetrics {
            perplexity: 7.0,
            ..Default::default()
        };
        complete(&mut w, &lb.trial_id, 1, &seven).await;
        // A watch stream must not hold up shutdown.
        let _watch = admin
            .watch(pb::WatchRequest { sweep: "s".into() })
            .await
            .unwrap()
            .into_inner();
        server.shutdown().await;
    }
    // Restarted with a short ttl: the running attempt keeps its lease for one ttl (its worker
    // may heartbeat again), then, with no heartbeat, goes back to the queue.
    let server = Server::start(dir.path(), Duration::from_millis(1500)).await;
    let mut admin = server.admin().await;
    let got = admin
        .get(pb::GetRequest { sweep: "s".into() })
        .await
        .unwrap()
        .into_inner();
    let st = |id: &str| got.trials.iter().find(|t| t.id == id).unwrap().clone();
    assert_eq!(st(&b.id()).state, "finished");
    assert!(st(&b.id()).metrics_json.contains("7.0"));
    assert_eq!(
        (st(&a.id()).state.as_str(), st(&a.id()).attempts),
        ("running", 1),
        "the lease survives the restart for one ttl"
    );

    let mut watch = admin
        .watch(pb::WatchRequest { sweep: "s".into() })
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap();
    assert!(
        matches!(first.event, Some(pb::watch_event::Event::Snapshot(ref s)) if s.trials.len() == 2)
    );
    let mut w = server.worker().await;
    let wid = register(&mut w, "two").await;
    let l = lease(&mut w, &wid, 10_000).await.unwrap();
    assert_eq!((l.trial_id.as_str(), l.attempt), (a.id().as_str(), 2));
    w.report(pb::ReportRequest {
        trial_id: a.id(),
        attempt: 2,
        seq: 0,
        progress_json: step_json(3),
    })
    .await
    .unwrap();
    // The watch sees the expiry (queued) and then the new attempt (running).
    let mut states = Vec::new();
    while states.last().map(String::as_str) != Some("running") {
        let ev = tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ev.event {
            Some(pb::watch_event::Event::Trial(t)) => {
                assert_eq!(t.id, a.id());
                states.push(t.state);
            }
            other => panic!("expected a trial state change, got {other:?}"),
        }
    }
    assert_eq!(states, ["queued", "running"]);
    let ev = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(ev.event, Some(pb::watch_event::Event::Progress(ref p)) if p.attempt == 2));
    let c = admin
        .cancel(pb::CancelRequest {
            sweep: "s".into(),
            trial_ids: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.cancelled, vec![a.id()]);
    let hb = w
        .heartbeat(pb::HeartbeatRequest {
            worker_id: wid,
            held: vec![pb::HeldLease {
                trial_id: a.id(),
                attempt: 2,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.cancel.len(), 1, "the cancel order reaches the worker");
    drop(watch);
    server.shutdown().await;
}

#[tokio::test]
async fn long_poll_wakes_when_work_arrives_and_unknown_ids_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    let mut admin = server.admin().await;
    let mut w = server.worker().await;
    let wid = register(&mut w, "one").await;
    let mut w2 = w.clone();
    let wid2 = wid.clone();
    let t0 = std::time::Instant::now();
    let waiting = tokio::spawn(async move { lease(&mut w2, &wid2, 10_000).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a = config("a", Base::HfDir { path: "/m".into() }, 10);
    admin
        .submit(pb::SubmitRequest {
            sweep_name: "s".into(),
            sweep_text: String::new(),
            trials: vec![submitted(&a)],
        })
        .await
        .unwrap();
    let got = waiting
        .await
        .unwrap()
        .expect("the waiting lease receives the new trial");
    assert_eq!(got.trial_id, a.id());
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "woken by the submit, not by the 10 s timeout: {:?}",
        t0.elapsed()
    );

    let err = w
        .lease(pb::LeaseRequest {
            worker_id: "w999".into(),
            wait_ms: 10,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = admin
        .cancel(pb::CancelRequest {
            sweep: String::new(),
            trial_ids: vec!["nope".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = admin
        .get(pb::GetRequest {
            sweep: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err = w
        .download_artifact(pb::DownloadArtifactRequest {
            trial_id: a.id(),
            name: "model/none".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    server.shutdown().await;
}

/// A coordinator restart does not cost a running attempt its lease: the worker heartbeats again
/// within the ttl, its reports continue the same sequence (a repeated seq is not stored twice),
/// and its completion counts.
#[tokio::test]
async fn a_worker_that_heartbeats_after_a_restart_keeps_its_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let a = config("a", Base::HfDir { path: "/m".into() }, 100);
    let wid;
    {
        let server = Server::start(dir.path(), Duration::from_secs(30)).await;
        let mut admin = server.admin().await;
        let mut w = server.worker().await;
        admin
            .submit(pb::SubmitRequest {
                sweep_name: "s".into(),
                sweep_text: "t".into(),
                trials: vec![submitted(&a)],
            })
            .await
            .unwrap();
        wid = register(&mut w, "one").await;
        let l = lease(&mut w, &wid, 1000).await.unwrap();
        assert_eq!(l.attempt, 1);
        for seq in 0..2 {
            let r = w
                .report(pb::ReportRequest {
                    trial_id: a.id(),
                    attempt: 1,
                    seq,
                    progress_json: step_json(seq + 1),
                })
                .await
                .unwrap();
            assert!(r.into_inner().accepted);
        }
        server.shutdown().await;
    }
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    let mut admin = server.admin().await;
    let mut w = server.worker().await;
    let hb = w
        .heartbeat(pb::HeartbeatRequest {
            worker_id: wid.clone(),
            held: vec![pb::HeldLease {
                trial_id: a.id(),
                attempt: 1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hb.renewed.len(), 1, "lease renewed after the restart");
    assert!(hb.cancel.is_empty());
    // The worker replays its last report (it did not know whether it arrived), then goes on.
    for seq in 1..4 {
        let r = w
            .report(pb::ReportRequest {
                trial_id: a.id(),
                attempt: 1,
                seq,
                progress_json: step_json(seq + 1),
            })
            .await
            .unwrap();
        assert!(r.into_inner().accepted);
    }
    let five = TrialMetrics {
        perplexity: 5.0,
        ..Default::default()
    };
    assert!(complete(&mut w, &a.id(), 1, &five).await);
    let got = admin
        .get(pb::GetRequest { sweep: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.trials[0].state.as_str(), got.trials[0].attempts),
        ("finished", 1)
    );
    let ev = admin
        .events(pb::EventsRequest { trial_id: a.id() })
        .await
        .unwrap()
        .into_inner();
    let seqs: Vec<u64> = ev.events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [0, 1, 2, 3], "every report once, in order");
    server.shutdown().await;
}

/// A cancel naming an unknown trial after known ones changes nothing: neither the scheduler's
/// memory nor the store (which once disagreed: cancelled in memory, running on disk, revived by a
/// restart).
#[tokio::test]
async fn cancel_with_an_unknown_id_cancels_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let a = config("a", Base::HfDir { path: "/m".into() }, 10);
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    let mut admin = server.admin().await;
    let mut w = server.worker().await;
    admin
        .submit(pb::SubmitRequest {
            sweep_name: "s".into(),
            sweep_text: String::new(),
            trials: vec![submitted(&a)],
        })
        .await
        .unwrap();
    let err = admin
        .cancel(pb::CancelRequest {
            sweep: String::new(),
            trial_ids: vec![a.id(), "00000000deadbeef".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("00000000deadbeef"),
        "{}",
        err.message()
    );
    let got = admin
        .get(pb::GetRequest { sweep: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.trials[0].state, "queued");
    // The scheduler agrees with the store: the trial is still handed out.
    let wid = register(&mut w, "one").await;
    let l = lease(&mut w, &wid, 2000)
        .await
        .expect("the trial is still queued");
    assert_eq!(l.trial_id, a.id());
    // A valid cancel still works.
    let c = admin
        .cancel(pb::CancelRequest {
            sweep: String::new(),
            trial_ids: vec![a.id()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.cancelled, vec![a.id()]);
    server.shutdown().await;
}

/// An upload that began while its attempt owned the trial, and ends after the lease passed to a
/// new attempt, must not replace the new attempt's checkpoint.
#[tokio::test]
async fn a_stale_upload_finishing_late_does_not_replace_the_new_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let a = config("a", Base::HfDir { path: "/m".into() }, 10);
    let server = Server::start(dir.path(), Duration::from_millis(400)).await;
    let mut admin = server.admin().await;
    let mut w = server.worker().await;
    admin
        .submit(pb::SubmitRequest {
            sweep_name: "s".into(),
            sweep_text: String::new(),
            trials: vec![submitted(&a)],
        })
        .await
        .unwrap();
    let w1 = register(&mut w, "one").await;
    let w2 = register(&mut w, "two").await;
    let l1 = lease(&mut w, &w1, 1000).await.unwrap();
    assert_eq!(l1.attempt, 1);
    // Attempt 1 starts uploading its checkpoint while it owns the trial...
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let chunk = |attempt: u32, byte: u8| pb::ArtifactChunk {
        trial_id: a.id(),
        attempt,
        name: "ckpt/state.safetensors".into(),
        data: vec![byte; 16],
    };
    tx.send(chunk(1, 1)).await.unwrap();
    let mut w_slow = server.worker().await;
    let slow = tokio::spawn(async move {
        w_slow
            .upload_artifact(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    // ...then goes silent: its lease expires and attempt 2 takes over and uploads its own.
    let l2 = tokio::time::timeout(Duration::from_secs(5), lease(&mut w, &w2, 5000))
        .await
        .unwrap()
        .expect("re-queued");
    assert_eq!(l2.attempt, 2);
    w.upload_artifact(tokio_stream::iter(vec![chunk(2, 2)]))
        .await
        .unwrap();
    // The stale stream ends now: refused, and the new checkpoint stays.
    tx.send(chunk(1, 1)).await.unwrap();
    drop(tx);
    let res = slow.await.unwrap();
    assert_eq!(
        res.map(|_| ()).unwrap_err().code(),
        tonic::Code::FailedPrecondition
    );
    let mut down = w
        .download_artifact(pb::DownloadArtifactRequest {
            trial_id: a.id(),
            name: "ckpt/state.safetensors".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(c) = down.next().await {
        bytes.extend(c.unwrap().data);
    }
    assert_eq!(bytes, vec![2u8; 16]);
    server.shutdown().await;
}

/// A wall-clock step (NTP, `date -s`) does not expire leases: deadlines are monotonic.
#[tokio::test]
async fn a_wall_clock_step_does_not_expire_leases() {
    let dir = tempfile::tempdir().unwrap();
    let a = config("a", Base::HfDir { path: "/m".into() }, 10);
    let clock = Clock::default();
    let server = Server::start_with_clock(dir.path(), Duration::from_secs(3), clock.clone()).await;
    let mut admin = server.admin().await;
    let mut w = server.worker().await;
    admin
        .submit(pb::SubmitRequest {
            sweep_name: "s".into(),
            sweep_text: String::new(),
            trials: vec![submitted(&a)],
        })
        .await
        .unwrap();
    let wid = register(&mut w, "one").await;
    let l = lease(&mut w, &wid, 1000).await.unwrap();
    let before = clock.wall_ms();
    assert!(
        (l.deadline_unix_ms - before - 3000).abs() < 1000,
        "the deadline is shown in wall time: {} vs now {before}",
        l.deadline_unix_ms
    );
    clock.step_wall(3_600_000);
    // Several scheduler ticks (every 300 ms with a 3 s ttl) pass after the step.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let hb = w
        .heartbeat(pb::HeartbeatRequest {
            worker_id: wid,
            held: vec![pb::HeldLease {
                trial_id: a.id(),
                attempt: 1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(hb.cancel.is_empty(), "the lease survived the step: {hb:?}");
    assert_eq!(hb.renewed.len(), 1);
    let shown = hb.renewed[0].deadline_unix_ms - clock.wall_ms();
    assert!((2000..=3000).contains(&shown), "{shown}");
    let got = admin
        .get(pb::GetRequest { sweep: "s".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (got.trials[0].state.as_str(), got.trials[0].attempts),
        ("running", 1)
    );
    server.shutdown().await;
}

/// `grpc.health.v1.Health` answers without a token (Kubernetes probes and grpcurl carry none):
/// SERVING, NOT_SERVING while the store is locked by someone else, SERVING again after; the
/// token still guards the API on the same port.
#[tokio::test]
async fn health_answers_without_a_token_and_follows_the_store() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = |mut h: HealthClient<tonic::transport::Channel>, service: &'static str| async move {
        h.check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status())
    };
    for service in ["", "ablate.v1.SweepService", "ablate.v1.WorkerService"] {
        assert_eq!(
            status(health.clone(), service).await.unwrap(),
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let unknown = status(health.clone(), "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // The API itself still wants its token.
    let mut anon = admin_client(&server.url, None).await.unwrap();
    let err = anon.list(pb::ListRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // Another process holds the database's write lock: the store cannot take a write.
    let db = dir.path().join("ablate.sqlite");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
        locked_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
    });
    locked_rx.recv().unwrap();
    let wait_for = |want: ServingStatus| {
        let health = health.clone();
        async move {
            let until = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let got = status(health.clone(), "").await.unwrap();
                if got == want {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < until,
                    "health stayed {got:?}, expected {want:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for(ServingStatus::NotServing).await;
    assert_eq!(
        status(health.clone(), "ablate.v1.SweepService")
            .await
            .unwrap(),
        ServingStatus::NotServing
    );
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    wait_for(ServingStatus::Serving).await;
    // An open health watch does not hold up shutdown, and sees the server go NOT_SERVING while it
    // drains, before the stream ends.
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().status();
    assert_eq!(first, ServingStatus::Serving);
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Ok(Some(m)) = watch.message().await {
            seen.push(m.status());
        }
        seen
    });
    server.shutdown().await;
    let seen = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the watch ends with the server")
        .unwrap();
    assert_eq!(seen, [ServingStatus::NotServing], "while draining");
}

/// `health_listener`: a plain port with only the health service (for probes that cannot do TLS).
#[tokio::test]
async fn the_health_port_serves_health_and_nothing_else() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let health_url = format!("http://{}", health_l.local_addr().unwrap());
    let mut opts = ServeOpts::new(dir.path());
    opts.admin_token = Some(ADMIN_TOKEN.into());
    opts.worker_token = Some(WORKER_TOKEN.into());
    opts.health_listener = Some(std::sync::Arc::new(health_l));
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(serve(listener, opts, async move {
        let _ = rx.await;
    }));
    let channel = tonic::transport::Endpoint::from_shared(health_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let got = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "ablate.v1.SweepService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.status(), ServingStatus::Serving);
    let mut admin = admin_client(&health_url, Some(ADMIN_TOKEN)).await.unwrap();
    let err = admin.list(pb::ListRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Version skew is refused at registration with a message naming both versions and what to
/// upgrade; a worker from before the field (version 0) is still accepted.
#[tokio::test]
async fn another_protocol_version_is_refused_and_an_old_worker_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    let mut w = server.worker().await;
    let req = |v: u32| pb::RegisterRequest {
        device_kind: "cpu".into(),
        device_name: "cpu".into(),
        memory_bytes: 1 << 30,
        host: "box".into(),
        worker_name: format!("w{v}"),
        protocol_version: v,
        ..Default::default()
    };
    let ours = ablate_proto::PROTOCOL_VERSION;
    // A newer worker than this coordinator: upgrade the coordinator.
    let err = w.register(req(ours + 1)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let m = err.message();
    assert!(m.contains(&format!("protocol version {}", ours + 1)), "{m}");
    assert!(m.contains(&format!("protocol version {ours}")), "{m}");
    assert!(m.contains("upgrade the coordinator"), "{m}");
    assert!(m.contains(&format!("\"w{}\"", ours + 1)), "{m}");
    // An older one (a release that already sent the field): upgrade the worker. Nothing was
    // registered for either.
    if ours > 1 {
        let err = w.register(req(ours - 1)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(
            err.message().contains("upgrade the worker"),
            "{}",
            err.message()
        );
    }
    // The same version, and version 0 (a worker from before the field): both registered.
    let resp = w.register(req(ours)).await.unwrap().into_inner();
    assert_eq!(resp.protocol_version, ours);
    assert!(!resp.worker_id.is_empty());
    let old = w.register(req(0)).await.unwrap().into_inner();
    assert!(!old.worker_id.is_empty());
    server.shutdown().await;
    let db = rusqlite::Connection::open(dir.path().join("ablate.sqlite")).unwrap();
    let mut names: Vec<String> = db
        .prepare("SELECT name FROM workers ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["w0".to_string(), format!("w{ours}")],
        "refused workers were registered"
    );
}

fn eval_json(step: u64, valid_loss: f64) -> String {
    serde_json::to_string(&Progress::Eval { step, valid_loss }).unwrap()
}

/// Grid trials of one tuned arm (rungs at step 10 of 20), middle learning rate first.
fn tuned_arm(lrs: &[f64]) -> Vec<TrialConfig> {
    let mut grid = lrs.to_vec();
    grid.sort_by(f64::total_cmp);
    lrs.iter()
        .map(|&lr| {
            let mut c = config(
                &format!("freeze-1 lr={lr:e}"),
                Base::HfDir { path: "/m".into() },
                20,
            );
            c.train.lr = lr;
            c.train.eval_every = 10;
            c.tune = Some(TuneTag {
                arm: "freeze-1".into(),
                role: TuneRole::Tune,
                strategy: TuneStrategy::Asha {
                    reduction_factor: 3,
                },
                rungs: vec![10],
                lr: grid.clone(),
                weight_decay: vec![],
                confirm_seeds: vec![0, 1],
            });
            c
        })
        .collect()
}

#[tokio::test]
async fn the_tuner_stops_at_rungs_confirms_the_winner_and_its_decisions_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let grid = tuned_arm(&[1e-3, 3e-4, 3e-3]);
    let ids: Vec<String> = grid.iter().map(|c| c.id()).collect();
    let report = |w: &mut WorkerClient, id: &str, seq: u64, json: String| {
        let mut w = w.clone();
        let id = id.to_string();
        async move {
            w.report(pb::ReportRequest {
                trial_id: id,
                attempt: 1,
                seq,
                progress_json: json,
            })
            .await
            .unwrap()
            .into_inner()
            .accepted
        }
    };
    let get = |admin: &mut AdminClient| {
        let mut admin = admin.clone();
        async move {
            admin
                .get(pb::GetRequest { sweep: "s".into() })
                .await
                .unwrap()
                .into_inner()
        }
    };
    {
        let server = Server::start(dir.path(), Duration::from_secs(30)).await;
        let mut admin = server.admin().await;
        let mut w = server.worker().await;
        admin
            .submit(pb::SubmitRequest {
                sweep_name: "s".into(),
                sweep_text: "t".into(),
                trials: grid.iter().map(submitted).collect(),
            })
            .await
            .unwrap();
        let wid = register(&mut w, "one").await;
        for id in &ids {
            assert_eq!(&lease(&mut w, &wid, 1000).await.unwrap().trial_id, id);
        }
        // The first loss at the rung goes on; a worse one is stopped (the worker is told so).
        assert!(report(&mut w, &ids[0], 0, eval_json(10, 4.0)).await);
        assert!(!report(&mut w, &ids[1], 0, eval_json(10, 4.5)).await);
        let got = get(&mut admin).await;
        let low = got.trials.iter().find(|t| t.id == ids[1]).unwrap();
        assert_eq!(low.state, "stopped");
        assert!(
            low.failure_message.contains("step 10"),
            "{}",
            low.failure_message
        );
        assert!(
            low.tune_json.contains("\"verdict\":\"stop\""),
            "{}",
            low.tune_json
        );
        server.shutdown().await;
    }
    // After a restart the rung still holds 4.0 and 4.5: 4.2 ranks 2 of 3 and stops.
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    let mut admin = server.admin().await;
    let mut w = server.worker().await;
    assert!(!report(&mut w, &ids[2], 0, eval_json(10, 4.2)).await);
    // The winner's attempt reports the rung again (its worker restarted it): nothing changes.
    assert!(report(&mut w, &ids[0], 1, eval_json(10, 9.0)).await);
    // A late report from a stopped trial is refused.
    assert!(!report(&mut w, &ids[1], 1, eval_json(10, 1.0)).await);
    // A watcher of the sweep, opened while it has only the grid trials, must learn of the
    // confirm trial the decision adds (or it would think the sweep done without it).
    let mut watch = admin
        .watch(pb::WatchRequest { sweep: "s".into() })
        .await
        .unwrap()
        .into_inner();
    match watch.next().await.unwrap().unwrap().event {
        Some(pb::watch_event::Event::Snapshot(s)) => assert_eq!(s.trials.len(), 3),
        e => panic!("first watch event: {e:?}"),
    }
    let winner = TrialMetrics {
        perplexity: 50.0,
        valid_loss: 3.9,
        ..Default::default()
    };
    assert!(complete(&mut w, &ids[0], 1, &winner).await);
    // The arm is decided: the winner's setting runs at the second confirm seed.
    let got = get(&mut admin).await;
    assert_eq!(
        got.trials.len(),
        4,
        "{:?}",
        got.trials.iter().map(|t| &t.name).collect::<Vec<_>>()
    );
    let confirm = got
        .trials
        .iter()
        .find(|t| !ids.contains(&t.id))
        .unwrap()
        .clone();
    let c: TrialConfig = serde_json::from_str(&confirm.config_json).unwrap();
    assert_eq!(confirm.name, "freeze-1 lr=1e-3 seed=1");
    assert_eq!((c.seed, c.train.lr), (1, 1e-3));
    assert_eq!(c.tune.as_ref().unwrap().role, TuneRole::Confirm);
    assert_eq!(confirm.state, "queued");
    let states: Vec<&str> = ids
        .iter()
        .map(|id| {
            got.trials
                .iter()
                .find(|t| &t.id == id)
                .unwrap()
                .state
                .as_str()
        })
        .collect();
    assert_eq!(states, ["finished", "stopped", "stopped"]);
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match watch.next().await.unwrap().unwrap().event {
                Some(pb::watch_event::Event::Snapshot(s))
                    if s.trials.iter().any(|t| t.id == confirm.id) =>
                {
                    break s.trials.len();
                }
                Some(pb::watch_event::Event::Trial(t)) if t.id == confirm.id => break 0,
                _ => {}
            }
        }
    })
    .await
    .expect("the watch shows the confirm trial added to the sweep");
    assert_eq!(seen, 4, "a new snapshot with the confirm trial");
    drop(watch);
    server.shutdown().await;
    // Another restart decides nothing again: no second confirm run.
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    let mut admin = server.admin().await;
    assert_eq!(get(&mut admin).await.trials.len(), 4);
    server.shutdown().await;
}

/// One trial's round of calls on a loopback connection costs milliseconds, not the 40 ms of a
/// delayed ACK: the accepted sockets have Nagle's algorithm off (a small response segment
/// written behind an unacknowledged one used to wait for the peer's delayed ACK, which made
/// every lease of the `overhead` example ~45 ms slower than its work).
#[tokio::test]
async fn back_to_back_calls_do_not_wait_for_delayed_acks() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    let mut admin = server.admin().await;
    let mut w = server.worker().await;
    let wid = register(&mut w, "quick").await;
    let trials: Vec<TrialConfig> = (0..20)
        .map(|i| config(&format!("t{i}"), Base::HfDir { path: "/m".into() }, 1))
        .collect();
    let sub = admin
        .submit(pb::SubmitRequest {
            sweep_name: "quick".into(),
            sweep_text: String::new(),
            trials: trials.iter().map(submitted).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let metrics = "{\"perplexity\":1.0,\"valid_loss\":0,\"valid_tokens\":0,\"train_tokens\":0,\"steps\":1,\"trainable_params\":0,\"total_params\":0,\"final_train_loss\":null,\"wall_seconds\":0}";
    let mut rounds = Vec::new();
    for _ in 0..trials.len() {
        let t0 = std::time::Instant::now();
        let l = lease(&mut w, &wid, 1000).await.expect("a queued trial");
        w.report(pb::ReportRequest {
            trial_id: l.trial_id.clone(),
            attempt: l.attempt,
            seq: 0,
            progress_json: step_json(1),
        })
        .await
        .unwrap();
        let done = w
            .complete(pb::CompleteRequest {
                trial_id: l.trial_id.clone(),
                attempt: l.attempt,
                metrics_json: metrics.into(),
            })
            .await
            .unwrap();
        assert!(done.into_inner().accepted);
        admin
            .get(pb::GetRequest {
                sweep: sub.sweep_id.clone(),
            })
            .await
            .unwrap();
        rounds.push(t0.elapsed());
    }
    // The status read for the whole sweep at once says what the per-trial reads said.
    let snap = admin
        .get(pb::GetRequest {
            sweep: sub.sweep_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(snap.trials.len(), trials.len());
    for t in &snap.trials {
        assert_eq!(
            (t.state.as_str(), t.worker_name.as_str()),
            ("finished", "quick")
        );
        assert_eq!(t.device_name, "cpu");
        assert_eq!(t.progress.as_ref().map(|p| p.step), Some(1), "{}", t.id);
        assert_eq!(t.attempt_costs.len(), 1, "{}", t.id);
        assert_eq!(t.attempt_costs[0].device_kind, "cpu");
        assert_eq!(t.attempt_costs[0].devices, 1);
        assert!(t.tune_json.is_empty());
    }
    rounds.sort();
    let median = rounds[rounds.len() / 2];
    assert!(
        median < Duration::from_millis(30),
        "lease + report + complete + get took {median:?} (median of {}): sockets wait for delayed ACKs?",
        rounds.len()
    );
    server.shutdown().await;
}

/// `Client::watch` (what `ablate status --watch` and `ablate run` follow a sweep with): the
/// snapshot, then a worker's lease, step report and completion arrive as changes applied to the
/// view, with no `Get` in between.
#[tokio::test]
async fn a_client_watch_applies_each_change_to_its_view() {
    use coordinator::cli::{Client, SweepView, SweepWatch};
    use coordinator::scheduler::TrialState;
    async fn until(watch: &mut SweepWatch, what: &str, ok: impl Fn(&SweepView) -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !ok(watch.view()) {
                assert!(watch.next().await.unwrap(), "the stream ended");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: {:?}", watch.view().trials));
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), Duration::from_secs(30)).await;
    let mut admin = server.admin().await;
    let mut w = server.worker().await;
    let c = config("a", Base::HfDir { path: "/m".into() }, 10);
    admin
        .submit(pb::SubmitRequest {
            sweep_name: "s".into(),
            sweep_text: "t".into(),
            trials: vec![submitted(&c)],
        })
        .await
        .unwrap();
    let mut client = Client::connect(&server.url, Some(ADMIN_TOKEN.into()))
        .await
        .unwrap();
    let mut watch = client.watch("s").await.unwrap();
    assert_eq!(watch.view().trials.len(), 1);
    assert_eq!(watch.view().trials[0].state, TrialState::Queued);
    let wid = register(&mut w, "one").await;
    let l = lease(&mut w, &wid, 1000).await.unwrap();
    until(&mut watch, "running", |v| {
        v.trials[0].state == TrialState::Running
    })
    .await;
    let accepted = w
        .report(pb::ReportRequest {
            trial_id: l.trial_id.clone(),
            attempt: 1,
            seq: 0,
            progress_json: step_json(3),
        })
        .await
        .unwrap()
        .into_inner()
        .accepted;
    assert!(accepted);
    until(&mut watch, "step 3", |v| v.trials[0].step == 3).await;
    let t = &watch.view().trials[0];
    assert_eq!(
        (t.total, t.loss, t.tokens_per_sec),
        (10, Some(4.5), Some(123.0))
    );
    let metrics = TrialMetrics {
        perplexity: 42.0,
        valid_loss: 3.7,
        ..Default::default()
    };
    assert!(complete(&mut w, &l.trial_id, 1, &metrics).await);
    until(&mut watch, "finished", |v| v.all_terminal()).await;
    let t = &watch.view().trials[0];
    assert_eq!(t.state, TrialState::Finished);
    assert_eq!(t.metrics.as_ref().map(|m| m.perplexity), Some(42.0));
    drop(watch);
    server.shutdown().await;
}
