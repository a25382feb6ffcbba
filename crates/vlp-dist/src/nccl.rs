//! GPUs: NCCL, the engine under PyTorch's DDP. The communicator's id is made by rank 0
//! and handed to the others through the TCP rendezvous (which never binds `MASTER_PORT`,
//! torchrun's agent's port); tensors never leave the GPU. Exchanges of bytes (loader
//! states, agreements) stay on the TCP connection.
//!
//! NCCL runs on the device's stream, the one candle's work is queued on, so a collective
//! is ordered after the kernels that produced its input and before those that read its
//! output, with no synchronisation of the host.

use std::sync::Mutex;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::result::{NcclError, NcclStatus};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};
use half::{bf16, f16};

use crate::bucket::reduce_in_buckets;
use crate::error::{DistError, Result};
use crate::tcp::TcpCollective;
use crate::{Collective, Reduce};

/// The communicator, used by one thread at a time.
struct Shared(Comm);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not
// overlap; every use goes through the `Mutex` around this value.
unsafe impl Send for Shared {}

/// Processes on GPUs exchanging tensors with NCCL.
pub struct NcclCollective {
    tcp: TcpCollective,
    comm: Mutex<Shared>,
    device: CudaDevice,
}

fn nccl(
    op: &'static str,
) -> impl Fn(candle_core::cuda_backend::cudarc::nccl::result::NcclError) -> DistError {
    move |e| DistError::Nccl {
        op,
        reason: format!("{e:?}"),
    }
}

impl NcclCollective {
    /// The communicator of the ranks of `tcp`, on `device` (this rank's GPU).
    pub fn new(tcp: TcpCollective, device: &Device) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(DistError::Unsupported {
                op: "NCCL",
                reason: format!("device {:?} is not a GPU", device.location()),
            });
        };
        let mine = if tcp.rank() == 0 {
            let id = Id::new().map_err(nccl("get unique id"))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let ids = tcp.all_gather_bytes(&mine)?;
        let raw: [u8; 128] = ids[0].as_slice().try_into().map_err(|_| {
            DistError::OutOfStep(format!("an NCCL id of {} bytes from rank 0", ids[0].len()))
        })?;
        let id = Id::uninit(raw.map(|b| b as _));
        let comm = Comm::from_rank(dev.cuda_stream(), tcp.rank(), tcp.world_size(), id)
            .map_err(nccl("init rank"))?;
        tracing::info!(
            "rank {} of {}: NCCL communicator on {:?}",
            tcp.rank(),
            tcp.world_size(),
            device.location()
        );
        Ok(NcclCollective {
            tcp,
            comm: Mutex::new(Shared(comm)),
            device: dev.clone(),
        })
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.comm.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `f` on the CUDA buffer of a contiguous tensor that starts at its buffer's start.
fn with_slice<T: CudaDType, R>(
    t: &Tensor,
    f: impl FnOnce(&CudaSlice<T>) -> Result<R>,
) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let t = match t.layout().start_offset() {
        0 => t,
        _ => t.copy()?,
    };
    let (storage, _) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => f(s.as_cuda_slice::<T>()?),
        _ => Err(DistError::Unsupported {
            op: "NCCL",
            reason: "a tensor outside the GPU".into(),
        }),
    }
}

/// A new buffer of `n` elements that `fill` writes (an NCCL call), as a tensor of `shape`.
fn filled<T: CudaDType + DeviceRepr + ValidAsZeroBits>(
    dev: &CudaDevice,
    shape: &[usize],
    op: &'static str,
    fill: impl FnOnce(&mut CudaSlice<T>) -> std::result::Result<NcclStatus, NcclError>,
) -> Result<Tensor> {
    let mut out = dev.alloc_zeros::<T>(shape.iter().product())?;
    fill(&mut out).map_err(nccl(op))?;
    let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
    Ok(Tensor::from_storage(
        Storage::Cuda(storage),
        shape,
        BackpropOp::none(),
        false,
    ))
}

/// Runs `$body` with `$t` bound to the Rust type of `$dtype`.
macro_rules! by_dtype {
    ($dtype:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::U32 => {
                type $t = u32;
                $body
            }
            DType::I64 => {
                type $t = i64;
                $body
            }
            DType::U8 => {
                type $t = u8;
                $body
            }
            other => Err(DistError::Unsupported {
                op: $op,
                reason: format!("tensors of {other:?}"),
            }),
        }
    };
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.tcp.rank()
    }

    fn world_size(&self) -> usize {
        self.tcp.world_size()
    }

    fn all_reduce(&self, tensors: &mut [Tensor], op: Reduce) -> Result<()> {
        let dev = &self.device;
        let red = match op {
            Reduce::Sum => ReduceOp::Sum,
            Reduce::Mean => ReduceOp::Avg,
        };
        reduce_in_buckets(tensors, |flat| {
            let n = flat.elem_count();
            by_dtype!(flat.dtype(), "NCCL all-reduce", |T| {
                with_slice::<T, _>(&flat, |src| {
                    filled::<T>(dev, &[n], "all-reduce", |out| {
                        self.comm().0.all_reduce(src, out, &red)
                    })
                })
            })
        })
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        let dims = crate::gather_dims(tensor)?;
        // NCCL gathers equal parts: the ranks' row counts must agree (ALBEF's batches do).
        let rows = self.tcp.all_gather_u64(dims[0] as u64)?;
        if rows.iter().any(|&r| r != dims[0] as u64) {
            return Err(DistError::Unsupported {
                op: "NCCL all-gather",
                reason: format!("ranks with different row counts {rows:?}"),
            });
        }
        let mut shape = dims;
        shape[0] *= self.world_size();
        let dev = &self.device;
        by_dtype!(tensor.dtype(), "NCCL all-gather", |T| {
            with_slice::<T, _>(tensor, |src| {
                filled::<T>(dev, &shape, "all-gather", |out| {
                    self.comm().0.all_gather(src, out)
                })
            })
        })
    }

    fn broadcast(&self, tensors: &mut [Tensor]) -> Result<()> {
        let dev = &self.device;
        for t in tensors.iter_mut() {
            let shape = t.dims().to_vec();
            *t = by_dtype!(t.dtype(), "NCCL broadcast", |T| {
                with_slice::<T, _>(t, |src| {
                    filled::<T>(dev, &shape, "broadcast", |out| {
                        self.comm().0.broadcast(Some(src), out, 0)
                    })
                })
            })?;
        }
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.tcp.all_gather_bytes(bytes)
    }
}
