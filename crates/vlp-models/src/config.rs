//! Architecture configs of the image encoder, the text/fusion encoder and the whole ALBEF
//! model (ALBEF paper §3.1, "Model Architecture"), their named presets, and `config.json`.
//!
//! Architecture fields have no defaults: a config file must name every one, and unknown
//! keys are an error, so a typo cannot silently change the network.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The ViT image encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VisionConfig {
    /// Side of the square input image, in pixels; `pos_embed` covers this grid.
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// MLP width = `mlp_ratio * hidden`.
    pub mlp_ratio: f64,
    /// LayerNorm epsilon (ALBEF/DeiT: 1e-6).
    pub eps: f64,
    /// Whether the fused qkv projection has a bias.
    pub qkv_bias: bool,
}

impl VisionConfig {
    /// Patches per side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens out of the encoder: [CLS] + patches.
    pub fn tokens(&self) -> usize {
        1 + self.grid() * self.grid()
    }

    /// Width of the MLP's hidden layer.
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden as f64 * self.mlp_ratio).round() as usize
    }

    pub fn validate(&self) -> Result<()> {
        positive("vision.image_size", self.image_size)?;
        positive("vision.patch_size", self.patch_size)?;
        positive("vision.layers", self.layers)?;
        heads_divide("vision", self.hidden, self.heads)?;
        if self.image_size % self.patch_size != 0 {
            return Err(ModelError::config(
                "vision.image_size",
                format!(
                    "{} is not a multiple of patch_size {}",
                    self.image_size, self.patch_size
                ),
            ));
        }
        if not_positive(self.mlp_ratio) || self.mlp_hidden() == 0 {
            return Err(ModelError::config("vision.mlp_ratio", "must be > 0"));
        }
        eps_positive("vision.eps", self.eps)
    }
}

// The sizes a user types (`--image-size`, `--batch-size`, `data.image_size`, ...) are
// checked here, for every command, before anything of their size is allocated: past what
// memory holds, an allocation aborts the process instead of returning an error.

/// The largest image side (px) anything is built or run at. BLIP's largest fine-tuned
/// sizes are 384 (retrieval) and 480 (VQA), ALBEF's 384; ViT-B/16 at 1536 px has 9,217
/// tokens, whose attention matrices for one image are 4 GB per layer in f32 where they are
/// materialised: beyond that one image no longer fits a GPU's pass alongside the model.
pub const MAX_IMAGE_SIDE: usize = 1536;

/// How many times the side its weights were trained at a model may be run at: position
/// embeddings interpolated further than 4x per side (16x the tokens) describe a grid the
/// model never saw, and its tokens grow with the square of the side.
pub const MAX_IMAGE_SCALE: usize = 4;

/// The most bytes the activations of one pass over a batch may be estimated at
/// ([`VisionConfig::pass_bytes`]). No single GPU holds more (the largest, an H200, has
/// 141 GB, of which the model, its optimizer state and the text side need their share)
/// and few hosts do: an estimate past it fails anyway, later, as an abort.
pub const MAX_PASS_BYTES: u64 = 128 << 30;

/// Refuses an image side (`flag` = `size`) that is not a multiple of `multiple_of` from
/// `multiple_of` up to `max`; `why_max` says where `max` comes from.
fn check_side(
    flag: &str,
    size: usize,
    multiple_of: usize,
    max: usize,
    why_max: &str,
) -> Result<()> {
    if size >= multiple_of && size <= max && size % multiple_of == 0 {
        return Ok(());
    }
    let step = if multiple_of > 1 {
        format!("a multiple of {multiple_of} ")
    } else {
        String::new()
    };
    Err(ModelError::size(
        flag,
        size,
        format!("must be {step}from {multiple_of} to {max} px ({why_max})"),
    ))
}

/// Refuses an image side of images made or read without a model (synthetic shards, the
/// loader benchmark): from 1 to [`MAX_IMAGE_SIDE`] px.
pub fn check_image_side(flag: &str, size: usize) -> Result<()> {
    check_side(
        flag,
        size,
        1,
        MAX_IMAGE_SIDE,
        "the largest side vlp works at",
    )
}

