//! The CUDA side of the fused ops: loads vlp's PTX (`vlp-kernels`) through candle's
//! `CudaDevice` and launches it on the device's one stream. Each op in `fused/` calls in
//! here from its `cuda_fwd` and, for CUDA tensors, from its backward; `dispatch.rs`
//! decides when that happens (f32 or bf16, contiguous where a kernel needs it, a head
//! dimension the attention kernels were instantiated for).
//!
//! Kernels take raw device pointers (with element offsets already applied) and `i64`
//! strides, so views into packed projections and gradients written into one packed buffer
//! need no copies.

use std::any::Any;
use std::sync::Mutex;

use super::Stash;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};
use half::bf16;

use super::dropout::DropoutMask;

/// The PTX modules of `vlp-kernels`.
#[derive(Clone, Copy)]
enum Module {
    Attention,
    Rows,
    Optim,
}

impl Module {
    fn name_and_ptx(self) -> (&'static str, &'static str) {
        match self {
            Module::Attention => ("vlp-attention", vlp_kernels::ATTENTION),
            Module::Rows => ("vlp-rows", vlp_kernels::ROWS),
            Module::Optim => ("vlp-optim", vlp_kernels::OPTIM),
        }
    }
}

/// An element type with kernel instances: its suffix in kernel names.
pub(crate) trait Elem: CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static {
    const SUFFIX: &'static str;
}
impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Elem for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Whether the kernels have instances for `dt`.
pub(crate) fn supported(dt: DType) -> bool {
    matches!(dt, DType::F32 | DType::BF16)
}

/// Head dimensions the attention kernels are instantiated for.
pub(crate) const HEAD_DIMS: [usize; 3] = [16, 32, 64];

/// Runs `$body` with `$t` bound to the Rust type of `$dt` (f32 or bf16).
macro_rules! by_dtype {
    ($dt:expr, $op:expr, |$t:ident| $body:expr) => {
        match $dt {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            dt => bail!("{}: no CUDA kernel for {dt:?}", $op),
        }
    };
}

/// A kernel by module and name, launched with [`Launch::run`].
struct Launch<'a> {
    dev: &'a CudaDevice,
    module: Module,
    name: String,
}

fn kernel<'a>(dev: &'a CudaDevice, module: Module, name: &str) -> Result<Launch<'a>> {
    Ok(Launch {
        dev,
        module,
        name: name.to_string(),
    })
}

/// The device address of element `offset` of `s`.
fn ptr<T>(dev: &CudaDevice, s: &CudaSlice<T>, offset: usize) -> u64 {
    let stream = dev.cuda_stream();
    let (p, _sync) = s.device_ptr(&stream);
    p + (offset * std::mem::size_of::<T>()) as u64
}

/// One kernel argument, in order.
enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    U32(u32),
    U64(u64),
    F32(f32),
}

