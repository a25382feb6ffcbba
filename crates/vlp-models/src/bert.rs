//! The BERT text encoder and fusion encoder with BERT's MLM head (ALBEF paper §3.1: the
//! first 6 layers of BERT-base encode text, the last 6 add cross-attention to the image
//! tokens; BLIP puts cross-attention in every layer), under `text_encoder`.
//!
//! Parameter names are ALBEF's `xbert` names (`bert.embeddings.*`,
//! `bert.encoder.layer.j.{attention, crossattention, intermediate, output}`,
//! `cls.predictions.*`); layers are post-norm.

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::attention::{
    cross_attention_packed, padding_mask, self_attention_packed, AttentionBackend,
};
use crate::config::{Layout, TextConfig};
use crate::error::{ModelError, Result};
use crate::nn::{self, Dropout, Embedding, LayerNorm, Linear};

/// What a fusion pass starts from.
#[derive(Debug, Clone, Copy)]
pub enum FusionText<'a> {
    /// Hidden states entering the first fusion layer: the output of
    /// [`BertModel::forward_text`] for ALBEF (layers `fusion_layer..`); for BLIP, where
    /// fusion starts at layer 0, the embeddings' output.
    States(&'a Tensor),
    /// Token ids: embed them and run every layer, with cross-attention where the layer has
    /// it (ALBEF's `multi_modal` mode; BLIP's image-grounded pass, `[ENC]` first).
    Ids(&'a Tensor),
}

/// A caption batch ready for the fusion pass of its layout; owns its tensor.
#[derive(Debug, Clone)]
pub enum FusionInput {
    /// ALBEF: the text encoder's output states.
    States(Tensor),
    /// BLIP: the ids, with `[ENC]` in place of `[CLS]` where the config has one.
    Ids(Tensor),
}

impl FusionInput {
    /// The one place that decides, by layout, where the fusion pass of a caption batch
    /// starts: ALBEF continues from the text encoder's `states`, BLIP re-embeds the `ids`
    /// with `[ENC]` first. Only the closure the layout needs runs, so callers pass the
    /// expensive side lazily.
    ///
    /// # Shapes
    /// `ids()`: `[B, L]`, `states()`: `[B, L, H]`.
    pub fn for_layout(
        cfg: &TextConfig,
        ids: impl FnOnce() -> Result<Tensor>,
        states: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Self> {
        Ok(if Self::reads_ids(cfg) {
            FusionInput::Ids(with_enc_token(&ids()?, cfg.enc_id)?)
        } else {
            FusionInput::States(states()?)
        })
    }

    /// Whether [`FusionInput::for_layout`] takes the ids (BLIP) rather than the text
    /// encoder's states (ALBEF): what a caller that caches caption batches must keep.
    pub fn reads_ids(cfg: &TextConfig) -> bool {
        match cfg.layout {
            Layout::Albef { .. } => false,
            Layout::Blip => true,
        }
    }

    /// The same input with `f` applied to its tensor (batch rearrangements: `cat`,
    /// `index_select` along dimension 0).
    pub fn map(&self, f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        Ok(match self {
            FusionInput::States(t) => FusionInput::States(f(t)?),
            FusionInput::Ids(t) => FusionInput::Ids(f(t)?),
        })
    }

    /// The borrowed form the fusion passes take.
    pub fn text(&self) -> FusionText<'_> {
        match self {
            FusionInput::States(t) => FusionText::States(t),
            FusionInput::Ids(t) => FusionText::Ids(t),
        }
    }
}

/// BLIP's image-grounded input: `[ENC]` in place of the first token, when the config has one.
fn with_enc_token(input_ids: &Tensor, enc_id: Option<u32>) -> Result<Tensor> {
    let Some(enc) = enc_id else {
        return Ok(input_ids.clone());
    };
    let (b, l) = input_ids.dims2()?;
    let first = Tensor::full(enc, (b, 1), input_ids.device())?.to_dtype(input_ids.dtype())?;
    Ok(Tensor::cat(&[&first, &input_ids.narrow(1, 1, l - 1)?], 1)?)
}

/// Self- or cross-attention with its output sub-layer: `LayerNorm(x + dropout(dense(attn)))`.
#[derive(Debug, Clone)]
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
    dropout: Dropout,
}

