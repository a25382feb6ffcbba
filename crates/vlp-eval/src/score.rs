//! Pair scoring: the ITC cosine and the ITM match probability of every image x caption
//! pair given (what `vlp score` prints), for checking a model on a few examples.

use candle_core::{Device, Tensor};
use serde::Serialize;
use vlp_data::caption::usable_caption;
use vlp_data::tokenize::TextTokenizer;
use vlp_models::{AlbefModel, FusionInput};

use crate::error::{EvalError, Result};

/// The scores of image `image` with caption `text` (indices into the inputs).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PairScore {
    pub image: usize,
    pub text: usize,
    /// Cosine of the projected, L2-normalised [CLS] features.
    pub itc_similarity: f32,
    /// Softmax of the ITM head's logits, the "match" class.
    pub itm_match_probability: f32,
}

/// `captions` cleaned as for evaluation ([`usable_caption`]), refusing the first one that
/// cleans to nothing with an error naming it (1-based) and its text.
pub fn clean_captions(captions: &[String], max_words: usize) -> Result<Vec<String>> {
    captions
        .iter()
        .enumerate()
        .map(|(t, raw)| {
            usable_caption(raw, max_words).ok_or_else(|| {
                EvalError::input(
                    format!("caption {} {raw:?}", t + 1),
                    "no word is left after caption cleaning (ALBEF's pre_caption drops \
                     punctuation), and training and evaluation leave such captions out",
                )
            })
        })
        .collect()
}

/// Scores every pair of `images` (`[N, 3, S, S]`, normalised as for evaluation; may be on
/// the host) and `captions` (as given: each is cleaned here as for evaluation, with
/// `max_words`), image-major: pair `i * M + t` is image `i` with caption `t`. Everything
/// runs on `device`, the model's.
///
/// A caption that cleans to nothing (`""`, `"   "`, `"!!! ..."`) is refused, naming it
/// ([`clean_captions`]): training and evaluation leave such captions out, so a score for
/// one would describe a text the model is never asked about.
pub fn score_pairs(
    model: &AlbefModel,
    tokenizer: &TextTokenizer,
    images: &Tensor,
    captions: &[String],
    max_words: usize,
    device: &Device,
) -> Result<Vec<PairScore>> {
    if captions.is_empty() || images.dim(0)? == 0 {
        return Err(EvalError::input(
            "pair scoring",
            format!(
                "{} images and {} captions: need at least one of each",
                images.dim(0)?,
                captions.len()
            ),
        ));
    }
    let captions = &clean_captions(captions, max_words)?[..];
    let cfg = model.config();
    let (tokens, image_feats) = model.encode_image(&images.to_device(device)?, false)?;
    let (ids, mask) = tokenizer.encode_batch(captions)?.to_tensors(device)?;
    let (states, text_feats) = model.encode_text(&ids, &mask, false)?;
    let sims: Vec<Vec<f32>> = image_feats.matmul(&text_feats.t()?)?.to_vec2()?;
    let text = FusionInput::for_layout(&cfg.text, || Ok(ids.clone()), || Ok(states.clone()))?;
    let mut out = Vec::with_capacity(sims.len() * captions.len());
    for (i, row) in sims.iter().enumerate() {
        let image = tokens.narrow(0, i, 1)?;
        let fused = model.fuse_cls(text.text(), &mask, &image, false)?;
        let probs: Vec<Vec<f32>> =
            vlp_models::nn::softmax(&model.itm_logits(&fused)?)?.to_vec2()?;
        for (t, (&itc_similarity, p)) in row.iter().zip(&probs).enumerate() {
            out.push(PairScore {
                image: i,
                text: t,
                itc_similarity,
                itm_match_probability: p[1],
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};
    use vlp_data::tokenize::train_wordpiece;

    /// A micro model with random weights and a tokenizer of `words`.
    fn micro_model(words: &[&str]) -> (AlbefModel, TextTokenizer) {
        let cfg = vlp_models::test_support::micro_config();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = AlbefModel::new(&cfg, vb).unwrap();
        let tok = train_wordpiece(words.iter(), 40, 1).unwrap();
        let tokenizer = TextTokenizer::from_tokenizer(tok, "test".into(), 12).unwrap();
        (model, tokenizer)
    }

    #[test]
    fn every_pair_gets_a_cosine_and_a_probability_matching_the_encoders() {
        let dev = Device::Cpu;
        let (model, tokenizer) = micro_model(&["a red square", "a blue circle"]);
        let s = model.config().vision.image_size;
        let images = Tensor::randn(0f32, 1.0, (2, 3, s, s), &dev).unwrap();
        let captions: Vec<String> = ["a red square", "a blue circle", "red"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        let scores = score_pairs(&model, &tokenizer, &images, &captions, 30, &dev).unwrap();
        assert_eq!(scores.len(), 6);
        assert_eq!((scores[4].image, scores[4].text), (1, 1));
        // The cosine of image 1 and caption 2, from the encoders directly.
        let (_, fi) = model.encode_image(&images, false).unwrap();
        let (ids, mask) = tokenizer
            .encode_batch(&captions[2..])
            .unwrap()
            .to_tensors(&dev)
            .unwrap();
        let (_, ft) = model.encode_text(&ids, &mask, false).unwrap();
        let direct: f32 = (fi.get(1).unwrap() * ft.get(0).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((scores[5].itc_similarity - direct).abs() < 1e-5);
        for p in &scores {
            assert!((0.0..=1.0).contains(&p.itm_match_probability), "{p:?}");
            assert!((-1.0001..=1.0001).contains(&p.itc_similarity), "{p:?}");
        }
        assert!(score_pairs(&model, &tokenizer, &images, &[], 30, &dev).is_err());
    }

    #[test]
    fn a_caption_that_cleans_to_nothing_is_refused_naming_it() {
        let dev = Device::Cpu;
        let (model, tokenizer) = micro_model(&["a red square"]);
        let s = model.config().vision.image_size;
        let images = Tensor::zeros((1, 3, s, s), DType::F32, &dev).unwrap();
        for bad in ["", "   ", "!!! ..."] {
            let captions = vec!["a red square".to_string(), bad.to_string()];
            let e = score_pairs(&model, &tokenizer, &images, &captions, 30, &dev)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("caption 2 {bad:?}")) && e.contains("cleaning"),
                "{e}"
            );
        }
    }
}
