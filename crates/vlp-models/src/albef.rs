//! The ALBEF model (ALBEF paper §3.1 architecture, §3.3 momentum distillation): image
//! encoder, text/fusion encoder with MLM head, ITC projections, ITM head, learned
//! temperature, the momentum twin and the feature queues. Losses are not here; the model
//! exposes encoders and heads, and [`smoke_loss`] is only a check that every parameter is
//! reachable by gradients.
//!
//! Parameter names are ALBEF's checkpoint names, so our checkpoints have ALBEF's layout.

use candle_core::{DType, IndexOp, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

use crate::attention::AttentionBackend;
use crate::bert::{BertModel, FusionInput, FusionText};
use crate::config::AlbefConfig;
use crate::error::{ModelError, Result};
use crate::nn::{self, Linear};
use crate::params;
use crate::vit::VisionTransformer;

/// Bounds the learned temperature is clamped to before every training forward.
pub const TEMP_RANGE: (f64, f64) = (0.001, 0.5);

/// Top-level names of the momentum twin and of the online modules they shadow.
pub const MOMENTUM_ROOTS: [(&str, &str); 4] = [
    ("visual_encoder_m", "visual_encoder"),
    ("text_encoder_m", "text_encoder"),
    ("vision_proj_m", "vision_proj"),
    ("text_proj_m", "text_proj"),
];

/// Names of the checkpointed, never-trained state tensors.
pub const STATE_NAMES: [&str; 4] = ["image_queue", "text_queue", "idx_queue", "queue_ptr"];

/// One momentum parameter and the online parameter it follows.
#[derive(Debug, Clone)]
struct MomentumPair {
    name: String,
    online: Tensor,
    momentum: Tensor,
}

/// The ALBEF model. Build it from a `VarBuilder` over a `VarMap` to train it: online
/// parameters are then `Var`s ([`AlbefModel::trainable_vars`]); momentum parameters and
/// queues are `Var`s too, so `VarMap::save` checkpoints them, but they are updated only by
/// [`AlbefModel::momentum_update`] and [`AlbefModel::enqueue`], never by gradients.
/// `VarMap::load` after construction writes into the same storage, so it restores a
/// checkpoint into a built model.
#[derive(Debug, Clone)]
pub struct AlbefModel {
    cfg: AlbefConfig,
    visual_encoder: VisionTransformer,
    text_encoder: BertModel,
    vision_proj: Linear,
    text_proj: Linear,
    itm_head: Linear,
    temp: Tensor,
    visual_encoder_m: VisionTransformer,
    text_encoder_m: BertModel,
    vision_proj_m: Linear,
    text_proj_m: Linear,
    online: Vec<(String, Tensor)>,
    momentum: Vec<MomentumPair>,
    image_queue: Var,
    text_queue: Var,
    idx_queue: Var,
    queue_ptr: Var,
}

impl AlbefModel {
    /// Loads (or, from a `VarMap`, creates) every tensor under `vb` with ALBEF's names.
    /// Fresh queues are random-normal columns, L2-normalised; `idx_queue` is -100 (empty)
    /// and `queue_ptr` 0. Call [`AlbefModel::copy_params_to_momentum`] after creating a
    /// fresh model, as ALBEF does.
    pub fn new(cfg: &AlbefConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (vh, th, e) = (cfg.vision.hidden, cfg.text.hidden, cfg.embed_dim);

        let (ovb, online) = params::recording(&vb, false);
        let visual_encoder = VisionTransformer::new(&cfg.vision, ovb.pp("visual_encoder"))?;
        let text_encoder = BertModel::new(&cfg.text, vh, ovb.pp("text_encoder"))?;
        let vision_proj = Linear::load(ovb.pp("vision_proj"), vh, e, true)?;
        let text_proj = Linear::load(ovb.pp("text_proj"), th, e, true)?;
        let itm_head = Linear::load(ovb.pp("itm_head"), th, 2, true)?;
        let temp = ovb.get_with_hints((), "temp", Init::Const(cfg.temp))?;
        let online = params::take(&online);

        // The twin gets detached views: its forwards build no autograd graph, and
        // `momentum_update` writes the recorded originals in place.
        let (mvb, momentum) = params::recording(&vb, true);
        let visual_encoder_m = VisionTransformer::new(&cfg.vision, mvb.pp("visual_encoder_m"))?;
        let text_encoder_m = BertModel::new(&cfg.text, vh, mvb.pp("text_encoder_m"))?;
        let vision_proj_m = Linear::load(mvb.pp("vision_proj_m"), vh, e, true)?;
        let text_proj_m = Linear::load(mvb.pp("text_proj_m"), th, e, true)?;
        let momentum = pair_with_online(params::take(&momentum), &online)?;

        let q = cfg.queue_size;
        let unit = Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        };
        let queue = |name: &str| -> Result<Var> {
            let t = vb.get_with_hints((e, q), name, unit)?;
            let var = Var::from_tensor(&t)?;
            // Columns are unit vectors (a no-op for queues read from a checkpoint).
            var.set(&normalize_columns(&t.detach())?)?;
            Ok(var)
        };
        let image_queue = queue("image_queue")?;
        let text_queue = queue("text_queue")?;
        let idx_queue = Var::from_tensor(&vb.get_with_hints_dtype(
            (1, q),
            "idx_queue",
            Init::Const(-100.0),
            DType::I64,
        )?)?;
        let queue_ptr = Var::from_tensor(&vb.get_with_hints_dtype(
            1,
            "queue_ptr",
            Init::Const(0.0),
            DType::I64,
        )?)?;

        Ok(Self {
            cfg: cfg.clone(),
            visual_encoder,
            text_encoder,
            vision_proj,
            text_proj,
            itm_head,
            temp,
            visual_encoder_m,
            text_encoder_m,
            vision_proj_m,
            text_proj_m,
            online,
            momentum,
            image_queue,
            text_queue,
            idx_queue,
            queue_ptr,
        })
    }

    pub fn config(&self) -> &AlbefConfig {
        &self.cfg
    }

    /// Computes every attention of the model, online and momentum, with `backend`
    /// (default [`AttentionBackend::Fused`]). A runtime choice, not a checkpoint field:
    /// the backends compute the same function of the same weights.
    pub fn with_attention(mut self, backend: AttentionBackend) -> Self {
        self.visual_encoder = self.visual_encoder.with_attention(backend);
        self.text_encoder = self.text_encoder.with_attention(backend);
        self.visual_encoder_m = self.visual_encoder_m.with_attention(backend);
        self.text_encoder_m = self.text_encoder_m.with_attention(backend);
        self
    }

    /// Computes activations in `dtype`: f32, or bf16 for mixed precision (bf16 matmuls
    /// and activations; f32 master weights, f32 softmax and LayerNorm statistics inside
    /// the kernels, f32 ITC features, ITM and MLM logits and losses). Parameters and
    /// checkpoints stay f32 either way.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.visual_encoder = self.visual_encoder.with_compute_dtype(dtype);
        self.text_encoder = self.text_encoder.with_compute_dtype(dtype);
        self.visual_encoder_m = self.visual_encoder_m.with_compute_dtype(dtype);
        self.text_encoder_m = self.text_encoder_m.with_compute_dtype(dtype);
        self
    }

    /// Activation checkpointing of the online ViT blocks and BERT layers in training
    /// passes: their activations are recomputed in the backward instead of kept (one
    /// extra forward of the online encoders for a much smaller peak). The momentum twin
    /// never runs a backward and is left as is.
    pub fn with_grad_checkpoint(mut self, on: bool) -> Self {
        self.visual_encoder = self.visual_encoder.with_grad_checkpoint(on);
        self.text_encoder = self.text_encoder.with_grad_checkpoint(on);
        self
    }

    /// Features and logits leave the model in the parameters' dtype (f32 under mixed
    /// precision), whatever it computes in.
    fn out(&self, t: Tensor) -> candle_core::Result<Tensor> {
        t.to_dtype(self.temp.dtype())
    }

    /// The attention implementation in use (see [`AlbefModel::with_attention`]).
    pub fn attention(&self) -> AttentionBackend {
        self.text_encoder.attention()
    }

    pub fn visual_encoder(&self) -> &VisionTransformer {
        &self.visual_encoder
    }

    pub fn text_encoder(&self) -> &BertModel {
        &self.text_encoder
    }

    /// The online parameters, the only ones an optimizer may update, in a fixed order
    /// (construction order). Momentum parameters and queues are not in it.
    ///
    /// Errors if the model was not built from a `VarMap` (its tensors are not variables).
    pub fn trainable_vars(&self) -> Result<Vec<(String, Var)>> {
        self.online
            .iter()
            .map(|(name, t)| Ok((name.clone(), as_var(name, t)?)))
            .collect()
    }

    /// Names of the online (trainable) parameters.
    #[cfg(test)]
    pub(crate) fn trainable_names(&self) -> Vec<&str> {
        self.online.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Names of the momentum parameters.
    #[cfg(test)]
    pub(crate) fn momentum_names(&self) -> Vec<&str> {
        self.momentum.iter().map(|p| p.name.as_str()).collect()
    }

    /// The EMA step of the momentum twin, over every pair: `p_m = m * p_m + (1 - m) * p`.
    pub fn momentum_update(&self, m: f64) -> Result<()> {
        for pair in &self.momentum {
            let var = as_var(&pair.name, &pair.momentum)?;
            crate::nn::ema_update(&var, &pair.online, m)?;
        }
        Ok(())
    }

    /// Sets every momentum parameter to its online parameter (ALBEF's `copy_params`).
    pub fn copy_params_to_momentum(&self) -> Result<()> {
        for pair in &self.momentum {
            as_var(&pair.name, &pair.momentum)?.set(&pair.online.detach())?;
        }
        Ok(())
    }

    /// The learned ITC temperature, a 0-d tensor.
    pub fn temp(&self) -> &Tensor {
        &self.temp
    }

    /// Clamps the temperature to [`TEMP_RANGE`] in place (ALBEF does this, without a
    /// gradient, before every training forward).
    pub fn clamp_temp(&self) -> Result<()> {
        let clamped = self.temp.detach().clamp(TEMP_RANGE.0, TEMP_RANGE.1)?;
        as_var("temp", &self.temp)?.set(&clamped)?;
        Ok(())
    }

    /// Image tokens and the normalised ITC feature of [CLS].
    ///
    /// # Shapes
    /// `images`: `[B, 3, S, S]` -> (`[B, 1 + N, Dv]`, `[B, embed_dim]`).
    pub fn encode_image(&self, images: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let tokens = self.visual_encoder.forward(images, train)?;
        let feat = nn::l2_normalize(&self.out(self.vision_proj.forward(&cls(&tokens)?)?)?)?;
        Ok((tokens, feat))
    }

    /// Text-only states and the normalised ITC feature of [CLS].
    ///
    /// # Shapes
    /// `input_ids`, `attention_mask`: `[B, L]` -> (`[B, L, H]`, `[B, embed_dim]`).
    pub fn encode_text(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let states = self
            .text_encoder
            .forward_text(input_ids, attention_mask, train)?;
        let feat = nn::l2_normalize(&self.out(self.text_proj.forward(&cls(&states)?)?)?)?;
        Ok((states, feat))
    }

    /// The fusion encoder on text and image tokens.
    ///
    /// # Shapes
    /// `text`: `[B, L, H]` or `[B, L]` (see [`FusionText`]), `attention_mask`: `[B, L]`,
    /// `image_tokens`: `[B, 1 + N, Dv]`, or `[1, 1 + N, Dv]` for one image under all `B`
    /// texts (its cross-attention keys and values are then computed once) -> `[B, L, H]`.
    pub fn fuse(
        &self,
        text: FusionText,
        attention_mask: &Tensor,
        image_tokens: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.text_encoder
            .forward_fusion(text, attention_mask, image_tokens, train)
    }

    /// The fusion encoder's [CLS] output, `[B, H]`, computing the last layer for [CLS]
    /// alone (see [`BertModel::forward_fusion_cls`]); arguments as for [`AlbefModel::fuse`].
    pub fn fuse_cls(
        &self,
        text: FusionText,
        attention_mask: &Tensor,
        image_tokens: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        self.text_encoder
            .forward_fusion_cls(text, attention_mask, image_tokens, train)
    }

    /// ITM logits (column 1 = "match").
    ///
    /// # Shapes
    /// `fused_cls`: `[B, H]` -> `[B, 2]`.
    pub fn itm_logits(&self, fused_cls: &Tensor) -> Result<Tensor> {
        Ok(self.out(self.itm_head.forward(fused_cls)?)?)
    }

    /// MLM logits of the online text encoder.
    ///
    /// # Shapes
    /// `fused`: `[.., H]` -> `[.., vocab_size]`.
    pub fn mlm_logits(&self, fused: &Tensor) -> Result<Tensor> {
        self.text_encoder.mlm_logits(fused)
    }

    /// [`AlbefModel::encode_image`] of the momentum twin; outputs carry no gradient.
    pub fn encode_image_m(&self, images: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let tokens = self.visual_encoder_m.forward(&images.detach(), train)?;
        let feat = nn::l2_normalize(&self.out(self.vision_proj_m.forward(&cls(&tokens)?)?)?)?;
        Ok((tokens.detach(), feat.detach()))
    }

    /// [`AlbefModel::encode_text`] of the momentum twin; outputs carry no gradient.
    pub fn encode_text_m(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let states = self
            .text_encoder_m
            .forward_text(input_ids, attention_mask, train)?;
        let feat = nn::l2_normalize(&self.out(self.text_proj_m.forward(&cls(&states)?)?)?)?;
        Ok((states.detach(), feat.detach()))
    }

    /// [`AlbefModel::fuse`] of the momentum twin; the output carries no gradient.
    pub fn fuse_m(
        &self,
        text: FusionText,
        attention_mask: &Tensor,
        image_tokens: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let fused = self.text_encoder_m.forward_fusion(
            text,
            attention_mask,
            &image_tokens.detach(),
            train,
        )?;
        Ok(fused.detach())
    }

    /// MLM logits of the momentum twin (the distillation teacher); no gradient.
    pub fn mlm_logits_m(&self, fused_m: &Tensor) -> Result<Tensor> {
        Ok(self.text_encoder_m.mlm_logits(&fused_m.detach())?.detach())
    }

    /// The image-feature queue, one normalised feature per column.
    ///
    /// # Shapes
    /// `[embed_dim, queue_size]`.
    pub fn image_queue(&self) -> Tensor {
        self.image_queue.as_detached_tensor()
    }

    /// The text-feature queue, one normalised feature per column.
    ///
    /// # Shapes
    /// `[embed_dim, queue_size]`.
    pub fn text_queue(&self) -> Tensor {
        self.text_queue.as_detached_tensor()
    }

    /// Image ids of the queued features (-100 = empty slot).
    ///
    /// # Shapes
    /// `[1, queue_size]`, i64.
    pub fn idx_queue(&self) -> Tensor {
        self.idx_queue.as_detached_tensor()
    }

    /// Column the next [`AlbefModel::enqueue`] writes to.
    pub fn queue_ptr(&self) -> Result<usize> {
        let ptr = self.queue_ptr.as_detached_tensor().to_vec1::<i64>()?[0];
        usize::try_from(ptr)
            .ok()
            .filter(|p| *p < self.cfg.queue_size)
            .ok_or_else(|| {
                ModelError::param(
                    "queue_ptr",
                    format!("{ptr} is outside the queue of {}", self.cfg.queue_size),
                )
            })
    }

    /// Writes features (already gathered over ranks) into the queues FIFO from
    /// `queue_ptr`, wrapping around the end: any queue size works with any batch size.
    /// A batch larger than the queue keeps its last `queue_size` rows.
    ///
    /// # Shapes
    /// `image_feats`, `text_feats`: `[N, embed_dim]`; `image_ids`: `[N]` (int).
    pub fn enqueue(
        &self,
        image_feats: &Tensor,
        text_feats: &Tensor,
        image_ids: Option<&Tensor>,
    ) -> Result<()> {
        let q = self.cfg.queue_size;
        let (n, e) = image_feats.dims2()?;
        if text_feats.dims() != [n, e] || e != self.cfg.embed_dim {
            return Err(ModelError::input(
                "enqueue",
                format!(
                    "image feats {:?} and text feats {:?} must both be [N, {}]",
                    image_feats.dims(),
                    text_feats.dims(),
                    self.cfg.embed_dim
                ),
            ));
        }
        let keep = n.min(q);
        let skip = n - keep;
        let ptr = self.queue_ptr()?;
        let dtype = self.image_queue.dtype();
        let columns = |t: &Tensor| -> Result<Tensor> {
            Ok(t.detach()
                .narrow(0, skip, keep)?
                .t()?
                .to_dtype(dtype)?
                .contiguous()?)
        };
        write_columns(&self.image_queue, ptr, &columns(image_feats)?)?;
        write_columns(&self.text_queue, ptr, &columns(text_feats)?)?;
        if let Some(ids) = image_ids {
            let ids = ids
                .detach()
                .flatten_all()?
                .narrow(0, skip, keep)?
                .to_dtype(DType::I64)?
                .reshape((1, keep))?;
            write_columns(&self.idx_queue, ptr, &ids)?;
        }
        let next = Tensor::new(&[((ptr + keep) % q) as i64], self.queue_ptr.device())?;
        self.queue_ptr.set(&next)?;
        Ok(())
    }
}

