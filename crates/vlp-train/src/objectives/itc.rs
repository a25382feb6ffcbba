//! Image-text contrastive loss with momentum distillation (ALBEF paper §3.2 ITC, §3.3
//! MoD): InfoNCE of the online features against the momentum features of the batch and
//! the queues, with targets softened by the momentum model's own similarities.

use candle_core::{Tensor, D};
use vlp_models::nn;

use super::{paired_batch, same_id_mask, soft_cross_entropy};
use crate::error::{Result, TrainError};

/// Alpha at `step`: ramped linearly from 0 to `alpha` over `ramp_steps` steps (ALBEF
/// ramps over the first epoch: `alpha * min(1, i / len(loader))`), `alpha` afterwards
/// or when `ramp_steps` is 0.
pub fn alpha_at(step: u64, ramp_steps: u64, alpha: f64) -> f64 {
    if ramp_steps == 0 {
        return alpha;
    }
    alpha * (step as f64 / ramp_steps as f64).min(1.0)
}

/// Image ids for image-id-aware positives: the batch's and the queue's (`-100` = empty).
#[derive(Debug, Clone, Copy)]
pub struct ImageIds<'a> {
    /// `[B]`, integer.
    pub batch: &'a Tensor,
    /// `[1, Q]` or `[Q]`, i64: [`vlp_models::AlbefModel::idx_queue`].
    pub queue: &'a Tensor,
}

/// Everything ITC reads. Momentum features and queues carry no gradient.
#[derive(Debug, Clone, Copy)]
pub struct ItcInputs<'a> {
    /// `[B, E]`, L2-normalised, online.
    pub image_feat: &'a Tensor,
    /// `[B, E]`, L2-normalised, online.
    pub text_feat: &'a Tensor,
    /// `[B, E]`, momentum model.
    pub image_feat_m: &'a Tensor,
    /// `[B, E]`, momentum model.
    pub text_feat_m: &'a Tensor,
    /// `[E, Q]`, one feature per column, as stored BEFORE this step's enqueue.
    pub image_queue: &'a Tensor,
    /// `[E, Q]`.
    pub text_queue: &'a Tensor,
    /// The learned temperature, 0-d (already clamped).
    pub temp: &'a Tensor,
    /// Weight of the momentum soft targets.
    pub alpha: f64,
    /// `Some` = every column with the row's image id is a positive (batch and queue).
    pub image_ids: Option<ImageIds<'a>>,
}

/// The ITC loss and the online similarities (the ITM sampler reads their batch columns).
#[derive(Debug, Clone)]
pub struct ItcOutput {
    /// 0-d, with graph.
    pub loss: Tensor,
    /// `[B, B + Q]` online image-to-text similarities over temperature.
    pub sim_i2t: Tensor,
    /// `[B, B + Q]` online text-to-image similarities over temperature.
    pub sim_t2i: Tensor,
}

/// The hard targets: one-hot on the local positive (column b of row b), or with image
/// ids every column (batch and queue) of the same id, each row normalised to sum 1.
///
/// # Shapes
/// -> `[B, B + Q]`, the dtype of the features.
pub fn hard_targets(b: usize, q: usize, ids: Option<ImageIds>, like: &Tensor) -> Result<Tensor> {
    let dev = like.device();
    let targets = match ids {
        None => {
            let eye = Tensor::eye(b, like.dtype(), dev)?;
            if q == 0 {
                eye
            } else {
                Tensor::cat(&[&eye, &Tensor::zeros((b, q), like.dtype(), dev)?], 1)?
            }
        }
        Some(ids) => {
            let all = Tensor::cat(
                &[
                    &ids.batch.flatten_all()?.to_dtype(candle_core::DType::I64)?,
                    &ids.queue.flatten_all()?.to_dtype(candle_core::DType::I64)?,
                ],
                0,
            )?;
            let pos = same_id_mask(ids.batch, &all)?.to_dtype(like.dtype())?;
            pos.broadcast_div(&pos.sum_keepdim(D::Minus1)?)?
        }
    };
    Ok(targets)
}

