//! The ViT image encoder (ALBEF paper §3.1: a 12-layer ViT-B/16 initialised from DeiT;
//! Dosovitskiy et al. 2021 §3.1 for the architecture), under `visual_encoder`.
//!
//! Parameter names are timm's/ALBEF's: `cls_token`, `pos_embed`, `patch_embed.proj`,
//! `blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm`.

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::attention::{self_attention_packed, AttentionBackend};
use crate::config::VisionConfig;
use crate::error::{ModelError, Result};
use crate::nn::{self, LayerNorm, Linear, WEIGHT_INIT};

/// One pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl Block {
    fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden;
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), d, cfg.eps)?,
            qkv: Linear::load(vb.pp("attn").pp("qkv"), d, 3 * d, cfg.qkv_bias)?,
            proj: Linear::load(vb.pp("attn").pp("proj"), d, d, true)?,
            norm2: LayerNorm::load(vb.pp("norm2"), d, cfg.eps)?,
            fc1: Linear::load(vb.pp("mlp").pp("fc1"), d, cfg.mlp_hidden(), true)?,
            fc2: Linear::load(vb.pp("mlp").pp("fc2"), cfg.mlp_hidden(), d, true)?,
            heads: cfg.heads,
        })
    }

    fn forward(&self, x: &Tensor, backend: AttentionBackend) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        // The fused qkv rows are q; k; v: the attention reads the three parts in place.
        let qkv = self.qkv.forward(&h)?; // [B, L, 3 d]
        let a = self_attention_packed(&qkv, self.heads, None, 0.0, backend)?;
        let x = (x + self.proj.forward(&a)?)?;
        let h = self.fc1.forward_gelu(&self.norm2.forward(&x)?)?;
        Ok((&x + self.fc2.forward(&h)?)?)
    }
}

/// The ViT: patch embedding, [CLS], learned position embeddings, pre-norm blocks, final
/// LayerNorm.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    cfg: VisionConfig,
    cls_token: Tensor,
    pos_embed: Tensor,
    /// Stored with the Conv2d shape `[D, 3, P, P]`, applied as a matmul.
    patch_weight: Tensor,
    patch_bias: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    backend: AttentionBackend,
    /// The dtype activations are computed in (bf16 for mixed precision); `None`: the
    /// parameters' dtype.
    compute: Option<DType>,
    /// Recompute each block's activations in the backward instead of keeping them.
    grad_checkpoint: bool,
}