fn as_var(name: &str, t: &Tensor) -> Result<Var> {
    if !t.is_variable() {
        return Err(ModelError::param(
            name,
            "is not a variable: build the model from a VarBuilder over a VarMap to train it",
        ));
    }
    Ok(Var::from_tensor(t)?)
}

fn pair_with_online(
    momentum: Vec<(String, Tensor)>,
    online: &[(String, Tensor)],
) -> Result<Vec<MomentumPair>> {
    momentum
        .into_iter()
        .map(|(name, t)| {
            let online_name = MOMENTUM_ROOTS
                .iter()
                .find_map(|(m, o)| name.strip_prefix(m).map(|rest| format!("{o}{rest}")))
                .ok_or_else(|| ModelError::param(&name, "not under a momentum root"))?;
            let (_, online_t) =
                online
                    .iter()
                    .find(|(n, _)| *n == online_name)
                    .ok_or_else(|| {
                        ModelError::param(&name, format!("no online twin `{online_name}`"))
                    })?;
            if online_t.dims() != t.dims() {
                return Err(ModelError::param(
                    &name,
                    format!(
                        "shape {:?} but its twin has {:?}",
                        t.dims(),
                        online_t.dims()
                    ),
                ));
            }
            Ok(MomentumPair {
                name,
                online: online_t.clone(),
                momentum: t,
            })
        })
        .collect()
}

