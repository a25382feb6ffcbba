//! Scaled dot-product attention, the one function every attention of the models calls
//! (ViT self-attention, BERT self- and cross-attention; ALBEF paper §3.1).
//!
//! [`AttentionBackend`] selects the implementation; `Generic` is written with candle ops
//! that have a backward and is the reference any fused or flash kernel is tested against;
//! `Fused` runs one kernel per attention, forward and backward, without keeping the
//! attention matrix (the CPU kernel for f32/f64 is in `fused/attention.rs`; where it
//! applies is decided in `dispatch::attention`; elsewhere it falls back to `Generic`). Models call [`multi_head_attention`] on the projections
//! as they come out of the linears.

use candle_core::{DType, Result, Tensor};

use crate::dispatch::{self, Kernel};
use crate::nn;

/// Which implementation computes attention: a runtime choice of the model
/// ([`crate::AlbefModel::with_attention`], like candle's `use_flash_attn`), never part of
/// a checkpoint's config, since both compute the same function of the same weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionBackend {
    /// Matmul, additive mask, softmax, dropout, matmul: the full score matrix is stored.
    Generic,
    /// One fused kernel forward and backward (recomputing the scores), where one exists
    /// for the device and dtype; `Generic` otherwise. The default.
    #[default]
    Fused,
}

/// `softmax(q k^T / sqrt(d) + mask) v`, with dropout on the probabilities.
///
/// `dropout_p` is the drop probability in effect (0 when not training; see
/// [`nn::Dropout::active_p`]), as fused kernels take it.
///
/// # Shapes
/// `q`: `[B, heads, Lq, d]`, `k`, `v`: `[B, heads, Lk, d]`, `mask`: additive, broadcastable
/// to `[B, heads, Lq, Lk]` (0 = attend, large negative = ignore) -> `[B, heads, Lq, d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    dropout_p: f64,
    backend: AttentionBackend,
) -> Result<Tensor> {
    match backend {
        AttentionBackend::Generic | AttentionBackend::Fused => {
            generic_attention(q, k, v, mask, dropout_p)
        }
    }
}

/// Multi-head attention on un-split projections: `q`: `[B, Lq, heads * d]`, `k`, `v`:
/// `[B, Lk, heads * d]` (views with a contiguous last dimension are fine, e.g. slices of
/// a fused qkv projection), `mask` as for [`attention`] (`[B or 1, 1, 1, Lk]` for the
/// fused kernel) -> `[B, Lq, heads * d]` with the heads merged.
pub fn multi_head_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    dropout_p: f64,
    backend: AttentionBackend,
) -> Result<Tensor> {
    if dispatch::attention(backend, q, k, v, heads, mask, dropout_p) != Kernel::Generic {
        return q.apply_op3(k, v, fused_op(q, k, v, heads, mask, dropout_p)?);
    }
    let a = attention(
        &split_heads(q, heads)?,
        &split_heads(k, heads)?,
        &split_heads(v, heads)?,
        mask,
        dropout_p,
        AttentionBackend::Generic,
    )?;
    merge_heads(&a)
}

/// Self-attention on a packed `[B, L, 3 * heads * d]` projection (q, k, v along the last
/// dimension, as ViT's `qkv` linear and a concatenated BERT q/k/v produce) ->
/// `[B, L, heads * d]`. The fused kernel reads the three parts in place and returns one
/// gradient for the projection; otherwise as [`multi_head_attention`] on the slices.
pub fn self_attention_packed(
    qkv: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    dropout_p: f64,
    backend: AttentionBackend,
) -> Result<Tensor> {
    let c = packed_part(qkv, 3)?;
    let (q, k, v) = (
        qkv.narrow(2, 0, c)?,
        qkv.narrow(2, c, c)?,
        qkv.narrow(2, 2 * c, c)?,
    );
    if dispatch::attention(backend, &q, &k, &v, heads, mask, dropout_p) != Kernel::Generic {
        let op = fused_op(&q, &k, &v, heads, mask, dropout_p)?;
        return qkv.apply_op1(crate::fused::attention::PackedQkv(op));
    }
    multi_head_attention(&q, &k, &v, heads, mask, dropout_p, backend)
}

