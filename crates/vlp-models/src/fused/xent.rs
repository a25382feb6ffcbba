//! Cross-entropy against soft targets, per row, as one op: `loss_r = sum_j t_j (lse_r -
//! x_j)` from the logits `x` and the targets `t` (ITC against the queue with momentum
//! distillation, MLM distillation over the vocabulary). The forward reads both once and
//! writes one value per row — no log-softmax copy of the logits; the backward writes the
//! logits' gradient `g_r (softmax(x)_j sum(t) - t_j)` in one more pass, recomputing the
//! row's log-sum-exp. The targets get a gradient only when they need one (generic ops).

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, last_dim, row_max, Real};

/// `(lse, sum(t), sum(t * x))` of one row.
fn row_stats<T: Real>(x: &[T], t: &[T]) -> (T, T, T) {
    let max = row_max(x);
    let (mut s, mut st, mut stx) = (T::ZERO, T::ZERO, T::ZERO);
    for (&x, &t) in x.iter().zip(t) {
        s += (x - max).exp();
        st += t;
        stx += t * x;
    }
    (max + s.ln(), st, stx)
}

fn forward<T: Real>(x: &[T], t: &[T], n: usize) -> Vec<T> {
    x.par_chunks(n)
        .zip(t.par_chunks(n))
        .map(|(x, t)| {
            let (lse, st, stx) = row_stats(x, t);
            lse * st - stx
        })
        .collect()
}

fn backward<T: Real>(x: &[T], t: &[T], g: &[T], n: usize) -> Vec<T> {
    let mut dx = vec![T::ZERO; x.len()];
    dx.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(t.par_chunks(n)).zip(g.par_iter()))
        .for_each(|(dx, ((x, t), &g))| {
            let (lse, st, _) = row_stats(x, t);
            for ((d, &x), &t) in dx.iter_mut().zip(x).zip(t) {
                *d = g * ((x - lse).exp() * st - t);
            }
        });
    dx
}

/// The per-row loss of logits and soft targets of one shape `[.., C]` -> `[..]`.
pub(crate) struct SoftCrossEntropy;

/// The logits' gradient from `(x, t, g)`.
struct SoftCrossEntropyBwd;

fn rows_shape(l: &Layout) -> Shape {
    let d = l.dims();
    Shape::from(d[..d.len() - 1].to_vec())
}

impl CustomOp2 for SoftCrossEntropy {
    fn name(&self) -> &'static str {
        "vlp-soft-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        if l1.shape() != l2.shape() {
            bail!(
                "{op}: logits {:?} and targets {:?} differ",
                l1.shape(),
                l2.shape()
            );
        }
        let n = last_dim(l1, op)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(t)) => {
                CpuStorage::F32(forward(contiguous(x, l1, op)?, contiguous(t, l2, op)?, n))
            }
            (CpuStorage::F64(x), CpuStorage::F64(t)) => {
                CpuStorage::F64(forward(contiguous(x, l1, op)?, contiguous(t, l2, op)?, n))
            }
            _ => bail!("{op}: logits and targets must be both f32 or both f64"),
        };
        Ok((out, rows_shape(l1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!("{}: logits and targets differ in shape", self.name());
        }
        let (s, _) = super::cuda::soft_xent_fwd(s1, l1, s2, l2, self.name())?;
        Ok((s, rows_shape(l1)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let dx = x.apply_op3_no_bwd(t, &g, &SoftCrossEntropyBwd)?;
        // Targets rarely need a gradient (ITC's and MLM's come from the momentum twin):
        // when they do, `-log_softmax(x) * g`.
        let dt = if t.track_op() {
            let rows = g.unsqueeze(candle_core::D::Minus1)?;
            Some(crate::nn::log_softmax(x)?.neg()?.broadcast_mul(&rows)?)
        } else {
            None
        };
        Ok((Some(dx), dt))
    }
}

impl CustomOp3 for SoftCrossEntropyBwd {
    fn name(&self) -> &'static str {
        "vlp-soft-cross-entropy-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let n = last_dim(l1, op)?;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(t), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward(
                    contiguous(x, l1, op)?,
                    contiguous(t, l2, op)?,
                    contiguous(g, l3, op)?,
                    n,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(t), CpuStorage::F64(g)) => {
                CpuStorage::F64(backward(
                    contiguous(x, l1, op)?,
                    contiguous(t, l2, op)?,
                    contiguous(g, l3, op)?,
                    n,
                ))
            }
            _ => bail!("{op}: all f32 or all f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::soft_xent_bwd(s1, l1, s2, l2, s3, l3, self.name())
    }
}