/// Refuses `batch` items of `item_bytes` each (`flag` = `batch`) past [`MAX_PASS_BYTES`],
/// saying how many fit; `what` names one item in the message.
pub fn check_batch_bytes(flag: &str, batch: usize, item_bytes: u64, what: &str) -> Result<()> {
    if batch == 0 {
        return Err(ModelError::size(flag, batch, "must be at least 1"));
    }
    let total = item_bytes.saturating_mul(batch as u64);
    if total <= MAX_PASS_BYTES {
        return Ok(());
    }
    Err(ModelError::size(
        flag,
        batch,
        format!(
            "{batch} {what} are estimated to need {:.1} GiB at once, more than the bound of \
             {} GiB; at most {} fit",
            total as f64 / (1u64 << 30) as f64,
            MAX_PASS_BYTES >> 30,
            MAX_PASS_BYTES / item_bytes.max(1)
        ),
    ))
}

/// Refuses a batch of `batch` decoded `side` x `side` images (f32, three channels, as the
/// loader hands them out) past [`MAX_PASS_BYTES`].
pub fn check_pixel_batch(flag: &str, batch: usize, side: usize) -> Result<()> {
    let item = 3 * 4 * (side as u64).pow(2);
    check_batch_bytes(flag, batch, item, &format!("images of {side} px"))
}

impl VisionConfig {
    /// The largest side a model whose weights were trained at `image_size` may be run at:
    /// [`MAX_IMAGE_SCALE`] times it, at most [`MAX_IMAGE_SIDE`] (its own size always), a
    /// multiple of the patch size.
    pub fn max_image_size(&self) -> usize {
        let max = (MAX_IMAGE_SCALE * self.image_size)
            .min(MAX_IMAGE_SIDE)
            .max(self.image_size);
        max - max % self.patch_size.max(1)
    }

    /// Refuses running these trained weights at `size` px (`flag` = `size`) unless it is a
    /// multiple of the patch size from one patch to [`Self::max_image_size`]. A model built
    /// fresh at a size has no trained size: [`check_image_side`] and `validate` apply.
    pub fn check_image_size(&self, flag: &str, size: usize) -> Result<()> {
        let why = format!(
            "{MAX_IMAGE_SCALE}x the {} px the weights were trained at, at most {MAX_IMAGE_SIDE}",
            self.image_size
        );
        check_side(flag, size, self.patch_size, self.max_image_size(), &why)
    }

    /// Estimated bytes of the activations a pass over `batch` images at `image_size` holds
    /// at once, in f32: per layer the qkv projection, the attention scores and
    /// probabilities (`heads x tokens^2` each, where materialised), the attention output,
    /// the MLP's hidden layer and the residual stream; one layer's worth for inference,
    /// every layer's for training (the backward needs them). A ceiling for refusing what
    /// cannot run, not a prediction of what will fit.
    pub fn pass_bytes(&self, batch: usize, training: bool) -> u64 {
        let t = self.tokens() as u64;
        let (h, mlp, heads) = (
            self.hidden as u64,
            self.mlp_hidden() as u64,
            self.heads as u64,
        );
        let per_layer = 2 * heads * t * t + t * (6 * h + mlp);
        let layers = if training { self.layers as u64 } else { 1 };
        4u64.saturating_mul(per_layer)
            .saturating_mul(layers)
            .saturating_mul(batch as u64)
    }

    /// Refuses a batch of `batch` images (`flag` = `batch`) whose pass at `image_size`
    /// ([`Self::pass_bytes`]) is estimated past [`MAX_PASS_BYTES`], saying how many fit.
    pub fn check_batch(&self, flag: &str, batch: usize, training: bool) -> Result<()> {
        let what = format!("images of {} px", self.image_size);
        check_batch_bytes(flag, batch, self.pass_bytes(1, training), &what)
    }
}

