//! The seam between the training loop and the processes it runs in: who this process is
//! among them and the four exchanges data-parallel ALBEF needs (PyTorch DDP's and
//! ALBEF's `concat_all_gather`). The loop calls them at fixed points — gradients are
//! averaged once per step before clipping, the momentum features and image ids are
//! gathered before they enter the queues, rank 0's weights are broadcast at the start,
//! every rank's loader state is gathered into the checkpoint — so a multi-process backend
//! only has to implement this trait.

use candle_core::Tensor;

use crate::error::Result;

/// The processes of one training run and their exchanges. Every method is called by every
/// rank at the same point of the run, in the same order (a collective call).
pub trait Collective {
    /// This process's index, `0..world_size`.
    fn rank(&self) -> usize;

    /// How many processes train together.
    fn world_size(&self) -> usize;

    /// Whether this process logs, saves checkpoints and evaluates (rank 0).
    fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// Replaces each tensor by its elementwise mean over the ranks (the gradients).
    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<()>;

    /// Every rank's `[n, ...]` tensor concatenated along dim 0, rank-major (rank 0's rows
    /// first): the momentum features and image ids before they enter the queues.
    fn all_gather(&self, tensor: &Tensor) -> Result<Tensor>;

    /// Rank 0's values of each tensor, on every rank (the weights, momentum weights and
    /// queues at the start of a run).
    fn broadcast(&self, tensors: &mut [Tensor]) -> Result<()>;

    /// Every rank's bytes, rank-major (each rank's loader state for the checkpoint).
    fn all_gather_bytes(&self, bytes: &[u8]) -> Result<Vec<Vec<u8>>>;
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

    fn all_reduce_mean(&self, _tensors: &mut [Tensor]) -> Result<()> {
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
