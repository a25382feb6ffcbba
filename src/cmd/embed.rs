//! `vlp embed`: projected, L2-normalised ITC embeddings of images and/or texts, for
//! retrieval indexes elsewhere; `vlp score`: ITC similarity and ITM match probability of
//! image-caption pairs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{Device, Tensor};
use vlp_core::device::{host, DeviceSpec};
use vlp_core::rng::Rng;
use vlp_core::MAX_IMAGE_PIXELS as MAX_PIXELS;
use vlp_data::caption::usable_caption;
use vlp_data::image_ops::{
    decode_rgb, EvalTransform, ImageTransform, ImageTransformer, Normalization,
};
use vlp_eval::score::{clean_captions, score_pairs};
use vlp_eval::set::EvalSet;
use vlp_models::AlbefModel;

use crate::cmd::eval::{load_checkpoint, TextArgs};
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

#[derive(clap::Args)]
pub struct EmbedArgs {
    /// A checkpoint folder (`model.safetensors` + `config.json`), or a training run folder
    /// (its `best/`, else its newest complete checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Images from shards (keys: their image ids).
    #[arg(long, conflicts_with = "images")]
    pub shards: Option<String>,
    /// Images from a folder (jpg, jpeg, png, webp; keys: file names, sorted).
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Captions, one per line (keys: line numbers from 1). Blank lines are skipped; lines
    /// that clean to no caption (punctuation only) are skipped and counted, as training
    /// and evaluation skip them.
    #[arg(long)]
    pub texts: Option<PathBuf>,
    #[command(flatten)]
    pub text: TextArgs,
    /// Image side [default: the checkpoint's]; position embeddings are interpolated.
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Output: safetensors with `image_embeds` `[N, E]` and/or `text_embeds` `[M, E]`;
    /// the header metadata holds `image_keys` and `text_lines` (JSON lists).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file (never one inside a training run or checkpoint).
    #[arg(long)]
    pub force: bool,
    /// Where the model runs: `cpu`, `cuda` (GPU 0) or `cuda:N` (needs a build with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
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

/// ITC features of images given as host pixel batches, computed on `device`.
fn image_features(
    model: &AlbefModel,
    batches: Vec<Tensor>,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let mut feats = Vec::new();
    for b in batches {
        feats.push(model.encode_image(&b.to_device(device)?, false)?.1.detach());
    }
    Ok(Tensor::cat(&feats, 0)?)
}

/// Image files decoded and transformed for evaluation (at `size` px) on the host,
/// `[N, 3, size, size]`.
fn image_batch(
    files: &[PathBuf],
    size: usize,
    transformer: &mut ImageTransformer,
) -> anyhow::Result<Tensor> {
    let mut px = Vec::with_capacity(files.len() * transformer.output_len());
    for f in files {
        px.extend(load_image(f, transformer)?);
    }
    Ok(Tensor::from_vec(px, (files.len(), 3, size, size), &host())?)
}

/// The captions of a `--texts` file, by the rule of training and evaluation
/// ([`usable_caption`]).
struct TextLines {
    /// Line numbers (from 1) of the captions kept: the `text_lines` metadata.
    lines: Vec<usize>,
    /// The kept lines, cleaned.
    captions: Vec<String>,
    /// Non-blank lines left out because they clean to nothing (`"!!! ..."`). Blank lines
    /// only separate captions and are neither kept nor counted.
    skipped: usize,
}

fn read_captions(path: &Path, max_words: usize) -> anyhow::Result<TextLines> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = TextLines {
        lines: Vec::new(),
        captions: Vec::new(),
        skipped: 0,
    };
    let mut unusable = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match usable_caption(line, max_words) {
            Some(caption) => {
                out.lines.push(i + 1);
                out.captions.push(caption);
            }
            None => unusable.push((i + 1).to_string()),
        }
    }
    out.skipped = unusable.len();
    if out.skipped > 0 {
        unusable.truncate(10);
        stderrln!(
            "{}: skipped {} lines that clean to no caption (line {}{}), as training and \
             evaluation skip such captions",
            path.display(),
            out.skipped,
            unusable.join(", "),
            if out.skipped > 10 { ", ..." } else { "" },
        );
    }
    anyhow::ensure!(
        !out.captions.is_empty(),
        "{} has no usable caption ({} lines clean to nothing)",
        path.display(),
        out.skipped
    );
    Ok(out)
}

