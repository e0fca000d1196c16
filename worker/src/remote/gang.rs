//! A gang lease's collective: the rendezvous through the coordinator and the blocking join on
//! the training thread.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use experiments::train::GradSync;

/// A gang's collective between the rendezvous (async, through the coordinator) and the blocking
/// join on the training thread.
pub(super) enum Gang {
    TcpHost(crate::collective::TcpHost, Arc<AtomicBool>),
    TcpJoin {
        blob: Vec<u8>,
        rank: usize,
        world: usize,
        stop: Arc<AtomicBool>,
    },
    #[cfg(feature = "nccl")]
    Nccl {
        id: candle_core::cuda_backend::cudarc::nccl::Id,
        blob: Vec<u8>,
        device: candle_core::Device,
        rank: usize,
        world: usize,
    },
}

impl Gang {
    /// Rank 0's side: NCCL on a CUDA device in a build with the `nccl` feature, loopback TCP
    /// otherwise.
    pub(super) fn host(
        device: &candle_core::Device,
        world: usize,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Gang> {
        #[cfg(feature = "nccl")]
        if device.is_cuda() {
            let (id, blob) = crate::collective::NcclGroup::new_id()?;
            return Ok(Gang::Nccl {
                id,
                blob,
                device: device.clone(),
                rank: 0,
                world,
            });
        }
        let _ = device;
        let host = crate::collective::TcpHost::bind(world).context("opening the gang's socket")?;
        Ok(Gang::TcpHost(host, stop))
    }

    pub(super) fn join(
        device: &candle_core::Device,
        blob: Vec<u8>,
        rank: usize,
        world: usize,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<Gang> {
        if blob.starts_with(b"nccl ") {
            #[cfg(feature = "nccl")]
            {
                let id = crate::collective::NcclGroup::id_from_blob(&blob)?;
                return Ok(Gang::Nccl {
                    id,
                    blob,
                    device: device.clone(),
                    rank,
                    world,
                });
            }
            #[cfg(not(feature = "nccl"))]
            anyhow::bail!(
                "rank 0 averages gradients with NCCL but this worker was built without the `nccl` feature"
            );
        }
        let _ = device;
        Ok(Gang::TcpJoin {
            blob,
            rank,
            world,
            stop,
        })
    }

    pub(super) fn blob(&self) -> anyhow::Result<Vec<u8>> {
        match self {
            Gang::TcpHost(h, _) => Ok(h.blob()?),
            Gang::TcpJoin { blob, .. } => Ok(blob.clone()),
            #[cfg(feature = "nccl")]
            Gang::Nccl { blob, .. } => Ok(blob.clone()),
        }
    }

    pub(super) fn connect(self) -> experiments::Result<Arc<dyn GradSync>> {
        Ok(match self {
            Gang::TcpHost(h, stop) => Arc::new(h.accept(stop)?),
            Gang::TcpJoin {
                blob,
                rank,
                world,
                stop,
            } => Arc::new(crate::collective::TcpGroup::join(&blob, rank, world, stop)?),
            #[cfg(feature = "nccl")]
            Gang::Nccl {
                id,
                device,
                rank,
                world,
                ..
            } => Arc::new(crate::collective::NcclGroup::init(
                &device, rank, world, id,
            )?),
        })
    }
}
