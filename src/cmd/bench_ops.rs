//! `vlp bench ops`: forward + backward time of the operations a training step spends its
//! non-matmul time in, at ALBEF-base shapes, and of a 12-layer ViT-B stack — the same
//! cases, shapes and JSON lines as the PyTorch operator peer (`torch_gpu_ops.py`), so the
//! two outputs line up row by row (`impl` is `vlp`).
//!
//! Each case times the forward, then the backward from the upstream gradient `G` (as the
//! peer's `out.backward(G)`: nothing else is computed, see [`GradSeed`]), with the device
//! synchronised around every iteration; the median of `--iters` runs after `--warmup`.
//! Attention is timed with vlp's fused kernel (`impl: vlp`) and with the generic
//! composition on cuBLAS matmuls and vlp's softmax (`impl: vlp-generic`).

use std::time::Instant;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use vlp_core::device::DeviceSpec;
use vlp_models::attention::{self, AttentionBackend};
use vlp_models::config::VisionConfig;
use vlp_models::nn;
use vlp_models::vit::VisionTransformer;

#[derive(clap::Args)]
pub struct OpsArgs {
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cuda")]
    pub device: DeviceSpec,
    /// One group only: attention, layernorm, gelu, softmax_ce or stack.
    #[arg(long, value_parser = ["attention", "layernorm", "gelu", "softmax_ce", "stack"])]
    pub only: Option<String>,
    /// bf16, f32 or both.
    #[arg(long, default_value = "both", value_parser = ["bf16", "f32", "both"])]
    pub dtype: String,
    /// Batch size of every case (the peer's is 64).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
}

