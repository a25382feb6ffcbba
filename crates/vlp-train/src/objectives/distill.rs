//! Distilling the cross-encoder into the dual encoders: the ITM head's match scores over
//! each query's ITC candidates teach the ITC similarities, so that ITC alone ranks closer
//! to ITM re-ranking at ITC's cost (the standard remedy in text retrieval: KL between the
//! score distributions, MSE on the scores, Margin-MSE on positive-negative differences).
//!
//! For every image of the batch its candidates are its own caption first, then the
//! captions of the batch it is most similar to (ITC, no gradient), `candidates` in all;
//! likewise for every caption. The teacher — the model's own fusion encoder and ITM head,
//! or a frozen checkpoint — scores each candidate pair as the log-odds of "match"
//! (`logit[1] - logit[0]`), without gradient; the student's scores are the ITC
//! similarities `cos / temp` of the same pairs. The loss is the mean of the two
//! directions' losses.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use vlp_models::{AlbefModel, FusionText};

use crate::error::{Result, TrainError};

/// How the teacher's scores teach the student's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DistillKind {
    /// `KL(softmax(teacher / T) || softmax(student / T))` over a query's candidates.
    Kl,
    /// Mean squared difference of the scores.
    Mse,
    /// Mean squared difference of the margins `score(positive) - score(negative)`.
    MarginMse,
}

/// What the teacher's score of a pair is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TeacherScore {
    /// The ITM log-odds of "match" (divided by `teacher_temperature`).
    #[serde(rename = "itm")]
    Itm,
    /// A re-ranking score: the ITM log-odds (divided by `teacher_temperature`) plus the
    /// teacher's own ITC logit `cos / temp`, the form `eval.score = "itm+itc-logit"`
    /// ranks by (which adds the match logit, unscaled).
    /// With the model as its own teacher the ITC term is the student's similarity
    /// without gradient, so the target is the student's ranking corrected by ITM.
    #[serde(rename = "itm+itc")]
    ItmItc,
}

/// The distillation objective (off unless enabled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    pub enabled: bool,
    pub kind: DistillKind,
    pub weight: f64,
    /// Temperature of the KL's softmaxes (both sides, as in Hinton's distillation).
    pub temperature: f64,
    /// The teacher's log-odds are divided by this before any loss, to put them on the
    /// student's scale: ITM log-odds span a few units, `cos / temp` spans `±1 / temp`
    /// (±14 at 0.07). At 1 the student is pulled towards the teacher's narrower spread,
    /// against the contrastive loss.
    pub teacher_temperature: f64,
    /// The teacher's score: the ITM log-odds alone, or with its ITC logit added.
    pub teacher_score: TeacherScore,
    /// Candidates per query, its positive included (at most the batch).
    pub candidates: usize,
    /// A frozen checkpoint folder to teach with; none: the model's own fusion encoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<std::path::PathBuf>,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            enabled: false,
            kind: DistillKind::Kl,
            weight: 1.0,
            temperature: 1.0,
            teacher_temperature: 1.0,
            teacher_score: TeacherScore::Itm,
            candidates: 16,
            teacher: None,
        }
    }
}

/// Each query's candidates: its positive (the same index) first, then the other columns
/// of its row in decreasing similarity, `k` in all (fewer when the row is shorter).
pub fn candidates(sims: &[Vec<f64>], k: usize) -> Vec<Vec<usize>> {
    sims.iter()
        .enumerate()
        .map(|(q, row)| {
            let mut others: Vec<usize> = (0..row.len()).filter(|&j| j != q).collect();
            others.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let mut c = vec![q];
            c.extend(others.into_iter().take(k.saturating_sub(1)));
            c
        })
        .collect()
}

/// The loss of one direction: `student` and `teacher` `[Q, k]`, the positive in column 0.
/// The teacher carries no gradient.
pub fn distill_loss(
    kind: DistillKind,
    student: &Tensor,
    teacher: &Tensor,
    temperature: f64,
) -> Result<Tensor> {
    let teacher = teacher.detach();
    Ok(match kind {
        DistillKind::Kl => {
            let t = vlp_models::nn::softmax(&(&teacher / temperature)?)?;
            let log_t = vlp_models::nn::log_softmax(&(&teacher / temperature)?)?;
            let log_s = vlp_models::nn::log_softmax(&(student / temperature)?)?;
            // sum_j t_j (log t_j - log s_j), averaged over queries.
            (t * (log_t - log_s)?)?.sum(D::Minus1)?.mean_all()?
        }
        DistillKind::Mse => (student - &teacher)?.sqr()?.mean_all()?,
        DistillKind::MarginMse => {
            let k = student.dim(1)?;
            if k < 2 {
                return Err(TrainError::config(
                    "distill.candidates",
                    "margin-mse needs a negative: at least 2 candidates",
                ));
            }
            let margins = |s: &Tensor| -> Result<Tensor> {
                let pos = s.narrow(1, 0, 1)?;
                Ok(pos.broadcast_sub(&s.narrow(1, 1, k - 1)?)?)
            };
            (margins(student)? - margins(&teacher)?)?
                .sqr()?
                .mean_all()?
        }
    })
}

