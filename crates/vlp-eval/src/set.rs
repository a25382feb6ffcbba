//! An evaluation shard set: every sample's captions, grouped by image id (samples that
//! share an `image_id` are one image with all their captions), and the images streamed
//! through the eval transform in order, never all held in memory.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use vlp_core::device::host;
use vlp_core::rng::Rng;
use vlp_data::caption::usable_captions;
use vlp_data::fields::{parse_sample, FieldsConfig};
use vlp_data::image_ops::{
    checked_dimensions, decode_rgb, EvalTransform, ImageTransform, ImageTransformer, Normalization,
};
use vlp_data::shard::read_shard;
use vlp_data::spec::expand_spec;

use crate::error::{EvalError, Result};

// Decoded images above this many pixels are skipped (as the training loader does).
use vlp_core::MAX_IMAGE_PIXELS as MAX_PIXELS;

/// The captions of a set: `text_image[t]` is the image of caption `t`; `image_keys[i]`
/// the image id of image `i`.
#[derive(Clone, Debug, Default)]
pub struct EvalTexts {
    pub captions: Vec<String>,
    pub text_image: Vec<usize>,
    pub image_keys: Vec<String>,
    /// Samples skipped (unreadable image or sample), each logged once with its shard, key
    /// and reason by [`EvalSet::texts`].
    pub skipped: usize,
}

/// A shard spec read at one image size.
#[derive(Clone, Debug)]
pub struct EvalSet {
    urls: Vec<vlp_data::spec::ShardUrl>,
    size: u32,
    max_words: usize,
    /// Images whose header reads but whose data does not decode, found by an image pass:
    /// (shard index, sample key) -> why. Skipped and counted by every later pass.
    undecodable: Arc<Mutex<HashMap<(usize, String), String>>>,
}

impl EvalSet {
    /// `spec`: a shard spec (brace ranges, lists, directories); images at `size` px
    /// (resize, CLIP normalisation); captions cleaned like training's (`max_words`).
    pub fn open(spec: &str, size: u32, max_words: usize) -> Result<Self> {
        let urls = expand_spec(spec)?;
        if urls.is_empty() {
            return Err(EvalError::input(
                "eval shards",
                format!("{spec} names no shards"),
            ));
        }
        Ok(Self {
            urls,
            size,
            max_words,
            undecodable: Arc::default(),
        })
    }

    pub fn image_size(&self) -> u32 {
        self.size
    }

    /// The captions of the set, read without decoding images (their headers are checked;
    /// an image that fails the check is skipped, counted and logged, and skipped again,
    /// silently, by [`EvalSet::images`]).
    pub fn texts(&self) -> Result<EvalTexts> {
        self.scan(false, &mut |_, _| Ok(()))
    }

    /// Runs `work` on the set's captions, where `work` makes image passes
    /// ([`EvalSet::images`]). An image whose header reads but whose data does not decode
    /// (a file cut short) is only found by decoding it: the pass that finds it goes on to
    /// the end to find every such image and fails with [`EvalError::Undecodable`]; those
    /// images are then skipped and counted like any unreadable sample, and `work` runs
    /// once more on the captions without them.
    pub fn with_images<T>(
        &self,
        mut work: impl FnMut(&EvalTexts) -> Result<T>,
    ) -> Result<(T, EvalTexts)> {
        let texts = self.texts()?;
        match work(&texts) {
            Err(EvalError::Undecodable { count }) => {
                tracing::warn!(
                    "eval: {count} image(s) do not decode; evaluating again without them"
                );
                let texts = self.texts()?;
                Ok((work(&texts)?, texts))
            }
            done => Ok((done?, texts)),
        }
    }

    /// One pass over the images in order, decoded and transformed on the host, in batches
    /// of `batch` as `[b, 3, S, S]` tensors on `device` (the same images, in the same
    /// order, as [`EvalSet::texts`] lists). An image that does not decode ends the pass
    /// with [`EvalError::Undecodable`] (see [`EvalSet::with_images`]).
    pub fn images(
        &self,
        batch: usize,
        device: &Device,
        f: &mut dyn FnMut(&Tensor) -> Result<()>,
    ) -> Result<()> {
        let s = self.size as usize;
        let per = 3 * s * s;
        let batch = batch.max(1);
        let mut buf: Vec<f32> = Vec::with_capacity(batch * per);
        let flush = |buf: &mut Vec<f32>, f: &mut dyn FnMut(&Tensor) -> Result<()>| -> Result<()> {
            if buf.is_empty() {
                return Ok(());
            }
            let n = buf.len() / per;
            let t = Tensor::from_vec(std::mem::take(buf), (n, 3, s, s), &host())?;
            f(&t.to_device(device)?)
        };
        self.scan(true, &mut |_, pixels| {
            buf.extend_from_slice(&pixels);
            if buf.len() >= batch * per {
                flush(&mut buf, f)?;
            }
            Ok(())
        })?;
        flush(&mut buf, f)
    }

