//! `vlp shards write`: turn a JSON annotation list, a folder of images with `.txt` captions,
//! or a CSV/TSV file into WebDataset tar shards plus a manifest.

use std::path::PathBuf;

use anyhow::Context;
use vlp_data::ingest::{self, EncodeOptions, IngestOptions, OutputFormat};
use vlp_data::rng::Rng;

/// Image format written to the shards.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum FormatArg {
    /// Keep each image's own format (JPEG, PNG or WebP) and, unless resized, its bytes.
    Keep,
    /// Re-encode to JPEG (alpha composited onto white).
    Jpg,
    /// Re-encode to PNG (alpha composited onto white).
    Png,
    /// With --json: ALBEF's/BLIP's annotation files as ALBEF reads them — images kept as
    /// they are, one sample per caption entry with its image id (as --per-caption), so a
    /// training epoch goes over every caption and evaluation groups captions by image.
    #[value(name = "albef-json")]
    AlbefJson,
}

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["json", "folder", "csv"])))]
pub struct WriteArgs {
    /// ALBEF/BLIP JSON annotation list: [{"image": ..., "caption": ... | [...], "image_id": ...}].
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Folder of images (jpg/jpeg/png/webp, recursive), each with a same-stem .txt caption file.
    #[arg(long, value_name = "DIR")]
    pub folder: Option<PathBuf>,
    /// CSV or TSV file with a header (open_clip style).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,
    /// Output prefix: shards become PREFIX-000000.tar, ... and PREFIX-manifest.json.
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
    /// Samples per shard.
    #[arg(long, default_value_t = 1000)]
    pub per_shard: usize,
    /// Directory relative image paths of --json/--csv are resolved against
    /// (default: the directory of that file).
    #[arg(long, value_name = "DIR")]
    pub image_root: Option<PathBuf>,
    /// Downscale so the longer side is at most PX pixels (Lanczos3, never upscales).
    #[arg(long, value_name = "PX")]
    pub resize_max: Option<u32>,
    /// Image format in the shards: `keep` stores the input bytes; `jpg`/`png` always
    /// re-encode as RGB (alpha composited onto white).
    #[arg(long, value_enum, default_value = "keep")]
    pub format: FormatArg,
    /// JPEG quality for re-encoded images (1-100).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub quality: u8,
    /// Skip (and count) entries whose image is missing, or images without a caption file.
    #[arg(long)]
    pub skip_missing: bool,
    /// Stop with an error at the first image that cannot be used (undecodable, not JPEG,
    /// PNG or WebP, over the pixel limit) instead of skipping it and counting it.
    #[arg(long)]
    pub strict: bool,
    /// One sample per caption instead of one per image (the image stored with each of
    /// its captions, the image id kept): what ALBEF's training annotation files mean, whose
    /// fine-tuning epochs go over every caption. For evaluation sets leave it off.
    #[arg(long)]
    pub per_caption: bool,
    /// Shuffle the records with this seed before writing (default: input order).
    #[arg(long, value_name = "S")]
    pub shuffle_seed: Option<u64>,
    /// CSV column holding the image path (default: filepath, else image).
    #[arg(long, value_name = "NAME")]
    pub image_col: Option<String>,
    /// CSV column holding the caption (default: title, else caption).
    #[arg(long, value_name = "NAME")]
    pub caption_col: Option<String>,
    /// CSV field separator, one character or `tab` (default: tab for .tsv, else comma).
    #[arg(long, value_name = "CHAR", value_parser = parse_sep)]
    pub sep: Option<char>,
    /// Threads reading and re-encoding images (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

fn parse_sep(s: &str) -> Result<char, String> {
    match s {
        "tab" | "\\t" | "\t" => Ok('\t'),
        _ => {
            let mut chars = s.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) if c != '"' && c != '\n' && c != '\r' => Ok(c),
                _ => Err(format!(
                    "`{s}` is not a single separator character (or `tab`)"
                )),
            }
        }
    }
}

