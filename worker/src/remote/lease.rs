//! Registration and the lease long-poll: the worker's state between trials, and how it
//! describes its device and host to the coordinator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ablate_proto::pb;
use tonic::{Code, Status};

use super::call::{flag_set, retry, transient};
use super::{Client, EnvFactory, Refused, RemoteOpts, LEASE_WAIT};

pub(super) struct Worker {
    pub(super) opts: RemoteOpts,
    pub(super) client: Client,
    pub(super) make_env: EnvFactory,
    /// The device, for the NCCL collective of gang trials.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(super) gang_device: candle_core::Device,
    pub(super) stop: Arc<AtomicBool>,
    /// Finish the running trial, take no new one, exit 0.
    pub(super) drain: Arc<AtomicBool>,
    pub(super) worker_id: String,
    pub(super) ttl: Duration,
}

impl Worker {
    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    pub(super) fn draining(&self) -> bool {
        self.drain.load(Ordering::SeqCst)
    }

    pub(super) async fn register(&mut self) -> anyhow::Result<()> {
        let (kind, name, memory) = describe_device(&self.opts.device);
        let req = pb::RegisterRequest {
            device_kind: kind,
            device_name: name,
            memory_bytes: memory,
            host: hostname().unwrap_or_else(|| "unknown".into()),
            worker_name: self.opts.name.clone(),
            price_per_hour: self.opts.price_per_hour,
            protocol_version: ablate_proto::PROTOCOL_VERSION,
        };
        let stop = self.stop.clone();
        let client = self.client.clone();
        let resp = retry("register", &|| stop.load(Ordering::SeqCst), || {
            let mut c = client.clone();
            let req = req.clone();
            async move { c.register(req).await }
        })
        .await
        .map_err(|e| {
            if e.code() == Code::FailedPrecondition {
                anyhow::Error::new(Refused(format!(
                    "the coordinator {} refused this worker: {}",
                    self.opts.coordinator,
                    e.message()
                )))
            } else {
                anyhow::anyhow!("register with {}: {}", self.opts.coordinator, e.message())
            }
        })?
        .into_inner();
        self.worker_id = resp.worker_id;
        self.ttl = Duration::from_millis(resp.lease_ttl_ms.max(300));
        self.opts.metrics.registered();
        tracing::info!(worker_id = %self.worker_id, coordinator = %self.opts.coordinator, "registered");
        Ok(())
    }

    pub(super) async fn lease(&mut self) -> Result<Option<pb::Lease>, Status> {
        let req = pb::LeaseRequest {
            worker_id: self.worker_id.clone(),
            wait_ms: LEASE_WAIT.as_millis() as u64,
        };
        let stop = self.stop.clone();
        let client = self.client.clone();
        let give_up = stop.clone();
        let give_up = move || give_up.load(Ordering::SeqCst);
        let call = retry("lease", &give_up, || {
            let mut c = client.clone();
            let req = req.clone();
            async move { c.lease(req).await }
        });
        // A stop or a drain while idle must not wait for the long poll to run out.
        let r = tokio::select! {
            r = call => r,
            _ = flag_set(&stop) => return Ok(None),
            _ = flag_set(&self.drain) => return Ok(None),
        };
        match r {
            Ok(resp) => {
                let resp = resp.into_inner();
                if resp.drain {
                    tracing::info!("the coordinator drained this worker (ablate drain)");
                    self.drain.store(true, Ordering::SeqCst);
                }
                Ok(resp.lease)
            }
            Err(e) if self.stopping() && transient(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// (kind, name, memory bytes) for the registration: what the status table shows.
pub(super) fn describe_device(device: &str) -> (String, String, u64) {
    if device.starts_with("cuda") {
        let (name, memory) = experiments::gpus::describe_cuda(device);
        ("cuda".into(), name, memory)
    } else {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "cpu".into());
        let mem = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix("MemTotal:")
                        .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
            })
            .map(|kb| kb * 1024)
            .unwrap_or(0);
        ("cpu".into(), model, mem)
    }
}

/// This machine's name from gethostname(2): the `host` a worker registers with (gang ranks on
/// one host share it) and the default `--name`, so both always agree. (`main.rs` once read
/// `/etc/hostname` for the name, which a container may lack or hold another name in.) `None`
/// when the call fails or the name is empty.
pub fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}
