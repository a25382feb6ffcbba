//! The CUDA kernels against the CPU ops in f64, forward and backward, in f32 and bf16.
//! Built only with the `cuda` feature, and they need a GPU: on a CUDA build without one
//! they fail (the GPU check, `scripts/gpu-check.sh`, runs them).
//!
//! Each case builds the same inputs twice — f64 on the CPU (our fused CPU ops, checked
//! against finite differences elsewhere) and f32 or bf16 on CUDA — runs the op, takes
//! `sum(out * G)` for a fixed `G` and compares the output and every input's gradient:
//! the largest absolute difference over the largest reference magnitude must stay under
//! 2e-5 in f32 and 2e-2 in bf16 (8 mantissa bits, f32 accumulation inside).

use candle_core::{DType, Device, Result, Tensor, Var};
use vlp_core::rng::Rng;

use crate::attention::{self, AttentionBackend};
use crate::dispatch::{self, Kernel};
use crate::nn;

fn gpu() -> Device {
    vlp_core::device::DeviceSpec::Cuda(0)
        .resolve()
        .expect("the CUDA kernel tests need a GPU")
}

fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::BF16 => 2e-2,
        _ => 2e-5,
    }
}

/// Random values in [-r, r] of `dims`.
fn data(seed: u64, dims: &[usize], r: f64) -> (Vec<f64>, Vec<usize>) {
    let mut rng = Rng::new(seed);
    let n = dims.iter().product();
    (
        (0..n).map(|_| rng.uniform_range(-r, r)).collect(),
        dims.to_vec(),
    )
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    t.to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}

