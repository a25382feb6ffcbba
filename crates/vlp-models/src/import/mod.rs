//! Importing published checkpoints into our model (ALBEF paper §3.1: the image encoder
//! starts from DeiT, the text encoder from BERT; and ALBEF's / BLIP's own releases).
//!
//! Formats ([`Format`]): HF `BertModel`/`BertForMaskedLM`, HF `ViTModel`, timm/DeiT ViTs,
//! the original ALBEF `.pth`, HF `BlipForImageTextRetrieval`. Our parameter names are
//! ALBEF's checkpoint names, so every format is a renaming (plus fusing q/k/v, dropping
//! tied aliases, interpolating position embeddings).
//!
//! The pipeline, one stage per module:
//! 1. [`read`]: the file's tensors under its own names (safetensors or zip `.pth`);
//! 2. [`names`]: per format, a pure function from a source name to ours;
//! 3. [`mod@plan`]: a pure function from the source's names and shapes and the target
//!    model's names and shapes to the actions and the [`ImportReport`];
//! 4. [`import_checkpoint`]: runs the plan into a freshly initialised model, or one
//!    converted before ([`ImportOptions::init`]), so whatever the checkpoint lacks is
//!    initialised as a new model would be (or kept), and the momentum twin is a copy of
//!    the online weights where the checkpoint has none;
//! 5. [`write_converted`]: `model.safetensors` (our names) + `config.json`.

pub mod bench_config;
pub mod hf_config;
pub mod names;
pub mod plan;
pub mod read;
pub mod report;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::config::{AlbefConfig, Layout, TextConfig, VisionConfig};
use crate::error::{ModelError, TensorProblem};
use crate::load::{CONFIG_FILE, MODEL_FILE};

pub use hf_config::HfArch;
pub use names::Format;
pub use plan::{plan, Action, Plan};
pub use report::{ConfigMismatch, Dropped, ImportReport, Mismatch, Unexpected};

/// Errors of an import; each names the file and, where there is one, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file could not be read as a checkpoint (truncated, not safetensors/zip, ...).
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },

    /// `--from auto` found no format that knows most of the names.
    #[error(
        "{path}: cannot tell the checkpoint format from its tensor names (e.g. {sample}); \
         name it with --from ({formats})"
    )]
    UnknownFormat {
        path: PathBuf,
        sample: String,
        formats: String,
    },

    /// The checkpoint does not fit the target model (missing, unexpected or mis-shaped
    /// tensors, or architecture settings that differ) and partial imports are not allowed.
    #[error("{path}: the checkpoint does not fit the target model ({summary}); allow a partial import to initialise the rest fresh\n{report}")]
    Rejected {
        path: PathBuf,
        summary: String,
        report: Box<ImportReport>,
    },

    /// A tied alias (e.g. `cls.predictions.decoder.weight`) differs from its tensor.
    #[error(
        "{path}: `{alias}` should equal `{ours}` (tied weights) but differs by up to {max_diff:e}"
    )]
    AliasDiffers {
        path: PathBuf,
        alias: String,
        ours: String,
        max_diff: f64,
    },

    /// The converted model would hold NaN or infinite values (from the checkpoint): each
    /// tensor is named, with its counts.
    #[error("{}: the converted model would hold non-finite values: {}", path.display(), crate::error::list_problems(tensors))]
    NonFinite {
        path: PathBuf,
        tensors: Vec<TensorProblem>,
    },

    /// A source tensor of integers where the model holds a float weight: converted, it
    /// would be a weight of whole numbers (a quantised or mislabelled checkpoint) that
    /// loads, trains and runs without a sign of what went wrong.
    #[error(
        "{path}: tensor `{name}` holds {dtype:?} integers where the model expects a float \
         weight (`{ours}`); a quantised checkpoint cannot be imported: convert it from the \
         float original"
    )]
    IntegerWeight {
        path: PathBuf,
        name: String,
        ours: String,
        dtype: DType,
    },

    /// The target config could not be resolved or read.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },

    /// A tensor operation on a named tensor failed.
    #[error("{path}: tensor `{name}`: {source}")]
    Tensor {
        path: PathBuf,
        name: String,
        #[source]
        source: Box<candle_core::Error>,
    },

    /// Building the target model or writing the result failed.
    #[error(transparent)]
    Model(Box<ModelError>),
}

