//! Fused CPU kernels for the affine pieces around the matmuls: LayerNorm with its gain
//! and bias, adding a tensor broadcast over the leading dimensions (a bias, position
//! embeddings), and bias + GELU.
//!
//! candle's backward of a broadcast op sums the gradient over the broadcast dimensions
//! with a reduction that walks every element through a division per dimension, on one
//! thread: for a bias under a `[rows, n]` activation that costs more than the matmul in
//! front of it. Here the gradients of gains and biases are column sums computed in
//! parallel over fixed blocks of rows and added up in block order, so the result does
//! not depend on the number of threads.

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
    WithDType,
};
use rayon::prelude::*;

use super::{contiguous, last_dim, Real};

/// Rows per block of the column sums.
const BLOCK_ROWS: usize = 32;

/// f32 and f64: the kernels' float operations and candle's storage access.
pub(crate) trait Float: Real + WithDType {
    /// `erf` and `exp` for GELU: the vectorisable versions in f32, libm's in f64.
    fn gelu_erf(self) -> Self;
    fn gelu_exp(self) -> Self;
}
impl Float for f32 {
    #[inline(always)]
    fn gelu_erf(self) -> Self {
        super::math::erf_f32(self)
    }
    #[inline(always)]
    fn gelu_exp(self) -> Self {
        super::math::exp_f32(self)
    }
}
impl Float for f64 {
    #[inline(always)]
    fn gelu_erf(self) -> Self {
        libm::erf(self)
    }
    #[inline(always)]
    fn gelu_exp(self) -> Self {
        self.exp()
    }
}

/// The contiguous CPU slice behind a tensor (held while `guard` lives).
pub(crate) fn slice_of<'a, T: Float>(s: &'a Storage, l: &Layout, op: &str) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(c) => contiguous(T::cpu_storage_as_slice(c)?, l, op),
        _ => bail!("{op}: CPU tensors only"),
    }
}

fn tensor_from<T: Float>(v: Vec<T>, shape: &Shape, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, shape.clone(), like.device())
}

/// Sums `k` per-block accumulators of length `n` in block order.
fn reduce_blocks<T: Float>(partials: Vec<Vec<Vec<T>>>, k: usize, n: usize) -> Vec<Vec<T>> {
    let mut total = vec![vec![T::ZERO; n]; k];
    for block in partials {
        for (t, p) in total.iter_mut().zip(block) {
            for (t, p) in t.iter_mut().zip(p) {
                *t += p;
            }
        }
    }
    total
}

/// Column sums of a `[rows, n]` matrix, in parallel over blocks of rows.
pub(crate) fn col_sums<T: Float>(g: &[T], n: usize) -> Vec<T> {
    if n == 0 {
        return Vec::new();
    }
    let partials: Vec<Vec<Vec<T>>> = g
        .par_chunks(BLOCK_ROWS * n)
        .map(|block| {
            let mut acc = vec![T::ZERO; n];
            for row in block.chunks_exact(n) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
            vec![acc]
        })
        .collect();
    reduce_blocks(partials, 1, n).pop().unwrap_or_default()
}

/// Applies `f(x_row, out_row)` to every row, rows in parallel.
fn map_rows<T: Float>(x: &[T], n: usize, f: impl Fn(&[T], &mut [T]) + Sync) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if n > 0 {
        out.par_chunks_mut(BLOCK_ROWS * n)
            .zip(x.par_chunks(BLOCK_ROWS * n))
            .for_each(|(o, x)| {
                for (o, x) in o.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
                    f(x, o)
                }
            });
    }
    out
}

/// The length of the rows `b` is broadcast over: `b`'s shape without leading ones must
/// be the trailing part of `x`'s.
fn broadcast_row_len(x: &Shape, b: &Shape, op: &str) -> Result<usize> {
    let bd: Vec<usize> = b.dims().iter().copied().skip_while(|&d| d == 1).collect();
    let xd = x.dims();
    if bd.len() > xd.len() || xd[xd.len() - bd.len()..] != bd[..] {
        bail!("{op}: {b:?} does not broadcast over the trailing dims of {x:?}");
    }
    Ok(bd.iter().product())
}