impl Launch<'_> {
    fn run(self, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let (mname, ptx) = self.module.name_and_ptx();
        let func = self.dev.get_or_load_custom_func(&self.name, mname, ptx)?;
        // The builder keeps references: every value lives in `args` until the launch.
        let mut b = func.builder();
        for a in args {
            match a {
                Arg::Ptr(v) | Arg::U64(v) => b.arg(v),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::U32(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        // SAFETY: each kernel's parameter list is the sequence of `args` built by its one
        // caller below (pointers into live allocations of the sizes the kernel indexes).
        unsafe { b.launch(cfg) }.map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok(())
    }
}

/// A grid-stride launch over `total` elements.
fn elems_cfg(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(256).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One block per row.
fn rows_cfg(rows: usize, n: usize) -> LaunchConfig {
    let threads = if n >= 4096 {
        1024
    } else if n >= 512 {
        256
    } else {
        128
    };
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cuda_of<'a>(s: &'a Storage, op: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("{op}: all operands must be CUDA tensors"),
    }
}

/// The start of a contiguous layout, or an error naming the op.
fn start(l: &Layout, op: &str) -> Result<usize> {
    match l.contiguous_offsets() {
        Some((a, _)) => Ok(a),
        None => bail!("{op}: CUDA kernels need contiguous inputs"),
    }
}

fn last(l: &Layout, op: &str) -> Result<usize> {
    match l.dims().last() {
        Some(&n) if n > 0 => Ok(n),
        _ => bail!("{op}: the last dimension must be non-empty"),
    }
}

fn alloc<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    dev.alloc_zeros::<T>(n.max(1))
}

fn wrap<T: Elem>(s: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(s, dev.clone())
}

/// A tensor around a fresh CUDA buffer (no gradient history: backward results).
fn tensor<T: Elem>(s: CudaSlice<T>, dev: &CudaDevice, shape: &Shape) -> Tensor {
    grad_tensor(wrap(s, dev), shape.clone())
}

fn put(stash: &Stash, v: impl Any + Send) {
    if let Ok(mut s) = stash.lock() {
        *s = Some(Box::new(v));
    }
}

fn take<V: Any>(stash: &Stash) -> Option<V> {
    let boxed = stash.lock().ok()?.take()?;
    boxed.downcast::<V>().ok().map(|b| *b)
}

// ---------------------------------------------------------------------------------------
// Row kernels

/// `op(x)` row-wise for softmax (`log = false`) and log-softmax.
pub(crate) fn softmax_fwd(
    s: &CudaStorage,
    l: &Layout,
    log: bool,
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let (n, total) = (last(l, op)?, l.shape().elem_count());
    let off = start(l, op)?;
    by_dtype!(s.dtype(), op, |T| {
        let x = s.as_cuda_slice::<T>()?;
        let y = alloc::<T>(dev, total)?;
        kernel(dev, Module::Rows, &format!("vlp_softmax_fwd_{}", T::SUFFIX))?.run(
            rows_cfg(total / n, n),
            &[
                Arg::Ptr(ptr(dev, x, off)),
                Arg::Ptr(ptr(dev, &y, 0)),
                Arg::I32(n as i32),
                Arg::I32(log as i32),
            ],
        )?;
        Ok((wrap(y, dev), l.shape().clone()))
    })
}

/// The softmax / log-softmax backward from the output `y` and the gradient `g`.
pub(crate) fn softmax_bwd(
    y: &CudaStorage,
    ly: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    log: bool,
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    if ly.shape() != lg.shape() {
        bail!("{op}: shapes {:?} and {:?} differ", ly.shape(), lg.shape());
    }
    let dev = y.device();
    let (n, total) = (last(ly, op)?, ly.shape().elem_count());
    let (oy, og) = (start(ly, op)?, start(lg, op)?);
    by_dtype!(y.dtype(), op, |T| {
        let dx = alloc::<T>(dev, total)?;
        kernel(dev, Module::Rows, &format!("vlp_softmax_bwd_{}", T::SUFFIX))?.run(
            rows_cfg(total / n, n),
            &[
                Arg::Ptr(ptr(dev, y.as_cuda_slice::<T>()?, oy)),
                Arg::Ptr(ptr(dev, g.as_cuda_slice::<T>()?, og)),
                Arg::Ptr(ptr(dev, &dx, 0)),
                Arg::I32(n as i32),
                Arg::I32(log as i32),
            ],
        )?;
        Ok((wrap(dx, dev), ly.shape().clone()))
    })
}

/// Soft-target cross-entropy per row: `[rows]` losses from logits and targets.
pub(crate) fn soft_xent_fwd(
    x: &CudaStorage,
    lx: &Layout,
    t: &CudaStorage,
    lt: &Layout,
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let (n, total) = (last(lx, op)?, lx.shape().elem_count());
    let rows = total / n;
    by_dtype!(x.dtype(), op, |T| {
        let loss = alloc::<T>(dev, rows)?;
        kernel(
            dev,
            Module::Rows,
            &format!("vlp_soft_xent_fwd_{}", T::SUFFIX),
        )?
        .run(
            rows_cfg(rows, n),
            &[
                Arg::Ptr(ptr(dev, x.as_cuda_slice::<T>()?, start(lx, op)?)),
                Arg::Ptr(ptr(dev, t.as_cuda_slice::<T>()?, start(lt, op)?)),
                Arg::Ptr(ptr(dev, &loss, 0)),
                Arg::I32(n as i32),
            ],
        )?;
        Ok((wrap(loss, dev), Shape::from(rows)))
    })
}

/// The logits' gradient of [`soft_xent_fwd`] from the rows' gradient `g`.
pub(crate) fn soft_xent_bwd(
    x: &CudaStorage,
    lx: &Layout,
    t: &CudaStorage,
    lt: &Layout,
    g: &CudaStorage,
    lg: &Layout,
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let (n, total) = (last(lx, op)?, lx.shape().elem_count());
    by_dtype!(x.dtype(), op, |T| {
        let dx = alloc::<T>(dev, total)?;
        kernel(
            dev,
            Module::Rows,
            &format!("vlp_soft_xent_bwd_{}", T::SUFFIX),
        )?
        .run(
            rows_cfg(total / n, n),
            &[
                Arg::Ptr(ptr(dev, x.as_cuda_slice::<T>()?, start(lx, op)?)),
                Arg::Ptr(ptr(dev, t.as_cuda_slice::<T>()?, start(lt, op)?)),
                Arg::Ptr(ptr(dev, g.as_cuda_slice::<T>()?, start(lg, op)?)),
                Arg::Ptr(ptr(dev, &dx, 0)),
                Arg::I32(n as i32),
            ],
        )?;
        Ok((wrap(dx, dev), lx.shape().clone()))
    })
}

/// `x * keep(i)`.
pub(crate) fn dropout(
    s: &CudaStorage,
    l: &Layout,
    mask: &DropoutMask,
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    let dev = s.device();
    let total = l.shape().elem_count();
    let off = start(l, op)?;
    let (key0, key1, threshold, scale) = mask.parts();
    by_dtype!(s.dtype(), op, |T| {
        let y = alloc::<T>(dev, total)?;
        kernel(dev, Module::Rows, &format!("vlp_dropout_{}", T::SUFFIX))?.run(
            elems_cfg(total),
            &[
                Arg::Ptr(ptr(dev, s.as_cuda_slice::<T>()?, off)),
                Arg::Ptr(ptr(dev, &y, 0)),
                Arg::U64(total as u64),
                Arg::U32(key0),
                Arg::U32(key1),
                Arg::U64(threshold),
                Arg::F32(scale),
            ],
        )?;
        Ok((wrap(y, dev), l.shape().clone()))
    })
}

/// `x + b` (`gelu = false`) or `gelu(x + b)` with `b` one row of `n` broadcast over `x`.
pub(crate) fn row_bias_fwd(
    x: &CudaStorage,
    lx: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    gelu: bool,
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.device();
    let total = lx.shape().elem_count();
    let n = lb.shape().elem_count();
    if n == 0 || total % n != 0 {
        bail!(
            "{op}: a row of {n} does not broadcast over {:?}",
            lx.shape()
        );
    }
    let (ox, ob) = (start(lx, op)?, start(lb, op)?);
    let name = if gelu {
        "vlp_bias_gelu_fwd"
    } else {
        "vlp_add_row"
    };
    by_dtype!(x.dtype(), op, |T| {
        let y = alloc::<T>(dev, total)?;
        kernel(dev, Module::Rows, &format!("{name}_{}", T::SUFFIX))?.run(
            elems_cfg(total),
            &[
                Arg::Ptr(ptr(dev, x.as_cuda_slice::<T>()?, ox)),
                Arg::Ptr(ptr(dev, b.as_cuda_slice::<T>()?, ob)),
                Arg::Ptr(ptr(dev, &y, 0)),
                Arg::U64(total as u64),
                Arg::I32(n as i32),
            ],
        )?;
        Ok((wrap(y, dev), lx.shape().clone()))
    })
}

/// Rows summed per partition for the column sums: a fixed function of the row count, so
/// results do not depend on anything but the data.
fn partitions(rows: usize) -> (usize, usize) {
    let parts = rows.div_ceil(64).clamp(1, 256);
    (parts, rows.div_ceil(parts).max(1))
}

/// Column sums of the `[rows, n]` gradient `g` (starting at element `og`) into a new
/// `[n]` buffer, deterministically.
fn col_sums<T: Elem>(
    dev: &CudaDevice,
    g: &CudaSlice<T>,
    og: usize,
    rows: usize,
    n: usize,
) -> Result<CudaSlice<T>> {
    let (parts, per) = partitions(rows);
    let partial = alloc::<f32>(dev, parts * n)?;
    kernel(
        dev,
        Module::Rows,
        &format!("vlp_col_partials_{}", T::SUFFIX),
    )?
    .run(
        LaunchConfig {
            grid_dim: (n.div_ceil(32) as u32, parts as u32, 1),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::Ptr(ptr(dev, g, og)),
            Arg::Ptr(ptr(dev, &partial, 0)),
            Arg::I32(rows as i32),
            Arg::I32(n as i32),
            Arg::I32(per as i32),
        ],
    )?;
    finish_cols::<T>(dev, &partial, parts, n)
}

fn finish_cols<T: Elem>(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    parts: usize,
    n: usize,
) -> Result<CudaSlice<T>> {
    let out = alloc::<T>(dev, n)?;
    kernel(dev, Module::Rows, &format!("vlp_col_finish_{}", T::SUFFIX))?.run(
        LaunchConfig {
            grid_dim: (n.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::Ptr(ptr(dev, partial, 0)),
            Arg::Ptr(ptr(dev, &out, 0)),
            Arg::I32(parts as i32),
            Arg::I32(n as i32),
        ],
    )?;
    Ok(out)
}

/// The bias's gradient for `x + b`: the column sums of `grad` in `b`'s shape.
pub(crate) fn add_row_bwd(b: &Tensor, grad: &Tensor, op: &str) -> Result<Tensor> {
    let g = grad.contiguous()?;
    let n = b.elem_count();
    let (gs, gl) = g.storage_and_layout();
    let gs = cuda_of(&gs, op)?;
    let dev = gs.device();
    let og = start(gl, op)?;
    by_dtype!(g.dtype(), op, |T| {
        let db = col_sums::<T>(dev, gs.as_cuda_slice::<T>()?, og, g.elem_count() / n, n)?;
        Ok(tensor(db, dev, b.shape()))
    })
}

/// `(dx, db)` for `gelu(x + b)`.
pub(crate) fn bias_gelu_bwd(
    x: &Tensor,
    b: &Tensor,
    grad: &Tensor,
    op: &str,
) -> Result<(Tensor, Tensor)> {
    let (x, g, b) = (x.contiguous()?, grad.contiguous()?, b.contiguous()?);
    let n = b.elem_count();
    let total = x.elem_count();
    let (xs, xl) = x.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (xs, bs, gs) = (cuda_of(&xs, op)?, cuda_of(&bs, op)?, cuda_of(&gs, op)?);
    let dev = xs.device();
    let (ox, ob, og) = (start(xl, op)?, start(bl, op)?, start(gl, op)?);
    by_dtype!(x.dtype(), op, |T| {
        let dx = alloc::<T>(dev, total)?;
        kernel(
            dev,
            Module::Rows,
            &format!("vlp_bias_gelu_bwd_{}", T::SUFFIX),
        )?
        .run(
            elems_cfg(total),
            &[
                Arg::Ptr(ptr(dev, xs.as_cuda_slice::<T>()?, ox)),
                Arg::Ptr(ptr(dev, bs.as_cuda_slice::<T>()?, ob)),
                Arg::Ptr(ptr(dev, gs.as_cuda_slice::<T>()?, og)),
                Arg::Ptr(ptr(dev, &dx, 0)),
                Arg::U64(total as u64),
                Arg::I32(n as i32),
            ],
        )?;
        let db = col_sums::<T>(dev, &dx, 0, total / n, n)?;
        Ok((tensor(dx, dev, x.shape()), tensor(db, dev, b.shape())))
    })
}

/// LayerNorm forward; the row means and reciprocal standard deviations go to `stash`.
pub(crate) fn layer_norm_fwd(
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    eps: f64,
    stash: &Stash,
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device();
    let (n, total) = (last(x.1, op)?, x.1.shape().elem_count());
    if w.1.shape().elem_count() != n || b.1.shape().elem_count() != n {
        bail!("{op}: gain and bias must have {n} elements");
    }
    let rows = total / n;
    by_dtype!(x.0.dtype(), op, |T| {
        let (y, stats) = ln_stats::<T>(dev, x, w, b, eps, rows, n, op)?;
        put(stash, stats);
        Ok((wrap(y, dev), x.1.shape().clone()))
    })
}

type Stats = (CudaSlice<f32>, CudaSlice<f32>);

#[allow(clippy::too_many_arguments)]
fn ln_stats<T: Elem>(
    dev: &CudaDevice,
    x: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    eps: f64,
    rows: usize,
    n: usize,
    op: &str,
) -> Result<(CudaSlice<T>, Stats)> {
    let y = alloc::<T>(dev, rows * n)?;
    let mean = alloc::<f32>(dev, rows)?;
    let rstd = alloc::<f32>(dev, rows)?;
    kernel(dev, Module::Rows, &format!("vlp_ln_fwd_{}", T::SUFFIX))?.run(
        rows_cfg(rows, n),
        &[
            Arg::Ptr(ptr(dev, x.0.as_cuda_slice::<T>()?, start(x.1, op)?)),
            Arg::Ptr(ptr(dev, w.0.as_cuda_slice::<T>()?, start(w.1, op)?)),
            Arg::Ptr(ptr(dev, b.0.as_cuda_slice::<T>()?, start(b.1, op)?)),
            Arg::Ptr(ptr(dev, &y, 0)),
            Arg::Ptr(ptr(dev, &mean, 0)),
            Arg::Ptr(ptr(dev, &rstd, 0)),
            Arg::I32(n as i32),
            Arg::F32(eps as f32),
        ],
    )?;
    Ok((y, (mean, rstd)))
}

/// `(dx, dw, db)` of LayerNorm, with the statistics its forward stashed (recomputed when
/// the stash is empty, e.g. a second backward over the same graph).
pub(crate) fn layer_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    grad: &Tensor,
    eps: f64,
    stash: &Stash,
    op: &str,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (x, w, b, g) = (
        x.contiguous()?,
        w.contiguous()?,
        b.contiguous()?,
        grad.contiguous()?,
    );
    let n = w.elem_count();
    let total = x.elem_count();
    let rows = total / n.max(1);
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (xs, ws, bs, gs) = (
        cuda_of(&xs, op)?,
        cuda_of(&ws, op)?,
        cuda_of(&bs, op)?,
        cuda_of(&gs, op)?,
    );
    let dev = xs.device();
    by_dtype!(x.dtype(), op, |T| {
        let (mean, rstd) = match take::<Stats>(stash) {
            Some(s) => s,
            None => ln_stats::<T>(dev, (xs, xl), (ws, wl), (bs, bl), eps, rows, n, op)?.1,
        };
        let (ox, ow, og) = (start(xl, op)?, start(wl, op)?, start(gl, op)?);
        let dx = alloc::<T>(dev, total)?;
        kernel(dev, Module::Rows, &format!("vlp_ln_bwd_{}", T::SUFFIX))?.run(
            rows_cfg(rows, n),
            &[
                Arg::Ptr(ptr(dev, xs.as_cuda_slice::<T>()?, ox)),
                Arg::Ptr(ptr(dev, ws.as_cuda_slice::<T>()?, ow)),
                Arg::Ptr(ptr(dev, gs.as_cuda_slice::<T>()?, og)),
                Arg::Ptr(ptr(dev, &mean, 0)),
                Arg::Ptr(ptr(dev, &rstd, 0)),
                Arg::Ptr(ptr(dev, &dx, 0)),
                Arg::I32(n as i32),
            ],
        )?;
        let (parts, per) = partitions(rows);
        let pw = alloc::<f32>(dev, parts * n)?;
        let pb = alloc::<f32>(dev, parts * n)?;
        kernel(
            dev,
            Module::Rows,
            &format!("vlp_ln_param_partials_{}", T::SUFFIX),
        )?
        .run(
            LaunchConfig {
                grid_dim: (n.div_ceil(32) as u32, parts as u32, 1),
                block_dim: (32, 8, 1),
                shared_mem_bytes: 0,
            },
            &[
                Arg::Ptr(ptr(dev, gs.as_cuda_slice::<T>()?, og)),
                Arg::Ptr(ptr(dev, xs.as_cuda_slice::<T>()?, ox)),
                Arg::Ptr(ptr(dev, &mean, 0)),
                Arg::Ptr(ptr(dev, &rstd, 0)),
                Arg::Ptr(ptr(dev, &pw, 0)),
                Arg::Ptr(ptr(dev, &pb, 0)),
                Arg::I32(rows as i32),
                Arg::I32(n as i32),
                Arg::I32(per as i32),
            ],
        )?;
        let dw = finish_cols::<T>(dev, &pw, parts, n)?;
        let db = finish_cols::<T>(dev, &pb, parts, n)?;
        Ok((
            tensor(dx, dev, x.shape()),
            tensor(dw, dev, w.shape()),
            tensor(db, dev, b.shape()),
        ))
    })
}

/// In place: `t = m t + (1 - m) s`.
pub(crate) fn ema(
    t: &mut CudaStorage,
    lt: &Layout,
    s: &CudaStorage,
    ls: &Layout,
    m: f64,
    op: &str,
) -> Result<()> {
    if lt.shape() != ls.shape() {
        bail!("{op}: shapes {:?} and {:?} differ", lt.shape(), ls.shape());
    }
    let dev = t.device().clone();
    let total = lt.shape().elem_count();
    let (ot, os) = (start(lt, op)?, start(ls, op)?);
    by_dtype!(t.dtype(), op, |T| {
        let tp = ptr(&dev, t.as_cuda_slice::<T>()?, ot);
        kernel(&dev, Module::Rows, &format!("vlp_ema_{}", T::SUFFIX))?.run(
            elems_cfg(total),
            &[
                Arg::Ptr(tp),
                Arg::Ptr(ptr(&dev, s.as_cuda_slice::<T>()?, os)),
                Arg::U64(total as u64),
                Arg::F32(m as f32),
            ],
        )
    })
}

use super::AdamWStep;

/// One AdamW update of the f32 parameter `p` and its moments `m`, `v` in place from the
/// gradient `g`, in one launch. All four contiguous f32 CUDA tensors of one shape.
pub(crate) fn adamw(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, h: AdamWStep) -> Result<()> {
    let op = "vlp-adamw";
    let total = p.elem_count();
    for t in [m, v, g] {
        if t.dims() != p.dims() || t.dtype() != DType::F32 {
            bail!("{op}: moments and gradient must be f32 of the parameter's shape");
        }
    }
    let (ps, pl) = p.storage_and_layout();
    let (ms, ml) = m.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (ps, ms, vs, gs) = (
        cuda_of(&ps, op)?,
        cuda_of(&ms, op)?,
        cuda_of(&vs, op)?,
        cuda_of(&gs, op)?,
    );
    let dev = ps.device();
    kernel(dev, Module::Optim, "vlp_adamw_f32")?.run(
        elems_cfg(total),
        &[
            Arg::Ptr(ptr(dev, ps.as_cuda_slice::<f32>()?, start(pl, op)?)),
            Arg::Ptr(ptr(dev, ms.as_cuda_slice::<f32>()?, start(ml, op)?)),
            Arg::Ptr(ptr(dev, vs.as_cuda_slice::<f32>()?, start(vl, op)?)),
            Arg::Ptr(ptr(dev, gs.as_cuda_slice::<f32>()?, start(gl, op)?)),
            Arg::U64(total as u64),
            Arg::F32(h.beta1 as f32),
            Arg::F32(h.beta2 as f32),
            Arg::F32(h.inv_sqrt_bias2 as f32),
            Arg::F32(h.eps as f32),
            Arg::F32(h.step_size as f32),
            Arg::F32(h.decay as f32),
        ],
    )
}

// ---------------------------------------------------------------------------------------
// Attention

/// One `[B, L, C]` operand: its storage, where it starts and its batch and row strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    pub(crate) storage: &'a CudaStorage,
    pub(crate) offset: usize,
    pub(crate) batch_stride: usize,
    pub(crate) row_stride: usize,
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
pub(crate) struct AttnDims {
    pub(crate) batch: usize,
    pub(crate) heads: usize,
    pub(crate) d: usize,
    pub(crate) lq: usize,
    pub(crate) lk: usize,
}

/// What the attention's forward leaves for its backward.
struct AttnSaved {
    lse: CudaSlice<f32>,
}

/// The mask and dropout arguments every attention kernel takes.
fn mask_and_dropout(
    dev: &CudaDevice,
    mask: Option<&Tensor>,
    dm: AttnDims,
    dropout: Option<&DropoutMask>,
    op: &str,
) -> Result<(Vec<Arg>, Vec<Arg>)> {
    let mask_args = match mask {
        None => vec![Arg::Ptr(0), Arg::I64(0)],
        Some(m) => {
            let (ms, ml) = m.storage_and_layout();
            let ms = cuda_of(&ms, op)?;
            if ms.dtype() != DType::F32 {
                bail!("{op}: the mask must be f32");
            }
            let bs = if m.elem_count() == dm.lk {
                0
            } else if m.elem_count() == dm.batch * dm.lk {
                dm.lk
            } else {
                bail!(
                    "{op}: mask of {} values for batch {} x {} keys",
                    m.elem_count(),
                    dm.batch,
                    dm.lk
                );
            };
            vec![
                Arg::Ptr(ptr(dev, ms.as_cuda_slice::<f32>()?, start(ml, op)?)),
                Arg::I64(bs as i64),
            ]
        }
    };
    let drop_args = match dropout {
        None => vec![
            Arg::U32(0),
            Arg::U32(0),
            Arg::U64(0),
            Arg::F32(1.0),
            Arg::I32(0),
        ],
        Some(d) => {
            let (k0, k1, thr, scale) = d.parts();
            vec![
                Arg::U32(k0),
                Arg::U32(k1),
                Arg::U64(thr),
                Arg::F32(scale),
                Arg::I32(1),
            ]
        }
    };
    Ok((mask_args, drop_args))
}

fn operand_args<T: Elem>(dev: &CudaDevice, o: Operand) -> Result<[Arg; 3]> {
    Ok([
        Arg::Ptr(ptr(dev, o.storage.as_cuda_slice::<T>()?, o.offset)),
        Arg::I64(o.batch_stride as i64),
        Arg::I64(o.row_stride as i64),
    ])
}

fn grid(rows: usize, per_block: usize, dm: AttnDims) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            rows.div_ceil(per_block) as u32,
            dm.heads as u32,
            dm.batch as u32,
        ),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The attention forward: `[B, Lq, heads * d]` out; the log-sum-exp goes to `stash`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_fwd(
    q: Operand,
    k: Operand,
    v: Operand,
    dm: AttnDims,
    scale: f64,
    mask: Option<&Tensor>,
    dropout: Option<&DropoutMask>,
    stash: &Stash,
    op: &str,
) -> Result<(CudaStorage, Shape)> {
    let dev = q.storage.device();
    if !HEAD_DIMS.contains(&dm.d) {
        bail!("{op}: no CUDA kernel for head dimension {}", dm.d);
    }
    let c = dm.heads * dm.d;
    by_dtype!(q.storage.dtype(), op, |T| {
        let out = alloc::<T>(dev, dm.batch * dm.lq * c)?;
        let lse = alloc::<f32>(dev, dm.batch * dm.heads * dm.lq)?;
        let (mask_args, drop_args) = mask_and_dropout(dev, mask, dm, dropout, op)?;
        let mut args = Vec::new();
        args.extend(operand_args::<T>(dev, q)?);
        args.extend(operand_args::<T>(dev, k)?);
        args.extend(operand_args::<T>(dev, v)?);
        args.extend(mask_args);
        args.push(Arg::Ptr(ptr(dev, &out, 0)));
        args.push(Arg::Ptr(ptr(dev, &lse, 0)));
        args.extend([
            Arg::I32(dm.heads as i32),
            Arg::I32(dm.lq as i32),
            Arg::I32(dm.lk as i32),
            Arg::F32(scale as f32),
        ]);
        args.extend(drop_args);
        kernel(
            dev,
            Module::Attention,
            &format!("vlp_flash_fwd_{}_d{}", T::SUFFIX, dm.d),
        )?
        .run(grid(dm.lq, 64, dm), &args)?;
        put(stash, AttnSaved { lse });
        Ok((wrap(out, dev), Shape::from((dm.batch, dm.lq, c))))
    })
}

