//! The linear layer `y = x W^T (+ b)` as one CPU op with a hand-written backward
//! (`dx = g W`, `dW = g^T x`, `db` = column sums of `g`), for f32 and f64.
//!
//! Written with candle ops, a linear is five graph nodes (reshape, transpose, matmul,
//! bias add, reshape), and candle's backward gives every node's inputs a zero-filled
//! gradient buffer plus an addition: for activation-sized tensors those passes cost more
//! than the products. As one node the backward is the three products and a column sum.
//! The products go through `gemm` (candle's own CPU matrix-multiply crate) with the
//! transposes expressed as strides.

use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::affine::{col_sums, slice_of, Float};
use super::contiguous;
use super::gemm::gemm_into;

/// `[rows, in] x [out, in]^T (+ [out])`.
fn forward<T: Float>(
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    rows: usize,
    inp: usize,
    out: usize,
) -> Vec<T> {
    let mut y = vec![T::ZERO; rows * out];
    if let (Some(b), true) = (b, out > 0) {
        y.par_chunks_mut(out * 64).for_each(|rows| {
            for row in rows.chunks_exact_mut(out) {
                row.copy_from_slice(b);
            }
        });
    }
    let threads = rayon::current_num_threads();
    let acc = b.is_some();
    gemm_into(
        (rows, out, inp),
        &mut y,
        out,
        acc,
        x,
        (inp, 1),
        w,
        (1, inp),
        T::ONE,
        threads,
    );
    y
}

/// `(dx, dw)` for `g`: `[rows, out]`, each only if asked for (an input that does not
/// track gradients, like the image patches, gets none).
#[allow(clippy::too_many_arguments)]
fn backward<T: Float>(
    x: &[T],
    w: &[T],
    g: &[T],
    (rows, inp, out): (usize, usize, usize),
    need_dx: bool,
    need_dw: bool,
) -> (Option<Vec<T>>, Option<Vec<T>>) {
    let all = rayon::current_num_threads();
    let dx = |threads: usize| {
        let mut dx = vec![T::ZERO; rows * inp];
        gemm_into(
            (rows, inp, out),
            &mut dx,
            inp,
            false,
            g,
            (out, 1),
            w,
            (inp, 1),
            T::ONE,
            threads,
        );
        dx
    };
    let dw = |threads: usize| {
        let mut dw = vec![T::ZERO; out * inp];
        gemm_into(
            (out, inp, rows),
            &mut dw,
            inp,
            false,
            g,
            (1, out),
            x,
            (inp, 1),
            T::ONE,
            threads,
        );
        dw
    };
    match (need_dx, need_dw) {
        // The two products have the same size: each gets half the threads, and on two
        // cores each runs on its own core without gemm's internal synchronisation.
        (true, true) => {
            let half = all.div_ceil(2);
            let (a, b) = rayon::join(|| dx(half), || dw(half));
            (Some(a), Some(b))
        }
        (true, false) => (Some(dx(all)), None),
        (false, true) => (None, Some(dw(all))),
        (false, false) => (None, None),
    }
}

/// The shapes of a linear: `x` `[.., in]`, `w` `[out, in]`, optional `b` `[out]`.
fn dims(x: &Layout, w: &Layout, b: Option<&Layout>, op: &str) -> Result<(usize, usize, usize)> {
    let (Some(&inp), [out, w_in]) = (x.dims().last(), w.dims()) else {
        bail!(
            "{op}: x {:?} / weight {:?} are not [.., in] / [out, in]",
            x.dims(),
            w.dims()
        );
    };
    if inp != *w_in {
        bail!("{op}: x has {inp} features, the weight {w_in}");
    }
    if let Some(b) = b {
        if b.shape().elem_count() != *out || b.dims().len() != 1 {
            bail!("{op}: bias {:?} for {out} outputs", b.dims());
        }
    }
    Ok((x.shape().elem_count() / inp.max(1), inp, *out))
}

fn out_shape(x: &Layout, out: usize) -> Shape {
    let mut d = x.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last = out;
    }
    Shape::from(d)
}

/// Shared backward: gradients of `x` and `w` (for those that track gradients) and, if
/// `with_bias`, of `b`.
fn bwd_all(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    with_bias: bool,
    op: &str,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let g = grad.contiguous()?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (rows, inp, out) = dims(xl, wl, None, op)?;
    macro_rules! run {
        ($t:ty) => {{
            let (xv, wv, gv) = (
                slice_of::<$t>(&xs, xl, op)?,
                slice_of::<$t>(&ws, wl, op)?,
                slice_of::<$t>(&gs, gl, op)?,
            );
            let (dx, dw) = backward(xv, wv, gv, (rows, inp, out), x.track_op(), w.track_op());
            let db = if with_bias {
                Some(Tensor::from_vec(col_sums(gv, out), out, x.device())?)
            } else {
                None
            };
            (
                dx.map(|dx| Tensor::from_vec(dx, x.shape(), x.device()))
                    .transpose()?,
                dw.map(|dw| Tensor::from_vec(dw, w.shape(), w.device()))
                    .transpose()?,
                db,
            )
        }};
    }
    Ok(match x.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        dt => bail!("{op}: unsupported dtype {dt:?}"),
    })
}

/// A CPU storage with its layout.
type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// Shared forward of both ops: `x W^T (+ b)`, all three in one float dtype.
fn fwd_all(x: Operand, w: Operand, bias: Option<Operand>, op: &str) -> Result<(CpuStorage, Shape)> {
    let (rows, inp, out) = dims(x.1, w.1, bias.map(|(_, l)| l), op)?;
    fn slice<'a, T: Float>((s, l): Operand<'a>, op: &str) -> Result<&'a [T]> {
        match T::cpu_storage_as_slice(s) {
            Ok(v) => contiguous(v, l, op),
            Err(_) => bail!("{op}: x, weight and bias must share one float dtype"),
        }
    }
    fn run<T: Float>(
        x: Operand,
        w: Operand,
        bias: Option<Operand>,
        dims: (usize, usize, usize),
        op: &str,
    ) -> Result<Vec<T>> {
        let b = bias.map(|b| slice::<T>(b, op)).transpose()?;
        Ok(forward(
            slice(x, op)?,
            slice(w, op)?,
            b,
            dims.0,
            dims.1,
            dims.2,
        ))
    }
    let y = match x.0 {
        CpuStorage::F32(_) => CpuStorage::F32(run(x, w, bias, (rows, inp, out), op)?),
        CpuStorage::F64(_) => CpuStorage::F64(run(x, w, bias, (rows, inp, out), op)?),
        other => bail!(
            "{op}: unsupported dtype {:?}",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    };
    Ok((y, out_shape(x.1, out)))
}

/// `x W^T + b`.
pub(crate) struct LinearBias;

/// `x W^T`.
pub(crate) struct LinearNoBias;

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "vlp-linear"
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
        fwd_all((s1, l1), (s2, l2), Some((s3, l3)), self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        bwd_all(x, w, grad, true, self.name())
    }
}

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "vlp-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fwd_all((s1, l1), (s2, l2), None, self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = bwd_all(x, w, grad, false, self.name())?;
        Ok((dx, dw))
    }
}
