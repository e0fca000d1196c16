//! The ranks of a gang trial (`train.ranks > 1`) averaging their gradients every step.
//!
//! The coordinator leases a gang's k workers together (all on one host) and gives each its rank.
//! Rank 0 opens the collective and posts a rendezvous blob through the coordinator; the others
//! read it and join. Two collectives implement [`GradSync`]:
//!
//! - [`TcpGroup`], always built: rank 0 listens on loopback and every other rank connects; each
//!   step the other ranks send their flattened gradients and loss, rank 0 adds them up in rank
//!   order and sends the mean back. Gradients pass through host memory, so this is for CPU
//!   workers (and a fallback for GPU workers built without NCCL). Blob: `tcp 127.0.0.1:PORT`.
//! - `NcclGroup` (feature `nccl`): an NCCL communicator over the host's GPUs, the gradients
//!   averaged in place on the devices with `ncclAllReduce(avg)`. Blob: `nccl ` + the 128-byte
//!   NCCL unique id, which rank 0 creates (it also hosts NCCL's bootstrap socket).
//!
//! A rank that waits for its peers checks the trial's stop flag every second, so a gang the
//! coordinator ended (one member failed, was preempted or missed its heartbeats) stops instead of
//! waiting forever; a peer that died shows up as a closed connection at once.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use experiments::train::GradSync;
use experiments::{Error, Result};

/// How long rank 0 waits for its peers to connect.
const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// Read timeout between checks of the stop flag.
const POLL: Duration = Duration::from_secs(1);

/// The star collective over loopback TCP (see the module doc).
pub struct TcpGroup {
    rank: usize,
    world: usize,
    stop: Arc<AtomicBool>,
    /// Rank 0: one stream per other rank, index r-1. Other ranks: the stream to rank 0.
    peers: Mutex<Vec<TcpStream>>,
}

/// Rank 0's half-open group: listening, not yet joined.
pub struct TcpHost {
    listener: TcpListener,
    world: usize,
}

impl TcpHost {
    /// Listen on loopback for the other `world - 1` ranks.
    pub fn bind(world: usize) -> std::io::Result<TcpHost> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        Ok(TcpHost { listener, world })
    }

    /// What the other ranks connect with.
    pub fn blob(&self) -> std::io::Result<Vec<u8>> {
        Ok(format!("tcp {}", self.listener.local_addr()?).into_bytes())
    }

    /// Accept every other rank (each says its rank first).
    pub fn accept(self, stop: Arc<AtomicBool>) -> Result<TcpGroup> {
        let started = Instant::now();
        self.listener.set_nonblocking(true).map_err(io_err)?;
        let mut slots: Vec<Option<TcpStream>> = (1..self.world).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            if stop.load(Ordering::SeqCst) {
                return Err(Error::Stopped);
            }
            if started.elapsed() > JOIN_TIMEOUT {
                return Err(Error::Other(format!(
                    "gang: only {} of {} ranks joined within {JOIN_TIMEOUT:?}",
                    1 + slots.iter().filter(|s| s.is_some()).count(),
                    self.world
                )));
            }
            match self.listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(io_err)?;
                    s.set_read_timeout(Some(POLL)).map_err(io_err)?;
                    s.set_nodelay(true).map_err(io_err)?;
                    let mut b = [0u8; 4];
                    read_full(&mut s, &mut b, &stop)?;
                    let r = u32::from_le_bytes(b) as usize;
                    if r == 0 || r >= self.world || slots[r - 1].is_some() {
                        return Err(Error::Other(format!("gang: unexpected rank {r} joined")));
                    }
                    slots[r - 1] = Some(s);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(TcpGroup {
            rank: 0,
            world: self.world,
            stop,
            peers: Mutex::new(slots.into_iter().map(|s| s.expect("all joined")).collect()),
        })
    }
}

