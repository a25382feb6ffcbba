//! Fused multi-head attention on the CPU, forward and backward, for f32 and f64.
//!
//! Inputs are the projections as the linears produce them, `[B, L, heads * d]` (any row
//! strides, so views into a fused qkv projection need no copy), and the output is
//! `[B, Lq, heads * d]` with the heads already merged. Per batch row and head:
//! `S = scale * Q K^T + mask`, `P = softmax(S)`, `P' = P * keep` (dropout), `O = P' V`.
//! The attention matrix is never kept between the passes: the backward recomputes `S`
//! and `P` from `Q`, `K`, the mask and the dropout mask (which the op holds), then
//! `dV = P'^T dO`, `dP = (dO V^T) * keep`, `dS = P * (dP - rowsum(dP * P))`,
//! `dQ = scale * dS K`, `dK = scale * dS^T Q`. Batch rows run in parallel; the small
//! matrix products go through `gemm` on one thread each.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage,
    Tensor,
};
use rayon::prelude::*;

use super::affine::Float;
use super::dropout::DropoutMask;

/// The attention of one layer, with the pieces that are not differentiated: the
/// additive key mask (`[B or 1, Lk]`) and the dropout mask of the probabilities (over
/// their `[B, heads, Lq, Lk]` positions).
pub(crate) struct FusedAttention {
    pub(crate) heads: usize,
    pub(crate) scale: f64,
    pub(crate) mask: Option<Vec<f64>>,
    pub(crate) dropout: Option<DropoutMask>,
    /// Keep the forward's probabilities (before dropout) for the backward instead of
    /// recomputing them: for training passes whose `[B, heads, Lq, Lk]` is small.
    pub(crate) keep_probs: bool,
    pub(crate) saved_probs: std::sync::Mutex<Option<CpuStorage>>,
    /// On CUDA the mask stays on the device: f32, `[B or 1, Lk]` values, contiguous.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) device_mask: Option<Tensor>,
    /// The log-sum-exp of a CUDA forward, for its backward.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) stash: super::Stash,
}

/// Attention probabilities up to this many bytes are kept for the backward.
pub(crate) const KEEP_PROBS_BYTES: usize = 64 << 20;

/// Where one `[B, L, C]` input lives in its storage: the last dimension is contiguous.
#[derive(Clone, Copy)]
struct View {
    offset: usize,
    batch_stride: usize,
    row_stride: usize,
    len: usize,
}

impl View {
    fn new(l: &Layout, op: &str) -> Result<(Self, [usize; 3])> {
        let dims = l.dims();
        let stride = l.stride();
        if dims.len() != 3 || stride[2] != 1 {
            bail!("{op}: inputs must be [B, L, C] with a contiguous last dimension, got {dims:?} / {stride:?}");
        }
        let (b, rows, c) = (dims[0], dims[1], dims[2]);
        let len = if b * rows * c == 0 {
            0
        } else {
            (b - 1) * stride[0] + (rows - 1) * stride[1] + c
        };
        Ok((
            Self {
                offset: l.start_offset(),
                batch_stride: stride[0],
                row_stride: stride[1],
                len,
            },
            [b, rows, c],
        ))
    }

    /// The part of `data` from batch row `b` on.
    fn batch<'a, T>(&self, data: &'a [T], b: usize) -> &'a [T] {
        &data[self.offset + b * self.batch_stride..self.offset + self.len]
    }
}

