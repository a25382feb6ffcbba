//! Scaled dot-product attention, the one function every attention of the models calls
//! (ViT self-attention, BERT self- and cross-attention; ALBEF paper §3.1).
//!
//! [`AttentionBackend`] selects the implementation; `Generic` is written with candle ops
//! that have a backward and is the reference any fused or flash kernel is tested against.

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn;

/// Which implementation computes attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttentionBackend {
    /// Matmul, additive mask, softmax, dropout, matmul: the full score matrix is stored.
    Generic,
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
        AttentionBackend::Generic => generic_attention(q, k, v, mask, dropout_p),
    }
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
        Some(m) => scores.broadcast_add(m)?,
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
    use candle_core::{Device, IndexOp};

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