macro_rules! dispatch2 {
    ($op:expr, $s1:expr, $s2:expr, |$a:ident, $b:ident, $t:ident| $body:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32($a), CpuStorage::F32($b)) => {
                type $t = f32;
                CpuStorage::F32($body)
            }
            (CpuStorage::F64($a), CpuStorage::F64($b)) => {
                type $t = f64;
                CpuStorage::F64($body)
            }
            (a, b) => bail!(
                "{}: unsupported dtypes {:?}, {:?}",
                $op,
                a.dtype(),
                b.dtype()
            ),
        }
    };
}

/// `x + b` with `b` broadcast over the leading dimensions of `x`; backward: the gradient
/// itself for `x`, its column sums for `b`.
pub(crate) struct AddBroadcast;

impl CustomOp2 for AddBroadcast {
    fn name(&self) -> &'static str {
        "vlp-add-broadcast"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let n = broadcast_row_len(l1.shape(), l2.shape(), op)?;
        let out = dispatch2!(op, s1, s2, |x, b, T| {
            let (x, b) = (contiguous(x, l1, op)?, contiguous(b, l2, op)?);
            map_rows::<T>(x, n, |x, o| {
                for ((o, &x), &b) in o.iter_mut().zip(x).zip(b) {
                    *o = x + b;
                }
            })
        });
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        broadcast_row_len(l1.shape(), l2.shape(), self.name())?;
        super::cuda::row_bias_fwd(s1, l1, s2, l2, false, self.name())
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if grad.device().is_cuda() {
            let db = super::cuda::add_row_bwd(b, grad, self.name())?;
            return Ok((Some(grad.clone()), Some(db)));
        }
        let g = grad.contiguous()?;
        let n = b.elem_count();
        let db = {
            let (gs, gl) = g.storage_and_layout();
            match g.dtype() {
                DType::F32 => tensor_from(
                    col_sums(slice_of::<f32>(&gs, gl, self.name())?, n),
                    b.shape(),
                    b,
                )?,
                DType::F64 => tensor_from(
                    col_sums(slice_of::<f64>(&gs, gl, self.name())?, n),
                    b.shape(),
                    b,
                )?,
                dt => bail!("{}: unsupported dtype {dt:?}", self.name()),
            }
        };
        Ok((Some(g), Some(db)))
    }
}

const SQRT_HALF: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

#[inline(always)]
fn gelu<T: Float>(u: T) -> T {
    let half = <T as Real>::from_f64(0.5);
    half * u * (T::ONE + (u * <T as Real>::from_f64(SQRT_HALF)).gelu_erf())
}

#[inline(always)]
fn gelu_grad<T: Float>(u: T) -> T {
    let half = <T as Real>::from_f64(0.5);
    let cdf = half * (T::ONE + (u * <T as Real>::from_f64(SQRT_HALF)).gelu_erf());
    cdf + u * <T as Real>::from_f64(INV_SQRT_2PI) * (T::ZERO - half * u * u).gelu_exp()
}

/// Rows of `o = gelu(x + b)` (`b` one row).
#[inline(always)]
fn gelu_fwd_rows<T: Float>(x: &[T], b: &[T], o: &mut [T]) {
    let n = b.len();
    for (o, x) in o.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
        for i in 0..n {
            o[i] = gelu(x[i] + b[i]);
        }
    }
}

/// Rows of `dx = g * gelu'(x + b)`, summed into `db`.
#[inline(always)]
fn gelu_bwd_rows<T: Float>(x: &[T], b: &[T], g: &[T], dx: &mut [T], db: &mut [T]) {
    let n = b.len();
    for ((dx, x), g) in dx
        .chunks_exact_mut(n)
        .zip(x.chunks_exact(n))
        .zip(g.chunks_exact(n))
    {
        for i in 0..n {
            let d = g[i] * gelu_grad(x[i] + b[i]);
            dx[i] = d;
            db[i] += d;
        }
    }
}

