//! `vlp embed`: projected, L2-normalised ITC embeddings of images and/or texts, for
//! retrieval indexes elsewhere; `vlp score`: ITC similarity and ITM match probability of
//! image-caption pairs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use vlp_core::rng::Rng;
use vlp_data::caption::pre_caption;
use vlp_data::image_ops::{
    decode_rgb, EvalTransform, ImageTransform, ImageTransformer, Normalization,
};
use vlp_data::tokenize::TextTokenizer;
use vlp_eval::set::EvalSet;
use vlp_models::{AlbefModel, FusionInput};

use crate::cmd::eval::load_checkpoint;

/// Decoded images above this many pixels are refused.
const MAX_PIXELS: u64 = 89_478_485;
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

#[derive(clap::Args)]
pub struct EmbedArgs {
    /// A checkpoint folder (`model.safetensors` + `config.json`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Images from shards (keys: their image ids).
    #[arg(long, conflicts_with = "images")]
    pub shards: Option<String>,
    /// Images from a folder (jpg, jpeg, png, webp; keys: file names, sorted).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Captions, one per line (keys: line numbers from 1; blank lines skipped).
    #[arg(long)]
    pub texts: Option<PathBuf>,
    /// The tokenizer (`tokenizer.json`); needed with --texts.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Image side [default: the checkpoint's]; position embeddings are interpolated.
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long, default_value_t = 40)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 30)]
    pub max_words: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Output: safetensors with `image_embeds` `[N, E]` and/or `text_embeds` `[M, E]`;
    /// the header metadata holds `image_keys` and `text_lines` (JSON lists).
    #[arg(long)]
    pub out: PathBuf,
}

/// Image files of a folder, sorted by name.
fn image_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .collect();
    files.sort();
    anyhow::ensure!(
        !files.is_empty(),
        "{} has no jpg/jpeg/png/webp images",
        dir.display()
    );
    Ok(files)
}

/// One image file decoded and transformed for evaluation (CHW, normalised).
fn load_image(path: &Path, transformer: &mut ImageTransformer) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let img =
        decode_rgb(&bytes, MAX_PIXELS).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = vec![0f32; transformer.output_len()];
    transformer.apply(&img, &mut Rng::new(0), &mut out);
    Ok(out)
}

fn transformer(size: usize) -> ImageTransformer {
    ImageTransformer::new(
        ImageTransform::Eval(EvalTransform { size: size as u32 }),
        Normalization::Clip,
    )
}

/// ITC features of images given as pixel batches.
fn image_features(model: &AlbefModel, batches: Vec<Tensor>) -> anyhow::Result<Tensor> {
    let mut feats = Vec::new();
    for b in batches {
        feats.push(model.encode_image(&b, false)?.1.detach());
    }
    Ok(Tensor::cat(&feats, 0)?)
}

pub fn run_embed(args: EmbedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.shards.is_some() || args.images.is_some() || args.texts.is_some(),
        "nothing to embed: give --shards or --images, and/or --texts"
    );
    let (cfg, model) = load_checkpoint(&args.checkpoint, args.image_size)?;
    let s = cfg.vision.image_size;
    let dev = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut metadata: HashMap<String, String> = HashMap::new();
    let batch = args.batch_size.max(1);

    if let Some(spec) = &args.shards {
        let set = EvalSet::open(spec, s as u32, args.max_words)?;
        let texts = set.texts()?;
        let mut feats = Vec::new();
        set.images(batch, &mut |b| {
            feats.push(model.encode_image(b, false)?.1.detach());
            Ok(())
        })?;
        tensors.insert("image_embeds".into(), Tensor::cat(&feats, 0)?);
        metadata.insert(
            "image_keys".into(),
            serde_json::to_string(&texts.image_keys)?,
        );
    } else if let Some(dir) = &args.images {
        let files = image_files(dir)?;
        let mut tr = transformer(s);
        let mut batches = Vec::new();
        for chunk in files.chunks(batch) {
            let mut px = Vec::with_capacity(chunk.len() * 3 * s * s);
            for f in chunk {
                px.extend(load_image(f, &mut tr)?);
            }
            batches.push(Tensor::from_vec(px, (chunk.len(), 3, s, s), &dev)?);
        }
        tensors.insert("image_embeds".into(), image_features(&model, batches)?);
        let names: Vec<String> = files
            .iter()
            .map(|f| {
                f.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        metadata.insert("image_keys".into(), serde_json::to_string(&names)?);
    }

    if let Some(path) = &args.texts {
        let tok_path = args
            .tokenizer
            .as_ref()
            .context("--texts needs --tokenizer")?;
        let tokenizer = TextTokenizer::from_file(tok_path, args.max_tokens)
            .with_context(|| format!("reading {}", tok_path.display()))?;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let (lines, captions): (Vec<usize>, Vec<String>) = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (i + 1, pre_caption(l, args.max_words)))
            .unzip();
        anyhow::ensure!(!captions.is_empty(), "{} has no captions", path.display());
        let mut feats = Vec::new();
        for chunk in captions.chunks(batch) {
            let (ids, mask) = tokenizer.encode_batch(chunk)?.to_tensors(&dev)?;
            feats.push(model.encode_text(&ids, &mask, false)?.1.detach());
        }
        tensors.insert("text_embeds".into(), Tensor::cat(&feats, 0)?);
        metadata.insert("text_lines".into(), serde_json::to_string(&lines)?);
    }

    write_embeddings(&args.out, &tensors, metadata)?;
    let summary: serde_json::Map<String, serde_json::Value> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::json!(v.dims())))
        .collect();
    println!(
        "{}",
        serde_json::json!({ "out": args.out.display().to_string(), "tensors": summary })
    );
    Ok(())
}

