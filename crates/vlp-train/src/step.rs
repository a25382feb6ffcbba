//! One ALBEF pretraining step's losses (ALBEF paper §3; `ALBEF.forward` of
//! `models/model_pretrain.py`), in the reference order of operations. The model's weights,
//! momentum twin and queues are left as they are: the update that follows the losses
//! (AdamW, the momentum update, the enqueue) is `train_step`'s, once the step is known to
//! be finite.

use candle_core::{DType, Device, Tensor};
use vlp_core::rng::{derive_seed, Rng};
use vlp_models::config::Layout;
use vlp_models::{nn, AlbefModel};

use crate::error::{Result, TrainError};
use crate::objectives::itc::{clip_loss, itc_loss, ImageIds, ItcInputs};
use std::sync::Arc;

use crate::objectives::distill::{distill, DistillInputs};
use crate::objectives::itm::{
    all_rank_candidates, itm_loss, itm_loss_at, positive_pairs, sample_negatives, Negatives,
};
use crate::objectives::mlm::{mask_tokens, mlm_loss};
use crate::objectives::vsepp::vsepp_loss;
use crate::objectives::ObjectiveConfig;
use vlp_dist::Collective;

/// Streams derived from a step seed, one per consumer, so switching one objective off
/// does not shift the draws of another.
const DROPOUT_STREAM: u64 = 1;
const ITM_STREAM: u64 = 2;
const MLM_STREAM: u64 = 3;

/// The tensors of one training batch, on the model's device, with host copies of the
/// integer inputs that the host-side draws (MLM masks, ITM positives) read, so that a step
/// never downloads them from the device.
#[derive(Debug, Clone)]
pub struct StepBatch {
    /// `[B, 3, S, S]`, normalised pixels.
    pub images: Tensor,
    /// `[B, L]`, any integer dtype.
    pub input_ids: Tensor,
    /// `[B, L]`, 1 = token, 0 = padding.
    pub attention_mask: Tensor,
    /// `[B]` i64 image ids; needed when `image_id_positives` is on, enqueued when given.
    pub image_ids: Option<Tensor>,
    /// The same ids and mask in host memory.
    pub host: HostTokens,
}

/// A batch's token ids, attention mask and image ids in host memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTokens {
    /// `[B][L]`.
    pub input_ids: Vec<Vec<u32>>,
    /// `[B][L]`.
    pub attention_mask: Vec<Vec<u32>>,
    /// `[B]`.
    pub image_ids: Option<Vec<i64>>,
}

impl StepBatch {
    /// A batch on `device` from tensors built in host memory (the loader's): the integer
    /// inputs are copied out on the host, then everything moves to the device.
    ///
    /// # Shapes
    /// `images`: `[B, 3, S, S]`; `input_ids`, `attention_mask`: `[B, L]`; `image_ids`: `[B]`.
    pub fn new(
        images: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        image_ids: Option<Vec<i64>>,
        device: &Device,
    ) -> Result<Self> {
        let host = HostTokens {
            input_ids: input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?,
            attention_mask: attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?,
            image_ids,
        };
        let image_ids = match &host.image_ids {
            Some(ids) => Some(Tensor::new(ids.as_slice(), device)?),
            None => None,
        };
        Ok(StepBatch {
            images: images.to_device(device)?,
            input_ids: input_ids.to_device(device)?,
            attention_mask: attention_mask.to_device(device)?,
            image_ids,
            host,
        })
    }
}

/// Where the step's random choices come from.
#[derive(Debug, Clone)]
pub enum Draws {
    /// Draw hard negatives, MLM masks and dropout masks from streams of this seed: the
    /// step is then a function of (model state, batch, seed).
    Seeded(u64),
    /// Use choices recorded elsewhere (the reference implementation's step in the parity
    /// test). Dropout stays unseeded: replay with dropout 0.
    Replay {
        /// `[B]`: the negative image of each text.
        neg_image_for_text: Vec<usize>,
        /// `[B]`: the negative text of each image.
        neg_text_for_image: Vec<usize>,
        /// `[B, L]`: the masked ids.
        mlm_input_ids: Tensor,
        /// `[B, L]` i64: the original ids at masked positions, -100 elsewhere.
        mlm_labels: Tensor,
    },
}

