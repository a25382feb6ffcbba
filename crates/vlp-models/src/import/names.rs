//! Weight names of each importable checkpoint format, mapped to ours (which are ALBEF's
//! checkpoint names). Pure functions of a name: no tensors, no I/O.

use std::fmt;

/// A checkpoint layout `vlp convert` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// HF `BertModel` / `BertForMaskedLM` safetensors (`bert.` prefix optional).
    HfBert,
    /// HF `ViTModel` / `ViTForImageClassification` safetensors (`vit.`/`deit.` prefix optional).
    HfVit,
    /// timm / DeiT vision transformer (`cls_token`, `pos_embed`, `blocks.i.*`), safetensors or `.pth`.
    TimmVit,
    /// The original ALBEF `.pth` (zip pickle, top key `model`); also its names in safetensors.
    AlbefPth,
    /// HF `BlipForImageTextRetrieval` safetensors.
    HfBlip,
}

impl Format {
    pub const ALL: [Format; 5] = [
        Format::HfBert,
        Format::HfVit,
        Format::TimmVit,
        Format::AlbefPth,
        Format::HfBlip,
    ];

    /// The name used on the command line (`--from`).
    pub fn name(self) -> &'static str {
        match self {
            Format::HfBert => "hf-bert",
            Format::HfVit => "hf-vit",
            Format::TimmVit => "timm-vit",
            Format::AlbefPth => "albef-pth",
            Format::HfBlip => "hf-blip",
        }
    }

    /// Whether this format describes `ours` (one of our names) in a model whose text
    /// encoder runs `text_layers` layers on text alone. A name the format describes but
    /// the checkpoint lacks is *missing* (an error unless partial imports are allowed); a
    /// name it does not describe is initialised fresh when absent. Momentum-twin names are
    /// described only by ALBEF checkpoints; the other formats get the twin as a copy of
    /// the online weights, as ALBEF's own initialisation does.
    ///
    /// A BERT checkpoint describes the embeddings, the text layers (a BERT with fewer
    /// layers than the text encoder is missing some) and its MLM head if it has one;
    /// layers past `text_layers` and all cross-attention are ALBEF's fusion encoder, taken
    /// from BERT where it has them (BERT-base into `albef-base`) and fresh where not
    /// (MiniLM's 6 layers into `minilm`'s 6 + 2).
    pub fn describes(self, ours: &str, has_mlm_head: bool, text_layers: usize) -> bool {
        let online = |p: &str| ours.starts_with(p);
        match self {
            Format::AlbefPth => ours != "idx_queue",
            Format::HfVit | Format::TimmVit => online("visual_encoder."),
            Format::HfBert => {
                if let Some(rest) = ours.strip_prefix("text_encoder.bert.encoder.layer.") {
                    indexed(rest).is_some_and(|(j, _)| j < text_layers)
                        && !ours.contains(".crossattention.")
                } else {
                    online("text_encoder.bert.") || (has_mlm_head && online("text_encoder.cls."))
                }
            }
            Format::HfBlip => {
                online("visual_encoder.")
                    || online("text_encoder.bert.")
                    || online("vision_proj.")
                    || online("text_proj.")
                    || online("itm_head.")
            }
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Format::ALL.iter().map(|f| f.name()).collect();
                format!(
                    "unknown format `{s}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

/// What becomes of one source tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// Loaded under our name `to`, unchanged.
    To(String),
    /// Row block `index` of `parts` equal blocks of our fused tensor `to` (HF's separate
    /// query/key/value -> our `attn.qkv`, rows `[q; k; v]`).
    Part {
        to: String,
        index: usize,
        parts: usize,
    },
    /// A second name for our tensor `of` (tied weights). Checked equal, then dropped.
    Alias { of: String },
    /// Known and deliberately not imported; the reason is reported.
    Drop(&'static str),
    /// Not a name of this format.
    Unknown,
}

fn to(s: impl Into<String>) -> Rule {
    Rule::To(s.into())
}

/// Splits `"<n>.<rest>"` into `(n, rest)`.
fn indexed(name: &str) -> Option<(usize, &str)> {
    let (n, rest) = name.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// `LayerNorm.gamma`/`beta` (the TF-era names in e.g. `bert-base-uncased`) -> `weight`/`bias`.
fn modern_layer_norm(name: &str) -> std::borrow::Cow<'_, str> {
    if let Some(stem) = name.strip_suffix("LayerNorm.gamma") {
        format!("{stem}LayerNorm.weight").into()
    } else if let Some(stem) = name.strip_suffix("LayerNorm.beta") {
        format!("{stem}LayerNorm.bias").into()
    } else {
        name.into()
    }
}

/// The rule for one source name of `format`.
pub fn map_name(format: Format, name: &str) -> Rule {
    match format {
        Format::HfBert => hf_bert(name),
        Format::HfVit => hf_vit(name),
        Format::TimmVit => timm_vit(name),
        Format::AlbefPth => albef(name),
        Format::HfBlip => hf_blip(name),
    }
}

/// BERT's own tensors below `embeddings.` / `encoder.layer.N.` (HF and ALBEF share them).
fn bert_body(rest: &str, ours_prefix: &str) -> Rule {
    let rest = modern_layer_norm(rest);
    let rest = rest.as_ref();
    if rest == "embeddings.position_ids" {
        return Rule::Drop("position_ids buffer (always 0..n)");
    }
    if let Some(e) = rest.strip_prefix("embeddings.") {
        return match e {
            "word_embeddings.weight"
            | "position_embeddings.weight"
            | "token_type_embeddings.weight"
            | "LayerNorm.weight"
            | "LayerNorm.bias" => to(format!("{ours_prefix}embeddings.{e}")),
            _ => Rule::Unknown,
        };
    }
    if let Some((layer, tail)) = rest.strip_prefix("encoder.layer.").and_then(indexed) {
        let known = [
            "attention.self.query.",
            "attention.self.key.",
            "attention.self.value.",
            "attention.output.dense.",
            "attention.output.LayerNorm.",
            "crossattention.self.query.",
            "crossattention.self.key.",
            "crossattention.self.value.",
            "crossattention.output.dense.",
            "crossattention.output.LayerNorm.",
            "intermediate.dense.",
            "output.dense.",
            "output.LayerNorm.",
        ];
        let ok = known.iter().any(|k| {
            tail.strip_prefix(k)
                .is_some_and(|p| p == "weight" || p == "bias")
        });
        return if ok {
            to(format!("{ours_prefix}encoder.layer.{layer}.{tail}"))
        } else {
            Rule::Unknown
        };
    }
    if rest.starts_with("pooler.") {
        return Rule::Drop("BERT pooler (ALBEF's BERT has no pooling layer)");
    }
    Rule::Unknown
}

/// BERT's MLM head below `cls.` (HF `BertForMaskedLM` and ALBEF's `text_encoder.cls.`);
/// `root` is our text encoder (`text_encoder.` or the momentum twin's).
fn mlm_head(rest: &str, root: &str) -> Rule {
    let rest = modern_layer_norm(rest);
    match rest.as_ref() {
        "predictions.bias"
        | "predictions.transform.dense.weight"
        | "predictions.transform.dense.bias"
        | "predictions.transform.LayerNorm.weight"
        | "predictions.transform.LayerNorm.bias" => to(format!("{root}cls.{rest}")),
        // The decoder is tied to the word embeddings, and its bias is the head's `bias`.
        "predictions.decoder.weight" => Rule::Alias {
            of: format!("{root}bert.embeddings.word_embeddings.weight"),
        },
        "predictions.decoder.bias" => Rule::Alias {
            of: format!("{root}cls.predictions.bias"),
        },
        r if r.starts_with("seq_relationship.") => {
            Rule::Drop("next-sentence-prediction head (not part of ALBEF)")
        }
        _ => Rule::Unknown,
    }
}

fn hf_bert(name: &str) -> Rule {
    if let Some(rest) = name.strip_prefix("cls.") {
        return mlm_head(rest, "text_encoder.");
    }
    let rest = name.strip_prefix("bert.").unwrap_or(name);
    bert_body(rest, "text_encoder.bert.")
}

/// One ViT block's tensor under our names, from the block's part name in our layout.
fn block(prefix: &str, i: usize, ours: &str) -> Rule {
    to(format!("{prefix}blocks.{i}.{ours}"))
}

fn weight_or_bias(s: &str) -> Option<&str> {
    (s == "weight" || s == "bias").then_some(s)
}

fn hf_vit(name: &str) -> Rule {
    let rest = name
        .strip_prefix("vit.")
        .or_else(|| name.strip_prefix("deit."))
        .unwrap_or(name);
    let v = "visual_encoder.";
    match rest {
        "embeddings.cls_token" => return to(format!("{v}cls_token")),
        "embeddings.position_embeddings" => return to(format!("{v}pos_embed")),
        "embeddings.patch_embeddings.projection.weight" => {
            return to(format!("{v}patch_embed.proj.weight"))
        }
        "embeddings.patch_embeddings.projection.bias" => {
            return to(format!("{v}patch_embed.proj.bias"))
        }
        "embeddings.mask_token" => return Rule::Drop("mask token (masked-image pretraining only)"),
        "layernorm.weight" => return to(format!("{v}norm.weight")),
        "layernorm.bias" => return to(format!("{v}norm.bias")),
        _ => {}
    }
    if rest.starts_with("pooler.") {
        return Rule::Drop("ViT pooler (ALBEF uses the [CLS] state directly)");
    }
    if rest.starts_with("classifier.") {
        return Rule::Drop("image classification head");
    }
    let Some((i, tail)) = rest.strip_prefix("encoder.layer.").and_then(indexed) else {
        return Rule::Unknown;
    };
    let (module, wb) = match tail.rsplit_once('.') {
        Some((m, p)) if weight_or_bias(p).is_some() => (m, p),
        _ => return Rule::Unknown,
    };
    let part = |index| Rule::Part {
        to: format!("{v}blocks.{i}.attn.qkv.{wb}"),
        index,
        parts: 3,
    };
    match module {
        "attention.attention.query" => part(0),
        "attention.attention.key" => part(1),
        "attention.attention.value" => part(2),
        "attention.output.dense" => block(v, i, &format!("attn.proj.{wb}")),
        "layernorm_before" => block(v, i, &format!("norm1.{wb}")),
        "layernorm_after" => block(v, i, &format!("norm2.{wb}")),
        "intermediate.dense" => block(v, i, &format!("mlp.fc1.{wb}")),
        "output.dense" => block(v, i, &format!("mlp.fc2.{wb}")),
        _ => Rule::Unknown,
    }
}

/// timm's names below the model (ALBEF's `visual_encoder.` is a timm-style ViT).
fn timm_body(rest: &str, v: &str) -> Rule {
    match rest {
        "cls_token"
        | "pos_embed"
        | "patch_embed.proj.weight"
        | "patch_embed.proj.bias"
        | "norm.weight"
        | "norm.bias" => return to(format!("{v}{rest}")),
        _ => {}
    }
    for head in ["head.", "head_dist.", "fc_norm.", "pre_logits."] {
        if rest.starts_with(head) {
            return Rule::Drop("image classification head");
        }
    }
    let Some((i, tail)) = rest.strip_prefix("blocks.").and_then(indexed) else {
        return Rule::Unknown;
    };
    let known = [
        "norm1.",
        "attn.qkv.",
        "attn.proj.",
        "norm2.",
        "mlp.fc1.",
        "mlp.fc2.",
    ];
    if known
        .iter()
        .any(|k| tail.strip_prefix(k).and_then(weight_or_bias).is_some())
    {
        block(v, i, tail)
    } else {
        Rule::Unknown
    }
}

fn timm_vit(name: &str) -> Rule {
    timm_body(name, "visual_encoder.")
}

fn albef(name: &str) -> Rule {
    // Online and momentum twins have the same structure under different roots.
    for root in ["visual_encoder.", "visual_encoder_m."] {
        if let Some(rest) = name.strip_prefix(root) {
            return timm_body(rest, root);
        }
    }
    for root in ["text_encoder.", "text_encoder_m."] {
        if let Some(rest) = name.strip_prefix(root) {
            if let Some(r) = rest.strip_prefix("bert.") {
                return bert_body(r, &format!("{root}bert."));
            }
            if let Some(r) = rest.strip_prefix("cls.") {
                return mlm_head(r, root);
            }
            return Rule::Unknown;
        }
    }
    let heads = [
        "vision_proj.",
        "text_proj.",
        "itm_head.",
        "vision_proj_m.",
        "text_proj_m.",
    ];
    if heads
        .iter()
        .any(|h| name.strip_prefix(h).and_then(weight_or_bias).is_some())
    {
        return to(name);
    }
    match name {
        "temp" | "image_queue" | "text_queue" | "idx_queue" | "queue_ptr" => to(name),
        _ => Rule::Unknown,
    }
}

fn hf_blip(name: &str) -> Rule {
    let v = "visual_encoder.";
    if let Some(rest) = name.strip_prefix("vision_model.") {
        match rest {
            "embeddings.class_embedding" => return to(format!("{v}cls_token")),
            "embeddings.position_embedding" => return to(format!("{v}pos_embed")),
            "embeddings.patch_embedding.weight" => {
                return to(format!("{v}patch_embed.proj.weight"))
            }
            "embeddings.patch_embedding.bias" => return to(format!("{v}patch_embed.proj.bias")),
            "post_layernorm.weight" => return to(format!("{v}norm.weight")),
            "post_layernorm.bias" => return to(format!("{v}norm.bias")),
            _ => {}
        }
        let Some((i, tail)) = rest.strip_prefix("encoder.layers.").and_then(indexed) else {
            return Rule::Unknown;
        };
        let Some((module, wb)) = tail
            .rsplit_once('.')
            .filter(|(_, p)| weight_or_bias(p).is_some())
        else {
            return Rule::Unknown;
        };
        let ours = match module {
            "self_attn.qkv" => "attn.qkv",
            "self_attn.projection" => "attn.proj",
            "layer_norm1" => "norm1",
            "layer_norm2" => "norm2",
            "mlp.fc1" => "mlp.fc1",
            "mlp.fc2" => "mlp.fc2",
            _ => return Rule::Unknown,
        };
        return block(v, i, &format!("{ours}.{wb}"));
    }
    if let Some(rest) = name.strip_prefix("text_encoder.") {
        return bert_body(rest, "text_encoder.bert.");
    }
    if ["vision_proj.", "text_proj.", "itm_head."]
        .iter()
        .any(|h| name.strip_prefix(h).and_then(weight_or_bias).is_some())
    {
        return to(name);
    }
    Rule::Unknown
}

/// Guesses the format from the names alone (`--from auto`): the format under which the
/// most names are known, if it knows most of them.
pub fn sniff<'a>(names: impl IntoIterator<Item = &'a str> + Clone) -> Option<Format> {
    let total = names.clone().into_iter().count();
    if total == 0 {
        return None;
    }
    let known = |f: Format| {
        names
            .clone()
            .into_iter()
            .filter(|n| map_name(f, n) != Rule::Unknown)
            .count()
    };
    // In order of specificity: ALBEF names are a superset of timm's under a prefix, so a
    // tie goes to the earlier entry.
    let order = [
        Format::AlbefPth,
        Format::HfBlip,
        Format::HfVit,
        Format::TimmVit,
        Format::HfBert,
    ];
    let (best, count) = order.into_iter().map(|f| (f, known(f))).fold(
        None,
        |acc: Option<(Format, usize)>, (f, c)| match acc {
            Some((_, best)) if best >= c => acc,
            _ => Some((f, c)),
        },
    )?;
    (count * 2 > total).then_some(best)
}

/// The online twin of a momentum name (`visual_encoder_m.x` -> `visual_encoder.x`).
pub fn online_twin(ours: &str) -> Option<String> {
    let (root, rest) = ours.split_once('.')?;
    let online = root.strip_suffix("_m")?;
    Some(format!("{online}.{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORD_EMBEDDINGS: &str = "text_encoder.bert.embeddings.word_embeddings.weight";
    const MLM_BIAS: &str = "text_encoder.cls.predictions.bias";

    fn rule(f: Format, n: &str) -> Rule {
        map_name(f, n)
    }

    #[test]
    fn hf_bert_with_and_without_prefix() {
        for prefix in ["", "bert."] {
            assert_eq!(
                rule(
                    Format::HfBert,
                    &format!("{prefix}encoder.layer.3.attention.self.query.weight")
                ),
                to("text_encoder.bert.encoder.layer.3.attention.self.query.weight")
            );
            assert_eq!(
                rule(
                    Format::HfBert,
                    &format!("{prefix}embeddings.LayerNorm.gamma")
                ),
                to("text_encoder.bert.embeddings.LayerNorm.weight")
            );
            assert!(matches!(
                rule(Format::HfBert, &format!("{prefix}pooler.dense.weight")),
                Rule::Drop(_)
            ));
            assert!(matches!(
                rule(Format::HfBert, &format!("{prefix}embeddings.position_ids")),
                Rule::Drop(_)
            ));
        }
        assert_eq!(
            rule(Format::HfBert, "cls.predictions.transform.dense.weight"),
            to("text_encoder.cls.predictions.transform.dense.weight")
        );
        assert_eq!(
            rule(Format::HfBert, "cls.predictions.decoder.weight"),
            Rule::Alias {
                of: WORD_EMBEDDINGS.into()
            }
        );
        assert_eq!(
            rule(Format::HfBert, "cls.predictions.decoder.bias"),
            Rule::Alias {
                of: MLM_BIAS.into()
            }
        );
        assert_eq!(
            rule(Format::HfBert, "encoder.layer.0.attention.self.qkv.weight"),
            Rule::Unknown
        );
        assert_eq!(
            rule(Format::HfBert, "encoder.layer.x.output.dense.weight"),
            Rule::Unknown
        );
    }

    #[test]
    fn hf_vit_splits_into_fused_qkv() {
        for (n, index) in [("query", 0), ("key", 1), ("value", 2)] {
            assert_eq!(
                rule(
                    Format::HfVit,
                    &format!("vit.encoder.layer.5.attention.attention.{n}.bias")
                ),
                Rule::Part {
                    to: "visual_encoder.blocks.5.attn.qkv.bias".into(),
                    index,
                    parts: 3
                }
            );
        }
        let pairs = [
            ("embeddings.cls_token", "visual_encoder.cls_token"),
            ("embeddings.position_embeddings", "visual_encoder.pos_embed"),
            (
                "embeddings.patch_embeddings.projection.weight",
                "visual_encoder.patch_embed.proj.weight",
            ),
            (
                "encoder.layer.1.layernorm_before.weight",
                "visual_encoder.blocks.1.norm1.weight",
            ),
            (
                "encoder.layer.1.layernorm_after.bias",
                "visual_encoder.blocks.1.norm2.bias",
            ),
            (
                "encoder.layer.1.attention.output.dense.weight",
                "visual_encoder.blocks.1.attn.proj.weight",
            ),
            (
                "encoder.layer.1.intermediate.dense.weight",
                "visual_encoder.blocks.1.mlp.fc1.weight",
            ),
            (
                "encoder.layer.1.output.dense.bias",
                "visual_encoder.blocks.1.mlp.fc2.bias",
            ),
            ("layernorm.weight", "visual_encoder.norm.weight"),
        ];
        for (src, ours) in pairs {
            assert_eq!(rule(Format::HfVit, src), to(ours), "{src}");
        }
        assert!(matches!(
            rule(Format::HfVit, "classifier.weight"),
            Rule::Drop(_)
        ));
    }

    #[test]
    fn timm_and_albef_vision_names() {
        assert_eq!(
            rule(Format::TimmVit, "blocks.11.attn.qkv.weight"),
            to("visual_encoder.blocks.11.attn.qkv.weight")
        );
        assert_eq!(
            rule(Format::TimmVit, "pos_embed"),
            to("visual_encoder.pos_embed")
        );
        assert!(matches!(
            rule(Format::TimmVit, "head.weight"),
            Rule::Drop(_)
        ));
        assert_eq!(rule(Format::TimmVit, "dist_token"), Rule::Unknown);
        assert_eq!(
            rule(Format::AlbefPth, "visual_encoder_m.blocks.0.mlp.fc2.bias"),
            to("visual_encoder_m.blocks.0.mlp.fc2.bias")
        );
    }

    #[test]
    fn albef_names_are_ours_with_aliases() {
        for n in [
            "temp",
            "image_queue",
            "queue_ptr",
            "vision_proj_m.weight",
            "itm_head.bias",
            "text_encoder_m.bert.encoder.layer.3.crossattention.self.key.weight",
            "text_encoder.cls.predictions.transform.LayerNorm.bias",
        ] {
            assert_eq!(rule(Format::AlbefPth, n), to(n));
        }
        assert_eq!(
            rule(
                Format::AlbefPth,
                "text_encoder_m.cls.predictions.decoder.weight"
            ),
            Rule::Alias {
                of: "text_encoder_m.bert.embeddings.word_embeddings.weight".into()
            }
        );
        assert_eq!(
            rule(
                Format::AlbefPth,
                "text_encoder.cls.predictions.decoder.bias"
            ),
            Rule::Alias {
                of: "text_encoder.cls.predictions.bias".into()
            }
        );
        assert!(matches!(
            rule(
                Format::AlbefPth,
                "text_encoder_m.bert.embeddings.position_ids"
            ),
            Rule::Drop(_)
        ));
        assert_eq!(rule(Format::AlbefPth, "text_decoder.x"), Rule::Unknown);
    }

    #[test]
    fn hf_blip_names() {
        let pairs = [
            (
                "vision_model.embeddings.class_embedding",
                "visual_encoder.cls_token",
            ),
            (
                "vision_model.embeddings.position_embedding",
                "visual_encoder.pos_embed",
            ),
            (
                "vision_model.embeddings.patch_embedding.weight",
                "visual_encoder.patch_embed.proj.weight",
            ),
            (
                "vision_model.encoder.layers.2.self_attn.qkv.weight",
                "visual_encoder.blocks.2.attn.qkv.weight",
            ),
            (
                "vision_model.encoder.layers.2.self_attn.projection.bias",
                "visual_encoder.blocks.2.attn.proj.bias",
            ),
            (
                "vision_model.encoder.layers.2.layer_norm1.weight",
                "visual_encoder.blocks.2.norm1.weight",
            ),
            (
                "vision_model.encoder.layers.2.layer_norm2.bias",
                "visual_encoder.blocks.2.norm2.bias",
            ),
            (
                "vision_model.post_layernorm.weight",
                "visual_encoder.norm.weight",
            ),
            (
                "text_encoder.embeddings.word_embeddings.weight",
                "text_encoder.bert.embeddings.word_embeddings.weight",
            ),
            (
                "text_encoder.encoder.layer.0.crossattention.self.key.weight",
                "text_encoder.bert.encoder.layer.0.crossattention.self.key.weight",
            ),
            ("itm_head.weight", "itm_head.weight"),
        ];
        for (src, ours) in pairs {
            assert_eq!(rule(Format::HfBlip, src), to(ours), "{src}");
        }
        assert_eq!(
            rule(Format::HfBlip, "text_decoder.cls.predictions.bias"),
            Rule::Unknown
        );
    }

    #[test]
    fn sniffing_prefers_the_specific_format() {
        let albef = [
            "visual_encoder.cls_token",
            "visual_encoder.blocks.0.attn.qkv.weight",
            "text_encoder.bert.embeddings.word_embeddings.weight",
            "temp",
        ];
        assert_eq!(sniff(albef.iter().copied()), Some(Format::AlbefPth));
        let timm = ["cls_token", "pos_embed", "blocks.0.attn.qkv.weight"];
        assert_eq!(sniff(timm.iter().copied()), Some(Format::TimmVit));
        let vit = [
            "embeddings.cls_token",
            "encoder.layer.0.attention.attention.query.weight",
        ];
        assert_eq!(sniff(vit.iter().copied()), Some(Format::HfVit));
        let bert = [
            "embeddings.word_embeddings.weight",
            "encoder.layer.0.attention.self.query.weight",
        ];
        assert_eq!(sniff(bert.iter().copied()), Some(Format::HfBert));
        let blip = [
            "vision_model.embeddings.class_embedding",
            "text_encoder.embeddings.word_embeddings.weight",
        ];
        assert_eq!(sniff(blip.iter().copied()), Some(Format::HfBlip));
        assert_eq!(sniff(["foo", "bar"].iter().copied()), None);
    }

    #[test]
    fn momentum_twins() {
        assert_eq!(
            online_twin("text_encoder_m.cls.predictions.bias").as_deref(),
            Some("text_encoder.cls.predictions.bias")
        );
        assert_eq!(online_twin("vision_proj.weight"), None);
        assert_eq!(online_twin("temp"), None);
    }

    #[test]
    fn format_names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.name().parse::<Format>().unwrap(), f);
        }
        assert!("hf-gpt".parse::<Format>().is_err());
    }
}