/// One head's product on this thread (the batch rows already run in parallel).
#[allow(clippy::too_many_arguments)]
fn mm<T: Float>(
    mnk: (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[T],
    lhs_strides: (usize, usize),
    rhs: &[T],
    rhs_strides: (usize, usize),
    beta: T,
) {
    super::gemm::gemm_into(
        mnk,
        dst,
        dst_rs,
        accumulate,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        beta,
        1,
    )
}

super::with_avx2! {
    /// Row-wise `softmax(s + mask)` in place over `lk`-wide rows.
    fn softmax_rows<T: Float>(p: &mut [T], lk: usize, mask: Option<&[f64]>) {
        for row in p.chunks_exact_mut(lk) {
            if let Some(mask) = mask {
                for (s, &m) in row.iter_mut().zip(mask) {
                    *s += <T as super::Real>::from_f64(m);
                }
            }
            let mut max = [T::NEG_INF; 8];
            for c in row.chunks(8) {
                for (m, &v) in max.iter_mut().zip(c) {
                    if v > *m {
                        *m = v;
                    }
                }
            }
            let max = super::row_max(&max);
            let mut sum = [T::ZERO; 8];
            for c in row.chunks_mut(8) {
                for (s, v) in sum.iter_mut().zip(c.iter_mut()) {
                    *v = (*v - max).exp();
                    *s += *v;
                }
            }
            let sum = ((sum[0] + sum[4]) + (sum[1] + sum[5])) + ((sum[2] + sum[6]) + (sum[3] + sum[7]));
            let inv = T::ONE / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

/// Shapes shared by the passes.
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    d: usize,
    lq: usize,
    lk: usize,
    c: usize,
}

impl FusedAttention {
    fn dims(&self, q: [usize; 3], k: [usize; 3], v: [usize; 3], op: &str) -> Result<Dims> {
        let [b, lq, c] = q;
        if k[0] != b || v[0] != b || k[2] != c || v[2] != c || k[1] != v[1] {
            bail!("{op}: q {q:?}, k {k:?}, v {v:?} do not fit together");
        }
        if self.heads == 0 || c % self.heads != 0 {
            bail!("{op}: {c} channels do not split into {} heads", self.heads);
        }
        let lk = k[1];
        if let Some(m) = &self.mask {
            if m.len() != b * lk && m.len() != lk {
                bail!("{op}: mask of {} values for batch {b} x {lk} keys", m.len());
            }
        }
        Ok(Dims {
            heads: self.heads,
            d: c / self.heads,
            lq,
            lk,
            c,
        })
    }

    /// `P` (before dropout) of batch row `b`, head `h`, into `p` (`lq x lk`).
    #[allow(clippy::too_many_arguments)]
    fn probs<T: Float>(
        &self,
        dm: Dims,
        b: usize,
        h: usize,
        q: &[T],
        qv: View,
        k: &[T],
        kv: View,
        p: &mut [T],
    ) {
        let Dims { d, lq, lk, .. } = dm;
        mm(
            (lq, lk, d),
            p,
            lk,
            false,
            &qv.batch(q, b)[h * d..],
            (qv.row_stride, 1),
            &kv.batch(k, b)[h * d..],
            (1, kv.row_stride),
            <T as super::Real>::from_f64(self.scale),
        );
        let mask = self.mask.as_ref().map(|m| {
            let start = if m.len() == lk { 0 } else { b * lk };
            &m[start..start + lk]
        });
        softmax_rows(p, lk, mask);
    }

    /// Multiplies the `lq x lk` block of batch row `b`, head `h` by its dropout mask.
    fn apply_dropout<T: Float>(&self, dm: Dims, b: usize, h: usize, block: &mut [T]) {
        if let Some(mask) = &self.dropout {
            let start = (b * dm.heads + h) * dm.lq * dm.lk;
            for (j, v) in block.iter_mut().enumerate() {
                *v *= <T as super::Real>::from_f64(f64::from(mask.keep(start + j)));
            }
        }
    }

    fn forward<T: Float>(
        &self,
        dm: Dims,
        q: (&[T], View),
        k: (&[T], View),
        v: (&[T], View),
        batch: usize,
    ) -> Vec<T> {
        let Dims {
            heads,
            d,
            lq,
            lk,
            c,
        } = dm;
        let mut out = vec![T::ZERO; batch * lq * c];
        if lq * c == 0 {
            return out;
        }
        let per_b = heads * lq * lk;
        let mut kept = vec![T::ZERO; if self.keep_probs { batch * per_b } else { 0 }];
        let kept_chunks: Vec<&mut [T]> = if self.keep_probs && per_b > 0 {
            kept.chunks_mut(per_b).collect()
        } else {
            (0..batch).map(|_| <&mut [T]>::default()).collect()
        };
        out.par_chunks_mut(lq * c)
            .zip(kept_chunks)
            .enumerate()
            .for_each(|(b, (out, kept))| {
                let mut p = vec![T::ZERO; lq * lk];
                for h in 0..heads {
                    if lk > 0 {
                        self.probs(dm, b, h, q.0, q.1, k.0, k.1, &mut p);
                    }
                    if !kept.is_empty() {
                        kept[h * lq * lk..(h + 1) * lq * lk].copy_from_slice(&p);
                    }
                    self.apply_dropout(dm, b, h, &mut p);
                    mm(
                        (lq, d, lk),
                        &mut out[h * d..],
                        c,
                        false,
                        &p,
                        (lk, 1),
                        &v.1.batch(v.0, b)[h * d..],
                        (v.1.row_stride, 1),
                        T::ONE,
                    );
                }
            });
        if self.keep_probs {
            if let Ok(mut saved) = self.saved_probs.lock() {
                *saved = Some(T::to_cpu_storage_owned(kept));
            }
        }
        out
    }

    #[allow(clippy::type_complexity)]
    fn backward<T: Float>(
        &self,
        dm: Dims,
        q: (&[T], View),
        k: (&[T], View),
        v: (&[T], View),
        g: &[T],
        batch: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let Dims {
            heads,
            d,
            lq,
            lk,
            c,
        } = dm;
        let mut dq = vec![T::ZERO; batch * lq * c];
        let mut dk = vec![T::ZERO; batch * lk * c];
        let mut dv = vec![T::ZERO; batch * lk * c];
        if lq * lk * c == 0 {
            return (dq, dk, dv);
        }
        let scale = <T as super::Real>::from_f64(self.scale);
        let saved = self.saved_probs.lock().ok().and_then(|mut s| s.take());
        let saved: Option<&[T]> = saved
            .as_ref()
            .and_then(|s| T::cpu_storage_as_slice(s).ok())
            .filter(|s| s.len() == batch * heads * lq * lk);
        dq.par_chunks_mut(lq * c)
            .zip(dk.par_chunks_mut(lk * c).zip(dv.par_chunks_mut(lk * c)))
            .enumerate()
            .for_each(|(b, (dq, (dk, dv)))| {
                let mut p = vec![T::ZERO; lq * lk];
                let mut pd = vec![T::ZERO; lq * lk];
                let mut dp = vec![T::ZERO; lq * lk];
                let g = &g[b * lq * c..];
                for h in 0..heads {
                    match saved {
                        Some(all) => {
                            let start = (b * heads + h) * lq * lk;
                            p.copy_from_slice(&all[start..start + lq * lk]);
                        }
                        None => self.probs(dm, b, h, q.0, q.1, k.0, k.1, &mut p),
                    }
                    let dropped: &[T] = if self.dropout.is_some() {
                        pd.copy_from_slice(&p);
                        self.apply_dropout(dm, b, h, &mut pd);
                        &pd
                    } else {
                        &p
                    };
                    // dV = P'^T dO
                    mm(
                        (lk, d, lq),
                        &mut dv[h * d..],
                        c,
                        false,
                        dropped,
                        (1, lk),
                        &g[h * d..],
                        (c, 1),
                        T::ONE,
                    );
                    // dP' = dO V^T, then dP = dP' * keep
                    mm(
                        (lq, lk, d),
                        &mut dp,
                        lk,
                        false,
                        &g[h * d..],
                        (c, 1),
                        &v.1.batch(v.0, b)[h * d..],
                        (1, v.1.row_stride),
                        T::ONE,
                    );
                    self.apply_dropout(dm, b, h, &mut dp);
                    // dS = P * (dP - rowsum(dP * P)), in place in dp
                    for (dp, p) in dp.chunks_exact_mut(lk).zip(p.chunks_exact(lk)) {
                        let s = dp.iter().zip(p).fold(T::ZERO, |s, (&a, &b)| s + a * b);
                        for (dp, &p) in dp.iter_mut().zip(p) {
                            *dp = p * (*dp - s);
                        }
                    }
                    // dQ = scale * dS K
                    mm(
                        (lq, d, lk),
                        &mut dq[h * d..],
                        c,
                        false,
                        &dp,
                        (lk, 1),
                        &k.1.batch(k.0, b)[h * d..],
                        (k.1.row_stride, 1),
                        scale,
                    );
                    // dK = scale * dS^T Q
                    mm(
                        (lk, d, lq),
                        &mut dk[h * d..],
                        c,
                        false,
                        &dp,
                        (1, lk),
                        &q.1.batch(q.0, b)[h * d..],
                        (q.1.row_stride, 1),
                        scale,
                    );
                }
            });
        (dq, dk, dv)
    }
}

fn cpu_slice<'a, T: Float>(s: &'a CpuStorage, op: &str) -> Result<&'a [T]> {
    match T::cpu_storage_as_slice(s) {
        Ok(v) => Ok(v),
        Err(_) => bail!("{op}: q, k and v must share one float dtype"),
    }
}

impl FusedAttention {
    /// The forward on `[q, k, v]`, each a storage with its view and `[B, L, C]` dims.
    fn run_fwd(
        &self,
        parts: [(&CpuStorage, View, [usize; 3]); 3],
        op: &str,
    ) -> Result<(CpuStorage, Shape)> {
        let [(sq, qv, qd), (sk, kv, kd), (sv, vv, vd)] = parts;
        let dm = self.dims(qd, kd, vd, op)?;
        let shape = Shape::from(qd.to_vec());
        let out = match sq {
            CpuStorage::F32(q) => CpuStorage::F32(self.forward(
                dm,
                (q, qv),
                (cpu_slice(sk, op)?, kv),
                (cpu_slice(sv, op)?, vv),
                qd[0],
            )),
            CpuStorage::F64(q) => CpuStorage::F64(self.forward(
                dm,
                (q, qv),
                (cpu_slice(sk, op)?, kv),
                (cpu_slice(sv, op)?, vv),
                qd[0],
            )),
            other => bail!(
                "{op}: unsupported dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((out, shape))
    }

    /// The gradients of `[q, k, v]` as contiguous `[B, L, C]` tensors on `like`'s device.
    fn run_bwd(
        &self,
        parts: [(&Storage, View, [usize; 3]); 3],
        grad: &Tensor,
        like: &Tensor,
        op: &str,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let [(sq, qv, qd), (sk, kv, kd), (sv, vv, vd)] = parts;
        let dm = self.dims(qd, kd, vd, op)?;
        let g = grad.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs), Storage::Cpu(gs)) =
            (sq, sk, sv, &*gs)
        else {
            bail!("{op}: CPU tensors only");
        };
        let g_off = gl.start_offset();
        let dev = like.device();
        macro_rules! run {
            ($t:ty) => {{
                let (dq, dk, dv) = self.backward::<$t>(
                    dm,
                    (cpu_slice(qs, op)?, qv),
                    (cpu_slice(ks, op)?, kv),
                    (cpu_slice(vs, op)?, vv),
                    &cpu_slice::<$t>(gs, op)?[g_off..],
                    qd[0],
                );
                (
                    Tensor::from_vec(dq, qd.to_vec(), dev)?,
                    Tensor::from_vec(dk, kd.to_vec(), dev)?,
                    Tensor::from_vec(dv, vd.to_vec(), dev)?,
                )
            }};
        }
        Ok(match like.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        })
    }
}

