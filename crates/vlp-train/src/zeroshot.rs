//! Zero-shot retrieval with the ITC features alone (ALBEF §4 retrieval protocol, steps 1-2
//! and 4, without ITM re-ranking): cosine similarities between every image and every
//! caption of an eval shard set, TR@1/5/10 and IR@1/5/10.

use std::collections::HashMap;
use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use serde::Serialize;
use vlp_core::rng::Rng;
use vlp_data::caption::pre_caption;
use vlp_data::fields::{parse_sample, FieldsConfig};
use vlp_data::image_ops::{
    decode_rgb, EvalTransform, ImageTransform, ImageTransformer, Normalization,
};
use vlp_data::shard::read_shard;
use vlp_data::spec::expand_spec;
use vlp_data::tokenize::TextTokenizer;
use vlp_models::AlbefModel;

use crate::error::TrainError;

type Result<T> = std::result::Result<T, TrainError>;

/// Recall at 1, 5 and 10 in both directions (x100), and their mean.
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
    pub r_mean: f64,
}

impl RetrievalMetrics {
    /// A two-line table.
    pub fn table(&self, name: &str) -> String {
        format!(
            "{:<20} {:>6} {:>6} | {:>6} {:>6} {:>6} | {:>6} {:>6} {:>6} | {:>6}\n\
             {:<20} {:>6} {:>6} | {:>6.2} {:>6.2} {:>6.2} | {:>6.2} {:>6.2} {:>6.2} | {:>6.2}",
            "set",
            "images",
            "texts",
            "TR@1",
            "TR@5",
            "TR@10",
            "IR@1",
            "IR@5",
            "IR@10",
            "mean",
            name,
            self.images,
            self.texts,
            self.tr1,
            self.tr5,
            self.tr10,
            self.ir1,
            self.ir5,
            self.ir10,
            self.r_mean
        )
    }
}

/// Recalls from a similarity matrix `sims` (`images x texts`, row-major) and the image of
/// each text. An image is a hit at K if any of its texts is among its top K; a text if its
/// image is among its top K. Ties rank by index (stable). Pure.
pub fn retrieval_metrics(sims: &[f32], images: usize, text_image: &[usize]) -> RetrievalMetrics {
    let texts = text_image.len();
    assert_eq!(sims.len(), images * texts, "sims must be images x texts");
    // Rank (0-based) of the best-ranked correct item, per query.
    let mut image_ranks = Vec::with_capacity(images);
    for i in 0..images {
        let row = &sims[i * texts..(i + 1) * texts];
        let best = (0..texts)
            .filter(|&t| text_image[t] == i)
            .map(|t| row[t])
            .fold(f32::NEG_INFINITY, f32::max);
        // Texts strictly above the best correct one, plus earlier ties that are wrong.
        let first_correct = (0..texts).find(|&t| text_image[t] == i && row[t] == best);
        let rank = match first_correct {
            None => usize::MAX,
            Some(fc) => (0..texts)
                .filter(|&t| row[t] > best || (row[t] == best && t < fc))
                .count(),
        };
        image_ranks.push(rank);
    }
    let mut text_ranks = Vec::with_capacity(texts);
    for (t, &img) in text_image.iter().enumerate() {
        let s = sims[img * texts + t];
        let rank = (0..images)
            .filter(|&i| {
                let o = sims[i * texts + t];
                o > s || (o == s && i < img)
            })
            .count();
        text_ranks.push(rank);
    }
    let recall = |ranks: &[usize], k: usize| {
        if ranks.is_empty() {
            return 0.0;
        }
        100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
    };
    let (tr1, tr5, tr10) = (
        recall(&image_ranks, 1),
        recall(&image_ranks, 5),
        recall(&image_ranks, 10),
    );
    let (ir1, ir5, ir10) = (
        recall(&text_ranks, 1),
        recall(&text_ranks, 5),
        recall(&text_ranks, 10),
    );
    RetrievalMetrics {
        images,
        texts,
        tr1,
        tr5,
        tr10,
        ir1,
        ir5,
        ir10,
        r_mean: (tr1 + tr5 + tr10 + ir1 + ir5 + ir10) / 6.0,
    }
}

/// An eval set in memory: images (eval transform, normalised CHW) and every cleaned
/// caption with the index of its image. Samples sharing an image id are one image.
pub struct EvalData {
    pub size: u32,
    pub images: Vec<Vec<f32>>,
    pub captions: Vec<String>,
    pub text_image: Vec<usize>,
}

