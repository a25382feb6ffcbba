//! `vlp bench loader`: samples/s and peak RSS of the full training data pipeline (decode,
//! RandomResizedCrop, flip, normalise, tokenise, batch), next to the decode-only limit of
//! the same images on the same number of threads.

use std::ops::ControlFlow;
use std::time::Instant;

use vlp_data::fields::{parse_sample, FieldsConfig};
use vlp_data::image_ops::{decode_rgb, ImageTransform, Normalization, TrainTransform};
use vlp_data::loader::{Loader, LoaderConfig};
use vlp_data::shard::read_shard;
use vlp_data::spec::expand_spec;
use vlp_data::tokenize::TextTokenizer;

#[derive(clap::Args)]
pub struct LoaderArgs {
    /// Shard spec, e.g. 'bench/photo-{000000..000003}.tar'.
    pub spec: String,
    /// tokenizer.json used for the captions.
    #[arg(long)]
    pub tokenizer: std::path::PathBuf,
    /// Timed seconds of the pipeline (after the warm-up batches).
    #[arg(long, default_value_t = 20.0)]
    pub seconds: f64,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 256)]
    pub image_size: u32,
    /// Worker threads (also the decode-only thread count).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// RandomResizedCrop's lower scale bound (ALBEF pretraining: 0.2).
    #[arg(long, default_value_t = 0.5)]
    pub min_scale: f64,
    #[arg(long, default_value_t = 30)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 1000)]
    pub shuffle_buffer: usize,
    /// Seconds of the decode-only measurement (0 skips it).
    #[arg(long, default_value_t = 10.0)]
    pub decode_seconds: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: LoaderArgs) -> anyhow::Result<()> {
    let side = args.image_size as usize;
    vlp_models::config::check_image_side("--image-size", side)?;
    vlp_models::config::check_pixel_batch("--batch-size", args.batch_size, side)?;
    let tokenizer = TextTokenizer::from_file(&args.tokenizer, args.max_tokens)?;
    let cfg = LoaderConfig {
        batch_size: args.batch_size,
        workers: args.workers,
        seed: args.seed,
        shuffle_buffer: args.shuffle_buffer,
        image: ImageTransform::Train(TrainTransform {
            scale: (args.min_scale, 1.0),
            randaugment: None,
            ..TrainTransform::albef_finetune(args.image_size)
        }),
        normalization: Normalization::Clip,
        max_tokens: args.max_tokens,
        ..LoaderConfig::default()
    };
    let mut loader = Loader::new(&args.spec, cfg, tokenizer)?;
    let start = Instant::now();
    for _ in 0..args.warmup {
        loader.next_batch()?;
    }
    let warmup_s = start.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let (mut batches, mut samples) = (0u64, 0u64);
    let mut last_shape = Vec::new();
    while t0.elapsed().as_secs_f64() < args.seconds {
        let Some(batch) = loader.next_batch()? else {
            break;
        };
        batches += 1;
        samples += batch.len() as u64;
        last_shape = batch.images.dims().to_vec();
    }
    let seconds = t0.elapsed().as_secs_f64();
    drop(loader);
    let pipeline_rss = peak_rss_mb();
    stderrln!(
        "warm-up {} batch(es): {warmup_s:.2}s; last batch images {last_shape:?}",
        args.warmup
    );

    let decode = if args.decode_seconds > 0.0 {
        Some(decode_only(&args)?)
    } else {
        None
    };
    let out = serde_json::json!({
        "samples_per_s": round2(samples as f64 / seconds),
        "batches": batches,
        "samples": samples,
        "seconds": round2(seconds),
        "peak_rss_mb": round2(pipeline_rss),
        "decode_only_samples_per_s": decode.map(|(rate, _)| round2(rate)),
        "decode_only_images_in_memory": decode.map(|(_, n)| n),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
    });
    stdoutln!("{out}");
    Ok(())
}

/// Decodes images already in memory on `workers` threads, nothing else: the ceiling of
/// any pipeline that must decode each JPEG once.
fn decode_only(args: &LoaderArgs) -> anyhow::Result<(f64, usize)> {
    const MAX_IMAGES: usize = 2000;
    let mut images: Vec<Vec<u8>> = Vec::new();
    let fields = FieldsConfig::default();
    for url in expand_spec(&args.spec)? {
        read_shard(&url, 0, |raw| {
            if let Ok(s) = parse_sample(raw, &fields) {
                images.push(s.image_bytes);
            }
            if images.len() >= MAX_IMAGES {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        if images.len() >= MAX_IMAGES {
            break;
        }
    }
    anyhow::ensure!(!images.is_empty(), "no decodable sample in {}", args.spec);
    let images = std::sync::Arc::new(images);
    let deadline = args.decode_seconds;
    let t0 = Instant::now();
    let handles: Vec<_> = (0..args.workers)
        .map(|w| {
            let images = std::sync::Arc::clone(&images);
            std::thread::spawn(move || {
                let mut done = 0u64;
                let mut i = w;
                while t0.elapsed().as_secs_f64() < deadline {
                    if decode_rgb(&images[i % images.len()], u64::MAX).is_ok() {
                        done += 1;
                    }
                    i += 1;
                }
                done
            })
        })
        .collect();
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
    Ok((total as f64 / t0.elapsed().as_secs_f64(), images.len()))
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Peak resident set size of this process (VmHWM), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