/// Where the cross-attention layers sit in the text/fusion BERT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Layout {
    /// ALBEF: layers `< fusion_layer` are the text encoder (self-attention only), layers
    /// `>= fusion_layer` the fusion encoder (self-attention, cross-attention, FFN).
    Albef { fusion_layer: usize },
    /// BLIP: cross-attention in every layer; a text-only pass skips it.
    Blip,
}

/// The BERT text encoder + fusion encoder (+ MLM head).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    /// All layers, text and fusion together.
    pub layers: usize,
    pub heads: usize,
    /// FFN width.
    pub intermediate: usize,
    /// Rows of the learned position embeddings (longest sequence).
    pub max_positions: usize,
    /// LayerNorm epsilon (BERT: 1e-12).
    pub eps: f64,
    /// Dropout on embeddings, attention probabilities and sub-layer outputs (BERT: 0.1).
    pub dropout: f64,
    /// Token-type embedding rows; 0 = none (BLIP).
    pub type_vocab_size: usize,
    pub layout: Layout,
    /// Whether the model carries BERT's MLM head (`cls.predictions`); BLIP retrieval does not.
    pub has_mlm_head: bool,
    pub pad_id: u32,
    pub cls_id: u32,
    pub sep_id: u32,
    pub mask_id: u32,
    /// BLIP's `[ENC]` token, put in place of `[CLS]` for image-grounded passes.
    #[serde(default)]
    pub enc_id: Option<u32>,
}

impl TextConfig {
    /// Layers run by a text-only pass: `[0, text_layers())`.
    pub fn text_layers(&self) -> usize {
        match self.layout {
            Layout::Albef { fusion_layer } => fusion_layer,
            Layout::Blip => self.layers,
        }
    }

    /// First layer run by a fusion pass on text states.
    pub fn fusion_start(&self) -> usize {
        match self.layout {
            Layout::Albef { fusion_layer } => fusion_layer,
            Layout::Blip => 0,
        }
    }

    /// Whether layer `j` has cross-attention parameters.
    pub fn has_cross_attention(&self, j: usize) -> bool {
        j >= self.fusion_start()
    }