impl BertAttention {
    /// `vb` is `attention` or `crossattention`; keys/values come from `kv_dim`-wide states.
    fn new(cfg: &TextConfig, kv_dim: usize, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden;
        let s = vb.pp("self");
        let o = vb.pp("output");
        Ok(Self {
            query: Linear::load(s.pp("query"), h, h, true)?,
            key: Linear::load(s.pp("key"), kv_dim, h, true)?,
            value: Linear::load(s.pp("value"), kv_dim, h, true)?,
            dense: Linear::load(o.pp("dense"), h, h, true)?,
            norm: LayerNorm::load(o.pp("LayerNorm"), h, cfg.eps)?,
            heads: cfg.heads,
            dropout: Dropout::new(cfg.dropout),
        })
    }

    /// `context` = `None` for self-attention, the image tokens for cross-attention.
    fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        mask: Option<&Tensor>,
        train: bool,
        backend: AttentionBackend,
    ) -> Result<Tensor> {
        // The projections run as one packed linear (weights concatenated, a small copy):
        // one product and one activation gradient instead of three.
        let p = self.dropout.active_p(train);
        let a = match context {
            None => {
                let qkv = packed_linear(x, &[&self.query, &self.key, &self.value])?;
                self_attention_packed(&qkv, self.heads, mask, p, backend)?
            }
            Some(source) => {
                let mut kv = packed_linear(source, &[&self.key, &self.value])?;
                // One image for many texts (retrieval re-ranking): its keys and values
                // are computed once and read by every row (a stride-0 view, no copy).
                let n = x.dim(0)?;
                if kv.dim(0)? == 1 && n > 1 {
                    let (_, l, c) = kv.dims3()?;
                    kv = kv.broadcast_as((n, l, c))?;
                }
                cross_attention_packed(&self.query.forward(x)?, &kv, self.heads, mask, p, backend)?
            }
        };
        let out = self.dropout.forward(&self.dense.forward(&a)?, train)?;
        Ok(self.norm.forward(&(out + x)?)?)
    }
}

/// `x` through several linears of one input width at once, outputs side by side along
/// the last dimension.
fn packed_linear(x: &Tensor, parts: &[&Linear]) -> Result<Tensor> {
    let weights: Vec<&Tensor> = parts.iter().map(|l| l.weight()).collect();
    let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias()).collect();
    let weight = Tensor::cat(&weights, 0)?;
    let bias = biases.map(|b| Tensor::cat(&b, 0)).transpose()?;
    Ok(nn::linear(x, &weight, bias.as_ref())?)
}

#[derive(Debug, Clone)]
struct BertLayer {
    attention: BertAttention,
    crossattention: Option<BertAttention>,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    dropout: Dropout,
}

impl BertLayer {
    fn new(cfg: &TextConfig, cross_kv_dim: Option<usize>, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden;
        Ok(Self {
            attention: BertAttention::new(cfg, h, vb.pp("attention"))?,
            crossattention: cross_kv_dim
                .map(|kv| BertAttention::new(cfg, kv, vb.pp("crossattention")))
                .transpose()?,
            intermediate: Linear::load(
                vb.pp("intermediate").pp("dense"),
                h,
                cfg.intermediate,
                true,
            )?,
            output: Linear::load(vb.pp("output").pp("dense"), cfg.intermediate, h, true)?,
            output_norm: LayerNorm::load(vb.pp("output").pp("LayerNorm"), h, cfg.eps)?,
            dropout: Dropout::new(cfg.dropout),
        })
    }

