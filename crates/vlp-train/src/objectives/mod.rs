//! The pretraining objectives of ALBEF (paper §3.2-3.3): image-text contrastive learning
//! with momentum distillation ([`itc`]), or VSE++'s hardest-negative triplet loss in its
//! place ([`vsepp`]); image-text matching with hard negatives ([`itm`]); masked language
//! modelling with momentum distillation ([`mlm`]). Each objective has one home and returns
//! its named loss; [`crate::step`] runs them in the reference order. The model exposes
//! encoders and heads only.

pub mod distill;
pub mod itc;
pub mod itm;
pub mod mlm;
pub mod vsepp;

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use vlp_models::nn;

use crate::error::{Result, TrainError};

/// Which contrastive loss aligns the unimodal features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContrastiveKind {
    /// ALBEF's ITC: InfoNCE over the batch and the queues, with momentum distillation.
    Itc,
    /// VSE++ (Faghri et al. 2018): triplet loss on in-batch cosine similarities.
    Vsepp,
    /// CLIP's loss: InfoNCE over the batch with online features on both sides, no queue
    /// and no momentum distillation (robust in short runs, where the momentum twin still
    /// lags the online model).
    Clip,
}

/// The contrastive objective (ITC or VSE++).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContrastiveConfig {
    pub enabled: bool,
    pub kind: ContrastiveKind,
    pub weight: f64,
    /// VSE++ only: the triplet margin.
    pub margin: f64,
    /// VSE++ only: hardest negative per query (VSE++) instead of the sum over negatives
    /// (VSE0).
    pub max_violation: bool,
}

impl Default for ContrastiveConfig {
    fn default() -> Self {
        ContrastiveConfig {
            enabled: true,
            kind: ContrastiveKind::Itc,
            weight: 1.0,
            margin: 0.2,
            max_violation: true,
        }
    }
}

/// An objective that is on or off and weighted in the total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ItmConfig {
    pub enabled: bool,
    pub weight: f64,
    /// Draw each hard negative from every rank's batch (BLIP's `negative_all_rank`; the
    /// negatives' token states are gathered with their gradients) instead of the local
    /// batch (ALBEF). The same as local with one process.
    pub negative_all_rank: bool,
    /// The optimizer step at which ITM joins the loss (0: from the start). Its hard
    /// negatives are drawn by the contrastive similarities, which are noise until the
    /// contrastive objective has learnt something.
    pub start_step: u64,
    /// How hard the negatives are: the similarities (`cos / temp`) they are drawn by are
    /// scaled by this before the softmax. 1 is ALBEF's draw; 0 draws uniformly among the
    /// admissible pairs (random negatives); in between, softer. With the `clip` contrastive
    /// kind the draw reads the model's own current similarities (ALBEF's reads the
    /// momentum twin's lagging text features), and at 1 a small fusion encoder trained
    /// from scratch may never leave its prior (docs/training.md).
    pub hardness: f64,
    /// Steps over which the hardness rises linearly from 0 (random negatives) at
    /// `start_step` to `hardness`: a curriculum that lets ITM leave its prior on easy
    /// negatives before it sees the model's closest confusions. 0: `hardness` throughout.
    pub hardness_ramp_steps: u64,
    /// The share of each micro-batch's pairs that ITM scores: the first
    /// `ceil(fraction x B)` pairs, each with its negative image and negative text, which
    /// are still drawn from the whole batch. ITM's cost (fusion passes and their backward)
    /// falls in proportion while its negatives stay as hard. 1: every pair (ALBEF).
    pub batch_fraction: f64,
    /// ITM trains only the fusion layers and its head: it reads the image tokens and
    /// the text-only states without their gradient, so the dual encoders learn from the
    /// contrastive objective alone, and ITM's backward stops at the fusion layers.
    pub fusion_only: bool,
}

impl ItmConfig {
    /// How many of a micro-batch's `b` pairs ITM scores (at least one).
    pub fn scored_pairs(&self, b: usize) -> usize {
        ((b as f64 * self.batch_fraction).ceil() as usize).clamp(1, b.max(1))
    }
}

