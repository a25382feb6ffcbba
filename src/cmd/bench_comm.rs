//! `vlp bench allreduce`: the gradient all-reduce of a training step on its own — the
//! trainable parameters' shapes of a model, averaged over the processes in buckets by the
//! collective the run would use — timed per step (median), as algorithm bandwidth (bytes
//! of gradient / time) and NCCL's bus bandwidth (times 2(n-1)/n, what the links carry).
//! Run it under `vlp launch` (torchrun, srun) to measure several processes; alone, it
//! measures one (with `VLP_DIST_BACKEND=nccl`, NCCL's own path at world size 1).

use std::time::Instant;

use candle_core::{DType, Tensor};
use candle_nn::{VarBuilder, VarMap};
use vlp_core::device::DeviceSpec;
use vlp_models::AlbefModel;

#[derive(clap::Args)]
pub struct AllReduceArgs {
    /// Model preset whose gradients are reduced.
    #[arg(long, default_value = "albef-base", value_parser = clap::builder::PossibleValuesParser::new(vlp_models::config::PRESETS))]
    pub preset: String,
    /// `cpu`, `cuda` or `cuda:N` (each process's own GPU under a launch).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Gradient dtype, `f32` (vlp's gradients, also under bf16 compute) or `bf16`.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
}

pub fn run(args: AllReduceArgs) -> anyhow::Result<()> {
    let joined = crate::cmd::world::join(args.device)?;
    let dev = &joined.device;
    let cfg = vlp_models::AlbefConfig::preset(&args.preset)?;
    let varmap = VarMap::new();
    let model = AlbefModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, dev))?;
    let dtype = if args.dtype == "bf16" {
        DType::BF16
    } else {
        DType::F32
    };
    let grads: Vec<Tensor> = model
        .trainable_vars()?
        .iter()
        .map(|(_, v)| v.as_tensor().to_dtype(dtype))
        .collect::<candle_core::Result<_>>()?;
    drop(model);
    let elems: usize = grads.iter().map(Tensor::elem_count).sum();
    let bytes = (elems * dtype.size_in_bytes()) as f64;
    let collective = &*joined.collective;
    let mut times = Vec::new();
    for i in 0..args.warmup + args.iters.max(1) {
        let mut g = grads.clone();
        dev.synchronize()?;
        let t0 = Instant::now();
        collective.all_reduce_mean(&mut g)?;
        dev.synchronize()?;
        if i >= args.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let n = joined.world.world_size as f64;
    if joined.is_main() {
        let round = |x: f64, d: i32| (x * 10f64.powi(d)).round() / 10f64.powi(d);
        stdoutln!(
            "{}",
            serde_json::json!({
                "op": "all_reduce_mean",
                "model": args.preset,
                "tensors": grads.len(),
                "bytes": bytes as u64,
                "dtype": args.dtype,
                "processes": joined.world.world_size,
                "device": joined.spec.to_string(),
                "backend": std::env::var("VLP_DIST_BACKEND").unwrap_or_else(|_| "auto".into()),
                "median_ms": round(median * 1e3, 3),
                "algbw_gbps": round(bytes / median / 1e9, 2),
                "busbw_gbps": round(bytes / median / 1e9 * 2.0 * (n - 1.0) / n, 2),
            })
        );
    }
    Ok(())
}
