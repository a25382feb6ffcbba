//! Fused CPU kernels with hand-written backward passes: softmax and log-softmax here,
//! LayerNorm, broadcast adds and bias + GELU in [`affine`].
//!
//! Every kernel works row by row over the last dimension of a contiguous f32 or f64
//! tensor, rows in parallel with rayon. The public wrappers in [`crate::nn`] decide when
//! these apply (CPU, f32/f64) and fall back to the generic candle versions otherwise.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Defines `fn $name` whose body is compiled twice, as is and for AVX2+FMA, the second
/// picked at run time on CPUs that have them. The body must only call `#[inline(always)]`
/// code for the wider instructions to reach it.
macro_rules! with_avx2 {
    ($(#[$meta:meta])* fn $name:ident<$t:ident: $bound:path>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        fn $name<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner<$t: $bound>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<$t: $bound>($($arg: $ty),*) $(-> $ret)? {
                    inner($($arg),*)
                }
                if $crate::fused::has_avx2() {
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use with_avx2;

/// Whether this CPU runs the AVX2+FMA copies of the kernels.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

pub(crate) mod affine;
pub(crate) mod attention;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
pub(crate) mod dropout;
#[cfg(test)]
mod flash_reference;
pub(crate) mod gemm;
pub(crate) mod linear;
pub(crate) mod math;
pub(crate) mod xent;

/// Per-call state a forward keeps for its backward on the GPU (LayerNorm's row statistics,
/// the attention's log-sum-exp); taken once by the backward, recomputed if missing.
pub(crate) type Stash = std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>;

/// AdamW's constants for one step of one parameter (PyTorch's form:
/// `p = p * decay - step_size * m / (sqrt(v) * inv_sqrt_bias2 + eps)`).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f64,
    pub beta2: f64,
    pub inv_sqrt_bias2: f64,
    pub eps: f64,
    pub step_size: f64,
    /// `1 - lr * weight_decay`, or 1 without decay.
    pub decay: f64,
}

/// The float operations the row kernels need, for f32 and f64.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn from_f64(v: f64) -> Self;
}

macro_rules! real {
    ($t:ty, $exp:path) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            const NEG_INF: Self = <$t>::NEG_INFINITY;
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
        }
    };
}
real!(f32, math::exp_f32);
real!(f64, f64::exp);

/// Rows per rayon task: enough elements per task that scheduling stays cheap.
fn min_rows(dim: usize) -> usize {
    (4096 / dim.max(1)).max(1)
}

pub(crate) fn contiguous<'a, T>(v: &'a [T], l: &Layout, op: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{op}: input must be contiguous"),
    }
}

pub(crate) fn last_dim(l: &Layout, op: &str) -> Result<usize> {
    match l.dims().last() {
        Some(&d) => Ok(d),
        None => bail!("{op}: input must have at least one dimension"),
    }
}

fn rows1<T: Real>(x: &[T], dim: usize, f: impl Fn(&[T], &mut [T]) + Sync) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if dim > 0 {
        out.par_chunks_mut(dim)
            .zip(x.par_chunks(dim))
            .with_min_len(min_rows(dim))
            .for_each(|(o, x)| f(x, o));
    }
    out
}

fn rows2<T: Real>(a: &[T], b: &[T], dim: usize, f: impl Fn(&[T], &[T], &mut [T]) + Sync) -> Vec<T> {
    let mut out = vec![T::ZERO; a.len()];
    if dim > 0 {
        out.par_chunks_mut(dim)
            .zip(a.par_chunks(dim).zip(b.par_chunks(dim)))
            .with_min_len(min_rows(dim))
            .for_each(|(o, (a, b))| f(a, b, o));
    }
    out
}

pub(crate) fn row_max<T: Real>(x: &[T]) -> T {
    x.iter().fold(T::NEG_INF, |m, &v| if v > m { v } else { m })
}

fn sum<T: Real>(x: impl Iterator<Item = T>) -> T {
    x.fold(T::ZERO, |s, v| s + v)
}

fn softmax_row<T: Real>(x: &[T], o: &mut [T]) {
    let max = row_max(x);
    let mut s = T::ZERO;
    for (o, &x) in o.iter_mut().zip(x) {
        let e = (x - max).exp();
        *o = e;
        s += e;
    }
    let inv = T::ONE / s;
    for o in o.iter_mut() {
        *o *= inv;
    }
}

