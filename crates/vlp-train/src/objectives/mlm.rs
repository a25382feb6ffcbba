//! Masked language modelling conditioned on the image, with momentum distillation
//! (ALBEF paper §3.2 MLM, §3.3 MoD): BERT's masking, the fusion encoder predicts the
//! masked tokens, and the momentum model's predictions soften the targets.

use candle_core::Tensor;
use vlp_core::rng::Rng;
use vlp_models::config::TextConfig;
use vlp_models::{nn, AlbefModel, FusionText};

use super::{cross_entropy, soft_cross_entropy};
use crate::error::{Result, TrainError};

/// Label of a position that is not predicted (PyTorch's `ignore_index`).
pub const NOT_MASKED: i64 = -100;

/// Masked ids and their labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedText {
    /// `[B][L]`: the ids the encoder reads.
    pub input_ids: Vec<Vec<u32>>,
    /// `[B][L]`: the original id at masked positions, [`NOT_MASKED`] elsewhere.
    pub labels: Vec<Vec<i64>>,
}

impl MaskedText {
    /// Number of masked (predicted) positions.
    pub fn masked_count(&self) -> usize {
        self.labels
            .iter()
            .flatten()
            .filter(|&&l| l != NOT_MASKED)
            .count()
    }
}

/// BERT's masking as ALBEF applies it, with our two rules:
/// - a token is maskable unless it is [PAD], [CLS] or [SEP] (ALBEF can mask [SEP]; we
///   do not) or lies under `attention_mask` 0; each maskable token is masked with
///   probability `probability`;
/// - if that masks nothing in the whole batch but something is maskable, one maskable
///   token, drawn uniformly over the batch, is masked, so every step has an MLM signal.
///
/// A masked token becomes [MASK] with probability 0.8, a uniformly random vocabulary id
/// with 0.1, and stays unchanged with 0.1; its label is the original id either way.
pub fn mask_tokens(
    input_ids: &[Vec<u32>],
    attention_mask: &[Vec<u32>],
    text: &TextConfig,
    probability: f64,
    rng: &mut Rng,
) -> MaskedText {
    let special = [text.pad_id, text.cls_id, text.sep_id];
    let maskable =
        |r: usize, p: usize| attention_mask[r][p] != 0 && !special.contains(&input_ids[r][p]);
    let mut chosen: Vec<(usize, usize)> = Vec::new();
    let mut candidates: Vec<(usize, usize)> = Vec::new();
    for (r, row) in input_ids.iter().enumerate() {
        for p in 0..row.len() {
            if maskable(r, p) {
                candidates.push((r, p));
                if rng.bernoulli(probability) {
                    chosen.push((r, p));
                }
            }
        }
    }
    if chosen.is_empty() && !candidates.is_empty() {
        chosen.push(candidates[rng.below(candidates.len() as u64) as usize]);
    }
    let mut ids = input_ids.to_vec();
    let mut labels: Vec<Vec<i64>> = input_ids
        .iter()
        .map(|row| vec![NOT_MASKED; row.len()])
        .collect();
    for (r, p) in chosen {
        labels[r][p] = i64::from(input_ids[r][p]);
        let u = rng.uniform();
        if u < 0.8 {
            ids[r][p] = text.mask_id;
        } else if u < 0.9 {
            ids[r][p] = rng.below(text.vocab_size as u64) as u32;
        }
    }
    MaskedText {
        input_ids: ids,
        labels,
    }
}

