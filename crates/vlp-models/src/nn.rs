//! Trainable building blocks (ALBEF paper §3.1: the ViT and BERT layers are made of these).
//!
//! candle-nn's fused `LayerNorm`, `ops::softmax_last_dim` and `rms_norm` have no backward:
//! gradients silently stop at them. Everything here is written with candle ops that do
//! have one (matmul, broadcast arithmetic, `exp`, sums, `index_select`, `gelu_erf`), except
//! softmax, log-softmax and the LayerNorm normalisation, which on the CPU (f32/f64) run as
//! fused row-parallel kernels with hand-written backward passes (see `fused/`). Each
//! operation sits behind one function so models never see the difference; which
//! implementation runs is decided in one place per op, `dispatch.rs`. The generic
//! versions stay as the `*_reference` functions the kernels are tested against and the
//! fallback on other devices and dtypes. Devices and dtypes always come from the inputs.

use std::cell::RefCell;

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use vlp_core::rng::Rng;

use crate::dispatch::{self, Kernel};
use crate::fused;
use crate::fused::dropout::DropoutMask;

/// Initialisation of projection and embedding weights: N(0, 0.02), as BERT and ALBEF do
/// (timm truncates the normal at ±2σ; the difference does not matter for training).
pub const WEIGHT_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Mixed precision's one rule: a parameter (f32 master weights) meets an activation in
/// the activation's dtype. Where the model computes in bf16 (`run.dtype = "bf16"`), each
/// use casts the weight; the cast's backward brings the gradient back to f32, so
/// optimizers and checkpoints only ever see f32. A no-op when the dtypes agree.
pub fn as_compute(param: &Tensor, activation: &Tensor) -> Result<Tensor> {
    if param.dtype() == activation.dtype() {
        Ok(param.clone())
    } else {
        param.to_dtype(activation.dtype())
    }
}

/// `y = x W^T + b` over the last dimension: one fused op forward and backward on the CPU
/// for f32/f64 (see `fused/linear.rs`), candle's matmul and broadcast add elsewhere.
///
/// # Shapes
/// `x`: `[.., in]`, `weight`: `[out, in]`, `bias`: `[out]` -> `[.., out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let weight = &as_compute(weight, x)?;
    let bias = bias.map(|b| as_compute(b, x)).transpose()?;
    let bias = bias.as_ref();
    match dispatch::linear(x, weight, bias) {
        Kernel::Cpu => {
            let (x, w) = (x.contiguous()?, weight.contiguous()?);
            match bias {
                Some(b) => x.apply_op3(&w, &b.contiguous()?, fused::linear::LinearBias),
                None => x.apply_op2(&w, fused::linear::LinearNoBias),
            }
        }
        // On CUDA: cuBLAS through candle's matmul.
        Kernel::Cuda | Kernel::Generic => linear_reference(x, weight, bias),
    }
}

/// [`linear`] with candle ops: the reference the fused op is tested against, and the
/// fallback on other devices and dtypes.
fn linear_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let (out, inp) = weight.dims2()?;
    let rows = x.elem_count() / inp.max(1);
    // One 2-D matmul against the transposed view: gemm reads the transpose in place.
    let y = x.reshape((rows, inp))?.matmul(&weight.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    *out_dims
        .last_mut()
        .expect("linear input has at least one dim") = out;
    y.reshape(out_dims)
}

/// LayerNorm over the last dimension (biased variance, like PyTorch). Half-precision
/// inputs are normalised in f32.
///
/// On the CPU in f32/f64 the normalisation is one fused kernel with its own fused
/// backward; the affine gain and bias are broadcast ops. Elsewhere it falls back to the
/// generic version ([`layer_norm_reference`]).
///
/// # Shapes
/// `x`: `[.., n]`, `weight`, `bias`: `[n]` -> `[.., n]`.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let (weight, bias) = (&as_compute(weight, x)?, &as_compute(bias, x)?);
    match dispatch::layer_norm(x, weight, bias) {
        Kernel::Cpu | Kernel::Cuda => x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            fused::affine::LayerNormAffine::new(eps),
        ),
        Kernel::Generic => layer_norm_reference(x, weight, bias, eps),
    }
}

