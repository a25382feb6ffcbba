//! `vlp eval retrieval`: image-text retrieval of a checkpoint on a shard set, ALBEF's
//! protocol (ITC ranking, ITM re-ranking of the top k), with a JSON report and a
//! Markdown table.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use vlp_core::device::DeviceSpec;
use vlp_data::tokenize::TextTokenizer;
use vlp_eval::report::{json_report, markdown_table};
use vlp_eval::set::{evaluate_set, EvalSet};
use vlp_eval::tokenizer::{checkpoint_tokenizer, TOKENIZER_FILE};
use vlp_eval::{
    check_same_tokenizer, check_tokenizer, AllowOther, EvalConfig, ScoreMode, TextSettings,
};
use vlp_models::{load_model, AlbefConfig, AlbefModel, LoadMode};
use vlp_train::checkpoint::resolve_checkpoint;

#[derive(clap::Args)]
pub struct RetrievalArgs {
    /// A checkpoint folder (`model.safetensors` + `config.json`): a pretraining or
    /// fine-tuning checkpoint, or what `vlp convert` makes of ALBEF / HF BLIP-ITM files;
    /// or a training run folder (its `best/`, else its newest complete checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The evaluation shards (images with one or more captions, grouped by image id).
    #[arg(long)]
    pub shards: String,
    #[command(flatten)]
    pub text: TextArgs,
    /// Candidates per query re-scored by ITM (ALBEF: 256 COCO, 128 Flickr30K).
    #[arg(long, default_value_t = 128)]
    pub k_test: usize,
    /// `itm+itc` (BLIP/LAVIS), `itm` (ALBEF), `itm+itc-logit` (the ITM logit plus the ITC
    /// logit cos / temp) or `itc` (no re-ranking).
    #[arg(long, default_value_t = ScoreMode::default())]
    pub score: ScoreMode,
    #[arg(long, default_value_t = 64)]
    pub image_batch: usize,
    #[arg(long, default_value_t = 256)]
    pub text_batch: usize,
    /// (image, text) pairs per fusion pass.
    #[arg(long, default_value_t = 128)]
    pub pair_batch: usize,
    /// Token states kept in memory (MB); past it the image encoder runs again while
    /// re-ranking instead of holding every image's tokens.
    #[arg(long, default_value_t = 4096)]
    pub state_budget_mb: usize,
    /// Image side [default: the checkpoint's]; position embeddings are interpolated to it.
    #[arg(long)]
    pub image_size: Option<usize>,
    /// The set's name in the reports [default: the shard spec].
    #[arg(long)]
    pub name: Option<String>,
    /// Write the JSON report here (it is also printed as the last stdout line).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the Markdown table here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Replace existing --out / --markdown files (never files of a training run).
    #[arg(long)]
    pub force: bool,
    /// No progress bars.
    #[arg(long)]
    pub no_progress: bool,
    /// Where the model runs: `cpu`, `cuda` (GPU 0) or `cuda:N` (needs a build with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

/// How captions are read, for the commands that read them with a checkpoint: by default
/// as the checkpoint was trained (the tokenizer and settings it keeps), since other ones
/// score the same model differently.
#[derive(clap::Args)]
pub struct TextArgs {
    /// The tokenizer (`tokenizer.json`) [default: the one the checkpoint keeps, which it
    /// was trained with; a checkpoint that keeps none needs it given]. One whose content
    /// differs from the checkpoint's is refused without --allow-other-tokenizer.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Go on with a --tokenizer other than the one the checkpoint was trained with (the
    /// same token ids then stand for other words).
    #[arg(long)]
    pub allow_other_tokenizer: bool,
    /// Tokens per caption, [CLS] and [SEP] included [default: the checkpoint's, else 40].
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Words kept per caption by the caption cleaning [default: the checkpoint's, else 30].
    #[arg(long)]
    pub max_words: Option<usize>,
}

/// The caption settings of a checkpoint that keeps none (written before checkpoints kept
/// them, or converted without them).
const FALLBACK_TEXT: TextSettings = TextSettings {
    max_tokens: 40,
    max_words: 30,
};

impl TextArgs {
    /// The caption settings for the checkpoint `ckpt`: those given, else the checkpoint's,
    /// else [`FALLBACK_TEXT`].
    pub fn settings(&self, ckpt: &Checkpoint) -> anyhow::Result<TextSettings> {
        let kept = TextSettings::load(&ckpt.dir)?;
        if let Some(k) = kept {
            tracing::info!(
                "{} was trained with captions of {} tokens and {} words",
                ckpt.dir.display(),
                k.max_tokens,
                k.max_words
            );
        }
        let default = kept.unwrap_or(FALLBACK_TEXT);
        Ok(TextSettings {
            max_tokens: self.max_tokens.unwrap_or(default.max_tokens),
            max_words: self.max_words.unwrap_or(default.max_words),
        })
    }

