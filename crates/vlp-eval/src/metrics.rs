//! Retrieval metrics from rankings (ALBEF's protocol, step 4).
//!
//! Text retrieval (TR, image -> text): an image's rank is that of its best-placed caption
//! (a hit at K if *any* of its captions is in its top K). Image retrieval (IR, text ->
//! image): a caption's rank is that of its image. Recalls are percentages; ranks are
//! reported 1-based (median and mean), as in the VSE/ALBEF literature.
//!
//! A non-finite score (NaN, +-Inf) comes from a broken model, never from a good match:
//! it ranks below every finite score, and a correct item scored non-finite ranks last, so
//! such a model cannot reach a high recall by comparisons that NaN makes false.

use serde::Serialize;

/// Recalls at 1, 5 and 10 in both directions (x100), their means, rsum, and the median
/// and mean rank of the correct item (1-based).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetrievalMetrics {
    pub images: usize,
    pub texts: usize,
    pub tr1: f64,
    pub tr5: f64,
    pub tr10: f64,
    pub ir1: f64,
    pub ir5: f64,
    pub ir10: f64,
    /// Mean of TR@1/5/10.
    pub tr_mean: f64,
    /// Mean of IR@1/5/10.
    pub ir_mean: f64,
    /// Mean of all six recalls (ALBEF's `r_mean`, the fine-tuning selection criterion).
    pub r_mean: f64,
    /// Sum of all six recalls.
    pub rsum: f64,
    pub tr_median_rank: f64,
    pub tr_mean_rank: f64,
    pub ir_median_rank: f64,
    pub ir_mean_rank: f64,
}

impl RetrievalMetrics {
    /// From 0-based ranks: `image_ranks[i]` of image `i`'s best caption, `text_ranks[t]` of
    /// caption `t`'s image.
    pub fn from_ranks(image_ranks: &[usize], text_ranks: &[usize]) -> Self {
        let recall = |ranks: &[usize], k: usize| {
            if ranks.is_empty() {
                return 0.0;
            }
            100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
        };
        let (tr1, tr5, tr10) = (
            recall(image_ranks, 1),
            recall(image_ranks, 5),
            recall(image_ranks, 10),
        );
        let (ir1, ir5, ir10) = (
            recall(text_ranks, 1),
            recall(text_ranks, 5),
            recall(text_ranks, 10),
        );
        let rsum = tr1 + tr5 + tr10 + ir1 + ir5 + ir10;
        RetrievalMetrics {
            images: image_ranks.len(),
            texts: text_ranks.len(),
            tr1,
            tr5,
            tr10,
            ir1,
            ir5,
            ir10,
            tr_mean: (tr1 + tr5 + tr10) / 3.0,
            ir_mean: (ir1 + ir5 + ir10) / 3.0,
            r_mean: rsum / 6.0,
            rsum,
            tr_median_rank: median_rank(image_ranks),
            tr_mean_rank: mean_rank(image_ranks),
            ir_median_rank: median_rank(text_ranks),
            ir_mean_rank: mean_rank(text_ranks),
        }
    }

    /// Metrics of the plain similarity ranking: `sims` is `images x texts`, row-major;
    /// `text_image[t]` the image of caption `t`.
    pub fn from_similarities(sims: &[f32], images: usize, text_image: &[usize]) -> Self {
        let texts = text_image.len();
        assert_eq!(sims.len(), images * texts, "sims must be images x texts");
        let mut captions_of = vec![Vec::new(); images];
        for (t, &i) in text_image.iter().enumerate() {
            captions_of[i].push(t);
        }
        let image_ranks: Vec<usize> = (0..images)
            .map(|i| {
                let row = &sims[i * texts..(i + 1) * texts];
                captions_of[i]
                    .iter()
                    .map(|&t| rank_in(row.len(), |o| row[o], t))
                    .min()
                    .unwrap_or(usize::MAX)
            })
            .collect();
        let text_ranks: Vec<usize> = text_image
            .iter()
            .enumerate()
            .map(|(t, &img)| rank_in(images, |o| sims[o * texts + t], img))
            .collect();
        Self::from_ranks(&image_ranks, &text_ranks)
    }
}

/// The 0-based rank of item `target` among `n` items scored by `score`: the items that
/// score higher, plus equal-scoring items with a smaller index (ties break by index, so a
/// tie never counts in the correct item's favour over an earlier one). A non-finite score
/// ranks below every finite one; a non-finite `target` ranks last (`n - 1`).
pub fn rank_in(n: usize, score: impl Fn(usize) -> f32, target: usize) -> usize {
    let s = score(target);
    if !s.is_finite() {
        return n.saturating_sub(1);
    }
    (0..n)
        .filter(|&o| {
            let v = score(o);
            v.is_finite() && (v > s || (v == s && o < target))
        })
        .count()
}

/// The key scores are ranked by: the score itself when finite, else below every finite
/// score (with `total_cmp`, a NaN would otherwise rank above `+Inf`).
pub fn ranking_key(score: f32) -> f32 {
    if score.is_finite() {
        score
    } else {
        f32::NEG_INFINITY
    }
}

/// How many of `scores` are NaN or infinite.
pub fn count_non_finite(scores: &[f32]) -> usize {
    scores.iter().filter(|s| !s.is_finite()).count()
}