impl TcpGroup {
    /// Join rank 0's group from its blob.
    pub fn join(blob: &[u8], rank: usize, world: usize, stop: Arc<AtomicBool>) -> Result<TcpGroup> {
        let text = std::str::from_utf8(blob).unwrap_or("");
        let addr = text.strip_prefix("tcp ").ok_or_else(|| {
            Error::Other(format!("gang: rendezvous {text:?} is not a tcp collective"))
        })?;
        let started = Instant::now();
        let mut s = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(_) if started.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    return Err(Error::Other(format!(
                        "gang: cannot reach rank 0 at {addr} (ranks must share a machine and \
                         network namespace): {e}"
                    )))
                }
            }
        };
        s.set_read_timeout(Some(POLL)).map_err(io_err)?;
        s.set_nodelay(true).map_err(io_err)?;
        s.write_all(&(rank as u32).to_le_bytes()).map_err(io_err)?;
        Ok(TcpGroup {
            rank,
            world,
            stop,
            peers: Mutex::new(vec![s]),
        })
    }
}

impl GradSync for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&self, grads: &mut BTreeMap<String, Tensor>, loss: &mut f64) -> Result<()> {
        let mut flat: Vec<f32> = Vec::new();
        for g in grads.values() {
            flat.extend(
                g.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?,
            );
        }
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let n = flat.len();
        if self.rank == 0 {
            // Sum in rank order (0, 1, ..), then scale: with two ranks this is bit for bit what
            // one process accumulating both micro-batches computes.
            let mut loss_sum = *loss;
            let mut buf = vec![0u8; n * 4 + 8];
            for s in peers.iter_mut() {
                read_full(s, &mut buf, &self.stop)?;
                for (acc, c) in flat.iter_mut().zip(buf.chunks_exact(4)) {
                    *acc += f32::from_le_bytes(c.try_into().expect("4 bytes"));
                }
                loss_sum += f64::from_le_bytes(buf[n * 4..].try_into().expect("8 bytes"));
            }
            let scale = 1.0 / self.world as f64;
            for x in flat.iter_mut() {
                *x = (*x as f64 * scale) as f32;
            }
            *loss = loss_sum * scale;
            let out = encode(&flat, *loss);
            for s in peers.iter_mut() {
                s.write_all(&out).map_err(io_err)?;
            }
        } else {
            let s = &mut peers[0];
            s.write_all(&encode(&flat, *loss)).map_err(io_err)?;
            let mut buf = vec![0u8; n * 4 + 8];
            read_full(s, &mut buf, &self.stop)?;
            for (x, c) in flat.iter_mut().zip(buf.chunks_exact(4)) {
                *x = f32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
            *loss = f64::from_le_bytes(buf[n * 4..].try_into().expect("8 bytes"));
        }
        let mut off = 0;
        for g in grads.values_mut() {
            let len = g.elem_count();
            let mean = Tensor::from_slice(&flat[off..off + len], g.shape(), g.device())?;
            *g = mean.to_dtype(g.dtype())?;
            off += len;
        }
        Ok(())
    }
}

fn encode(flat: &[f32], loss: f64) -> Vec<u8> {
    let mut out = Vec::with_capacity(flat.len() * 4 + 8);
    for x in flat {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.extend_from_slice(&loss.to_le_bytes());
    out
}

/// Fill `buf`, checking the stop flag at every read timeout.
fn read_full(s: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(Error::Other(
                    "gang: a peer rank closed its connection (it failed or was stopped)".into(),
                ))
            }
            Ok(k) => got += k,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::SeqCst) {
                    return Err(Error::Stopped);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(())
}

fn io_err(e: std::io::Error) -> Error {
    Error::Other(format!("gang collective: {e}"))
}

#[cfg(feature = "nccl")]
pub use nccl::NcclGroup;