#[cfg(feature = "cuda")]
mod on_cuda {
    //! The CUDA forward and backward of the three attention ops (`fused/cuda.rs` holds
    //! the launches): the same views, the same packing of gradients.
    use super::*;
    use crate::fused::cuda::{self, AttnDims, GradOut, Operand};
    use candle_core::CudaStorage;

    fn operand(s: &CudaStorage, v: View) -> Operand<'_> {
        Operand {
            storage: s,
            offset: v.offset,
            batch_stride: v.batch_stride,
            row_stride: v.row_stride,
        }
    }

    impl FusedAttention {
        /// The shapes, checked as the CPU op checks them.
        fn cuda_dims(
            &self,
            q: [usize; 3],
            k: [usize; 3],
            v: [usize; 3],
            op: &str,
        ) -> Result<AttnDims> {
            let dm = self.dims(q, k, v, op)?;
            Ok(AttnDims {
                batch: q[0],
                heads: dm.heads,
                d: dm.d,
                lq: dm.lq,
                lk: dm.lk,
            })
        }

        pub(super) fn cuda_fwd_parts(
            &self,
            [(sq, qv, qd), (sk, kv, kd), (sv, vv, vd)]: [(&CudaStorage, View, [usize; 3]); 3],
            op: &str,
        ) -> Result<(CudaStorage, Shape)> {
            let dm = self.cuda_dims(qd, kd, vd, op)?;
            cuda::attention_fwd(
                operand(sq, qv),
                operand(sk, kv),
                operand(sv, vv),
                dm,
                self.scale,
                self.device_mask.as_ref(),
                self.dropout.as_ref(),
                &self.stash,
                op,
            )
        }

        /// The gradients into one buffer of `total` elements laid out by `outs`.
        #[allow(clippy::too_many_arguments)]
        pub(super) fn cuda_bwd_parts(
            &self,
            [(sq, qv, qd), (sk, kv, kd), (sv, vv, vd)]: [(&Storage, View, [usize; 3]); 3],
            res: &Tensor,
            grad: &Tensor,
            total: usize,
            outs: [GradOut; 3],
            op: &str,
        ) -> Result<CudaStorage> {
            let (Storage::Cuda(sq), Storage::Cuda(sk), Storage::Cuda(sv)) = (sq, sk, sv) else {
                bail!("{op}: q, k and v must all be CUDA tensors");
            };
            let dm = self.cuda_dims(qd, kd, vd, op)?;
            cuda::attention_bwd(
                operand(sq, qv),
                operand(sk, kv),
                operand(sv, vv),
                dm,
                self.scale,
                self.device_mask.as_ref(),
                self.dropout.as_ref(),
                &self.stash,
                res,
                grad,
                total,
                outs,
                op,
            )
        }
    }

    /// A gradient written at `offset` of rows `row_stride` apart in a `[B, L, row_stride]`
    /// buffer.
    pub(super) fn out(offset: usize, rows: usize, row_stride: usize) -> GradOut {
        GradOut {
            offset,
            batch_stride: rows * row_stride,
            row_stride,
        }
    }
}