/// Cross-attention of queries `[B, Lq, heads * d]` over a packed `[B, Lk, 2 * heads * d]`
/// key/value projection -> `[B, Lq, heads * d]`; fused like [`self_attention_packed`].
pub fn cross_attention_packed(
    q: &Tensor,
    kv: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    dropout_p: f64,
    backend: AttentionBackend,
) -> Result<Tensor> {
    let c = packed_part(kv, 2)?;
    let (k, v) = (kv.narrow(2, 0, c)?, kv.narrow(2, c, c)?);
    if dispatch::attention(backend, q, &k, &v, heads, mask, dropout_p) != Kernel::Generic {
        let op = fused_op(q, &k, &v, heads, mask, dropout_p)?;
        return q.apply_op2(kv, crate::fused::attention::PackedKv(op));
    }
    multi_head_attention(q, &k, &v, heads, mask, dropout_p, backend)
}

/// Width of one of the `parts` projections packed along the last dimension of `x`.
fn packed_part(x: &Tensor, parts: usize) -> Result<usize> {
    let width = x.dim(candle_core::D::Minus1)?;
    if width % parts != 0 {
        candle_core::bail!("a packed projection of width {width} is not {parts} equal parts");
    }
    Ok(width / parts)
}

/// The fused CPU op for inputs [`dispatch::attention`] gave to [`Kernel::Cpu`].
fn fused_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    dropout_p: f64,
) -> Result<crate::fused::attention::FusedAttention> {
    let (b, _, c) = q.dims3()?;
    let lk = k.dim(1)?;
    // The CPU kernel reads the mask from host memory; on CUDA it stays on the device.
    let on_cpu = q.device().is_cpu();
    let (mask, device_mask) = match mask {
        None => (None, None),
        Some(m) if on_cpu => (
            Some(m.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?),
            None,
        ),
        Some(m) => (
            None,
            Some(m.to_dtype(DType::F32)?.flatten_all()?.contiguous()?),
        ),
    };
    // One draw from the dropout stream, as the generic path's `nn::dropout` makes: the
    // same seed gives both paths the same mask.
    let dropout = (dropout_p > 0.0).then(|| nn::draw_dropout_mask(dropout_p));
    let probs_bytes = b * heads * q.dim(1)? * lk * q.dtype().size_in_bytes();
    let training = q.track_op() || k.track_op() || v.track_op();
    Ok(crate::fused::attention::FusedAttention {
        heads,
        scale: 1.0 / ((c / heads) as f64).sqrt(),
        mask,
        dropout,
        keep_probs: on_cpu && training && probs_bytes <= crate::fused::attention::KEEP_PROBS_BYTES,
        saved_probs: std::sync::Mutex::new(None),
        device_mask,
        stash: Default::default(),
    })
}

fn generic_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    dropout_p: f64,
) -> Result<Tensor> {
    let d = q.dim(3)?;
    // Scale q rather than the scores: Lq x d values instead of Lq x Lk.
    let q = (q * (1.0 / (d as f64).sqrt()))?;
    let scores = q.matmul(&k.t()?)?;
    let scores = match mask {
        // A mask made in another dtype (f32 under bf16 compute) is cast, not refused.
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let probs = nn::dropout(&nn::softmax(&scores)?, dropout_p)?;
    probs.matmul(v)
}

/// The additive value of a masked key. Large enough that `exp` underflows to 0 after the
/// max-subtraction in softmax, small enough not to overflow half precision.
pub fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -1e4,
        _ => -1e9,
    }
}