/// The ITC logits `cos / temp` of every image (rows) with every caption (columns).
fn itc_logits(image_feat: &Tensor, text_feat: &Tensor, temp: &Tensor) -> Result<Tensor> {
    Ok(image_feat.matmul(&text_feat.t()?)?.broadcast_div(temp)?)
}

/// Gathers `sims[q, cand[q][j]]` into `[Q, k]` (with the gradient of `sims`).
fn pick(sims: &Tensor, cands: &[Vec<usize>]) -> Result<Tensor> {
    let k = cands.first().map_or(0, Vec::len);
    let idx: Vec<u32> = cands.iter().flatten().map(|&j| j as u32).collect();
    let idx = Tensor::from_vec(idx, (cands.len(), k), sims.device())?;
    Ok(sims.contiguous()?.gather(&idx, 1)?)
}

/// The teacher's log-odds of "match" for each pair (text row, image row), `[n]`, no
/// gradient.
fn teacher_scores(
    teacher: &AlbefModel,
    text_states: &Tensor,
    attention_mask: &Tensor,
    image_tokens: &Tensor,
    pairs: &[(usize, usize)],
) -> Result<Tensor> {
    let dev = text_states.device();
    let rows = |f: fn(&(usize, usize)) -> usize| -> Result<Tensor> {
        let v: Vec<u32> = pairs.iter().map(|p| f(p) as u32).collect();
        Ok(Tensor::new(v.as_slice(), dev)?)
    };
    let (t, i) = (rows(|p| p.0)?, rows(|p| p.1)?);
    let states = text_states.detach().index_select(&t, 0)?;
    let mask = attention_mask.index_select(&t, 0)?;
    let images = image_tokens.detach().index_select(&i, 0)?;
    let fused_cls = teacher.fuse_cls(FusionText::States(&states), &mask, &images, false)?;
    let logits = teacher.itm_logits(&fused_cls)?.to_dtype(DType::F32)?;
    Ok((logits.narrow(1, 1, 1)? - logits.narrow(1, 0, 1)?)?
        .squeeze(1)?
        .detach())
}

/// What the objective needs of a batch: the student's ITC features and temperature, and
/// the teacher's token states (the model's own, or a frozen teacher's on the same batch).
pub struct DistillInputs<'a> {
    pub image_feat: &'a Tensor,
    pub text_feat: &'a Tensor,
    pub temp: &'a Tensor,
    pub teacher: &'a AlbefModel,
    pub teacher_text_states: &'a Tensor,
    pub teacher_image_tokens: &'a Tensor,
    /// The teacher's normalised ITC features and temperature (read for
    /// [`TeacherScore::ItmItc`]).
    pub teacher_image_feat: &'a Tensor,
    pub teacher_text_feat: &'a Tensor,
    pub teacher_temp: &'a Tensor,
    pub attention_mask: &'a Tensor,
}