/// Views of the `n` equal slices of the last dimension of a `[B, L, n * C]` input (a
/// packed qkv or kv projection).
fn split_views<const N: usize>(l: &Layout, op: &str) -> Result<[(View, [usize; 3]); N]> {
    let (v, [b, rows, packed]) = View::new(l, op)?;
    if packed % N != 0 {
        bail!("{op}: {packed} channels do not split into {N} projections");
    }
    let c = packed / N;
    Ok(std::array::from_fn(|i| {
        (
            View {
                offset: v.offset + i * c,
                len: v.len.saturating_sub(i * c),
                ..v
            },
            [b, rows, c],
        )
    }))
}

/// Self-attention on one packed `[B, L, 3C]` qkv projection (q, k, v in that order along
/// the last dimension): no slicing ops in the graph, one gradient for the projection.
pub(crate) struct PackedQkv(pub(crate) FusedAttention);

impl CustomOp1 for PackedQkv {
    fn name(&self) -> &'static str {
        "vlp-fused-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let [(qv, qd), (kv, kd), (vv, vd)] = split_views::<3>(l, self.name())?;
        self.0
            .run_fwd([(s, qv, qd), (s, kv, kd), (s, vv, vd)], self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [(qv, qd), (kv, kd), (vv, vd)] = split_views::<3>(l, self.name())?;
        self.0
            .cuda_fwd_parts([(s, qv, qd), (s, kv, kd), (s, vv, vd)], self.name())
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (st, l) = qkv.storage_and_layout();
        let [(qv, qd), (kv, kd), (vv, vd)] = split_views::<3>(l, self.name())?;
        #[cfg(feature = "cuda")]
        if qkv.device().is_cuda() {
            let [b, rows, c] = qd;
            let outs = [0, c, 2 * c].map(|o| on_cuda::out(o, rows, 3 * c));
            let s = self.0.cuda_bwd_parts(
                [(&st, qv, qd), (&st, kv, kd), (&st, vv, vd)],
                _res,
                grad,
                b * rows * 3 * c,
                outs,
                self.name(),
            )?;
            return Ok(Some(super::cuda::grad_tensor(s, (b, rows, 3 * c))));
        }
        let (dq, dk, dv) = self.0.run_bwd(
            [(&st, qv, qd), (&st, kv, kd), (&st, vv, vd)],
            grad,
            qkv,
            self.name(),
        )?;
        Ok(Some(Tensor::cat(&[dq, dk, dv], 2)?))
    }
}

