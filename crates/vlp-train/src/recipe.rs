//! Training recipes: one TOML file with `[model]`, `[data]`, `[objectives]`, `[optim]`,
//! `[run]` and `[eval]`, strict about keys (every table denies unknown ones), with
//! `--set key.path=value` overrides applied to the TOML tree before it is read.

use candle_core::DType;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vlp_core::device::DeviceSpec;
use vlp_data::image_ops::{EvalTransform, ImageTransform, TrainTransform};
use vlp_data::loader::{LoaderConfig, Mode};

use vlp_models::AlbefConfig;

use crate::error::TrainError;
use crate::objectives::ObjectiveConfig;
use crate::schedule::Schedule;

type Result<T> = std::result::Result<T, TrainError>;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataSection,
    /// The objectives (`ObjectiveConfig`). Its `alpha_ramp_steps`, when 0, means "over the
    /// first epoch" here: `samples_in_epoch / batch_size` steps, or
    /// `optim.alpha_ramp_fallback_steps` when the epoch length is unknown (resampled data).
    #[serde(default)]
    pub objectives: ObjectiveConfig,
    pub optim: OptimSection,
    pub run: RunSection,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalSection>,
}

/// The architecture: a named preset or a `config.json`; optionally initial weights.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// One of [`vlp_models::config::PRESETS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// A model `config.json` (our format), instead of a preset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    /// A folder in our checkpoint format (`model.safetensors` + `config.json`, as written by
    /// `vlp convert` or a training run) to start from, or a training run folder (its
    /// `best/`, else its newest checkpoint; the resolved recipe records the folder used).
    /// Its config replaces the preset's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<PathBuf>,
    /// Activation checkpointing: the online ViT blocks and BERT layers recompute their
    /// activations in the backward instead of keeping them (about one more forward of
    /// the online encoders per step, for a peak that no longer grows with their depth).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grad_checkpoint: bool,
}

/// Which image transform training batches get.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransformChoice {
    /// ALBEF pretraining: RandomResizedCrop(0.2-1) + flip + RandAugment(2, 7).
    #[default]
    Pretrain,
    /// ALBEF fine-tuning: as pretrain with crop scale 0.5-1.
    Finetune,
    /// RandomResizedCrop(0.5-1) + flip, no RandAugment (cheap, for tiny CPU runs).
    Light,
    /// Resize only.
    Eval,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Shard spec (brace ranges, `::`-separated lists), as `vlp shards` takes.
    pub shards: String,
    /// A `tokenizer.json` whose vocabulary fits the model's. May be left out when
    /// `model.init` keeps the tokenizer it was trained with (then that one is used, and
    /// the resolved recipe names it); one whose content differs from it is refused
    /// unless `allow_other_tokenizer`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// Train with a `tokenizer` other than the one `model.init` (or the distillation
    /// teacher) was trained with: the same ids then stand for other words, which only
    /// makes sense for a tokenizer known to number them alike.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_other_tokenizer: bool,
    /// Samples per step on each process (per GPU).
    pub batch_size: usize,
    /// Processes taking part (the global batch is `batch_size * world_size`): when given,
    /// the launch must start exactly this many (`vlp launch`, torchrun, srun); left out,
    /// the launch decides. The resolved recipe and checkpoints record the number that ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
    #[serde(default = "two")]
    pub workers: usize,
    /// Image side; the model's `vision.image_size` when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<u32>,
    #[serde(default)]
    pub transform: TransformChoice,
    #[serde(default = "thirty")]
    pub max_tokens: usize,
    #[serde(default = "thirty")]
    pub max_words: usize,
    #[serde(default = "thousand")]
    pub shuffle_buffer: usize,
    #[serde(default)]
    pub mode: Mode,
    /// Seconds a `pipe:` shard may send nothing before it is given up on (skipped and
    /// counted as `pipe_failed`); 0 waits forever.
    #[serde(default = "stall_timeout_s")]
    pub stall_timeout_s: u64,
}

