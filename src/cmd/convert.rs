//! `vlp convert`: a published checkpoint (HF BERT/ViT/BLIP, timm/DeiT, ALBEF `.pth`) to
//! our format, `model.safetensors` under our names + `config.json`, with a report of what
//! was loaded, dropped, interpolated, copied or initialised fresh.
//!
//! The output folder is checked first: a folder that already holds a model is replaced
//! only with `--force`, and a training run or one of its checkpoints never, because a
//! converted `model.safetensors` beside a run's `optim.safetensors` and `state.json`
//! would be resumed as if training had produced it.
//!
//! Check first, write last: the checkpoint, the target model and the tokenizer beside it
//! are read and checked before anything is written, and what is written goes into a
//! folder beside `--out` that is moved into place once complete, so a failure leaves
//! `--out` as it was.

use std::path::{Path, PathBuf};

use anyhow::Context;
use vlp_models::import::{
    import_checkpoint, load_config, write_converted, Format, ImportError, ImportOptions, Imported,
};
use vlp_models::AlbefConfig;
use vlp_train::checkpoint::{
    enclosing_run, resolve_checkpoint, CONFIG_FILE, MODEL_FILE, TEXT_FILE, TOKENIZER_FILE,
};

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
    if let Some(run) = enclosing_run(out) {
        anyhow::bail!(
            "--out {} is inside the training run or checkpoint {} (it {}): a converted \
             model there would be resumed as the run's own weights or swept away by its next \
             save; write it to a new folder outside the run (--force does not apply)",
            out.display(),
            run.dir.display(),
            run.why()
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
    let init = args.init.as_deref().map(resolve_checkpoint).transpose()?;
    // Read before anything is written: --init may be --out itself.
    let init_text = match &init {
        Some(dir) => text_side(dir)?,
        None => Vec::new(),
    };
    let opts = ImportOptions {
        format,
        allow_partial: args.allow_partial,
        hf_config: args.hf_config.clone(),
        init,
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
                stdoutln!("{}", serde_json::to_string(&report)?);
            } else {
                stdout!("{report}");
            }
            anyhow::bail!(
                "{}: the checkpoint does not fit the target model ({summary}); fix the \
                 config, or pass --allow-partial to initialise what does not fit fresh",
                path.display()
            );
        }
        Err(e) => return Err(e.into()),
    };
    let tokenizer = match imported.report.format {
        Format::HfBert | Format::HfBlip | Format::AlbefPth => {
            read_tokenizer(&args.input, &imported.config)?
        }
        // The text encoder is --init's, and so are its tokenizer and caption settings.
        Format::HfVit | Format::TimmVit if !init_text.is_empty() => Tokenizer {
            note: Some(format!(
                "kept the text side of --init: {}",
                init_text
                    .iter()
                    .map(|(f, _)| *f)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            files: init_text,
        },
        Format::HfVit | Format::TimmVit => Tokenizer::default(),
    };
    write_out(&args.out, &imported, &tokenizer.files)
        .with_context(|| format!("writing the converted model to {}", args.out.display()))?;
    if args.json {
        stdoutln!("{}", serde_json::to_string(&imported.report)?);
    } else {
        stdout!("{}", imported.report);
        stdoutln!(
            "wrote {} ({} tensors) and {}",
            args.out.join("model.safetensors").display(),
            imported.tensors.len(),
            args.out.join("config.json").display()
        );
    }
    if let Some(note) = tokenizer.note {
        stderrln!("{note}");
    }
    Ok(())
}

/// Writes the model, its config and the tokenizer files into a folder beside `out`
/// (`.NAME.partial`) and moves them into place only once all are written: the folder
/// itself when `out` does not exist, else file by file. Everything was checked before,
/// so what can fail here is the disk, and a failure leaves `out` as it was.
fn write_out(out: &Path, imported: &Imported, files: &[(&str, Vec<u8>)]) -> anyhow::Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned());
    let staging = parent.join(format!(".{}.partial", name.as_deref().unwrap_or("out")));
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    if staging.exists() {
        // What an interrupted conversion to the same folder left.
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing {}", staging.display()))?;
    }
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let written = stage_and_place(&staging, out, imported, files);
    if written.is_err() && staging.exists() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    written
}