/// Reads every sample of `spec`, in order, at `size` px. Unreadable samples are skipped
/// with a warning.
pub fn load_eval_data(spec: &str, size: u32, max_words: usize) -> Result<EvalData> {
    let urls = expand_spec(spec)?;
    let mut transformer = ImageTransformer::new(
        ImageTransform::Eval(EvalTransform { size }),
        Normalization::Clip,
    );
    let fields = FieldsConfig::default();
    let mut rng = Rng::new(0);
    let mut data = EvalData {
        size,
        images: Vec::new(),
        captions: Vec::new(),
        text_image: Vec::new(),
    };
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for url in &urls {
        let outcome = read_shard(url, 0, |raw| {
            let sample = match parse_sample(raw, &fields) {
                Ok(s) => s,
                Err(skip) => {
                    tracing::warn!(
                        "eval: skipping {}/{}: {:?}",
                        skip.url,
                        skip.key,
                        skip.reason
                    );
                    return ControlFlow::Continue(());
                }
            };
            let index = match by_id.get(&sample.image_id) {
                Some(&i) => i,
                None => {
                    let img = match decode_rgb(&sample.image_bytes, 89_478_485) {
                        Ok(img) => img,
                        Err(e) => {
                            tracing::warn!("eval: skipping {}: {e}", sample.key);
                            return ControlFlow::Continue(());
                        }
                    };
                    let mut out = vec![0f32; transformer.output_len()];
                    transformer.apply(&img, &mut rng, &mut out);
                    data.images.push(out);
                    by_id.insert(sample.image_id.clone(), data.images.len() - 1);
                    data.images.len() - 1
                }
            };
            for c in &sample.captions {
                data.captions.push(pre_caption(c, max_words));
                data.text_image.push(index);
            }
            ControlFlow::Continue(())
        });
        if let Some(problem) = outcome.problem {
            return Err(TrainError::input(
                "eval shards",
                format!("{}: {:?} {}", problem.url, problem.reason, problem.detail),
            ));
        }
    }
    if data.images.is_empty() {
        return Err(TrainError::input(
            "eval shards",
            format!("no samples in {spec}"),
        ));
    }
    Ok(data)
}

/// Encodes every image and caption with the online encoders (no dropout) and scores them.
pub fn evaluate(
    model: &AlbefModel,
    tokenizer: &TextTokenizer,
    data: &EvalData,
    batch_size: usize,
) -> Result<RetrievalMetrics> {
    let dev = Device::Cpu;
    let s = data.size as usize;
    let mut image_feats = Vec::new();
    for chunk in data.images.chunks(batch_size.max(1)) {
        let flat: Vec<f32> = chunk.iter().flatten().copied().collect();
        let images = Tensor::from_vec(flat, (chunk.len(), 3, s, s), &dev)?;
        let (_, feat) = model.encode_image(&images, false)?;
        // Detached: the features would otherwise keep every activation of the forward
        // (the parameters are variables, so the forward records its graph).
        image_feats.push(feat.detach());
    }
    let mut text_feats = Vec::new();
    for chunk in data.captions.chunks(batch_size.max(1)) {
        let enc = tokenizer.encode_batch(chunk)?;
        let (ids, mask) = enc.to_tensors(&dev)?;
        let (_, feat) = model.encode_text(&ids, &mask, false)?;
        text_feats.push(feat.detach());
    }
    let images = Tensor::cat(&image_feats, 0)?;
    let texts = Tensor::cat(&text_feats, 0)?;
    // [I, E] x [E, T] -> [I, T]; features are unit vectors, so these are cosines.
    let sims = images.matmul(&texts.t()?)?;
    let sims: Vec<f32> = sims.flatten_all()?.to_vec1()?;
    Ok(retrieval_metrics(
        &sims,
        data.images.len(),
        &data.text_image,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfect_and_reversed_rankings() {
        // 2 images, 3 texts: texts 0 and 1 belong to image 0, text 2 to image 1.
        let text_image = [0, 0, 1];
        let sims = [0.9, 0.3, 0.0, 0.0, 0.2, 0.8];
        let m = retrieval_metrics(&sims, 2, &text_image);
        assert_eq!((m.tr1, m.ir1), (100.0, 100.0));
        // Text 1 prefers image 1: IR@1 is 2/3; image 0 still finds text 0 first.
        let sims = [0.9, 0.1, 0.0, 0.0, 0.5, 0.8];
        let m = retrieval_metrics(&sims, 2, &text_image);
        assert_eq!(m.tr1, 100.0);
        assert!((m.ir1 - 200.0 / 3.0).abs() < 1e-9);
        assert_eq!(m.ir5, 100.0);
    }

    #[test]
    fn any_caption_counts_for_text_retrieval() {
        // Image 0's best text is wrong (text 2), but its second is its own (text 1).
        let text_image = [0, 0, 1];
        let sims = [0.1, 0.5, 0.9, 0.0, 0.0, 1.0];
        let m = retrieval_metrics(&sims, 2, &text_image);
        assert_eq!(m.tr1, 50.0);
        assert_eq!(m.tr5, 100.0);
    }

    #[test]
    fn ties_do_not_count_as_hits() {
        let m = retrieval_metrics(&[0.0; 4], 2, &[1, 0]);
        // Image 0 ties everything; its text (1) comes after text 0 in index order.
        assert_eq!(m.tr1, 50.0);
        assert_eq!(m.ir1, 50.0);
    }
}
