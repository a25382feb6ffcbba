//! Dropout as one CPU pass forward and one backward, the mask recomputed from its seed
//! instead of stored (see `nn::DropoutMask`).

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::affine::Float;
use super::contiguous;
use crate::nn::DropoutMask;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `x * keep(i)`; its gradient is the same op applied to the upstream gradient.
pub(crate) struct Dropout(pub(crate) DropoutMask);

super::with_avx2! {
    /// `o = x * keep(start + j)` over one chunk.
    fn apply_chunk<T: Float>(x: &[T], o: &mut [T], mask: &DropoutMask, start: usize) {
        for (j, (o, &x)) in o.iter_mut().zip(x).enumerate() {
            *o = x * <T as super::Real>::from_f64(f64::from(mask.keep(start + j)));
        }
    }
}

fn apply<T: Float>(x: &[T], mask: &DropoutMask) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .enumerate()
        .for_each(|(c, (o, x))| apply_chunk(x, o, mask, c * CHUNK));
    out
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "vlp-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(apply(contiguous(x, l, op)?, &self.0)),
            CpuStorage::F64(x) => CpuStorage::F64(apply(contiguous(x, l, op)?, &self.0)),
            _ => bail!("{op}: f32 or f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Dropout(self.0))?))
    }
}
