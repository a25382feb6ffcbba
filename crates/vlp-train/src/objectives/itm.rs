//! Image-text matching with contrastive hard negatives (ALBEF paper §3.2 ITM): for each
//! text an in-batch image, for each image an in-batch text, drawn in proportion to their
//! ITC similarity, so the fusion encoder sees the hardest-to-tell negatives.

use candle_core::{DType, Tensor};
use vlp_core::rng::Rng;
use vlp_models::{AlbefModel, FusionText};

use super::cross_entropy;
use crate::error::{Result, TrainError};

/// Added to every admissible sampling weight. ALBEF's first release drew from the raw
/// softmax and crashed when a row underflowed to all zeros (ALBEF#18, "invalid
/// multinomial distribution"); with the epsilon every admissible column stays drawable.
pub const WEIGHT_EPSILON: f64 = 1e-5;

/// The in-batch negative of each text and each image; `None` where the row has no
/// admissible candidate (a batch of one, or every pair of the same image id): that
/// negative is skipped and counted by [`Negatives::fallbacks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negatives {
    /// `image_for_text[b]`: the negative image paired with text `b`.
    pub image_for_text: Vec<Option<usize>>,
    /// `text_for_image[b]`: the negative text paired with image `b`.
    pub text_for_image: Vec<Option<usize>>,
}

impl Negatives {
    /// Negatives skipped for want of a candidate.
    pub fn fallbacks(&self) -> usize {
        self.image_for_text
            .iter()
            .chain(&self.text_for_image)
            .filter(|n| n.is_none())
            .count()
    }

    /// The negatives of the first `pairs` pairs only (ITM's `batch_fraction`); they keep
    /// indexing the whole batch.
    pub fn first(mut self, pairs: usize) -> Self {
        self.image_for_text.truncate(pairs);
        self.text_for_image.truncate(pairs);
        self
    }

    /// Negatives recorded elsewhere (e.g. by the reference implementation), checked to be
    /// in the batch.
    pub fn replay(
        image_for_text: &[usize],
        text_for_image: &[usize],
        batch: usize,
    ) -> Result<Self> {
        for (what, v) in [
            ("neg_image_for_text", image_for_text),
            ("neg_text_for_image", text_for_image),
        ] {
            if v.len() != batch || v.iter().any(|&i| i >= batch) {
                return Err(TrainError::input(
                    what,
                    format!("{v:?} is not one index below {batch} per pair"),
                ));
            }
        }
        Ok(Negatives {
            image_for_text: image_for_text.iter().map(|&i| Some(i)).collect(),
            text_for_image: text_for_image.iter().map(|&i| Some(i)).collect(),
        })
    }
}

/// Which in-batch pairs are positives: the diagonal, or every pair with the same image id.
pub fn positive_pairs(b: usize, image_ids: Option<&[i64]>) -> Vec<Vec<bool>> {
    (0..b)
        .map(|i| {
            (0..b)
                .map(|j| match image_ids {
                    Some(ids) => ids[i] == ids[j],
                    None => i == j,
                })
                .collect()
        })
        .collect()
}

/// Sampling weights of one row: `softmax(hardness * sim_row) + epsilon` at the admissible
/// columns, 0 at the positives. `hardness` 1 is ALBEF's draw, 0 a uniform one (random
/// negatives); see [`super::ItmConfig::hardness`].
pub fn hard_negative_weights(sim_row: &[f64], positive: &[bool], hardness: f64) -> Vec<f64> {
    // hardness >= 0 (validated), so the scaled row's maximum is the scaled maximum.
    let max = sim_row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = sim_row
        .iter()
        .map(|s| ((s - max) * hardness).exp())
        .collect();
    let z: f64 = exp.iter().sum();
    exp.iter()
        .zip(positive)
        .map(|(e, &p)| if p { 0.0 } else { e / z + WEIGHT_EPSILON })
        .collect()
}

/// One index drawn in proportion to `weights`; `None` if they are all zero.
fn draw(weights: &[f64], rng: &mut Rng) -> Option<usize> {
    let total: f64 = weights.iter().sum();
    if total <= 0.0 || !total.is_finite() {
        return None;
    }
    let mut u = rng.uniform() * total;
    let mut last = None;
    for (j, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            last = Some(j);
            if u < w {
                return Some(j);
            }
            u -= w;
        }
    }
    last // rounding left u past the end: the last admissible column
}

