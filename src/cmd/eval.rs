//! `vlp eval retrieval`: image-text retrieval of a checkpoint on a shard set, ALBEF's
//! protocol (ITC ranking, ITM re-ranking of the top k), with a JSON report and a
//! Markdown table.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use vlp_core::device::DeviceSpec;
use vlp_data::tokenize::TextTokenizer;
use vlp_eval::report::{json_report, markdown_table};
use vlp_eval::set::{evaluate_set, EvalSet};
use vlp_eval::{check_tokenizer, EvalConfig, ScoreMode};
use vlp_models::{load_model, AlbefConfig, AlbefModel, LoadMode};

#[derive(clap::Args)]
pub struct RetrievalArgs {
    /// A checkpoint folder (`model.safetensors` + `config.json`): a pretraining or
    /// fine-tuning checkpoint, or what `vlp convert` makes of ALBEF / HF BLIP-ITM files.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The evaluation shards (images with one or more captions, grouped by image id).
    #[arg(long)]
    pub shards: String,
    /// The tokenizer (`tokenizer.json`) the checkpoint was trained with.
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Candidates per query re-scored by ITM (ALBEF: 256 COCO, 128 Flickr30K).
    #[arg(long, default_value_t = 128)]
    pub k_test: usize,
    /// `itm+itc` (BLIP/LAVIS), `itm` (ALBEF), `itm+itc-logit` (the ITM logit plus the ITC
    /// logit cos / temp) or `itc` (no re-ranking).
    #[arg(long, default_value = "itm+itc")]
    pub score: ScoreMode,
    /// Tokens per caption, [CLS] and [SEP] included.
    #[arg(long, default_value_t = 40)]
    pub max_tokens: usize,
    /// Words kept per caption by the caption cleaning (ALBEF: 30).
    #[arg(long, default_value_t = 30)]
    pub max_words: usize,
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

/// Loads a checkpoint folder for inference onto `device`: its tensors as plain
/// (non-trainable) tensors. With `image_size` (`--image-size`), the model is built at that
/// size and the position embeddings are interpolated to its grid (on the host, as the file
/// is read). The size, and the image batch `(flag, images)` at it, are checked against
/// what the model and memory allow before any weight is read.
pub fn load_checkpoint(
    dir: &std::path::Path,
    image_size: Option<usize>,
    (batch_flag, batch): (&str, usize),
    device: &Device,
) -> anyhow::Result<(AlbefConfig, AlbefModel)> {
    let mut cfg = AlbefConfig::load(&dir.join(vlp_models::CONFIG_FILE))?;
    if let Some(size) = image_size {
        cfg.vision.check_image_size("--image-size", size)?;
        cfg.vision.image_size = size;
    }
    cfg.vision.check_batch(batch_flag, batch, false)?;
    let loaded = load_model(dir, image_size, device, LoadMode::Frozen)?;
    Ok((loaded.model.config().clone(), loaded.model))
}

pub fn run(args: RetrievalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.k_test >= 1, "--k-test must be at least 1");
    for (flag, path) in [("--out", &args.out), ("--markdown", &args.markdown)] {
        if let Some(path) = path {
            crate::cmd::output::check_output_file(flag, path, args.force)?;
        }
    }
    // Under `vlp launch` (torchrun, srun) the re-ranking is split over the processes.
    let joined = crate::cmd::world::join(args.device)?;
    let device = joined.device.clone();
    let (cfg, model) = load_checkpoint(
        &args.checkpoint,
        args.image_size,
        ("--image-batch", args.image_batch),
        &device,
    )?;
    let tokenizer = load_tokenizer(&args.tokenizer, args.max_tokens, &cfg)?;
    let set = EvalSet::open(&args.shards, cfg.vision.image_size as u32, args.max_words)?;
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
    let (outcome, texts) = evaluate_set(&model, &tokenizer, &set, &eval_cfg, &*joined.collective)?;
    if !joined.is_main() {
        return Ok(()); // rank 0 reports
    }
    let name = args.name.clone().unwrap_or_else(|| args.shards.clone());
    let table = markdown_table(&name, &outcome);
    eprint!("{table}");
    let mut report = json_report(&name, &outcome, &eval_cfg);
    report["checkpoint"] = serde_json::json!(args.checkpoint.display().to_string());
    report["skipped_samples"] = serde_json::json!(texts.skipped);
    report["device"] = serde_json::json!(joined.spec.to_string());
    report["processes"] = serde_json::json!(joined.world.world_size);
    report["peak_rss_mb"] = serde_json::json!(crate::cmd::bench::peak_rss_mb());
    // The report reaches stdout first: a file that cannot be written after all (a full
    // disk) never loses the finished result.
    println!("{report}");
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
        args.checkpoint.display(),
        outcome.non_finite_scores
    );
    Ok(())
}

/// Reads a tokenizer for a loaded model and checks that it fits the model's text config.
pub fn load_tokenizer(
    path: &std::path::Path,
    max_tokens: usize,
    cfg: &AlbefConfig,
) -> anyhow::Result<TextTokenizer> {
    // The tokenizer's own error names the file: no context to add.
    let tokenizer = TextTokenizer::from_file(path, max_tokens)?;
    check_tokenizer(&tokenizer, &cfg.text, path)?;
    Ok(tokenizer)
}