/// `L_mlm = (1 - alpha) * CE(logits, labels) + alpha * CE_soft(logits, softmax(logits_m))`
/// over the masked positions only. The online text layers and fusion run on the masked
/// ids with the online image tokens, the momentum model likewise with its own image
/// tokens; the MLM heads run only at the masked positions (gathered first). Returns the
/// loss (0 without a graph when nothing is masked) and the number of masked positions.
///
/// # Shapes
/// `masked_ids`, `attention_mask`: `[B, L]`; `labels`: the `[B, L]` labels flattened
/// row-major, in host memory (the masking drew them there), [`NOT_MASKED`] where nothing
/// is predicted; `image_tokens`, `image_tokens_m`: `[B, 1 + N, Dv]` -> 0-d.
#[allow(clippy::too_many_arguments)]
pub fn mlm_loss(
    model: &AlbefModel,
    masked_ids: &Tensor,
    labels: &[i64],
    attention_mask: &Tensor,
    image_tokens: &Tensor,
    image_tokens_m: &Tensor,
    alpha: f64,
    train: bool,
) -> Result<(Tensor, usize)> {
    let (b, l) = masked_ids.dims2()?;
    if labels.len() != b * l {
        return Err(TrainError::input(
            "mlm_labels",
            format!("{} labels for ids {:?}", labels.len(), masked_ids.dims()),
        ));
    }
    let dev = masked_ids.device();
    let (positions, targets): (Vec<u32>, Vec<u32>) = labels
        .iter()
        .enumerate()
        .filter(|(_, &t)| t != NOT_MASKED)
        .map(|(k, &t)| (k as u32, t as u32))
        .unzip();
    if positions.is_empty() {
        return Ok((model.temp().detach().zeros_like()?, 0));
    }
    let masked = positions.len();
    let positions = Tensor::new(positions.as_slice(), dev)?;
    let targets = Tensor::new(targets.as_slice(), dev)?;

    let gather = |fused: &Tensor| -> Result<Tensor> {
        let h = fused.dim(2)?;
        Ok(fused.reshape((b * l, h))?.index_select(&positions, 0)?)
    };
    let (states, _) = model.encode_text(masked_ids, attention_mask, train)?;
    let fused = model.fuse(
        FusionText::States(&states),
        attention_mask,
        image_tokens,
        train,
    )?;
    let logits = model.mlm_logits(&gather(&fused)?)?; // [M, V]

    let (states_m, _) = model.encode_text_m(masked_ids, attention_mask, train)?;
    let fused_m = model.fuse_m(
        FusionText::States(&states_m),
        attention_mask,
        image_tokens_m,
        train,
    )?;
    let soft_labels = nn::softmax(&model.mlm_logits_m(&gather(&fused_m)?)?)?.detach();

    let hard = cross_entropy(&logits, &targets)?;
    let distill = soft_cross_entropy(&logits, &soft_labels)?;
    let loss = (hard.affine(1.0 - alpha, 0.0)? + distill.affine(alpha, 0.0)?)?;
    Ok((loss, masked))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlp_models::config::Layout;

    fn text_config() -> TextConfig {
        TextConfig {
            vocab_size: 1000,
            hidden: 32,
            layers: 2,
            heads: 4,
            intermediate: 64,
            max_positions: 16,
            eps: 1e-12,
            dropout: 0.0,
            type_vocab_size: 2,
            layout: Layout::Albef { fusion_layer: 1 },
            has_mlm_head: true,
            pad_id: 0,
            cls_id: 101,
            sep_id: 102,
            mask_id: 103,
            enc_id: None,
        }
    }

    #[test]
    fn specials_are_never_masked_and_the_80_10_10_split_holds() {
        let cfg = text_config();
        // [CLS] 7 8 9 ... [SEP] [PAD] [PAD]
        let row: Vec<u32> = std::iter::once(101)
            .chain(200..210)
            .chain([102, 0, 0])
            .collect();
        let mask: Vec<u32> = row.iter().map(|&t| u32::from(t != 0)).collect();
        let ids = vec![row.clone(); 4];
        let am = vec![mask; 4];
        let mut rng = Rng::new(11);
        let (mut masked, mut to_mask, mut random, mut kept, mut maskable) = (0, 0, 0, 0, 0);
        for _ in 0..3000 {
            let out = mask_tokens(&ids, &am, &cfg, 0.15, &mut rng);
            for (r, labels) in out.labels.iter().enumerate() {
                for (p, &label) in labels.iter().enumerate() {
                    let orig = ids[r][p];
                    if [0, 101, 102].contains(&orig) {
                        assert_eq!(label, NOT_MASKED, "special {orig} masked");
                        assert_eq!(out.input_ids[r][p], orig);
                        continue;
                    }
                    maskable += 1;
                    if label == NOT_MASKED {
                        assert_eq!(out.input_ids[r][p], orig);
                        continue;
                    }
                    assert_eq!(label, i64::from(orig));
                    masked += 1;
                    match out.input_ids[r][p] {
                        103 => to_mask += 1,
                        t if t == orig => kept += 1,
                        _ => random += 1,
                    }
                }
            }
        }
        let rate = masked as f64 / maskable as f64;
        assert!((rate - 0.15).abs() < 0.01, "mask rate {rate}");
        let frac = |n: usize| n as f64 / masked as f64;
        assert!(
            (frac(to_mask) - 0.8).abs() < 0.02,
            "[MASK] {}",
            frac(to_mask)
        );
        // A random id equal to the original counts as kept: 0.1 + 0.1 / 1000.
        assert!(
            (frac(random) - 0.1).abs() < 0.015,
            "random {}",
            frac(random)
        );
        assert!((frac(kept) - 0.1).abs() < 0.015, "kept {}", frac(kept));
    }

    #[test]
    fn at_least_one_token_is_masked_when_any_is_maskable() {
        let cfg = text_config();
        let ids = vec![vec![101, 200, 102, 0]];
        let am = vec![vec![1, 1, 1, 0]];
        for seed in 0..50 {
            let out = mask_tokens(&ids, &am, &cfg, 0.0, &mut Rng::new(seed));
            assert_eq!(out.masked_count(), 1);
            assert_eq!(out.labels[0][1], 200);
        }
        let only_specials = vec![vec![101, 102, 0]];
        let out = mask_tokens(
            &only_specials,
            &[vec![1, 1, 0]],
            &cfg,
            0.5,
            &mut Rng::new(1),
        );
        assert_eq!(out.masked_count(), 0);
    }
}