/// The distillation loss of a batch, both directions averaged.
pub fn distill(cfg: &DistillConfig, x: &DistillInputs) -> Result<Tensor> {
    let b = x.image_feat.dim(0)?;
    let k = cfg.candidates.clamp(1, b);
    let sims = itc_logits(x.image_feat, x.text_feat, x.temp)?; // [B images, B texts]
    let host = sims.detach().to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let host_t: Vec<Vec<f64>> = (0..b)
        .map(|t| (0..b).map(|i| host[i][t]).collect())
        .collect();
    let (c_i2t, c_t2i) = (candidates(&host, k), candidates(&host_t, k));
    // Pairs as (text, image).
    let pairs_i2t: Vec<(usize, usize)> = c_i2t
        .iter()
        .enumerate()
        .flat_map(|(i, c)| c.iter().map(move |&t| (t, i)))
        .collect();
    let pairs_t2i: Vec<(usize, usize)> = c_t2i
        .iter()
        .enumerate()
        .flat_map(|(t, c)| c.iter().map(move |&i| (t, i)))
        .collect();
    let itm = |pairs: &[(usize, usize)]| -> Result<Tensor> {
        Ok(teacher_scores(
            x.teacher,
            x.teacher_text_states,
            x.attention_mask,
            x.teacher_image_tokens,
            pairs,
        )?
        .reshape((b, k))?
        .affine(1.0 / cfg.teacher_temperature, 0.0)?)
    };
    let (mut teach_i2t, mut teach_t2i) = (itm(&pairs_i2t)?, itm(&pairs_t2i)?);
    if cfg.teacher_score == TeacherScore::ItmItc {
        // The teacher's own ITC logits of the same pairs, picked as the student's are.
        let t_sims = itc_logits(x.teacher_image_feat, x.teacher_text_feat, x.teacher_temp)?
            .detach()
            .to_dtype(DType::F32)?;
        teach_i2t = (teach_i2t + pick(&t_sims, &c_i2t)?)?;
        teach_t2i = (teach_t2i + pick(&t_sims.t()?, &c_t2i)?)?;
    }
    let student_i2t = pick(&sims, &c_i2t)?;
    let student_t2i = pick(&sims.t()?, &c_t2i)?;
    let a = distill_loss(cfg.kind, &student_i2t, &teach_i2t, cfg.temperature)?;
    let c = distill_loss(cfg.kind, &student_t2i, &teach_t2i, cfg.temperature)?;
    Ok(((a + c)? * 0.5)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = v.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (v.len(), 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn candidates_put_the_positive_first_then_the_most_similar() {
        let sims = vec![
            vec![0.1, 0.9, 0.5],
            vec![0.3, 0.2, 0.8],
            vec![0.7, 0.6, 0.0],
        ];
        assert_eq!(
            candidates(&sims, 2),
            vec![vec![0, 1], vec![1, 2], vec![2, 0]]
        );
        assert_eq!(candidates(&sims, 9)[2], vec![2, 0, 1]);
    }

    /// Each loss against the formula computed by hand.
    #[test]
    fn losses_match_a_hand_computation() {
        let s = t(&[[2.0, 1.0, 0.0], [0.5, 0.5, 1.0]]);
        let te = t(&[[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]);
        let sm = |row: [f64; 3], temp: f64| {
            let e: Vec<f64> = row.iter().map(|x| (x / temp).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|x| x / z).collect::<Vec<f64>>()
        };
        let (srows, trows) = (
            [[2.0, 1.0, 0.0], [0.5, 0.5, 1.0]],
            [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]],
        );
        for temp in [1.0, 2.0] {
            let mut kl = 0.0;
            for q in 0..2 {
                let (p, r) = (sm(trows[q], temp), sm(srows[q], temp));
                kl += (0..3).map(|j| p[j] * (p[j].ln() - r[j].ln())).sum::<f64>();
            }
            let got = distill_loss(DistillKind::Kl, &s, &te, temp)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            assert!(
                (got - kl / 2.0).abs() < 1e-6,
                "KL at T={temp}: {got} vs {}",
                kl / 2.0
            );
        }
        let mse: f64 = srows
            .iter()
            .flatten()
            .zip(trows.iter().flatten())
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            / 6.0;
        let got = distill_loss(DistillKind::Mse, &s, &te, 1.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((got as f64 - mse).abs() < 1e-6);
        // Margins: row 0 student (1, 2) teacher (1, 2) -> 0; row 1 student (0, -0.5)
        // teacher (-2, 0) -> 4 + 0.25.
        let got = distill_loss(DistillKind::MarginMse, &s, &te, 1.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((got as f64 - 4.25 / 4.0).abs() < 1e-6, "{got}");
        assert!(distill_loss(
            DistillKind::MarginMse,
            &s.narrow(1, 0, 1).unwrap(),
            &te.narrow(1, 0, 1).unwrap(),
            1.0
        )
        .is_err());
    }

    /// The whole objective on a micro model equals the losses assembled by hand from the
    /// candidates and the teacher's log-odds divided by `teacher_temperature`, plus, for
    /// `teacher_score = "itm+itc"`, the teacher's ITC logit at its own temperature.
    #[test]
    fn the_teacher_score_is_the_scaled_log_odds_plus_its_itc_logit_when_asked() -> Result<()> {
        use candle_nn::{VarBuilder, VarMap};
        let dev = Device::Cpu;
        let cfg = vlp_models::test_support::micro_config();
        let varmap = VarMap::new();
        let model = AlbefModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
        let (b, l) = (4, 5);
        let images = Tensor::randn(0f32, 1.0, (b, 3, 32, 32), &dev)?;
        let ids: Vec<u32> = (0..b * l).map(|k| 5 + (k * 7 % 40) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, l), &dev)?;
        let mask = Tensor::ones((b, l), DType::U32, &dev)?;
        let (tokens, image_feat) = model.encode_image(&images, false)?;
        let (states, text_feat) = model.encode_text(&ids, &mask, false)?;
        let temp = Tensor::new(0.07f32, &dev)?;
        // The teacher's features: the student's, permuted, at another temperature.
        let t_temp = Tensor::new(0.2f32, &dev)?;
        let perm = Tensor::new(&[2u32, 0, 3, 1], &dev)?;
        let (t_image_feat, t_text_feat) = (
            image_feat.index_select(&perm, 0)?,
            text_feat.index_select(&perm, 0)?,
        );
        let x = DistillInputs {
            image_feat: &image_feat,
            text_feat: &text_feat,
            temp: &temp,
            teacher: &model,
            teacher_text_states: &states,
            teacher_image_tokens: &tokens,
            teacher_image_feat: &t_image_feat,
            teacher_text_feat: &t_text_feat,
            teacher_temp: &t_temp,
            attention_mask: &mask,
        };
        let t_sims = t_image_feat
            .matmul(&t_text_feat.t()?)?
            .broadcast_div(&t_temp)?;
        let k = 3;
        let sims = image_feat.matmul(&text_feat.t()?)?.broadcast_div(&temp)?;
        let host = sims.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let host_t: Vec<Vec<f64>> = (0..b)
            .map(|t| (0..b).map(|i| host[i][t]).collect())
            .collect();
        let (ci, ct) = (candidates(&host, k), candidates(&host_t, k));
        let pairs = |c: &[Vec<usize>], i2t: bool| -> Vec<(usize, usize)> {
            let mut v = Vec::new();
            for (q, row) in c.iter().enumerate() {
                v.extend(row.iter().map(|&j| if i2t { (j, q) } else { (q, j) }));
            }
            v
        };
        for (kind, tt, ts) in [
            (DistillKind::Mse, 0.5, TeacherScore::Itm),
            (DistillKind::Kl, 0.25, TeacherScore::Itm),
            (DistillKind::Kl, 0.25, TeacherScore::ItmItc),
            (DistillKind::MarginMse, 2.0, TeacherScore::ItmItc),
        ] {
            let dc = DistillConfig {
                enabled: true,
                kind,
                candidates: k,
                teacher_temperature: tt,
                teacher_score: ts,
                ..DistillConfig::default()
            };
            let got = distill(&dc, &x)?.to_scalar::<f32>()?;
            let teach = |c: &[Vec<usize>], i2t: bool| -> Result<Tensor> {
                let itm = teacher_scores(&model, &states, &mask, &tokens, &pairs(c, i2t))?
                    .reshape((b, k))?;
                let itm = (itm / tt)?;
                Ok(match ts {
                    TeacherScore::Itm => itm,
                    TeacherScore::ItmItc if i2t => (itm + pick(&t_sims, c)?)?,
                    TeacherScore::ItmItc => (itm + pick(&t_sims.t()?, c)?)?,
                })
            };
            let a = distill_loss(kind, &pick(&sims, &ci)?, &teach(&ci, true)?, 1.0)?;
            let c = distill_loss(kind, &pick(&sims.t()?, &ct)?, &teach(&ct, false)?, 1.0)?;
            let want = ((a + c)? * 0.5)?.to_scalar::<f32>()?;
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{kind:?}: {got} vs {want}"
            );
            // The scale and the ITC term matter: without either, another value.
            let plain = DistillConfig {
                teacher_temperature: 1.0,
                ..dc.clone()
            };
            assert!((distill(&plain, &x)?.to_scalar::<f32>()? - got).abs() > 1e-4);
            let other = DistillConfig {
                teacher_score: match ts {
                    TeacherScore::Itm => TeacherScore::ItmItc,
                    TeacherScore::ItmItc => TeacherScore::Itm,
                },
                ..dc
            };
            assert!((distill(&other, &x)?.to_scalar::<f32>()? - got).abs() > 1e-4);
        }
        let parsed: DistillConfig = serde_json::from_str(r#"{"teacher_score": "itm+itc"}"#)
            .map_err(|e| TrainError::config("distill", e.to_string()))?;
        assert_eq!(parsed.teacher_score, TeacherScore::ItmItc);
        Ok(())
    }

    #[test]
    fn the_gradient_reaches_the_student_only() {
        let s = Var::new(&[[2.0f32, 1.0, 0.0]], &Device::Cpu).unwrap();
        let te = Var::new(&[[1.0f32, 0.0, -1.0]], &Device::Cpu).unwrap();
        for kind in [DistillKind::Kl, DistillKind::Mse, DistillKind::MarginMse] {
            let g = distill_loss(kind, s.as_tensor(), te.as_tensor(), 1.0)
                .unwrap()
                .backward()
                .unwrap();
            assert!(
                g.get(s.as_tensor()).is_some(),
                "{kind:?}: no student gradient"
            );
            assert!(
                g.get(te.as_tensor()).is_none(),
                "{kind:?}: the teacher got a gradient"
            );
        }
    }
}