impl Default for ItmConfig {
    fn default() -> Self {
        ItmConfig {
            enabled: true,
            weight: 1.0,
            negative_all_rank: false,
            start_step: 0,
            hardness: 1.0,
            hardness_ramp_steps: 0,
            batch_fraction: 1.0,
            fusion_only: false,
        }
    }
}

/// Masked language modelling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MlmConfig {
    pub enabled: bool,
    pub weight: f64,
    /// Probability that a maskable token is masked (BERT, ALBEF: 0.15).
    pub probability: f64,
    /// The optimizer step at which MLM joins the loss (0: from the start).
    pub start_step: u64,
}

impl Default for MlmConfig {
    fn default() -> Self {
        MlmConfig {
            enabled: true,
            weight: 1.0,
            probability: 0.15,
            start_step: 0,
        }
    }
}

/// The pretraining objectives and their knobs. `Default` is ALBEF's pretraining: ITC +
/// ITM + MLM, each weight 1, alpha 0.4, momentum 0.995. ITC alone is CLIP-style training
/// (with ALBEF's queues and distillation unless `alpha` = 0).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    pub contrastive: ContrastiveConfig,
    pub itm: ItmConfig,
    pub mlm: MlmConfig,
    /// Weight of the momentum teacher's soft targets (ITC and MLM distillation).
    pub alpha: f64,
    /// Steps over which alpha ramps linearly from 0 (ALBEF: the first epoch); 0 = no ramp.
    pub alpha_ramp_steps: u64,
    /// EMA factor of the momentum twin.
    pub momentum: f64,
    /// Treat every pair with the same image id as a positive (fine-tuning on datasets with
    /// several captions per image); the batch must then carry image ids.
    pub image_id_positives: bool,
    /// ITM's scores distilled into the ITC similarities ([`distill`]).
    pub distill: distill::DistillConfig,
    /// Whether the ITC temperature is learned (ALBEF, BLIP) or kept at the model's initial
    /// value. AdamW moves a parameter by about the learning rate per step whatever its
    /// gradient's scale, so a short run at a high learning rate can drive the raw
    /// temperature to its floor within a hundred steps.
    pub learn_temp: bool,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        ObjectiveConfig {
            contrastive: ContrastiveConfig::default(),
            itm: ItmConfig::default(),
            mlm: MlmConfig::default(),
            alpha: 0.4,
            alpha_ramp_steps: 0,
            momentum: 0.995,
            image_id_positives: false,
            distill: distill::DistillConfig::default(),
            learn_temp: true,
        }
    }
}

impl ObjectiveConfig {
    /// The objectives in effect at optimizer step `step` (0-based): ITM and MLM are off
    /// before their `start_step`, and ITM's hardness follows its ramp.
    pub fn at_step(&self, step: u64) -> ObjectiveConfig {
        let mut now = self.clone();
        now.itm.enabled &= step >= self.itm.start_step;
        let ramp = self.itm.hardness_ramp_steps;
        if ramp > 0 {
            let done = step.saturating_sub(self.itm.start_step).min(ramp);
            now.itm.hardness = self.itm.hardness * done as f64 / ramp as f64;
        }
        now.mlm.enabled &= step >= self.mlm.start_step;
        now
    }

    /// Whether ITC runs (on, weight non-zero, kind ITC).
    pub fn itc_on(&self) -> bool {
        let c = &self.contrastive;
        c.enabled && c.weight != 0.0 && c.kind == ContrastiveKind::Itc
    }

    /// Whether a step with these objectives moves the momentum twin and fills the queues
    /// (ALBEF's ITC and MLM distil from them; CLIP's loss, VSE++ and ITM do not).
    pub fn updates_momentum(&self) -> bool {
        self.itc_on() || self.mlm_on()
    }

    /// Whether VSE++ runs.
    pub fn vsepp_on(&self) -> bool {
        let c = &self.contrastive;
        c.enabled && c.weight != 0.0 && c.kind == ContrastiveKind::Vsepp
    }