impl From<ModelError> for ImportError {
    fn from(e: ModelError) -> Self {
        ImportError::Model(Box::new(e))
    }
}

impl ImportError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ImportError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// How to import.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The source format; `None` = guess from the tensor names.
    pub format: Option<Format>,
    /// Write the result even when tensors are missing, unexpected or mis-shaped (what the
    /// checkpoint cannot fill stays freshly initialised; the report lists it).
    pub allow_partial: bool,
    /// The HF `config.json` of an HF checkpoint; `None` = the `config.json` beside the
    /// checkpoint, when it is an HF config.
    pub hf_config: Option<PathBuf>,
    /// A converted model (a folder with `model.safetensors` + `config.json` in our format)
    /// to start from instead of a fresh one: what the checkpoint does not carry is kept
    /// from it. Two imports then make one model, e.g. DeiT for the image encoder and BERT
    /// for the text encoder, as ALBEF initialises its pretraining.
    pub init: Option<PathBuf>,
}

/// A converted model: our config, our tensors (every parameter and buffer of the model),
/// and what the import did.
#[derive(Debug)]
pub struct Imported {
    pub config: AlbefConfig,
    pub tensors: BTreeMap<String, Tensor>,
    pub report: ImportReport,
}

/// Every parameter and buffer of a freshly initialised model for `cfg` (as training
/// from scratch would start), under our names.
pub fn fresh_model(cfg: &AlbefConfig) -> Result<VarMap, ModelError> {
    let varmap = VarMap::new();
    // On the host: the converted tensors are written to a file from there.
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &vlp_core::device::host());
    crate::albef::AlbefModel::new(cfg, vb)?;
    Ok(varmap)
}

/// Our names and shapes, from a model built by [`fresh_model`].
pub fn target_shapes(varmap: &VarMap) -> BTreeMap<String, Vec<usize>> {
    let data = varmap.data().lock().expect("varmap lock");
    data.iter()
        .map(|(name, var)| (name.clone(), var.dims().to_vec()))
        .collect()
}

