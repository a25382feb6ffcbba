//! A gather that gradients flow back through (BLIP's `all_gather_with_grad`): the forward
//! concatenates every rank's tensor rank-major; the backward sums the gradient of the
//! whole over the ranks and hands each rank the slice of its own rows, so a loss on one
//! rank that uses another rank's rows trains that rank's encoder. Every rank must take the
//! gather and its backward at the same points (they are collective calls).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use crate::error::Result;
use crate::{Collective, Reduce};

struct GatherWithGrad {
    ranks: Arc<dyn Collective>,
}

fn err(e: crate::DistError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl GatherWithGrad {
    /// The gathered tensor of the input tensor around `storage`.
    fn gather(&self, storage: Storage, layout: &Layout) -> candle_core::Result<(Storage, Shape)> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("gather-with-grad: a contiguous input from its storage's start");
        }
        let rows = layout.dims().first().copied().unwrap_or(0);
        let input =
            Tensor::from_storage(storage, layout.shape().clone(), BackpropOp::none(), false);
        let out = self.ranks.all_gather(&input).map_err(err)?;
        if out.dim(0)? != rows * self.ranks.world_size() {
            candle_core::bail!("gather-with-grad: the ranks' row counts differ");
        }
        let out = out.contiguous()?;
        let (s, l) = out.storage_and_layout();
        let copy = match &*s {
            Storage::Cpu(c) => Storage::Cpu(c.try_clone(l)?),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => Storage::Cuda(c.try_clone(l)?),
            #[allow(unreachable_patterns)]
            _ => candle_core::bail!("gather-with-grad: unsupported device"),
        };
        Ok((copy, out.shape().clone()))
    }
}

impl CustomOp1 for GatherWithGrad {
    fn name(&self) -> &'static str {
        "all-gather-with-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.gather(Storage::Cpu(s.try_clone(l)?), l)? {
            (Storage::Cpu(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("gather-with-grad: the result left the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match self.gather(Storage::Cuda(s.try_clone(l)?), l)? {
            (Storage::Cuda(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("gather-with-grad: the result left the GPU"),
        }
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut g = [grad.contiguous()?];
        self.ranks.all_reduce(&mut g, Reduce::Sum).map_err(err)?;
        let rows = arg.dim(0)?;
        let [g] = g;
        Ok(Some(g.narrow(0, self.ranks.rank() * rows, rows)?))
    }
}

/// Every rank's `[n, ...]` tensor concatenated rank-major, with the gradient of the
/// gathered rows flowing back to the rank that owns them (summed over the ranks that used
/// them). The ranks' tensors agree in shape. One process: `tensor` itself.
pub fn all_gather_with_grad(ranks: &Arc<dyn Collective>, tensor: &Tensor) -> Result<Tensor> {
    if ranks.world_size() == 1 {
        return Ok(tensor.clone());
    }
    // A fresh contiguous copy (its backward reaches `tensor`) is what the op reads.
    let input = tensor.copy()?;
    Ok(input.apply_op1_arc(Arc::new(Box::new(GatherWithGrad {
        ranks: ranks.clone(),
    })))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::TcpCollective;
    use crate::World;
    use candle_core::{Device, Var};
    use std::time::Duration;

    /// loss_r = sum(w_r * gather(x_r)): the gradient of the sum of the ranks' losses with
    /// respect to x_r is the sum over ranks s of w_s's rows of rank r.
    #[test]
    fn gradients_of_gathered_rows_reach_their_owner() {
        let port = 45000 + (std::process::id() % 1000) as u16 * 2;
        let n = 3usize;
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                std::thread::spawn(move || {
                    let world = World::on_localhost(rank, n, port);
                    let c: Arc<dyn Collective> = Arc::new(
                        TcpCollective::connect(
                            &world,
                            Duration::from_secs(20),
                            Duration::from_secs(20),
                        )
                        .unwrap(),
                    );
                    let dev = Device::Cpu;
                    let x = Var::new(&[[rank as f32, 1.0], [2.0, rank as f32]], &dev).unwrap();
                    // w_r: rows 2n x 2, values depending on the rank.
                    let w: Vec<f32> = (0..2 * n * 2)
                        .map(|k| (k as f32 + 1.0) * (rank as f32 + 1.0))
                        .collect();
                    let w = Tensor::from_vec(w, (2 * n, 2), &dev).unwrap();
                    let y = all_gather_with_grad(&c, x.as_tensor()).unwrap();
                    assert_eq!(y.dims(), &[2 * n, 2]);
                    let grads = (y * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    grads.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap()
                })
            })
            .collect();
        let sum_over_ranks: f32 = (1..=n).map(|r| r as f32).sum();
        for (rank, h) in handles.into_iter().enumerate() {
            let g = h.join().unwrap();
            // Rows 2*rank, 2*rank + 1 of w (k + 1 for element k), times the sum of the
            // ranks' factors.
            let want: Vec<Vec<f32>> = (0..2)
                .map(|i| {
                    (0..2)
                        .map(|j| (((2 * rank + i) * 2 + j) as f32 + 1.0) * sum_over_ranks)
                        .collect()
                })
                .collect();
            assert_eq!(g, want, "rank {rank}");
        }
    }
}