/// Where the backward writes one gradient: a buffer, the element it starts at, strides.
pub(crate) struct GradOut {
    pub(crate) offset: usize,
    pub(crate) batch_stride: usize,
    pub(crate) row_stride: usize,
}

/// The attention backward. `out` is the forward's result, `grad` its gradient; the three
/// gradients are written into one new buffer of `total` elements at the places `dq`,
/// `dk`, `dv` name (so packed projections get one packed gradient).
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_bwd(
    q: Operand,
    k: Operand,
    v: Operand,
    dm: AttnDims,
    scale: f64,
    mask: Option<&Tensor>,
    dropout: Option<&DropoutMask>,
    stash: &Stash,
    out: &Tensor,
    grad: &Tensor,
    total: usize,
    [dq, dk, dv]: [GradOut; 3],
    op: &str,
) -> Result<CudaStorage> {
    let dev = q.storage.device();
    let (o, g) = (out.contiguous()?, grad.contiguous()?);
    let (os, ol) = o.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (os, gs) = (cuda_of(&os, op)?, cuda_of(&gs, op)?);
    by_dtype!(q.storage.dtype(), op, |T| {
        let lse = match take::<AttnSaved>(stash) {
            Some(s) => s.lse,
            None => {
                let again: Stash = Mutex::new(None);
                attention_fwd(q, k, v, dm, scale, mask, dropout, &again, op)?;
                match take::<AttnSaved>(&again) {
                    Some(s) => s.lse,
                    None => bail!("{op}: the forward left no log-sum-exp"),
                }
            }
        };
        let rows = dm.batch * dm.heads * dm.lq;
        // `elems_cfg` caps the grid and the delta kernel has no stride loop.
        if rows > (1 << 16) * 256 {
            bail!("{op}: {rows} attention rows exceed one launch");
        }
        let delta = alloc::<f32>(dev, rows)?;
        let gp = ptr(dev, gs.as_cuda_slice::<T>()?, start(gl, op)?);
        kernel(
            dev,
            Module::Attention,
            &format!("vlp_flash_delta_{}", T::SUFFIX),
        )?
        .run(
            elems_cfg(rows),
            &[
                Arg::Ptr(ptr(dev, os.as_cuda_slice::<T>()?, start(ol, op)?)),
                Arg::Ptr(gp),
                Arg::Ptr(ptr(dev, &delta, 0)),
                Arg::I32(dm.batch as i32),
                Arg::I32(dm.heads as i32),
                Arg::I32(dm.lq as i32),
                Arg::I32(dm.d as i32),
            ],
        )?;
        let grads = alloc::<T>(dev, total)?;
        let base = ptr(dev, &grads, 0);
        let at = |g: &GradOut| {
            [
                Arg::Ptr(base + (g.offset * std::mem::size_of::<T>()) as u64),
                Arg::I64(g.batch_stride as i64),
                Arg::I64(g.row_stride as i64),
            ]
        };
        let common = |args: &mut Vec<Arg>| -> Result<()> {
            args.extend(operand_args::<T>(dev, q)?);
            args.extend(operand_args::<T>(dev, k)?);
            args.extend(operand_args::<T>(dev, v)?);
            let (mask_args, _) = mask_and_dropout(dev, mask, dm, dropout, op)?;
            args.extend(mask_args);
            args.push(Arg::Ptr(gp));
            args.push(Arg::Ptr(ptr(dev, &lse, 0)));
            args.push(Arg::Ptr(ptr(dev, &delta, 0)));
            Ok(())
        };
        let tail = |args: &mut Vec<Arg>| -> Result<()> {
            args.extend([
                Arg::I32(dm.heads as i32),
                Arg::I32(dm.lq as i32),
                Arg::I32(dm.lk as i32),
                Arg::F32(scale as f32),
            ]);
            let (_, drop_args) = mask_and_dropout(dev, None, dm, dropout, op)?;
            args.extend(drop_args);
            Ok(())
        };
        let mut args = Vec::new();
        common(&mut args)?;
        args.extend(at(&dk));
        args.extend(at(&dv));
        tail(&mut args)?;
        kernel(
            dev,
            Module::Attention,
            &format!("vlp_flash_bwd_kv_{}_d{}", T::SUFFIX, dm.d),
        )?
        .run(grid(dm.lk, 64, dm), &args)?;
        let mut args = Vec::new();
        common(&mut args)?;
        args.extend(at(&dq));
        tail(&mut args)?;
        kernel(
            dev,
            Module::Attention,
            &format!("vlp_flash_bwd_q_{}_d{}", T::SUFFIX, dm.d),
        )?
        .run(grid(dm.lq, 64, dm), &args)?;
        Ok(wrap(grads, dev))
    })
}

/// A tensor of `shape` around a backward's CUDA buffer.
pub(crate) fn grad_tensor(s: CudaStorage, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape, BackpropOp::none(), false)
}
