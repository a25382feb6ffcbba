//! Which implementation runs each op: the one place per op that decides between our
//! fused kernels (`fused/`) and the generic candle composition (the `*_reference`
//! functions in `nn.rs`, `generic_attention` in `attention.rs`).
//!
//! The functions here only look at devices, dtypes and shapes; they never compute. The
//! generic composition is always correct (every candle device, every dtype) and is what
//! each kernel is tested against, so a kernel is chosen only where it certainly applies.

use candle_core::{DType, Tensor};

use crate::attention::AttentionBackend;

/// The implementation chosen for one call of an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Our fused CPU kernel (rayon; f32/f64), with its hand-written backward.
    Cpu,
    /// Our CUDA kernels (`vlp-kernels`, launched from `fused/cuda.rs`; f32/bf16). Only
    /// chosen in builds with the `cuda` feature.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Cuda,
    /// The generic candle composition: any device, any dtype.
    Generic,
}

/// Whether `t` is data our CUDA kernels take: a non-empty f32/bf16 CUDA tensor.
#[cfg(feature = "cuda")]
fn cuda_float(t: &Tensor) -> bool {
    t.device().is_cuda() && crate::fused::cuda::supported(t.dtype()) && t.elem_count() > 0
}

#[cfg(not(feature = "cuda"))]
fn cuda_float(_: &Tensor) -> bool {
    false
}

/// `t` is a CUDA tensor of `like`'s dtype on `like`'s device.
fn cuda_same(t: &Tensor, like: &Tensor) -> bool {
    t.device().same_device(like.device()) && t.dtype() == like.dtype()
}

