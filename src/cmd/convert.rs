//! `vlp convert`: a published checkpoint (HF BERT/ViT/BLIP, timm/DeiT, ALBEF `.pth`) to
//! our format, `model.safetensors` under our names + `config.json`, with a report of what
//! was loaded, dropped, interpolated, copied or initialised fresh.
//!
//! The output folder is checked first: a folder that already holds a model is replaced
//! only with `--force`, and a training run or one of its checkpoints never, because a
//! converted `model.safetensors` beside a run's `optim.safetensors` and `state.json`
//! would be resumed as if training had produced it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use vlp_models::import::{
    import_checkpoint, load_config, write_converted, Format, ImportError, ImportOptions,
};
use vlp_models::AlbefConfig;
use vlp_train::checkpoint::{enclosing_run, CONFIG_FILE, MODEL_FILE};

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// The checkpoint: a `.safetensors` file, or a PyTorch zip `.pth` (ALBEF, DeiT).
    pub input: PathBuf,
    /// Source format: hf-bert, hf-vit, timm-vit, albef-pth, hf-blip, or auto (guessed from
    /// the tensor names).
    #[arg(long = "from", default_value = "auto")]
    pub from: String,
    /// Target architecture by preset name.
    #[arg(long, conflicts_with = "config", value_parser = clap::builder::PossibleValuesParser::new(vlp_models::config::PRESETS))]
    pub preset: Option<String>,
    /// Target architecture from a config file: vlp's `config.json`, or the PyTorch
    /// reference implementation's config format. Without --preset or --config, the model
    /// of --init, or for an HF BLIP checkpoint the one its own config.json describes.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The HF config.json of an HF checkpoint, checked against the target (default: the
    /// config.json beside INPUT, if there is one).
    #[arg(long)]
    pub hf_config: Option<PathBuf>,
    /// Start from a model converted before (a folder with model.safetensors + config.json)
    /// instead of a fresh one: what INPUT does not carry is kept from it, e.g. a DeiT
    /// image encoder converted first, then BERT as the text encoder.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Output folder: model.safetensors + config.json. A folder that already holds a
    /// model is refused without --force; a training run or checkpoint always.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the model of an --out folder that already holds one (never a training
    /// run's checkpoint).
    #[arg(long)]
    pub force: bool,
    /// Write the model even if tensors are missing, unexpected or mis-shaped: what the
    /// checkpoint cannot fill stays freshly initialised (listed in the report).
    #[arg(long)]
    pub allow_partial: bool,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Image side of the target architecture, overriding the preset's or config's (e.g.
    /// 384 for ALBEF's retrieval fine-tuned checkpoints; position embeddings of another
    /// grid are interpolated). Needs --preset or --config.
    #[arg(long)]
    pub image_size: Option<usize>,
}