#[cfg(feature = "nccl")]
mod nccl {
    //! Gradients averaged on the GPUs with NCCL (one communicator per trial attempt).
    use std::collections::BTreeMap;
    use std::sync::{Mutex, MutexGuard};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, ReduceOp};
    use candle_core::cuda_backend::CudaStorage;
    use candle_core::{CustomOp1, Device, Layout, Shape, Tensor};
    use experiments::train::GradSync;
    use experiments::{Error, Result};

    const PREFIX: &[u8] = b"nccl ";

    /// One rank's NCCL communicator. `GradSync` needs `Send + Sync`; cudarc's `Comm` is neither
    /// (it holds NCCL's raw `ncclComm_t`). NCCL lets a communicator be used from any thread but
    /// not from two at once, so the communicator sits behind a mutex that every collective takes
    /// for its whole duration: `Sync` follows from the `Mutex`, and the only promise made by hand
    /// is that the communicator may move to another thread ([`SendComm`]).
    pub struct NcclGroup {
        comm: Mutex<SendComm>,
        rank: usize,
        world: usize,
    }

    /// A communicator that may be moved to (and dropped on) another thread.
    struct SendComm(Comm);

    // SAFETY: `ncclComm_t` is not tied to the thread that created it: NCCL's rule is only that
    // calls on one communicator are not made concurrently, which the `Mutex` in `NcclGroup`
    // (the only owner) guarantees. The other fields of `Comm` are an `Arc<CudaStream>` (Send and
    // Sync in cudarc) and two integers; `Drop` calls ncclCommAbort, which any thread may call.
    unsafe impl Send for SendComm {}

    impl NcclGroup {
        fn comm(&self) -> MutexGuard<'_, SendComm> {
            // A collective that panicked leaves the communicator as NCCL left it; the next call
            // reports NCCL's error, so go on rather than poisoning every later step.
            self.comm.lock().unwrap_or_else(|e| e.into_inner())
        }
    }

    impl NcclGroup {
        /// Rank 0: a fresh NCCL unique id (this process hosts NCCL's bootstrap) and its blob.
        pub fn new_id() -> Result<(Id, Vec<u8>)> {
            let id = Id::new().map_err(|e| Error::Other(format!("ncclGetUniqueId: {e:?}")))?;
            let mut blob = PREFIX.to_vec();
            blob.extend(id.internal().iter().map(|c| *c as u8));
            Ok((id, blob))
        }

        /// Parse rank 0's blob.
        pub fn id_from_blob(blob: &[u8]) -> Result<Id> {
            let raw = blob
                .strip_prefix(PREFIX)
                .filter(|r| r.len() == 128)
                .ok_or_else(|| Error::Other("gang: rendezvous is not an NCCL unique id".into()))?;
            let mut internal = [0 as ::core::ffi::c_char; 128];
            for (d, s) in internal.iter_mut().zip(raw) {
                *d = *s as ::core::ffi::c_char;
            }
            Ok(Id::uninit(internal))
        }

        /// Join the communicator (blocks until every rank called it).
        pub fn init(device: &Device, rank: usize, world: usize, id: Id) -> Result<NcclGroup> {
            let Device::Cuda(dev) = device else {
                return Err(Error::Config(
                    "gang: NCCL needs a CUDA device (--device cuda:N)".into(),
                ));
            };
            let comm = Comm::from_rank(dev.cuda_stream(), rank, world, id)
                .map_err(|e| Error::Other(format!("ncclCommInitRank: {e:?}")))?;
            Ok(NcclGroup {
                comm: Mutex::new(SendComm(comm)),
                rank,
                world,
            })
        }
    }

    struct AllReduceAvg<'a>(&'a Comm);

    impl CustomOp1 for AllReduceAvg<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-avg"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("NCCL all-reduce needs tensors on a CUDA device")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let n = l.shape().elem_count();
            let Some((start, end)) = l.contiguous_offsets() else {
                candle_core::bail!("NCCL all-reduce needs a contiguous tensor")
            };
            let src = s.as_cuda_slice::<f32>()?.slice(start..end);
            let dev = s.device().clone();
            // SAFETY: `alloc` leaves the buffer uninitialised; ncclAllReduce writes all `n`
            // elements of it before anything reads it (an error returns before the wrap).
            let mut dst = unsafe { dev.alloc::<f32>(n) }?;
            self.0
                .all_reduce(&src, &mut dst, &ReduceOp::Avg)
                .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
            Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
        }
    }

    impl GradSync for NcclGroup {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world(&self) -> usize {
            self.world
        }

        fn all_reduce_mean(
            &self,
            grads: &mut BTreeMap<String, Tensor>,
            loss: &mut f64,
        ) -> Result<()> {
            // Held for every tensor of the step: one collective at a time, in the same order
            // on every rank.
            let comm = self.comm();
            let op = AllReduceAvg(&comm.0);
            for g in grads.values_mut() {
                let dtype = g.dtype();
                let f = g.to_dtype(candle_core::DType::F32)?.contiguous()?;
                *g = f.apply_op1_no_bwd(&op)?.to_dtype(dtype)?;
            }
            let device = grads
                .values()
                .next()
                .map(|g| g.device().clone())
                .ok_or_else(|| Error::Other("gang: no gradients to average".into()))?;
            let l = Tensor::new(&[*loss as f32], &device)?.apply_op1_no_bwd(&op)?;
            *loss = l.to_vec1::<f32>()?[0] as f64;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn grads(rank: usize) -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        let base = rank as f32 + 1.0;
        m.insert(
            "a".to_string(),
            Tensor::from_vec(vec![base, 2.0 * base, -base], 3, &Device::Cpu).unwrap(),
        );
        m.insert(
            "b".to_string(),
            Tensor::from_vec(vec![10.0 * base; 4], (2, 2), &Device::Cpu).unwrap(),
        );
        m
    }

    #[test]
    fn three_ranks_over_loopback_average_gradients_and_loss() {
        let stop = Arc::new(AtomicBool::new(false));
        let host = TcpHost::bind(3).unwrap();
        let blob = host.blob().unwrap();
        let joins: Vec<_> = (1..3)
            .map(|r| {
                let blob = blob.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let g = TcpGroup::join(&blob, r, 3, stop).unwrap();
                    let mut gr = grads(r);
                    let mut loss = r as f64;
                    for _ in 0..2 {
                        g.all_reduce_mean(&mut gr, &mut loss).unwrap();
                    }
                    (gr, loss)
                })
            })
            .collect();
        let g0 = host.accept(stop).unwrap();
        let mut gr = grads(0);
        let mut loss = 0.0;
        for _ in 0..2 {
            g0.all_reduce_mean(&mut gr, &mut loss).unwrap();
        }
        // Mean of 1, 2, 3 is 2: a = [2, 4, -2], b = 20 everywhere; loss mean of 0, 1, 2 = 1.
        let mut all = vec![(gr, loss)];
        all.extend(joins.into_iter().map(|j| j.join().unwrap()));
        for (gr, loss) in all {
            assert_eq!(gr["a"].to_vec1::<f32>().unwrap(), [2.0, 4.0, -2.0]);
            assert_eq!(
                gr["b"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                [20.0; 4]
            );
            assert_eq!(gr["b"].dims(), [2, 2]);
            assert!((loss - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn a_peer_that_goes_away_is_an_error_not_a_hang() {
        let stop = Arc::new(AtomicBool::new(false));
        let host = TcpHost::bind(2).unwrap();
        let blob = host.blob().unwrap();
        let s2 = stop.clone();
        let peer = std::thread::spawn(move || drop(TcpGroup::join(&blob, 1, 2, s2).unwrap()));
        let g0 = host.accept(stop).unwrap();
        peer.join().unwrap();
        let e = g0.all_reduce_mean(&mut grads(0), &mut 0.0).unwrap_err();
        assert!(e.to_string().contains("closed"), "{e}");
    }

    #[test]
    fn a_stop_ends_the_wait_for_peers() {
        let stop = Arc::new(AtomicBool::new(false));
        let host = TcpHost::bind(2).unwrap();
        let blob = host.blob().unwrap();
        let g1 = TcpGroup::join(&blob, 1, 2, stop.clone()).unwrap();
        let g0 = host.accept(stop.clone()).unwrap();
        // Rank 0 never sends: rank 1 waits until the trial is stopped.
        let s = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            s.store(true, Ordering::SeqCst);
        });
        let e = g1.all_reduce_mean(&mut grads(1), &mut 0.0).unwrap_err();
        assert!(matches!(e, Error::Stopped), "{e}");
        drop(g0);
    }
}