    /// `image` = `None` skips the cross-attention (text-only pass).
    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        image: Option<&Tensor>,
        train: bool,
        backend: AttentionBackend,
    ) -> Result<Tensor> {
        let x = self
            .attention
            .forward(x, None, Some(mask), train, backend)?;
        self.after_self_attention(x, image, train, backend)
    }

    /// [`BertLayer::forward`] for the first `rows` positions only: their queries attend
    /// to every position's keys and values, and nothing else is computed for the rest.
    /// The output is exactly the first `rows` of [`BertLayer::forward`]'s.
    fn forward_first(
        &self,
        x: &Tensor,
        rows: usize,
        mask: &Tensor,
        image: Option<&Tensor>,
        train: bool,
        backend: AttentionBackend,
    ) -> Result<Tensor> {
        let xq = x.narrow(1, 0, rows)?;
        let x = self
            .attention
            .forward(&xq, Some(x), Some(mask), train, backend)?;
        self.after_self_attention(x, image, train, backend)
    }

    fn after_self_attention(
        &self,
        mut x: Tensor,
        image: Option<&Tensor>,
        train: bool,
        backend: AttentionBackend,
    ) -> Result<Tensor> {
        if let (Some(cross), Some(image)) = (&self.crossattention, image) {
            // The image mask is all ones: no additive mask at all.
            x = cross.forward(&x, Some(image), None, train, backend)?;
        }
        let h = self.intermediate.forward_gelu(&x)?;
        let out = self.dropout.forward(&self.output.forward(&h)?, train)?;
        Ok(self.output_norm.forward(&(out + x)?)?)
    }
}

#[derive(Debug, Clone)]
struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    token_type: Option<Embedding>,
    norm: LayerNorm,
    dropout: Dropout,
    pad_id: u32,
}

impl BertEmbeddings {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden;
        Ok(Self {
            word: Embedding::load(vb.pp("word_embeddings"), cfg.vocab_size, h)?,
            position: Embedding::load(vb.pp("position_embeddings"), cfg.max_positions, h)?,
            token_type: (cfg.type_vocab_size > 0)
                .then(|| Embedding::load(vb.pp("token_type_embeddings"), cfg.type_vocab_size, h))
                .transpose()?,
            norm: LayerNorm::load(vb.pp("LayerNorm"), h, cfg.eps)?,
            dropout: Dropout::new(cfg.dropout),
            pad_id: cfg.pad_id,
        })
    }

    /// Word + position (+ token type 0, as ALBEF always passes) -> LayerNorm -> dropout.
    fn forward(&self, ids: &Tensor, train: bool) -> Result<Tensor> {
        let (_, l) = ids.dims2()?;
        let max = self.position.weight().dim(0)?;
        if l > max {
            return Err(ModelError::input(
                "input_ids",
                format!("{l} tokens exceed max_positions {max}"),
            ));
        }
        let positions = self.position.weight().narrow(0, 0, l)?; // [L, H]
        let mut x = nn::add_broadcast(&self.word_lookup(ids)?, &positions)?;
        if let Some(tt) = &self.token_type {
            x = nn::add_broadcast(&x, &tt.weight().narrow(0, 0, 1)?)?;
        }
        Ok(self.dropout.forward(&self.norm.forward(&x)?, train)?)
    }

    /// Word embeddings of `ids`, where lookups of [PAD] carry no gradient to its row, as
    /// PyTorch's `nn.Embedding(padding_idx=pad)` (BERT's, ALBEF's) does: the same values,
    /// with the pad positions' contribution detached.
    fn word_lookup(&self, ids: &Tensor) -> Result<Tensor> {
        let words = self.word.forward(ids)?;
        let is_pad = ids
            .to_dtype(DType::F32)?
            .eq(f64::from(self.pad_id))?
            .to_dtype(words.dtype())?
            .unsqueeze(candle_core::D::Minus1)?;
        let not_pad = is_pad.affine(-1.0, 1.0)?;
        Ok((words.broadcast_mul(&not_pad)? + words.detach().broadcast_mul(&is_pad)?)?)
    }
}