/// Writes `src` (`[rows, k]`) into columns `ptr..ptr + k` of `var`, wrapping around.
fn write_columns(var: &Var, ptr: usize, src: &Tensor) -> Result<()> {
    let (rows, q) = var.dims2()?;
    let k = src.dim(1)?;
    let first = k.min(q - ptr);
    let mut t = var
        .as_detached_tensor()
        .slice_assign(&[0..rows, ptr..ptr + first], &src.narrow(1, 0, first)?)?;
    if first < k {
        let rest = src.narrow(1, first, k - first)?.contiguous()?;
        t = t.slice_assign(&[0..rows, 0..k - first], &rest)?;
    }
    var.set(&t)?;
    Ok(())
}

/// Each column divided by its L2 norm.
fn normalize_columns(t: &Tensor) -> Result<Tensor> {
    Ok(nn::l2_normalize(&t.t()?)?.t()?.contiguous()?)
}

/// The [CLS] row of token states.
///
/// # Shapes
/// `[B, L, H]` -> `[B, H]`.
pub fn cls(states: &Tensor) -> Result<Tensor> {
    Ok(states.i((.., 0))?)
}

/// The parts of [`smoke_loss`].
#[derive(Debug, Clone)]
pub struct SmokeLoss {
    pub total: Tensor,
    pub itc: Tensor,
    pub itm: Tensor,
    pub mlm: Tensor,
}

