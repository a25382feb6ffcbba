//! `vlp shards synth`: write a deterministic synthetic dataset of coloured shapes with
//! compositional captions (for smoke tests and small training runs).

use std::path::PathBuf;

use anyhow::Context;
use vlp_data::synth::{self, SynthFormat};

/// Image format of synthetic samples.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SynthFormatArg {
    Png,
    Jpg,
}

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Output prefix: shards become PREFIX-000000.tar, ... and PREFIX-manifest.json.
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Samples per shard.
    #[arg(long, default_value_t = 250)]
    pub per_shard: usize,
    /// Side of the square images in pixels (16-1024).
    #[arg(long, default_value_t = 64)]
    pub image_size: u32,
    /// Seed: the same seed gives byte-identical shards.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image format.
    #[arg(long, value_enum, default_value = "png")]
    pub format: SynthFormatArg,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    if args.per_shard == 0 {
        anyhow::bail!("--per-shard must be at least 1");
    }
    if !(synth::MIN_SIZE..=synth::MAX_SIZE).contains(&args.image_size) {
        anyhow::bail!(
            "--image-size {} is not in {}..={}",
            args.image_size,
            synth::MIN_SIZE,
            synth::MAX_SIZE
        );
    }
    let format = match args.format {
        SynthFormatArg::Png => SynthFormat::Png,
        SynthFormatArg::Jpg => SynthFormat::Jpg,
    };
    let manifest = synth::write_synth(
        &args.out,
        args.count,
        args.per_shard,
        args.image_size,
        args.seed,
        format,
    )
    .with_context(|| format!("writing synthetic shards to {}", args.out.display()))?;
    let bytes: u64 = manifest.shards.iter().map(|s| s.bytes).sum();
    stdoutln!(
        "wrote {} synthetic samples (seed {}, {}x{}) in {} shards, {} bytes",
        manifest.samples,
        args.seed,
        args.image_size,
        args.image_size,
        manifest.shards.len(),
        bytes
    );
    stdoutln!(
        "manifest: {}",
        vlp_data::writer::manifest_path(&args.out).display()
    );
    Ok(())
}