/// `L_itc = (CE_soft(s_i2t, y_i2t) + CE_soft(s_t2i, y_t2i)) / 2` with
/// `y = alpha * softmax(s_m) + (1 - alpha) * hard` (ALBEF `model_pretrain.py`).
///
/// # Shapes
/// See [`ItcInputs`]; the output similarities are `[B, B + Q]`.
pub fn itc_loss(inp: &ItcInputs) -> Result<ItcOutput> {
    let (b, e) = inp.image_feat.dims2()?;
    let (qe, q) = inp.image_queue.dims2()?;
    if qe != e || inp.text_queue.dims() != [e, q] {
        return Err(TrainError::input(
            "itc queues",
            format!(
                "image queue {:?}, text queue {:?} for features of width {e}",
                inp.image_queue.dims(),
                inp.text_queue.dims()
            ),
        ));
    }
    let temp = inp.temp;
    // [B + Q, E]: this batch's momentum features first, then the queue (one per column).
    let image_all = Tensor::cat(&[inp.image_feat_m, &inp.image_queue.t()?], 0)?.detach();
    let text_all = Tensor::cat(&[inp.text_feat_m, &inp.text_queue.t()?], 0)?.detach();

    let hard = hard_targets(b, q, inp.image_ids, inp.image_feat)?;
    let temp_m = temp.detach();
    let sim_i2t_m = inp
        .image_feat_m
        .matmul(&text_all.t()?)?
        .broadcast_div(&temp_m)?;
    let sim_t2i_m = inp
        .text_feat_m
        .matmul(&image_all.t()?)?
        .broadcast_div(&temp_m)?;
    let soften = |sim_m: &Tensor| -> Result<Tensor> {
        let soft = nn::softmax(sim_m)?.affine(inp.alpha, 0.0)?;
        Ok((soft + hard.affine(1.0 - inp.alpha, 0.0)?)?.detach())
    };
    let targets_i2t = soften(&sim_i2t_m)?;
    let targets_t2i = soften(&sim_t2i_m)?;

    let sim_i2t = inp.image_feat.matmul(&text_all.t()?)?.broadcast_div(temp)?;
    let sim_t2i = inp.text_feat.matmul(&image_all.t()?)?.broadcast_div(temp)?;
    let loss = ((soft_cross_entropy(&sim_i2t, &targets_i2t)?
        + soft_cross_entropy(&sim_t2i, &targets_t2i)?)?
        * 0.5)?;
    Ok(ItcOutput {
        loss,
        sim_i2t,
        sim_t2i,
    })
}