/// `x + b` with `b` broadcast over the leading dimensions of `x` (`b`'s shape, leading
/// ones aside, is the end of `x`'s): a bias, or position embeddings added to a batch.
/// Fused on the CPU for f32/f64 (the gradient of `b` is a parallel column sum), generic
/// elsewhere.
pub fn add_broadcast(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let b = &as_compute(b, x)?;
    match dispatch::broadcast_row(x, b) {
        Kernel::Cpu | Kernel::Cuda => x
            .contiguous()?
            .apply_op2(&b.contiguous()?, fused::affine::AddBroadcast),
        Kernel::Generic => x.broadcast_add(b),
    }
}

/// `gelu(x + b)` (erf form) with `b` broadcast like [`add_broadcast`]; one fused kernel
/// forward and backward on the CPU for f32/f64, generic elsewhere.
pub fn bias_gelu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    let b = &as_compute(b, x)?;
    match dispatch::broadcast_row(x, b) {
        Kernel::Cpu | Kernel::Cuda => x
            .contiguous()?
            .apply_op2(&b.contiguous()?, fused::affine::BiasGelu),
        Kernel::Generic => gelu(&x.broadcast_add(b)?),
    }
}

/// LayerNorm written out as mean and variance with generic candle ops: the reference the
/// fused kernel is tested against, and the fallback for other devices and dtypes.
fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centred = xf.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// Softmax over the last dimension: `exp(x - max) / sum`, fused on the CPU for f32/f64
/// (backward `y * (g - sum(g * y))`, also fused), generic elsewhere.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    match dispatch::softmax(x) {
        Kernel::Cpu | Kernel::Cuda => x.contiguous()?.apply_op1(fused::Softmax),
        Kernel::Generic => softmax_reference(x),
    }
}

/// Generic softmax. The max is detached: softmax does not depend on the shift, so its
/// gradient through the max is zero in exact arithmetic and not worth a backward pass.
fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    exp.broadcast_div(&sum)
}

/// Log-softmax over the last dimension: `x - max - log(sum(exp(x - max)))`, fused on the
/// CPU for f32/f64 (backward `g - exp(y) * sum(g)`, also fused), generic elsewhere.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    match dispatch::softmax(x) {
        Kernel::Cpu | Kernel::Cuda => x.contiguous()?.apply_op1(fused::LogSoftmax),
        Kernel::Generic => log_softmax_reference(x),
    }
}

/// Cross-entropy of each row of `logits` against soft `targets` (probabilities over the
/// last dimension): `sum_j t_j (logsumexp(x) - x_j)`. One fused op on the CPU (f32/f64)
/// and on CUDA (f32/bf16) that never materialises a log-softmax of the logits; generic
/// elsewhere.
///
/// # Shapes
/// `logits`, `targets`: `[.., C]` -> `[..]`.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    match dispatch::soft_cross_entropy(logits, targets) {
        Kernel::Cpu | Kernel::Cuda => logits
            .contiguous()?
            .apply_op2(&targets.contiguous()?, fused::xent::SoftCrossEntropy),
        Kernel::Generic => soft_cross_entropy_reference(logits, targets),
    }
}

/// Generic soft-target cross-entropy per row.
fn soft_cross_entropy_reference(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    (log_softmax_reference(logits)? * targets)?
        .sum(D::Minus1)?
        .neg()
}

/// Generic log-softmax.
fn log_softmax_reference(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// GELU, erf form (BERT's and timm's `nn.GELU()`).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// Inverted dropout with drop probability `p`: kept values are scaled by `1 / (1 - p)`.
/// `p = 0` returns the input unchanged.
///
/// Each call draws one seed (see [`seed_dropout`]); element `i` is kept when a hash of
/// the seed and `i` clears the threshold ([`DropoutMask`]), so the mask is never stored:
/// on the CPU (f32/f64) the forward and backward are one parallel pass each that
/// recompute it; elsewhere the mask is built on the input's device and multiplied in.
pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return x.zeros_like();
    }
    let mask = draw_dropout_mask(p);
    match dispatch::dropout(x) {
        Kernel::Cpu | Kernel::Cuda => x.contiguous()?.apply_op1(fused::dropout::Dropout(mask)),
        Kernel::Generic => {
            let keep = Tensor::from_vec(mask.values(x.elem_count()), x.shape(), x.device())?
                .to_dtype(x.dtype())?;
            x.mul(&keep)
        }
    }
}

/// The mask of one dropout call with a fresh seed: the next draw of this thread's seeded
/// generator (see [`seed_dropout`]), or a random one when dropout is unseeded.
pub(crate) fn draw_dropout_mask(p: f64) -> DropoutMask {
    let seed = DROPOUT_RNG
        .with(|r| r.borrow_mut().as_mut().map(|rng| rng.next_u64()))
        .unwrap_or_else(random_seed);
    DropoutMask::new(seed, p)
}

