//! AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", Alg. 2) over the
//! named online parameters of a model, with ALBEF's weight-decay exemptions, global-norm
//! gradient clipping and gradient accumulation. Master weights and moments are f32.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use vlp_dist::Collective;

type Result<T> = std::result::Result<T, TrainError>;

/// AdamW hyper-parameters (PyTorch's defaults, ALBEF's weight decay).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.02,
        }
    }
}

/// Whether a parameter is exempt from weight decay: biases, every 0-/1-D parameter
/// (LayerNorm gains, the temperature) and the ViT's `pos_embed` and `cls_token`
/// (ALBEF's `no_weight_decay` list plus timm's `param_groups_weight_decay` rule).
pub fn is_decay_exempt(name: &str, rank: usize) -> bool {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    rank <= 1 || leaf == "bias" || matches!(leaf, "pos_embed" | "cls_token" | "temp")
}

/// Gradients of the optimizer's parameters, aligned with its parameter order (`None` for a
/// parameter the loss does not reach).
#[derive(Clone, Debug)]
pub struct Gradients {
    grads: Vec<Option<Tensor>>,
}

impl Gradients {
    /// The names and gradients that are present.
    pub fn iter<'a>(&'a self, opt: &'a AdamW) -> impl Iterator<Item = (&'a str, &'a Tensor)> {
        opt.params
            .iter()
            .zip(&self.grads)
            .filter_map(|((n, _), g)| g.as_ref().map(|g| (n.as_str(), g)))
    }

    /// Averages the gradients over the ranks of `collective` (data parallelism).
    pub fn all_reduce_mean(&mut self, collective: &dyn Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        let mut present: Vec<Tensor> = self.grads.iter().flatten().cloned().collect();
        collective.all_reduce_mean(&mut present)?;
        for (slot, reduced) in self.grads.iter_mut().flatten().zip(present) {
            *slot = reduced;
        }
        Ok(())
    }

    /// The squared L2 norm of all gradients together, 0-d f64, computed on their device
    /// without reading anything back (each tensor's sum in f32, the sum of sums in f64).
    /// `None` when no parameter has a gradient.
    pub fn squared_norm(&self) -> Result<Option<Tensor>> {
        let sums: Vec<Tensor> = self
            .grads
            .iter()
            .flatten()
            .map(|g| {
                let g = g.to_dtype(DType::F32)?;
                // Rows first: on a GPU candle reduces a whole tensor in one thread block.
                let sum = match g.rank() {
                    0 | 1 => g.sqr()?.sum_all()?,
                    r => g.flatten_to(r - 2)?.sqr()?.sum(D::Minus1)?.sum_all()?,
                };
                sum.to_dtype(DType::F64)?.reshape(1)
            })
            .collect::<candle_core::Result<_>>()?;
        if sums.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::cat(&sums, 0)?.sum_all()?))
    }

    /// The L2 norm of all gradients together (PyTorch's `clip_grad_norm_` total norm):
    /// one reduction and one read.
    pub fn global_norm(&self) -> Result<f64> {
        Ok(match self.squared_norm()? {
            Some(sq) => sq.to_scalar::<f64>()?.sqrt(),
            None => 0.0,
        })
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.grads.iter_mut().flatten() {
            *g = g.affine(factor, 0.0)?;
        }
        Ok(())
    }

    /// Clips to `max_norm` by global norm as PyTorch's `clip_grad_norm_` does (scale by
    /// `max_norm / (norm + 1e-6)` when that is below 1) and returns the norm before clipping.
    /// A non-finite norm is returned as is and nothing is scaled.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let norm = self.global_norm()?;
        self.clip_known_norm(norm, max_norm)?;
        Ok(norm)
    }

    /// [`Gradients::clip_global_norm`] for a norm already read (with other values, in the
    /// same transfer).
    pub fn clip_known_norm(&mut self, norm: f64, max_norm: f64) -> Result<()> {
        if norm.is_finite() {
            let factor = max_norm / (norm + 1e-6);
            if factor < 1.0 {
                self.scale(factor)?;
            }
        }
        Ok(())
    }

    /// Adds `other` into `self` (gradient accumulation over micro-batches).
    pub fn add(&mut self, other: &Gradients) -> Result<()> {
        for (a, b) in self.grads.iter_mut().zip(&other.grads) {
            *a = match (a.take(), b) {
                (Some(a), Some(b)) => Some((a + b)?),
                (None, Some(b)) => Some(b.clone()),
                (a, None) => a,
            };
        }
        Ok(())
    }
}

