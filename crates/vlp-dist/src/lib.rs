//! The processes of a data-parallel run and their exchanges.
//!
//! - [`World`] (`world.rs`): who this process is, from the variables `vlp launch`,
//!   `torchrun` or SLURM's `srun` set.
//! - [`Collective`]: the exchanges data-parallel ALBEF needs (PyTorch DDP's gradient
//!   all-reduce, ALBEF's `concat_all_gather`, the broadcast of rank 0's weights), with three
//!   backends: [`SingleProcess`]; [`tcp::TcpCollective`], processes on CPUs talking over TCP
//!   (the role gloo plays for PyTorch), which also carries the rendezvous; and, with the
//!   `nccl` feature, `nccl::NcclCollective` for GPUs.
//! - [`open`]: the one place a backend is chosen.

mod bucket;
pub mod error;
mod grad;
mod host;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;
pub mod world;

use std::time::Duration;

use candle_core::{Device, Tensor};

pub use error::{DistError, Result};
pub use grad::all_gather_with_grad;
pub use world::World;

/// How the values of the ranks are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Sum,
    /// The sum divided by the world size.
    Mean,
}

/// The processes of one run and their exchanges. Every method is a collective call: every
/// rank calls it at the same point of the run, in the same order, or the backend reports
/// the ranks out of step ([`DistError::OutOfStep`]) instead of combining mismatched data.
pub trait Collective: Send + Sync {
    /// This process's index, `0..world_size`.
    fn rank(&self) -> usize;

    /// How many processes take part.
    fn world_size(&self) -> usize;

    /// Whether this process logs, saves checkpoints and writes evaluations (rank 0).
    fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Replaces each tensor by its elementwise sum or mean over the ranks. Tensors are
    /// exchanged in buckets (consecutive tensors of one dtype flattened together), one
    /// exchange per bucket; every rank ends with the same bits.
    fn all_reduce(&self, tensors: &mut [Tensor], op: Reduce) -> Result<()>;

    /// Every rank's tensor concatenated along dim 0, rank-major (rank 0's rows first). The
    /// ranks' tensors agree in dtype and in every dim but the first.
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor>;

    /// Rank 0's value of each tensor, on every rank.
    fn broadcast(&self, tensors: &mut [Tensor]) -> Result<()>;

    /// Every rank's bytes, rank-major.
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;

    /// [`Collective::all_reduce`] with [`Reduce::Mean`] (the gradients).
    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<()> {
        self.all_reduce(tensors, Reduce::Mean)
    }

    /// Every rank's `u64`, rank-major (small agreements: a stop request, a decision of
    /// rank 0's).
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        self.all_gather_bytes(&value.to_le_bytes())?
            .iter()
            .enumerate()
            .map(|(rank, b)| {
                b.as_slice()
                    .try_into()
                    .map(u64::from_le_bytes)
                    .map_err(|_| {
                        DistError::OutOfStep(format!(
                            "rank {rank} sent {} bytes for a u64",
                            b.len()
                        ))
                    })
            })
            .collect()
    }
}

/// The dims of a tensor to gather along dim 0 (a 0-d tensor has none).
pub(crate) fn gather_dims(tensor: &Tensor) -> Result<Vec<usize>> {
    let dims = tensor.dims().to_vec();
    if dims.is_empty() {
        return Err(DistError::Unsupported {
            op: "all-gather",
            reason: "a 0-d tensor (gather along dim 0 needs one)".into(),
        });
    }
    Ok(dims)
}

/// One process: every exchange is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce(&self, _tensors: &mut [Tensor], _op: Reduce) -> Result<()> {
        Ok(())
    }

    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        Ok(tensor.clone())
    }

    fn broadcast(&self, _tensors: &mut [Tensor]) -> Result<()> {
        Ok(())
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![bytes.to_vec()])
    }
}

/// How long a rendezvous waits for every rank: `VLP_RENDEZVOUS_TIMEOUT` seconds, default
/// 300.
pub fn rendezvous_timeout() -> Duration {
    secs_from_env("VLP_RENDEZVOUS_TIMEOUT", 300)
}

/// How long one exchange waits for a peer before calling it lost:
/// `VLP_COLLECTIVE_TIMEOUT` seconds, default 1800 (NCCL's and gloo's 30 minutes; rank 0
/// may be evaluating while the others wait).
pub fn collective_timeout() -> Duration {
    secs_from_env("VLP_COLLECTIVE_TIMEOUT", 1800)
}

fn secs_from_env(var: &str, default: u64) -> Duration {
    let Ok(value) = std::env::var(var) else {
        return Duration::from_secs(default);
    };
    match value.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Duration::from_secs_f64(s),
        _ => {
            tracing::warn!("{var}=`{value}` is not a number of seconds > 0: using {default}");
            Duration::from_secs(default)
        }
    }
}

/// The collective of this process in `world`, computing on `device`: one process ->
/// [`SingleProcess`]; GPUs with the `nccl` feature -> NCCL (its id exchanged over the
/// TCP rendezvous); otherwise the TCP backend (tensors on a GPU then travel through host
/// memory, with a warning). The one place a backend is chosen.
///
/// `VLP_DIST_BACKEND` = `tcp` or `nccl` forces a backend, even for one process (checks of
/// the backend itself); `auto` or unset chooses as above.
pub fn open(world: &World, device: &Device) -> Result<Box<dyn Collective>> {
    let forced = std::env::var("VLP_DIST_BACKEND").unwrap_or_default();
    let forced = match forced.trim() {
        "" | "auto" => None,
        b @ ("tcp" | "nccl") => Some(b.to_string()),
        other => {
            return Err(DistError::env(
                "VLP_DIST_BACKEND",
                format!("`{other}`: expected auto, tcp or nccl"),
            ))
        }
    };
    if !world.is_distributed() && forced.is_none() {
        return Ok(Box::new(SingleProcess));
    }
    let tcp = tcp::TcpCollective::connect(world, rendezvous_timeout(), collective_timeout())?;
    if forced.as_deref() == Some("nccl") && !device.is_cuda() {
        return Err(DistError::env(
            "VLP_DIST_BACKEND",
            "nccl needs a GPU device (--device cuda)",
        ));
    }
    if device.is_cuda() && forced.as_deref() != Some("tcp") {
        #[cfg(feature = "nccl")]
        {
            return Ok(Box::new(nccl::NcclCollective::new(tcp, device)?));
        }
        #[cfg(not(feature = "nccl"))]
        if forced.is_some() {
            return Err(DistError::env(
                "VLP_DIST_BACKEND",
                "nccl: this vlp was built without NCCL (`--features cuda,nccl`)",
            ));
        }
        #[cfg(not(feature = "nccl"))]
        tracing::warn!(
            "this vlp was built without NCCL: GPU tensors are exchanged through host memory \
             over TCP (slow); build with `--features cuda,nccl`"
        );
    }
    Ok(Box::new(tcp))
}
