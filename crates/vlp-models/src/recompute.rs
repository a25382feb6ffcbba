//! Activation checkpointing (`model.grad_checkpoint`): a block's forward keeps only its
//! inputs and output; its backward runs the block again on the saved inputs, with the
//! same dropout masks, and backpropagates through that recomputation. Memory for the
//! activations inside each block is traded for one extra forward per block — what lets
//! ALBEF train large batches on small cards.
//!
//! candle's backward lets an op return gradients for its inputs only, so the block's
//! parameter gradients found during the recomputation are set aside on this thread and
//! added to the others by [`backward`], which takes the place of `loss.backward()`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, TensorId, Var};
use vlp_core::rng::Rng;

use crate::nn;

/// A block as a function of its input and, for cross-attention layers, the image tokens.
pub type BlockFn = Arc<dyn Fn(&Tensor, Option<&Tensor>) -> Result<Tensor> + Send + Sync>;

thread_local! {
    /// Parameter gradients found by recomputations, waiting for [`backward`] to collect
    /// them.
    /// One running sum per parameter (a fusion layer recomputed for several passes
    /// adds into the same tensor).
    static DEFERRED: RefCell<HashMap<TensorId, Tensor>> = RefCell::new(HashMap::new());
}

/// `loss.backward()` for models that may checkpoint: the gradients of every variable,
/// including the parameters of checkpointed blocks (which their recomputations set
/// aside on this thread). Every backward over a model's loss goes through here.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    DEFERRED.with(|d| d.borrow_mut().clear());
    let result = loss.backward();
    let deferred = DEFERRED.with(|d| std::mem::take(&mut *d.borrow_mut()));
    let mut store = result?;
    for (id, g) in deferred {
        let sum = match store.get_id(id) {
            Some(have) => (have + &g)?,
            None => g,
        };
        store.insert_id(id, sum);
    }
    Ok(store)
}

/// `f(x, ctx)` with its inner activations recomputed in the backward instead of kept.
/// For training passes only: inference and the momentum twin call `f` directly.
pub fn checkpoint(f: BlockFn, x: &Tensor, ctx: Option<&Tensor>) -> Result<Tensor> {
    let dropout = nn::dropout_state();
    // The forward, its graph dropped at once: only the output is kept.
    let y = f(&x.detach(), ctx.map(|c| c.detach()).as_ref())?.detach();
    // After the call the generator has advanced exactly as without checkpointing.
    let y = y.contiguous()?;
    let y = if y.layout().start_offset() == 0 {
        y
    } else {
        y.copy()?
    };
    let op = Recompute {
        f,
        dropout,
        output: y,
    };
    match ctx {
        None => x.apply_op1(op),
        Some(c) => x.apply_op2(c, op),
    }
}

struct Recompute {
    f: BlockFn,
    /// The dropout generator as the forward found it.
    dropout: Option<Rng>,
    /// The forward's output, handed out as the op's result.
    output: Tensor,
}

impl Recompute {
    fn output_cpu(&self) -> Result<(CpuStorage, Shape)> {
        let (s, l) = self.output.storage_and_layout();
        match &*s {
            candle_core::Storage::Cpu(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("vlp-recompute: the output is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn output_cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let (s, l) = self.output.storage_and_layout();
        match &*s {
            candle_core::Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("vlp-recompute: the output is not on CUDA"),
        }
    }

    /// Runs the block again on the saved inputs and backpropagates `grad` through it:
    /// the inputs' gradients are returned, the parameters' set aside.
    fn backward(
        &self,
        x: &Tensor,
        ctx: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let xv = Var::from_tensor(&x.detach())?;
        let cv = ctx.map(|c| Var::from_tensor(&c.detach())).transpose()?;
        let y = {
            let _replay = nn::replay_dropout(self.dropout.clone());
            (self.f)(xv.as_tensor(), cv.as_ref().map(|c| c.as_tensor()))?
        };
        let mut store = (y * grad.detach())?.sum_all()?.backward()?;
        // Gradients computed by candle's backward still reference the activations they
        // were computed from; detached, the recomputation's graph is freed right here.
        let dx = store
            .remove(xv.as_tensor())
            .map_or_else(|| x.zeros_like(), |g| Ok(g.detach()))?;
        let dctx = match (&cv, ctx) {
            (Some(cv), Some(c)) => Some(
                store
                    .remove(cv.as_tensor())
                    .map_or_else(|| c.zeros_like(), |g| Ok(g.detach()))?,
            ),
            _ => None,
        };
        let ids: Vec<_> = store.get_ids().copied().collect();
        DEFERRED.with(|d| -> Result<()> {
            let mut d = d.borrow_mut();
            for id in ids {
                let Some(g) = store.get_id(id) else { continue };
                let sum = match d.remove(&id) {
                    Some(have) => (have + g)?.detach(),
                    None => g.detach(),
                };
                d.insert(id, sum);
            }
            Ok(())
        })?;
        Ok((dx, dctx))
    }
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "vlp-recompute"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.output_cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output_cuda()
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.backward(x, None, grad)?.0))
    }
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "vlp-recompute"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.output_cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.output_cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        ctx: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dctx) = self.backward(x, Some(ctx), grad)?;
        Ok((Some(dx), dctx))
    }
}