impl VisionTransformer {
    /// Loads (or creates) the encoder's parameters under `vb` (ALBEF: `visual_encoder`).
    pub fn new(cfg: &VisionConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, p) = (cfg.hidden, cfg.patch_size);
        let blocks = (0..cfg.layers)
            .map(|i| Block::new(cfg, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            cls_token: vb.get_with_hints((1, 1, d), "cls_token", WEIGHT_INIT)?,
            pos_embed: vb.get_with_hints((1, cfg.tokens(), d), "pos_embed", WEIGHT_INIT)?,
            patch_weight: vb.pp("patch_embed").pp("proj").get_with_hints(
                (d, 3, p, p),
                "weight",
                WEIGHT_INIT,
            )?,
            patch_bias: vb.pp("patch_embed").pp("proj").get_with_hints(
                d,
                "bias",
                Init::Const(0.0),
            )?,
            blocks,
            norm: LayerNorm::load(vb.pp("norm"), d, cfg.eps)?,
            backend: AttentionBackend::default(),
            compute: None,
            grad_checkpoint: false,
        })
    }

    /// Uses `backend` for every attention.
    pub fn with_attention(mut self, backend: AttentionBackend) -> Self {
        self.backend = backend;
        self
    }

    /// Activation checkpointing of every block in training passes (see `recompute`).
    pub fn with_grad_checkpoint(mut self, on: bool) -> Self {
        self.grad_checkpoint = on;
        self
    }

    /// Computes activations in `dtype` (bf16 for mixed precision); parameters stay f32
    /// and are cast where they are used (`nn::as_compute`).
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute = Some(dtype);
        self
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// The position embeddings, `[1, 1 + grid^2, D]` ([CLS] first).
    pub fn pos_embed(&self) -> &Tensor {
        &self.pos_embed
    }

    /// Patch embedding: the strided `Conv2d(3, D, P, stride P)` as patchify + one matmul
    /// (the same maths; candle's conv backward is slow).
    ///
    /// # Shapes
    /// `images`: `[B, 3, S, S]` with `S = image_size` -> `[B, (S/P)^2, D]`.
    pub fn patch_embed(&self, images: &Tensor) -> Result<Tensor> {
        let (d, p) = (self.cfg.hidden, self.cfg.patch_size);
        let (_, c, h, w) = images.dims4()?;
        if c != 3 || h != self.cfg.image_size || w != self.cfg.image_size {
            return Err(ModelError::input(
                "images",
                format!(
                    "shape {:?} does not fit the encoder's [B, 3, {s}, {s}]; to run at \
                     another size, build the model with `vision.image_size` changed and \
                     `interpolate_pos_embed` applied to the checkpoint's `pos_embed`",
                    images.dims(),
                    s = self.cfg.image_size
                ),
            ));
        }
        let patches = patchify(images, p)?;
        let weight = self.patch_weight.reshape((d, 3 * p * p))?;
        Ok(nn::linear(&patches, &weight, Some(&self.patch_bias))?)
    }

    /// All output tokens, after the final LayerNorm. `train` is accepted for a uniform
    /// interface; ALBEF's ViT has no dropout.
    ///
    /// # Shapes
    /// `images`: `[B, 3, S, S]` -> `[B, 1 + (S/P)^2, D]` ([CLS] first).
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let dtype = self.compute.unwrap_or(self.patch_weight.dtype());
        let x = self.patch_embed(&images.to_dtype(dtype)?)?;
        let (b, _, d) = x.dims3()?;
        let cls = nn::as_compute(&self.cls_token, &x)?.broadcast_as((b, 1, d))?;
        let mut x = nn::add_broadcast(&Tensor::cat(&[&cls, &x], 1)?, &self.pos_embed)?;
        for block in &self.blocks {
            x = if self.grad_checkpoint && train {
                let (block, backend) = (block.clone(), self.backend);
                let f: crate::recompute::BlockFn = std::sync::Arc::new(move |x, _| {
                    block.forward(x, backend).map_err(candle_core::Error::wrap)
                });
                crate::recompute::checkpoint(f, &x, None)?
            } else {
                block.forward(&x, self.backend)?
            };
        }
        Ok(self.norm.forward(&x)?)
    }
}

/// Cuts images into flattened non-overlapping patches, each in `(channel, row, col)`
/// order, the order of a Conv2d weight `[D, C, P, P]` flattened.
///
/// # Shapes
/// `[B, C, H, W]` -> `[B, (H/P) * (W/P), C * P * P]`, patches row-major.
pub fn patchify(images: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let (gh, gw) = (h / patch, w / patch);
    Ok(images
        .reshape((b, c, gh, patch, gw, patch))?
        .permute((0, 2, 4, 1, 3, 5))? // [B, gh, gw, C, P, P]
        .reshape((b, gh * gw, c * patch * patch))?)
}

