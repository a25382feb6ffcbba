//! Dropout as one CPU pass forward and one backward, the mask recomputed from its seed
//! instead of stored ([`DropoutMask`]; `nn::dropout` draws the seeds).

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::affine::Float;
use super::contiguous;

/// The randomness of one dropout call: element `i` is kept, and scaled by `1 / (1 - p)`,
/// when a 32-bit hash of `i` keyed by the call's seed is at least `p * 2^32`. Any
/// element's decision is computed on its own, in any order and on any thread, with
/// 32-bit integer arithmetic that vectorises.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropoutMask {
    key: [u32; 2],
    threshold: u64,
    scale: f32,
}

/// A 32-bit integer hash with good avalanche (the "lowbias32" constants).
#[inline(always)]
fn hash32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

impl DropoutMask {
    /// The mask of drop probability `p` keyed by `seed`.
    pub(crate) fn new(seed: u64, p: f64) -> Self {
        Self {
            key: [seed as u32, (seed >> 32) as u32],
            threshold: (p.clamp(0.0, 1.0) * 4_294_967_296.0).ceil() as u64,
            scale: (1.0 / (1.0 - p)) as f32,
        }
    }

    /// The multiplier of element `i`: `0` or `1 / (1 - p)`.
    #[inline(always)]
    pub(crate) fn keep(&self, i: usize) -> f32 {
        let h = hash32(hash32(i as u32 ^ self.key[0]).wrapping_add(self.key[1]));
        if u64::from(h) >= self.threshold {
            self.scale
        } else {
            0.0
        }
    }

    /// The key, threshold and scale, as the CUDA kernels take them.
    #[cfg(feature = "cuda")]
    pub(crate) fn parts(&self) -> (u32, u32, u64, f32) {
        (self.key[0], self.key[1], self.threshold, self.scale)
    }

    /// The multipliers of elements `0..n`.
    pub(crate) fn values(&self, n: usize) -> Vec<f32> {
        (0..n).map(|i| self.keep(i)).collect()
    }
}

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

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::dropout(s, l, &self.0, self.name())
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Dropout(self.0))?))
    }
}