/// Bytes the GPU has in use (all processes), or `None` off CUDA.
pub fn gpu_memory_in_use_gib(dev: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(_) = dev {
        let (free, total) =
            candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
        return Some(((total - free) as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0);
    }
    let _ = dev;
    None
}

fn emit(v: serde_json::Value) {
    stdoutln!("{v}");
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Median milliseconds of `f` (device synchronised before and after each call).
fn timed(
    dev: &Device,
    iters: usize,
    warmup: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = Instant::now();
        f()?;
        dev.synchronize()?;
        ts.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ts.sort_by(f64::total_cmp);
    Ok(ts[ts.len() / 2])
}

fn randn_var(dims: &[usize], dt: DType, dev: &Device) -> anyhow::Result<Var> {
    Ok(Var::from_tensor(
        &Tensor::randn(0f32, 1.0, dims, dev)?.to_dtype(dt)?,
    )?)
}

/// A 0-d zero whose backward hands its input the gradient `G`: `seed(out).backward()` is
/// PyTorch's `out.backward(G)`. (A loss such as `sum(out * G)` would add a product and a
/// reduction, and candle reduces a whole tensor in one thread block.)
struct GradSeed(Tensor);

impl CustomOp1 for GradSeed {
    fn name(&self) -> &'static str {
        "grad-seed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let zero = Tensor::zeros((), s.dtype(), &Device::Cpu)?;
        let (storage, _) = zero.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(c) => Ok((c.clone(), Shape::from(()))),
            _ => unreachable!("a CPU tensor"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        _l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendDevice;
        let zeros = s.device().zeros_impl(&Shape::from(()), s.dtype())?;
        Ok((zeros, Shape::from(())))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        _grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

fn backward_with(out: &Tensor, go: &Tensor) -> anyhow::Result<()> {
    drop(
        out.apply_op1_arc(std::sync::Arc::new(Box::new(GradSeed(go.clone()))))?
            .backward()?,
    );
    Ok(())
}

pub fn run(args: OpsArgs) -> anyhow::Result<()> {
    let dev = args.device.resolve()?;
    let dtypes: Vec<(&str, DType)> = match args.dtype.as_str() {
        "bf16" => vec![("bf16", DType::BF16)],
        "f32" => vec![("f32", DType::F32)],
        _ => vec![("bf16", DType::BF16), ("f32", DType::F32)],
    };
    let wants = |g: &str| args.only.as_deref().is_none_or(|o| o == g);
    let b = args.batch;
    // The largest case: the ViT-B/16 stack at 256 px, forward and backward.
    let stack = VisionConfig {
        image_size: 256,
        ..vlp_models::AlbefConfig::preset("albef-base")?.vision
    };
    stack.check_batch("--batch", b, true)?;
    let (it, wu) = (args.iters, args.warmup);
    emit(
        serde_json::json!({"device": format!("{:?}", dev.location()), "vlp": env!("CARGO_PKG_VERSION")}),
    );
    for &(name, dt) in &dtypes {
        if wants("attention") {
            for (lq, lk, masked) in [
                (257, 257, false),
                (577, 577, false),
                (30, 30, true),
                (30, 257, false),
                (30, 577, false),
            ] {
                let (h, d) = (12, 64);
                let q = randn_var(&[b, lq, h * d], dt, &dev)?;
                let k = randn_var(&[b, lk, h * d], dt, &dev)?;
                let v = randn_var(&[b, lk, h * d], dt, &dev)?;
                let go = Tensor::randn(0f32, 1.0, (b, lq, h * d), &dev)?.to_dtype(dt)?;
                // Each row keeps a fixed 8..L of its keys (the peer draws them at random).
                let lens: Vec<usize> = (0..b)
                    .map(|r| 8.min(lk) + (r * 7919) % (lk + 1 - 8.min(lk)))
                    .collect();
                let mask = if masked {
                    let keep: Vec<u32> = lens
                        .iter()
                        .flat_map(|&n| (0..lk).map(move |j| u32::from(j < n)))
                        .collect();
                    Some(attention::padding_mask(
                        &Tensor::from_vec(keep, (b, lk), &dev)?,
                        DType::F32,
                    )?)
                } else {
                    None
                };
                let kept: usize = if masked { lens.iter().sum() } else { lk * b };
                for (backend, name_impl) in [
                    (AttentionBackend::Fused, "vlp"),
                    (AttentionBackend::Generic, "vlp-generic"),
                ] {
                    let ms = timed(&dev, it, wu, || {
                        let o = attention::multi_head_attention(
                            q.as_tensor(),
                            k.as_tensor(),
                            v.as_tensor(),
                            h,
                            mask.as_ref(),
                            0.0,
                            backend,
                        )?;
                        backward_with(&o, &go)
                    })?;
                    let flops = 3.5 * 4.0 * (h * lq * kept * d) as f64;
                    emit(
                        serde_json::json!({"op": "attention", "impl": name_impl, "dtype": name, "b": b, "h": h,
                    "lq": lq, "lk": lk, "d": d, "masked": masked, "fwd_bwd_ms": round(ms, 4),
                    "tflops": round(flops / ms / 1e9, 1)}),
                    );
                }
            }
        }
        let rows = b * 257;
        if wants("layernorm") {
            let cols = 768;
            let x = randn_var(&[rows, cols], dt, &dev)?;
            let w = Var::from_tensor(&Tensor::ones(cols, dt, &dev)?)?;
            let bb = Var::from_tensor(&Tensor::zeros(cols, dt, &dev)?)?;
            let go = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?.to_dtype(dt)?;
            let ms = timed(&dev, it, wu, || {
                backward_with(
                    &nn::layer_norm(x.as_tensor(), w.as_tensor(), bb.as_tensor(), 1e-6)?,
                    &go,
                )
            })?;
            let bytes = (rows * cols * dt.size_in_bytes() * 5) as f64;
            emit(
                serde_json::json!({"op": "layernorm", "impl": "vlp", "dtype": name, "rows": rows,
                "cols": cols, "fwd_bwd_ms": round(ms, 4), "gbps": round(bytes / ms / 1e6, 1)}),
            );
        }
        if wants("gelu") {
            let cols = 3072;
            let x = randn_var(&[rows, cols], dt, &dev)?;
            let bb = Var::from_tensor(&Tensor::zeros(cols, dt, &dev)?)?;
            let go = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?.to_dtype(dt)?;
            let ms = timed(&dev, it, wu, || {
                backward_with(&nn::bias_gelu(x.as_tensor(), bb.as_tensor())?, &go)
            })?;
            let bytes = (rows * cols * dt.size_in_bytes() * 5) as f64;
            emit(
                serde_json::json!({"op": "bias_gelu", "impl": "vlp", "dtype": name, "rows": rows,
                "cols": cols, "fwd_bwd_ms": round(ms, 4), "gbps": round(bytes / ms / 1e6, 1)}),
            );
        }
        if wants("softmax_ce") {
            let (r, cols) = (b, 65_600);
            let x = randn_var(&[r, cols], dt, &dev)?;
            let t = nn::softmax(&Tensor::randn(0f32, 1.0, (r, cols), &dev)?)?.to_dtype(dt)?;
            let ms = timed(&dev, it, wu, || {
                // The fused op reads bf16 as is and computes in f32 (the peer casts the
                // logits to f32 first).
                let loss = nn::soft_cross_entropy(x.as_tensor(), &t)?.mean_all()?;
                drop(loss.backward()?);
                Ok(())
            })?;
            emit(
                serde_json::json!({"op": "softmax_ce", "impl": "vlp", "dtype": name, "rows": r,
                "cols": cols, "fwd_bwd_ms": round(ms, 4)}),
            );
        }
        if wants("stack") {
            // ViT-B/16 at 256 px: 257 tokens of 768, 12 heads, 12 pre-norm layers (the
            // patch embedding in front is included; the peer's stack starts after it).
            let varmap = VarMap::new();
            let vit =
                VisionTransformer::new(&stack, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?
                    .with_compute_dtype(dt);
            let images = Tensor::randn(0f32, 1.0, (b, 3, 256, 256), &dev)?;
            let ms = timed(&dev, (it / 2).max(5), 3, || {
                let y = vit.forward(&images, true)?;
                drop(y.to_dtype(DType::F32)?.sqr()?.mean_all()?.backward()?);
                Ok(())
            })?;
            let (l, d, nl) = (257f64, 768f64, 12f64);
            let flops = 3.0 * nl * (24.0 * b as f64 * l * d * d + 4.0 * b as f64 * l * l * d);
            emit(
                serde_json::json!({"op": "vit_b_stack", "impl": "vlp", "dtype": name, "b": b,
                "l": 257, "d": 768, "layers": 12, "fwd_bwd_ms": round(ms, 2),
                "tflops": round(flops / ms / 1e9, 1),
                "gpu_memory_in_use_gib": gpu_memory_in_use_gib(&dev)}),
            );
        }
    }
    Ok(())
}