fn stage_and_place(
    staging: &Path,
    out: &Path,
    imported: &Imported,
    files: &[(&str, Vec<u8>)],
) -> anyhow::Result<()> {
    write_converted(staging, imported)?;
    for (name, bytes) in files {
        let path = staging.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    if !out.exists() {
        return std::fs::rename(staging, out)
            .with_context(|| format!("moving {} to {}", staging.display(), out.display()));
    }
    // The text side of a model replaced with --force was that model's, and commands that
    // read captions with the folder's model default to it: it goes with the model unless
    // the new one brings its own.
    for file in [TOKENIZER_FILE, TEXT_FILE] {
        let (old, new) = (out.join(file), staging.join(file));
        if old.is_file() && !new.exists() {
            std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    for entry in std::fs::read_dir(staging)? {
        let from = entry?.path();
        let to = out.join(from.file_name().unwrap_or_default());
        std::fs::rename(&from, &to).with_context(|| format!("moving {}", to.display()))?;
    }
    std::fs::remove_dir(staging).with_context(|| format!("removing {}", staging.display()))
}

/// The files of a checkpoint folder's text side that `dir` holds, with their bytes
/// (`tokenizer.json`, `text.json`).
fn text_side(dir: &Path) -> anyhow::Result<Vec<(&'static str, Vec<u8>)>> {
    let mut found = Vec::new();
    for file in [TOKENIZER_FILE, TEXT_FILE] {
        let path = dir.join(file);
        if path.is_file() {
            found.push((file, read_bounded(&path)?));
        }
    }
    Ok(found)
}

/// Tokenizer files an HF checkpoint folder may hold, copied as they are.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Largest tokenizer file read. Real ones are well under 10 MB (bert-base-uncased's
/// `tokenizer.json` is about 466 kB, multilingual BERT's about 2 MB); the bound refuses a huge file
/// from its size, before it is read.
const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

/// The tokenizer files to write into OUT, read and checked, and what to tell the user.
#[derive(Default)]
struct Tokenizer {
    files: Vec<(&'static str, Vec<u8>)>,
    note: Option<String>,
}

/// Reads the tokenizer found beside `input` (its folder, or the folder above), for a
/// recipe to name `OUT/tokenizer.json`: `tokenizer.json` as it is, or one made from
/// `vocab.txt` (lower-casing as `tokenizer_config.json`'s `do_lower_case` says, default
/// on), with the other files as they are. A file that is too large or does not parse is
/// an error naming it; one that does not fit the model's vocabulary is a warning.
fn read_tokenizer(input: &Path, cfg: &AlbefConfig) -> anyhow::Result<Tokenizer> {
    let beside = input.parent().map(Path::to_path_buf).unwrap_or_default();
    let dirs = [
        beside.clone(),
        beside.parent().map(Path::to_path_buf).unwrap_or_default(),
    ];
    let Some(dir) = dirs
        .iter()
        .find(|d| d.join("tokenizer.json").is_file() || d.join("vocab.txt").is_file())
    else {
        return Ok(Tokenizer {
            files: Vec::new(),
            note: Some(format!(
                "no tokenizer.json or vocab.txt beside {}: give recipes the model's tokenizer \
                 (data.tokenizer)",
                input.display()
            )),
        });
    };
    let mut files = Vec::new();
    for name in TOKENIZER_FILES {
        let path = dir.join(name);
        if path.is_file() {
            files.push((name, read_bounded(&path)?));
        }
    }
    let content = |name: &str| files.iter().find(|f| f.0 == name).map(|f| f.1.as_slice());
    let mut copied: Vec<&str> = files.iter().map(|f| f.0).collect();
    let (tokenizer, source) = match content("tokenizer.json") {
        Some(json) => {
            let source = dir.join("tokenizer.json");
            let tokenizer = vlp_data::tokenize::TextTokenizer::from_json(
                json,
                source.display().to_string(),
                32,
            )?;
            (tokenizer, source)
        }
        None => {
            let lowercase = content("tokenizer_config.json")
                .and_then(|s| serde_json::from_slice::<serde_json::Value>(s).ok())
                .and_then(|v| v.get("do_lower_case").and_then(serde_json::Value::as_bool))
                .unwrap_or(true);
            let vocab = dir.join("vocab.txt");
            let made = vlp_data::tokenize::wordpiece_from_vocab(
                content("vocab.txt").unwrap_or_default(),
                &vocab,
                lowercase,
            )?;
            let json = made
                .to_string(true)
                .map_err(|e| anyhow::anyhow!("{}: {e}", vocab.display()))?;
            files.push(("tokenizer.json", json.into_bytes()));
            copied.push("tokenizer.json (made from vocab.txt)");
            let source = vocab.display().to_string();
            let tokenizer = vlp_data::tokenize::TextTokenizer::from_tokenizer(made, source, 32)?;
            (tokenizer, vocab)
        }
    };
    let fits = vlp_eval::check_tokenizer(&tokenizer, &cfg.text, &source);
    let mut note = format!(
        "copied the tokenizer from {}: {}",
        dir.display(),
        copied.join(", ")
    );
    if let Err(e) = fits {
        note.push_str(&format!("; warning: {e}"));
    }
    Ok(Tokenizer {
        files,
        note: Some(note),
    })
}

/// The bytes of `path`, refused when it holds more than [`MAX_TOKENIZER_BYTES`]: from its
/// size before reading, and while reading should it grow.
fn read_bounded(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let too_large = |size: u64| {
        anyhow::anyhow!(
            "{}: {size} bytes, more than a tokenizer file holds ({MAX_TOKENIZER_BYTES})",
            path.display()
        )
    };
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if size > MAX_TOKENIZER_BYTES {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_TOKENIZER_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() as u64 > MAX_TOKENIZER_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}