/// Draws the hard negatives (ALBEF: `torch.multinomial` on the softmax of the online
/// ITC similarities over the batch columns, positives zeroed), first the image of every
/// text (from its text-to-image row), then the text of every image.
///
/// # Shapes
/// `sim_i2t`, `sim_t2i`: `[B, >= B]` (only the first B columns are read).
pub fn sample_negatives(
    sim_i2t: &Tensor,
    sim_t2i: &Tensor,
    positives: &[Vec<bool>],
    hardness: f64,
    rng: &mut Rng,
) -> Result<Negatives> {
    let b = positives.len();
    let rows = |s: &Tensor| -> Result<Vec<Vec<f64>>> {
        Ok(s.narrow(1, 0, b)?.to_dtype(DType::F64)?.to_vec2::<f64>()?)
    };
    let (i2t, t2i) = (rows(sim_i2t)?, rows(sim_t2i)?);
    let pick = |row: &[f64], positive: &[bool], rng: &mut Rng| {
        draw(&hard_negative_weights(row, positive, hardness), rng)
    };
    // positives[i][j]: image i with text j; text b's row is column b of it.
    let image_for_text: Vec<Option<usize>> = (0..b)
        .map(|t| {
            let positive: Vec<bool> = (0..b).map(|i| positives[i][t]).collect();
            pick(&t2i[t], &positive, rng)
        })
        .collect();
    let text_for_image: Vec<Option<usize>> =
        (0..b).map(|i| pick(&i2t[i], &positives[i], rng)).collect();
    Ok(Negatives {
        image_for_text,
        text_for_image,
    })
}

/// Every rank's ITM candidates (BLIP's `negative_all_rank`): the token states of all
/// ranks' texts and images, gathered with their gradients, and this rank's hard negatives
/// drawn from all of them.
pub struct AllRankCandidates {
    /// `[W*B, Lmax, H]`: the ranks' text states, padded to the longest rank's length.
    pub text_states: Tensor,
    /// `[W*B, Lmax]`.
    pub attention_mask: Tensor,
    /// `[W*B, 1 + N, Dv]`.
    pub image_tokens: Tensor,
    /// This rank's first row: `rank * B`.
    pub own: usize,
    /// Indices into the rows above.
    pub negatives: Negatives,
}

/// Gathers every rank's candidates and draws this rank's hard negatives among them: for
/// each local text an image of any rank, for each local image a text of any rank, in
/// proportion to the softmax of the online similarities (local features against every
/// rank's), positives excluded (the same image id when `image_ids` are given, else the
/// pair itself). Every rank calls this at the same point (collective calls).
#[allow(clippy::too_many_arguments)]
pub fn all_rank_candidates(
    ranks: &std::sync::Arc<dyn vlp_dist::Collective>,
    image_feat: &Tensor,
    text_feat: &Tensor,
    temp: &Tensor,
    image_ids: Option<&[i64]>,
    text_states: &Tensor,
    attention_mask: &Tensor,
    image_tokens: &Tensor,
    hardness: f64,
    rng: &mut Rng,
) -> Result<AllRankCandidates> {
    let (b, rank) = (image_feat.dim(0)?, ranks.rank());
    let own = rank * b;
    let image_world = ranks.all_gather(&image_feat.detach())?;
    let text_world = ranks.all_gather(&text_feat.detach())?;
    let n = image_world.dim(0)?;
    if n != b * ranks.world_size() {
        return Err(TrainError::input(
            "itm.negative_all_rank",
            format!(
                "{n} candidates for {} ranks of batch {b}: batches must be equal",
                ranks.world_size()
            ),
        ));
    }
    let rows = |a: &Tensor, m: &Tensor| -> Result<Vec<Vec<f64>>> {
        Ok(a.detach()
            .matmul(&m.t()?)?
            .broadcast_div(temp)?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?)
    };
    let (i2t, t2i) = (
        rows(image_feat, &text_world)?,
        rows(text_feat, &image_world)?,
    );
    let ids_world: Option<Vec<i64>> = match image_ids {
        Some(ids) => {
            let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
            Some(
                ranks
                    .all_gather_bytes(&bytes)?
                    .concat()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            )
        }
        None => None,
    };
    // Row k's positives among the n candidates: its own pair, or every same-id one.
    let positive = |k: usize| -> Vec<bool> {
        (0..n)
            .map(|j| match (image_ids, &ids_world) {
                (Some(ids), Some(world)) => ids[k] == world[j],
                _ => j == own + k,
            })
            .collect()
    };
    let pick = |row: &[f64], positive: &[bool], rng: &mut Rng| {
        draw(&hard_negative_weights(row, positive, hardness), rng)
    };
    let image_for_text: Vec<Option<usize>> =
        (0..b).map(|t| pick(&t2i[t], &positive(t), rng)).collect();
    let text_for_image: Vec<Option<usize>> =
        (0..b).map(|i| pick(&i2t[i], &positive(i), rng)).collect();
    // Texts padded to the longest rank's length (the mask hides the padding).
    let len = text_states.dim(1)?;
    let longest = ranks
        .all_gather_u64(len as u64)?
        .into_iter()
        .max()
        .unwrap_or(0) as usize;
    let (states, mask) = if longest > len {
        (
            text_states.pad_with_zeros(1, 0, longest - len)?,
            attention_mask.pad_with_zeros(1, 0, longest - len)?,
        )
    } else {
        (text_states.clone(), attention_mask.clone())
    };
    Ok(AllRankCandidates {
        text_states: vlp_dist::all_gather_with_grad(ranks, &states)?,
        attention_mask: ranks.all_gather(&mask)?,
        image_tokens: vlp_dist::all_gather_with_grad(ranks, image_tokens)?,
        own,
        negatives: Negatives {
            image_for_text,
            text_for_image,
        },
    })
}