/// A model-only check, not the training objective: a loss in the shape of ALBEF's
/// (ITC over in-batch pairs + queue with the learned temperature, ITM on the fused [CLS]
/// of positives and rolled-by-one negatives, MLM at every third real token) that reaches
/// every trainable parameter, so a backward pass through it shows any op without a
/// gradient. No momentum distillation, no hard-negative sampling, no random masking.
/// Shared by the gradient tests and `vlp bench step`.
///
/// # Shapes
/// `images`: `[B, 3, S, S]`, `input_ids`, `attention_mask`: `[B, L]` with `B >= 2`.
pub fn smoke_loss(
    model: &AlbefModel,
    images: &Tensor,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    train: bool,
) -> Result<SmokeLoss> {
    let text_cfg = &model.config().text;
    let (b, l) = input_ids.dims2()?;
    if b < 2 {
        return Err(ModelError::input(
            "input_ids",
            "the smoke loss needs a batch of 2 or more",
        ));
    }
    let dev = input_ids.device();
    let (image_tokens, image_feat) = model.encode_image(images, train)?;
    let (text_states, text_feat) = model.encode_text(input_ids, attention_mask, train)?;

    // ITC: positives on the diagonal, the queue as extra negatives.
    let temp = model.temp();
    let text_all = Tensor::cat(&[&text_feat.t()?, &model.text_queue()], 1)?;
    let image_all = Tensor::cat(&[&image_feat.t()?, &model.image_queue()], 1)?;
    let sim_i2t = image_feat.matmul(&text_all)?.broadcast_div(temp)?;
    let sim_t2i = text_feat.matmul(&image_all)?.broadcast_div(temp)?;
    let diagonal = Tensor::arange(0u32, b as u32, dev)?;
    let itc = ((cross_entropy(&sim_i2t, &diagonal)? + cross_entropy(&sim_t2i, &diagonal)?)? * 0.5)?;

    // ITM: [positives; (text, next image); (next text, image)].
    let roll: Vec<u32> = (0..b as u32).map(|i| (i + 1) % b as u32).collect();
    let roll = Tensor::new(roll.as_slice(), dev)?;
    let image_in = Tensor::cat(
        &[
            &image_tokens,
            &image_tokens.index_select(&roll, 0)?,
            &image_tokens,
        ],
        0,
    )?;
    let mask_in = Tensor::cat(
        &[
            attention_mask,
            attention_mask,
            &attention_mask.index_select(&roll, 0)?,
        ],
        0,
    )?;
    let text_in = FusionInput::for_layout(
        text_cfg,
        || Ok(input_ids.clone()),
        || Ok(text_states.clone()),
    )?
    .map(|t| Tensor::cat(&[t, t, &t.index_select(&roll, 0)?], 0))?;
    let fused = model.fuse(text_in.text(), &mask_in, &image_in, train)?;
    let itm_labels: Vec<u32> = (0..3 * b).map(|i| u32::from(i < b)).collect();
    let itm_labels = Tensor::new(itm_labels.as_slice(), dev)?;
    let itm = cross_entropy(&model.itm_logits(&cls(&fused)?)?, &itm_labels)?;

    // MLM at fixed positions: every third real token that is not [CLS]/[SEP]/[PAD].
    let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let keep = attention_mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let (mut masked, mut positions, mut labels) = (ids.clone(), Vec::new(), Vec::new());
    for (r, row) in ids.iter().enumerate() {
        for (p, &id) in row.iter().enumerate() {
            let special = [text_cfg.cls_id, text_cfg.sep_id, text_cfg.pad_id].contains(&id);
            if p % 3 == 1 && keep[r][p] != 0 && !special {
                masked[r][p] = text_cfg.mask_id;
                positions.push((r * l + p) as u32);
                labels.push(id);
            }
        }
    }
    let mlm = if positions.is_empty() || !model.text_encoder().has_mlm_head() {
        temp.zeros_like()?
    } else {
        let masked = Tensor::new(masked, dev)?;
        let text_in = FusionInput::for_layout(
            text_cfg,
            || Ok(masked.clone()),
            || Ok(model.encode_text(&masked, attention_mask, train)?.0),
        )?;
        let fused = model.fuse(text_in.text(), attention_mask, &image_tokens, train)?;
        let h = fused.dim(2)?;
        let picked = fused
            .reshape((b * l, h))?
            .index_select(&Tensor::new(positions.as_slice(), dev)?, 0)?;
        cross_entropy(
            &model.mlm_logits(&picked)?,
            &Tensor::new(labels.as_slice(), dev)?,
        )?
    };

    let total = ((&itc + &itm)? + &mlm)?;
    Ok(SmokeLoss {
        total,
        itc,
        itm,
        mlm,
    })
}