/// CLIP's contrastive loss (Radford et al. 2021; open_clip's `ClipLoss`): symmetric
/// InfoNCE over the batch with the online features on both sides, no queue and no
/// momentum targets, so both encoders get gradients from both directions. With image ids
/// every pair of the same id is a positive (targets normalised per row). Returns the loss
/// and the `[B, B]` similarities over temperature (image-to-text, text-to-image).
///
/// # Shapes
/// `image_feat`, `text_feat`: `[B, E]`, L2-normalised; `image_ids`: `[B]` -> 0-d.
pub fn clip_loss(
    image_feat: &Tensor,
    text_feat: &Tensor,
    temp: &Tensor,
    image_ids: Option<&Tensor>,
) -> Result<ItcOutput> {
    let b = paired_batch("clip", image_feat, text_feat)?;
    let targets = match image_ids {
        None => Tensor::eye(b, image_feat.dtype(), image_feat.device())?,
        Some(ids) => {
            let pos = same_id_mask(ids, ids)?.to_dtype(image_feat.dtype())?;
            pos.broadcast_div(&pos.sum_keepdim(D::Minus1)?)?
        }
    };
    let sim_i2t = image_feat.matmul(&text_feat.t()?)?.broadcast_div(temp)?;
    let sim_t2i = sim_i2t.t()?;
    // The id mask is symmetric and each row's count is its column's: one target matrix.
    let loss = ((soft_cross_entropy(&sim_i2t, &targets)?
        + soft_cross_entropy(&sim_t2i, &targets)?)?
        * 0.5)?;
    Ok(ItcOutput {
        loss,
        sim_i2t,
        sim_t2i: sim_t2i.contiguous()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Two images, two texts, temp 0.5: each direction's cross-entropy by hand; the
    /// gradient reaches both encoders' features.
    #[test]
    fn clip_loss_has_the_hand_computed_value_and_trains_both_sides() -> Result<()> {
        let dev = Device::Cpu;
        let img = candle_core::Var::new(&[[1.0f64, 0.0], [0.6, 0.8]], &dev)?;
        let txt = candle_core::Var::new(&[[0.8f64, 0.6], [0.0, 1.0]], &dev)?;
        let temp = Tensor::new(0.5f64, &dev)?;
        let out = clip_loss(img.as_tensor(), txt.as_tensor(), &temp, None)?;
        // s[i][j] = <img_i, txt_j> / 0.5
        let s = [[1.6, 0.0], [1.92, 1.6]];
        let ce = |l: [f64; 2], k: usize| (l[0].exp() + l[1].exp()).ln() - l[k];
        let i2t = (ce(s[0], 0) + ce(s[1], 1)) / 2.0;
        let t2i = (ce([s[0][0], s[1][0]], 0) + ce([s[0][1], s[1][1]], 1)) / 2.0;
        let got = out.loss.to_scalar::<f64>()?;
        assert!((got - (i2t + t2i) / 2.0).abs() < 1e-12, "{got}");
        let grads = out.loss.backward()?;
        for v in [&img, &txt] {
            let g = grads.get(v).expect("a gradient");
            assert!(g.abs()?.sum_all()?.to_scalar::<f64>()? > 1e-3);
        }
        // Same image id on both rows: every pair is a positive, targets 1/2 each.
        let ids = Tensor::new(&[4i64, 4], &dev)?;
        let both = clip_loss(img.as_tensor(), txt.as_tensor(), &temp, Some(&ids))?;
        let half = |l: [f64; 2]| (l[0].exp() + l[1].exp()).ln() - (l[0] + l[1]) / 2.0;
        let want = (half(s[0]) + half(s[1]) + half([1.6, 1.92]) + half([0.0, 1.6])) / 4.0;
        let got = both.loss.to_scalar::<f64>()?;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        Ok(())
    }

    fn t(rows: &[&[f64]]) -> Tensor {
        let v: Vec<Vec<f64>> = rows.iter().map(|r| r.to_vec()).collect();
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn alpha_ramps_linearly_then_holds() {
        assert_eq!(alpha_at(0, 100, 0.4), 0.0);
        assert!((alpha_at(50, 100, 0.4) - 0.2).abs() < 1e-12);
        assert_eq!(alpha_at(100, 100, 0.4), 0.4);
        assert_eq!(alpha_at(5000, 100, 0.4), 0.4);
        assert_eq!(alpha_at(0, 0, 0.4), 0.4);
    }

    /// Two orthogonal unit features, empty-ish queue of one column, temp 1, alpha 0:
    /// s_i2t rows = [1, 0, q] etc.; the value by hand.
    #[test]
    fn tiny_case_has_the_hand_computed_value() -> Result<()> {
        let feats = t(&[&[1.0, 0.0], &[0.0, 1.0]]);
        // Queue column (0.6, 0.8).
        let queue = t(&[&[0.6], &[0.8]]);
        let temp = Tensor::new(1.0f64, &Device::Cpu)?;
        let inp = ItcInputs {
            image_feat: &feats,
            text_feat: &feats,
            image_feat_m: &feats,
            text_feat_m: &feats,
            image_queue: &queue,
            text_queue: &queue,
            temp: &temp,
            alpha: 0.0,
            image_ids: None,
        };
        let out = itc_loss(&inp)?;
        // Row 0: logits [1, 0, 0.6], target column 0; row 1: [0, 1, 0.8], column 1.
        let ce = |l: [f64; 3], k: usize| -> f64 {
            let z: f64 = l.iter().map(|x| x.exp()).sum();
            z.ln() - l[k]
        };
        let want = (ce([1.0, 0.0, 0.6], 0) + ce([0.0, 1.0, 0.8], 1)) / 2.0;
        let got = out.loss.to_scalar::<f64>()?;
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert_eq!(out.sim_i2t.dims(), &[2, 3]);

        // With alpha 1 the targets are the momentum softmax, identical to the online one
        // here: the loss is the mean entropy of those rows.
        let inp1 = ItcInputs { alpha: 1.0, ..inp };
        let ent = |l: [f64; 3]| -> f64 {
            let z: f64 = l.iter().map(|x| x.exp()).sum();
            -l.iter().map(|x| (x.exp() / z) * (x - z.ln())).sum::<f64>()
        };
        let want1 = (ent([1.0, 0.0, 0.6]) + ent([0.0, 1.0, 0.8])) / 2.0;
        let got1 = itc_loss(&inp1)?.loss.to_scalar::<f64>()?;
        assert!((got1 - want1).abs() < 1e-12, "{got1} vs {want1}");
        Ok(())
    }

    #[test]
    fn image_id_positives_cover_batch_and_queue_and_sum_to_one() -> Result<()> {
        let dev = Device::Cpu;
        let like = Tensor::zeros((3, 2), DType::F32, &dev)?;
        let batch = Tensor::new(&[7i64, 9, 7], &dev)?;
        let queue = Tensor::new(&[[9i64, -100, 7, 5]], &dev)?;
        let ids = ImageIds {
            batch: &batch,
            queue: &queue,
        };
        let y = hard_targets(3, 4, Some(ids), &like)?.to_vec2::<f32>()?;
        let third = 1.0 / 3.0;
        assert_eq!(y[0], vec![third, 0.0, third, 0.0, 0.0, third, 0.0]);
        assert_eq!(y[1], vec![0.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.0]);
        assert_eq!(y[2], y[0]);
        for row in &y {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        Ok(())
    }
}