pub fn run_embed(args: EmbedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.shards.is_some() || args.images.is_some() || args.texts.is_some(),
        "nothing to embed: give --shards or --images, and/or --texts"
    );
    crate::cmd::output::check_output_file("--out", &args.out, args.force)?;
    let dev = args.device.resolve()?;
    let ckpt = load_checkpoint(
        &args.checkpoint,
        args.image_size,
        ("--batch-size", args.batch_size),
        &dev,
    )?;
    let settings = args.text.settings(&ckpt)?;
    let texts = args
        .texts
        .as_ref()
        .map(|path| read_captions(path, settings.max_words))
        .transpose()?;
    // Checked before any image is encoded: a mismatch is found in a second.
    let tokenizer = match &args.texts {
        Some(_) => Some(args.text.tokenizer(&ckpt, settings.max_tokens)?.1),
        None => None,
    };
    let (cfg, model) = (&ckpt.cfg, &ckpt.model);
    let s = cfg.vision.image_size;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut metadata: HashMap<String, String> = HashMap::new();
    let batch = args.batch_size;

    if let Some(spec) = &args.shards {
        let set = EvalSet::open(spec, s as u32, settings.max_words)?;
        let (feats, set_texts) = set.with_images(|_| {
            let mut feats = Vec::new();
            set.images(batch, &dev, &mut |b| {
                feats.push(model.encode_image(b, false)?.1.detach());
                Ok(())
            })?;
            Ok(feats)
        })?;
        tensors.insert("image_embeds".into(), Tensor::cat(&feats, 0)?);
        metadata.insert(
            "image_keys".into(),
            serde_json::to_string(&set_texts.image_keys)?,
        );
    } else if let Some(dir) = &args.images {
        let files = image_files(dir)?;
        let mut tr = transformer(s);
        let batches = files
            .chunks(batch)
            .map(|chunk| image_batch(chunk, s, &mut tr))
            .collect::<anyhow::Result<Vec<_>>>()?;
        tensors.insert("image_embeds".into(), image_features(model, batches, &dev)?);
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

    if let (Some(texts), Some(tokenizer)) = (&texts, &tokenizer) {
        let mut feats = Vec::new();
        for chunk in texts.captions.chunks(batch) {
            let (ids, mask) = tokenizer.encode_batch(chunk)?.to_tensors(&dev)?;
            feats.push(model.encode_text(&ids, &mask, false)?.1.detach());
        }
        tensors.insert("text_embeds".into(), Tensor::cat(&feats, 0)?);
        metadata.insert("text_lines".into(), serde_json::to_string(&texts.lines)?);
    }

    write_embeddings(&args.out, &tensors, metadata)?;
    let summary: serde_json::Map<String, serde_json::Value> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::json!(v.dims())))
        .collect();
    let mut report =
        serde_json::json!({ "out": args.out.display().to_string(), "tensors": summary });
    if let Some(texts) = &texts {
        report["skipped_texts"] = serde_json::json!(texts.skipped);
    }
    stdoutln!("{report}");
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
    // The writer creates its file owner-only; it gets the umask's mode instead.
    let mode = vlp_core::fs::new_file_permissions(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    safetensors::serialize_to_file(views, Some(metadata), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, mode).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// A checkpoint folder (`model.safetensors` + `config.json`), or a training run folder
    /// (its `best/`, else its newest complete checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// An image file (repeatable).
    #[arg(long = "image", required = true)]
    pub images: Vec<PathBuf>,
    /// A caption (repeatable); one that cleans to nothing (empty, punctuation only) is
    /// refused, as training and evaluation never use such a caption.
    #[arg(long = "text", required = true)]
    pub texts: Vec<String>,
    #[command(flatten)]
    pub text: TextArgs,
    /// Image side [default: the checkpoint's].
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Where the model runs: `cpu`, `cuda` (GPU 0) or `cuda:N` (needs a build with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

pub fn run_score(args: ScoreArgs) -> anyhow::Result<()> {
    let dev = args.device.resolve()?;
    // Every --image goes through the model in one batch.
    let ckpt = load_checkpoint(
        &args.checkpoint,
        args.image_size,
        ("--image", args.images.len()),
        &dev,
    )?;
    let text = args.text.settings(&ckpt)?;
    // Refused before any image is scored; `score_pairs` cleans them by the same rule.
    clean_captions(&args.texts, text.max_words).context("--text")?;
    let (_, tokenizer) = args.text.tokenizer(&ckpt, text.max_tokens)?;
    let s = ckpt.cfg.vision.image_size;
    let images = image_batch(&args.images, s, &mut transformer(s))?;
    let scores = score_pairs(
        &ckpt.model,
        &tokenizer,
        &images,
        &args.texts,
        text.max_words,
        &dev,
    )?;
    let mut rows = Vec::with_capacity(scores.len());
    for p in &scores {
        let (image, text) = (args.images[p.image].display(), &args.texts[p.text]);
        stderrln!(
            "{:>8.4} {:>8.4}  {image}  {text:?}",
            p.itc_similarity,
            p.itm_match_probability
        );
        rows.push(serde_json::json!({
            "image": image.to_string(),
            "text": text,
            "itc_similarity": p.itc_similarity,
            "itm_match_probability": p.itm_match_probability,
        }));
    }
    stdoutln!("{}", serde_json::json!({ "pairs": rows }));
    Ok(())
}