/// The ITM loss: the fusion encoder on [positives (B); (text b, its negative image);
/// (image b's negative text, image b)], skipped negatives left out, labels 1 for the
/// positives and 0 for the rest, cross-entropy of the ITM head on the fused [CLS].
///
/// # Shapes
/// `text_states`: `[B, L, H]` (text-only pass), `attention_mask`: `[B, L]`,
/// `image_tokens`: `[B, 1 + N, Dv]` -> 0-d.
pub fn itm_loss(
    model: &AlbefModel,
    text_states: &Tensor,
    attention_mask: &Tensor,
    image_tokens: &Tensor,
    negatives: &Negatives,
    train: bool,
) -> Result<Tensor> {
    itm_loss_at(
        model,
        text_states,
        attention_mask,
        image_tokens,
        negatives,
        0,
        train,
    )
}

/// [`itm_loss`] over candidates of which this batch's pairs are rows `own..own + B` (every
/// rank's rows, with [`all_rank_candidates`]); the negatives index all rows.
pub fn itm_loss_at(
    model: &AlbefModel,
    text_states: &Tensor,
    attention_mask: &Tensor,
    image_tokens: &Tensor,
    negatives: &Negatives,
    own: usize,
    train: bool,
) -> Result<Tensor> {
    let b = negatives.image_for_text.len();
    let dev = text_states.device();
    let mut text_rows: Vec<u32> = (own as u32..(own + b) as u32).collect();
    let mut image_rows: Vec<u32> = (own as u32..(own + b) as u32).collect();
    for (t, neg) in negatives.image_for_text.iter().enumerate() {
        if let Some(i) = neg {
            text_rows.push((own + t) as u32);
            image_rows.push(*i as u32);
        }
    }
    for (i, neg) in negatives.text_for_image.iter().enumerate() {
        if let Some(t) = neg {
            text_rows.push(*t as u32);
            image_rows.push((own + i) as u32);
        }
    }
    let n = text_rows.len();
    let text_rows = Tensor::new(text_rows.as_slice(), dev)?;
    let image_rows = Tensor::new(image_rows.as_slice(), dev)?;
    let states = text_states.index_select(&text_rows, 0)?;
    let mask = attention_mask.index_select(&text_rows, 0)?;
    let images = image_tokens.index_select(&image_rows, 0)?;
    // Only [CLS] is read: the last fusion layer runs for it alone.
    let fused_cls = model.fuse_cls(FusionText::States(&states), &mask, &images, train)?;
    let logits = model.itm_logits(&fused_cls)?;
    let labels: Vec<u32> = (0..n).map(|k| u32::from(k < b)).collect();
    cross_entropy(&logits, &Tensor::new(labels.as_slice(), dev)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sampling_never_picks_a_positive() -> Result<()> {
        let dev = Device::Cpu;
        let b = 6;
        // Column i + 1 dominates row i; for rows 0 and 3 it is a positive by image id, so a
        // sampler that ignored the mask would pick it.
        let mut sim = vec![vec![0.0f64; b]; b];
        for (i, row) in sim.iter_mut().enumerate() {
            row[i] = 5.0;
            row[(i + 1) % b] = 20.0;
        }
        let sim = Tensor::new(sim, &dev)?;
        let ids = [1i64, 1, 2, 3, 3, 4];
        let positives = positive_pairs(b, Some(&ids));
        let mut rng = Rng::new(3);
        let mut counts = vec![vec![0usize; b]; b];
        for _ in 0..200 {
            let neg = sample_negatives(&sim, &sim, &positives, 1.0, &mut rng)?;
            assert_eq!(neg.fallbacks(), 0);
            for (t, i) in neg.image_for_text.iter().enumerate() {
                let i = i.unwrap();
                assert!(!positives[i][t], "text {t} got positive image {i}");
                counts[t][i] += 1;
            }
            for (i, t) in neg.text_for_image.iter().enumerate() {
                assert!(!positives[i][t.unwrap()]);
            }
        }
        // The hard (high-similarity) admissible negative dominates: text 2's row favours
        // column 3.
        assert!(counts[2][3] > 190, "{:?}", counts[2]);
        // Hardness 0: uniform over the admissible columns, whatever the similarities. Text 2
        // has 5 (only itself is its positive): each about 1/5 of 1000 draws.
        let mut uniform = vec![0usize; b];
        for _ in 0..1000 {
            let neg = sample_negatives(&sim, &sim, &positives, 0.0, &mut rng)?;
            uniform[neg.image_for_text[2].unwrap()] += 1;
        }
        assert_eq!(uniform[2], 0);
        assert!(
            uniform
                .iter()
                .enumerate()
                .all(|(i, &c)| i == 2 || (150..250).contains(&c)),
            "{uniform:?}"
        );
        // In between, softer: at 0.1 the columns 20 and 0 apart weigh e^2 : 1 (the
        // epsilon aside), where hardness 1 gives e^20 : 1.
        let w = hard_negative_weights(&[5.0, 20.0, 0.0], &[true, false, false], 0.1);
        assert!(
            w[0] == 0.0 && (w[1] / w[2] - 2f64.exp()).abs() < 1e-3,
            "{w:?}"
        );
        Ok(())
    }

    #[test]
    fn rows_without_candidates_are_skipped_and_counted() -> Result<()> {
        let dev = Device::Cpu;
        let one = Tensor::new(&[[3.0f32]], &dev)?;
        let mut rng = Rng::new(0);
        let neg = sample_negatives(&one, &one, &positive_pairs(1, None), 1.0, &mut rng)?;
        assert_eq!(neg.fallbacks(), 2);
        assert_eq!(neg.image_for_text, vec![None]);
        let sim = Tensor::zeros((3, 3), DType::F32, &dev)?;
        let same = positive_pairs(3, Some(&[5, 5, 5]));
        let neg = sample_negatives(&sim, &sim, &same, 1.0, &mut rng)?;
        assert_eq!(neg.fallbacks(), 6);
        // An underflowing softmax still samples (the epsilon), never a positive.
        let extreme = Tensor::new(
            &[[1e4f32, -1e4, -1e4], [-1e4, 1e4, -1e4], [-1e4, -1e4, 1e4]],
            &dev,
        )?;
        let neg = sample_negatives(&extreme, &extreme, &positive_pairs(3, None), 1.0, &mut rng)?;
        assert_eq!(neg.fallbacks(), 0);
        assert!(neg
            .image_for_text
            .iter()
            .enumerate()
            .all(|(t, i)| *i != Some(t)));
        Ok(())
    }

    #[test]
    fn the_first_pairs_keep_their_negatives_and_recount_fallbacks() {
        let neg = Negatives {
            image_for_text: vec![Some(3), None, Some(0), None],
            text_for_image: vec![Some(2), Some(3), None, None],
        };
        assert_eq!(neg.fallbacks(), 4);
        let first = neg.first(2);
        assert_eq!(first.image_for_text, vec![Some(3), None]);
        assert_eq!(first.text_for_image, vec![Some(2), Some(3)]);
        assert_eq!(first.fallbacks(), 1);
    }

    /// Two ranks (threads over TCP): every rank's candidates, texts padded to the longest
    /// rank's length, negatives drawn across ranks and never a positive.
    #[test]
    fn all_rank_candidates_span_the_ranks_and_skip_positives() {
        use std::sync::Arc;
        let port = 46000 + (std::process::id() % 1000) as u16 * 2;
        let handles: Vec<_> = (0..2usize)
            .map(|rank| {
                std::thread::spawn(move || {
                    let world = vlp_dist::World::on_localhost(rank, 2, port);
                    let ranks: Arc<dyn vlp_dist::Collective> = Arc::new(
                        vlp_dist::tcp::TcpCollective::connect(
                            &world,
                            std::time::Duration::from_secs(20),
                            std::time::Duration::from_secs(20),
                        )
                        .unwrap(),
                    );
                    let dev = Device::Cpu;
                    let b = 3;
                    // Features: text k of rank r is most like image k of the other rank.
                    let e = |k: usize| {
                        let mut v = vec![0f32; 8];
                        v[k] = 1.0;
                        v
                    };
                    let other = 1 - rank;
                    let image: Vec<f32> = (0..b).flat_map(|k| e(rank * b + k)).collect();
                    let text: Vec<f32> = (0..b).flat_map(|k| e(other * b + k)).collect();
                    let image_feat = Tensor::from_vec(image, (b, 8), &dev).unwrap();
                    let text_feat = Tensor::from_vec(text, (b, 8), &dev).unwrap();
                    let temp = Tensor::new(0.05f32, &dev).unwrap();
                    let len = 4 + rank; // rank 1's texts are longer
                    let states = Tensor::ones((b, len, 2), DType::F32, &dev).unwrap();
                    let mask = Tensor::ones((b, len), DType::U32, &dev).unwrap();
                    let tokens = Tensor::ones((b, 5, 2), DType::F32, &dev).unwrap();
                    let mut rng = Rng::new(rank as u64);
                    let c = all_rank_candidates(
                        &ranks,
                        &image_feat,
                        &text_feat,
                        &temp,
                        None,
                        &states,
                        &mask,
                        &tokens,
                        1.0,
                        &mut rng,
                    )
                    .unwrap();
                    (
                        c.own,
                        c.text_states.dims().to_vec(),
                        c.attention_mask.sum(1).unwrap().to_vec1::<u32>().unwrap(),
                        c.image_tokens.dims().to_vec(),
                        c.negatives,
                    )
                })
            })
            .collect();
        for (rank, h) in handles.into_iter().enumerate() {
            let (own, states, mask_lens, tokens, neg) = h.join().unwrap();
            assert_eq!(own, rank * 3);
            assert_eq!(states, vec![6, 5, 2]);
            assert_eq!(mask_lens, vec![4, 4, 4, 5, 5, 5]);
            assert_eq!(tokens, vec![6, 5, 2]);
            assert_eq!(neg.fallbacks(), 0);
            // The hardest negatives live on the other rank: the draws go there.
            let other = (1 - rank) * 3..(2 - rank) * 3;
            for (k, i) in neg.image_for_text.iter().enumerate() {
                let i = i.unwrap();
                assert_ne!(i, own + k);
                assert!(other.contains(&i), "text {k} of rank {rank} got image {i}");
            }
            for (k, t) in neg.text_for_image.iter().enumerate() {
                assert_ne!(t.unwrap(), own + k);
            }
        }
    }

    #[test]
    fn replayed_negatives_are_checked() {
        assert!(Negatives::replay(&[1, 0], &[1, 0], 2).is_ok());
        assert!(Negatives::replay(&[1, 2], &[1, 0], 2).is_err());
        assert!(Negatives::replay(&[1], &[1, 0], 2).is_err());
    }
}
