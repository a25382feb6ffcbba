//! ALBEF's retrieval evaluation: encode, rank by the ITC cosine, re-score each query's top
//! `k` candidates with the ITM head, rank again, measure.
//!
//! Two changes of bookkeeping (not of results) make it cheaper than the reference loop:
//! - **Each (image, text) pair is fused once.** A pair that is among an image's top `k`
//!   texts and also among that text's top `k` images has one ITM score (the fusion
//!   encoder is deterministic in eval mode); the reference scores it once per direction.
//! - **An image's cross-attention keys and values are computed once** for all texts it
//!   is paired with (the fusion runs one image against a batch of texts), and each batch
//!   of texts is padded only to its own longest caption (texts sorted by length).
//!
//! Memory policy: the text-side states (`[M, L, H]`, or the token ids for BLIP's layout)
//! and the ITC features are kept. The image token states are kept while texts + images
//! fit `state_budget_mb`; past it they are dropped and the image encoder runs a second
//! time during re-ranking, image batch by image batch (each image is then encoded twice,
//! and only one batch of image states is held at a time).
//!
//! Everything runs on [`EvalConfig::device`], the device the model was loaded onto; image
//! batches and token ids may arrive from the host and are moved there.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vlp_dist::Collective;
use vlp_models::{AlbefModel, FusionInput};

use crate::error::{EvalError, Result};
use crate::metrics::{count_non_finite, rank_in, ranking_key, RetrievalMetrics};

/// How re-ranked candidates are scored. The default, `itm+itc`, is the one home of the
/// default of `eval retrieval`, `bench eval` and recipes' `eval.score`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum ScoreMode {
    /// The ITC cosine alone: no re-ranking (fast).
    #[serde(rename = "itc")]
    Itc,
    /// The ITM "match" logit (ALBEF).
    #[serde(rename = "itm")]
    Itm,
    /// ITM logit + ITC cosine (BLIP, LAVIS; the default).
    #[default]
    #[serde(rename = "itm+itc")]
    ItmItc,
    /// ITM logit + ITC logit (`cos / temp`, the model's own temperature): the two
    /// matchers on one scale. In BLIP's sum the cosine spans ~0.1 among a query's
    /// candidates against the ITM logit's several units, so a trained ITM head decides
    /// alone; here the contrastive ranking keeps its say where ITM is unsure.
    #[serde(rename = "itm+itc-logit")]
    ItmItcLogit,
}

impl std::str::FromStr for ScoreMode {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "itc" => Ok(ScoreMode::Itc),
            "itm" => Ok(ScoreMode::Itm),
            "itm+itc" => Ok(ScoreMode::ItmItc),
            "itm+itc-logit" => Ok(ScoreMode::ItmItcLogit),
            other => Err(EvalError::input(
                "score",
                format!("{other:?}: expected itc, itm, itm+itc or itm+itc-logit"),
            )),
        }
    }
}

impl std::fmt::Display for ScoreMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScoreMode::Itc => "itc",
            ScoreMode::Itm => "itm",
            ScoreMode::ItmItc => "itm+itc",
            ScoreMode::ItmItcLogit => "itm+itc-logit",
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalConfig {
    /// Candidates re-scored per query (ALBEF: 256 COCO, 128 Flickr30K).
    pub k_test: usize,
    pub score: ScoreMode,
    /// Images per image-encoder batch.
    pub image_batch: usize,
    /// Captions per text-encoder batch.
    pub text_batch: usize,
    /// (image, text) pairs per fusion pass.
    pub pair_batch: usize,
    /// Token states kept in memory, in MB (see the module docs).
    pub state_budget_mb: usize,
    /// Progress bars on stderr.
    pub progress: bool,
    /// Where the model lives and every tensor of the evaluation is made (default: the host).
    #[serde(skip)]
    pub device: Device,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            k_test: 128,
            score: ScoreMode::default(),
            image_batch: 64,
            text_batch: 256,
            pair_batch: 128,
            state_budget_mb: 4096,
            progress: false,
            device: vlp_core::device::host(),
        }
    }
}

/// What an evaluation measured.
#[derive(Clone, Debug, Serialize)]
pub struct EvalOutcome {
    /// The plain ITC ranking (always computed: it is the first stage).
    pub itc: RetrievalMetrics,
    /// After re-ranking with `score` (absent for `itc`).
    pub reranked: Option<RetrievalMetrics>,
    pub score: ScoreMode,
    pub k_test: usize,
    /// Seconds per phase, in order.
    pub phases: Vec<(String, f64)>,
    /// Distinct (image, text) pairs fused.
    pub fused_pairs: usize,
    /// Pairs the reference protocol fuses (`N k + M k`, each direction on its own).
    pub protocol_pairs: usize,
    /// Whether the image token states were kept (else recomputed while re-ranking).
    pub image_states_kept: bool,
    /// Token states held, MB.
    pub states_mb: f64,
    /// ITC similarities and re-ranking scores that were NaN or infinite (a broken model:
    /// they were ranked below every finite score, never as hits).
    pub non_finite_scores: usize,
}