fn stall_timeout_s() -> u64 {
    vlp_data::source::DEFAULT_STALL.as_secs()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_lr: f64,
    pub warmup_steps: u64,
    pub weight_decay: f64,
    /// Global-norm clipping threshold; none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad_norm: Option<f64>,
    /// Micro-batches summed into one optimizer step.
    #[serde(default = "one")]
    pub accumulate: usize,
    /// Length of training in epochs (converted to steps with the loader's epoch size) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    /// ... or in optimizer steps; with both, the smaller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Alpha ramp length when `objectives.alpha_ramp_steps` is 0 and the epoch length is
    /// unknown.
    #[serde(default = "thousand_u64")]
    pub alpha_ramp_fallback_steps: u64,
}

/// What to do when a loss or a gradient is NaN or infinite.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    /// Stop with an error naming the step and the loss part; no checkpoint is written.
    #[default]
    Stop,
    /// Skip the update, count the batch's samples as skipped, go on.
    Skip,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    /// Mixed precision: bf16 activations and matmuls, f32 master weights, optimizer
    /// state, losses, softmax and LayerNorm statistics; checkpoints stay f32. Meant for
    /// GPUs (the CPU has no bf16 kernels of ours and runs it slowly, through candle).
    Bf16,
}

impl ComputeDtype {
    /// The dtype the model computes its activations in.
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// Run folder: metrics, checkpoints, the resolved recipe, eval results.
    pub out_dir: PathBuf,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "ten")]
    pub log_every: u64,
    /// Checkpoint every this many steps (0: only at the end).
    #[serde(default)]
    pub save_every: u64,
    #[serde(default = "two")]
    pub keep_last: usize,
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
    #[serde(default)]
    pub dtype: ComputeDtype,
    /// Where the model trains: `cpu`, `cuda` or `cuda:N` (`--device` overrides it).
    #[serde(default)]
    pub device: DeviceSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Zero-shot retrieval sets evaluated at the end of training.
    pub sets: Vec<EvalSet>,
    #[serde(default = "sixty_four")]
    pub batch_size: usize,
    /// Candidates per query re-scored by ITM (ALBEF: 256 COCO, 128 Flickr30K).
    #[serde(default = "one_twenty_eight")]
    pub k_test: usize,
    /// `itm+itc` (BLIP/LAVIS, default), `itm` (ALBEF), `itm+itc-logit` (the ITM logit
    /// plus `cos / temp`) or `itc` (no re-ranking).
    #[serde(default = "default_score")]
    pub score: String,
    /// The set evaluated after every epoch (fine-tuning): the checkpoint with the best
    /// mean recall (`r_mean`) so far is kept in `RUN_DIR/best`, and the final evaluation
    /// of every set uses it.
    #[serde(default)]
    pub validate: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSet {
    pub name: String,
    pub shards: String,
}

fn one() -> usize {
    1
}
fn one_twenty_eight() -> usize {
    128
}
fn default_score() -> String {
    vlp_eval::ScoreMode::default().to_string()
}
fn two() -> usize {
    2
}
fn thirty() -> usize {
    30
}
fn thousand() -> usize {
    1000
}
fn sixty_four() -> usize {
    64
}
fn thousand_u64() -> u64 {
    1000
}
fn ten() -> u64 {
    10
}

