//! The real `ablate-worker` binary refused at registration for version skew: it exits 78
//! (EX_CONFIG, which the systemd unit's RestartPreventExitStatus= and the supervisors honour)
//! with the coordinator's message, instead of retrying forever.
//!
//! The coordinator here is a loopback gRPC server that answers `Register` as a coordinator of
//! another protocol version does (FAILED_PRECONDITION; coordinator/tests/server.rs checks the
//! real coordinator's answer) and records what the worker sent.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ablate_proto::pb;
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Skewed {
    versions: Mutex<Vec<u32>>,
}

type Chunks =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>>;

#[derive(Clone)]
struct Svc(Arc<Skewed>);

#[tonic::async_trait]
impl pb::worker_service_server::WorkerService for Svc {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let v = req.into_inner().protocol_version;
        self.0.versions.lock().unwrap().push(v);
        Err(Status::failed_precondition(format!(
            "version skew: worker \"w\" speaks protocol version {v}, this coordinator (ablate \
             9.0.0) speaks protocol version {}: upgrade the worker",
            v + 1
        )))
    }
    async fn lease(
        &self,
        _: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        Err(Status::unimplemented("lease"))
    }
    async fn heartbeat(
        &self,
        _: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Err(Status::unimplemented("heartbeat"))
    }
    async fn report(
        &self,
        _: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        Err(Status::unimplemented("report"))
    }
    async fn complete(
        &self,
        _: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        Err(Status::unimplemented("complete"))
    }
    async fn fail(
        &self,
        _: Request<pb::FailRequest>,
    ) -> Result<Response<pb::FailResponse>, Status> {
        Err(Status::unimplemented("fail"))
    }
    async fn upload_artifact(
        &self,
        _: Request<tonic::Streaming<pb::ArtifactChunk>>,
    ) -> Result<Response<pb::UploadArtifactResponse>, Status> {
        Err(Status::unimplemented("upload"))
    }
    type DownloadArtifactStream = Chunks;
    async fn download_artifact(
        &self,
        _: Request<pb::DownloadArtifactRequest>,
    ) -> Result<Response<Chunks>, Status> {
        Err(Status::unimplemented("download"))
    }
    async fn list_artifacts(
        &self,
        _: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        Err(Status::unimplemented("list"))
    }
    async fn rendezvous(
        &self,
        _: Request<pb::RendezvousRequest>,
    ) -> Result<Response<pb::RendezvousResponse>, Status> {
        Err(Status::unimplemented("rendezvous"))
    }
}

#[test]
fn a_refused_protocol_version_exits_78_without_retrying() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = Arc::new(Skewed::default());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(pb::worker_service_server::WorkerServiceServer::new(Svc(
                state.clone(),
            )))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_ablate-worker"))
        .args(["--coordinator", &url, "--name", "w", "--cache"])
        .arg(dir.path().join("cache"))
        .arg("--work-dir")
        .arg(dir.path().join("work"))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(78), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(20), "{err}");
    assert!(err.contains("refused this worker"), "{err}");
    assert!(err.contains("upgrade the worker"), "{err}");
    assert!(!err.contains("retrying"), "{err}");
    assert_eq!(
        *state.versions.lock().unwrap(),
        vec![ablate_proto::PROTOCOL_VERSION],
        "one registration, with this build's protocol version"
    );
}