impl EvalOutcome {
    /// The metrics to report: re-ranked if there was re-ranking, else ITC.
    pub fn main(&self) -> &RetrievalMetrics {
        self.reranked.as_ref().unwrap_or(&self.itc)
    }

    pub fn phase(&self, name: &str) -> f64 {
        self.phases
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, s)| *s)
    }
}

/// Images per block of the similarity matrix.
const SIM_ROWS: usize = 256;

/// One pass over the images of a set, in a fixed order: calls its argument with
/// consecutive batches `[b, 3, S, S]`. Called once, or twice when the image states do not
/// fit the budget.
pub type ImagePass<'a> = dyn FnMut(&mut dyn FnMut(&Tensor) -> Result<()>) -> Result<()> + 'a;

fn bar(show: bool, len: usize, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_message(what.to_string());
    pb
}

/// The text side, encoded.
struct Texts {
    feats: Tensor,
    /// ALBEF layout: `[M, L, H]` text-only states, row-major.
    states: Vec<f32>,
    /// BLIP layout: `[M, L]` token ids.
    ids: Vec<u32>,
    lens: Vec<usize>,
    max_len: usize,
    hidden: usize,
}

/// Evaluates retrieval over images from `images` (their count: `n_images`) and captions
/// `input_ids`/`attention_mask` (`[M, L]`), `text_image[t]` being the image of caption
/// `t`. The model runs in eval mode (no dropout).
///
/// Every rank of `ranks` calls this with the same model and data (as ALBEF's evaluation
/// does): each encodes everything and computes the same candidates, re-scores the pairs of
/// its own block of images, and the scores are gathered; every rank returns the same
/// outcome. One process: [`vlp_dist::SingleProcess`].
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &AlbefModel,
    images: &mut ImagePass,
    n_images: usize,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    text_image: &[usize],
    cfg: &EvalConfig,
    ranks: &dyn Collective,
) -> Result<EvalOutcome> {
    let (m, max_len) = input_ids.dims2()?;
    if m != text_image.len() || m == 0 || n_images == 0 {
        return Err(EvalError::input(
            "eval set",
            format!(
                "{n_images} images, {m} captions, {} caption->image links",
                text_image.len()
            ),
        ));
    }
    if let Some(&bad) = text_image.iter().find(|&&i| i >= n_images) {
        return Err(EvalError::input(
            "eval set",
            format!("caption of image {bad} of {n_images}"),
        ));
    }
    let blip = FusionInput::reads_ids(&model.config().text);
    let dev = &cfg.device;
    let input_ids = &input_ids.to_device(dev)?;
    let attention_mask = &attention_mask.to_device(dev)?;
    let mut phases = Vec::new();

    // Texts: ITC features and what the fusion needs.
    let t0 = Instant::now();
    let texts = encode_texts(model, input_ids, attention_mask, cfg, blip, max_len)?;
    phases.push(("text_encode".to_string(), t0.elapsed().as_secs_f64()));
    let text_mb = (texts.states.len() * 4 + texts.ids.len() * 4) as f64 / 1048576.0;

    // Images: ITC features, and the token states while they fit.
    let t0 = Instant::now();
    let pb = bar(cfg.progress, n_images, "images");
    let mut image_feats = Vec::new();
    let mut image_states: Option<Vec<f32>> = Some(Vec::new());
    let mut image_state_shape = (0usize, 0usize);
    let budget = cfg.state_budget_mb as f64;
    let need_states = cfg.score != ScoreMode::Itc;
    images(&mut |batch: &Tensor| {
        let (tokens, feat) = model.encode_image(&batch.to_device(dev)?, false)?;
        image_feats.push(feat.detach());
        if need_states {
            let (_, li, hv) = tokens.dims3()?;
            image_state_shape = (li, hv);
            if let Some(kept) = image_states.as_mut() {
                let all = n_images * li * hv;
                let mb = all as f64 * 4.0 / 1048576.0;
                if text_mb + mb <= budget {
                    // Reserved once: growing by doubling would briefly hold it twice.
                    kept.reserve_exact(all.saturating_sub(kept.len()));
                    // Kept in f32 whatever the model computes in (bf16 under mixed precision).
                    kept.extend(
                        tokens
                            .to_dtype(DType::F32)?
                            .flatten_all()?
                            .to_vec1::<f32>()?,
                    );
                } else {
                    tracing::info!(
                        "eval: image token states exceed the {budget} MB budget with the text \
                         states ({text_mb:.0} MB); they will be recomputed while re-ranking"
                    );
                    image_states = None;
                }
            }
        }
        pb.inc(batch.dim(0)? as u64);
        Ok(())
    })?;
    pb.finish_and_clear();
    let image_feats = Tensor::cat(&image_feats, 0)?;
    if image_feats.dim(0)? != n_images {
        return Err(EvalError::input(
            "eval images",
            format!(
                "{} images encoded, {n_images} expected",
                image_feats.dim(0)?
            ),
        ));
    }
    if !need_states {
        image_states = None;
    }
    phases.push(("image_encode".to_string(), t0.elapsed().as_secs_f64()));

    // ITC similarities and candidates.
    let t0 = Instant::now();
    // Row blocks of images, written into one buffer: the [N, M] matrix exists once.
    let mut sims: Vec<f32> = Vec::with_capacity(n_images * m);
    let text_t = texts.feats.t()?;
    for start in (0..n_images).step_by(SIM_ROWS) {
        let rows = SIM_ROWS.min(n_images - start);
        let block = image_feats.narrow(0, start, rows)?.matmul(&text_t)?;
        sims.extend(block.flatten_all()?.to_vec1::<f32>()?);
    }
    let itc = RetrievalMetrics::from_similarities(&sims, n_images, text_image);
    let non_finite_sims = count_non_finite(&sims);
    let states_mb = text_mb
        + image_states
            .as_ref()
            .map_or(0.0, |s| s.len() as f64 * 4.0 / 1048576.0);
    if cfg.score == ScoreMode::Itc {
        phases.push(("sims".to_string(), t0.elapsed().as_secs_f64()));
        return Ok(EvalOutcome {
            itc,
            reranked: None,
            score: cfg.score,
            k_test: cfg.k_test,
            phases,
            fused_pairs: 0,
            protocol_pairs: 0,
            image_states_kept: false,
            states_mb,
            non_finite_scores: warn_non_finite(non_finite_sims, 0),
        });
    }
    let (ki, kt) = (cfg.k_test.min(m).max(1), cfg.k_test.min(n_images).max(1));
    let top_i2t: Vec<Vec<usize>> = (0..n_images)
        .map(|i| top_k(&sims[i * m..(i + 1) * m], ki))
        .collect();
    let top_t2i: Vec<Vec<usize>> = (0..m)
        .map(|t| {
            let col: Vec<f32> = (0..n_images).map(|i| sims[i * m + t]).collect();
            top_k(&col, kt)
        })
        .collect();
    // Distinct pairs, by image.
    let mut pairs: Vec<Vec<usize>> = top_i2t.clone();
    for (t, imgs) in top_t2i.iter().enumerate() {
        for &i in imgs {
            pairs[i].push(t);
        }
    }
    for p in &mut pairs {
        p.sort_unstable();
        p.dedup();
    }
    let fused_pairs: usize = pairs.iter().map(Vec::len).sum();
    phases.push(("sims_topk".to_string(), t0.elapsed().as_secs_f64()));

    // Re-ranking: ITM logits of every distinct pair, one image against batches of texts;
    // this rank scores the images of its block.
    let t0 = Instant::now();
    let (rank, world) = (ranks.rank(), ranks.world_size());
    let block = |r: usize| r * n_images / world..(r + 1) * n_images / world;
    let mine = block(rank);
    if world > 1 {
        check_same_pairs(&pairs, ranks)?;
    }
    let pb = bar(
        cfg.progress,
        pairs[mine.clone()].iter().map(Vec::len).sum(),
        "pairs",
    );
    let mut itm: Vec<Vec<f32>> = vec![Vec::new(); n_images];
    let (li, hv) = image_state_shape;
    let image_states_kept = image_states.is_some();
    let mut score_image = |j: usize, image: &Tensor| -> Result<()> {
        itm[j] = itm_scores(model, &texts, &pairs[j], image, cfg.pair_batch, dev)?;
        pb.inc(pairs[j].len() as u64);
        Ok(())
    };
    match &image_states {
        Some(kept) => {
            let per = li * hv;
            for j in mine.clone() {
                let image = Tensor::from_slice(&kept[j * per..(j + 1) * per], (1, li, hv), dev)?;
                score_image(j, &image)?;
            }
        }
        None => {
            let mut next = 0usize;
            images(&mut |batch: &Tensor| {
                let n = batch.dim(0)?;
                // Only the rows of this rank's block are encoded again.
                let (from, to) = (mine.start.max(next), mine.end.min(next + n));
                if from < to {
                    let rows = batch.narrow(0, from - next, to - from)?;
                    let (tokens, _) = model.encode_image(&rows.to_device(dev)?, false)?;
                    let tokens = tokens.detach();
                    for r in 0..to - from {
                        score_image(from + r, &tokens.narrow(0, r, 1)?)?;
                    }
                }
                next += n;
                Ok(())
            })?;
        }
    }
    pb.finish_and_clear();
    if world > 1 {
        gather_scores(&mut itm, &pairs, ranks, block)?;
    }
    phases.push(("rerank".to_string(), t0.elapsed().as_secs_f64()));

    // Final rankings and metrics.
    let t0 = Instant::now();
    let itc_scale = itc_scale(model, cfg.score)?;
    let score_of = |i: usize, t: usize| -> f32 {
        let p = &pairs[i];
        let at = p.binary_search(&t).expect("scored pair");
        let s = itm[i][at];
        match cfg.score {
            ScoreMode::ItmItc | ScoreMode::ItmItcLogit => s + itc_scale * sims[i * m + t],
            _ => s,
        }
    };
    let non_finite_itm: usize = pairs
        .iter()
        .enumerate()
        .map(|(i, p)| p.iter().filter(|&&t| !score_of(i, t).is_finite()).count())
        .sum();
    // A correct item with a non-finite score ranks last, wherever the sort put it.
    let ranked = |position: usize, score: f32, n: usize| {
        if score.is_finite() {
            position
        } else {
            n - 1
        }
    };
    let mut captions_of = vec![Vec::new(); n_images];
    for (t, &i) in text_image.iter().enumerate() {
        captions_of[i].push(t);
    }
    let image_ranks: Vec<usize> = (0..n_images)
        .map(|i| {
            let row = &sims[i * m..(i + 1) * m];
            let reranked = rerank(&top_i2t[i], |t| score_of(i, t));
            captions_of[i]
                .iter()
                .map(|&c| match reranked.iter().position(|&t| t == c) {
                    Some(p) => ranked(p, score_of(i, c), m),
                    None => rank_in(m, |o| row[o], c),
                })
                .min()
                .unwrap_or(usize::MAX)
        })
        .collect();
    let text_ranks: Vec<usize> = (0..m)
        .map(|t| {
            let g = text_image[t];
            let reranked = rerank(&top_t2i[t], |i| score_of(i, t));
            match reranked.iter().position(|&i| i == g) {
                Some(p) => ranked(p, score_of(g, t), n_images),
                None => rank_in(n_images, |o| sims[o * m + t], g),
            }
        })
        .collect();
    let reranked = RetrievalMetrics::from_ranks(&image_ranks, &text_ranks);
    phases.push(("metrics".to_string(), t0.elapsed().as_secs_f64()));
    Ok(EvalOutcome {
        itc,
        reranked: Some(reranked),
        score: cfg.score,
        k_test: cfg.k_test,
        phases,
        fused_pairs,
        protocol_pairs: n_images * ki + m * kt,
        image_states_kept,
        states_mb,
        non_finite_scores: warn_non_finite(non_finite_sims, non_finite_itm),
    })
}