/// A seed for unseeded dropout: the standard library's per-process random hash keys
/// over a counter.
fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    std::collections::hash_map::RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

thread_local! {
    /// The generator of [`dropout`]'s masks on this thread, when seeded.
    static DROPOUT_RNG: RefCell<Option<Rng>> = const { RefCell::new(None) };
}

/// Makes every [`dropout`] (and attention dropout) on the current thread take its mask
/// seed from `Rng::new(seed)`, one draw per call in call order, until the returned guard
/// is dropped (the previous state comes back then), so a training step repeats exactly
/// on any device. Unseeded, masks are random. Thread-local, so concurrent steps (or
/// tests) do not share a stream.
pub fn seed_dropout(seed: u64) -> DropoutSeedGuard {
    let previous = DROPOUT_RNG.with(|r| r.borrow_mut().replace(Rng::new(seed)));
    DropoutSeedGuard { previous }
}

/// This thread's dropout generator as it stands (`None`: unseeded).
pub(crate) fn dropout_state() -> Option<Rng> {
    DROPOUT_RNG.with(|r| r.borrow().clone())
}

/// Puts `state` in place of this thread's dropout generator until the guard drops: a
/// recomputation then draws the very masks the first computation drew.
pub(crate) fn replay_dropout(state: Option<Rng>) -> DropoutSeedGuard {
    let previous = DROPOUT_RNG.with(|r| std::mem::replace(&mut *r.borrow_mut(), state));
    DropoutSeedGuard { previous }
}

/// Restores the dropout generator that was in effect before [`seed_dropout`].
#[derive(Debug)]
#[must_use = "dropout stays seeded only while the guard lives"]
pub struct DropoutSeedGuard {
    previous: Option<Rng>,
}

impl Drop for DropoutSeedGuard {
    fn drop(&mut self) {
        let previous = self.previous.take();
        DROPOUT_RNG.with(|r| *r.borrow_mut() = previous);
    }
}

/// `target = m * target + (1 - m) * source`, in place: one fused pass on the CPU for
/// f32/f64, candle ops and [`Var::set`] elsewhere.
pub fn ema_update(target: &candle_core::Var, source: &Tensor, m: f64) -> Result<()> {
    let t = target.as_tensor();
    match dispatch::ema(t, source) {
        Kernel::Cpu | Kernel::Cuda => t.inplace_op2(source, &fused::affine::Ema { m }),
        Kernel::Generic => {
            let blended = (t.detach().affine(m, 0.0)? + source.detach().affine(1.0 - m, 0.0)?)?;
            target.set(&blended)
        }
    }
}

/// AdamW's per-step constants for [`adamw_update`].
pub use crate::fused::AdamWStep;

/// One AdamW step of `p` (f32 master weights) and its moments `m`, `v` from the gradient
/// `g`, in place, as one CUDA launch. Returns `false`, touching nothing, where that
/// kernel does not apply (the CPU, other dtypes, non-contiguous tensors): the caller
/// then runs its own update.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn adamw_update(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, h: AdamWStep) -> Result<bool> {
    match dispatch::adamw(p, m, v, g) {
        #[cfg(feature = "cuda")]
        Kernel::Cuda => fused::cuda::adamw(p, m, v, g, h).map(|()| true),
        _ => Ok(false),
    }
}

/// Divides each row by its L2 norm (at least 1e-12, like `F.normalize`).
///
/// # Shapes
/// `x`: `[.., n]` -> `[.., n]`.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
    x.broadcast_div(&norm)
}

/// A linear layer, weight `[out, in]` (PyTorch's layout), optional bias `[out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// Loads (or creates) `weight` and, if `bias`, `bias` under `vb`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", WEIGHT_INIT)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// # Shapes
    /// `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, self.bias.as_ref())
    }

    /// `gelu(self.forward(x))`, with the bias and the GELU as one fused step.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => bias_gelu(&linear(x, &self.weight, None)?, b),
            None => gelu(&linear(x, &self.weight, None)?),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Linear::forward(self, x)
    }
}

