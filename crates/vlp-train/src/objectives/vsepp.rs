//! VSE++'s hinge-based triplet loss with hardest negatives (Faghri et al., "VSE++:
//! Improving Visual-Semantic Embeddings with Hard Negatives", BMVC 2018, §3.2), on the
//! in-batch cosine similarities; an alternative to ITC as the contrastive objective.

use candle_core::{Tensor, D};

use super::{paired_batch, same_id_mask};
use crate::error::Result;

/// VSE++ over the batch: for image `i` and text `j != i`,
/// `cost_t[i, j] = [margin + s(i, j) - s(i, i)]_+` (negative texts for each image) and
/// `cost_i[i, j] = [margin + s(i, j) - s(j, j)]_+` (negative images for each text). With
/// `max_violation` only the hardest negative of each query counts (VSE++), otherwise all
/// (VSE0). Pairs with the same image id (`image_ids`) are not negatives. Faghri et al. sum
/// over the batch; this divides by B so the loss keeps its scale across batch sizes.
///
/// # Shapes
/// `image_feat`, `text_feat`: `[B, E]`, L2-normalised; `image_ids`: `[B]` -> 0-d.
pub fn vsepp_loss(
    image_feat: &Tensor,
    text_feat: &Tensor,
    margin: f64,
    max_violation: bool,
    image_ids: Option<&Tensor>,
) -> Result<Tensor> {
    let b = paired_batch("vsepp", image_feat, text_feat)?;
    let dtype = image_feat.dtype();
    let scores = image_feat.matmul(&text_feat.t()?)?; // [B images, B texts]
    let diagonal = scores
        .mul(&Tensor::eye(b, dtype, scores.device())?)?
        .sum_keepdim(D::Minus1)?; // [B, 1]: s(i, i)
    let positives = match image_ids {
        Some(ids) => same_id_mask(ids, ids)?.to_dtype(dtype)?,
        None => Tensor::eye(b, dtype, scores.device())?,
    };
    let negatives = positives.affine(-1.0, 1.0)?;
    let cost_texts = (scores.broadcast_sub(&diagonal)? + margin)?
        .relu()?
        .mul(&negatives)?;
    let cost_images = (scores.broadcast_sub(&diagonal.t()?)? + margin)?
        .relu()?
        .mul(&negatives)?;
    let total = if max_violation {
        (cost_texts.max(1)?.sum_all()? + cost_images.max(0)?.sum_all()?)?
    } else {
        (cost_texts.sum_all()? + cost_images.sum_all()?)?
    };
    Ok((total / b as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// 3 x 3 by hand. Scores S (image rows, text columns):
    /// [[0.9, 0.8, 0.1], [0.2, 0.5, 0.6], [0.3, 0.1, 0.7]], margin 0.2.
    /// cost_texts (m + S[i,j] - S[i,i]), hardest per row: 0.1, 0.3, 0 = 0.4;
    /// cost_images (m + S[i,j] - S[j,j]), hardest per column: 0, 0.5, 0.1 = 0.6;
    /// loss (0.4 + 0.6) / 3.
    #[test]
    fn three_by_three_case_has_the_hand_computed_value() -> Result<()> {
        let dev = Device::Cpu;
        // Features whose dot products are S: images = S, texts = identity.
        let s = Tensor::new(
            &[[0.9f64, 0.8, 0.1], [0.2, 0.5, 0.6], [0.3, 0.1, 0.7]],
            &dev,
        )?;
        let texts = Tensor::eye(3, candle_core::DType::F64, &dev)?;
        let hardest = vsepp_loss(&s, &texts, 0.2, true, None)?.to_scalar::<f64>()?;
        assert!((hardest - 1.0 / 3.0).abs() < 1e-12, "{hardest}");
        // Margin 0.5: cost_texts rows [-, .4, 0], [.2, -, .6], [.1, 0, -];
        // cost_images columns [-, .2, .1]... column 0: S[1,0]-S[0,0]+.5 = -.2 -> 0,
        // S[2,0]: -.1 -> 0; column 1: .8-.5+.5 = .8, .1-.5+.5 = .1; column 2: .1-.7+.5 = 0,
        // .6-.7+.5 = .4.
        let sum = vsepp_loss(&s, &texts, 0.5, false, None)?.to_scalar::<f64>()?;
        let want_sum = ((0.4 + 0.2 + 0.6 + 0.1) + (0.8 + 0.1 + 0.4)) / 3.0;
        assert!((sum - want_sum).abs() < 1e-12, "{sum} vs {want_sum}");
        let max = vsepp_loss(&s, &texts, 0.5, true, None)?.to_scalar::<f64>()?;
        let want_max = ((0.4 + 0.6 + 0.1) + (0.0 + 0.8 + 0.4)) / 3.0;
        assert!((max - want_max).abs() < 1e-12, "{max} vs {want_max}");
        // Images 0 and 1 the same picture: their cross pairs are positives, not negatives.
        let ids = Tensor::new(&[4i64, 4, 5], &dev)?;
        let masked = vsepp_loss(&s, &texts, 0.5, true, Some(&ids))?.to_scalar::<f64>()?;
        // texts: row 0 -> max(0 (col 2)) = 0; row 1 -> .6; row 2 -> max(.1, 0) = .1;
        // images: col 0 -> S[2,0] only: 0; col 1 -> S[2,1]: .1; col 2 -> max(0, .4) = .4.
        let want_masked = ((0.0 + 0.6 + 0.1) + (0.0 + 0.1 + 0.4)) / 3.0;
        assert!(
            (masked - want_masked).abs() < 1e-12,
            "{masked} vs {want_masked}"
        );
        Ok(())
    }
}