/// Writes f32 tensors with string metadata (safetensors header `__metadata__`).
fn write_embeddings(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> anyhow::Result<()> {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| -> anyhow::Result<_> {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((k.clone(), bytes, t.dims().to_vec()))
        })
        .collect::<anyhow::Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(k, b, shape)| -> anyhow::Result<_> {
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// A checkpoint folder (`model.safetensors` + `config.json`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// An image file (repeatable).
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// A caption (repeatable).
    #[arg(long = "text", required = true)]
    pub texts: Vec<String>,
    /// The tokenizer (`tokenizer.json`).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Image side [default: the checkpoint's].
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long, default_value_t = 40)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 30)]
    pub max_words: usize,
}

pub fn run_score(args: ScoreArgs) -> anyhow::Result<()> {
    let (cfg, model) = load_checkpoint(&args.checkpoint, args.image_size)?;
    let s = cfg.vision.image_size;
    let dev = Device::Cpu;
    let tokenizer = TextTokenizer::from_file(&args.tokenizer, args.max_tokens)
        .with_context(|| format!("reading {}", args.tokenizer.display()))?;
    let mut tr = transformer(s);
    let mut px = Vec::new();
    for f in &args.images {
        px.extend(load_image(f, &mut tr)?);
    }
    let n = args.images.len();
    let images = Tensor::from_vec(px, (n, 3, s, s), &dev)?;
    let (tokens, ifeat) = model.encode_image(&images, false)?;
    let captions: Vec<String> = args
        .texts
        .iter()
        .map(|t| pre_caption(t, args.max_words))
        .collect();
    let (ids, mask) = tokenizer.encode_batch(&captions)?.to_tensors(&dev)?;
    let (states, tfeat) = model.encode_text(&ids, &mask, false)?;
    let sims: Vec<Vec<f32>> = ifeat.matmul(&tfeat.t()?)?.to_vec2()?;
    let m = captions.len();
    let mut rows = Vec::new();
    for (i, image) in args.images.iter().enumerate() {
        let img = tokens.narrow(0, i, 1)?;
        let text = FusionInput::for_layout(&cfg.text, || Ok(ids.clone()), || Ok(states.clone()))?;
        let cls = model.fuse_cls(text.text(), &mask, &img, false)?;
        let probs: Vec<Vec<f32>> = vlp_models::nn::softmax(&model.itm_logits(&cls)?)?.to_vec2()?;
        for t in 0..m {
            rows.push(serde_json::json!({
                "image": image.display().to_string(),
                "text": args.texts[t],
                "itc_similarity": sims[i][t],
                "itm_match_probability": probs[t][1],
            }));
            eprintln!(
                "{:>8.4} {:>8.4}  {}  {:?}",
                sims[i][t],
                probs[t][1],
                image.display(),
                args.texts[t]
            );
        }
    }
    println!("{}", serde_json::json!({ "pairs": rows }));
    Ok(())
}