/// LayerNorm with a gain (`weight`) and a bias, epsilon from the config.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    /// Loads (or creates: ones, zeros) `weight` and `bias` under `vb`.
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    /// # Shapes
    /// `[.., dim]` -> `[.., dim]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// A lookup table, `weight` `[rows, dim]`.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    pub fn new(weight: Tensor) -> Self {
        Self { weight }
    }

    /// Loads (or creates) `weight` under `vb`.
    pub fn load(vb: VarBuilder, rows: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((rows, dim), "weight", WEIGHT_INIT)?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// # Shapes
    /// `ids`: any shape of u8/u32/i64 -> `[..ids, dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let dim = self.weight.dim(1)?;
        let mut dims = ids.dims().to_vec();
        dims.push(dim);
        self.weight
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(dims)
    }
}

/// Dropout with a fixed probability; whether it acts is the caller's `train` flag.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    p: f64,
}

impl Dropout {
    pub fn new(p: f64) -> Self {
        Self { p }
    }

    /// The probability in effect: `p` when training, 0 otherwise.
    pub fn active_p(&self, train: bool) -> f64 {
        if train {
            self.p
        } else {
            0.0
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        dropout(x, self.active_p(train))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "index {i}: {x} vs {y}");
        }
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> Result<f64> {
        let scale = b
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok(max_abs(a, b)? / scale.max(1e-30))
    }

    type Op = fn(&Tensor) -> Result<Tensor>;

    /// Fused vs generic forward and input gradient under a random upstream gradient.
    fn check_unary(fused: Op, reference: Op, dtype: DType, fwd_tol: f64) -> Result<()> {
        let dev = Device::Cpu;
        for shape in [&[3usize, 5, 7][..], &[64, 33], &[1, 1]] {
            let x = Var::from_tensor(
                &(Tensor::randn(0f64, 3.0, shape, &dev)? + 5.0)?.to_dtype(dtype)?,
            )?;
            let r = Tensor::randn(0f64, 1.0, shape, &dev)?.to_dtype(dtype)?;
            let (yf, yr) = (fused(&x)?, reference(&x)?);
            let d = max_abs(&yf, &yr)?;
            assert!(d <= fwd_tol, "forward {shape:?}: {d}");
            let gf = (&yf * &r)?.sum_all()?.backward()?;
            let gr = (&yr * &r)?.sum_all()?.backward()?;
            let (gf, gr) = (
                gf.get(&x).expect("fused grad"),
                gr.get(&x).expect("ref grad"),
            );
            let d = max_rel(gf, gr)?;
            assert!(d <= 1e-5, "grad {shape:?}: {d}");
        }
        Ok(())
    }

    #[test]
    fn fused_softmax_matches_reference() -> Result<()> {
        check_unary(softmax, softmax_reference, DType::F32, 1e-6)?;
        check_unary(softmax, softmax_reference, DType::F64, 1e-12)
    }

    #[test]
    fn fused_log_softmax_matches_reference() -> Result<()> {
        check_unary(log_softmax, log_softmax_reference, DType::F32, 1e-5)?;
        check_unary(log_softmax, log_softmax_reference, DType::F64, 1e-12)
    }