/// Cross-attention with queries `[B, Lq, C]` and one packed `[B, Lk, 2C]` kv projection.
pub(crate) struct PackedKv(pub(crate) FusedAttention);

impl CustomOp2 for PackedKv {
    fn name(&self) -> &'static str {
        "vlp-fused-attention-kv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (qv, qd) = View::new(l1, self.name())?;
        let [(kv, kd), (vv, vd)] = split_views::<2>(l2, self.name())?;
        self.0
            .run_fwd([(s1, qv, qd), (s2, kv, kd), (s2, vv, vd)], self.name())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (qv, qd) = View::new(l1, self.name())?;
        let [(kv, kd), (vv, vd)] = split_views::<2>(l2, self.name())?;
        self.0
            .cuda_fwd_parts([(s1, qv, qd), (s2, kv, kd), (s2, vv, vd)], self.name())
    }

    fn bwd(
        &self,
        q: &Tensor,
        kv: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (sq, lq) = q.storage_and_layout();
        let (skv, lkv) = kv.storage_and_layout();
        let (qv, qd) = View::new(lq, self.name())?;
        let [(kv_, kd), (vv, vd)] = split_views::<2>(lkv, self.name())?;
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            // One buffer: dq as [B, Lq, C], then dk|dv packed as [B, Lk, 2C].
            let ([b, lq_, c], lk) = (qd, kd[1]);
            let at = b * lq_ * c;
            let outs = [
                on_cuda::out(0, lq_, c),
                on_cuda::out(at, lk, 2 * c),
                on_cuda::out(at + c, lk, 2 * c),
            ];
            let s = self.0.cuda_bwd_parts(
                [(&sq, qv, qd), (&skv, kv_, kd), (&skv, vv, vd)],
                _res,
                grad,
                at + b * lk * 2 * c,
                outs,
                self.name(),
            )?;
            let all = super::cuda::grad_tensor(s, at + b * lk * 2 * c);
            let dq = all.narrow(0, 0, at)?.reshape((b, lq_, c))?;
            let dkv = all.narrow(0, at, b * lk * 2 * c)?.reshape((b, lk, 2 * c))?;
            return Ok((Some(dq), Some(dkv)));
        }
        let (dq, dk, dv) = self.0.run_bwd(
            [(&sq, qv, qd), (&skv, kv_, kd), (&skv, vv, vd)],
            grad,
            q,
            self.name(),
        )?;
        Ok((Some(dq), Some(Tensor::cat(&[dk, dv], 2)?)))
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "vlp-fused-attention"
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
        let ((qv, qd), (kv, kd), (vv, vd)) =
            (View::new(l1, op)?, View::new(l2, op)?, View::new(l3, op)?);
        self.run_fwd([(s1, qv, qd), (s2, kv, kd), (s3, vv, vd)], op)
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
        let op = self.name();
        let ((qv, qd), (kv, kd), (vv, vd)) =
            (View::new(l1, op)?, View::new(l2, op)?, View::new(l3, op)?);
        self.cuda_fwd_parts([(s1, qv, qd), (s2, kv, kd), (s3, vv, vd)], op)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.name();
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let ((qv, qd), (kv, kd), (vv, vd)) =
            (View::new(ql, op)?, View::new(kl, op)?, View::new(vl, op)?);
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            // One buffer: dq [B, Lq, C], dk [B, Lk, C], dv [B, Lk, C], one after the other.
            let ([b, lq, c], lk) = (qd, kd[1]);
            let (nq, nk) = (b * lq * c, b * lk * c);
            let outs = [
                on_cuda::out(0, lq, c),
                on_cuda::out(nq, lk, c),
                on_cuda::out(nq + nk, lk, c),
            ];
            let s = self.cuda_bwd_parts(
                [(&qs, qv, qd), (&ks, kv, kd), (&vs, vv, vd)],
                _res,
                grad,
                nq + 2 * nk,
                outs,
                op,
            )?;
            let all = super::cuda::grad_tensor(s, nq + 2 * nk);
            return Ok((
                Some(all.narrow(0, 0, nq)?.reshape((b, lq, c))?),
                Some(all.narrow(0, nq, nk)?.reshape((b, lk, c))?),
                Some(all.narrow(0, nq + nk, nk)?.reshape((b, lk, c))?),
            ));
        }
        let (dq, dk, dv) =
            self.run_bwd([(&qs, qv, qd), (&ks, kv, kd), (&vs, vv, vd)], grad, q, op)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