/// Median of 1-based ranks (the mean of the two middle ones for an even count).
fn median_rank(ranks: &[usize]) -> f64 {
    if ranks.is_empty() {
        return 0.0;
    }
    let mut r: Vec<usize> = ranks.to_vec();
    r.sort_unstable();
    let n = r.len();
    let one_based = |x: usize| x as f64 + 1.0;
    if n % 2 == 1 {
        one_based(r[n / 2])
    } else {
        (one_based(r[n / 2 - 1]) + one_based(r[n / 2])) / 2.0
    }
}

fn mean_rank(ranks: &[usize]) -> f64 {
    if ranks.is_empty() {
        return 0.0;
    }
    ranks.iter().map(|&r| r as f64 + 1.0).sum::<f64>() / ranks.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_reversed_rankings() {
        // 2 images, 3 texts: texts 0 and 1 belong to image 0, text 2 to image 1.
        let text_image = [0, 0, 1];
        let sims = [0.9, 0.3, 0.0, 0.0, 0.2, 0.8];
        let m = RetrievalMetrics::from_similarities(&sims, 2, &text_image);
        assert_eq!((m.tr1, m.ir1, m.rsum), (100.0, 100.0, 600.0));
        assert_eq!((m.tr_median_rank, m.ir_mean_rank), (1.0, 1.0));
        // Text 1 prefers image 1: IR@1 is 2/3; image 0 still finds text 0 first.
        let sims = [0.9, 0.1, 0.0, 0.0, 0.5, 0.8];
        let m = RetrievalMetrics::from_similarities(&sims, 2, &text_image);
        assert_eq!(m.tr1, 100.0);
        assert!((m.ir1 - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(m.ir5, 100.0);
        // Ranks of the texts: 1, 2, 1 -> median 1, mean 4/3.
        assert_eq!(m.ir_median_rank, 1.0);
        assert!((m.ir_mean_rank - 4.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn any_caption_of_the_image_counts_for_text_retrieval() {
        // Image 0's best text is wrong (text 2), but its second is its own (text 1).
        let text_image = [0, 0, 1];
        let sims = [0.1, 0.5, 0.9, 0.0, 0.0, 1.0];
        let m = RetrievalMetrics::from_similarities(&sims, 2, &text_image);
        assert_eq!(m.tr1, 50.0);
        assert_eq!(m.tr5, 100.0);
        // Image ranks (1-based) 2 and 1: median 1.5, mean 1.5.
        assert_eq!((m.tr_median_rank, m.tr_mean_rank), (1.5, 1.5));
    }

    #[test]
    fn ties_do_not_count_in_the_correct_items_favour() {
        let m = RetrievalMetrics::from_similarities(&[0.0; 4], 2, &[1, 0]);
        // Image 0 ties everything; its text (1) comes after text 0 in index order.
        assert_eq!(m.tr1, 50.0);
        assert_eq!(m.ir1, 50.0);
    }

    #[test]
    fn a_nan_similarity_row_ranks_worst_and_scores_no_hit() {
        // Image 0's row is all NaN: with NaN compared as "not greater", its text would
        // have ranked first (R@1 100).
        let nan = f32::NAN;
        let text_image = [0, 1];
        let sims = [nan, nan, 0.1, 0.9];
        let m = RetrievalMetrics::from_similarities(&sims, 2, &text_image);
        assert_eq!(m.tr1, 50.0, "image 0 misses, image 1 hits");
        // Text 0's column is (NaN, 0.1): its image 0 ranks last.
        assert_eq!(m.ir1, 50.0);
        assert_eq!(rank_in(2, |o| sims[o], 0), 1);
        // Every score NaN: no hit at 1, every rank the worst (2 of 2).
        let m = RetrievalMetrics::from_similarities(&[nan; 4], 2, &text_image);
        assert_eq!((m.tr1, m.ir1), (0.0, 0.0));
        assert_eq!((m.tr_median_rank, m.ir_median_rank), (2.0, 2.0));
    }

    #[test]
    fn non_finite_scores_rank_below_every_finite_one() {
        let scores = [f32::INFINITY, -5.0, f32::NAN, f32::NEG_INFINITY];
        // The finite -5 is first although +Inf and NaN "compare" above it.
        assert_eq!(rank_in(4, |o| scores[o], 1), 0);
        assert_eq!(rank_in(4, |o| scores[o], 0), 3);
        assert_eq!(rank_in(4, |o| scores[o], 2), 3);
        assert_eq!(count_non_finite(&scores), 3);
        assert_eq!(ranking_key(f32::NAN), f32::NEG_INFINITY);
        assert_eq!(ranking_key(0.5), 0.5);
    }

    #[test]
    fn recall_at_k_means_and_rsum_from_ranks() {
        // 4 images ranked 0, 4, 9, 10 -> TR@1 25, @5 50, @10 75.
        let m = RetrievalMetrics::from_ranks(&[0, 4, 9, 10], &[0, 0]);
        assert_eq!((m.tr1, m.tr5, m.tr10), (25.0, 50.0, 75.0));
        assert_eq!((m.ir1, m.ir5, m.ir10), (100.0, 100.0, 100.0));
        assert_eq!(m.tr_mean, 50.0);
        assert_eq!(m.rsum, 450.0);
        assert_eq!(m.r_mean, 75.0);
        assert_eq!(m.tr_median_rank, 7.5);
        assert_eq!(m.tr_mean_rank, 6.75);
    }
}