    pub fn validate(&self) -> Result<()> {
        positive("text.vocab_size", self.vocab_size)?;
        positive("text.layers", self.layers)?;
        positive("text.intermediate", self.intermediate)?;
        positive("text.max_positions", self.max_positions)?;
        heads_divide("text", self.hidden, self.heads)?;
        eps_positive("text.eps", self.eps)?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ModelError::config("text.dropout", "must be in [0, 1)"));
        }
        if let Layout::Albef { fusion_layer } = self.layout {
            if fusion_layer == 0 || fusion_layer >= self.layers {
                return Err(ModelError::config(
                    "text.layout.albef.fusion_layer",
                    format!(
                        "{fusion_layer} leaves no text or no fusion layer out of {}",
                        self.layers
                    ),
                ));
            }
        }
        for (field, id) in [
            ("text.pad_id", Some(self.pad_id)),
            ("text.cls_id", Some(self.cls_id)),
            ("text.sep_id", Some(self.sep_id)),
            ("text.mask_id", Some(self.mask_id)),
            ("text.enc_id", self.enc_id),
        ] {
            if let Some(id) = id {
                if id as usize >= self.vocab_size {
                    return Err(ModelError::config(
                        field,
                        format!("{id} is outside the vocabulary of {}", self.vocab_size),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The whole ALBEF model: encoders, projections, heads, momentum twin and queues.
///
/// Only the architecture: how attention is computed is a runtime choice
/// ([`crate::AlbefModel::with_attention`]) and the momentum coefficient belongs to the
/// training objectives, so neither is stored in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "AlbefConfigFile")]
pub struct AlbefConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    /// Width of the ITC projections and queues.
    pub embed_dim: usize,
    /// Initial ITC temperature (learned, clamped to [0.001, 0.5]).
    pub temp: f64,
    /// Columns of the feature queues (any size; writes wrap around).
    pub queue_size: usize,
}

/// `config.json` as read: [`AlbefConfig`]'s fields, unknown keys still an error, plus the
/// two keys earlier versions wrote (`attention`, `momentum`), accepted and ignored so that
/// their checkpoints keep loading.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlbefConfigFile {
    vision: VisionConfig,
    text: TextConfig,
    embed_dim: usize,
    temp: f64,
    queue_size: usize,
    #[serde(default, rename = "attention")]
    _attention: serde::de::IgnoredAny,
    #[serde(default, rename = "momentum")]
    _momentum: serde::de::IgnoredAny,
}

impl From<AlbefConfigFile> for AlbefConfig {
    fn from(f: AlbefConfigFile) -> Self {
        AlbefConfig {
            vision: f.vision,
            text: f.text,
            embed_dim: f.embed_dim,
            temp: f.temp,
            queue_size: f.queue_size,
        }
    }
}

/// The names [`AlbefConfig::preset`] knows: the one list the CLI's help, its value
/// checks and the error for an unknown name all take.
pub const PRESETS: &[&str] = &["albef-base", "minilm", "tiny", "tiny-p16"];

impl AlbefConfig {
    /// A named architecture, one of [`PRESETS`] (see docs/models.md).
    pub fn preset(name: &str) -> Result<Self> {
        let bert_ids = |vocab_size| (vocab_size, 0, 101, 102, 103);
        let cfg = match name {
            // ViT-B/16 at 256 px + BERT-base split 6 + 6, as published.
            "albef-base" => {
                let (vocab_size, pad_id, cls_id, sep_id, mask_id) = bert_ids(30522);
                AlbefConfig {
                    vision: VisionConfig {
                        image_size: 256,
                        patch_size: 16,
                        hidden: 768,
                        layers: 12,
                        heads: 12,
                        mlp_ratio: 4.0,
                        eps: 1e-6,
                        qkv_bias: true,
                    },
                    text: TextConfig {
                        vocab_size,
                        hidden: 768,
                        layers: 12,
                        heads: 12,
                        intermediate: 3072,
                        max_positions: 512,
                        eps: 1e-12,
                        dropout: 0.1,
                        type_vocab_size: 2,
                        layout: Layout::Albef { fusion_layer: 6 },
                        has_mlm_head: true,
                        pad_id,
                        cls_id,
                        sep_id,
                        mask_id,
                        enc_id: None,
                    },
                    embed_dim: 256,
                    temp: 0.07,
                    queue_size: 65536,
                }
            }
            // MiniLM-L6-H384 as the text encoder (its 6 layers) + 2 new fusion layers of
            // the same width; a 6-layer ViT-S-width image encoder on the standard 224 px
            // grid (14 x 14 patches of 16, the grid of DeiT-S/ViT-S checkpoints).
            "minilm" => {
                let (vocab_size, pad_id, cls_id, sep_id, mask_id) = bert_ids(30522);
                AlbefConfig {
                    vision: VisionConfig {
                        image_size: 224,
                        patch_size: 16,
                        hidden: 384,
                        layers: 6,
                        heads: 6,
                        mlp_ratio: 4.0,
                        eps: 1e-6,
                        qkv_bias: true,
                    },
                    text: TextConfig {
                        vocab_size,
                        hidden: 384,
                        layers: 8,
                        heads: 12,
                        intermediate: 1536,
                        max_positions: 512,
                        eps: 1e-12,
                        dropout: 0.1,
                        type_vocab_size: 2,
                        layout: Layout::Albef { fusion_layer: 6 },
                        has_mlm_head: true,
                        pad_id,
                        cls_id,
                        sep_id,
                        mask_id,
                        enc_id: None,
                    },
                    embed_dim: 256,
                    temp: 0.07,
                    queue_size: 65536,
                }
            }
            // Trains in minutes on 2 CPU cores. Special ids follow `vlp tokenizer train`
            // ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4).
            "tiny" => AlbefConfig {
                vision: VisionConfig {
                    image_size: 64,
                    patch_size: 8,
                    hidden: 128,
                    layers: 4,
                    heads: 4,
                    mlp_ratio: 4.0,
                    eps: 1e-6,
                    qkv_bias: true,
                },
                text: TextConfig {
                    vocab_size: 2000,
                    hidden: 128,
                    layers: 4,
                    heads: 4,
                    intermediate: 512,
                    max_positions: 64,
                    eps: 1e-12,
                    dropout: 0.1,
                    type_vocab_size: 2,
                    layout: Layout::Albef { fusion_layer: 2 },
                    has_mlm_head: true,
                    pad_id: 0,
                    cls_id: 2,
                    sep_id: 3,
                    mask_id: 4,
                    enc_id: None,
                },
                embed_dim: 128,
                temp: 0.07,
                queue_size: 1024,
            },
            // The quickstart's: `tiny` with 16-px patches (a 4 x 4 grid, 2-3x the samples
            // per second of `tiny` on the CPU) and no text dropout (a run of minutes
            // underfits; dropout only slows it).
            "tiny-p16" => {
                let mut cfg = Self::preset("tiny")?;
                cfg.vision.patch_size = 16;
                cfg.text.dropout = 0.0;
                cfg
            }
            _ => {
                return Err(ModelError::UnknownPreset {
                    name: name.to_string(),
                    known: PRESETS.join(", "),
                })
            }
        };
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.vision.validate()?;
        self.text.validate()?;
        positive("embed_dim", self.embed_dim)?;
        positive("queue_size", self.queue_size)?;
        if not_positive(self.temp) {
            return Err(ModelError::config("temp", "must be > 0"));
        }
        Ok(())
    }

    /// Parses and validates a config from JSON text.
    pub fn from_json(text: &str) -> Result<Self> {
        let cfg: AlbefConfig = serde_json::from_str(text).map_err(|source| ModelError::Json {
            what: "model config".to_string(),
            source,
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Pretty JSON, the content of `config.json`.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serialises")
    }

    /// Reads and validates `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Json { source, .. } => ModelError::Json {
                what: path.display().to_string(),
                source,
            },
            other => other,
        })
    }

    /// Writes `config.json`.
    pub fn save(&self, path: &Path) -> Result<()> {
        std::fs::write(path, self.to_json() + "\n").map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

fn positive(field: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(ModelError::config(field, "must be > 0"));
    }
    Ok(())
}

fn heads_divide(side: &str, hidden: usize, heads: usize) -> Result<()> {
    if heads == 0 || hidden == 0 || hidden % heads != 0 {
        return Err(ModelError::config(
            &format!("{side}.heads"),
            format!("hidden {hidden} is not a positive multiple of heads {heads}"),
        ));
    }
    Ok(())
}

/// True for zero, negative and NaN.
fn not_positive(x: f64) -> bool {
    x.is_nan() || x <= 0.0
}

fn eps_positive(field: &str, eps: f64) -> Result<()> {
    if not_positive(eps) {
        return Err(ModelError::config(field, "must be > 0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_round_trip_through_json() {
        for name in PRESETS {
            let cfg = AlbefConfig::preset(name).unwrap();
            cfg.validate().unwrap();
            assert_eq!(AlbefConfig::from_json(&cfg.to_json()).unwrap(), cfg);
        }
        assert!(matches!(
            AlbefConfig::preset("huge"),
            Err(ModelError::UnknownPreset { .. })
        ));
    }

    #[test]
    fn config_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let cfg = AlbefConfig::preset("tiny").unwrap();
        cfg.save(&path).unwrap();
        assert_eq!(AlbefConfig::load(&path).unwrap(), cfg);
    }

    #[test]
    fn unknown_and_missing_keys_are_errors() {
        let cfg = AlbefConfig::preset("tiny").unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
        v["vision"]["dropout"] = serde_json::json!(0.1);
        let err = AlbefConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("dropout"), "{err}");

        let mut v: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
        v["text"].as_object_mut().unwrap().remove("eps");
        let err = AlbefConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("eps"), "{err}");
    }

    #[test]
    fn old_configs_with_attention_and_momentum_still_load() {
        let cfg = AlbefConfig::preset("tiny").unwrap();
        let mut v: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
        assert!(v.get("attention").is_none() && v.get("momentum").is_none());
        v["attention"] = serde_json::json!("generic");
        v["momentum"] = serde_json::json!(0.995);
        assert_eq!(AlbefConfig::from_json(&v.to_string()).unwrap(), cfg);
        // Other unknown top-level keys stay errors.
        v["attn"] = serde_json::json!("fused");
        let err = AlbefConfig::from_json(&v.to_string())
            .unwrap_err()
            .to_string();
        assert!(err.contains("attn"), "{err}");
    }

    #[test]
    fn image_sizes_and_batches_are_bounded_by_the_model_and_memory() {
        let tiny = AlbefConfig::preset("tiny").unwrap().vision;
        assert_eq!((tiny.image_size, tiny.patch_size), (64, 8));
        assert_eq!(tiny.max_image_size(), 256);
        for ok in [8, 64, 96, 256] {
            tiny.check_image_size("--image-size", ok).unwrap();
        }
        for bad in [0, 4, 60, 264, 4096] {
            let e = tiny
                .check_image_size("--image-size", bad)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with(&format!(
                    "--image-size {bad}: must be a multiple of 8 from 8 to 256 px"
                )),
                "{e}"
            );
        }
        // The cap holds for large trained sizes, never below the model's own.
        let base = AlbefConfig::preset("albef-base").unwrap().vision;
        let at = |size| VisionConfig {
            image_size: size,
            ..base.clone()
        };
        assert_eq!(at(384).max_image_size(), MAX_IMAGE_SIDE);
        assert_eq!(at(2048).max_image_size(), 2048);
        let e = check_image_side("data.image_size", 2000)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("data.image_size = 2000: must be from 1 to 1536 px"),
            "{e}"
        );

        // ViT-B/16 at 384 px: about 50 MB per image for inference, 12 layers' worth to train.
        let b384 = at(384);
        assert_eq!(
            b384.pass_bytes(1, false),
            4 * (2 * 12 * 577 * 577 + 577 * 7680)
        );
        assert_eq!(b384.pass_bytes(2, true), 2 * 12 * b384.pass_bytes(1, false));
        b384.check_batch("--batch-size", 64, true).unwrap();
        b384.check_batch("--batch-size", 2048, false).unwrap();
        let e = at(1536)
            .check_batch("--image-batch", 64, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--image-batch 64: 64 images of 1536 px are estimated to need")
                && e.ends_with("at most 16 fit"),
            "{e}"
        );
        assert!(tiny.check_batch("--batch-size", 0, false).is_err());
        assert!(tiny.check_batch("--batch-size", usize::MAX, false).is_err());
        check_pixel_batch("--batch-size", 64, 256).unwrap();
        assert!(check_pixel_batch("--batch-size", 1 << 20, 1536).is_err());
    }

    #[test]
    fn layouts_in_json_and_inconsistent_fusion_layer() {
        let cfg = AlbefConfig::preset("albef-base").unwrap();
        let v: serde_json::Value = serde_json::from_str(&cfg.to_json()).unwrap();
        assert_eq!(
            v["text"]["layout"],
            serde_json::json!({"albef": {"fusion_layer": 6}})
        );
        let mut bad = cfg.clone();
        bad.text.layout = Layout::Albef { fusion_layer: 12 };
        assert!(bad.validate().is_err());
        let mut blip = cfg;
        blip.text.layout = Layout::Blip;
        blip.validate().unwrap();
        assert_eq!(blip.text.text_layers(), 12);
        assert!(blip.text.has_cross_attention(0));
        let v: serde_json::Value = serde_json::from_str(&blip.to_json()).unwrap();
        assert_eq!(v["text"]["layout"], serde_json::json!("blip"));
    }
}