/// Counts of what the step did beyond its losses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStats {
    /// ITM negatives skipped because their row had no admissible candidate.
    pub itm_fallbacks: usize,
    /// Tokens the MLM predicted.
    pub masked_tokens: usize,
}

/// The step's losses. Every value stays a tensor on the model's device: reading one is a
/// device synchronisation, done at the logging interval, not every step.
#[derive(Debug, Clone)]
pub struct StepLosses {
    /// The weighted sum of the enabled objectives, 0-d, with its graph: call `backward`.
    pub total: Tensor,
    /// Each enabled objective's unweighted value (`itc`, `clip` or `vsepp`, `itm`, `mlm`), then the
    /// weighted `total`; 0-d, detached.
    pub parts: Vec<(&'static str, Tensor)>,
    /// The temperature after clamping, 0-d.
    pub temp: Tensor,
    pub stats: StepStats,
    /// What the step puts into the queues once its update is known to be finite.
    pub queue_entry: Option<QueueEntry>,
}

/// This batch's momentum features (and image ids), for [`AlbefModel::enqueue`] after the
/// step (gathered over the ranks first).
#[derive(Debug, Clone)]
pub struct QueueEntry {
    /// `[B, E]`.
    pub image_feat_m: Tensor,
    /// `[B, E]`.
    pub text_feat_m: Tensor,
    /// `[B]` i64.
    pub image_ids: Option<Tensor>,
}

impl StepLosses {
    /// Every part's value, read from the device in one transfer.
    pub fn values(&self) -> Result<Vec<(&'static str, f64)>> {
        read_parts(&self.parts)
    }

    /// The value of the part named `name`.
    pub fn part(&self, name: &str) -> Result<Option<f64>> {
        Ok(self
            .values()?
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v))
    }
}