    /// One pass over the set in order: with `decode`, calls `on_image(index, pixels)`
    /// (CHW, normalised) for each new image id; returns all captions. A corrupt shard is
    /// an error naming it; an unreadable sample is skipped and counted, and logged only by
    /// the pass without `decode`: every image pass follows a [`EvalSet::texts`] pass
    /// over the same samples, which has said it once.
    fn scan(
        &self,
        decode: bool,
        on_image: &mut dyn FnMut(usize, Vec<f32>) -> Result<()>,
    ) -> Result<EvalTexts> {
        let mut transformer = ImageTransformer::new(
            ImageTransform::Eval(EvalTransform { size: self.size }),
            Normalization::Clip,
        );
        let fields = FieldsConfig::default();
        let mut rng = Rng::new(0);
        let mut texts = EvalTexts::default();
        let mut by_id: HashMap<String, usize> = HashMap::new();
        let mut failure: Option<EvalError> = None;
        let mut undecodable = self.undecodable.lock().expect("undecodable lock");
        let known_bad = undecodable.len();
        for (u, url) in self.urls.iter().enumerate() {
            let outcome = read_shard(url, 0, |raw| {
                let sample = match parse_sample(raw, &fields) {
                    Ok(s) => s,
                    Err(skip) => {
                        if !decode {
                            let why = match skip.detail.as_str() {
                                "" => skip.reason.to_string(),
                                detail => format!("{}: {detail}", skip.reason),
                            };
                            warn_skip(&skip.url, &skip.key, &why);
                        }
                        texts.skipped += 1;
                        return ControlFlow::Continue(());
                    }
                };
                // Captions by the training loader's rule: one with nothing left after
                // cleaning (punctuation only) is no caption; a sample without any is
                // skipped, as the loader skips it.
                let captions = usable_captions(&sample.captions, self.max_words);
                if captions.is_empty() {
                    if !decode {
                        warn_skip(&sample.url, &sample.key, "no usable caption");
                    }
                    texts.skipped += 1;
                    return ControlFlow::Continue(());
                }
                let index = match by_id.get(&sample.image_id) {
                    Some(&i) => i,
                    None => {
                        // The loader's header check and pixel limit; then what earlier
                        // passes found does not decode.
                        let checked = checked_dimensions(&sample.image_bytes, MAX_PIXELS)
                            .map(|_| ())
                            .map_err(|e| e.to_string())
                            .and_then(|()| match undecodable.get(&(u, sample.key.clone())) {
                                Some(why) => Err(why.clone()),
                                None => Ok(()),
                            });
                        if let Err(e) = checked {
                            if !decode {
                                warn_skip(&url.to_string(), &sample.key, &e);
                            }
                            texts.skipped += 1;
                            return ControlFlow::Continue(());
                        }
                        let i = texts.image_keys.len();
                        if decode {
                            let img = match decode_rgb(&sample.image_bytes, MAX_PIXELS) {
                                Ok(img) => img,
                                Err(e) => {
                                    // Recorded; the pass goes on decoding (and nothing
                                    // more is handed on) to find every such image.
                                    undecodable.insert(
                                        (u, sample.key.clone()),
                                        format!("header read but the image does not decode: {e}"),
                                    );
                                    return ControlFlow::Continue(());
                                }
                            };
                            if undecodable.len() == known_bad {
                                let mut pixels = vec![0f32; transformer.output_len()];
                                transformer.apply(&img, &mut rng, &mut pixels);
                                if let Err(e) = on_image(i, pixels) {
                                    failure = Some(e);
                                    return ControlFlow::Break(());
                                }
                            }
                        }
                        texts.image_keys.push(sample.image_id.clone());
                        by_id.insert(sample.image_id.clone(), i);
                        i
                    }
                };
                for c in captions {
                    texts.captions.push(c);
                    texts.text_image.push(index);
                }
                ControlFlow::Continue(())
            });
            if let Some(e) = failure.take() {
                return Err(e);
            }
            if let Some(problem) = outcome.problem {
                return Err(EvalError::input(
                    "eval shards",
                    format!("{}: {} {}", problem.url, problem.reason, problem.detail),
                ));
            }
        }
        if undecodable.len() > known_bad {
            return Err(EvalError::Undecodable {
                count: undecodable.len() - known_bad,
            });
        }
        if texts.image_keys.is_empty() || texts.captions.is_empty() {
            return Err(EvalError::input(
                "eval shards",
                "no readable image with a caption in the set",
            ));
        }
        Ok(texts)
    }
}

fn warn_skip(shard: &str, key: &str, why: &str) {
    tracing::warn!("eval: skipping sample `{key}` of {shard}: {why}");
}

/// Evaluates `model` on a shard set: captions tokenised with `tokenizer`, images streamed
/// (once, or twice when their states do not fit the budget), all on `cfg.device`, the
/// model's device; the re-ranking split over `ranks` (see [`crate::retrieval::evaluate`]).
pub fn evaluate_set(
    model: &vlp_models::AlbefModel,
    tokenizer: &vlp_data::tokenize::TextTokenizer,
    set: &EvalSet,
    cfg: &crate::retrieval::EvalConfig,
    ranks: &dyn vlp_dist::Collective,
) -> Result<(crate::retrieval::EvalOutcome, EvalTexts)> {
    set.with_images(|texts| {
        let (ids, mask) = tokenizer
            .encode_batch(&texts.captions)?
            .to_tensors(&cfg.device)?;
        let batch = cfg.image_batch;
        let mut pass = |f: &mut dyn FnMut(&Tensor) -> Result<()>| set.images(batch, &cfg.device, f);
        crate::retrieval::evaluate(
            model,
            &mut pass,
            texts.image_keys.len(),
            &ids,
            &mask,
            &texts.text_image,
            cfg,
            ranks,
        )
    })
}