    #[test]
    fn fused_soft_cross_entropy_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            // ITC-like rows over a queue, a vocabulary-wide row, a one-column row.
            for (rows, n) in [(6usize, 40usize), (2, 3000), (3, 1)] {
                let x = Var::from_tensor(
                    &(Tensor::randn(0f64, 3.0, (rows, n), &dev)?).to_dtype(dtype)?,
                )?;
                // Targets as the objectives make them (rows summing to 1) and, scaled by
                // 0.7, rows that do not: the loss and gradient hold for any weights.
                let t = softmax_reference(&Tensor::randn(0f64, 2.0, (rows, n), &dev)?)?;
                let t = Var::from_tensor(&(t * 0.7)?.to_dtype(dtype)?)?;
                let r = Tensor::randn(0f64, 1.0, rows, &dev)?.to_dtype(dtype)?;
                let yf = soft_cross_entropy(&x, &t)?;
                let yr = soft_cross_entropy_reference(&x, &t)?;
                assert_eq!(yf.dims(), [rows]);
                let d = max_rel(&yf, &yr)?;
                assert!(d <= tol, "forward {dtype:?} {rows}x{n}: {d}");
                let gf = (&yf * &r)?.sum_all()?.backward()?;
                let gr = (&yr * &r)?.sum_all()?.backward()?;
                for (name, v) in [("logits", &x), ("targets", &t)] {
                    let (a, e) = (gf.get(v).expect("fused grad"), gr.get(v).expect("ref grad"));
                    let d = max_rel(a, e)?;
                    assert!(d <= 10.0 * tol, "{name} grad {dtype:?} {rows}x{n}: {d}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fused_layer_norm_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, fwd_tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            for (rows, n) in [(4usize, 8usize), (50, 96), (3, 1)] {
                let rand = |s: (usize, usize), m: f64| -> Result<Tensor> {
                    (Tensor::randn(0f64, 2.0, s, &dev)? + m)?.to_dtype(dtype)
                };
                let x = Var::from_tensor(&rand((rows, n), 3.0)?)?;
                let w = Var::from_tensor(&rand((1, n), 1.0)?.squeeze(0)?)?;
                let b = Var::from_tensor(&rand((1, n), 0.0)?.squeeze(0)?)?;
                let r = rand((rows, n), 0.0)?;
                let yf = layer_norm(&x, &w, &b, 1e-5)?;
                let yr = layer_norm_reference(&x, &w, &b, 1e-5)?;
                let d = max_abs(&yf, &yr)?;
                assert!(d <= fwd_tol, "forward {dtype:?} {rows}x{n}: {d}");
                let gf = (&yf * &r)?.sum_all()?.backward()?;
                let gr = (&yr * &r)?.sum_all()?.backward()?;
                for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
                    let (a, e) = (gf.get(v).expect("fused grad"), gr.get(v).expect("ref grad"));
                    let d = max_rel(a, e)?;
                    let tol = if dtype == DType::F32 { 1e-5 } else { 1e-10 };
                    assert!(d <= tol, "grad {name} {dtype:?} {rows}x{n}: {d}");
                }
            }
        }
        Ok(())
    }

    /// Fused `op(x, b)` vs `reference(x, b)`: forward and both gradients, for a bias
    /// (`[n]` under `[rows, n]`) and a position table (`[1, L, n]` under `[B, L, n]`).
    fn check_broadcast(
        fused: fn(&Tensor, &Tensor) -> Result<Tensor>,
        reference: fn(&Tensor, &Tensor) -> Result<Tensor>,
        f64_grad_tol: f64,
    ) -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, fwd_tol, grad_tol) in
            [(DType::F32, 1e-6, 1e-5), (DType::F64, 1e-12, f64_grad_tol)]
        {
            let cases: [(&[usize], &[usize]); 4] = [
                (&[70, 24], &[24]),
                (&[5, 7, 16], &[1, 7, 16]),
                (&[3, 4, 6], &[1, 6]),
                (&[1, 1], &[1]),
            ];
            for (xs, bs) in cases {
                let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, xs, &dev)?.to_dtype(dtype)?)?;
                let b = Var::from_tensor(&Tensor::randn(0f64, 1.0, bs, &dev)?.to_dtype(dtype)?)?;
                let r = Tensor::randn(0f64, 1.0, xs, &dev)?.to_dtype(dtype)?;
                let (yf, yr) = (fused(&x, &b)?, reference(&x, &b)?);
                let d = max_abs(&yf, &yr)?;
                assert!(d <= fwd_tol, "forward {dtype:?} {xs:?}+{bs:?}: {d}");
                let gf = (&yf * &r)?.sum_all()?.backward()?;
                let gr = (&yr * &r)?.sum_all()?.backward()?;
                for (name, v) in [("x", &x), ("b", &b)] {
                    let (a, e) = (gf.get(v).expect("fused grad"), gr.get(v).expect("ref grad"));
                    assert_eq!(a.dims(), e.dims(), "grad {name} shape");
                    // Relative to the gradient's scale, but at least 1: a single gradient
                    // near a zero of gelu' has no meaningful relative error.
                    let scale = e
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_dtype(DType::F64)?
                        .to_scalar::<f64>()?;
                    let d = max_abs(a, e)? / scale.max(1.0);
                    assert!(d <= grad_tol, "grad {name} {dtype:?} {xs:?}+{bs:?}: {d}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn fused_linear_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, fwd_tol, grad_tol) in [(DType::F32, 1e-5, 1e-5), (DType::F64, 1e-12, 1e-11)] {
            // Small (one thread) and large enough for the threaded products.
            for (xs, out) in [
                (&[3usize, 5, 7][..], 4usize),
                (&[6, 50, 64], 48),
                (&[1, 1], 1),
            ] {
                let inp = xs[xs.len() - 1];
                let rand = |s: &[usize]| -> Result<Var> {
                    Var::from_tensor(&Tensor::randn(0f64, 1.0, s, &dev)?.to_dtype(dtype)?)
                };
                let (x, w, b) = (rand(xs)?, rand(&[out, inp])?, rand(&[out])?);
                let mut ys = xs.to_vec();
                *ys.last_mut().expect("dims") = out;
                let r = Tensor::randn(0f64, 1.0, ys, &dev)?.to_dtype(dtype)?;
                for bias in [Some(b.as_tensor()), None] {
                    let yf = linear(&x, &w, bias)?;
                    let yr = linear_reference(&x, &w, bias)?;
                    assert_eq!(yf.dims(), yr.dims());
                    let d = max_abs(&yf, &yr)?;
                    assert!(d <= fwd_tol, "forward {dtype:?} {xs:?}: {d}");
                    let gf = (&yf * &r)?.sum_all()?.backward()?;
                    let gr = (&yr * &r)?.sum_all()?.backward()?;
                    let vars = if bias.is_some() {
                        vec![&x, &w, &b]
                    } else {
                        vec![&x, &w]
                    };
                    for v in vars {
                        let (a, e) = (gf.get(v).expect("fused grad"), gr.get(v).expect("ref grad"));
                        assert_eq!(a.dims(), e.dims());
                        let d = max_rel(a, e)?;
                        assert!(
                            d <= grad_tol,
                            "grad {dtype:?} {xs:?} bias {}: {d}",
                            bias.is_some()
                        );
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn ema_update_blends_in_place() -> Result<()> {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64] {
            let t = Var::from_tensor(&Tensor::randn(0f64, 1.0, (40, 30), &dev)?.to_dtype(dtype)?)?;
            let s = Tensor::randn(0f64, 1.0, (40, 30), &dev)?.to_dtype(dtype)?;
            let expected = ((t.as_tensor() * 0.9)? + (&s * 0.1)?)?;
            let alias = t.as_tensor().clone();
            ema_update(&t, &s, 0.9)?;
            assert!(max_abs(t.as_tensor(), &expected)? <= 1e-6);
            // In place: every handle on the parameter sees the new values.
            assert!(max_abs(&alias, &expected)? <= 1e-6);
        }
        Ok(())
    }

    #[test]
    fn fused_linear_on_an_input_without_gradient_still_trains_its_weights() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (40, 16), &dev)?; // like image patches
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 16), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 8, &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (40, 8), &dev)?;
        let gf = (linear(&x, &w, Some(&b))? * &r)?.sum_all()?.backward()?;
        let gr = (linear_reference(&x, &w, Some(&b))? * &r)?
            .sum_all()?
            .backward()?;
        assert!(gf.get(&x).is_none());
        for v in [&w, &b] {
            let d = max_rel(gf.get(v).expect("fused grad"), gr.get(v).expect("ref grad"))?;
            assert!(d <= 1e-5, "{d}");
        }
        Ok(())
    }

    #[test]
    fn fused_broadcast_add_matches_reference() -> Result<()> {
        check_broadcast(add_broadcast, |x, b| x.broadcast_add(b), 1e-10)
    }

    #[test]
    fn fused_bias_gelu_matches_reference() -> Result<()> {
        // candle's own erf (in its GELU backward) is good to ~1e-6 relative; the fused
        // kernel uses libm's and is checked against finite differences below.
        check_broadcast(bias_gelu, |x, b| x.broadcast_add(b)?.gelu_erf(), 1e-5)?;
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (9, 5), &dev)?)?;
        let b = Tensor::randn(0f64, 1.0, 5, &dev)?;
        let r = Tensor::randn(0f64, 1.0, (9, 5), &dev)?;
        let f = |x: &Tensor| -> Result<f64> { (bias_gelu(x, &b)? * &r)?.sum_all()?.to_scalar() };
        let grads = (bias_gelu(&x, &b)? * &r)?.sum_all()?.backward()?;
        let g = grads
            .get(&x)
            .expect("grad")
            .flatten_all()?
            .to_vec1::<f64>()?;
        let h = 1e-6;
        for i in [0usize, 7, 23, 44] {
            let mut e = vec![0f64; 45];
            e[i] = h;
            let e = Tensor::from_vec(e, (9, 5), &dev)?;
            let fd = (f(&(x.as_tensor() + &e)?)? - f(&(x.as_tensor() - &e)?)?) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() <= 1e-8 * (1.0 + fd.abs()),
                "{i}: fd {fd} vs {}",
                g[i]
            );
        }
        Ok(())
    }

    #[test]
    fn broadcast_add_rejects_a_shape_that_does_not_broadcast() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let b = Tensor::zeros(2, DType::F32, &dev).unwrap();
        let err = add_broadcast(&x, &b).unwrap_err().to_string();
        assert!(err.contains("does not broadcast"), "{err}");
    }

    #[test]
    fn fused_kernels_accept_non_contiguous_input() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (6, 4, 5), &dev)?.transpose(1, 2)?;
        assert!(!x.is_contiguous());
        let d = max_abs(&softmax(&x)?, &softmax_reference(&x)?)?;
        assert!(d <= 1e-6, "{d}");
        let d = max_abs(&log_softmax(&x)?, &log_softmax_reference(&x)?)?;
        assert!(d <= 1e-5, "{d}");
        let w = Tensor::randn(0f32, 1.0, 4, &dev)?;
        let b = Tensor::randn(0f32, 1.0, 4, &dev)?;
        let d = max_abs(
            &layer_norm(&x, &w, &b, 1e-6)?,
            &layer_norm_reference(&x, &w, &b, 1e-6)?,
        )?;
        assert!(d <= 1e-5, "{d}");
        // The gradient flows back through the transpose too.
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 5, 4), &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (6, 4, 5), &dev)?;
        let gf = (softmax(&v.transpose(1, 2)?)? * &r)?
            .sum_all()?
            .backward()?;
        let gr = (softmax_reference(&v.transpose(1, 2)?)? * &r)?
            .sum_all()?
            .backward()?;
        let d = max_rel(gf.get(&v).expect("grad"), gr.get(&v).expect("grad"))?;
        assert!(d <= 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn half_precision_falls_back_to_generic_softmax() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 3), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let d = max_abs(&softmax(&x)?, &softmax_reference(&x)?)?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn layer_norm_matches_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f64, 2.0, 4.0], [-3.0, 0.0, 3.0]], &dev)?;
        let w = Tensor::new(&[1.0f64, 2.0, 0.5], &dev)?;
        let b = Tensor::new(&[0.0f64, 1.0, -1.0], &dev)?;
        let y = layer_norm(&x, &w, &b, 1e-5)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let mut expect = Vec::new();
        for row in [[1.0f64, 2.0, 4.0], [-3.0, 0.0, 3.0]] {
            let mean = row.iter().sum::<f64>() / 3.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0;
            for (j, v) in row.iter().enumerate() {
                let n = (v - mean) / (var + 1e-5).sqrt();
                expect.push(n * [1.0, 2.0, 0.5][j] + [0.0, 1.0, -1.0][j]);
            }
        }
        close(&y, &expect, 1e-12);
        Ok(())
    }

    #[test]
    fn layer_norm_passes_gradients_to_input_gain_and_bias() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (4, 8), &dev)?;
        let w = Var::ones(8, DType::F32, &dev)?;
        let b = Var::zeros(8, DType::F32, &dev)?;
        let y = layer_norm(&x, &w, &b, 1e-6)?;
        let probe = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
        let grads = (y * probe)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("w", &w), ("b", &b)] {
            let g = grads.get(v).unwrap_or_else(|| panic!("no grad for {name}"));
            let l1 = g.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(l1 > 0.0 && l1.is_finite(), "{name}: {l1}");
        }
        Ok(())
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_fused_forward() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 3.0, (3, 5, 7), &dev)? + 50.0)?;
        let ours = softmax(&x)?;
        let sums = ours.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
        for s in sums {
            assert!((s - 1.0).abs() < 1e-5, "{s}");
        }
        let fused = candle_nn::ops::softmax_last_dim(&x)?;
        let diff = (ours - fused)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        let log = log_softmax(&x)?.exp()?;
        let diff = (log - softmax(&x)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    #[test]
    fn softmax_has_a_backward() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f64, 1.0, (2, 6), &dev)?;
        let probe = Tensor::randn(0f64, 1.0, (2, 6), &dev)?;
        let grads = (softmax(&x)? * &probe)?.sum_all()?.backward()?;
        let g = grads.get(&x).expect("softmax input gets a gradient");
        // d/dx_j sum_i p_i c_i = p_j (c_j - sum_i p_i c_i)
        let p = softmax(&x)?;
        let mean = (&p * &probe)?.sum_keepdim(1)?;
        let expect = (&p * probe.broadcast_sub(&mean)?)?;
        let diff = (g - expect)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        Ok(())
    }

    #[test]
    fn dropout_is_identity_in_eval_and_scales_in_train() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::ones((200, 100), DType::F32, &dev)?;
        let d = Dropout::new(0.25);
        let eval = d.forward(&x, false)?;
        assert_eq!(
            eval.flatten_all()?.to_vec1::<f32>()?,
            x.flatten_all()?.to_vec1::<f32>()?
        );
        let y = d.forward(&x, true)?.flatten_all()?.to_vec1::<f32>()?;
        let kept: Vec<f32> = y.iter().copied().filter(|v| *v != 0.0).collect();
        for v in &kept {
            assert!((v - 1.0 / 0.75).abs() < 1e-6, "{v}");
        }
        let frac = kept.len() as f64 / y.len() as f64;
        assert!((frac - 0.75).abs() < 0.02, "kept fraction {frac}");
        Ok(())
    }

    #[test]
    fn seeded_dropout_repeats_and_the_guard_restores_candles_generator() -> Result<()> {
        let x = Tensor::ones((50, 40), DType::F32, &Device::Cpu)?;
        let draw = |seed: u64| -> Result<Vec<f32>> {
            let _seeded = seed_dropout(seed);
            let a = dropout(&x, 0.3)?.flatten_all()?.to_vec1::<f32>()?;
            let b = dropout(&x, 0.3)?.flatten_all()?.to_vec1::<f32>()?;
            Ok([a, b].concat())
        };
        let first = draw(7)?;
        assert_eq!(first, draw(7)?);
        assert_ne!(first, draw(8)?);
        // The two masks of one seeded stream differ, and keep about 70%.
        let (a, b) = first.split_at(x.elem_count());
        assert_ne!(a, b);
        let kept = a.iter().filter(|v| **v != 0.0).count() as f64 / a.len() as f64;
        assert!((kept - 0.7).abs() < 0.05, "{kept}");
        assert!(DROPOUT_RNG.with(|r| r.borrow().is_none()));
        Ok(())
    }

    #[test]
    fn fused_dropout_matches_the_mask_and_its_gradient_is_the_mask() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (70, 300), &dev)?)?;
        let r = Tensor::randn(0f32, 1.0, (70, 300), &dev)?;
        let (y, mask) = {
            let _seeded = seed_dropout(3);
            let y = dropout(&x, 0.2)?;
            let _again = seed_dropout(3);
            (y, draw_dropout_mask(0.2))
        };
        let keep = Tensor::from_vec(mask.values(x.elem_count()), (70, 300), &dev)?;
        assert!(max_abs(&y, &(x.as_tensor() * &keep)?)? == 0.0);
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let g = grads.get(&x).expect("grad");
        assert!(max_abs(g, &(&r * &keep)?)? == 0.0);
        // The mask spans parallel chunks: the kept fraction holds throughout.
        let kept = keep
            .ne(0f32)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        assert!((kept - 0.8).abs() < 0.01, "{kept}");
        Ok(())
    }

    #[test]
    fn linear_and_embedding_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1.0f32, 0.0, 2.0], [0.0, 1.0, -1.0]], &dev)?;
        let b = Tensor::new(&[0.5f32, 0.0], &dev)?;
        let lin = Linear::new(w, Some(b));
        let x = Tensor::new(&[[[1.0f32, 2.0, 3.0]], [[0.0, 0.0, 1.0]]], &dev)?;
        let y = lin.forward(&x)?;
        assert_eq!(y.dims(), &[2, 1, 2]);
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            vec![7.5, -1.0, 2.5, -1.0]
        );
        let table = Tensor::new(&[[0.0f32, 1.0], [2.0, 3.0], [4.0, 5.0]], &dev)?;
        let emb = Embedding::new(table);
        let ids = Tensor::new(&[[2u32, 0], [1, 1]], &dev)?;
        let e = emb.forward(&ids)?;
        assert_eq!(e.dims(), &[2, 2, 2]);
        assert_eq!(
            e.flatten_all()?.to_vec1::<f32>()?,
            vec![4.0, 5.0, 0.0, 1.0, 2.0, 3.0, 2.0, 3.0]
        );
        Ok(())
    }

    #[test]
    fn l2_normalize_rows() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[3.0f64, 4.0], [0.0, 0.0]], &dev)?;
        let y = l2_normalize(&x)?.flatten_all()?.to_vec1::<f64>()?;
        close(&y, &[0.6, 0.8, 0.0, 0.0], 1e-12);
        Ok(())
    }
}