/// Mean cross-entropy of `logits` `[N, C]` against class indices `labels` `[N]` (u32).
fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let picked = nn::log_softmax(logits)?.gather(&labels.reshape((n, 1))?, D::Minus1)?;
    Ok((picked.sum_all()? * (-1.0 / n as f64))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::tests::attention_mask_from_ids;
    use crate::config::Layout;
    use candle_nn::VarMap;
    use vlp_core::device::test_device;

    pub(crate) fn micro() -> AlbefConfig {
        crate::test_support::micro_config()
    }

    fn build(cfg: &AlbefConfig, dtype: DType) -> Result<(VarMap, AlbefModel)> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, dtype, &test_device());
        let model = AlbefModel::new(cfg, vb)?;
        model.copy_params_to_momentum()?;
        Ok((varmap, model))
    }

    /// Images, ids (with padding) and mask for a batch of 3.
    #[test]
    fn the_attention_backend_is_a_runtime_choice_with_the_same_results() -> Result<()> {
        let cfg = micro();
        let (_, model) = build(&cfg, DType::F32)?;
        assert_eq!(model.attention(), AttentionBackend::Fused);
        let generic = model.clone().with_attention(AttentionBackend::Generic);
        assert_eq!(generic.attention(), AttentionBackend::Generic);
        let (images, ids, mask) = batch(&cfg, DType::F32)?;
        let run = |m: &AlbefModel| -> Result<Vec<Tensor>> {
            let (tokens, image_feat) = m.encode_image(&images, false)?;
            let (states, text_feat) = m.encode_text(&ids, &mask, false)?;
            let fused = m.fuse(FusionText::States(&states), &mask, &tokens, false)?;
            let (tokens_m, _) = m.encode_image_m(&images, false)?;
            Ok(vec![image_feat, text_feat, fused, tokens_m])
        };
        for (a, b) in run(&model)?.iter().zip(run(&generic)?.iter()) {
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "{d}");
        }
        Ok(())
    }

    /// Mixed precision: bf16 activations give the f32 loss to within bf16 rounding, the
    /// gradients land on the f32 parameters as f32 and point the same way, and what
    /// leaves the model (features, logits) is f32.
    #[test]
    fn bf16_compute_keeps_f32_weights_and_agrees_with_f32() -> Result<()> {
        let cfg = micro();
        let (varmap, model) = build(&cfg, DType::F32)?;
        let mixed = model.clone().with_compute_dtype(DType::BF16);
        let (images, ids, mask) = batch(&cfg, DType::F32)?;
        let loss32 = smoke_loss(&model, &images, &ids, &mask, false)?;
        let loss16 = smoke_loss(&mixed, &images, &ids, &mask, false)?;
        let (_, feat) = mixed.encode_image(&images, false)?;
        assert_eq!(feat.dtype(), DType::F32);
        assert_eq!(loss16.total.dtype(), DType::F32);
        for (a, b) in [
            (&loss32.itc, &loss16.itc),
            (&loss32.itm, &loss16.itm),
            (&loss32.mlm, &loss16.mlm),
        ] {
            let (a, b) = (a.to_scalar::<f32>()?, b.to_scalar::<f32>()?);
            // bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few through the net.
            assert!(
                (a - b).abs() <= 0.03 * a.abs().max(1.0),
                "f32 {a} vs bf16 {b}"
            );
        }
        let g32 = loss32.total.backward()?;
        let g16 = loss16.total.backward()?;
        let vars = varmap.all_vars();
        let (mut dot, mut n32, mut n16) = (0f64, 0f64, 0f64);
        for v in &vars {
            let (Some(a), Some(b)) = (g32.get(v.as_tensor()), g16.get(v.as_tensor())) else {
                continue;
            };
            assert_eq!(
                b.dtype(),
                DType::F32,
                "gradients reach the master weights in f32"
            );
            let (a, b) = (a.flatten_all()?, b.flatten_all()?);
            dot += (&a * &b)?.sum_all()?.to_scalar::<f32>()? as f64;
            n32 += a.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            n16 += b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let cosine = dot / (n32.sqrt() * n16.sqrt());
        assert!(cosine > 0.99, "gradient cosine {cosine}");
        Ok(())
    }

    /// Activation checkpointing changes memory, not maths: with the same dropout seed
    /// the loss and every gradient equal those of the plain model (dropout masks are
    /// replayed in the recomputation).
    #[test]
    fn grad_checkpointing_gives_the_same_loss_and_gradients() -> Result<()> {
        let mut cfg = micro();
        cfg.text.dropout = 0.1;
        let (varmap, model) = build(&cfg, DType::F32)?;
        let ckpt = model.clone().with_grad_checkpoint(true);
        let (images, ids, mask) = batch(&cfg, DType::F32)?;
        let run = |m: &AlbefModel| -> Result<(f32, candle_core::backprop::GradStore)> {
            let _seed = crate::nn::seed_dropout(3);
            let loss = smoke_loss(m, &images, &ids, &mask, true)?;
            let store = crate::recompute::backward(&loss.total)?;
            Ok((loss.total.to_scalar::<f32>()?, store))
        };
        let (plain_loss, plain) = run(&model)?;
        let (ckpt_loss, checked) = run(&ckpt)?;
        assert_eq!(plain_loss, ckpt_loss);
        let mut compared = 0;
        for v in varmap.all_vars() {
            let (Some(a), Some(b)) = (plain.get(v.as_tensor()), checked.get(v.as_tensor())) else {
                assert!(plain.get(v.as_tensor()).is_none() && checked.get(v.as_tensor()).is_none());
                continue;
            };
            let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = a.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            assert!(d <= 1e-5 * scale, "gradient differs by {d} (scale {scale})");
            compared += 1;
        }
        assert!(compared > 50, "{compared} gradients compared");
        Ok(())
    }

    fn batch(cfg: &AlbefConfig, dtype: DType) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = test_device();
        let s = cfg.vision.image_size;
        let images = Tensor::randn(0f32, 1.0, (3, 3, s, s), &dev)?.to_dtype(dtype)?;
        let ids = Tensor::new(
            &[
                [2u32, 17, 9, 33, 12, 3, 0, 0],
                [2, 5, 21, 3, 0, 0, 0, 0],
                [2, 40, 41, 42, 43, 44, 45, 3],
            ],
            &dev,
        )?;
        let mask = attention_mask_from_ids(&ids, cfg.text.pad_id)?;
        Ok((images, ids, mask))
    }

    /// Normal values from a fixed seed (splitmix64 + Box-Muller), f64 on the CPU.
    fn fixed_normal(seed: u64, dims: &[usize], mean: f64, std: f64) -> Result<Tensor> {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
        let mut uniform = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let n: usize = dims.iter().product();
        let values: Vec<f64> = (0..n)
            .map(|_| {
                let (u, v) = (uniform().max(1e-300), uniform());
                mean + std * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
            })
            .collect();
        Ok(Tensor::from_vec(values, dims, &test_device())?)
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn every_trainable_parameter_gets_a_gradient() -> Result<()> {
        let cfg = micro();
        let (varmap, model) = build(&cfg, DType::F32)?;
        let (images, ids, mask) = batch(&cfg, DType::F32)?;
        let loss = smoke_loss(&model, &images, &ids, &mask, true)?;
        for part in [&loss.itc, &loss.itm, &loss.mlm] {
            let v = part.to_scalar::<f32>()?;
            assert!(v.is_finite() && v > 0.0, "{v}");
        }
        let grads = loss.total.backward()?;

        let trainable = model.trainable_vars()?;
        let mut checked = 0;
        for (name, var) in &trainable {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{name} gets no gradient"));
            let (gmax, wmax) = (max_abs(g), max_abs(var));
            assert!(gmax.is_finite(), "{name}: gradient {gmax}");
            if name.ends_with("self.key.bias") {
                // A key bias adds q.b to every score of a row; softmax ignores such a
                // shift, so its exact gradient is zero (what remains is rounding).
                assert!(gmax < 1e-6, "{name}: {gmax}");
            } else {
                assert!(gmax > 0.0, "{name}: zero gradient (weights up to {wmax})");
                checked += 1;
            }
        }
        assert!(checked > 50, "only {checked} parameters checked");

        // The twin and the queues are variables of the VarMap, never in the trainable list,
        // and get no gradient.
        let names = model.trainable_names();
        let all = varmap.data().lock().unwrap();
        for (name, var) in all.iter() {
            let twin = MOMENTUM_ROOTS
                .iter()
                .any(|(m, _)| name.starts_with(&format!("{m}.")));
            let state = STATE_NAMES.contains(&name.as_str());
            assert_eq!(names.contains(&name.as_str()), !twin && !state, "{name}");
            if twin || state {
                assert!(grads.get(var).is_none(), "{name} got a gradient");
            }
        }
        assert_eq!(
            names.len() + model.momentum_names().len() + STATE_NAMES.len(),
            all.len()
        );
        assert!(names.contains(&"temp"));
        assert!(!all.contains_key("text_encoder.cls.predictions.decoder.weight"));
        Ok(())
    }

    /// Central differences in f64 against autograd, for a handful of parameters of
    /// different kinds. Weights are re-drawn at a larger scale than the 0.02 init so every
    /// gradient is far from rounding noise.
    #[test]
    fn finite_differences_match_autograd_in_f64() -> Result<()> {
        let cfg = micro();
        let (varmap, model) = build(&cfg, DType::F64)?;
        let dev = test_device();
        // Fixed values (candle's CPU generator cannot be seeded), so the test is exact.
        let mut names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        names.sort();
        for (seed, name) in names.iter().enumerate() {
            let var = varmap.data().lock().unwrap()[name].clone();
            let (mean, std) = if name == "temp" {
                (0.1, 0.0)
            } else if name.ends_with("norm1.weight")
                || name.ends_with("norm2.weight")
                || name.ends_with("norm.weight")
                || name.ends_with("LayerNorm.weight")
            {
                (1.0, 0.2)
            } else {
                (0.0, 0.3)
            };
            if var.dtype() == DType::F64 {
                var.set(&fixed_normal(seed as u64, var.dims(), mean, std)?)?;
            }
        }
        let (_, ids, mask) = batch(&cfg, DType::F64)?;
        let images = fixed_normal(1000, &[3, 3, 32, 32], 0.0, 1.0)?;
        let loss_at = || -> Result<f64> {
            Ok(smoke_loss(&model, &images, &ids, &mask, false)?
                .total
                .to_scalar::<f64>()?)
        };
        let grads = smoke_loss(&model, &images, &ids, &mask, false)?
            .total
            .backward()?;
        let vars = varmap.data().lock().unwrap().clone();

        // (parameter, flat index of the entry to move)
        let probes: [(&str, usize); 7] = [
            (
                "text_encoder.bert.encoder.layer.0.attention.output.LayerNorm.weight",
                5,
            ),
            ("visual_encoder.blocks.1.norm1.weight", 7),
            ("visual_encoder.blocks.0.attn.qkv.weight", 3 * 32 + 7),
            (
                "visual_encoder.blocks.0.attn.qkv.weight",
                (32 + 11) * 32 + 2,
            ),
            (
                "text_encoder.bert.encoder.layer.1.crossattention.self.key.weight",
                2 * 32 + 9,
            ),
            ("visual_encoder.pos_embed", 3 * 32 + 4),
            ("temp", 0),
        ];
        let h = 1e-6;
        let check = |what: String, var: &Var, direction: &Tensor| -> Result<()> {
            let base = var.as_detached_tensor().copy()?;
            let autograd = (grads.get(var).expect("gradient") * direction)?
                .sum_all()?
                .to_scalar::<f64>()?;
            var.set(&(&base + (direction * h)?)?)?;
            let up = loss_at()?;
            var.set(&(&base - (direction * h)?)?)?;
            let down = loss_at()?;
            var.set(&base)?;
            let numeric = (up - down) / (2.0 * h);
            let rel = (numeric - autograd).abs() / numeric.abs().max(autograd.abs());
            println!("{what}: numeric {numeric:e} autograd {autograd:e} rel {rel:e}");
            assert!(
                rel < 1e-5,
                "{what}: numeric {numeric:e} vs autograd {autograd:e} (rel {rel:e})"
            );
            assert!(
                autograd.abs() > 1e-6,
                "{what}: gradient {autograd:e} too small to test"
            );
            Ok(())
        };
        for (name, index) in probes {
            let var = &vars[name];
            let mut e = vec![0.0f64; var.elem_count()];
            e[index] = 1.0;
            let direction = Tensor::from_vec(e, var.shape(), &dev)?;
            check(format!("{name}[{index}]"), var, &direction)?;
        }
        // A whole word-embedding row (token 17, used once), along a random direction.
        let name = "text_encoder.bert.embeddings.word_embeddings.weight";
        let var = &vars[name];
        let row = fixed_normal(2000, &[1, 32], 0.0, 1.0)?;
        let direction =
            Tensor::zeros(var.shape(), DType::F64, &dev)?.slice_assign(&[17..18, 0..32], &row)?;
        check(format!("{name}[17, :]"), var, &direction)?;
        Ok(())
    }

    /// Runs training steps and reads this process's resident memory: after the first
    /// steps, nothing may accumulate (no graph or gradient kept alive between steps).
    /// Run in a fresh process by [`resident_memory_stays_flat_across_steps`] so that
    /// other tests' allocations do not blur the numbers.
    #[test]
    #[ignore = "run in a child process by resident_memory_stays_flat_across_steps"]
    fn resident_memory_child() {
        let cfg = AlbefConfig::preset("tiny").unwrap();
        let (_varmap, model) = build(&cfg, DType::F32).unwrap();
        let vars = model.trainable_vars().unwrap();
        let dev = test_device();
        let b = 8;
        let images = Tensor::randn(0f32, 1.0, (b, 3, 64, 64), &dev).unwrap();
        let ids = Tensor::rand(5f32, 1999.0, (b, 20), &dev)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap();
        let mask = Tensor::ones((b, 20), DType::U32, &dev).unwrap();
        let rss_mb = || {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: f64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096.0 / (1024.0 * 1024.0)
        };
        let mut at = Vec::new();
        for step in 1..=30 {
            model.clamp_temp().unwrap();
            model.momentum_update(0.995).unwrap();
            let (_, image_feat_m) = model.encode_image_m(&images, true).unwrap();
            let (_, text_feat_m) = model.encode_text_m(&ids, &mask, true).unwrap();
            let loss = smoke_loss(&model, &images, &ids, &mask, true).unwrap();
            let grads = loss.total.backward().unwrap();
            for (_, var) in &vars {
                let g = grads.get(var).unwrap();
                var.set(&(var.as_tensor() - (g * 1e-4).unwrap()).unwrap())
                    .unwrap();
            }
            model.enqueue(&image_feat_m, &text_feat_m, None).unwrap();
            if step == 10 || step == 30 {
                at.push(rss_mb());
            }
        }
        let growth = at[1] - at[0];
        println!(
            "rss after step 10: {:.1} MB, after step 30: {:.1} MB",
            at[0], at[1]
        );
        // A graph kept alive from step to step grows RSS by ~135 MB per step here (2.7 GB
        // over 20 steps); the allocator settling moves it by up to ~10 MB. The bound sits
        // far from both.
        assert!(
            growth < 64.0,
            "resident memory grew {growth:.1} MB over 20 steps"
        );
    }

    #[test]
    fn resident_memory_stays_flat_across_steps() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            // candle's elementwise thread pool spin-waits; on a busy machine that costs
            // minutes, and this test is about memory, not speed.
            .env("CANDLE_NUM_THREADS", "1")
            .args([
                "--exact",
                "albef::tests::resident_memory_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("1 passed"),
            "the child test did not run:\n{text}"
        );
    }

    #[test]
    fn momentum_update_is_an_ema_of_online_parameters() -> Result<()> {
        let cfg = micro();
        let (varmap, model) = build(&cfg, DType::F64)?;
        let vars = varmap.data().lock().unwrap().clone();
        let online = &vars["text_proj.weight"];
        let twin = &vars["text_proj_m.weight"];
        let dev = test_device();
        assert_eq!(max_abs(&(online.as_tensor() - twin.as_tensor())?), 0.0);
        let p = Tensor::randn(0f64, 1.0, online.shape(), &dev)?;
        let p_m = Tensor::randn(0f64, 1.0, online.shape(), &dev)?;
        online.set(&p)?;
        twin.set(&p_m)?;
        model.momentum_update(0.9)?;
        let expect = ((&p_m * 0.9)? + (&p * 0.1)?)?;
        assert!(max_abs(&(twin.as_tensor() - expect)?) < 1e-15);
        assert_eq!(
            max_abs(&(online.as_tensor() - &p)?),
            0.0,
            "online untouched"
        );
        // The twin's forward sees the update (it holds views of the same storage).
        let (images, _, _) = batch(&cfg, DType::F64)?;
        let (_, before) = model.encode_image_m(&images, false)?;
        vars["vision_proj_m.bias"].set(&Tensor::ones(16, DType::F64, &dev)?)?;
        let (_, after) = model.encode_image_m(&images, false)?;
        assert!(max_abs(&(before - after)?) > 1e-3);
        // Every momentum name has an online twin with the same shape.
        for name in model.momentum_names() {
            let (m, o) = MOMENTUM_ROOTS
                .iter()
                .find(|(m, _)| name.starts_with(m))
                .unwrap();
            let online = name.replacen(m, o, 1);
            assert_eq!(vars[name].dims(), vars[online.as_str()].dims(), "{name}");
        }
        Ok(())
    }

    #[test]
    fn fresh_queues_are_normalised_and_enqueue_wraps_around() -> Result<()> {
        let mut cfg = micro();
        cfg.queue_size = 5;
        let (varmap, model) = build(&cfg, DType::F32)?;
        let dev = test_device();
        for queue in [model.image_queue(), model.text_queue()] {
            assert_eq!(queue.dims(), &[16, 5]);
            let norms = queue.sqr()?.sum(0)?.sqrt()?.to_vec1::<f32>()?;
            for n in norms {
                assert!((n - 1.0).abs() < 1e-5, "{n}");
            }
        }
        assert_eq!(model.idx_queue().to_vec2::<i64>()?, vec![vec![-100i64; 5]]);
        assert_eq!(model.queue_ptr()?, 0);
        let stored = varmap.data().lock().unwrap()["queue_ptr"].dtype();
        assert_eq!(stored, DType::I64);

        // 3 rows at 0..3, then 3 rows at 3, 4 and (wrapping) 0.
        let feats = |start: f32| -> Result<Tensor> {
            let rows: Vec<f32> = (0..3)
                .flat_map(|r| (0..16).map(move |c| start + r as f32 + c as f32 * 0.0))
                .collect();
            Ok(Tensor::from_vec(rows, (3, 16), &dev)?)
        };
        model.enqueue(
            &feats(10.0)?,
            &feats(20.0)?,
            Some(&Tensor::new(&[7i64, 8, 9], &dev)?),
        )?;
        assert_eq!(model.queue_ptr()?, 3);
        model.enqueue(
            &feats(30.0)?,
            &feats(40.0)?,
            Some(&Tensor::new(&[4u32, 5, 6], &dev)?),
        )?;
        assert_eq!(model.queue_ptr()?, 1);
        let first_row = model.image_queue().get(0)?.to_vec1::<f32>()?;
        assert_eq!(first_row, vec![32.0, 11.0, 12.0, 30.0, 31.0]);
        let text_row = model.text_queue().get(15)?.to_vec1::<f32>()?;
        assert_eq!(text_row, vec![42.0, 21.0, 22.0, 40.0, 41.0]);
        assert_eq!(
            model.idx_queue().to_vec2::<i64>()?,
            vec![vec![6i64, 8, 9, 4, 5]]
        );
        // A batch larger than the queue keeps its last rows.
        let big = Tensor::arange(0f32, 7.0, &dev)?
            .reshape((7, 1))?
            .broadcast_as((7, 16))?
            .contiguous()?;
        model.enqueue(&big, &big, None)?;
        assert_eq!(model.queue_ptr()?, 1);
        assert_eq!(
            model.image_queue().get(3)?.to_vec1::<f32>()?,
            vec![6.0, 2.0, 3.0, 4.0, 5.0]
        );
        Ok(())
    }

    #[test]
    fn temp_is_a_scalar_clamped_in_place() -> Result<()> {
        let (varmap, model) = build(&micro(), DType::F32)?;
        assert_eq!(model.temp().dims(), &[] as &[usize]);
        assert!((model.temp().to_scalar::<f32>()? - 0.07).abs() < 1e-7);
        varmap.data().lock().unwrap()["temp"].set(&Tensor::new(2.0f32, &test_device())?)?;
        model.clamp_temp()?;
        assert_eq!(model.temp().to_scalar::<f32>()?, 0.5);
        Ok(())
    }

    #[test]
    fn encoders_and_heads_shapes() -> Result<()> {
        let cfg = micro();
        let (_, model) = build(&cfg, DType::F32)?;
        let (images, ids, mask) = batch(&cfg, DType::F32)?;
        let (tokens, image_feat) = model.encode_image(&images, false)?;
        assert_eq!(tokens.dims(), &[3, 17, 32]);
        assert_eq!(image_feat.dims(), &[3, 16]);
        let norms = image_feat.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()?;
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));
        let (states, text_feat) = model.encode_text(&ids, &mask, false)?;
        assert_eq!(
            (states.dims(), text_feat.dims()),
            (&[3, 8, 32][..], &[3, 16][..])
        );
        let fused = model.fuse(FusionText::States(&states), &mask, &tokens, false)?;
        assert_eq!(model.itm_logits(&cls(&fused)?)?.dims(), &[3, 2]);
        assert_eq!(model.mlm_logits(&fused)?.dims(), &[3, 8, 50]);
        // Right after copy_params_to_momentum the twin computes the same thing.
        let (tokens_m, image_feat_m) = model.encode_image_m(&images, false)?;
        assert!(max_abs(&(&image_feat - image_feat_m)?) < 1e-6);
        let (states_m, _) = model.encode_text_m(&ids, &mask, false)?;
        let fused_m = model.fuse_m(FusionText::States(&states_m), &mask, &tokens_m, false)?;
        assert!(max_abs(&(model.mlm_logits_m(&fused_m)? - model.mlm_logits(&fused)?)?) < 1e-5);
        Ok(())
    }

    #[test]
    fn blip_layout_model_trains_its_cross_attention_everywhere() -> Result<()> {
        let mut cfg = micro();
        cfg.text.layout = Layout::Blip;
        cfg.text.type_vocab_size = 0;
        cfg.text.has_mlm_head = false;
        cfg.text.vocab_size = 52;
        cfg.text.enc_id = Some(51);
        let (_, model) = build(&cfg, DType::F32)?;
        let (images, ids, mask) = batch(&cfg, DType::F32)?;
        let loss = smoke_loss(&model, &images, &ids, &mask, false)?;
        let grads = loss.total.backward()?;
        for (name, var) in model.trainable_vars()? {
            if name.contains("crossattention.self.query.weight") {
                assert!(max_abs(grads.get(&var).expect(&name)) > 0.0, "{name}");
            }
        }
        assert!(model
            .trainable_names()
            .iter()
            .any(|n| n.contains("layer.0.crossattention")));
        Ok(())
    }

    #[test]
    fn fuse_cls_equals_the_cls_row_of_the_full_fusion_in_both_layouts() -> Result<()> {
        for blip in [false, true] {
            let mut cfg = micro();
            if blip {
                cfg.text.layout = Layout::Blip;
                cfg.text.type_vocab_size = 0;
                cfg.text.has_mlm_head = false;
                cfg.text.vocab_size = 52;
                cfg.text.enc_id = Some(51);
            }
            let (_, model) = build(&cfg, DType::F32)?;
            let (images, ids, mask) = batch(&cfg, DType::F32)?;
            let (tokens, _) = model.encode_image(&images, false)?;
            let text = FusionInput::for_layout(
                &cfg.text,
                || Ok(ids.clone()),
                || Ok(model.encode_text(&ids, &mask, false)?.0),
            )?;
            let full = cls(&model.fuse(text.text(), &mask, &tokens, false)?)?;
            let fast = model.fuse_cls(text.text(), &mask, &tokens, false)?;
            assert_eq!(full.dims(), fast.dims());
            assert!(max_abs(&(full - fast)?) < 1e-5, "blip {blip}");
        }
        Ok(())
    }

    #[test]
    fn models_not_built_from_a_varmap_cannot_train() -> Result<()> {
        let cfg = micro();
        let vb = VarBuilder::zeros(DType::F32, &test_device());
        let model = AlbefModel::new(&cfg, vb)?;
        let err = model.trainable_vars().unwrap_err().to_string();
        assert!(err.contains("VarMap"), "{err}");
        assert!(model.momentum_update(0.5).is_err());
        Ok(())
    }
}