super::with_avx2! {
    fn gelu_fwd_block<T: Float>(x: &[T], b: &[T], o: &mut [T]) {
        gelu_fwd_rows(x, b, o)
    }
}

super::with_avx2! {
    fn gelu_bwd_block<T: Float>(x: &[T], b: &[T], g: &[T], dx: &mut [T], db: &mut [T]) {
        gelu_bwd_rows(x, b, g, dx, db)
    }
}

/// `gelu(x + b)` (erf form) with `b` broadcast over the leading dimensions; backward
/// `dx = g * gelu'(x + b)`, `db` its column sums, from `x + b` recomputed.
pub(crate) struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "vlp-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let n = broadcast_row_len(l1.shape(), l2.shape(), op)?;
        let out = dispatch2!(op, s1, s2, |x, b, T| {
            let (x, b) = (contiguous(x, l1, op)?, contiguous(b, l2, op)?);
            let mut out = vec![T::ZERO; x.len()];
            if n > 0 {
                out.par_chunks_mut(BLOCK_ROWS * n)
                    .zip(x.par_chunks(BLOCK_ROWS * n))
                    .for_each(|(o, x)| gelu_fwd_block(x, b, o));
            }
            out
        });
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        broadcast_row_len(l1.shape(), l2.shape(), self.name())?;
        super::cuda::row_bias_fwd(s1, l1, s2, l2, true, self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, db) = super::cuda::bias_gelu_bwd(x, b, grad, self.name())?;
            return Ok((Some(dx), Some(db)));
        }
        let (x, g) = (x.contiguous()?, grad.contiguous()?);
        let n = b.elem_count();
        let op = self.name();
        let (xs, xl) = x.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        fn run<T: Float>(x: &[T], b: &[T], g: &[T], n: usize) -> (Vec<T>, Vec<T>) {
            let mut dx = vec![T::ZERO; x.len()];
            if n == 0 {
                return (dx, Vec::new());
            }
            let partials: Vec<Vec<Vec<T>>> = dx
                .par_chunks_mut(BLOCK_ROWS * n)
                .zip(
                    x.par_chunks(BLOCK_ROWS * n)
                        .zip(g.par_chunks(BLOCK_ROWS * n)),
                )
                .map(|(dx, (x, g))| {
                    let mut db = vec![T::ZERO; n];
                    gelu_bwd_block(x, b, g, dx, &mut db);
                    vec![db]
                })
                .collect();
            let db = reduce_blocks(partials, 1, n).pop().unwrap_or_default();
            (dx, db)
        }
        let (dx, db) = match x.dtype() {
            DType::F32 => {
                let (dx, db) = run::<f32>(
                    slice_of(&xs, xl, op)?,
                    slice_of(&bs, bl, op)?,
                    slice_of(&gs, gl, op)?,
                    n,
                );
                (
                    tensor_from(dx, x.shape(), &x)?,
                    tensor_from(db, b.shape(), b)?,
                )
            }
            DType::F64 => {
                let (dx, db) = run::<f64>(
                    slice_of(&xs, xl, op)?,
                    slice_of(&bs, bl, op)?,
                    slice_of(&gs, gl, op)?,
                    n,
                );
                (
                    tensor_from(dx, x.shape(), &x)?,
                    tensor_from(db, b.shape(), b)?,
                )
            }
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(db)))
    }
}

/// LayerNorm over the last dimension with its gain and bias:
/// `(x - mean) / sqrt(var + eps) * w + b`; backward in one pass over the rows (the row
/// moments recomputed), with `dw` and `db` as column sums.
pub(crate) struct LayerNormAffine {
    pub(crate) eps: f64,
    /// The row statistics of a CUDA forward, for its backward.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) stash: super::Stash,
}

impl LayerNormAffine {
    pub(crate) fn new(eps: f64) -> Self {
        Self {
            eps,
            stash: super::Stash::default(),
        }
    }
}