/// Additive key mask from a 0/1 attention mask (any int or float dtype; 1 = real token).
///
/// # Shapes
/// `attention_mask`: `[B, Lk]` -> `[B, 1, 1, Lk]` of `dtype`.
pub fn padding_mask(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, lk) = attention_mask.dims2()?;
    let keep = attention_mask.to_dtype(dtype)?;
    // (1 - keep) * mask_value
    keep.affine(-mask_value(dtype), mask_value(dtype))?
        .reshape((b, 1, 1, lk))
}

/// Splits the last dimension into heads.
///
/// # Shapes
/// `[B, L, heads * d]` -> `[B, heads, L, d]` (contiguous).
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, h) = x.dims3()?;
    x.reshape((b, l, heads, h / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Inverse of [`split_heads`].
///
/// # Shapes
/// `[B, heads, L, d]` -> `[B, L, heads * d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, heads, l, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, l, heads * d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f64> {
        (a - b)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()
    }

    /// Fused vs generic multi-head attention under one upstream gradient: outputs and the
    /// gradients of q, k and v. Dropout draws are seeded identically for both.
    #[allow(clippy::too_many_arguments)]
    fn compare(
        dtype: DType,
        (b, lq, lk, heads, d): (usize, usize, usize, usize, usize),
        masked: bool,
        mask_batch: usize,
        dropout_p: f64,
        qkv_views: bool,
        tol: f64,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let c = heads * d;
        let rand =
            |s: &[usize]| -> Result<Tensor> { Tensor::randn(0f64, 1.0, s, &dev)?.to_dtype(dtype) };
        // With views, q, k and v are slices of one [B, L, 3C] projection (self-attention).
        let (q, k, v, vars);
        if qkv_views {
            let qkv = Var::from_tensor(&rand(&[b, lq, 3 * c])?)?;
            q = qkv.narrow(2, 0, c)?;
            k = qkv.narrow(2, c, c)?;
            v = qkv.narrow(2, 2 * c, c)?;
            vars = vec![qkv];
        } else {
            let (qv, kv, vv) = (
                Var::from_tensor(&rand(&[b, lq, c])?)?,
                Var::from_tensor(&rand(&[b, lk, c])?)?,
                Var::from_tensor(&rand(&[b, lk, c])?)?,
            );
            q = qv.as_tensor().clone();
            k = kv.as_tensor().clone();
            v = vv.as_tensor().clone();
            vars = vec![qv, kv, vv];
        }
        let lk = k.dim(1)?;
        let mask = if masked {
            let keep: Vec<u32> = (0..mask_batch * lk)
                // Row r keeps its first max(1, Lk - 1 - r) keys.
                .map(|i| u32::from(i % lk < (lk - 1).saturating_sub(i / lk).max(1)))
                .collect();
            let am = Tensor::from_vec(keep, (mask_batch, lk), &dev)?;
            Some(padding_mask(&am, dtype)?)
        } else {
            None
        };
        let r = rand(&[b, lq, c])?;
        let run = |backend| -> Result<(Tensor, candle_core::backprop::GradStore)> {
            let _seed = nn::seed_dropout(7);
            let out = multi_head_attention(&q, &k, &v, heads, mask.as_ref(), dropout_p, backend)?;
            let grads = (&out * &r)?.sum_all()?.backward()?;
            Ok((out, grads))
        };
        let (of, gf) = run(AttentionBackend::Fused)?;
        let (og, gg) = run(AttentionBackend::Generic)?;
        assert_eq!(of.dims(), &[b, lq, c]);
        let dif = max_abs(&of, &og)?;
        assert!(dif <= tol, "forward {dtype:?}: {dif}");
        for (i, var) in vars.iter().enumerate() {
            let (a, e) = (
                gf.get(var).expect("fused grad"),
                gg.get(var).expect("generic grad"),
            );
            let dif = max_abs(a, e)?;
            assert!(dif <= tol, "grad {i} {dtype:?}: {dif}");
        }
        Ok(())
    }

    #[test]
    fn fused_attention_matches_generic() -> Result<()> {
        for (dtype, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
            // self-attention, no mask
            compare(dtype, (2, 5, 5, 2, 4), false, 0, 0.0, false, tol)?;
            // text self-attention with a padding mask and dropout
            compare(dtype, (3, 7, 7, 3, 8), true, 3, 0.1, false, tol)?;
            // cross-attention (Lq != Lk) with dropout
            compare(dtype, (2, 4, 9, 2, 8), false, 0, 0.3, false, tol)?;
            // a mask shared by the batch
            compare(dtype, (2, 6, 6, 1, 5), true, 1, 0.0, false, tol)?;
            // q, k, v as views of one qkv projection (ViT)
            compare(dtype, (2, 9, 9, 4, 4), false, 0, 0.0, true, tol)?;
        }
        Ok(())
    }

    #[test]
    fn packed_attention_matches_generic() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F32, 2e-5), (DType::F64, 1e-12)] {
            let (b, lq, lk, heads, d) = (3, 6, 9, 2, 4);
            let c = heads * d;
            let rand = |s: &[usize]| -> Result<Var> {
                Var::from_tensor(&Tensor::randn(0f64, 1.0, s, &dev)?.to_dtype(dtype)?)
            };
            let am = Tensor::from_vec(
                (0..b * lq)
                    .map(|i| u32::from(i % lq < lq - i / lq))
                    .collect::<Vec<u32>>(),
                (b, lq),
                &dev,
            )?;
            let mask = padding_mask(&am, dtype)?;
            let (qkv, q, kv) = (
                rand(&[b, lq, 3 * c])?,
                rand(&[b, lq, c])?,
                rand(&[b, lk, 2 * c])?,
            );
            let r = Tensor::randn(0f64, 1.0, (b, lq, c), &dev)?.to_dtype(dtype)?;
            let run = |backend| -> Result<(Tensor, Tensor, candle_core::backprop::GradStore)> {
                let _seed = nn::seed_dropout(11);
                let a = self_attention_packed(&qkv, heads, Some(&mask), 0.2, backend)?;
                let x = cross_attention_packed(&q, &kv, heads, None, 0.3, backend)?;
                let grads = ((&a * &r)?.sum_all()? + (&x * &r)?.sum_all()?)?.backward()?;
                Ok((a, x, grads))
            };
            let (af, xf, gf) = run(AttentionBackend::Fused)?;
            let (ag, xg, gg) = run(AttentionBackend::Generic)?;
            assert!(max_abs(&af, &ag)? <= tol && max_abs(&xf, &xg)? <= tol);
            for var in [&qkv, &q, &kv] {
                let (a, e) = (
                    gf.get(var).expect("fused grad"),
                    gg.get(var).expect("generic grad"),
                );
                assert_eq!(a.dims(), var.dims());
                let dif = max_abs(a, e)?;
                assert!(dif <= tol, "{dtype:?}: {dif}");
            }
        }
        Ok(())
    }

    #[test]
    fn fused_attention_recomputes_what_it_did_not_keep() -> Result<()> {
        // Kept (small, training) and recomputed probabilities give the same gradients.
        let dev = Device::Cpu;
        let (b, l, c, heads) = (2, 7, 8, 2);
        let q = Var::from_tensor(&Tensor::randn(0f64, 1.0, (b, l, c), &dev)?)?;
        let r = Tensor::randn(0f64, 1.0, (b, l, c), &dev)?;
        let grads = |keep: bool| -> Result<Tensor> {
            let _seed = nn::seed_dropout(5);
            let mut op = fused_op(&q, &q, &q, heads, None, 0.2)?;
            assert!(
                op.keep_probs,
                "small training attention keeps its probabilities"
            );
            op.keep_probs = keep;
            let out = q.apply_op3(&q, &q, op)?;
            let g = (&out * &r)?.sum_all()?.backward()?;
            Ok(g.get(&q).expect("grad").clone())
        };
        assert!(max_abs(&grads(true)?, &grads(false)?)? < 1e-12);
        Ok(())
    }

    #[test]
    fn fused_attention_falls_back_for_other_masks() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
        // A full [B, 1, Lq, Lk] mask is not a per-key mask: the generic path serves it.
        let mask = Tensor::zeros((2, 1, 3, 3), DType::F32, &dev)?;
        let a = multi_head_attention(&q, &q, &q, 2, Some(&mask), 0.0, AttentionBackend::Fused)?;
        let g = multi_head_attention(&q, &q, &q, 2, Some(&mask), 0.0, AttentionBackend::Generic)?;
        assert!(max_abs(&a, &g)? < 1e-6);
        Ok(())
    }

    #[test]
    fn padding_mask_ignores_padded_keys() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, lq, lk, d) = (2, 3, 4, 5, 8);
        let q = Tensor::randn(0f32, 1.0, (b, h, lq, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, h, lk, d), &dev)?;
        // Row 0 keeps 3 keys, row 1 all 5.
        let am = Tensor::new(&[[1u32, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &dev)?;
        let mask = padding_mask(&am, DType::F32)?;
        let out = attention(&q, &k, &v, Some(&mask), 0.0, AttentionBackend::Generic)?;
        // Changing padded keys/values of row 0 changes nothing.
        let noise = Tensor::randn(0f32, 10.0, (1, h, 2, d), &dev)?;
        let k2 = k.slice_assign(&[0..1, 0..h, 3..5, 0..d], &noise)?;
        let v2 = v.slice_assign(&[0..1, 0..h, 3..5, 0..d], &noise)?;
        let out2 = attention(&q, &k2, &v2, Some(&mask), 0.0, AttentionBackend::Generic)?;
        let diff = (&out - &out2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        // And equals attention over the 3 real keys only.
        let short = attention(
            &q.i(0..1)?,
            &k.i((0..1, .., 0..3))?.contiguous()?,
            &v.i((0..1, .., 0..3))?.contiguous()?,
            None,
            0.0,
            AttentionBackend::Generic,
        )?;
        let diff = (out.i(0..1)? - short)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    #[test]
    fn attention_matches_a_direct_computation() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f64, 1.0, (1, 1, 2, 4), &dev)?;
        let k = Tensor::randn(0f64, 1.0, (1, 1, 3, 4), &dev)?;
        let v = Tensor::randn(0f64, 1.0, (1, 1, 3, 4), &dev)?;
        let out = attention(&q, &k, &v, None, 0.0, AttentionBackend::Generic)?;
        let (qv, kv, vv) = (
            q.flatten_all()?.to_vec1::<f64>()?,
            k.flatten_all()?.to_vec1::<f64>()?,
            v.flatten_all()?.to_vec1::<f64>()?,
        );
        let outv = out.flatten_all()?.to_vec1::<f64>()?;
        for i in 0..2 {
            let s: Vec<f64> = (0..3)
                .map(|j| (0..4).map(|c| qv[i * 4 + c] * kv[j * 4 + c]).sum::<f64>() / 2.0)
                .collect();
            let m = s.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let z: f64 = e.iter().sum();
            for c in 0..4 {
                let want: f64 = (0..3).map(|j| e[j] / z * vv[j * 4 + c]).sum();
                assert!((outv[i * 4 + c] - want).abs() < 1e-12);
            }
        }
        Ok(())
    }

    #[test]
    fn heads_split_and_merge_round_trip() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 5, 12), &Device::Cpu)?;
        let s = split_heads(&x, 3)?;
        assert_eq!(s.dims(), &[2, 3, 5, 4]);
        let back = merge_heads(&s)?;
        let diff = (back - x)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }
}