/// Reads an HF `config.json` (explicit, or beside the checkpoint when it is one).
fn hf_arch(
    path: &Path,
    format: Format,
    opts: &ImportOptions,
    notes: &mut Vec<String>,
) -> Result<Option<(PathBuf, HfArch)>, ImportError> {
    if matches!(format, Format::AlbefPth | Format::TimmVit) && opts.hf_config.is_none() {
        return Ok(None);
    }
    let (file, explicit) = match &opts.hf_config {
        Some(p) => (p.clone(), true),
        None => match path.parent().map(|d| d.join("config.json")) {
            Some(p) if p.is_file() => (p, false),
            _ => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&file).map_err(|e| ImportError::io(&file, e))?;
    let parsed = serde_json::from_str::<serde_json::Value>(&text)
        .map_err(|e| e.to_string())
        .and_then(|v| hf_config::parse(&v));
    match parsed {
        Ok(arch) => Ok(Some((file, arch))),
        Err(message) if explicit => Err(ImportError::Config {
            path: file,
            message: format!("not a usable Hugging Face config: {message}"),
        }),
        Err(message) => {
            notes.push(format!(
                "{} is not a Hugging Face config ({message}); not used",
                file.display()
            ));
            Ok(None)
        }
    }
}

/// The full model config of an HF BLIP checkpoint: its architecture on `base`'s training
/// settings (temperature, queue, dropout).
pub fn config_from_blip(arch: &HfArch, base: &AlbefConfig) -> Result<AlbefConfig, String> {
    let (Some(t), Some(v), Some(embed_dim)) = (&arch.text, &arch.vision, arch.embed_dim) else {
        return Err("the config lacks a text or vision part".into());
    };
    // BLIP's tokenizer is bert-base-uncased + [DEC] (30522) + [ENC] (30523).
    let enc_id = (t.vocab_size == 30524).then_some(30523);
    let cfg = AlbefConfig {
        vision: VisionConfig {
            image_size: v.image_size,
            patch_size: v.patch_size,
            hidden: v.hidden,
            layers: v.layers,
            heads: v.heads,
            mlp_ratio: v.intermediate as f64 / v.hidden.max(1) as f64,
            eps: v.eps,
            qkv_bias: v.qkv_bias,
        },
        text: TextConfig {
            vocab_size: t.vocab_size,
            hidden: t.hidden,
            layers: t.layers,
            heads: t.heads,
            intermediate: t.intermediate,
            max_positions: t.max_positions,
            eps: t.eps,
            dropout: base.text.dropout,
            type_vocab_size: 0,
            layout: Layout::Blip,
            has_mlm_head: false,
            pad_id: 0,
            cls_id: 101,
            sep_id: 102,
            mask_id: 103,
            enc_id,
        },
        embed_dim,
        ..base.clone()
    };
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

/// Compares what an HF config says with the target config, where tensor shapes cannot
/// tell: head counts, activation, position embedding type (mismatches), LayerNorm eps
/// (a note: the target's value is used).
pub fn check_config(arch: &HfArch, cfg: &AlbefConfig, report: &mut ImportReport) {
    let mut mismatch = |key: &str, checkpoint: String, target: String| {
        report.config_mismatches.push(ConfigMismatch {
            key: key.to_string(),
            checkpoint,
            target,
        })
    };
    if let Some(t) = &arch.text {
        if t.heads != cfg.text.heads {
            mismatch(
                "text.heads",
                t.heads.to_string(),
                cfg.text.heads.to_string(),
            );
        }
        if t.hidden_act != "gelu" {
            mismatch("text hidden_act", t.hidden_act.clone(), "gelu".into());
        }
        if t.position_embedding_type != "absolute" {
            mismatch(
                "text position_embedding_type",
                t.position_embedding_type.clone(),
                "absolute".into(),
            );
        }
        if t.eps != cfg.text.eps {
            report.notes.push(format!(
                "text LayerNorm eps: the checkpoint's config says {:e}, the target config {:e} (used)",
                t.eps, cfg.text.eps
            ));
        }
    }
    if let Some(v) = &arch.vision {
        if v.heads != cfg.vision.heads {
            mismatch(
                "vision.heads",
                v.heads.to_string(),
                cfg.vision.heads.to_string(),
            );
        }
        if v.hidden_act != "gelu" {
            mismatch("vision hidden_act", v.hidden_act.clone(), "gelu".into());
        }
        if v.eps != cfg.vision.eps {
            report.notes.push(format!(
                "vision LayerNorm eps: the checkpoint's config says {:e}, the target config {:e} (used)",
                v.eps, cfg.vision.eps
            ));
        }
    }
}

fn summary(report: &ImportReport) -> String {
    let mut parts = Vec::new();
    for (n, what) in [
        (report.missing.len(), "missing"),
        (report.unexpected.len(), "unexpected"),
        (report.mismatched.len(), "mis-shaped"),
        (report.config_mismatches.len(), "config mismatches"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    parts.join(", ")
}

/// Reads `path`, maps it onto the model of `config` (or, for an HF BLIP checkpoint with
/// no config given, the model its `config.json` describes, on `albef-base`'s training
/// settings), and returns every tensor of that model with the report.
///
/// Errors unless `opts.allow_partial` when anything is missing, unexpected or mis-shaped.
pub fn import_checkpoint(
    path: &Path,
    config: Option<&AlbefConfig>,
    opts: &ImportOptions,
) -> Result<Imported, ImportError> {
    let source = read::read_tensors(path)?;
    let names: Vec<&str> = source.iter().map(|(n, _)| n.as_str()).collect();
    let format = match opts.format {
        Some(f) => f,
        None => names::sniff(names.iter().copied()).ok_or_else(|| ImportError::UnknownFormat {
            path: path.to_owned(),
            sample: names.iter().take(3).copied().collect::<Vec<_>>().join(", "),
            formats: Format::ALL.map(Format::name).join(", "),
        })?,
    };
    let mut notes = Vec::new();
    let arch = hf_arch(path, format, opts, &mut notes)?;
    let config_error = |message: String| ImportError::Config {
        path: path.to_owned(),
        message,
    };
    let init_config = match &opts.init {
        Some(dir) => Some(load_config(&dir.join(CONFIG_FILE))?),
        None => None,
    };
    let cfg = match (config.or(init_config.as_ref()), &arch) {
        (Some(c), _) => c.clone(),
        (None, Some((file, a))) if format == Format::HfBlip => {
            let base = AlbefConfig::preset("albef-base")?;
            let cfg = config_from_blip(a, &base)
                .map_err(|m| config_error(format!("{}: {m}", file.display())))?;
            notes.push(format!(
                "model config derived from {} (BLIP layout, no MLM head; training settings of albef-base)",
                file.display()
            ));
            cfg
        }
        (None, _) => {
            return Err(config_error(format!(
            "a {format} checkpoint{} does not describe the whole model: give a preset or a config",
            if format == Format::HfBlip {
                " without its config.json"
            } else {
                ""
            }
        )))
        }
    };
    cfg.validate()?;
    if let (Some(dir), Some(init_cfg)) = (&opts.init, &init_config) {
        if init_cfg != &cfg {
            return Err(ImportError::Config {
                path: dir.join(CONFIG_FILE),
                message: "the initial model's config differs from the target config; \
                          leave out --preset/--config to use the initial model's"
                    .into(),
            });
        }
    }

    let varmap = fresh_model(&cfg)?;
    if let Some(dir) = &opts.init {
        crate::load::load_into_varmap(&varmap, &dir.join(MODEL_FILE), cfg.vision.grid())?;
    }
    let target = target_shapes(&varmap);
    let shapes: Vec<(String, Vec<usize>)> = source
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    let Plan {
        actions,
        alias_checks,
        mut report,
    } = plan::plan(format, &shapes, &target, cfg.text.text_layers());
    if let Some((file, a)) = &arch {
        check_config(a, &cfg, &mut report);
        report.notes.insert(
            0,
            format!("architecture checked against {}", file.display()),
        );
    }
    report.notes.extend(notes);
    let mut actions = actions;
    if let Some(dir) = &opts.init {
        // Kept from the initial model: what this checkpoint does not carry, including the
        // momentum twin of every part this checkpoint does not load.
        let loaded: std::collections::BTreeSet<String> = report.loaded.iter().cloned().collect();
        let mut kept = std::mem::take(&mut report.fresh);
        actions.retain(|ours, action| match action {
            Action::CopyOnline { online } if !loaded.contains(online) => {
                kept.push(ours.clone());
                false
            }
            _ => true,
        });
        report.momentum_copied.retain(|n| !kept.contains(n));
        kept.sort();
        report.kept = kept;
        report.notes.push(format!(
            "tensors this checkpoint does not carry are kept from {}",
            dir.display()
        ));
    }
    if !report.is_ok(opts.allow_partial) {
        return Err(ImportError::Rejected {
            path: path.to_owned(),
            summary: summary(&report),
            report: Box::new(report),
        });
    }

    let by_name: HashMap<&str, &Tensor> = source.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let vars = varmap.data().lock().expect("varmap lock").clone();
    check_integer_sources(path, &actions, &by_name, &vars)?;
    let tensor_err = |name: &str, source: candle_core::Error| ImportError::Tensor {
        path: path.to_owned(),
        name: name.to_string(),
        source: Box::new(source),
    };
    let mut converted: BTreeMap<String, usize> = BTreeMap::new();
    // Sources first, then the momentum copies of what they filled.
    let ordered = actions
        .iter()
        .filter(|(_, a)| !matches!(a, Action::CopyOnline { .. }))
        .chain(
            actions
                .iter()
                .filter(|(_, a)| matches!(a, Action::CopyOnline { .. })),
        );
    for (ours, action) in ordered {
        let var = &vars[ours];
        let value = match action {
            Action::Copy { source } => by_name[source.as_str()].clone(),
            Action::Concat { sources } => {
                let parts: Vec<&Tensor> = sources.iter().map(|s| by_name[s.as_str()]).collect();
                Tensor::cat(&parts, 0).map_err(|e| tensor_err(ours, e))?
            }
            Action::Interpolate { source, to, .. } => {
                let pos = by_name[source.as_str()]
                    .to_dtype(DType::F32)
                    .map_err(|e| tensor_err(ours, e))?;
                crate::vit::interpolate_pos_embed(&pos, *to)?
            }
            Action::CopyOnline { online } => vars[online]
                .as_tensor()
                .copy()
                .map_err(|e| tensor_err(ours, e))?,
        };
        let is_float = |d: DType| d.is_float();
        if value.dtype() != var.dtype() && is_float(value.dtype()) && is_float(var.dtype()) {
            *converted
                .entry(format!("{:?} to {:?}", value.dtype(), var.dtype()))
                .or_default() += 1;
        }
        let value = value
            .to_dtype(var.dtype())
            .and_then(|v| v.reshape(var.dims()))
            .map_err(|e| tensor_err(ours, e))?;
        var.set(&value).map_err(|e| tensor_err(ours, e))?;
    }
    for (conversion, n) in converted {
        report
            .notes
            .push(format!("{n} tensors converted from {conversion}"));
    }
    for check in alias_checks {
        let alias = by_name[check.source.as_str()];
        let ours = vars[&check.ours].as_tensor();
        let max_diff = alias
            .to_dtype(ours.dtype())
            .and_then(|a| a.sub(ours))
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_dtype(DType::F64))
            .and_then(|d| d.to_scalar::<f64>())
            .map_err(|e| tensor_err(&check.source, e))?;
        if max_diff != 0.0 {
            if !opts.allow_partial {
                return Err(ImportError::AliasDiffers {
                    path: path.to_owned(),
                    alias: check.source,
                    ours: check.ours,
                    max_diff,
                });
            }
            report.notes.push(format!(
                "{} differs from {} by up to {max_diff:e}; {} kept (the model ties them)",
                check.source, check.ours, check.ours
            ));
        }
    }
    let tensors: BTreeMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect();
    // A checkpoint that diverged converts without complaint otherwise and fails much
    // later, far from its cause.
    let non_finite: Vec<TensorProblem> = tensors
        .iter()
        .filter_map(|(name, t)| crate::load::non_finite(name, t))
        .collect();
    if !non_finite.is_empty() {
        return Err(ImportError::NonFinite {
            path: path.to_owned(),
            tensors: non_finite,
        });
    }
    Ok(Imported {
        config: cfg,
        tensors,
        report,
    })
}

/// Errors naming the first source tensor of integers (I64, I32, I16, U32, U8) that an
/// action would turn into a float weight. The model's own integer buffers (`queue_ptr`,
/// `idx_queue`, as ALBEF's checkpoints and ours hold them) take integers as they are.
fn check_integer_sources(
    path: &Path,
    actions: &BTreeMap<String, Action>,
    by_name: &HashMap<&str, &Tensor>,
    vars: &HashMap<String, candle_core::Var>,
) -> Result<(), ImportError> {
    for (ours, action) in actions {
        if !vars[ours].dtype().is_float() {
            continue;
        }
        let sources: Vec<&String> = match action {
            Action::Copy { source } | Action::Interpolate { source, .. } => vec![source],
            Action::Concat { sources } => sources.iter().collect(),
            Action::CopyOnline { .. } => Vec::new(),
        };
        for name in sources {
            let dtype = by_name[name.as_str()].dtype();
            if dtype.is_int() {
                return Err(ImportError::IntegerWeight {
                    path: path.to_owned(),
                    name: name.clone(),
                    ours: ours.clone(),
                    dtype,
                });
            }
        }
    }
    Ok(())
}

/// Reads a model config: ours (`config.json` of a converted model or a run), or the
/// format of the PyTorch reference implementation of the ALBEF step.
pub fn load_config(path: &Path) -> Result<AlbefConfig, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|e| ImportError::io(path, e))?;
    let config_error = |message: String| ImportError::Config {
        path: path.to_owned(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| config_error(format!("invalid JSON: {e}")))?;
    if bench_config::is_bench_config(&value) {
        return bench_config::config_from_bench(&value).map_err(config_error);
    }
    AlbefConfig::from_json(&text).map_err(|e| config_error(e.to_string()))
}

/// Writes `dir/model.safetensors` (our names) and `dir/config.json`, creating `dir`. The
/// weights are written to a temporary name first, so a failed write leaves no
/// half-written `model.safetensors`; they get the mode the umask gives, as the config does.
pub fn write_converted(dir: &Path, imported: &Imported) -> Result<(), ImportError> {
    std::fs::create_dir_all(dir).map_err(|e| ImportError::io(dir, e))?;
    let weights = dir.join(MODEL_FILE);
    let partial = dir.join(format!("{MODEL_FILE}.partial"));
    let map: HashMap<String, Tensor> = imported
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.clone()))
        .collect();
    let mode =
        vlp_core::fs::new_file_permissions(&partial).map_err(|e| ImportError::io(&partial, e))?;
    candle_core::safetensors::save(&map, &partial).map_err(|source| ImportError::Tensor {
        path: partial.clone(),
        name: "(all)".into(),
        source: Box::new(source),
    })?;
    std::fs::set_permissions(&partial, mode).map_err(|e| ImportError::io(&partial, e))?;
    std::fs::rename(&partial, &weights).map_err(|e| ImportError::io(&weights, e))?;
    imported.config.save(&dir.join(CONFIG_FILE))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn albef_config() -> AlbefConfig {
        load_config(&fixtures().join("albef/config.json")).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        a.to_dtype(DType::F64)
            .unwrap()
            .sub(&b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn albef_pth_and_safetensors_import_identically_and_completely() {
        let cfg = albef_config();
        let opts = ImportOptions {
            format: Some(Format::AlbefPth),
            ..Default::default()
        };
        let dir = fixtures().join("albef");
        let pth = import_checkpoint(&dir.join("albef.pth"), Some(&cfg), &opts).unwrap();
        let st = import_checkpoint(&dir.join("albef.safetensors"), Some(&cfg), &opts).unwrap();
        for r in [&pth.report, &st.report] {
            // Nothing missing, unexpected, mis-shaped or copied; the only tensor not from
            // the file is the image-id queue, which pretraining checkpoints do not have
            // (fine-tuning starts it empty).
            assert!(r.is_ok(false) && r.momentum_copied.is_empty(), "{r}");
            assert_eq!(r.fresh, vec!["idx_queue".to_string()], "{r}");
            assert!(r.notes.is_empty(), "{r}");
            // 268 tensors = ours + 4 tied aliases + 2 position_ids.
            assert_eq!(r.loaded.len() + r.dropped.len(), 268, "{r}");
            assert_eq!(r.dropped.len(), 6, "{r}");
        }
        assert_eq!(pth.tensors.len(), st.tensors.len());
        for (name, a) in &pth.tensors {
            let b = &st.tensors[name];
            assert_eq!(a.dims(), b.dims(), "{name}");
            assert_eq!(a.dtype(), b.dtype(), "{name}");
            assert_eq!(max_diff(a, b), 0.0, "{name}");
        }
        // Loaded values are the file's, bit for bit (queues are not re-normalised).
        let raw =
            candle_core::safetensors::load(dir.join("albef.safetensors"), &Device::Cpu).unwrap();
        for name in [
            "image_queue",
            "text_queue",
            "temp",
            "visual_encoder_m.pos_embed",
        ] {
            assert_eq!(max_diff(&pth.tensors[name], &raw[name]), 0.0, "{name}");
        }
        assert_eq!(pth.tensors["queue_ptr"].to_vec1::<i64>().unwrap(), vec![4]);
    }

    #[test]
    fn non_finite_source_tensors_fail_the_import_by_name() {
        let cfg = albef_config();
        let source = fixtures().join("albef/albef.safetensors");
        let mut raw = candle_core::safetensors::load(&source, &Device::Cpu).unwrap();
        let name = "visual_encoder.blocks.0.attn.qkv.weight";
        let t = &raw[name];
        let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[1] = f32::NAN;
        v[2] = f32::NEG_INFINITY;
        let bad = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
        raw.insert(name.to_string(), bad);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("diverged.safetensors");
        candle_core::safetensors::save(&raw, &path).unwrap();
        let opts = ImportOptions {
            format: Some(Format::AlbefPth),
            ..Default::default()
        };
        let err = import_checkpoint(&path, Some(&cfg), &opts).unwrap_err();
        assert!(matches!(err, ImportError::NonFinite { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("diverged.safetensors"), "{msg}");
        assert!(
            msg.contains(&format!("non-finite values in {name} (1 NaN, 1 Inf)")),
            "{msg}"
        );
    }

    #[test]
    fn integer_weights_are_refused_by_name_and_integer_buffers_load() {
        let cfg = albef_config();
        let source = fixtures().join("albef/albef.safetensors");
        let raw = candle_core::safetensors::load(&source, &Device::Cpu).unwrap();
        let opts = ImportOptions {
            format: Some(Format::AlbefPth),
            allow_partial: true,
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let name = "text_encoder.bert.embeddings.word_embeddings.weight";
        for dtype in [DType::I64, DType::I32, DType::U8] {
            let mut tensors = raw.clone();
            let ints = tensors[name].to_dtype(dtype).unwrap();
            tensors.insert(name.to_string(), ints);
            let path = dir.path().join(format!("{dtype:?}.safetensors"));
            candle_core::safetensors::save(&tensors, &path).unwrap();
            let err = import_checkpoint(&path, Some(&cfg), &opts).unwrap_err();
            assert!(matches!(err, ImportError::IntegerWeight { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("{dtype:?}.safetensors")), "{msg}");
            assert!(msg.contains(&format!("`{name}` holds {dtype:?}")), "{msg}");
        }
        // The checkpoint's own integer buffer (I64 in the file) is read as it is.
        assert_eq!(raw["queue_ptr"].dtype(), DType::I64);
        let imported = import_checkpoint(&source, Some(&cfg), &opts).unwrap();
        assert_eq!(imported.tensors["queue_ptr"].dtype(), DType::I64);
    }

    #[test]
    fn auto_detects_albef_and_rejects_a_wrong_config_by_name() {
        let mut cfg = albef_config();
        let path = fixtures().join("albef/albef.pth");
        let imported = import_checkpoint(&path, Some(&cfg), &ImportOptions::default()).unwrap();
        assert_eq!(imported.report.format, Format::AlbefPth);

        cfg.text.vocab_size = 310;
        let err = import_checkpoint(&path, Some(&cfg), &ImportOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImportError::Rejected { .. }), "{msg}");
        assert!(msg.contains("albef.pth"), "{msg}");
        assert!(
            msg.contains("text_encoder.bert.embeddings.word_embeddings.weight [300, 32]"),
            "{msg}"
        );
        // Allowed partial: the word embeddings stay fresh, the rest is loaded.
        let opts = ImportOptions {
            allow_partial: true,
            ..Default::default()
        };
        let imported = import_checkpoint(&path, Some(&cfg), &opts).unwrap();
        assert_eq!(imported.report.mismatched.len(), 4, "{}", imported.report);
    }

    #[test]
    fn interpolates_position_embeddings_for_a_larger_image() {
        let mut cfg = albef_config();
        cfg.vision.image_size = 48;
        let path = fixtures().join("albef/albef.safetensors");
        let imported = import_checkpoint(&path, Some(&cfg), &ImportOptions::default()).unwrap();
        let r = &imported.report;
        assert!(r.is_ok(false), "{r}");
        assert_eq!(r.notes.len(), 2, "{r}");
        assert_eq!(
            imported.tensors["visual_encoder.pos_embed"].dims(),
            &[1, 37, 32]
        );
    }
}