/// AdamW state: the step count and the first and second moments of every parameter.
pub struct AdamW {
    params: Vec<(String, Var)>,
    decay: Vec<bool>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    /// An optimizer over `params` (for a model: `AlbefModel::trainable_vars`), moments zero.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut decay = Vec::with_capacity(params.len());
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (name, var) in &params {
            if var.dtype() != DType::F32 {
                return Err(TrainError::Optim(format!(
                    "parameter {name} is {:?}: master weights must be f32",
                    var.dtype()
                )));
            }
            decay.push(!is_decay_exempt(name, var.rank()));
            m.push(var.zeros_like()?);
            v.push(var.zeros_like()?);
        }
        Ok(AdamW {
            params,
            decay,
            m,
            v,
            step: 0,
            cfg,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Optimizer steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Names of the parameters with weight decay, and without.
    pub fn decay_groups(&self) -> (Vec<&str>, Vec<&str>) {
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for ((name, _), decay) in self.params.iter().zip(&self.decay) {
            if *decay {
                with.push(name.as_str());
            } else {
                without.push(name.as_str());
            }
        }
        (with, without)
    }

    /// Takes this optimizer's parameters' gradients out of a backward pass, scaled by
    /// `scale` (1 / micro-batches when accumulating, so the sum is a mean).
    pub fn gradients(&self, store: &GradStore, scale: f64) -> Result<Gradients> {
        let grads = self
            .params
            .iter()
            .map(|(_, var)| {
                store
                    .get(var.as_tensor())
                    .map(|g| {
                        // Detached: a gradient candle computed still references the
                        // activations it came from, which would keep the step's whole
                        // graph alive for as long as the gradient lives.
                        if scale == 1.0 {
                            Ok(g.detach())
                        } else {
                            g.affine(scale, 0.0).map(|g| g.detach())
                        }
                    })
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Gradients { grads })
    }

    /// One AdamW update at learning rate `lr`. Parameters without a gradient are left
    /// untouched (their moments too), as in PyTorch.
    pub fn step(&mut self, grads: &Gradients, lr: f64) -> Result<()> {
        self.step_impl(grads, lr, true)
    }

    /// `in_place`: the fused in-place kernels where they apply (CPU, f32), otherwise
    /// tensor ops (the reference the kernels are tested against).
    fn step_impl(&mut self, grads: &Gradients, lr: f64, in_place: bool) -> Result<()> {
        self.step += 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let t = self.step as i32;
        let bias1 = 1.0 - beta1.powi(t);
        let bias2 = 1.0 - beta2.powi(t);
        for i in 0..self.params.len() {
            let Some(g) = &grads.grads[i] else { continue };
            let g = g.to_dtype(DType::F32)?.contiguous()?;
            let var = &self.params[i].1;
            let decay = if self.decay[i] && weight_decay != 0.0 {
                1.0 - lr * weight_decay
            } else {
                1.0
            };
            let fused = vlp_models::nn::AdamWStep {
                beta1,
                beta2,
                inv_sqrt_bias2: 1.0 / bias2.sqrt(),
                eps,
                step_size: lr / bias1,
                decay,
            };
            if in_place
                && vlp_models::nn::adamw_update(var.as_tensor(), &self.m[i], &self.v[i], &g, fused)?
            {
                continue;
            }
            if in_place && kernels::applies(var.as_tensor(), &g, &self.m[i], &self.v[i]) {
                self.m[i].inplace_op2(
                    &g,
                    &kernels::Moment {
                        beta: beta1,
                        square: false,
                    },
                )?;
                self.v[i].inplace_op2(
                    &g,
                    &kernels::Moment {
                        beta: beta2,
                        square: true,
                    },
                )?;
                var.as_tensor()
                    .inplace_op3(&self.m[i], &self.v[i], &kernels::Update(fused))?;
                continue;
            }
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            // PyTorch's form: p -= lr / bias1 * m / (sqrt(v) / sqrt(bias2) + eps).
            let denom = ((v.sqrt()? / bias2.sqrt())? + eps)?;
            let update = ((&m / &denom)? * (lr / bias1))?;
            let mut p = var.as_tensor().detach();
            if decay != 1.0 {
                p = (p * decay)?;
            }
            var.set(&(p - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes the step and moments (`m.NAME`, `v.NAME`, `step`) as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
        }
        map.insert(
            "step".into(),
            Tensor::new(&[self.step as i64], &vlp_core::device::host())?,
        );
        candle_core::safetensors::save(&map, path)
            .map_err(|e| TrainError::Checkpoint(format!("writing {}: {e}", path.display())))
    }

    /// Restores what [`AdamW::save`] wrote; every parameter's moments must be there with
    /// the parameter's shape.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self
            .params
            .first()
            .map_or_else(vlp_core::device::host, |(_, v)| v.device().clone());
        let map = candle_core::safetensors::load(path, &dev)
            .map_err(|e| TrainError::Checkpoint(format!("reading {}: {e}", path.display())))?;
        let missing = |k: &str| {
            TrainError::Checkpoint(format!("{}: optimizer state lacks {k}", path.display()))
        };
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{prefix}.{name}");
                let t = map.get(&key).ok_or_else(|| missing(&key))?;
                if t.dims() != var.dims() {
                    return Err(TrainError::Checkpoint(format!(
                        "{}: {key} has shape {:?}, the parameter {:?}",
                        path.display(),
                        t.dims(),
                        var.dims()
                    )));
                }
                *slot = t.to_dtype(DType::F32)?;
            }
        }
        let step = map.get("step").ok_or_else(|| missing("step"))?;
        self.step = step.flatten_all()?.to_vec1::<i64>()?[0] as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::{VarBuilder, VarMap};
    use vlp_models::{AlbefConfig, AlbefModel};

    fn var(values: &[f32]) -> Var {
        Var::new(values, &Device::Cpu).unwrap()
    }

    #[test]
    fn in_place_kernels_equal_the_tensor_op_update_bit_for_bit() {
        let dev = Device::Cpu;
        let make = || -> (Vec<(String, Var)>, AdamW) {
            let w = Var::from_tensor(
                &Tensor::arange(0f32, 600.0, &dev)
                    .unwrap()
                    .reshape((20, 30))
                    .unwrap()
                    .affine(0.01, -3.0)
                    .unwrap(),
            )
            .unwrap();
            let b = Var::from_tensor(
                &Tensor::arange(0f32, 30.0, &dev)
                    .unwrap()
                    .affine(-0.1, 1.0)
                    .unwrap(),
            )
            .unwrap();
            let params = vec![("l.weight".to_string(), w), ("l.bias".to_string(), b)];
            let opt = AdamW::new(
                params.clone(),
                AdamWConfig {
                    weight_decay: 0.02,
                    ..AdamWConfig::default()
                },
            )
            .unwrap();
            (params, opt)
        };
        let (pa, mut a) = make();
        let (pb, mut b) = make();
        for step in 0..4 {
            let gs: Vec<Option<Tensor>> = pa
                .iter()
                .map(|(_, v)| Some((v.as_tensor().sin().unwrap() * (1.0 + step as f64)).unwrap()))
                .collect();
            let grads = Gradients { grads: gs };
            a.step_impl(&grads, 1e-3, true).unwrap();
            b.step_impl(&grads, 1e-3, false).unwrap();
        }
        for ((_, x), (_, y)) in pa.iter().zip(&pb) {
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            assert!(x.iter().zip(&y).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
        for i in 0..2 {
            for (x, y) in [(&a.m[i], &b.m[i]), (&a.v[i], &b.v[i])] {
                let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let y: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                assert!(x.iter().zip(&y).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
    }

    /// Hand-computed with PyTorch's `torch.optim.AdamW` formulas:
    /// step 1: m = 0.1 g, v = 0.001 g^2, m_hat = g, v_hat = g^2,
    /// p = p (1 - lr wd) - lr g / (|g| + eps).
    #[test]
    fn one_step_matches_hand_computed_adamw() {
        let w = Var::new(&[[1.0f32, -2.0], [0.5, 3.0]], &Device::Cpu).unwrap();
        let b = var(&[0.25, -0.5]);
        let mut opt = AdamW::new(
            vec![
                ("layer.weight".into(), w.clone()),
                ("layer.bias".into(), b.clone()),
            ],
            AdamWConfig {
                weight_decay: 0.1,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        // loss = sum(w * c) + sum(b * d): grads are c and d.
        let c = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.0]], &Device::Cpu).unwrap();
        let d = Tensor::new(&[4.0f32, -0.25], &Device::Cpu).unwrap();
        let loss = ((w.as_tensor() * &c).unwrap().sum_all().unwrap()
            + (b.as_tensor() * &d).unwrap().sum_all().unwrap())
        .unwrap();
        let grads = opt.gradients(&loss.backward().unwrap(), 1.0).unwrap();
        let lr = 0.01;
        opt.step(&grads, lr).unwrap();
        let w1: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let step = |p: f64, g: f64, decay: bool| {
            let p = if decay { p * (1.0 - lr * 0.1) } else { p };
            p - lr * g / (g.abs() + 1e-8)
        };
        let want = [
            step(1.0, 0.5, true),
            step(-2.0, -1.0, true),
            step(0.5, 2.0, true),
            step(3.0, 0.0, true),
        ];
        for (a, b) in w1.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
        }
        let b1: Vec<f32> = b.to_vec1().unwrap();
        assert!((b1[0] as f64 - step(0.25, 4.0, false)).abs() < 1e-6);
        assert!((b1[1] as f64 - step(-0.5, -0.25, false)).abs() < 1e-6);

        // Step 2 with the same gradient: m_hat = g and v_hat = g^2 again.
        opt.step(&grads, lr).unwrap();
        let w2: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        assert!((w2[0] as f64 - step(w1[0] as f64, 0.5, true)).abs() < 1e-6);
        assert_eq!(opt.steps_taken(), 2);
    }

    #[test]
    fn clipping_scales_to_max_norm_and_returns_pre_clip_norm() {
        let a = var(&[3.0, 0.0]);
        let b = var(&[0.0, 4.0]);
        let opt = AdamW::new(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        let loss = ((a.as_tensor() * Tensor::new(&[3f32, 0.], &Device::Cpu).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            + (b.as_tensor() * Tensor::new(&[0f32, 4.], &Device::Cpu).unwrap())
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        let mut grads = opt.gradients(&loss.backward().unwrap(), 1.0).unwrap();
        let norm = grads.clip_global_norm(1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((grads.global_norm().unwrap() - 1.0).abs() < 1e-5);
        // Below the limit nothing changes.
        let mut again = grads.clone();
        let n = again.clip_global_norm(10.0).unwrap();
        assert!((n - again.global_norm().unwrap()).abs() < 1e-9);
    }

    #[test]
    fn accumulation_sums_scaled_micro_batches() {
        let a = var(&[1.0, 2.0]);
        let opt = AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default()).unwrap();
        let g = |k: f64| {
            let loss = (a.as_tensor() * k).unwrap().sum_all().unwrap();
            opt.gradients(&loss.backward().unwrap(), 0.5).unwrap()
        };
        let mut acc = g(2.0);
        acc.add(&g(4.0)).unwrap();
        let (_, t) = acc.iter(&opt).next().unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), vec![3.0, 3.0]);
    }

    #[test]
    fn exemptions_on_the_tiny_albef_model() {
        let cfg = AlbefConfig::preset("tiny").unwrap();
        let varmap = VarMap::new();
        let model = AlbefModel::new(
            &cfg,
            VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        )
        .unwrap();
        let opt = AdamW::new(model.trainable_vars().unwrap(), AdamWConfig::default()).unwrap();
        let (with, without) = opt.decay_groups();
        for n in [
            "visual_encoder.pos_embed",
            "visual_encoder.cls_token",
            "temp",
            "visual_encoder.norm.weight",
            "visual_encoder.norm.bias",
            "vision_proj.bias",
        ] {
            assert!(without.contains(&n), "{n} should be exempt: {without:?}");
        }
        for n in ["vision_proj.weight", "itm_head.weight"] {
            assert!(with.contains(&n), "{n} should decay");
        }
        assert!(with.iter().all(|n| !n.ends_with(".bias")));
        assert!(with.iter().any(|n| n.contains("patch_embed")));
        assert!(!with
            .iter()
            .chain(&without)
            .any(|n| n.contains("_m.") || n.contains("queue")));
    }

    #[test]
    fn state_round_trips_through_safetensors() {
        let a = var(&[1.0, 2.0]);
        let mut opt = AdamW::new(vec![("a".into(), a.clone())], AdamWConfig::default()).unwrap();
        let loss = a.as_tensor().sqr().unwrap().sum_all().unwrap();
        let grads = opt.gradients(&loss.backward().unwrap(), 1.0).unwrap();
        opt.step(&grads, 0.1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optim.safetensors");
        opt.save(&path).unwrap();
        let b = var(&[1.0, 2.0]);
        let mut other = AdamW::new(vec![("a".into(), b)], AdamWConfig::default()).unwrap();
        other.load(&path).unwrap();
        assert_eq!(other.steps_taken(), 1);
        assert_eq!(
            other.m[0].to_vec1::<f32>().unwrap(),
            opt.m[0].to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            other.v[0].to_vec1::<f32>().unwrap(),
            opt.v[0].to_vec1::<f32>().unwrap()
        );
    }
}

/// AdamW's update as in-place passes over f32 CPU tensors: the moments, then the
/// parameter. Each computes exactly what the tensor-op version in [`AdamW::step`] computes
/// (the same f32 operations in the same order), without its dozen temporaries per
/// parameter.
mod kernels {
    use candle_core::{bail, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
    use rayon::prelude::*;

    const CHUNK: usize = 1 << 14;

    /// Whether the in-place path serves these tensors: all f32, contiguous, on the CPU.
    pub(super) fn applies(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
        [p, g, m, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.shape() == p.shape())
            && [p, m, v].iter().all(|t| t.is_contiguous())
    }

    fn span<'a>(s: &'a [f32], l: &Layout, op: &str) -> Result<&'a [f32]> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(&s[a..b]),
            None => bail!("{op}: tensors must be contiguous"),
        }
    }

    fn f32s<'a>(s: &'a CpuStorage, op: &str) -> Result<&'a [f32]> {
        match s {
            CpuStorage::F32(v) => Ok(v),
            _ => bail!("{op}: f32 tensors only"),
        }
    }

    /// `m = m * beta + g * (1 - beta)`, or with `square`, `v = v * beta + g^2 * (1 - beta)`.
    pub(super) struct Moment {
        pub(super) beta: f64,
        pub(super) square: bool,
    }

    impl InplaceOp2 for Moment {
        fn name(&self) -> &'static str {
            "vlp-adamw-moment"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<()> {
            let op = self.name();
            let g = span(f32s(s2, op)?, l2, op)?;
            let Some((a, b)) = l1.contiguous_offsets() else {
                bail!("{op}: the moment must be contiguous");
            };
            let CpuStorage::F32(m) = s1 else {
                bail!("{op}: f32 tensors only");
            };
            let (beta, rest) = (self.beta as f32, (1.0 - self.beta) as f32);
            let square = self.square;
            m[a..b]
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .for_each(|(m, g)| {
                    for (m, &g) in m.iter_mut().zip(g) {
                        let g = if square { g * g } else { g };
                        *m = *m * beta + g * rest;
                    }
                });
            Ok(())
        }
    }

    /// `p = p * decay - m / (sqrt(v) * inv_sqrt_bias2 + eps) * step_size`, with the
    /// constants the CUDA AdamW takes.
    pub(super) struct Update(pub(super) vlp_models::nn::AdamWStep);

    impl InplaceOp3 for Update {
        fn name(&self) -> &'static str {
            "vlp-adamw-update"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<()> {
            let op = self.name();
            let m = span(f32s(s2, op)?, l2, op)?;
            let v = span(f32s(s3, op)?, l3, op)?;
            let Some((a, b)) = l1.contiguous_offsets() else {
                bail!("{op}: the parameter must be contiguous");
            };
            let CpuStorage::F32(p) = s1 else {
                bail!("{op}: f32 tensors only");
            };
            let h = &self.0;
            let (inv, eps, step) = (h.inv_sqrt_bias2 as f32, h.eps as f32, h.step_size as f32);
            // Without weight decay the factor is 1 and the product exact.
            let decay = h.decay as f32;
            p[a..b]
                .par_chunks_mut(CHUNK)
                .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
                .for_each(|(p, (m, v))| {
                    for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                        let update = m / (v.sqrt() * inv + eps) * step;
                        *p = *p * decay - update;
                    }
                });
            Ok(())
        }
    }
}
