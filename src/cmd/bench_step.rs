//! `vlp bench step`: forward + backward throughput and memory of a model preset on random
//! images and token batches, through the shared model check loss
//! (`vlp_models::albef::smoke_loss`: ITC + ITM + MLM-shaped, not the training objective).

use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use vlp_core::device::DeviceSpec;
use vlp_dist::SingleProcess;
use vlp_models::{smoke_loss, AlbefConfig, AlbefModel};
use vlp_train::objectives::ObjectiveConfig;
use vlp_train::optim::{AdamW, AdamWConfig};
use vlp_train::recipe::ComputeDtype;
use vlp_train::step::StepBatch;
use vlp_train::train_step::{train_step, StepSettings};

#[derive(clap::Args)]
pub struct StepArgs {
    /// Model preset.
    #[arg(long, default_value = "tiny", value_parser = clap::builder::PossibleValuesParser::new(vlp_models::config::PRESETS))]
    pub preset: String,
    /// Model config file instead of a preset: vlp's `config.json`, or the PyTorch reference
    /// implementation's config format (so both programs can run one architecture).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Time the full pretraining step (ITC with momentum distillation, ITM with hard
    /// negatives, MLM with distillation, backward, AdamW lr 1e-4 wd 0.02) instead of the
    /// model-only forward + backward.
    #[arg(long)]
    pub full: bool,
    /// Time a recipe's own pretraining step: its model (preset, config or init folder's
    /// config), objectives and weights, batch size, caption length and weight decay, on
    /// random inputs. Implies `--full`; `--batch-size`/`--text-len` still override.
    #[arg(long, conflicts_with_all = ["preset", "config"])]
    pub recipe: Option<std::path::PathBuf>,
    /// Recipe overrides, `key=value` as for `vlp pretrain`.
    #[arg(long = "set", requires = "recipe")]
    pub set: Vec<String>,
    /// Batch size [default: 32, or the recipe's].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Tokens per caption, [CLS] and [SEP] included (rows are padded to it) [default: 30,
    /// or the recipe's `data.max_tokens`].
    #[arg(long)]
    pub text_len: Option<usize>,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps first (the allocator's high-water mark settles over the first few).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to run: `cpu`, `cuda` or `cuda:N` [default: the recipe's `run.device`, else cpu].
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Compute dtype, `f32` or `bf16` (mixed precision) [default: the recipe's `run.dtype`,
    /// else f32].
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<ComputeDtype>,
    /// Activation checkpointing of the online encoders [default: the recipe's
    /// `model.grad_checkpoint`, else off].
    #[arg(long)]
    pub grad_checkpoint: bool,
    /// Attention implementation: `fused` (vlp's kernels) or `generic` (candle ops; matmuls
    /// on cuBLAS).
    #[arg(long, default_value = "fused", value_parser = ["fused", "generic"])]
    pub attention: String,
}

fn parse_dtype(s: &str) -> Result<ComputeDtype, String> {
    match s {
        "f32" => Ok(ComputeDtype::F32),
        "bf16" => Ok(ComputeDtype::Bf16),
        other => Err(format!("`{other}`: expected f32 or bf16")),
    }
}

pub fn run(args: StepArgs) -> anyhow::Result<()> {
    let recipe = match &args.recipe {
        Some(path) => Some(vlp_train::recipe::Recipe::load(path, &args.set)?),
        None => None,
    };
    let (cfg, model_name) = match (&recipe, &args.config) {
        (Some(r), _) => {
            let cfg = r.model_config(None)?;
            let name = args
                .recipe
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            (cfg, name)
        }
        (None, Some(path)) => (
            vlp_models::import::load_config(path)?,
            path.display().to_string(),
        ),
        (None, None) => (AlbefConfig::preset(&args.preset)?, args.preset.clone()),
    };
    let full = args.full || recipe.is_some();
    let batch_size = args
        .batch_size
        .or(recipe.as_ref().map(|r| r.data.batch_size))
        .unwrap_or(32);
    let text_len = args
        .text_len
        .or(recipe.as_ref().map(|r| r.data.max_tokens))
        .unwrap_or(30);
    anyhow::ensure!(batch_size >= 2, "--batch-size must be at least 2");
    cfg.vision.check_batch("--batch-size", batch_size, true)?;
    anyhow::ensure!(text_len >= 3, "--text-len must be at least 3");
    anyhow::ensure!(args.steps >= 1, "--steps must be at least 1");
    let dev = args
        .device
        .or(recipe.as_ref().map(|r| r.run.device))
        .unwrap_or_default()
        .resolve()?;
    let varmap = VarMap::new();
    let dtype = args
        .dtype
        .or(recipe.as_ref().map(|r| r.run.dtype))
        .unwrap_or_default();
    let model = AlbefModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?
        .with_compute_dtype(dtype.dtype())
        .with_grad_checkpoint(
            args.grad_checkpoint || recipe.as_ref().is_some_and(|r| r.model.grad_checkpoint),
        )
        .with_attention(match args.attention.as_str() {
            "generic" => vlp_models::attention::AttentionBackend::Generic,
            _ => vlp_models::attention::AttentionBackend::Fused,
        });
    model.copy_params_to_momentum()?;
    let one: std::sync::Arc<dyn vlp_dist::Collective> = std::sync::Arc::new(SingleProcess);
    let params: usize = model
        .trainable_vars()?
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();

    let (b, s) = (batch_size, cfg.vision.image_size);
    let images = Tensor::randn(0f32, 1.0, (b, 3, s, s), &dev)?;
    let (ids, mask) = random_captions(&cfg, b, text_len, args.seed)?;
    let objectives = recipe
        .as_ref()
        .map_or_else(ObjectiveConfig::default, |r| r.objectives.clone());
    // Image-id positives need ids on the batches: every image its own.
    let image_ids = objectives
        .image_id_positives
        .then(|| (0..b as i64).collect());
    let batch = StepBatch::new(&images, &ids, &mask, image_ids, &dev)?;

    let mut trainable = model.trainable_vars()?;
    trainable.retain(|(name, _)| objectives.trains(name));
    let mut optim = AdamW::new(
        trainable,
        AdamWConfig {
            weight_decay: recipe.as_ref().map_or(0.02, |r| r.optim.weight_decay),
            ..AdamWConfig::default()
        },
    )?;
    let clip_grad_norm = recipe.as_ref().and_then(|r| r.optim.clip_grad_norm);
    let mut step_index = 0u64;
    // Per step: [forward (losses), backward, optimizer, total] in seconds.
    let mut step = || -> anyhow::Result<[f64; 4]> {
        let t0 = Instant::now();
        let (forward, backward);
        if full {
            // The training loop's own step (pretrain_losses, backward, AdamW, momentum
            // update, enqueue) on the same batch every time.
            step_index += 1;
            let settings = StepSettings {
                teacher: None,
                objectives: &objectives,
                accumulate: 1,
                clip_grad_norm,
                lr: 1e-4,
                alpha: objectives.alpha,
                seed: args.seed ^ step_index,
            };
            let report = train_step(&model, &mut optim, &one, &settings, &mut |_| {
                Ok(Some(batch.clone()))
            })?
            .expect("the batch source never ends");
            if let Some(what) = report.nonfinite {
                anyhow::bail!("non-finite {what} at step {step_index}");
            }
            [forward, backward] = [report.phase_secs[0], report.phase_secs[1]];
        } else {
            let loss = smoke_loss(
                &model,
                &batch.images,
                &batch.input_ids,
                &batch.attention_mask,
                true,
            )?;
            forward = t0.elapsed().as_secs_f64();
            drop(vlp_models::recompute::backward(&loss.total)?);
            backward = t0.elapsed().as_secs_f64() - forward;
        }
        // GPU work is queued: the step is over when the device is done.
        dev.synchronize()?;
        let total = t0.elapsed().as_secs_f64();
        Ok([forward, backward, total - forward - backward, total])
    };
    for _ in 0..args.warmup {
        step()?;
    }
    let rss_after_warmup = current_rss_mb();
    let phases = (0..args.steps)
        .map(|_| step())
        .collect::<anyhow::Result<Vec<[f64; 4]>>>()?;
    let rss_end = current_rss_mb();
    let median_of = |i: usize| {
        let mut v: Vec<f64> = phases.iter().map(|p| p[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut times: Vec<f64> = phases.iter().map(|p| p[3]).collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    stderrln!(
        "{model_name}: {params} trainable parameters, {} step min {:.3}s median {median:.3}s max {:.3}s",
        if full { "full pretraining" } else { "model-only" },
        times[0],
        times[times.len() - 1]
    );
    let out = serde_json::json!({
        "model": model_name,
        "device": format!("{:?}", dev.location()),
        "dtype": format!("{:?}", dtype.dtype()).to_lowercase(),
        "gpu_memory_in_use_gib": crate::cmd::bench_ops::gpu_memory_in_use_gib(&dev),
        "step": if full { "full" } else { "model-only" },
        "attention": args.attention,
        "batch_size": b,
        "text_len": text_len,
        "image_size": s,
        "steps": args.steps,
        "median_step_s": round3(median),
        "median_forward_s": round3(median_of(0)),
        "median_backward_s": round3(median_of(1)),
        "median_optimizer_s": round3(median_of(2)),
        "samples_per_s": round2(b as f64 / median),
        "peak_rss_mb": round2(crate::cmd::bench::peak_rss_mb()),
        "rss_after_warmup_mb": round2(rss_after_warmup),
        "rss_end_mb": round2(rss_end),
        "rss_growth_mb": round2(rss_end - rss_after_warmup),
        "trainable_params": params,
        // candle's CPU thread settings: its elementwise thread pool spin-waits, so a step
        // slows down several-fold when other processes compete for the cores;
        // CANDLE_NUM_THREADS=1 avoids the pool.
        "candle_num_threads": std::env::var("CANDLE_NUM_THREADS").ok(),
        "rayon_num_threads": std::env::var("RAYON_NUM_THREADS").ok(),
    });
    stdoutln!("{out}");
    Ok(())
}

/// `[CLS] random words [SEP] [PAD]..` rows of random lengths in `[len/2, len]`, and their
/// attention masks.
fn random_captions(
    cfg: &AlbefConfig,
    batch: usize,
    len: usize,
    seed: u64,
) -> anyhow::Result<(Tensor, Tensor)> {
    let t = &cfg.text;
    let mut rng = vlp_data::rng::Rng::new(seed);
    let mut next = move || rng.next_u64();
    let first_word = t.mask_id.max(t.sep_id).max(t.cls_id).max(t.pad_id) + 1;
    let words = t.vocab_size as u64 - u64::from(first_word);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for _ in 0..batch {
        let real = len / 2 + (next() % (len - len / 2 + 1) as u64) as usize;
        for p in 0..len {
            let id = match p {
                0 => t.cls_id,
                p if p + 1 == real => t.sep_id,
                p if p < real => first_word + (next() % words) as u32,
                _ => t.pad_id,
            };
            ids.push(id);
            mask.push(u32::from(p < real));
        }
    }
    let dev = vlp_core::device::host();
    Ok((
        Tensor::from_vec(ids, (batch, len), &dev)?,
        Tensor::from_vec(mask, (batch, len), &dev)?,
    ))
}

/// Resident set size of this process now (VmRSS), in MB.
fn current_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