impl CustomOp3 for LayerNormAffine {
    fn name(&self) -> &'static str {
        "vlp-layer-norm-affine"
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
        if l2.shape().elem_count() != n || l3.shape().elem_count() != n {
            bail!("{op}: gain and bias must have {n} elements");
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(ln_fwd(
                    contiguous(x, l1, op)?,
                    contiguous(w, l2, op)?,
                    contiguous(b, l3, op)?,
                    n,
                    self.eps as f32,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(ln_fwd(
                    contiguous(x, l1, op)?,
                    contiguous(w, l2, op)?,
                    contiguous(b, l3, op)?,
                    n,
                    self.eps,
                ))
            }
            (x, _, _) => bail!("{op}: unsupported dtype {:?}", x.dtype()),
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
        super::cuda::layer_norm_fwd(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            self.eps,
            &self.stash,
            self.name(),
        )
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, dw, db) =
                super::cuda::layer_norm_bwd(x, w, b, grad, self.eps, &self.stash, self.name())?;
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        let (x, g) = (x.contiguous()?, grad.contiguous()?);
        let op = self.name();
        let n = x.dim(candle_core::D::Minus1)?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => {
                let (dx, dw, db) = ln_bwd::<f32>(
                    slice_of(&xs, xl, op)?,
                    slice_of(&ws, wl, op)?,
                    slice_of(&gs, gl, op)?,
                    n,
                    self.eps as f32,
                );
                (
                    tensor_from(dx, x.shape(), &x)?,
                    tensor_from(dw, w.shape(), w)?,
                    tensor_from(db, b.shape(), b)?,
                )
            }
            DType::F64 => {
                let (dx, dw, db) = ln_bwd::<f64>(
                    slice_of(&xs, xl, op)?,
                    slice_of(&ws, wl, op)?,
                    slice_of(&gs, gl, op)?,
                    n,
                    self.eps,
                );
                (
                    tensor_from(dx, x.shape(), &x)?,
                    tensor_from(dw, w.shape(), w)?,
                    tensor_from(db, b.shape(), b)?,
                )
            }
            dt => bail!("{op}: unsupported dtype {dt:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `sum(f(i))` over `0..n` in 8 interleaved partial sums (so the loop vectorises), added
/// up in a fixed order.
#[inline(always)]
fn lane_sum<T: Float>(n: usize, f: impl Fn(usize) -> T) -> T {
    let mut acc = [T::ZERO; 8];
    let full = n / 8 * 8;
    for i in (0..full).step_by(8) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in full..n {
        s += f(i);
    }
    s
}

/// Mean and `1 / sqrt(var + eps)` of one row (biased variance, two passes).
#[inline(always)]
fn row_moments<T: Float>(x: &[T], eps: T) -> (T, T) {
    let n = x.len();
    let nf = <T as Real>::from_f64(n as f64);
    let mean = lane_sum(n, |i| x[i]) / nf;
    let var = lane_sum(n, |i| (x[i] - mean) * (x[i] - mean)) / nf;
    (mean, T::ONE / (var + eps).sqrt())
}

super::with_avx2! {
    fn ln_fwd_block<T: Float>(x: &[T], w: &[T], b: &[T], o: &mut [T], eps: T) {
        let n = w.len();
        for (o, x) in o.chunks_exact_mut(n).zip(x.chunks_exact(n)) {
            let (mean, rstd) = row_moments(x, eps);
            for i in 0..n {
                o[i] = (x[i] - mean) * rstd * w[i] + b[i];
            }
        }
    }
}

fn ln_fwd<T: Float>(x: &[T], w: &[T], b: &[T], n: usize, eps: T) -> Vec<T> {
    let mut out = vec![T::ZERO; x.len()];
    if n > 0 {
        out.par_chunks_mut(BLOCK_ROWS * n)
            .zip(x.par_chunks(BLOCK_ROWS * n))
            .for_each(|(o, x)| ln_fwd_block(x, w, b, o, eps));
    }
    out
}

super::with_avx2! {
    /// One block of rows of [`ln_bwd`], adding into `dw` and `db`.
    fn ln_bwd_block<T: Float>(x: &[T], w: &[T], g: &[T], dx: &mut [T], dw: &mut [T], db: &mut [T], eps: T) {
        let n = w.len();
        let nf = <T as Real>::from_f64(n as f64);
        for ((dx, x), g) in dx.chunks_exact_mut(n).zip(x.chunks_exact(n)).zip(g.chunks_exact(n)) {
            let (mean, rstd) = row_moments(x, eps);
            let sh = lane_sum(n, |i| g[i] * w[i]);
            let shy = lane_sum(n, |i| g[i] * w[i] * ((x[i] - mean) * rstd));
            for i in 0..n {
                let y = (x[i] - mean) * rstd;
                dw[i] += g[i] * y;
                db[i] += g[i];
            }
            let (mh, mhy) = (sh / nf, shy / nf);
            for i in 0..n {
                let y = (x[i] - mean) * rstd;
                dx[i] = rstd * (g[i] * w[i] - mh - y * mhy);
            }
        }
    }
}

/// With `y = (x - mean) * rstd` and `h = g * w`:
/// `dx = rstd * (h - mean(h) - y * mean(h * y))`, `dw = sum_rows(g * y)`,
/// `db = sum_rows(g)`.
fn ln_bwd<T: Float>(x: &[T], w: &[T], g: &[T], n: usize, eps: T) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut dx = vec![T::ZERO; x.len()];
    if n == 0 {
        return (dx, Vec::new(), Vec::new());
    }
    let partials: Vec<Vec<Vec<T>>> = dx
        .par_chunks_mut(BLOCK_ROWS * n)
        .zip(
            x.par_chunks(BLOCK_ROWS * n)
                .zip(g.par_chunks(BLOCK_ROWS * n)),
        )
        .map(|(dx, (x, g))| {
            let mut dw = vec![T::ZERO; n];
            let mut db = vec![T::ZERO; n];
            ln_bwd_block(x, w, g, dx, &mut dw, &mut db, eps);
            vec![dw, db]
        })
        .collect();
    let mut sums = reduce_blocks(partials, 2, n);
    let db = sums.pop().unwrap_or_default();
    let dw = sums.pop().unwrap_or_default();
    (dx, dw, db)
}

/// In place: `target = m * target + (1 - m) * source`, the momentum twin's EMA (both
/// contiguous, same shape and dtype). Written as candle's `affine`s and an add it would be
/// three new tensors and a copy per parameter.
pub(crate) struct Ema {
    pub(crate) m: f64,
}

impl candle_core::InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "vlp-ema"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let op = self.name();
        if l1.shape() != l2.shape() {
            bail!("{op}: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        fn blend<T: Float>(t: &mut [T], s: &[T], m: T, one_minus_m: T) {
            t.par_chunks_mut(1 << 14)
                .zip(s.par_chunks(1 << 14))
                .for_each(|(t, s)| {
                    for (t, &s) in t.iter_mut().zip(s) {
                        *t = *t * m + s * one_minus_m;
                    }
                });
        }
        let Some((a1, b1)) = l1.contiguous_offsets() else {
            bail!("{op}: target must be contiguous");
        };
        match (s1, s2) {
            (CpuStorage::F32(t), CpuStorage::F32(s)) => blend(
                &mut t[a1..b1],
                contiguous(s, l2, op)?,
                self.m as f32,
                (1.0 - self.m) as f32,
            ),
            (CpuStorage::F64(t), CpuStorage::F64(s)) => {
                blend(&mut t[a1..b1], contiguous(s, l2, op)?, self.m, 1.0 - self.m)
            }
            _ => bail!("{op}: target and source must be both f32 or both f64"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        super::cuda::ema(s1, l1, s2, l2, self.m, self.name())
    }
}
