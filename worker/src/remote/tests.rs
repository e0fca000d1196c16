//! Unit tests of remote mode: backoff, hostile leases, names and file walks.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use ablate_proto::pb;
use experiments::runner::TrialEnv;
use experiments::trial::TrialConfig;
use tonic::Status;

use super::attempt::check_name_from_coordinator;
use super::call::{client, jitter_fraction, Backoff};
use super::lease::{hostname, Worker};
use super::transfer::{copy_dir, list_files};
use super::{EnvFactory, RemoteOpts, MAX_BACKOFF};

use tonic::Request;

#[test]
fn backoff_is_capped_and_jitter_in_range() {
    let mut b = Backoff::new();
    let mut base = Duration::from_millis(200);
    for i in 0..40 {
        let d = b.step();
        assert!(
            d >= base.mul_f64(0.5) && d < base.mul_f64(1.5),
            "delay {i}: {d:?} outside 0.5-1.5x {base:?}"
        );
        base = (base * 2).min(MAX_BACKOFF);
    }
    assert_eq!(b.next, MAX_BACKOFF);
    assert!(b.step() < MAX_BACKOFF.mul_f64(1.5));
    for _ in 0..100 {
        let j = jitter_fraction();
        assert!((0.0..1.0).contains(&j));
    }
}

/// A coordinator that hands out one lease with the given trial id, then records the
/// worker's `Fail` (a compromised or buggy coordinator; the real one only makes hex ids).
struct Hostile {
    lease: pb::Lease,
    failed: tokio::sync::Mutex<Vec<pb::FailRequest>>,
}

struct HostileSvc(Arc<Hostile>);

type Chunks =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for HostileSvc {
    async fn register(
        &self,
        _: Request<pb::RegisterRequest>,
    ) -> Result<tonic::Response<pb::RegisterResponse>, Status> {
        Err(Status::unimplemented("register"))
    }
    async fn lease(
        &self,
        _: Request<pb::LeaseRequest>,
    ) -> Result<tonic::Response<pb::LeaseResponse>, Status> {
        Ok(tonic::Response::new(pb::LeaseResponse {
            lease: Some(self.0.lease.clone()),
            drain: false,
        }))
    }
    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<tonic::Response<pb::HeartbeatResponse>, Status> {
        Ok(tonic::Response::new(pb::HeartbeatResponse::default()))
    }
    async fn report(
        &self,
        _: Request<pb::ReportRequest>,
    ) -> Result<tonic::Response<pb::ReportResponse>, Status> {
        Ok(tonic::Response::new(pb::ReportResponse { accepted: true }))
    }
    async fn complete(
        &self,
        _: Request<pb::CompleteRequest>,
    ) -> Result<tonic::Response<pb::CompleteResponse>, Status> {
        Err(Status::unimplemented("complete"))
    }
    async fn fail(
        &self,
        req: Request<pb::FailRequest>,
    ) -> Result<tonic::Response<pb::FailResponse>, Status> {
        self.0.failed.lock().await.push(req.into_inner());
        Ok(tonic::Response::new(pb::FailResponse { accepted: true }))
    }
    async fn upload_artifact(
        &self,
        _: Request<tonic::Streaming<pb::ArtifactChunk>>,
    ) -> Result<tonic::Response<pb::UploadArtifactResponse>, Status> {
        Err(Status::failed_precondition("upload"))
    }
    type DownloadArtifactStream = Chunks;
    async fn download_artifact(
        &self,
        _: Request<pb::DownloadArtifactRequest>,
    ) -> Result<tonic::Response<Chunks>, Status> {
        Err(Status::not_found("no such artifact"))
    }
    async fn list_artifacts(
        &self,
        _: Request<pb::ListArtifactsRequest>,
    ) -> Result<tonic::Response<pb::ListArtifactsResponse>, Status> {
        Err(Status::not_found("no artifacts"))
    }
    async fn rendezvous(
        &self,
        _: Request<pb::RendezvousRequest>,
    ) -> Result<tonic::Response<pb::RendezvousResponse>, Status> {
        Err(Status::unimplemented("rendezvous"))
    }
}