impl Recipe {
    /// Reads a recipe file, applies `overrides` (`key.path=value`) and validates it.
    /// Relative paths in the recipe stay as written (relative to the working directory).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| TrainError::io(path, e))?;
        Self::from_str_with(&text, overrides)
            .map_err(|e| TrainError::Recipe(format!("{}: {}", path.display(), strip(e))))
    }

    /// Parses recipe text and applies overrides; each override is checked on its own, so
    /// an error names the key that caused it.
    pub fn from_str_with(text: &str, overrides: &[String]) -> Result<Recipe> {
        let mut tree: toml::Table =
            toml::from_str(text).map_err(|e| TrainError::Recipe(e.to_string()))?;
        parse_tree(&tree)?;
        for item in overrides {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                TrainError::Recipe(format!("--set {item}: expected key.path=value"))
            })?;
            let key = key.trim();
            set_key(&mut tree, key, parse_value(value.trim()))
                .map_err(|e| TrainError::Recipe(format!("--set {key}: {e}")))?;
            parse_tree(&tree)
                .map_err(|e| TrainError::Recipe(format!("--set {key}: {}", strip(e))))?;
        }
        let recipe = parse_tree(&tree)?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Checks what serde cannot: exactly one of preset/config, positive sizes, a length,
    /// and the range of every number of `[optim]` and `[objectives]` (floats finite); an
    /// error names the key and the value.
    pub fn validate(&self) -> Result<()> {
        if let Some(eval) = &self.eval {
            if let Err(e) = eval.score.parse::<vlp_eval::ScoreMode>() {
                return Err(TrainError::Recipe(format!("eval.{e}")));
            }
            if eval.k_test == 0 {
                return Err(TrainError::Recipe("eval.k_test must be at least 1".into()));
            }
            if let Some(v) = &eval.validate {
                if !eval.sets.iter().any(|s| &s.name == v) {
                    return Err(TrainError::Recipe(format!(
                        "eval.validate = {v:?} names none of eval.sets ({})",
                        eval.sets
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
        let bad = |key: &str, why: &str| Err(TrainError::Recipe(format!("{key}: {why}")));
        match (&self.model.preset, &self.model.config, &self.model.init) {
            (Some(_), Some(_), _) => return bad("model", "give preset or config, not both"),
            (None, None, None) => return bad("model", "give preset, config or init"),
            _ => {}
        }
        if self.data.tokenizer.is_none() && self.model.init.is_none() {
            return bad(
                "data.tokenizer",
                "give the tokenizer (only a model.init checkpoint that keeps its own lets it \
                 be left out)",
            );
        }
        if self.data.batch_size == 0 {
            return bad("data.batch_size", "must be at least 1");
        }
        if self.data.world_size == Some(0) {
            return bad("data.world_size", "must be at least 1");
        }
        self.validate_optim()?;
        // The objectives' reasons start with the value (`objectives.alpha = 1.5: ...`).
        self.objectives.validate().map_err(|e| match e {
            TrainError::Config { field, reason } => {
                TrainError::Recipe(format!("objectives.{field} = {reason}"))
            }
            other => TrainError::Recipe(format!("objectives: {other}")),
        })?;
        Ok(())
    }

    /// Every number of `[optim]`, range-checked where the recipe is read: a value out of
    /// range otherwise trains (a negative `min_lr` or `weight_decay` climbs the loss) or
    /// fails steps later as a non-finite loss that names no key.
    fn validate_optim(&self) -> Result<()> {
        use crate::bounds::{refusal, Bound::*};
        let o = &self.optim;
        let lr = ("optim.lr", o.lr);
        // AdamW moves each weight by about `lr` per step whatever its gradient's scale
        // (the update is `lr * m / sqrt(v)`, near ±lr): above 1 every step moves every
        // weight by more than its typical magnitude, and the weights are lost.
        const MAX_LR: f64 = 1.0;
        // The warmup rises from `warmup_lr` to `lr` and the cosine falls from `lr` to
        // `min_lr`: both ends sit at or below the peak.
        let not_above_lr = [AtLeast(0.0), AtMostKey(lr.0, lr.1)];
        let floats = [
            (lr.0, lr.1, &[Above(0.0), AtMost(MAX_LR)][..]),
            ("optim.min_lr", o.min_lr, &not_above_lr),
            ("optim.warmup_lr", o.warmup_lr, &not_above_lr),
            // Decoupled decay scales each weight by `1 - lr * weight_decay` per step:
            // within [0, 1] (and `lr` within (0, 1]) it shrinks weights, never flips or
            // grows them.
            (
                "optim.weight_decay",
                o.weight_decay,
                &[AtLeast(0.0), AtMost(1.0)],
            ),
        ];
        // No clipping is the key left out; `inf` is refused as any non-finite value.
        let clip = o
            .clip_grad_norm
            .map(|c| ("optim.clip_grad_norm", c, &[Above(0.0)][..]));
        for (key, v, bounds) in floats.into_iter().chain(clip) {
            if let Some(why) = refusal(v, bounds) {
                return Err(TrainError::Recipe(format!("{key} = {why}")));
            }
        }
        // The integers: `warmup_steps` (longer than the run: the peak is never reached),
        // `total_steps` (0: evaluate the init only) and `alpha_ramp_fallback_steps` (0: no
        // ramp) mean something at every value.
        if o.accumulate == 0 {
            return Err(TrainError::Recipe(
                "optim.accumulate = 0: must be at least 1".into(),
            ));
        }
        if o.epochs == Some(0) {
            return Err(TrainError::Recipe(
                "optim.epochs = 0: must be at least 1 (optim.total_steps = 0 trains nothing)"
                    .into(),
            ));
        }
        if o.epochs.is_none() && o.total_steps.is_none() {
            return Err(TrainError::Recipe(
                "optim: give epochs or total_steps".into(),
            ));
        }
        Ok(())
    }

    /// The learning-rate schedule over `total_steps` optimizer steps.
    pub fn schedule(&self, total_steps: u64) -> Schedule {
        Schedule {
            lr: self.optim.lr,
            min_lr: self.optim.min_lr,
            warmup_lr: self.optim.warmup_lr,
            warmup_steps: self.optim.warmup_steps,
            total_steps,
        }
    }

    /// The architecture of the run's model: a resumed checkpoint's, else the init
    /// folder's, a config file's or a preset's; built at `data.image_size` when that
    /// differs (fine-tuning at 384 px a model pretrained at 256: the init's position
    /// embeddings are then interpolated, ALBEF's `interpolate_pos_embed`). The image size
    /// and the batch sizes are checked against what the model and memory allow. A resumed
    /// run keeps its checkpoint's architecture as it is.
    pub fn model_config(&self, resume_from: Option<&Path>) -> Result<AlbefConfig> {
        let config_file = |dir: &Path| dir.join(vlp_models::CONFIG_FILE);
        if let Some(dir) = resume_from {
            return Ok(AlbefConfig::load(&config_file(dir))?);
        }
        let m = &self.model;
        let mut cfg = match (&m.init, &m.config, &m.preset) {
            (Some(init), ..) => AlbefConfig::load(&config_file(init))?,
            (None, Some(path), _) => AlbefConfig::load(path)?,
            (None, None, Some(preset)) => AlbefConfig::preset(preset)?,
            (None, None, None) => unreachable!("Recipe::validate requires a model"),
        };
        if let Some(size) = self.data.image_size {
            // Trained weights run at most so far past their size; a model built fresh
            // has none, only the absolute cap.
            match &m.init {
                Some(_) => cfg
                    .vision
                    .check_image_size("data.image_size", size as usize)?,
                None => vlp_models::config::check_image_side("data.image_size", size as usize)?,
            }
            if size as usize != cfg.vision.image_size {
                tracing::info!(
                    "model built at {size} px (the architecture says {})",
                    cfg.vision.image_size
                );
                cfg.vision.image_size = size as usize;
                cfg.validate()?;
            }
        }
        cfg.vision
            .check_batch("data.batch_size", self.data.batch_size, true)?;
        if let Some(eval) = &self.eval {
            cfg.vision
                .check_batch("eval.batch_size", eval.batch_size, false)?;
        }
        Ok(cfg)
    }

    /// The loader options for training at `image_size` on process `rank`.
    pub fn loader_config(&self, image_size: u32, rank: usize) -> LoaderConfig {
        let d = &self.data;
        let size = d.image_size.unwrap_or(image_size);
        let image = match d.transform {
            TransformChoice::Pretrain => {
                ImageTransform::Train(TrainTransform::albef_pretrain(size))
            }
            TransformChoice::Finetune => {
                ImageTransform::Train(TrainTransform::albef_finetune(size))
            }
            TransformChoice::Light => ImageTransform::Train(TrainTransform {
                randaugment: None,
                ..TrainTransform::albef_finetune(size)
            }),
            TransformChoice::Eval => ImageTransform::Eval(EvalTransform { size }),
        };
        LoaderConfig {
            batch_size: d.batch_size,
            workers: d.workers,
            world_size: d.world_size.unwrap_or(1),
            rank,
            seed: self.run.seed,
            mode: d.mode,
            shuffle_buffer: d.shuffle_buffer,
            shuffle_initial: d.shuffle_buffer.min(100),
            max_tokens: d.max_tokens,
            max_words: d.max_words,
            image,
            stall_timeout_s: d.stall_timeout_s,
            ..LoaderConfig::default()
        }
    }

    /// The recipe as TOML (written to the run folder as `recipe.resolved.toml`).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| TrainError::Recipe(format!("serialising: {e}")))
    }
}

/// Drops the variant prefix of a nested recipe error.
pub(crate) fn strip(e: TrainError) -> String {
    match e {
        TrainError::Recipe(m) => m,
        other => other.to_string(),
    }
}

/// Deserialises through TOML text so errors carry the key and its line.
fn parse_tree(tree: &toml::Table) -> Result<Recipe> {
    let text = toml::to_string(tree).map_err(|e| TrainError::Recipe(e.to_string()))?;
    toml::from_str(&text).map_err(|e| TrainError::Recipe(e.to_string().trim_end().to_string()))
}

/// An override value is TOML (`1e-4`, `true`, `"x"`, `[1, 2]`); anything that does not
/// parse as TOML is taken as a bare string (`--set data.shards=a/{0..3}.tar`).
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {text}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// Sets `a.b.c` in the tree, creating missing tables on the way.
fn set_key(
    tree: &mut toml::Table,
    key: &str,
    value: toml::Value,
) -> std::result::Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err("empty segment in the key".into());
    }
    let mut table = tree;
    for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is a value, not a table", parts[..=i].join(".")))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[model]
preset = "tiny"

[data]
shards = "shards/x-{000000..000003}.tar"
tokenizer = "shards/tok.json"
batch_size = 8

[optim]
lr = 1e-4
min_lr = 1e-5
warmup_lr = 1e-5
warmup_steps = 10
weight_decay = 0.02
total_steps = 100

[run]
out_dir = "runs/x"
"#;

    #[test]
    fn the_model_config_bounds_image_size_and_batch_size() {
        let cfg = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            Recipe::from_str_with(BASE, &sets)?.model_config(None)
        };
        assert_eq!(
            cfg(&["data.image_size=128"]).unwrap().vision.image_size,
            128
        );
        // A model built fresh has no trained size: only the absolute cap.
        let e = cfg(&["data.image_size=4096"]).unwrap_err().to_string();
        assert!(
            e.contains("data.image_size = 4096: must be from 1 to 1536 px"),
            "{e}"
        );
        let e = cfg(&["data.batch_size=100000000"]).unwrap_err().to_string();
        assert!(
            e.contains("data.batch_size = 100000000: ") && e.contains("fit"),
            "{e}"
        );
    }

    #[test]
    fn parses_with_defaults() {
        let r = Recipe::from_str_with(BASE, &[]).unwrap();
        assert_eq!(r.data.workers, 2);
        assert_eq!(r.objectives.alpha, 0.4);
        assert_eq!(r.optim.alpha_ramp_fallback_steps, 1000);
        assert_eq!(r.optim.accumulate, 1);
        assert_eq!(r.run.on_nonfinite, OnNonFinite::Stop);
        assert!(r.eval.is_none());
    }

    #[test]
    fn overrides_are_typed_and_nested() {
        let r = Recipe::from_str_with(
            BASE,
            &[
                "optim.lr=3e-4".into(),
                "run.on_nonfinite=\"skip\"".into(),
                "data.shards=a/{0..3}.tar".into(),
                "objectives.mlm.enabled=false".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.optim.lr, 3e-4);
        assert_eq!(r.run.on_nonfinite, OnNonFinite::Skip);
        assert_eq!(r.data.shards, "a/{0..3}.tar");
        assert!(!r.objectives.mlm.enabled);
    }

    #[test]
    fn unknown_override_names_key_and_allowed_keys() {
        let e = Recipe::from_str_with(BASE, &["optim.lrr=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("optim.lrr"), "{e}");
        assert!(
            e.contains("lrr") && e.contains("min_lr") && e.contains("warmup_steps"),
            "{e}"
        );
        let e = Recipe::from_str_with(BASE, &["nope.x=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope") && e.contains("optim"), "{e}");
    }

    #[test]
    fn ill_typed_override_names_key() {
        let e = Recipe::from_str_with(BASE, &["data.batch_size=\"big\"".into()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.batch_size") && e.contains("invalid type"),
            "{e}"
        );
        let r = Recipe::from_str_with(BASE, &["run.dtype=bf16".into()]).unwrap();
        assert_eq!(r.run.dtype.dtype(), candle_core::DType::BF16);
        let e = Recipe::from_str_with(BASE, &["run.dtype=fp8".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("fp8") && e.contains("run"), "{e}");
    }

    #[test]
    fn unknown_key_in_file_is_an_error() {
        let text = BASE.replace("batch_size = 8", "batch_size = 8\nbatchsize = 3");
        let e = Recipe::from_str_with(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("batchsize"), "{e}");
    }

    #[test]
    fn the_tokenizer_may_be_left_out_only_with_a_model_init() {
        let text = BASE.replace("tokenizer = \"shards/tok.json\"\n", "");
        let e = Recipe::from_str_with(&text, &[]).unwrap_err().to_string();
        assert!(
            e.contains("data.tokenizer") && e.contains("model.init"),
            "{e}"
        );
        let r = Recipe::from_str_with(&text, &["model.init=\"runs/pre\"".into()]).unwrap();
        assert_eq!(r.data.tokenizer, None);
        assert!(!r.data.allow_other_tokenizer);
        let r = Recipe::from_str_with(BASE, &["data.allow_other_tokenizer=true".into()]).unwrap();
        assert!(r.data.allow_other_tokenizer);
        assert_eq!(
            Recipe::from_str_with(&r.to_toml().unwrap(), &[]).unwrap(),
            r
        );
    }

    #[test]
    fn eval_score_and_k_are_checked() {
        let text = format!("{BASE}\n[eval]\nsets = []\nscore = \"itm-itc\"\n");
        let e = Recipe::from_str_with(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("eval.score") && e.contains("itm+itc"), "{e}");
        for ok in ["itc", "itm", "itm+itc", "itm+itc-logit"] {
            let text = format!("{BASE}\n[eval]\nsets = []\nscore = \"{ok}\"\n");
            assert!(Recipe::from_str_with(&text, &[]).is_ok(), "{ok}");
        }
        let text = format!("{BASE}\n[eval]\nsets = []\nk_test = 0\n");
        let e = Recipe::from_str_with(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("eval.k_test"), "{e}");
    }

    /// Asserts that `BASE` with these overrides (each `key=value`) is refused with an
    /// error containing `says`.
    fn assert_refused(sets: &[&str], says: &str) {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        match Recipe::from_str_with(BASE, &sets) {
            Ok(_) => panic!("{sets:?} accepted"),
            Err(e) => assert!(e.to_string().contains(says), "{sets:?}: {e}"),
        }
    }

    fn assert_accepted(sets: &[&str]) {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Recipe::from_str_with(BASE, &sets).unwrap_or_else(|e| panic!("{sets:?}: {e}"));
    }

    #[test]
    fn negative_or_non_finite_optimiser_values_are_refused_naming_the_key() {
        for key in ["min_lr", "warmup_lr", "weight_decay"] {
            let set = format!("optim.{key}=-1");
            assert_refused(&[&set], &format!("optim.{key} = -1: must be >= 0"));
        }
        for key in [
            "lr",
            "min_lr",
            "warmup_lr",
            "weight_decay",
            "clip_grad_norm",
        ] {
            for (value, shown) in [("nan", "NaN"), ("inf", "inf"), ("-inf", "-inf")] {
                let set = format!("optim.{key}={value}");
                assert_refused(&[&set], &format!("optim.{key} = {shown}: must be finite"));
            }
        }
        // In the file as through --set.
        let text = BASE.replace("min_lr = 1e-5", "min_lr = nan");
        let e = Recipe::from_str_with(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("optim.min_lr = NaN: must be finite"), "{e}");
        for key in ["lr", "clip_grad_norm"] {
            let set = format!("optim.{key}=0");
            assert_refused(&[&set], &format!("optim.{key} = 0: must be > 0"));
        }
        // Zero is a floor that means something: warmup from 0, decay to 0, no decay.
        assert_accepted(&[
            "optim.min_lr=0",
            "optim.warmup_lr=0",
            "optim.weight_decay=0",
        ]);
    }

    #[test]
    fn absurd_learning_rates_and_decays_are_refused_up_front() {
        for lr in ["1e30", "2"] {
            let set = format!("optim.lr={lr}");
            assert_refused(&[&set], &format!("optim.lr = {lr}: must be <= 1"));
        }
        assert_refused(
            &["optim.min_lr=2e-4"],
            "optim.min_lr = 2e-4: must be <= optim.lr (1e-4)",
        );
        assert_refused(
            &["optim.warmup_lr=1e-3"],
            "optim.warmup_lr = 0.001: must be <= optim.lr",
        );
        assert_refused(
            &["optim.weight_decay=1.5"],
            "optim.weight_decay = 1.5: must be <= 1",
        );
        // The bounds themselves are allowed.
        assert_accepted(&["optim.lr=1.0", "optim.min_lr=1.0", "optim.weight_decay=1.0"]);
    }

    #[test]
    fn optimiser_counts_that_train_nothing_are_refused() {
        assert_refused(
            &["optim.accumulate=0"],
            "optim.accumulate = 0: must be at least 1",
        );
        assert_refused(&["optim.epochs=0"], "optim.epochs = 0: must be at least 1");
        let text = BASE.replace("total_steps = 100", "");
        let e = Recipe::from_str_with(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("give epochs or total_steps"), "{e}");
        // `total_steps = 0` is the zero-shot recipe: evaluate the init.
        assert_accepted(&["optim.total_steps=0"]);
    }

    #[test]
    fn non_finite_objective_values_are_refused_naming_the_key() {
        for key in [
            "alpha",
            "momentum",
            "contrastive.weight",
            "contrastive.margin",
            "itm.weight",
            "itm.hardness",
            "itm.batch_fraction",
            "mlm.weight",
            "mlm.probability",
            "distill.weight",
            "distill.temperature",
            "distill.teacher_temperature",
        ] {
            for (value, shown) in [("nan", "NaN"), ("inf", "inf")] {
                let set = format!("objectives.{key}={value}");
                let says = format!("objectives.{key} = {shown}: must be finite");
                assert_refused(&[&set], &says);
            }
        }
        assert_refused(
            &["objectives.alpha=1.5"],
            "objectives.alpha = 1.5: must be <= 1",
        );
        assert_refused(
            &["objectives.contrastive.margin=-0.2"],
            "objectives.contrastive.margin = -0.2: must be >= 0",
        );
    }

    #[test]
    fn resolved_recipe_round_trips() {
        let mut r = Recipe::from_str_with(BASE, &[]).unwrap();
        r.eval = Some(EvalSection {
            sets: vec![EvalSet {
                name: "a".into(),
                shards: "b.tar".into(),
            }],
            batch_size: 4,
            k_test: 16,
            score: "itm".into(),
            validate: Some("a".into()),
        });
        let text = r.to_toml().unwrap();
        assert_eq!(Recipe::from_str_with(&text, &[]).unwrap(), r);
    }
}