/// BERT's MLM head: `dense -> GELU -> LayerNorm -> decoder`; the decoder weight is the
/// word-embedding matrix (tied), with its own `bias`.
#[derive(Debug, Clone)]
struct MlmHead {
    dense: Linear,
    norm: LayerNorm,
    bias: Tensor,
}

impl MlmHead {
    fn new(cfg: &TextConfig, vb: VarBuilder) -> Result<Self> {
        let t = vb.pp("transform");
        Ok(Self {
            dense: Linear::load(t.pp("dense"), cfg.hidden, cfg.hidden, true)?,
            norm: LayerNorm::load(t.pp("LayerNorm"), cfg.hidden, cfg.eps)?,
            bias: vb.get_with_hints(cfg.vocab_size, "bias", Init::Const(0.0))?,
        })
    }

    fn forward(&self, states: &Tensor, word_embeddings: &Tensor) -> Result<Tensor> {
        let h = self.norm.forward(&self.dense.forward_gelu(states)?)?;
        Ok(nn::linear(&h, word_embeddings, Some(&self.bias))?)
    }
}

/// The text/fusion BERT with its optional MLM head.
#[derive(Debug, Clone)]
pub struct BertModel {
    cfg: TextConfig,
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    mlm: Option<MlmHead>,
    backend: AttentionBackend,
    /// The dtype activations are computed in (bf16 for mixed precision); `None`: the
    /// parameters' dtype.
    compute: Option<DType>,
    /// Recompute each layer's activations in the backward instead of keeping them.
    grad_checkpoint: bool,
}