    /// Whether the optimizer updates the parameter `name` (the temperature only when
    /// `learn_temp`); the one rule every optimizer of a recipe's model follows.
    pub fn trains(&self, name: &str) -> bool {
        self.learn_temp || name != "temp"
    }

    /// Whether CLIP's in-batch contrastive loss runs.
    pub fn clip_on(&self) -> bool {
        let c = &self.contrastive;
        c.enabled && c.weight != 0.0 && c.kind == ContrastiveKind::Clip
    }

    pub fn itm_on(&self) -> bool {
        self.itm.enabled && self.itm.weight != 0.0
    }

    pub fn mlm_on(&self) -> bool {
        self.mlm.enabled && self.mlm.weight != 0.0
    }

    pub fn distill_on(&self) -> bool {
        self.distill.enabled && self.distill.weight != 0.0
    }

    /// Checks ranges, naming the offending key; every float must be finite. Each
    /// reason starts with the value refused (`1.5: must be <= 1`).
    pub fn validate(&self) -> Result<()> {
        use crate::bounds::{refusal, Bound::*};
        let unit = [AtLeast(0.0), AtMost(1.0)];
        let non_negative = [AtLeast(0.0)];
        let temperature = [Above(0.0)];
        let d = &self.distill;
        for (field, v, bounds) in [
            ("alpha", self.alpha, &unit[..]),
            ("momentum", self.momentum, &unit),
            ("mlm.probability", self.mlm.probability, &unit),
            ("contrastive.margin", self.contrastive.margin, &non_negative),
            ("contrastive.weight", self.contrastive.weight, &non_negative),
            ("itm.weight", self.itm.weight, &non_negative),
            ("mlm.weight", self.mlm.weight, &non_negative),
            ("distill.weight", d.weight, &non_negative),
            ("itm.hardness", self.itm.hardness, &non_negative),
            // A share of the batch's pairs: some, at most all.
            (
                "itm.batch_fraction",
                self.itm.batch_fraction,
                &[Above(0.0), AtMost(1.0)],
            ),
            ("distill.temperature", d.temperature, &temperature),
            (
                "distill.teacher_temperature",
                d.teacher_temperature,
                &temperature,
            ),
        ] {
            if let Some(why) = refusal(v, bounds) {
                return Err(TrainError::config(field, why));
            }
        }
        let least = if d.kind == distill::DistillKind::MarginMse {
            2
        } else {
            1
        };
        if d.candidates < least {
            return Err(TrainError::config(
                "distill.candidates",
                format!(
                    "{}: must be at least {least} for {:?}",
                    d.candidates, d.kind
                ),
            ));
        }
        Ok(())
    }
}

/// `CE_soft(s, y) = mean_rows( -sum(log_softmax(s) * y) )`.
///
/// # Shapes
/// `logits`, `targets`: `[N, C]` -> 0-d.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(nn::soft_cross_entropy(logits, targets)?.mean_all()?)
}