/// Whether `t` is data our CPU kernels take: f32/f64 in host memory.
fn cpu_float(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// `t` is a CPU tensor of `like`'s dtype (a weight, bias or second operand).
fn cpu_same_dtype(t: &Tensor, like: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == like.dtype()
}

/// The kernels that work row by row over the last dimension need one.
fn cpu_rows(x: &Tensor) -> bool {
    cpu_float(x) && x.rank() >= 1
}

/// `nn::linear`: `x W^T + b`.
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Kernel {
    let operands = cpu_same_dtype(weight, x) && bias.is_none_or(|b| cpu_same_dtype(b, x));
    pick(cpu_rows(x) && operands)
}

/// `nn::layer_norm`. Half-precision inputs go generic: they are normalised in f32 there.
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Kernel {
    let cuda = cuda_float(x) && cuda_same(weight, x) && cuda_same(bias, x);
    pick2(
        cpu_rows(x) && cpu_same_dtype(weight, x) && cpu_same_dtype(bias, x),
        cuda,
    )
}

/// `nn::add_broadcast` and `nn::bias_gelu`: `x` and a broadcast row `b`.
pub(crate) fn broadcast_row(x: &Tensor, b: &Tensor) -> Kernel {
    pick2(
        cpu_rows(x) && cpu_same_dtype(b, x),
        cuda_float(x) && cuda_same(b, x) && b.elem_count() > 0,
    )
}

/// `nn::softmax` and `nn::log_softmax` over the last dimension.
pub(crate) fn softmax(x: &Tensor) -> Kernel {
    pick2(cpu_rows(x), cuda_float(x) && x.rank() >= 1)
}

/// `nn::soft_cross_entropy`: logits and targets of one shape and dtype.
pub(crate) fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Kernel {
    let shapes = logits.dims() == targets.dims();
    pick2(
        cpu_rows(logits) && cpu_same_dtype(targets, logits) && shapes,
        cuda_float(logits) && cuda_same(targets, logits) && logits.rank() >= 1 && shapes,
    )
}

/// `nn::dropout` (the mask is recomputed from its seed either way).
pub(crate) fn dropout(x: &Tensor) -> Kernel {
    pick2(cpu_rows(x), cuda_float(x))
}

/// `nn::ema_update`: the kernels write the target's storage in place, so both must be
/// contiguous.
pub(crate) fn ema(target: &Tensor, source: &Tensor) -> Kernel {
    let contiguous = target.is_contiguous() && source.is_contiguous();
    pick2(
        cpu_float(target) && cpu_same_dtype(source, target) && contiguous,
        cuda_float(target) && cuda_same(source, target) && contiguous,
    )
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
/// `nn::adamw_update`: the one-launch CUDA AdamW for contiguous f32 CUDA tensors (the
/// CPU's in-place kernels are chosen in `vlp-train`'s optimizer).
pub(crate) fn adamw(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> Kernel {
    let f32_cuda = |t: &Tensor| {
        cuda_float(t) && t.dtype() == DType::F32 && t.is_contiguous() && t.dims() == p.dims()
    };
    if f32_cuda(p) && f32_cuda(m) && f32_cuda(v) && f32_cuda(g) {
        Kernel::Cuda
    } else {
        Kernel::Generic
    }
}

/// Multi-head attention on `[B, L, heads * d]` projections (`attention.rs`): the fused
/// kernel when asked for and it applies (no dropout of everything, a per-key mask
/// `[B or 1, 1, 1, Lk]`), the generic composition otherwise.
pub(crate) fn attention(
    backend: AttentionBackend,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    dropout_p: f64,
) -> Kernel {
    if backend == AttentionBackend::Generic {
        return Kernel::Generic;
    }
    let operand = |t: &Tensor| cpu_same_dtype(t, q) && t.rank() == 3;
    let shapes = match (q.dims(), k.dims()) {
        (&[b, _, _], &[_, lk, _]) => mask.is_none_or(|m| {
            let dims = m.dims();
            dims.len() == 4 && (dims[0] == b || dims[0] == 1) && dims[1..] == [1, 1, lk]
        }),
        _ => false,
    };
    let common = heads > 0 && dropout_p < 1.0 && shapes;
    let on_cuda = cuda_float(q)
        && [k, v].iter().all(|t| cuda_same(t, q) && t.rank() == 3)
        && mask.is_none_or(|m| m.device().same_device(q.device()))
        && k.dim(1).is_ok_and(|lk| lk > 0)
        && heads > 0
        && q.dim(2)
            .is_ok_and(|c| c % heads == 0 && cuda_head_dim(c / heads));
    pick2(
        cpu_float(q)
            && operand(q)
            && operand(k)
            && operand(v)
            && mask.is_none_or(|m| m.device().is_cpu())
            && common,
        on_cuda && common,
    )
}

#[cfg(feature = "cuda")]
fn cuda_head_dim(d: usize) -> bool {
    crate::fused::cuda::HEAD_DIMS.contains(&d)
}

#[cfg(not(feature = "cuda"))]
fn cuda_head_dim(_: usize) -> bool {
    false
}

fn pick2(cpu: bool, cuda: bool) -> Kernel {
    if cpu {
        Kernel::Cpu
    } else if cuda {
        Kernel::Cuda
    } else {
        Kernel::Generic
    }
}

fn pick(cpu: bool) -> Kernel {
    if cpu {
        Kernel::Cpu
    } else {
        Kernel::Generic
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn half_precision_and_mixed_dtypes_go_generic() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let w = Tensor::zeros((4, 3), DType::F32, &dev)?;
        assert_eq!(linear(&x, &w, None), Kernel::Cpu);
        assert_eq!(linear(&x, &w.to_dtype(DType::F64)?, None), Kernel::Generic);
        assert_eq!(softmax(&x.to_dtype(DType::BF16)?), Kernel::Generic);
        let scalar = Tensor::new(1f32, &dev)?;
        assert_eq!(softmax(&scalar), Kernel::Generic);
        Ok(())
    }

    #[test]
    fn attention_takes_the_kernel_only_for_a_per_key_mask() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 5, 8), DType::F32, &dev)?;
        let k = Tensor::zeros((2, 7, 8), DType::F32, &dev)?;
        let per_key = Tensor::zeros((2, 1, 1, 7), DType::F32, &dev)?;
        let full = Tensor::zeros((2, 1, 5, 7), DType::F32, &dev)?;
        let fused = AttentionBackend::Fused;
        assert_eq!(
            attention(fused, &q, &k, &k, 2, Some(&per_key), 0.1),
            Kernel::Cpu
        );
        assert_eq!(
            attention(fused, &q, &k, &k, 2, Some(&full), 0.1),
            Kernel::Generic
        );
        assert_eq!(attention(fused, &q, &k, &k, 2, None, 1.0), Kernel::Generic);
        let generic = AttentionBackend::Generic;
        assert_eq!(
            attention(generic, &q, &k, &k, 2, None, 0.0),
            Kernel::Generic
        );
        Ok(())
    }
}