/// Resizes ViT position embeddings to another square grid, keeping [CLS]'s row: bicubic
/// on the 2-D grid with a = -0.75 and half-pixel centres, exactly PyTorch's
/// `F.interpolate(mode="bicubic", align_corners=False)` as timm/ALBEF's
/// `interpolate_pos_embed` calls it (pretrain 256 px -> fine-tune 384 px). Used at load
/// time; the result is a plain (detached) tensor of the input's dtype and device.
///
/// # Shapes
/// `pos`: `[1, 1 + g^2, D]` -> `[1, 1 + new_grid^2, D]`.
pub fn interpolate_pos_embed(pos: &Tensor, new_grid: usize) -> Result<Tensor> {
    let (one, n, d) = pos.dims3()?;
    let old = (((n.max(1) - 1) as f64).sqrt().round()) as usize;
    if one != 1 || n < 2 || old * old != n - 1 || new_grid == 0 {
        return Err(ModelError::input(
            "pos_embed",
            format!(
                "shape {:?} is not [1, 1 + g^2, D], or the new grid {new_grid} is empty",
                pos.dims()
            ),
        ));
    }
    if old == new_grid {
        return Ok(pos.detach());
    }
    let src = pos.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let taps = cubic_taps(old, new_grid);
    // Separable: along columns, then along rows (PyTorch mixes the same 4 x 4 weights).
    let mut rows_done = vec![0.0; old * new_grid * d]; // [old rows, new cols, D]
    for y in 0..old {
        for (x, (idx, w)) in taps.iter().enumerate() {
            for k in 0..4 {
                let from = (1 + y * old + idx[k]) * d;
                let to = (y * new_grid + x) * d;
                for c in 0..d {
                    rows_done[to + c] += w[k] * src[from + c];
                }
            }
        }
    }
    let mut out = vec![0.0; (1 + new_grid * new_grid) * d];
    out[..d].copy_from_slice(&src[..d]);
    for (y, (idx, w)) in taps.iter().enumerate() {
        for x in 0..new_grid {
            let to = (1 + y * new_grid + x) * d;
            for k in 0..4 {
                let from = (idx[k] * new_grid + x) * d;
                for c in 0..d {
                    out[to + c] += w[k] * rows_done[from + c];
                }
            }
        }
    }
    Ok(
        Tensor::from_vec(out, (1, 1 + new_grid * new_grid, d), pos.device())?
            .to_dtype(pos.dtype())?,
    )
}