/// What the ITC cosine is multiplied by where a score adds it to the ITM logit: 1 for
/// BLIP's `itm+itc`, `1 / temp` for `itm+itc-logit` (a non-finite or non-positive
/// temperature makes every score NaN, counted like any other non-finite score).
fn itc_scale(model: &AlbefModel, score: ScoreMode) -> Result<f32> {
    Ok(match score {
        ScoreMode::ItmItcLogit => {
            let temp = model.temp().to_dtype(DType::F32)?.to_scalar::<f32>()?;
            if temp.is_finite() && temp > 0.0 {
                1.0 / temp
            } else {
                f32::NAN
            }
        }
        _ => 1.0,
    })
}

/// The count of non-finite scores, logged when there are any: the recalls of such a
/// model mean nothing, and an end-of-training evaluation should say so loudly.
fn warn_non_finite(sims: usize, reranking: usize) -> usize {
    if sims + reranking > 0 {
        tracing::warn!(
            "eval: {sims} ITC similarities and {reranking} re-ranking scores are NaN or \
             infinite (the model is broken); they were ranked as misses"
        );
    }
    sims + reranking
}

/// The indices of the `k` largest values, best first (ties: smaller index first;
/// non-finite values last).
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let k = k.min(values.len());
    let cmp = |a: &usize, b: &usize| {
        ranking_key(values[*b])
            .total_cmp(&ranking_key(values[*a]))
            .then(a.cmp(b))
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
        // Kept per query: without this every list would hold all N or M slots.
        idx.shrink_to_fit();
    }
    idx.sort_by(cmp);
    idx
}