/// `dx = y * (g - sum(g * y))`.
fn softmax_bwd_row<T: Real>(y: &[T], g: &[T], o: &mut [T]) {
    let s = sum(y.iter().zip(g).map(|(&y, &g)| y * g));
    for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
        *o = y * (g - s);
    }
}

fn log_softmax_row<T: Real>(x: &[T], o: &mut [T]) {
    let max = row_max(x);
    let log_sum = sum(x.iter().map(|&x| (x - max).exp())).ln();
    for (o, &x) in o.iter_mut().zip(x) {
        *o = x - max - log_sum;
    }
}

/// `dx = g - exp(y) * sum(g)`.
fn log_softmax_bwd_row<T: Real>(y: &[T], g: &[T], o: &mut [T]) {
    let s = sum(g.iter().copied());
    for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
        *o = g - y.exp() * s;
    }
}

/// Applies a row kernel, instantiated for f32 and f64, to one CPU storage.
macro_rules! unary {
    ($op:expr, $s:expr, $l:expr, |$x:ident, $o:ident, $t:ident| $body:expr) => {{
        let dim = last_dim($l, $op)?;
        let out = match $s {
            CpuStorage::F32(v) => {
                type $t = f32;
                CpuStorage::F32(rows1(
                    contiguous(v, $l, $op)?,
                    dim,
                    |$x: &[$t], $o: &mut [$t]| $body,
                ))
            }
            CpuStorage::F64(v) => {
                type $t = f64;
                CpuStorage::F64(rows1(
                    contiguous(v, $l, $op)?,
                    dim,
                    |$x: &[$t], $o: &mut [$t]| $body,
                ))
            }
            other => bail!("{}: unsupported dtype {:?}", $op, other.dtype()),
        };
        Ok((out, $l.shape().clone()))
    }};
}

macro_rules! binary {
    ($op:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, |$a:ident, $b:ident, $o:ident, $t:ident| $body:expr) => {{
        if $l1.shape() != $l2.shape() {
            bail!(
                "{}: shape mismatch {:?} vs {:?}",
                $op,
                $l1.shape(),
                $l2.shape()
            );
        }
        let dim = last_dim($l1, $op)?;
        let out = match ($s1, $s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                type $t = f32;
                let (a, b) = (contiguous(a, $l1, $op)?, contiguous(b, $l2, $op)?);
                CpuStorage::F32(rows2(a, b, dim, |$a: &[$t], $b: &[$t], $o: &mut [$t]| {
                    $body
                }))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                type $t = f64;
                let (a, b) = (contiguous(a, $l1, $op)?, contiguous(b, $l2, $op)?);
                CpuStorage::F64(rows2(a, b, dim, |$a: &[$t], $b: &[$t], $o: &mut [$t]| {
                    $body
                }))
            }
            (a, b) => bail!(
                "{}: unsupported dtypes {:?}, {:?}",
                $op,
                a.dtype(),
                b.dtype()
            ),
        };
        Ok((out, $l1.shape().clone()))
    }};
}

/// Softmax over the last dimension; backward through [`SoftmaxBwd`].
pub(crate) struct Softmax;

struct SoftmaxBwd;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "vlp-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        unary!(self.name(), s, l, |x, o, T| softmax_row::<T>(x, o))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax_fwd(s, l, false, self.name())
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let y = res.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?))
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "vlp-softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        binary!(
            self.name(),
            s1,
            l1,
            s2,
            l2,
            |y, g, o, T| softmax_bwd_row::<T>(y, g, o)
        )
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax_bwd(s1, l1, s2, l2, false, self.name())
    }
}

/// Log-softmax over the last dimension; backward through [`LogSoftmaxBwd`].
pub(crate) struct LogSoftmax;

struct LogSoftmaxBwd;

impl CustomOp1 for LogSoftmax {
    fn name(&self) -> &'static str {
        "vlp-log-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        unary!(self.name(), s, l, |x, o, T| log_softmax_row::<T>(x, o))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax_fwd(s, l, true, self.name())
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let y = res.contiguous()?;
        Ok(Some(
            y.apply_op2_no_bwd(&grad.contiguous()?, &LogSoftmaxBwd)?,
        ))
    }
}

impl CustomOp2 for LogSoftmaxBwd {
    fn name(&self) -> &'static str {
        "vlp-log-softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        binary!(self.name(), s1, l1, s2, l2, |y, g, o, T| {
            log_softmax_bwd_row::<T>(y, g, o)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        cuda::softmax_bwd(s1, l1, s2, l2, true, self.name())
    }
}
