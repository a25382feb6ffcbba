//! `vlp bench eval`: the retrieval evaluation timed phase by phase on a synthetic set
//! (random images, random captions of random lengths, random weights), the same workload
//! as the PyTorch evaluation peer (`torch_albef_eval.py`).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use vlp_core::device::{host, DeviceSpec};
use vlp_core::rng::Rng;
use vlp_eval::retrieval::evaluate;
use vlp_eval::{EvalConfig, ScoreMode};
use vlp_models::{AlbefConfig, AlbefModel};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Model preset.
    #[arg(long, default_value = "tiny", value_parser = clap::builder::PossibleValuesParser::new(vlp_models::config::PRESETS))]
    pub preset: String,
    /// Model config file instead of a preset (vlp's or the PyTorch peer's format).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1000)]
    pub images: usize,
    #[arg(long, default_value_t = 5)]
    pub captions_per_image: usize,
    /// Candidates re-scored per query.
    #[arg(long, default_value_t = 128)]
    pub k: usize,
    /// How re-ranked candidates are scored, as `eval retrieval --score` (`itm` is the
    /// PyTorch peer's).
    #[arg(long, default_value_t = ScoreMode::default())]
    pub score: ScoreMode,
    /// Caption lengths are uniform in [min-len, max-len] tokens ([CLS] and [SEP] included).
    #[arg(long, default_value_t = 8)]
    pub min_len: usize,
    #[arg(long, default_value_t = 32)]
    pub max_len: usize,
    #[arg(long, default_value_t = 64)]
    pub image_batch: usize,
    #[arg(long, default_value_t = 256)]
    pub text_batch: usize,
    #[arg(long, default_value_t = 128)]
    pub pair_batch: usize,
    #[arg(long, default_value_t = 4096)]
    pub state_budget_mb: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// No progress bars.
    #[arg(long)]
    pub no_progress: bool,
    /// Where the model runs: `cpu`, `cuda` (GPU 0) or `cuda:N` (needs a build with
    /// `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.images >= 1 && args.captions_per_image >= 1,
        "need images and captions"
    );
    anyhow::ensure!(args.k >= 1, "--k must be at least 1");
    anyhow::ensure!(
        3 <= args.min_len && args.min_len <= args.max_len,
        "need 3 <= --min-len <= --max-len"
    );
    let (cfg, model_name) = match &args.config {
        Some(path) => (
            vlp_models::import::load_config(path)?,
            path.display().to_string(),
        ),
        None => (AlbefConfig::preset(&args.preset)?, args.preset.clone()),
    };
    anyhow::ensure!(
        args.max_len <= cfg.text.max_positions,
        "--max-len {} exceeds the model's {} positions",
        args.max_len,
        cfg.text.max_positions
    );
    // The whole synthetic set's pixels are made at once, then passed in image batches.
    vlp_models::config::check_pixel_batch("--images", args.images, cfg.vision.image_size)?;
    cfg.vision
        .check_batch("--image-batch", args.image_batch, false)?;
    let device = args.device.resolve()?;
    // The synthetic set and the seeded weights are made on the host (the same numbers on
    // every device), then the weights are held on `device` as plain tensors: evaluation
    // records no graph.
    let dev = host();
    let varmap = VarMap::new();
    AlbefModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    vlp_train::pretrain::seeded_init(&varmap, args.seed)?;
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let model = AlbefModel::new(&cfg, VarBuilder::from_tensors(tensors, DType::F32, &device))?;

    let (n, m) = (args.images, args.images * args.captions_per_image);
    let s = cfg.vision.image_size;
    let mut rng = Rng::new(args.seed ^ 0xE7A1);
    // Standard normal pixels from the seeded generator (Box-Muller): the same set every run.
    let pixels: Vec<f32> = (0..n * 3 * s * s)
        .map(|_| {
            let (u, v) = (rng.uniform().max(f64::MIN_POSITIVE), rng.uniform());
            ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
        })
        .collect();
    let images = Tensor::from_vec(pixels, (n, 3, s, s), &dev)?;
    let t = &cfg.text;
    let first_regular = [t.pad_id, t.cls_id, t.sep_id, t.mask_id]
        .into_iter()
        .max()
        .unwrap_or(0)
        + 1;
    let (mut ids, mut mask) = (
        Vec::with_capacity(m * args.max_len),
        Vec::with_capacity(m * args.max_len),
    );
    for _ in 0..m {
        let len = args.min_len + rng.below((args.max_len - args.min_len + 1) as u64) as usize;
        for p in 0..args.max_len {
            ids.push(match p {
                0 => t.cls_id,
                _ if p == len - 1 => t.sep_id,
                _ if p < len => {
                    first_regular + rng.below(u64::from(t.vocab_size as u32 - first_regular)) as u32
                }
                _ => t.pad_id,
            });
            mask.push(u32::from(p < len));
        }
    }
    let ids = Tensor::from_vec(ids, (m, args.max_len), &dev)?;
    let mask = Tensor::from_vec(mask, (m, args.max_len), &dev)?;
    let text_image: Vec<usize> = (0..m).map(|t| t / args.captions_per_image).collect();

    let eval_cfg = EvalConfig {
        k_test: args.k,
        score: args.score,
        image_batch: args.image_batch,
        text_batch: args.text_batch,
        pair_batch: args.pair_batch,
        state_budget_mb: args.state_budget_mb,
        progress: !args.no_progress,
        device,
    };
    let batch = args.image_batch.max(1);
    let mut pass = |f: &mut dyn FnMut(&Tensor) -> vlp_eval::Result<()>| -> vlp_eval::Result<()> {
        for start in (0..n).step_by(batch) {
            f(&images.narrow(0, start, batch.min(n - start))?)?;
        }
        Ok(())
    };
    let t0 = std::time::Instant::now();
    let out = evaluate(
        &model,
        &mut pass,
        n,
        &ids,
        &mask,
        &text_image,
        &eval_cfg,
        &vlp_dist::SingleProcess,
    )?;
    let total = t0.elapsed().as_secs_f64();
    let rerank = out.phase("rerank");
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    let report = serde_json::json!({
        "model": model_name,
        "n_images": n,
        "n_texts": m,
        "k": args.k,
        "score": args.score.to_string(),
        "phase_s": out.phases.iter().map(|(k, v)| (k.clone(), serde_json::json!(round(*v)))).collect::<serde_json::Map<_, _>>(),
        "total_s": round(total),
        // As the peer counts: N k + M k fusion pairs, each direction on its own.
        "protocol_pairs": out.protocol_pairs,
        "protocol_pairs_per_s": if rerank > 0.0 { (out.protocol_pairs as f64 / rerank).round() } else { 0.0 },
        "fused_pairs": out.fused_pairs,
        "fused_pairs_per_s": if rerank > 0.0 { (out.fused_pairs as f64 / rerank).round() } else { 0.0 },
        "recall": out.main(),
        "device": args.device.to_string(),
        "image_states_kept": out.image_states_kept,
        "states_mb": round(out.states_mb),
        "peak_rss_mb": crate::cmd::bench::peak_rss_mb(),
    });
    stdoutln!("{report}");
    Ok(())
}