/// Mean cross-entropy against class indices.
///
/// # Shapes
/// `logits`: `[N, C]`, `labels`: `[N]` (u32) -> 0-d.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let labels = labels.to_dtype(DType::U32)?.reshape((n, 1))?;
    let picked = nn::log_softmax(logits)?.gather(&labels, D::Minus1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// The batch size of paired `[B, E]` image and text features; an error naming `what` when
/// the two counts differ.
pub fn paired_batch(what: &str, image_feat: &Tensor, text_feat: &Tensor) -> Result<usize> {
    let (b, _) = image_feat.dims2()?;
    if text_feat.dim(0)? != b {
        return Err(TrainError::input(
            what,
            format!("{b} images for {} texts", text_feat.dim(0)?),
        ));
    }
    Ok(b)
}

/// `[rows, cols]` 0/1 (f32 on `ids`' device) of `row_ids[r] == col_ids[c]`.
pub fn same_id_mask(row_ids: &Tensor, col_ids: &Tensor) -> Result<Tensor> {
    let rows = row_ids.flatten_all()?.to_dtype(DType::I64)?;
    let cols = col_ids.flatten_all()?.to_dtype(DType::I64)?;
    let (r, c) = (rows.dim(0)?, cols.dim(0)?);
    let eq = rows
        .reshape((r, 1))?
        .broadcast_as((r, c))?
        .eq(&cols.reshape((1, c))?.broadcast_as((r, c))?)?;
    Ok(eq.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_albef_and_unknown_keys_are_rejected() {
        let cfg = ObjectiveConfig::default();
        assert!(cfg.itc_on() && cfg.itm_on() && cfg.mlm_on() && !cfg.vsepp_on());
        assert_eq!(
            (cfg.alpha, cfg.momentum, cfg.mlm.probability),
            (0.4, 0.995, 0.15)
        );
        cfg.validate().unwrap();
        let parsed: ObjectiveConfig =
            serde_json::from_str(r#"{"contrastive": {"kind": "vsepp"}, "itm": {"weight": 0}}"#)
                .unwrap();
        assert!(parsed.vsepp_on() && !parsed.itm_on());
        assert_eq!(parsed.contrastive.margin, 0.2);
        let err = serde_json::from_str::<ObjectiveConfig>(r#"{"mlm": {"prob": 0.2}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("prob"), "{err}");
        let bad = ObjectiveConfig {
            alpha: 1.5,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("alpha"));
        for (hardness, teacher_temperature, field) in [
            (-0.5, 1.0, "itm.hardness"),
            (f64::NAN, 1.0, "itm.hardness"),
            (1.0, 0.0, "distill.teacher_temperature"),
        ] {
            let mut bad = ObjectiveConfig::default();
            bad.itm.hardness = hardness;
            bad.distill.teacher_temperature = teacher_temperature;
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        for fraction in [0.0, 1.5, f64::NAN] {
            let mut bad = ObjectiveConfig::default();
            bad.itm.batch_fraction = fraction;
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains("itm.batch_fraction"), "{err}");
        }
        let mut itm = ItmConfig::default();
        assert_eq!(itm.scored_pairs(64), 64);
        for (fraction, pairs) in [(0.25, 16), (0.3, 20), (0.001, 1)] {
            itm.batch_fraction = fraction;
            assert_eq!(itm.scored_pairs(64), pairs, "{fraction}");
        }
        let parsed: ObjectiveConfig = serde_json::from_str(r#"{"itm": {"hardness": 0}}"#).unwrap();
        assert_eq!(
            (parsed.itm.hardness, ObjectiveConfig::default().itm.hardness),
            (0.0, 1.0)
        );
    }

    #[test]
    fn itm_and_mlm_join_at_their_start_steps_and_clip_is_a_kind() {
        let cfg: ObjectiveConfig = serde_json::from_str(
            r#"{"contrastive": {"kind": "clip"}, "itm": {"start_step": 10},
                "mlm": {"start_step": 20}, "learn_temp": false}"#,
        )
        .unwrap();
        assert!(cfg.clip_on() && !cfg.itc_on() && !cfg.vsepp_on() && !cfg.learn_temp);
        let on = |step| {
            let now = cfg.at_step(step);
            (now.itm_on(), now.mlm_on(), now.clip_on())
        };
        assert_eq!(on(0), (false, false, true));
        assert_eq!(on(9), (false, false, true));
        assert_eq!(on(10), (true, false, true));
        assert_eq!(on(20), (true, true, true));
        // The hardness ramp: 0 at the start step, linear, then held.
        let ramped: ObjectiveConfig = serde_json::from_str(
            r#"{"itm": {"start_step": 10, "hardness": 0.8, "hardness_ramp_steps": 40}}"#,
        )
        .unwrap();
        let h = |step| ramped.at_step(step).itm.hardness;
        assert_eq!(
            (h(0), h(10), h(30), h(50), h(500)),
            (0.0, 0.0, 0.4, 0.8, 0.8)
        );
        assert_eq!(cfg.at_step(5).itm.hardness, 1.0);
        // A disabled objective stays off after its start.
        let off = ObjectiveConfig {
            itm: ItmConfig {
                enabled: false,
                ..Default::default()
            },
            ..cfg.clone()
        };
        assert!(!off.at_step(100).itm_on());
    }
}