/// Relative error of `got` against `want`: max |diff| / max(1, max |want|).
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Runs `f` on the inputs as f64 CPU variables and as `dt` CUDA variables; compares
/// outputs and gradients. `grad_of` marks which inputs get a gradient.
fn compare(
    name: &str,
    dt: DType,
    inputs: &[(Vec<f64>, Vec<usize>, bool)],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<()> {
    // Values pass through `dt` first on both sides, so the reference starts from exactly
    // the inputs the kernels see and only the kernels' own rounding is measured.
    let run = |dev: &Device, dtype: DType| -> Result<(Vec<f64>, Vec<Option<Vec<f64>>>)> {
        let vars = inputs
            .iter()
            .map(|(v, dims, _)| {
                let t = Tensor::from_slice(v, dims.as_slice(), dev)?.to_dtype(dt)?;
                Var::from_tensor(&t.to_dtype(dtype)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts)?;
        let (g, _) = data(99, out.dims(), 1.0);
        let g = Tensor::from_slice(&g, out.dims(), dev)?
            .to_dtype(dt)?
            .to_dtype(out.dtype())?;
        let store = (out.clone() * g)?.sum_all()?.backward()?;
        let grads = vars
            .iter()
            .zip(inputs)
            .map(|(v, (_, _, wants))| {
                if *wants {
                    store.get(v.as_tensor()).map(host).transpose()
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((host(&out)?, grads))
    };
    let (want, want_g) = run(&Device::Cpu, DType::F64)?;
    let (got, got_g) = run(&gpu(), dt)?;
    let tol = tolerance(dt);
    let e = rel_err(&got, &want);
    eprintln!("{name} {dt:?}: forward {e:.2e}");
    assert!(e <= tol, "{name} {dt:?} forward: {e:.3e} > {tol:.0e}");
    for (i, (a, b)) in got_g.iter().zip(&want_g).enumerate() {
        match (a, b) {
            (Some(a), Some(b)) => {
                let e = rel_err(a, b);
                eprintln!("{name} {dt:?}: grad {i} {e:.2e}");
                assert!(e <= tol, "{name} {dt:?} grad {i}: {e:.3e} > {tol:.0e}");
            }
            (None, None) => {}
            _ => panic!("{name} {dt:?}: gradient {i} present on one side only"),
        }
    }
    Ok(())
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

/// A `[B, 1, 1, Lk]` additive padding mask: batch row r pads its last `r * 3` keys.
fn padding(b: usize, lk: usize, dev: &Device) -> Result<Tensor> {
    let keep: Vec<u32> = (0..b)
        .flat_map(|r| (0..lk).map(move |j| u32::from(j + r * 3 < lk || j == 0)))
        .collect();
    attention::padding_mask(&Tensor::from_vec(keep, (b, lk), dev)?, DType::F32)
}

#[test]
fn attention_kernels_take_the_albef_shapes() -> Result<()> {
    let dev = gpu();
    let q = Tensor::zeros((2, 35, 768), DType::BF16, &dev)?;
    let kv = Tensor::zeros((2, 577, 768), DType::BF16, &dev)?;
    let mask = padding(2, 577, &dev)?.to_device(&dev)?;
    let choice = dispatch::attention(AttentionBackend::Fused, &q, &kv, &kv, 12, Some(&mask), 0.1);
    assert_eq!(choice, Kernel::Cuda);
    Ok(())
}

/// Self-attention on a packed qkv (ViT and BERT layers), masked and not, with dropout.
#[test]
fn self_attention_packed_matches_the_cpu() -> Result<()> {
    // (batch, tokens, heads, head dim): ragged lengths, a ViT-ish 65 tokens, d 16/32/64.
    for &(b, l, heads, d) in &[(2, 37, 2, 64), (1, 65, 3, 32), (3, 5, 1, 16)] {
        for dt in DTYPES {
            for (masked, p) in [(false, 0.0), (true, 0.0), (true, 0.1)] {
                let c = heads * d;
                let inputs = vec![{
                    let (v, dims) = data(b as u64 + l as u64, &[b, l, 3 * c], 1.0);
                    (v, dims, true)
                }];
                compare(
                    &format!("self b{b} l{l} h{heads} d{d} mask {masked} p {p}"),
                    dt,
                    &inputs,
                    |t| {
                        let mask = if masked {
                            Some(padding(b, l, t[0].device())?.to_dtype(DType::F32)?)
                        } else {
                            None
                        };
                        let _seed = nn::seed_dropout(7);
                        attention::self_attention_packed(
                            &t[0],
                            heads,
                            mask.as_ref(),
                            p,
                            AttentionBackend::Fused,
                        )
                    },
                )?;
            }
        }
    }
    Ok(())
}

/// Cross-attention of text over image tokens (ALBEF's fusion layers: 30-40 text tokens
/// against 257 or 577 image tokens) on a packed kv, and the three-input op.
#[test]
fn cross_attention_matches_the_cpu() -> Result<()> {
    for &(b, lq, lk, heads, d) in &[(2, 35, 257, 2, 64), (1, 30, 577, 2, 32), (2, 1, 3, 1, 16)] {
        for dt in DTYPES {
            let c = heads * d;
            let inputs = vec![
                {
                    let (v, dims) = data(1, &[b, lq, c], 1.0);
                    (v, dims, true)
                },
                {
                    let (v, dims) = data(2, &[b, lk, 2 * c], 1.0);
                    (v, dims, true)
                },
            ];
            compare(
                &format!("cross b{b} lq{lq} lk{lk} d{d}"),
                dt,
                &inputs,
                |t| {
                    let _seed = nn::seed_dropout(11);
                    attention::cross_attention_packed(
                        &t[0],
                        &t[1],
                        heads,
                        None,
                        0.1,
                        AttentionBackend::Fused,
                    )
                },
            )?;
            let inputs3: Vec<_> = [(3, lq), (4, lk), (5, lk)]
                .iter()
                .map(|&(seed, l)| {
                    let (v, dims) = data(seed, &[b, l, c], 1.0);
                    (v, dims, true)
                })
                .collect();
            compare(
                &format!("q,k,v b{b} lq{lq} lk{lk} d{d}"),
                dt,
                &inputs3,
                |t| {
                    let mask = padding(b, lk, t[0].device())?;
                    attention::multi_head_attention(
                        &t[0],
                        &t[1],
                        &t[2],
                        heads,
                        Some(&mask),
                        0.0,
                        AttentionBackend::Fused,
                    )
                },
            )?;
        }
    }
    Ok(())
}

#[test]
fn row_kernels_match_the_cpu() -> Result<()> {
    // Odd widths and row counts: 1 row, widths below and above one block of threads.
    for &(rows, n) in &[(1usize, 7usize), (67, 768), (5, 3072), (3, 30522)] {
        for dt in DTYPES {
            let x = || {
                let (v, d) = data(rows as u64 * 7 + n as u64, &[rows, n], 2.0);
                (v, d, true)
            };
            let row = |seed| {
                let (v, d) = data(seed, &[n], 1.0);
                (v, d, true)
            };
            compare(
                &format!("layer_norm {rows}x{n}"),
                dt,
                &[x(), row(1), row(2)],
                |t| nn::layer_norm(&t[0], &(&t[1] + 1.0)?, &t[2], 1e-6),
            )?;
            compare(&format!("bias_gelu {rows}x{n}"), dt, &[x(), row(3)], |t| {
                nn::bias_gelu(&t[0], &t[1])
            })?;
            compare(
                &format!("add_broadcast {rows}x{n}"),
                dt,
                &[x(), row(4)],
                |t| nn::add_broadcast(&t[0], &t[1]),
            )?;
            compare(&format!("softmax {rows}x{n}"), dt, &[x()], |t| {
                nn::softmax(&(&t[0] * 4.0)?)
            })?;
            compare(&format!("log_softmax {rows}x{n}"), dt, &[x()], |t| {
                nn::log_softmax(&(&t[0] * 4.0)?)
            })?;
            let targets = || {
                // Probabilities per row, as the objectives' soft targets are.
                let (v, d) = data(rows as u64 + 11, &[rows, n], 3.0);
                let mut p = v.iter().map(|x| x.exp()).collect::<Vec<_>>();
                for row in p.chunks_mut(n) {
                    let s: f64 = row.iter().sum();
                    row.iter_mut().for_each(|x| *x /= s);
                }
                (p, d, false)
            };
            compare(
                &format!("soft_cross_entropy {rows}x{n}"),
                dt,
                &[x(), targets()],
                |t| nn::soft_cross_entropy(&(&t[0] * 4.0)?, &t[1]),
            )?;
            compare(&format!("dropout {rows}x{n}"), dt, &[x()], |t| {
                let _seed = nn::seed_dropout(5);
                nn::dropout(&t[0], 0.25)
            })?;
            let dev = gpu();
            let probe = Tensor::zeros((rows, n), dt, &dev)?;
            assert_eq!(dispatch::softmax(&probe), Kernel::Cuda);
        }
    }
    Ok(())
}

/// EMA and AdamW update in place, as their CPU versions do.
#[test]
fn in_place_updates_match_the_cpu() -> Result<()> {
    let dev = gpu();
    let n = 100_003;
    let (t, _) = data(1, &[n], 1.0);
    let (s, _) = data(2, &[n], 1.0);
    let f32s = |v: &[f64], dev: &Device| Tensor::from_slice(v, n, dev)?.to_dtype(DType::F32);
    let cpu = Var::from_tensor(&f32s(&t, &Device::Cpu)?)?;
    let cuda = Var::from_tensor(&f32s(&t, &dev)?)?;
    assert_eq!(
        dispatch::ema(cuda.as_tensor(), &f32s(&s, &dev)?),
        Kernel::Cuda
    );
    nn::ema_update(&cpu, &f32s(&s, &Device::Cpu)?, 0.995)?;
    nn::ema_update(&cuda, &f32s(&s, &dev)?, 0.995)?;
    let e = rel_err(&host(cuda.as_tensor())?, &host(cpu.as_tensor())?);
    assert!(e < 1e-6, "ema {e}");

    let (g, _) = data(3, &[n], 0.1);
    let h = nn::AdamWStep {
        beta1: 0.9,
        beta2: 0.999,
        inv_sqrt_bias2: 1.0 / (1.0f64 - 0.999).sqrt(),
        eps: 1e-8,
        step_size: 1e-3 / (1.0 - 0.9),
        decay: 1.0 - 1e-3 * 0.02,
    };
    let (p, m, v, gg) = (
        f32s(&t, &dev)?,
        Tensor::zeros(n, DType::F32, &dev)?,
        Tensor::zeros(n, DType::F32, &dev)?,
        f32s(&g, &dev)?,
    );
    assert!(nn::adamw_update(&p, &m, &v, &gg, h)?);
    // The same step in f64 on the host.
    let want: Vec<f64> = t
        .iter()
        .zip(&g)
        .map(|(&p, &g)| {
            let m = 0.1 * g;
            let v = 0.001 * g * g;
            p * h.decay - m / (v.sqrt() * h.inv_sqrt_bias2 + h.eps) * h.step_size
        })
        .collect();
    let e = rel_err(&host(&p)?, &want);
    assert!(e < 1e-5, "adamw {e}");
    Ok(())
}