pub fn run(args: WriteArgs) -> anyhow::Result<()> {
    if args.per_shard == 0 {
        anyhow::bail!("--per-shard must be at least 1");
    }
    if args.resize_max == Some(0) {
        anyhow::bail!("--resize-max must be at least 1");
    }
    let csv_only = args.image_col.is_some() || args.caption_col.is_some() || args.sep.is_some();
    if csv_only && args.csv.is_none() {
        anyhow::bail!("--image-col, --caption-col and --sep apply to --csv only");
    }
    if args.folder.is_some() && args.image_root.is_some() {
        anyhow::bail!("--image-root applies to --json and --csv; a folder's images are found beside their captions");
    }
    let opts = IngestOptions {
        image_root: args.image_root.clone(),
        skip_missing: args.skip_missing,
        image_col: args.image_col.clone(),
        caption_col: args.caption_col.clone(),
        sep: args.sep,
    };
    let (input, ingested) = if let Some(p) = &args.json {
        (p, ingest::read_json_list(p, &opts))
    } else if let Some(p) = &args.folder {
        (p, ingest::read_folder(p, &opts))
    } else if let Some(p) = &args.csv {
        (p, ingest::read_csv(p, &opts))
    } else {
        unreachable!("clap requires one input")
    };
    // Reading errors name the file (and entry or line) themselves.
    let mut ingested = ingested?;
    if ingested.records.is_empty() {
        anyhow::bail!(
            "{} holds no usable record ({} skipped); nothing to write",
            input.display(),
            ingested.skipped
        );
    }
    let captions: usize = ingested.records.iter().map(|r| r.captions.len()).sum();
    tracing::info!(
        records = ingested.records.len(),
        captions,
        skipped = ingested.skipped,
        "read {}",
        input.display()
    );
    if matches!(args.format, FormatArg::AlbefJson) && args.json.is_none() {
        anyhow::bail!(
            "--format albef-json reads an ALBEF/BLIP annotation file: give it with --json"
        );
    }
    if args.per_caption || matches!(args.format, FormatArg::AlbefJson) {
        ingested.records = ingest::one_record_per_caption(std::mem::take(&mut ingested.records));
    }
    if let Some(seed) = args.shuffle_seed {
        Rng::new(seed).shuffle(&mut ingested.records);
    }
    let encode = EncodeOptions {
        format: match args.format {
            FormatArg::Keep | FormatArg::AlbefJson => OutputFormat::Keep,
            FormatArg::Jpg => OutputFormat::Jpg,
            FormatArg::Png => OutputFormat::Png,
        },
        resize_max: args.resize_max,
        quality: args.quality,
        strict: args.strict,
    };
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let summary = ingest::write_records(
        &ingested.records,
        &args.out,
        args.per_shard,
        &encode,
        threads,
    )
    .with_context(|| format!("writing shards to {}", args.out.display()))?;
    if !summary.skipped.is_empty() {
        stdoutln!(
            "skipped {} images that cannot be used: {}",
            summary.skipped.samples(),
            summary.skipped
        );
        for s in &summary.skipped_images {
            stdoutln!(
                "  {} (record `{}`): {}: {}",
                s.image.display(),
                s.source,
                s.reason,
                s.detail
            );
        }
        if summary.skipped.samples() > summary.skipped_images.len() as u64 {
            stdoutln!(
                "  ... and {} more",
                summary.skipped.samples() - summary.skipped_images.len() as u64
            );
        }
    }
    if summary.manifest.samples == 0 {
        anyhow::bail!(
            "no image of {} could be used; the shards at {} are empty (see the skipped images above)",
            input.display(),
            args.out.display()
        );
    }
    let bytes: u64 = summary.manifest.shards.iter().map(|s| s.bytes).sum();
    // Every count is of what reached the shards, and `skipped` of everything that did not:
    // the entries left out while reading and the records whose image cannot be used.
    let unusable = summary.skipped.samples();
    let skipped = ingested.skipped + unusable;
    let why = if skipped > 0 {
        format!(
            " ({} missing, {unusable} that cannot be used)",
            ingested.skipped
        )
    } else {
        String::new()
    };
    stdoutln!(
        "wrote {} samples ({} captions) in {} shards, {} bytes; {} images re-encoded; skipped {skipped}{why}",
        summary.manifest.samples,
        summary.captions,
        summary.manifest.shards.len(),
        bytes,
        summary.reencoded,
    );
    if let (Some(first), Some(last)) = (
        summary.manifest.shards.first(),
        summary.manifest.shards.last(),
    ) {
        stdoutln!("shards: {} .. {}", first.file, last.file);
    }
    stdoutln!("manifest: {}", summary.manifest_path.display());
    Ok(())
}