fn any_config() -> TrialConfig {
    use experiments::trial::*;
    TrialConfig {
        name: "t".into(),
        method: Method::Freeze { top: 1 },
        base: Base::HfDir { path: "/m".into() },
        data: DataSpec {
            train: CorpusSpec {
                paths: vec!["/nonexistent/x.txt".into()],
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
            steps: 1,
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

/// A lease whose trial id is `..` must not make the worker delete `<work>/ckpt` (the resume
/// path clears `<work>/trials/<id>/ckpt` before downloading): it is refused, by name.
#[tokio::test]
async fn trial_ids_from_the_coordinator_are_refused_unless_plain() {
    let hostile = Arc::new(Hostile {
        lease: pb::Lease {
            trial_id: "..".into(),
            attempt: 1,
            config_json: serde_json::to_string(&any_config()).unwrap(),
            base_trial_id: String::new(),
            resume_artifacts: vec!["ckpt/state.safetensors".into()],
            deadline_unix_ms: 0,
            rank: 0,
            world: 1,
        },
        failed: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::worker_service_server::WorkerServiceServer::new(
                HostileSvc(hostile.clone()),
            ))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    // As after any earlier trial: `<work>/trials` exists, so `trials/..` resolves.
    std::fs::create_dir_all(work.join("trials")).unwrap();
    let victim = work.join("ckpt").join("keep");
    std::fs::create_dir_all(victim.parent().unwrap()).unwrap();
    std::fs::write(&victim, b"mine").unwrap();
    let opts = RemoteOpts {
        coordinator: url,
        ca_pem: None,
        device: "cpu".into(),
        token: None,
        token_file: None,
        cache_dir: dir.path().join("cache"),
        work_dir: work.clone(),
        name: "w".into(),
        price_per_hour: 0.0,
        stop_grace: crate::signals::DEFAULT_STOP_GRACE,
        metrics: crate::metrics::WorkerMetrics::new("w", "cpu"),
    };
    let make_env: EnvFactory = Arc::new(|base_dir, out_dir, cache_dir, stop, sync| TrialEnv {
        device: candle_core::Device::Cpu,
        base_dir,
        out_dir,
        cache_dir,
        stop,
        sync,
    });
    let mut w = Worker {
        client: client(&opts).unwrap(),
        opts,
        make_env,
        gang_device: candle_core::Device::Cpu,
        stop: Arc::new(AtomicBool::new(false)),
        drain: Arc::new(AtomicBool::new(false)),
        worker_id: "w1".into(),
        ttl: Duration::from_secs(30),
    };
    let lease = w.lease().await.unwrap().unwrap();
    w.run_lease(lease).await.unwrap();
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        b"mine",
        "the worker left <work>/ckpt alone"
    );
    let failed = hostile.failed.lock().await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].reason, "bad_lease", "{failed:?}");
    assert!(
        failed[0].message.contains("\"..\""),
        "{}",
        failed[0].message
    );
    assert!(failed[0].deterministic);
    server.abort();
}

#[test]
fn the_host_name_is_the_kernels() {
    let h = hostname().expect("gethostname works here");
    assert!(!h.is_empty() && !h.contains(['\0', '/']), "{h:?}");
    let uname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(h, uname.trim());
}

#[test]
fn names_from_the_coordinator_are_checked() {
    assert!(check_name_from_coordinator("ckpt/state.safetensors").is_ok());
    for bad in [
        "../x",
        "/etc/passwd",
        "a//b",
        "ckpt/../../x",
        "",
        "ckpt/.hidden",
    ] {
        let err = format!("{:#}", check_name_from_coordinator(bad).unwrap_err());
        assert!(err.contains("from the coordinator"), "{bad}: {err}");
    }
}

#[test]
fn lists_files_recursively_and_sorted() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("b/c")).unwrap();
    std::fs::write(d.path().join("b/c/x"), b"1").unwrap();
    std::fs::write(d.path().join("a"), b"2").unwrap();
    assert_eq!(
        list_files(d.path()).unwrap(),
        vec!["a".to_string(), "b/c/x".to_string()]
    );
    let d2 = tempfile::tempdir().unwrap();
    let dst = d2.path().join("copy");
    copy_dir(d.path(), &dst).unwrap();
    assert_eq!(std::fs::read(dst.join("b/c/x")).unwrap(), b"1");
}