/// `candidates` (in ITC order) sorted by `score`, best first; equal scores keep the ITC
/// order; non-finite scores go last.
fn rerank(candidates: &[usize], score: impl Fn(usize) -> f32) -> Vec<usize> {
    let mut scored: Vec<(usize, f32)> = candidates
        .iter()
        .map(|&c| (c, ranking_key(score(c))))
        .collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1));
    scored.into_iter().map(|(c, _)| c).collect()
}

fn encode_texts(
    model: &AlbefModel,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    cfg: &EvalConfig,
    blip: bool,
    max_len: usize,
) -> Result<Texts> {
    let m = input_ids.dim(0)?;
    let lens: Vec<usize> = attention_mask
        .to_dtype(DType::U32)?
        .sum(D::Minus1)?
        .to_vec1::<u32>()?
        .into_iter()
        .map(|l| l as usize)
        .collect();
    let pb = bar(cfg.progress, m, "captions");
    let mut feats = Vec::new();
    let mut states = Vec::new();
    let mut hidden = 0;
    let need = cfg.score != ScoreMode::Itc;
    for start in (0..m).step_by(cfg.text_batch.max(1)) {
        let n = cfg.text_batch.max(1).min(m - start);
        let ids = input_ids.narrow(0, start, n)?;
        let mask = attention_mask.narrow(0, start, n)?;
        let (s, f) = model.encode_text(&ids, &mask, false)?;
        feats.push(f.detach());
        if need && !blip {
            hidden = s.dim(2)?;
            if states.is_empty() {
                // Reserved once: growing by doubling would briefly hold it twice.
                states.reserve_exact(m * max_len * hidden);
            }
            states.extend(s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        pb.inc(n as u64);
    }
    pb.finish_and_clear();
    let ids = if need && blip {
        input_ids
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?
    } else {
        Vec::new()
    };
    Ok(Texts {
        feats: Tensor::cat(&feats, 0)?,
        states,
        ids,
        lens,
        max_len,
        hidden,
    })
}

/// Errors unless every rank found the same candidate pairs (same weights, same data):
/// otherwise the gathered scores would belong to other pairs.
fn check_same_pairs(pairs: &[Vec<usize>], ranks: &dyn Collective) -> Result<()> {
    let mut bytes = Vec::new();
    for p in pairs {
        bytes.extend_from_slice(&(p.len() as u64).to_le_bytes());
        for &t in p {
            bytes.extend_from_slice(&(t as u64).to_le_bytes());
        }
    }
    let all = ranks.all_gather_u64(vlp_core::hash::fnv1a64(&bytes))?;
    if all.iter().any(|&h| h != all[0]) {
        return Err(EvalError::input(
            "parallel evaluation",
            "the ranks found different ITC candidates (different weights or data on some \
             rank?)",
        ));
    }
    Ok(())
}

/// Every rank's ITM scores into `itm`: rank `r` scored the images of `block(r)`.
fn gather_scores(
    itm: &mut [Vec<f32>],
    pairs: &[Vec<usize>],
    ranks: &dyn Collective,
    block: impl Fn(usize) -> std::ops::Range<usize>,
) -> Result<()> {
    let mine: Vec<u8> = block(ranks.rank())
        .flat_map(|j| {
            itm[j]
                .iter()
                .flat_map(|s| s.to_le_bytes())
                .collect::<Vec<_>>()
        })
        .collect();
    for (r, bytes) in ranks.all_gather_bytes(&mine)?.into_iter().enumerate() {
        let want: usize = block(r).map(|j| pairs[j].len() * 4).sum();
        if bytes.len() != want {
            return Err(EvalError::input(
                "parallel evaluation",
                format!(
                    "rank {r} sent {} bytes of scores, {want} expected",
                    bytes.len()
                ),
            ));
        }
        let mut at = 0;
        for j in block(r) {
            let n = pairs[j].len();
            itm[j] = bytes[at..at + n * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            at += n * 4;
        }
    }
    Ok(())
}

/// See [`itm_scores`]: the shortest caption of a fusion batch keeps at least this share
/// of the longest one's length.
const PAD_KEEP: f64 = 0.7;

/// ITM "match" logits of `image` (`[1, Li, Hv]`) with each caption of `texts_of`, in that
/// order; the captions run longest first in batches of `pair_batch`, each padded to its
/// own longest.
fn itm_scores(
    model: &AlbefModel,
    texts: &Texts,
    texts_of: &[usize],
    image: &Tensor,
    pair_batch: usize,
    dev: &Device,
) -> Result<Vec<f32>> {
    let mut order: Vec<usize> = (0..texts_of.len()).collect();
    order.sort_by_key(|&p| std::cmp::Reverse(texts.lens[texts_of[p]]));
    let mut out = vec![0f32; texts_of.len()];
    // Batches of at most `pair_batch` captions, cut where a caption is shorter than
    // PAD_KEEP of the batch's longest: padding stays under 30% of the tokens.
    let mut chunks: Vec<&[usize]> = Vec::new();
    let mut start = 0;
    for end in 1..=order.len() {
        let cut = end == order.len()
            || end - start >= pair_batch.max(1)
            || (texts.lens[texts_of[order[end]]] as f64)
                < PAD_KEEP * texts.lens[texts_of[order[start]]] as f64;
        if cut {
            chunks.push(&order[start..end]);
            start = end;
        }
    }
    for chunk in chunks {
        let n = chunk.len();
        let l = chunk
            .iter()
            .map(|&p| texts.lens[texts_of[p]])
            .max()
            .unwrap_or(1)
            .max(1);
        let mask: Vec<u32> = chunk
            .iter()
            .flat_map(|&p| {
                let len = texts.lens[texts_of[p]];
                (0..l).map(move |x| u32::from(x < len))
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, l), dev)?;
        let ids = || {
            let ids: Vec<u32> = chunk
                .iter()
                .flat_map(|&p| {
                    let t = texts_of[p];
                    texts.ids[t * texts.max_len..t * texts.max_len + l]
                        .iter()
                        .copied()
                })
                .collect();
            Ok(Tensor::from_vec(ids, (n, l), dev)?)
        };
        let states = || {
            let h = texts.hidden;
            let row = texts.max_len * h;
            let mut states = Vec::with_capacity(n * l * h);
            for &p in chunk {
                let t = texts_of[p];
                states.extend_from_slice(&texts.states[t * row..t * row + l * h]);
            }
            Ok(Tensor::from_vec(states, (n, l, h), dev)?)
        };
        let text = FusionInput::for_layout(&model.config().text, ids, states)?;
        let fused = model.fuse_cls(text.text(), &mask, image, false)?;
        let logits = model.itm_logits(&fused)?.detach();
        let matched: Vec<f32> = logits.narrow(1, 1, 1)?.flatten_all()?.to_vec1()?;
        for (&p, s) in chunk.iter().zip(matched) {
            out[p] = s;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::{VarBuilder, VarMap};
    use vlp_models::albef::cls;
    use vlp_models::FusionText;

    /// A random micro model, `n` random images and `c` random captions per image
    /// (lengths 3..=8, padded to 8).
    fn setup(n: usize, c: usize) -> (AlbefModel, Tensor, Tensor, Tensor, Vec<usize>) {
        let cfg = vlp_models::test_support::micro_config();
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let model =
            AlbefModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        // Weights and images drawn from a seeded RNG (candle's CPU generator cannot be
        // seeded): the tests' preconditions, such as ITM changing some order, then hold on
        // every run, not on most.
        let mut rng = vlp_core::rng::Rng::new(3);
        let mut normal = |len: usize, std: f64| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    let (u1, u2) = (1.0 - rng.uniform(), rng.uniform());
                    (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect()
        };
        {
            let data = varmap.data().lock().unwrap();
            let mut names: Vec<&String> = data.keys().collect();
            names.sort();
            for name in names {
                let var = &data[name];
                if var.dtype() != DType::F32 {
                    continue;
                }
                let flat = var.as_tensor().flatten_all().unwrap();
                let (lo, hi) = (
                    flat.min(0).unwrap().to_scalar::<f32>().unwrap(),
                    flat.max(0).unwrap().to_scalar::<f32>().unwrap(),
                );
                // Constant-initialised tensors (norms, biases) keep their values.
                if lo != hi {
                    let values = normal(var.elem_count(), 0.02);
                    var.set(&Tensor::from_vec(values, var.dims(), &dev).unwrap())
                        .unwrap();
                }
            }
        }
        let s = cfg.vision.image_size;
        let images = Tensor::from_vec(normal(n * 3 * s * s, 1.0), (n, 3, s, s), &dev).unwrap();
        let m = n * c;
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        for _ in 0..m {
            let len = 3 + rng.below(6) as usize;
            for p in 0..8 {
                let id = match p {
                    0 => cfg.text.cls_id,
                    _ if p == len - 1 => cfg.text.sep_id,
                    _ if p < len => 5 + rng.below(cfg.text.vocab_size as u64 - 5) as u32,
                    _ => cfg.text.pad_id,
                };
                ids.push(id);
                mask.push(u32::from(p < len));
            }
        }
        let ids = Tensor::from_vec(ids, (m, 8), &dev).unwrap();
        let mask = Tensor::from_vec(mask, (m, 8), &dev).unwrap();
        let text_image = (0..m).map(|t| t / c).collect();
        (model, images, ids, mask, text_image)
    }

    fn run(
        model: &AlbefModel,
        images: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        text_image: &[usize],
        cfg: &EvalConfig,
    ) -> EvalOutcome {
        run_on(
            model,
            images,
            ids,
            mask,
            text_image,
            cfg,
            &vlp_dist::SingleProcess,
        )
    }

    fn run_on(
        model: &AlbefModel,
        images: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        text_image: &[usize],
        cfg: &EvalConfig,
        ranks: &dyn Collective,
    ) -> EvalOutcome {
        let n = images.dim(0).unwrap();
        let mut pass = |f: &mut dyn FnMut(&Tensor) -> Result<()>| -> Result<()> {
            for start in (0..n).step_by(cfg.image_batch) {
                f(&images.narrow(0, start, cfg.image_batch.min(n - start))?)?;
            }
            Ok(())
        };
        evaluate(model, &mut pass, n, ids, mask, text_image, cfg, ranks).unwrap()
    }

    #[test]
    fn three_ranks_split_the_reranking_and_agree_with_one_process() {
        let (model, images, ids, mask, text_image) = setup(7, 2);
        for budget in [4096, 0] {
            // Kept image states, and states recomputed while re-ranking.
            let cfg = EvalConfig {
                k_test: 3,
                image_batch: 3,
                pair_batch: 4,
                state_budget_mb: budget,
                ..EvalConfig::default()
            };
            let one = run(&model, &images, &ids, &mask, &text_image, &cfg);
            let port = 43000 + (std::process::id() % 500) as u16 * 4 + (budget == 0) as u16 * 2;
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let (model, images, ids, mask, text_image, cfg) = (
                        model.clone(),
                        images.clone(),
                        ids.clone(),
                        mask.clone(),
                        text_image.clone(),
                        cfg.clone(),
                    );
                    std::thread::spawn(move || {
                        let world = vlp_dist::World::on_localhost(rank, 3, port);
                        let ranks = vlp_dist::tcp::TcpCollective::connect(
                            &world,
                            std::time::Duration::from_secs(20),
                            std::time::Duration::from_secs(60),
                        )
                        .unwrap();
                        run_on(&model, &images, &ids, &mask, &text_image, &cfg, &ranks)
                    })
                })
                .collect();
            for h in handles {
                let out = h.join().unwrap();
                assert_eq!(out.fused_pairs, one.fused_pairs);
                assert_eq!(
                    serde_json::to_value(out.reranked).unwrap(),
                    serde_json::to_value(&one.reranked).unwrap()
                );
                assert_eq!(
                    serde_json::to_value(out.itc).unwrap(),
                    serde_json::to_value(&one.itc).unwrap()
                );
            }
        }
    }

    #[test]
    fn reranking_equals_a_direct_computation_over_every_pair() {
        let (model, images, ids, mask, text_image) = setup(6, 2);
        // k = 4: where the two sums below give different recalls.
        let (n, m, k) = (6, 12, 4);
        // Directly: every pair fused on its own (image repeated, text padded to 8), the
        // ITM+ITC score matrix, top k by ITC re-sorted by it, the rest in ITC order.
        let (tokens, ifeat) = model.encode_image(&images, false).unwrap();
        let (states, tfeat) = model.encode_text(&ids, &mask, false).unwrap();
        let sims: Vec<f32> = ifeat
            .matmul(&tfeat.t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut itm = vec![0f32; n * m];
        for i in 0..n {
            let img = tokens.narrow(0, i, 1).unwrap().repeat((m, 1, 1)).unwrap();
            let fused = model
                .fuse(FusionText::States(&states), &mask, &img, false)
                .unwrap();
            let l: Vec<f32> = model
                .itm_logits(&cls(&fused).unwrap())
                .unwrap()
                .narrow(1, 1, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            itm[i * m..(i + 1) * m].copy_from_slice(&l);
        }
        let temp = model.temp().to_scalar::<f32>().unwrap();
        let mut per_mode = Vec::new();
        // BLIP's sum adds the cosine; `itm+itc-logit` adds the ITC logit, cos / temp.
        for (mode, scale) in [
            (ScoreMode::ItmItc, 1.0),
            (ScoreMode::ItmItcLogit, 1.0 / temp),
        ] {
            let cfg = EvalConfig {
                k_test: k,
                image_batch: 4,
                pair_batch: 5,
                score: mode,
                ..EvalConfig::default()
            };
            let out = run(&model, &images, &ids, &mask, &text_image, &cfg);
            assert_eq!(out.protocol_pairs, n * k + m * k);
            assert!(out.fused_pairs <= out.protocol_pairs && out.fused_pairs >= m * k);
            let score = |i: usize, t: usize| itm[i * m + t] + scale * sims[i * m + t];
            let image_ranks: Vec<usize> = (0..n)
                .map(|i| {
                    let row = &sims[i * m..(i + 1) * m];
                    let order = rerank(&top_k(row, k), |t| score(i, t));
                    (0..m)
                        .filter(|&t| text_image[t] == i)
                        .map(|c| {
                            order
                                .iter()
                                .position(|&t| t == c)
                                .unwrap_or_else(|| rank_in(m, |o| row[o], c))
                        })
                        .min()
                        .unwrap()
                })
                .collect();
            let text_ranks: Vec<usize> = (0..m)
                .map(|t| {
                    let col: Vec<f32> = (0..n).map(|i| sims[i * m + t]).collect();
                    let order = rerank(&top_k(&col, k), |i| score(i, t));
                    let g = text_image[t];
                    order
                        .iter()
                        .position(|&i| i == g)
                        .unwrap_or_else(|| rank_in(n, |o| col[o], g))
                })
                .collect();
            // The ITM scores do change the order of some query's candidates.
            let reordered = (0..n).any(|i| {
                let top = top_k(&sims[i * m..(i + 1) * m], k);
                rerank(&top, |t| score(i, t)) != top
            });
            assert!(
                reordered,
                "{mode}: re-ranking left every ITC order as it was"
            );
            let direct = RetrievalMetrics::from_ranks(&image_ranks, &text_ranks);
            per_mode.push(direct.clone());
            let got = out.reranked.clone().unwrap();
            assert_eq!(
                got, direct,
                "{mode}: batched, deduplicated re-ranking differs from the direct one"
            );
            assert_eq!(
                out.itc,
                RetrievalMetrics::from_similarities(&sims, n, &text_image)
            );
        }
        // The two sums give different recalls here, so each mode's match is its own.
        assert_ne!(per_mode[0], per_mode[1], "the ITC scale changed no recall");
    }

    #[test]
    fn recomputed_image_states_give_the_same_result_as_kept_ones() {
        let (model, images, ids, mask, text_image) = setup(5, 3);
        let kept = EvalConfig {
            k_test: 4,
            image_batch: 2,
            score: ScoreMode::Itm,
            ..EvalConfig::default()
        };
        let recomputed = EvalConfig {
            state_budget_mb: 0,
            ..kept.clone()
        };
        let a = run(&model, &images, &ids, &mask, &text_image, &kept);
        let b = run(&model, &images, &ids, &mask, &text_image, &recomputed);
        assert!(a.image_states_kept && !b.image_states_kept);
        assert_eq!(a.reranked, b.reranked);
        assert_eq!(a.fused_pairs, b.fused_pairs);
    }

    #[test]
    fn itc_mode_fuses_nothing() {
        let (model, images, ids, mask, text_image) = setup(3, 2);
        let cfg = EvalConfig {
            score: ScoreMode::Itc,
            ..EvalConfig::default()
        };
        let out = run(&model, &images, &ids, &mask, &text_image, &cfg);
        assert!(out.reranked.is_none());
        assert_eq!(out.fused_pairs, 0);
        assert_eq!(out.main(), &out.itc);
    }

    #[test]
    fn top_k_is_best_first_with_ties_by_index() {
        assert_eq!(top_k(&[0.1, 0.9, 0.5, 0.9], 3), vec![1, 3, 2]);
        assert_eq!(top_k(&[0.1, 0.2], 5), vec![1, 0]);
    }

    #[test]
    fn rerank_orders_by_score_and_keeps_itc_order_on_ties() {
        // ITC order 4, 2, 7; ITM prefers 7, then ties 4 and 2.
        let s = |c: usize| if c == 7 { 3.0 } else { 1.0 };
        assert_eq!(rerank(&[4, 2, 7], s), vec![7, 4, 2]);
    }

    #[test]
    fn non_finite_scores_go_last_in_both_orderings() {
        let nan = f32::NAN;
        assert_eq!(top_k(&[nan, 0.1, f32::INFINITY, 0.5], 3), vec![3, 1, 0]);
        let s = |c: usize| if c == 4 { nan } else { c as f32 };
        assert_eq!(rerank(&[4, 2, 7], s), vec![7, 2, 4]);
    }

    /// A model whose weights hold a NaN: every score is NaN, so no query may count as a
    /// hit, and the outcome counts them (with NaN compared as "not better", every correct
    /// item used to rank first: R@1 100).
    #[test]
    fn a_nan_model_scores_no_hit_and_counts_its_scores() {
        let (_, images, ids, mask, text_image) = setup(4, 2);
        let cfg = vlp_models::test_support::micro_config();
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        AlbefModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.ends_with("vision_proj.weight") {
                let poisoned = (var.as_tensor() * f64::NAN).unwrap();
                var.set(&poisoned).unwrap();
            }
        }
        let model =
            AlbefModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev)).unwrap();
        for score in [
            ScoreMode::Itc,
            ScoreMode::Itm,
            ScoreMode::ItmItc,
            ScoreMode::ItmItcLogit,
        ] {
            let eval_cfg = EvalConfig {
                k_test: 2,
                score,
                ..EvalConfig::default()
            };
            let out = run(&model, &images, &ids, &mask, &text_image, &eval_cfg);
            assert_eq!((out.itc.tr1, out.itc.ir1), (0.0, 0.0), "{score}");
            // `itm` alone re-ranks with the (finite) ITM head: its recalls are the luck of
            // random weights; `itm+itc` adds the NaN cosine to every score.
            if score != ScoreMode::Itm {
                assert_eq!((out.main().tr1, out.main().ir1), (0.0, 0.0), "{score}");
            }
            assert!(
                out.non_finite_scores >= 4 * 8,
                "{score}: {}",
                out.non_finite_scores
            );
        }
    }

    #[test]
    fn score_modes_parse_and_print() {
        for m in ["itc", "itm", "itm+itc", "itm+itc-logit"] {
            assert_eq!(m.parse::<ScoreMode>().unwrap().to_string(), m);
        }
        assert!("itm-itc".parse::<ScoreMode>().is_err());
    }
}