/// Whether `out` may receive a converted model: `Err` naming the folder and what it holds
/// when it is a training run or checkpoint (always), or already holds a model (unless
/// `force`).
fn check_out_dir(out: &Path, force: bool) -> anyhow::Result<()> {
    // Checked whether or not `out` exists yet: a new folder under a run's `checkpoints/`
    // would be swept away by the run's next save.
    if let Some((run, why)) = enclosing_run(out) {
        anyhow::bail!(
            "--out {} is inside the training run or checkpoint {} (it {why}): a converted \
             model there would be resumed as the run's own weights or swept away by its next \
             save; write it to a new folder outside the run (--force does not apply)",
            out.display(),
            run.display()
        );
    }
    if !out.exists() {
        return Ok(());
    }
    anyhow::ensure!(out.is_dir(), "--out {} is not a folder", out.display());
    let models: Vec<&str> = [MODEL_FILE, CONFIG_FILE]
        .into_iter()
        .filter(|f| out.join(f).exists())
        .collect();
    anyhow::ensure!(
        force || models.is_empty(),
        "--out {} already holds a model ({}); pass --force to replace it",
        out.display(),
        models.join(", ")
    );
    Ok(())
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    check_out_dir(&args.out, args.force)?;
    let format = match args.from.as_str() {
        "auto" => None,
        name => Some(
            name.parse::<Format>()
                .map_err(|e| anyhow::anyhow!("--from: {e}, or auto"))?,
        ),
    };
    let config: Option<AlbefConfig> = match (&args.preset, &args.config) {
        (Some(name), _) => Some(AlbefConfig::preset(name)?),
        (None, Some(path)) => Some(load_config(path)?),
        (None, None) => None,
    };
    let config = match (config, args.image_size) {
        (Some(mut cfg), Some(size)) => {
            cfg.vision.check_image_size("--image-size", size)?;
            cfg.vision.image_size = size;
            cfg.validate()?;
            Some(cfg)
        }
        (None, Some(_)) => anyhow::bail!("--image-size needs --preset or --config"),
        (cfg, None) => cfg,
    };
    let opts = ImportOptions {
        format,
        allow_partial: args.allow_partial,
        hf_config: args.hf_config.clone(),
        init: args.init.clone(),
    };
    let imported = match import_checkpoint(&args.input, config.as_ref(), &opts) {
        Ok(imported) => imported,
        Err(ImportError::Rejected {
            path,
            summary,
            report,
        }) => {
            // The report first (it can be long), then the error as the last line.
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{report}");
            }
            anyhow::bail!(
                "{}: the checkpoint does not fit the target model ({summary}); fix the \
                 config, or pass --allow-partial to initialise what does not fit fresh",
                path.display()
            );
        }
        Err(e) => return Err(e.into()),
    };
    write_converted(&args.out, &imported)
        .with_context(|| format!("writing the converted model to {}", args.out.display()))?;
    let tokenizer_note = match imported.report.format {
        Format::HfBert | Format::HfBlip | Format::AlbefPth => {
            copy_tokenizer(&args.input, &args.out, &imported.config)?
        }
        Format::HfVit | Format::TimmVit => None,
    };
    if args.json {
        println!("{}", serde_json::to_string(&imported.report)?);
    } else {
        print!("{}", imported.report);
        println!(
            "wrote {} ({} tensors) and {}",
            args.out.join("model.safetensors").display(),
            imported.tensors.len(),
            args.out.join("config.json").display()
        );
    }
    if let Some(note) = tokenizer_note {
        eprintln!("{note}");
    }
    Ok(())
}

/// Tokenizer files an HF checkpoint folder may hold, copied as they are.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Copies the tokenizer found beside `input` (its folder, or the folder above) into `out`,
/// so that a recipe can name `OUT/tokenizer.json`: `tokenizer.json` as it is, or one made
/// from `vocab.txt` (lower-casing as `tokenizer_config.json`'s `do_lower_case` says,
/// default on). Checked against the model's vocabulary. Returns what to tell the user.
fn copy_tokenizer(input: &Path, out: &Path, cfg: &AlbefConfig) -> anyhow::Result<Option<String>> {
    let beside = input.parent().map(Path::to_path_buf).unwrap_or_default();
    let dirs = [
        beside.clone(),
        beside.parent().map(Path::to_path_buf).unwrap_or_default(),
    ];
    let Some(dir) = dirs
        .iter()
        .find(|d| d.join("tokenizer.json").is_file() || d.join("vocab.txt").is_file())
    else {
        return Ok(Some(format!(
            "no tokenizer.json or vocab.txt beside {}: give recipes the model's tokenizer \
             (data.tokenizer)",
            input.display()
        )));
    };
    let mut copied = Vec::new();
    for name in TOKENIZER_FILES {
        let from = dir.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name))
                .with_context(|| format!("copying {} to {}", from.display(), out.display()))?;
            copied.push(name);
        }
    }
    let target = out.join("tokenizer.json");
    if !copied.contains(&"tokenizer.json") {
        let lowercase = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v.get("do_lower_case").and_then(serde_json::Value::as_bool))
            .unwrap_or(true);
        let tokenizer =
            vlp_data::tokenize::wordpiece_from_vocab(&dir.join("vocab.txt"), lowercase)?;
        tokenizer
            .save(&target, true)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", target.display()))?;
        copied.push("tokenizer.json (made from vocab.txt)");
    }
    let tokenizer = vlp_data::tokenize::TextTokenizer::from_file(&target, 32)?;
    let fits = vlp_eval::check_tokenizer(&tokenizer, &cfg.text, &target);
    let mut note = format!(
        "copied the tokenizer from {}: {}",
        dir.display(),
        copied.join(", ")
    );
    if let Err(e) = fits {
        note.push_str(&format!("; warning: {e}"));
    }
    Ok(Some(note))
}