impl BertModel {
    /// Loads (or creates) the parameters under `vb`, ALBEF's `text_encoder`: the BERT
    /// under `bert.`, the MLM head (if `cfg.has_mlm_head`) under `cls.predictions.`.
    /// Cross-attention keys/values read `vision_hidden`-wide image tokens.
    pub fn new(cfg: &TextConfig, vision_hidden: usize, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let bert = vb.pp("bert");
        let layers = (0..cfg.layers)
            .map(|j| {
                let cross = cfg.has_cross_attention(j).then_some(vision_hidden);
                BertLayer::new(cfg, cross, bert.pp("encoder").pp("layer").pp(j))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            embeddings: BertEmbeddings::new(cfg, bert.pp("embeddings"))?,
            layers,
            mlm: cfg
                .has_mlm_head
                .then(|| MlmHead::new(cfg, vb.pp("cls").pp("predictions")))
                .transpose()?,
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

    /// Activation checkpointing of every layer in training passes (see `recompute`).
    pub fn with_grad_checkpoint(mut self, on: bool) -> Self {
        self.grad_checkpoint = on;
        self
    }

    /// Computes activations in `dtype` after the embeddings (bf16 for mixed precision);
    /// parameters stay f32, MLM logits come out in the parameters' dtype.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute = Some(dtype);
        self
    }

    /// The attention implementation in use.
    pub fn attention(&self) -> AttentionBackend {
        self.backend
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn has_mlm_head(&self) -> bool {
        self.mlm.is_some()
    }

    /// The word-embedding matrix (also the MLM decoder weight).
    pub fn word_embeddings(&self) -> &Tensor {
        self.embeddings.word.weight()
    }

    /// Embeddings' output, the input of layer 0.
    ///
    /// # Shapes
    /// `input_ids`: `[B, L]` -> `[B, L, H]`.
    pub fn embed(&self, input_ids: &Tensor, train: bool) -> Result<Tensor> {
        self.in_compute(&self.embeddings.forward(input_ids, train)?)
    }

    /// `x` in the dtype activations are computed in (inputs kept elsewhere in f32, such
    /// as an evaluation's stored states, enter a mixed-precision model this way).
    fn in_compute(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.compute {
            Some(dtype) if x.dtype() != dtype => x.to_dtype(dtype)?,
            _ => x.clone(),
        })
    }

    /// The text-only pass: ALBEF layers `[0, fusion_layer)`; BLIP all layers with the
    /// cross-attention skipped.
    ///
    /// # Shapes
    /// `input_ids`, `attention_mask` (1 = token, 0 = pad; any int dtype): `[B, L]` ->
    /// `[B, L, H]`.
    pub fn forward_text(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let x = self.embed(input_ids, train)?;
        let mask = self.key_mask(attention_mask, &x)?;
        self.run_layers(x, &mask, 0..self.cfg.text_layers(), None, train)
    }

    /// The image-grounded pass (see [`FusionText`] for where it starts); layers with
    /// cross-attention attend to all of `image_states`.
    ///
    /// # Shapes
    /// `text`: `[B, L, H]` states or `[B, L]` ids, `attention_mask`: `[B, L]`,
    /// `image_states`: `[B, Li, vision_hidden]`, or `[1, Li, vision_hidden]` for one image
    /// under every text -> `[B, L, H]`.
    pub fn forward_fusion(
        &self,
        text: FusionText,
        attention_mask: &Tensor,
        image_states: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let image_states = &self.in_compute(image_states)?;
        let (x, start, mask) = self.fusion_input(text, attention_mask, image_states, train)?;
        self.run_layers(x, &mask, start..self.cfg.layers, Some(image_states), train)
    }

    /// The fusion layers' input: the hidden states, the first fusion layer, the key mask.
    fn fusion_input(
        &self,
        text: FusionText,
        attention_mask: &Tensor,
        image_states: &Tensor,
        train: bool,
    ) -> Result<(Tensor, usize, Tensor)> {
        let (x, start) = match text {
            FusionText::States(s) => (self.in_compute(s)?, self.cfg.fusion_start()),
            FusionText::Ids(ids) => (self.embed(ids, train)?, 0),
        };
        let (b, _, _) = x.dims3()?;
        if image_states.dim(0)? != b && image_states.dim(0)? != 1 {
            return Err(ModelError::input(
                "image_states",
                format!("batch {} for {b} texts", image_states.dim(0)?),
            ));
        }
        let mask = self.key_mask(attention_mask, &x)?;
        Ok((x, start, mask))
    }

    /// The fusion encoder's [CLS] output only, `[B, H]`: the same values as
    /// `forward_fusion(..)[:, 0]`, with the last layer computed for the [CLS] position
    /// alone (its keys and values still come from every token). What ITM scoring needs.
    pub fn forward_fusion_cls(
        &self,
        text: FusionText,
        attention_mask: &Tensor,
        image_states: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let image_states = &self.in_compute(image_states)?;
        let (x, start, mask) = self.fusion_input(text, attention_mask, image_states, train)?;
        let last = self.cfg.layers;
        if start >= last {
            return Ok(x.narrow(1, 0, 1)?.squeeze(1)?);
        }
        let x = self.run_layers(x, &mask, start..last - 1, Some(image_states), train)?;
        let out = self.layers[last - 1].forward_first(
            &x,
            1,
            &mask,
            Some(image_states),
            train,
            self.backend,
        )?;
        Ok(out.squeeze(1)?)
    }

    /// MLM logits over the vocabulary.
    ///
    /// # Shapes
    /// `states`: `[.., H]` -> `[.., vocab_size]`.
    pub fn mlm_logits(&self, states: &Tensor) -> Result<Tensor> {
        let head = self.mlm.as_ref().ok_or_else(|| {
            ModelError::config("text.has_mlm_head", "this text encoder has no MLM head")
        })?;
        let words = self.word_embeddings();
        Ok(head.forward(states, words)?.to_dtype(words.dtype())?)
    }

    fn key_mask(&self, attention_mask: &Tensor, x: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        if attention_mask.dims() != [b, l] {
            return Err(ModelError::input(
                "attention_mask",
                format!(
                    "shape {:?} for text states {:?}",
                    attention_mask.dims(),
                    x.dims()
                ),
            ));
        }
        Ok(padding_mask(attention_mask, x.dtype())?)
    }

    fn run_layers(
        &self,
        mut x: Tensor,
        mask: &Tensor,
        layers: std::ops::Range<usize>,
        image: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        for layer in &self.layers[layers] {
            x = if self.grad_checkpoint && train {
                let (layer, mask, backend) = (layer.clone(), mask.clone(), self.backend);
                let f: crate::recompute::BlockFn = std::sync::Arc::new(move |x, image| {
                    layer
                        .forward(x, &mask, image, train, backend)
                        .map_err(candle_core::Error::wrap)
                });
                crate::recompute::checkpoint(f, &x, image)?
            } else {
                layer.forward(&x, mask, image, train, self.backend)?
            };
        }
        Ok(x)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;
    use vlp_core::device::test_device;

    /// The attention mask of a padded batch: 1 for tokens, 0 for `pad_id`.
    ///
    /// # Shapes
    /// `[B, L]` ids -> `[B, L]` u32.
    pub(crate) fn attention_mask_from_ids(input_ids: &Tensor, pad_id: u32) -> Result<Tensor> {
        Ok(input_ids.ne(pad_id)?.to_dtype(DType::U32)?)
    }

    /// The text part of `test_support::micro_config` with the given layout.
    pub(crate) fn micro_text(layout: Layout) -> TextConfig {
        TextConfig {
            layout,
            ..crate::test_support::micro_config().text
        }
    }

    fn batch(dev: &Device) -> Result<(Tensor, Tensor)> {
        let ids = Tensor::new(&[[2u32, 7, 9, 11, 3, 0], [2, 5, 3, 0, 0, 0]], dev)?;
        let mask = attention_mask_from_ids(&ids, 0)?;
        Ok((ids, mask))
    }

    /// PyTorch's `padding_idx`: [PAD] lookups add nothing to the [PAD] row's gradient
    /// (the reference gradient norms depend on it); other rows still get theirs.
    #[test]
    fn pad_lookups_give_the_pad_row_no_gradient() -> Result<()> {
        let dev = test_device();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let bert = BertModel::new(&micro_text(Layout::Albef { fusion_layer: 1 }), 32, vb)?;
        let (ids, mask) = batch(&dev)?;
        let states = bert.forward_text(&ids, &mask, false)?;
        let grads = states.sqr()?.sum_all()?.backward()?;
        let g = grads
            .get(bert.word_embeddings())
            .expect("word embeddings get a gradient")
            .to_vec2::<f32>()?;
        assert!(g[0].iter().all(|v| *v == 0.0), "pad row {:?}", &g[0][..4]);
        assert!(g[7].iter().any(|v| *v != 0.0));
        // The values are the plain lookup's.
        let plain = bert.embeddings.word.forward(&ids)?;
        let looked = bert.embeddings.word_lookup(&ids)?;
        assert_eq!(max_abs_diff(&plain, &looked), 0.0);
        Ok(())
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn albef_layout_names_and_shapes() -> Result<()> {
        let dev = test_device();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("text_encoder");
        let cfg = micro_text(Layout::Albef { fusion_layer: 1 });
        let bert = BertModel::new(&cfg, 24, vb)?;
        let (ids, mask) = batch(&dev)?;
        let text = bert.forward_text(&ids, &mask, false)?;
        assert_eq!(text.dims(), &[2, 6, 32]);
        let image = Tensor::randn(0f32, 1.0, (2, 5, 24), &dev)?;
        let fused = bert.forward_fusion(FusionText::States(&text), &mask, &image, false)?;
        assert_eq!(fused.dims(), &[2, 6, 32]);
        assert_eq!(bert.mlm_logits(&fused)?.dims(), &[2, 6, 50]);
        let names = varmap.data().lock().unwrap();
        let key = "text_encoder.bert.encoder.layer.1.crossattention.self.key.weight";
        assert_eq!(names[key].dims(), &[32, 24]);
        assert!(
            !names.contains_key("text_encoder.bert.encoder.layer.0.crossattention.self.key.weight")
        );
        assert!(names.contains_key("text_encoder.cls.predictions.bias"));
        assert!(names.contains_key("text_encoder.cls.predictions.transform.LayerNorm.weight"));
        assert!(!names.contains_key("text_encoder.cls.predictions.decoder.weight"));
        assert!(names.contains_key("text_encoder.bert.embeddings.token_type_embeddings.weight"));
        Ok(())
    }

    #[test]
    fn padded_tokens_do_not_change_real_tokens() -> Result<()> {
        let dev = test_device();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let cfg = micro_text(Layout::Albef { fusion_layer: 1 });
        let bert = BertModel::new(&cfg, 24, vb)?;
        let (ids, mask) = batch(&dev)?;
        let out = bert.forward_text(&ids, &mask, false)?;
        // Different pad ids in the padded slots, same mask: real tokens unchanged.
        let ids2 = Tensor::new(&[[2u32, 7, 9, 11, 3, 17], [2, 5, 3, 30, 8, 1]], &dev)?;
        let out2 = bert.forward_text(&ids2, &mask, false)?;
        let real = |t: &Tensor| t.narrow(1, 0, 3).unwrap();
        assert!(max_abs_diff(&real(&out), &real(&out2)) < 1e-5);
        Ok(())
    }

    #[test]
    fn blip_layout_skips_cross_attention_in_text_mode() -> Result<()> {
        let dev = test_device();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("text_encoder");
        let mut cfg = micro_text(Layout::Blip);
        cfg.type_vocab_size = 0;
        cfg.has_mlm_head = false;
        let bert = BertModel::new(&cfg, 24, vb)?;
        let (ids, mask) = batch(&dev)?;
        let image = Tensor::randn(0f32, 1.0, (2, 5, 24), &dev)?;
        let text = bert.forward_text(&ids, &mask, false)?;
        let fused = bert.forward_fusion(FusionText::Ids(&ids), &mask, &image, false)?;
        assert!(
            max_abs_diff(&text, &fused) > 1e-3,
            "cross-attention ran in fusion"
        );
        // Perturbing every cross-attention weight changes the fusion pass, not the text pass.
        let data = varmap.data().lock().unwrap();
        for (name, var) in data.iter() {
            if name.contains(".crossattention.") {
                assert!(name.starts_with("text_encoder.bert.encoder.layer."));
                var.set(&(var.as_tensor() + 0.5)?)?;
            }
        }
        assert!(!data
            .keys()
            .any(|n| n.contains("token_type") || n.contains(".cls.")));
        drop(data);
        assert!(varmap
            .data()
            .lock()
            .unwrap()
            .contains_key("text_encoder.bert.encoder.layer.0.crossattention.self.query.weight"));
        let text2 = bert.forward_text(&ids, &mask, false)?;
        assert_eq!(max_abs_diff(&text, &text2), 0.0);
        let fused2 = bert.forward_fusion(FusionText::Ids(&ids), &mask, &image, false)?;
        assert!(max_abs_diff(&fused, &fused2) > 1e-3);
        assert!(bert.mlm_logits(&text).is_err());
        Ok(())
    }

    #[test]
    fn tied_decoder_gets_gradient_through_the_embedding_table() -> Result<()> {
        let dev = test_device();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev).pp("text_encoder");
        let cfg = micro_text(Layout::Albef { fusion_layer: 1 });
        let bert = BertModel::new(&cfg, 24, vb)?;
        let (ids, mask) = batch(&dev)?;
        let states = bert.forward_text(&ids, &mask, false)?;
        // Only the decoder uses row 40 (no input token is 40).
        let loss = bert.mlm_logits(&states)?.narrow(2, 40, 1)?.sum_all()?;
        let grads = loss.backward()?;
        let g = grads
            .get(bert.word_embeddings())
            .expect("word embeddings get a gradient");
        let row = g.get(40)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert!(row > 0.0);
        Ok(())
    }
}