    /// The tokenizer for the checkpoint `ckpt`, truncating to `max_tokens`: --tokenizer
    /// (refused when it is not the checkpoint's, unless --allow-other-tokenizer) or the
    /// checkpoint's own; checked to fit the model either way. Returns its path too.
    pub fn tokenizer(
        &self,
        ckpt: &Checkpoint,
        max_tokens: usize,
    ) -> anyhow::Result<(PathBuf, TextTokenizer)> {
        let path = match &self.tokenizer {
            Some(given) => {
                let allow = AllowOther {
                    allowed: self.allow_other_tokenizer,
                    switch: "pass --allow-other-tokenizer",
                };
                check_same_tokenizer(&ckpt.dir, given, allow)?;
                given.clone()
            }
            None => checkpoint_tokenizer(&ckpt.dir).with_context(|| {
                format!(
                    "{} keeps no {TOKENIZER_FILE} (written before checkpoints kept the \
                     tokenizer they were trained with): give --tokenizer",
                    ckpt.dir.display()
                )
            })?,
        };
        // The tokenizer's own error names the file: no context to add.
        let tokenizer = TextTokenizer::from_file(&path, max_tokens)?;
        check_tokenizer(&tokenizer, &ckpt.cfg.text, &path)?;
        Ok((path, tokenizer))
    }
}

/// A checkpoint loaded for inference: the folder it was read from (a run folder's
/// checkpoint, resolved), its config and its model.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub cfg: AlbefConfig,
    pub model: AlbefModel,
}

/// Loads a checkpoint folder, or a run folder's checkpoint
/// (`vlp_train::checkpoint::resolve_checkpoint`), for inference onto `device`: its
/// tensors as plain (non-trainable) tensors. With `image_size`, the model is built at
/// that size and the position embeddings are interpolated to its grid (on the host, as
/// the file is read). The size, and the image batch `(flag, images)` at it, are checked
/// against what the model and memory allow before any weight is read.
pub fn load_checkpoint(
    path: &Path,
    image_size: Option<usize>,
    (batch_flag, batch): (&str, usize),
    device: &Device,
) -> anyhow::Result<Checkpoint> {
    let dir = resolve_checkpoint(path)?;
    let mut cfg = AlbefConfig::load(&dir.join(vlp_models::CONFIG_FILE))?;
    if let Some(size) = image_size {
        cfg.vision.check_image_size("--image-size", size)?;
        cfg.vision.image_size = size;
    }
    cfg.vision.check_batch(batch_flag, batch, false)?;
    let loaded = load_model(&dir, image_size, device, LoadMode::Frozen)?;
    Ok(Checkpoint {
        dir,
        cfg: loaded.model.config().clone(),
        model: loaded.model,
    })
}

pub fn run(args: RetrievalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.k_test >= 1, "--k-test must be at least 1");
    if let (Some(a), Some(b)) = (&args.out, &args.markdown) {
        anyhow::ensure!(
            vlp_train::checkpoint::resolved(a) != vlp_train::checkpoint::resolved(b),
            "--out and --markdown name the same file {}: the table would replace the report",
            a.display()
        );
    }
    for (flag, path) in [("--out", &args.out), ("--markdown", &args.markdown)] {
        if let Some(path) = path {
            crate::cmd::output::check_output_file(flag, path, args.force)?;
        }
    }
    // Under `vlp launch` (torchrun, srun) the re-ranking is split over the processes.
    let joined = crate::cmd::world::join(args.device)?;
    let device = joined.device.clone();
    let ckpt = load_checkpoint(
        &args.checkpoint,
        args.image_size,
        ("--image-batch", args.image_batch),
        &device,
    )?;
    let text = args.text.settings(&ckpt)?;
    let (tokenizer_path, tokenizer) = args.text.tokenizer(&ckpt, text.max_tokens)?;
    let set = EvalSet::open(
        &args.shards,
        ckpt.cfg.vision.image_size as u32,
        text.max_words,
    )?;
    let eval_cfg = EvalConfig {
        k_test: args.k_test,
        score: args.score,
        image_batch: args.image_batch,
        text_batch: args.text_batch,
        pair_batch: args.pair_batch,
        state_budget_mb: args.state_budget_mb,
        progress: !args.no_progress && joined.is_main(),
        device,
    };
    let (outcome, texts) = evaluate_set(
        &ckpt.model,
        &tokenizer,
        &set,
        &eval_cfg,
        &*joined.collective,
    )?;
    if !joined.is_main() {
        return Ok(()); // rank 0 reports
    }
    let name = args.name.clone().unwrap_or_else(|| args.shards.clone());
    let table = markdown_table(&name, &outcome);
    stderr!("{table}");
    let mut report = json_report(&name, &outcome, &eval_cfg);
    report["checkpoint"] = serde_json::json!(ckpt.dir.display().to_string());
    report["tokenizer"] = serde_json::json!(tokenizer_path.display().to_string());
    report["max_tokens"] = serde_json::json!(text.max_tokens);
    report["max_words"] = serde_json::json!(text.max_words);
    report["skipped_samples"] = serde_json::json!(texts.skipped);
    report["device"] = serde_json::json!(joined.spec.to_string());
    report["processes"] = serde_json::json!(joined.world.world_size);
    report["peak_rss_mb"] = serde_json::json!(crate::cmd::bench::peak_rss_mb());
    // The report reaches stdout first: a file that cannot be written after all (a full
    // disk) never loses the finished result.
    stdoutln!("{report}");
    if let Some(path) = &args.out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {} (the report is on stdout)", path.display()))?;
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table)
            .with_context(|| format!("writing {} (the table is on stderr)", path.display()))?;
    }
    // Recalls computed from NaN or infinite scores mean nothing: the report above says
    // how many there were, and the exit status says the model is broken.
    anyhow::ensure!(
        outcome.non_finite_scores == 0,
        "{}: {} scores were NaN or infinite (the model is broken; they were ranked as \
         misses, see non_finite_scores in the report)",
        ckpt.dir.display(),
        outcome.non_finite_scores
    );
    Ok(())
}