/// Named 0-d tensors read in one device transfer.
pub fn read_parts(parts: &[(&'static str, Tensor)]) -> Result<Vec<(&'static str, f64)>> {
    if parts.is_empty() {
        return Ok(Vec::new());
    }
    let tensors: Vec<Tensor> = parts
        .iter()
        .map(|(_, t)| t.to_dtype(DType::F64)?.reshape(1))
        .collect::<candle_core::Result<_>>()?;
    let values = Tensor::cat(&tensors, 0)?.to_vec1::<f64>()?;
    Ok(parts.iter().map(|(n, _)| *n).zip(values).collect())
}

/// The losses of one pretraining step, in ALBEF's order: 1 clamp the temperature; 2 the
/// online image and text encoders; 3-4 the momentum encoders (ALBEF updates the momentum
/// twin first; here that update ends the previous step, see `train_step`, which leaves
/// the same weights in place); 5 ITC (or VSE++) against the stored queues; 6 the momentum
/// features to enqueue ([`StepLosses::queue_entry`]); 7 ITM with hard negatives; 8 MLM
/// with distillation; 9 the weighted total. Objectives that are off are not computed.
///
/// # Shapes
/// See [`StepBatch`]; `alpha` is the distillation weight in effect (see
/// [`crate::objectives::itc::alpha_at`]).
pub fn pretrain_losses(
    model: &AlbefModel,
    batch: &StepBatch,
    cfg: &ObjectiveConfig,
    alpha: f64,
    draws: Draws,
) -> Result<StepLosses> {
    let one: Arc<dyn Collective> = Arc::new(vlp_dist::SingleProcess);
    pretrain_losses_across(model, batch, cfg, alpha, draws, &one, None)
}

/// [`pretrain_losses`] as one of the processes of `ranks`: what differs is ITM with
/// `itm.negative_all_rank`, whose negatives come from every rank's batch. `teacher`: a
/// frozen model teaching `distill` (none: the model's own fusion encoder).
pub fn pretrain_losses_across(
    model: &AlbefModel,
    batch: &StepBatch,
    cfg: &ObjectiveConfig,
    alpha: f64,
    draws: Draws,
    ranks: &Arc<dyn Collective>,
    teacher: Option<&AlbefModel>,
) -> Result<StepLosses> {
    cfg.validate()?;
    let (itc_on, clip_on, vsepp_on, itm_on, mlm_on) = (
        cfg.itc_on(),
        cfg.clip_on(),
        cfg.vsepp_on(),
        cfg.itm_on(),
        cfg.mlm_on(),
    );
    if !(itc_on || clip_on || vsepp_on || itm_on || mlm_on || cfg.distill_on()) {
        return Err(TrainError::config("objectives", "every objective is off"));
    }
    if (itm_on || mlm_on) && !matches!(model.config().text.layout, Layout::Albef { .. }) {
        return Err(TrainError::config(
            "itm/mlm",
            "ITM and MLM pretraining need ALBEF's text/fusion layout",
        ));
    }
    let (b, _) = batch.input_ids.dims2()?;
    if batch.images.dim(0)? != b || batch.attention_mask.dims() != batch.input_ids.dims() {
        return Err(TrainError::input(
            "batch",
            format!(
                "images {:?}, input_ids {:?}, attention_mask {:?}",
                batch.images.dims(),
                batch.input_ids.dims(),
                batch.attention_mask.dims()
            ),
        ));
    }
    if batch.host.input_ids.len() != b
        || batch
            .host
            .image_ids
            .as_ref()
            .is_some_and(|ids| ids.len() != b)
    {
        return Err(TrainError::input(
            "batch",
            "the host copies of the ids do not match the batch (build it with StepBatch::new)",
        ));
    }
    let image_ids = match (&batch.image_ids, cfg.image_id_positives) {
        (Some(ids), _) => {
            let ids = ids.flatten_all()?.to_dtype(DType::I64)?;
            if ids.dim(0)? != b {
                return Err(TrainError::input(
                    "image_ids",
                    format!("{} ids for a batch of {b}", ids.dim(0)?),
                ));
            }
            Some(ids)
        }
        (None, true) => {
            return Err(TrainError::input(
                "image_ids",
                "image_id_positives is on but the batch carries no image ids",
            ))
        }
        (None, false) => None,
    };
    let positive_ids = if cfg.image_id_positives {
        image_ids.as_ref()
    } else {
        None
    };
    let _seeded_dropout = match &draws {
        Draws::Seeded(seed) => Some(nn::seed_dropout(derive_seed(&[*seed, DROPOUT_STREAM]))),
        Draws::Replay { .. } => None,
    };
    let train = true;

    // 1. The temperature, clamped in place without a gradient.
    model.clamp_temp()?;
    let temp = model.temp();

    // 2. Online unimodal encoders.
    let (image_tokens, image_feat) = model.encode_image(&batch.images, train)?;
    let (text_states, text_feat) =
        model.encode_text(&batch.input_ids, &batch.attention_mask, train)?;

    // 3-4. The momentum twin's forward (its update ended the previous step).
    let needs_image_m = itc_on || mlm_on;
    let image_m = if needs_image_m {
        Some(model.encode_image_m(&batch.images, train)?)
    } else {
        None
    };
    let text_feat_m = if itc_on {
        Some(
            model
                .encode_text_m(&batch.input_ids, &batch.attention_mask, train)?
                .1,
        )
    } else {
        None
    };

    let mut parts: Vec<(&'static str, Tensor)> = Vec::new();
    let mut weighted: Vec<Tensor> = Vec::new();
    let mut add = |name: &'static str, loss: &Tensor, weight: f64| -> Result<()> {
        parts.push((name, loss.detach()));
        weighted.push(loss.affine(weight, 0.0)?);
        Ok(())
    };

    // 5. The contrastive objective against the queues as stored (the enqueue comes after
    // the step's backward, so they need no copy).
    let mut local_sims: Option<(Tensor, Tensor)> = None;
    let mut queue_entry = None;
    if let (true, Some((_, image_feat_m)), Some(text_feat_m)) = (itc_on, &image_m, &text_feat_m) {
        let image_queue = model.image_queue();
        let text_queue = model.text_queue();
        let idx_queue = model.idx_queue();
        let out = itc_loss(&ItcInputs {
            image_feat: &image_feat,
            text_feat: &text_feat,
            image_feat_m,
            text_feat_m,
            image_queue: &image_queue,
            text_queue: &text_queue,
            temp,
            alpha,
            image_ids: positive_ids.map(|batch| ImageIds {
                batch,
                queue: &idx_queue,
            }),
        })?;
        add("itc", &out.loss, cfg.contrastive.weight)?;
        local_sims = Some((out.sim_i2t.detach(), out.sim_t2i.detach()));
        // 6. The momentum features (and image ids) the step will enqueue.
        queue_entry = Some(QueueEntry {
            image_feat_m: image_feat_m.detach(),
            text_feat_m: text_feat_m.detach(),
            image_ids: image_ids.clone(),
        });
    }
    if clip_on {
        let out = clip_loss(&image_feat, &text_feat, temp, positive_ids)?;
        add("clip", &out.loss, cfg.contrastive.weight)?;
        local_sims = Some((out.sim_i2t.detach(), out.sim_t2i.detach()));
    }
    if vsepp_on {
        let c = &cfg.contrastive;
        let loss = vsepp_loss(
            &image_feat,
            &text_feat,
            c.margin,
            c.max_violation,
            positive_ids,
        )?;
        add("vsepp", &loss, c.weight)?;
    }

    let mut stats = StepStats::default();
    // ITM reads the unimodal outputs; with `itm.fusion_only` their values alone, so that
    // its gradient trains the fusion layers and its head, not the dual encoders.
    let (itm_text_states, itm_image_tokens) = if cfg.itm.fusion_only {
        (text_states.detach(), image_tokens.detach())
    } else {
        (text_states.clone(), image_tokens.clone())
    };
    // 7. ITM with hard negatives from the online in-batch similarities (or, BLIP's
    // negative_all_rank, from every rank's batch).
    let all_ranks = cfg.itm.negative_all_rank && ranks.world_size() > 1;
    if let (true, true, Draws::Seeded(seed)) = (itm_on, all_ranks, &draws) {
        let ids = if cfg.image_id_positives {
            batch.host.image_ids.as_deref()
        } else {
            None
        };
        let mut rng = Rng::new(derive_seed(&[*seed, ITM_STREAM]));
        let c = all_rank_candidates(
            ranks,
            &image_feat,
            &text_feat,
            temp,
            ids,
            &itm_text_states,
            &batch.attention_mask,
            &itm_image_tokens,
            cfg.itm.hardness,
            &mut rng,
        )?;
        let negatives = c.negatives.first(cfg.itm.scored_pairs(b));
        stats.itm_fallbacks = negatives.fallbacks();
        let loss = itm_loss_at(
            model,
            &c.text_states,
            &c.attention_mask,
            &c.image_tokens,
            &negatives,
            c.own,
            train,
        )?;
        add("itm", &loss, cfg.itm.weight)?;
    } else if itm_on {
        let negatives = match &draws {
            Draws::Seeded(seed) => {
                let (sim_i2t, sim_t2i) = match local_sims.take() {
                    Some(s) => s,
                    None => {
                        let i2t = image_feat
                            .matmul(&text_feat.t()?)?
                            .broadcast_div(temp)?
                            .detach();
                        let t2i = i2t.t()?.contiguous()?;
                        (i2t, t2i)
                    }
                };
                let ids = if cfg.image_id_positives {
                    batch.host.image_ids.as_deref()
                } else {
                    None
                };
                let positives = positive_pairs(b, ids);
                let mut rng = Rng::new(derive_seed(&[*seed, ITM_STREAM]));
                sample_negatives(&sim_i2t, &sim_t2i, &positives, cfg.itm.hardness, &mut rng)?
            }
            Draws::Replay {
                neg_image_for_text,
                neg_text_for_image,
                ..
            } => Negatives::replay(neg_image_for_text, neg_text_for_image, b)?,
        }
        .first(cfg.itm.scored_pairs(b));
        stats.itm_fallbacks = negatives.fallbacks();
        let loss = itm_loss(
            model,
            &itm_text_states,
            &batch.attention_mask,
            &itm_image_tokens,
            &negatives,
            train,
        )?;
        add("itm", &loss, cfg.itm.weight)?;
    }

    // 7b. The cross-encoder's scores distilled into the ITC similarities.
    if cfg.distill_on() {
        let (t_model, (t_states, t_text_feat), (t_tokens, t_image_feat)) = match teacher {
            Some(t) => (
                t,
                t.encode_text(&batch.input_ids, &batch.attention_mask, false)?,
                t.encode_image(&batch.images, false)?,
            ),
            None => (
                model,
                (text_states.clone(), text_feat.clone()),
                (image_tokens.clone(), image_feat.clone()),
            ),
        };
        let loss = distill(
            &cfg.distill,
            &DistillInputs {
                image_feat: &image_feat,
                text_feat: &text_feat,
                temp,
                teacher: t_model,
                teacher_text_states: &t_states,
                teacher_image_tokens: &t_tokens,
                teacher_image_feat: &t_image_feat,
                teacher_text_feat: &t_text_feat,
                teacher_temp: t_model.temp(),
                attention_mask: &batch.attention_mask,
            },
        )?;
        add("distill", &loss, cfg.distill.weight)?;
    }

    // 8. MLM with distillation from the momentum model.
    if let (true, Some((image_tokens_m, _))) = (mlm_on, &image_m) {
        let dev = batch.input_ids.device();
        let (masked_ids, labels) = match &draws {
            Draws::Seeded(seed) => {
                let mut rng = Rng::new(derive_seed(&[*seed, MLM_STREAM]));
                let masked = mask_tokens(
                    &batch.host.input_ids,
                    &batch.host.attention_mask,
                    &model.config().text,
                    cfg.mlm.probability,
                    &mut rng,
                );
                let labels: Vec<i64> = masked.labels.into_iter().flatten().collect();
                (Tensor::new(masked.input_ids, dev)?, labels)
            }
            Draws::Replay {
                mlm_input_ids,
                mlm_labels,
                ..
            } => (
                mlm_input_ids.clone(),
                mlm_labels
                    .flatten_all()?
                    .to_dtype(DType::I64)?
                    .to_vec1::<i64>()?,
            ),
        };
        let (loss, masked) = mlm_loss(
            model,
            &masked_ids,
            &labels,
            &batch.attention_mask,
            &image_tokens,
            image_tokens_m,
            alpha,
            train,
        )?;
        stats.masked_tokens = masked;
        add("mlm", &loss, cfg.mlm.weight)?;
    }

    // 9. The weighted total.
    let mut total = weighted[0].clone();
    for w in &weighted[1..] {
        total = (total + w)?;
    }
    parts.push(("total", total.detach()));
    Ok(StepLosses {
        total,
        parts,
        temp: temp.detach(),
        stats,
        queue_entry,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::ContrastiveKind;
    use candle_core::{Device, Var};
    use candle_nn::{VarBuilder, VarMap};
    use vlp_models::config::AlbefConfig;

    /// `AlbefConfig::micro` with a queue of 5 (not a multiple of the batch of 3).
    fn micro() -> AlbefConfig {
        AlbefConfig {
            queue_size: 5,
            ..vlp_models::test_support::micro_config()
        }
    }

    fn build(cfg: &AlbefConfig) -> Result<(VarMap, AlbefModel)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = AlbefModel::new(cfg, vb)?;
        model.copy_params_to_momentum()?;
        Ok((varmap, model))
    }

    /// A second model with the same tensors as `varmap`'s.
    fn clone_model(cfg: &AlbefConfig, varmap: &VarMap) -> Result<(VarMap, AlbefModel)> {
        let (copy, model) = build(cfg)?;
        {
            let src = varmap.data().lock().unwrap();
            let dst = copy.data().lock().unwrap();
            for (name, var) in dst.iter() {
                var.set(&src[name].as_tensor().copy()?)?;
            }
        }
        Ok((copy, model))
    }

    fn batch(b: usize, image_ids: Option<Vec<i64>>) -> Result<StepBatch> {
        let dev = Device::Cpu;
        let rows: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                let words = 3 + r % 3;
                let mut row = vec![2u32];
                row.extend((0..words).map(|k| 5 + ((r * 7 + k * 3) % 45) as u32));
                row.push(3);
                row.resize(8, 0);
                row
            })
            .collect();
        let mask: Vec<Vec<u32>> = rows
            .iter()
            .map(|row| row.iter().map(|&t| u32::from(t != 0)).collect())
            .collect();
        let images: Vec<f32> = (0..b * 3 * 32 * 32)
            .map(|k| ((k * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        StepBatch::new(
            &Tensor::from_vec(images, (b, 3, 32, 32), &dev)?,
            &Tensor::new(rows, &dev)?,
            &Tensor::new(mask, &dev)?,
            image_ids,
            &dev,
        )
    }

    /// Whether a trainable variable whose name contains `needle` got a non-zero gradient.
    fn has_gradient(
        model: &AlbefModel,
        grads: &candle_core::backprop::GradStore,
        needle: &str,
    ) -> bool {
        model.trainable_vars().unwrap().into_iter().any(|(n, v)| {
            n.contains(needle)
                && grads.get(v.as_tensor()).is_some_and(|g| {
                    g.abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                        > 0.0
                })
        })
    }

    /// Distillation alone: its gradient reaches the dual encoders and their projections,
    /// never the teacher's fusion layers or ITM head (the teacher is the model itself).
    #[test]
    fn distillation_teaches_the_dual_encoders_only() -> Result<()> {
        let (_, model) = build(&micro())?;
        for kind in ["kl", "mse", "margin-mse"] {
            let mut o = ObjectiveConfig::default();
            o.contrastive.enabled = false;
            o.itm.enabled = false;
            o.mlm.enabled = false;
            o.distill.enabled = true;
            o.distill.candidates = 3;
            o.distill.kind = serde_json::from_value(serde_json::json!(kind)).unwrap();
            let l = pretrain_losses(&model, &batch(4, None)?, &o, 0.4, Draws::Seeded(0))?;
            assert_eq!(
                l.parts.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
                ["distill", "total"]
            );
            let grads = l.total.backward()?;
            let got = |needle: &str| has_gradient(&model, &grads, needle);
            assert!(
                got("vision_proj") && got("text_proj") && got("visual_encoder"),
                "{kind}: the student learns"
            );
            assert!(
                !got("itm_head") && !got("crossattention"),
                "{kind}: the teacher got a gradient"
            );
        }
        Ok(())
    }

    /// ITM's `batch_fraction`: the step scores only the first pairs, each with its
    /// negative image and negative text, which still index the whole batch. Checked
    /// against the fusion passes assembled by hand, at a fraction of 1/2 and of 1.
    #[test]
    fn itm_batch_fraction_scores_the_first_pairs_only() -> Result<()> {
        let mut cfg = micro();
        cfg.text.dropout = 0.0;
        let b = 4;
        let batch = batch(b, None)?;
        let (neg_image, neg_text) = (vec![3usize, 2, 1, 0], vec![2usize, 3, 0, 1]);
        // ITM's loss over the first `m` pairs, from (text, image, label) rows: the positives,
        // then the texts' negative images, then the images' negative texts. Training
        // passes, as the step's (no dropout here): the same kernels, the same rounding.
        let by_hand = |model: &AlbefModel, tokens: &Tensor, states: &Tensor, m: usize| {
            let mut pairs: Vec<(usize, usize, usize)> = (0..m).map(|k| (k, k, 1)).collect();
            pairs.extend((0..m).map(|k| (k, neg_image[k], 0)));
            pairs.extend((0..m).map(|k| (neg_text[k], k, 0)));
            let rows = |pick: fn(&(usize, usize, usize)) -> usize| {
                let v: Vec<u32> = pairs.iter().map(|p| pick(p) as u32).collect();
                Tensor::new(v.as_slice(), &Device::Cpu)
            };
            let (t, i) = (rows(|p| p.0)?, rows(|p| p.1)?);
            let fused = model.fuse_cls(
                vlp_models::FusionText::States(&states.index_select(&t, 0)?),
                &batch.attention_mask.index_select(&t, 0)?,
                &tokens.index_select(&i, 0)?,
                true,
            )?;
            let logp =
                candle_nn::ops::log_softmax(&model.itm_logits(&fused)?, 1)?.to_vec2::<f32>()?;
            let sum: f64 = pairs
                .iter()
                .zip(&logp)
                .map(|(p, row)| f64::from(row[p.2]))
                .sum();
            Ok::<f64, TrainError>(-sum / pairs.len() as f64)
        };
        // A freshly initialised fusion encoder answers nearly alike for every pair, so the
        // losses over 2 and over 4 pairs can come within rounding of each other: draw
        // initialisations until they are at least 1e-4 apart, so that the check below
        // can tell them apart.
        let mut drawn = None;
        for _ in 0..50 {
            let (vm, model) = build(&cfg)?;
            // A larger ITM head than the initial one, whose answers are all near ln 2.
            let head = &vm.data().lock().unwrap()["itm_head.weight"];
            let n = head.elem_count();
            let w: Vec<f32> = (0..n).map(|k| ((k * 29 % 17) as f32 - 8.0) / 4.0).collect();
            head.set(&Tensor::from_vec(w, head.shape(), &Device::Cpu)?)?;
            let (tokens, _) = model.encode_image(&batch.images, true)?;
            let (states, _) = model.encode_text(&batch.input_ids, &batch.attention_mask, true)?;
            let first = by_hand(&model, &tokens, &states, 2)?;
            let every = by_hand(&model, &tokens, &states, b)?;
            if (first - every).abs() > 1e-4 {
                drawn = Some((model, first, every));
                break;
            }
        }
        let (model, first, every) = drawn.expect("an initialisation that tells 2 pairs from 4");
        let mut o = ObjectiveConfig::default();
        o.contrastive.enabled = false;
        o.mlm.enabled = false;
        for (fraction, expect) in [(0.5, first), (1.0, every)] {
            o.itm.batch_fraction = fraction;
            let draws = Draws::Replay {
                neg_image_for_text: neg_image.clone(),
                neg_text_for_image: neg_text.clone(),
                mlm_input_ids: batch.input_ids.clone(),
                mlm_labels: batch.input_ids.to_dtype(DType::I64)?,
            };
            let got = pretrain_losses(&model, &batch, &o, 0.0, draws)?
                .part("itm")?
                .expect("an itm part");
            assert!((got - expect).abs() < 1e-5, "{fraction}: {got} vs {expect}");
        }
        Ok(())
    }

    /// `itm.fusion_only`: ITM's gradient reaches the fusion layers and its head, never
    /// the image encoder or the text-only layers; without it, it reaches all of them.
    #[test]
    fn itm_fusion_only_leaves_the_dual_encoders_alone() -> Result<()> {
        let (_, model) = build(&micro())?;
        let mut o = ObjectiveConfig::default();
        o.contrastive.enabled = false;
        o.mlm.enabled = false;
        for fusion_only in [true, false] {
            o.itm.fusion_only = fusion_only;
            let l = pretrain_losses(&model, &batch(4, None)?, &o, 0.0, Draws::Seeded(0))?;
            let grads = l.total.backward()?;
            let got = |needle: &str| has_gradient(&model, &grads, needle);
            assert!(got("itm_head") && got("crossattention"), "{fusion_only}");
            assert_eq!(got("visual_encoder"), !fusion_only);
            assert_eq!(got("encoder.layer.0."), !fusion_only);
        }
        Ok(())
    }

    /// What `train_step` does with a finite step's queue entry.
    fn enqueue(model: &AlbefModel, losses: &StepLosses) -> Result<()> {
        if let Some(q) = &losses.queue_entry {
            model.enqueue(&q.image_feat_m, &q.text_feat_m, q.image_ids.as_ref())?;
        }
        Ok(())
    }

    fn sgd(model: &AlbefModel, total: &Tensor, lr: f64) -> Result<()> {
        let grads = total.backward()?;
        for (_, var) in model.trainable_vars()? {
            if let Some(g) = grads.get(var.as_tensor()) {
                var.set(&(var.as_tensor() - g.affine(lr, 0.0)?)?)?;
            }
        }
        Ok(())
    }

    fn all_tensors(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
        let data = varmap.data().lock().unwrap();
        let mut out: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(n, v): (&String, &Var)| {
                let t = v.as_tensor().to_dtype(DType::F32).unwrap();
                (
                    n.clone(),
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn same_seed_gives_identical_losses_and_weights_over_two_sgd_steps() -> Result<()> {
        let cfg = micro();
        let (vm_a, a) = build(&cfg)?;
        let (vm_b, b) = clone_model(&cfg, &vm_a)?;
        let objectives = ObjectiveConfig::default();
        let batch = batch(3, None)?;
        for seed in [11u64, 12] {
            let la = pretrain_losses(&a, &batch, &objectives, 0.4, Draws::Seeded(seed))?;
            let lb = pretrain_losses(&b, &batch, &objectives, 0.4, Draws::Seeded(seed))?;
            assert_eq!(la.values()?, lb.values()?);
            assert_eq!(la.stats, lb.stats);
            assert!(la.stats.masked_tokens >= 1);
            sgd(&a, &la.total, 0.1)?;
            sgd(&b, &lb.total, 0.1)?;
        }
        assert_eq!(all_tensors(&vm_a), all_tensors(&vm_b));
        // A different seed draws differently (dropout, negatives, masks).
        let l1 = pretrain_losses(&a, &batch, &objectives, 0.4, Draws::Seeded(1))?;
        let (_, c) = clone_model(&cfg, &vm_a)?;
        let l2 = pretrain_losses(&c, &batch, &objectives, 0.4, Draws::Seeded(2))?;
        assert_ne!(l1.values()?, l2.values()?);
        Ok(())
    }

    #[test]
    fn objectives_that_are_off_are_not_computed() -> Result<()> {
        let cfg = micro();
        let (_vm, model) = build(&cfg)?;
        let batch = batch(3, None)?;
        let names = |o: &ObjectiveConfig| -> Result<Vec<&'static str>> {
            let l = pretrain_losses(&model, &batch, o, 0.4, Draws::Seeded(0))?;
            assert!(l.total.to_scalar::<f32>()?.is_finite());
            enqueue(&model, &l)?;
            Ok(l.parts.iter().map(|(n, _)| *n).collect())
        };
        let mut clip = ObjectiveConfig::default();
        clip.itm.enabled = false;
        clip.mlm.weight = 0.0;
        let ptr = model.queue_ptr()?;
        assert_eq!(names(&clip)?, vec!["itc", "total"]);
        assert_eq!(model.queue_ptr()?, (ptr + 3) % 5);

        let mut vsepp = ObjectiveConfig::default();
        vsepp.contrastive.kind = ContrastiveKind::Vsepp;
        let ptr = model.queue_ptr()?;
        assert_eq!(names(&vsepp)?, vec!["vsepp", "itm", "mlm", "total"]);
        assert_eq!(model.queue_ptr()?, ptr, "VSE++ does not use the queue");

        let mut itm_only = ObjectiveConfig::default();
        itm_only.contrastive.enabled = false;
        itm_only.mlm.enabled = false;
        assert_eq!(names(&itm_only)?, vec!["itm", "total"]);

        let mut none = itm_only.clone();
        none.itm.enabled = false;
        assert!(pretrain_losses(&model, &batch, &none, 0.4, Draws::Seeded(0)).is_err());
        Ok(())
    }

    #[test]
    fn queue_wraps_when_its_size_is_not_a_multiple_of_the_batch() -> Result<()> {
        let cfg = micro();
        let (_vm, model) = build(&cfg)?;
        let batch = batch(3, Some(vec![10, 11, 12]))?;
        let objectives = ObjectiveConfig::default();
        let mut ptrs = vec![model.queue_ptr()?];
        for seed in 0..3 {
            let l = pretrain_losses(&model, &batch, &objectives, 0.4, Draws::Seeded(seed))?;
            assert_eq!(
                model.queue_ptr()?,
                *ptrs.last().unwrap(),
                "no enqueue before the update"
            );
            enqueue(&model, &l)?;
            ptrs.push(model.queue_ptr()?);
        }
        assert_eq!(ptrs, vec![0, 3, 1, 4]);
        // Step 2 wrote columns 3, 4, 0 (wrapping); step 3 columns 1, 2, 3.
        let ids = model.idx_queue().to_vec2::<i64>()?;
        assert_eq!(ids[0], vec![12, 10, 11, 12, 11]);
        Ok(())
    }

    #[test]
    fn image_id_positives_need_ids_and_a_batch_of_one_image_counts_fallbacks() -> Result<()> {
        let cfg = micro();
        let (_vm, model) = build(&cfg)?;
        let objectives = ObjectiveConfig {
            image_id_positives: true,
            ..Default::default()
        };
        let no_ids = batch(3, None)?;
        let err = pretrain_losses(&model, &no_ids, &objectives, 0.4, Draws::Seeded(0));
        assert!(err.unwrap_err().to_string().contains("image_ids"));

        let same = batch(3, Some(vec![7, 7, 7]))?;
        let l = pretrain_losses(&model, &same, &objectives, 0.4, Draws::Seeded(0))?;
        assert_eq!(l.stats.itm_fallbacks, 6);
        assert!(l.total.to_scalar::<f32>()?.is_finite());

        let one = batch(1, None)?;
        let l = pretrain_losses(
            &model,
            &one,
            &ObjectiveConfig::default(),
            0.4,
            Draws::Seeded(0),
        )?;
        assert_eq!(l.stats.itm_fallbacks, 2);
        assert!(l.total.to_scalar::<f32>()?.is_finite());
        Ok(())
    }
}