/// For each output index: the 4 source indices (clamped to the border) and their weights.
fn cubic_taps(input: usize, output: usize) -> Vec<([usize; 4], [f64; 4])> {
    const A: f64 = -0.75;
    // Keys' cubic convolution kernel, |t| <= 1 and 1 < |t| < 2.
    let near = |t: f64| ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
    let far = |t: f64| ((A * t - 5.0 * A) * t + 8.0 * A) * t - 4.0 * A;
    let scale = input as f64 / output as f64;
    (0..output)
        .map(|o| {
            // Half-pixel centres, not clamped at 0 for cubic (as PyTorch does).
            let real = (o as f64 + 0.5) * scale - 0.5;
            let floor = real.floor();
            let t = real - floor;
            let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
            let mut idx = [0usize; 4];
            for (k, slot) in idx.iter_mut().enumerate() {
                let i = floor as i64 - 1 + k as i64;
                *slot = i.clamp(0, input as i64 - 1) as usize;
            }
            (idx, weights)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Module;
    use candle_nn::VarMap;
    use vlp_core::device::test_device;

    fn micro() -> VisionConfig {
        crate::test_support::micro_config().vision
    }

    #[test]
    fn patch_embedding_as_matmul_equals_conv2d() -> Result<()> {
        let dev = test_device();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let vit = VisionTransformer::new(&micro(), vb)?;
        let images = Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?;
        let ours = vit.patch_embed(&images)?; // [B, N, D]
        let conv = candle_nn::Conv2d::new(
            vit.patch_weight.clone(),
            Some(vit.patch_bias.clone()),
            candle_nn::Conv2dConfig {
                stride: 8,
                ..Default::default()
            },
        );
        let theirs = conv
            .forward(&images)? // [B, D, 4, 4]
            .flatten_from(2)?
            .transpose(1, 2)?;
        let diff = (ours - theirs)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn forward_shape_and_wrong_size_is_an_error() -> Result<()> {
        let dev = test_device();
        let varmap = VarMap::new();
        let vit = VisionTransformer::new(
            &micro(),
            VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("visual_encoder"),
        )?;
        let out = vit.forward(&Tensor::randn(0f32, 1.0, (2, 3, 32, 32), &dev)?, false)?;
        assert_eq!(out.dims(), &[2, 17, 32]);
        let err = vit
            .forward(&Tensor::zeros((1, 3, 48, 48), DType::F32, &dev)?, false)
            .unwrap_err();
        assert!(err.to_string().contains("interpolate_pos_embed"), "{err}");
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        for name in [
            "visual_encoder.cls_token",
            "visual_encoder.pos_embed",
            "visual_encoder.patch_embed.proj.weight",
            "visual_encoder.blocks.1.attn.qkv.bias",
            "visual_encoder.blocks.0.mlp.fc2.weight",
            "visual_encoder.norm.bias",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing");
        }
        Ok(())
    }

    /// Reference from PyTorch 2.x (float64):
    /// ```python
    /// import torch, math
    /// def ref(old, new, d):
    ///     n = 1 + old * old
    ///     pos = torch.tensor([[[math.sin(0.37 * i + 1.3 * c) for c in range(d)]
    ///                          for i in range(n)]], dtype=torch.float64)
    ///     cls, grid = pos[:, :1], pos[:, 1:]
    ///     grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2)
    ///     grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic",
    ///                                            align_corners=False)
    ///     return torch.cat([cls, grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    /// print(ref(3, 5, 2).flatten().tolist()); print(ref(4, 3, 2).flatten().tolist())
    /// ```
    #[test]
    fn interpolate_pos_embed_matches_torch_bicubic() -> Result<()> {
        #[rustfmt::skip]
        let up: [f64; 52] = [
            0.0, 0.963558185417193, 0.267508879145104, 1.064165725639933,
            0.416367849265854, 1.041444618051992, 0.646737131658818, 0.97836089719215,
            0.829838682185729, 0.843772235154593, 0.930029395051805, 0.747427521465153,
            0.62246677876855, 0.841257412503584, 0.713138542408413, 0.75901593466753,
            0.841847863996678, 0.606750190091913, 0.909029499668193, 0.410139217925328,
            0.936350534845625, 0.282238579828944, 0.999202986127624, 0.388532818197299,
            0.994312956224675, 0.239236194550613, 0.9612752029753, -0.008407247367149,
            0.857981241570413, -0.25543623327979, 0.780753338085122, -0.4041001948175,
            0.776651653040763, -0.297220380139044, 0.679132701127546, -0.424029176222303,
            0.504162779682682, -0.61852230738486, 0.292345382006231, -0.767809828497392,
            0.156887176787895, -0.848073589047666, 0.514565344353211, -0.760061848535973,
            0.361878957388909, -0.854194916356279, 0.10565109012645, -0.984941233267709,
            -0.158298442021159, -1.043701675487662, -0.318935283941284, -1.06371595381082,
        ];
        #[rustfmt::skip]
        let down: [f64; 20] = [
            0.0, 0.963558185417193, 0.500489909163427, 0.851358455248896,
            0.810162186085077, 0.61398381616301, 0.89655216602502, 0.207394025917161,
            0.476465884284253, -0.703306265916112, -0.003400827948968, -0.962620835564365,
            -0.482330265289425, -0.956635203624723, -0.896760723696917, -0.266427285875151,
            -0.807333759316496, 0.186616090730693, -0.495404017952437, 0.588227704526861,
        ];
        let dev = test_device();
        for (old, new, expect) in [(3usize, 5usize, &up[..]), (4, 3, &down[..])] {
            let n = 1 + old * old;
            let data: Vec<f64> = (0..n)
                .flat_map(|i| (0..2).map(move |c| (0.37 * i as f64 + 1.3 * c as f64).sin()))
                .collect();
            let pos = Tensor::from_vec(data, (1, n, 2), &dev)?;
            let out = interpolate_pos_embed(&pos, new)?;
            assert_eq!(out.dims(), &[1, 1 + new * new, 2]);
            let got = out.flatten_all()?.to_vec1::<f64>()?;
            for (i, (g, e)) in got.iter().zip(expect).enumerate() {
                assert!((g - e).abs() < 1e-12, "{old}->{new} index {i}: {g} vs {e}");
            }
            // f32 in, f32 out.
            let out32 = interpolate_pos_embed(&pos.to_dtype(DType::F32)?, new)?;
            assert_eq!(out32.dtype(), DType::F32);
        }
        Ok(())
    }
}
