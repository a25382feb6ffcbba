//! The architecture a Hugging Face `config.json` describes (BERT, ViT, BLIP), in the terms
//! of our configs. Some of it is not visible in tensor shapes (head count, LayerNorm eps,
//! activation), so a target config is checked against it, and a BLIP checkpoint's full
//! model config can be derived from it.

use serde_json::Value;

/// The text side (HF `BertConfig`, BLIP's `text_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct HfText {
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    /// 0 when the model has no token-type embeddings (BLIP).
    pub type_vocab_size: usize,
    pub eps: f64,
    pub hidden_act: String,
    pub position_embedding_type: String,
}

/// The vision side (HF `ViTConfig`, BLIP's `vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct HfVision {
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub eps: f64,
    pub hidden_act: String,
    pub qkv_bias: bool,
}

/// What one HF `config.json` says about the architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct HfArch {
    /// `model_type` (`bert`, `vit`, `deit`, `blip`, ...).
    pub model_type: String,
    pub text: Option<HfText>,
    pub vision: Option<HfVision>,
    /// BLIP's projection width (`image_text_hidden_size`).
    pub embed_dim: Option<usize>,
}

fn get_usize(v: &Value, key: &str, default: Option<usize>) -> Result<usize, String> {
    match v.get(key) {
        Some(x) => x
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| format!("`{key}` is not a non-negative integer: {x}")),
        None => default.ok_or_else(|| format!("`{key}` is absent")),
    }
}

fn get_f64(v: &Value, key: &str, default: f64) -> Result<f64, String> {
    match v.get(key) {
        Some(x) => x
            .as_f64()
            .ok_or_else(|| format!("`{key}` is not a number: {x}")),
        None => Ok(default),
    }
}

fn get_str(v: &Value, key: &str, default: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or(default)
        .to_string()
}

/// Defaults are those of `transformers`' config classes, where a key may be absent.
fn text(v: &Value, blip: bool) -> Result<HfText, String> {
    Ok(HfText {
        vocab_size: get_usize(v, "vocab_size", Some(if blip { 30524 } else { 30522 }))?,
        hidden: get_usize(v, "hidden_size", Some(768))?,
        layers: get_usize(v, "num_hidden_layers", Some(12))?,
        heads: get_usize(v, "num_attention_heads", Some(12))?,
        intermediate: get_usize(v, "intermediate_size", Some(3072))?,
        max_positions: get_usize(v, "max_position_embeddings", Some(512))?,
        type_vocab_size: if blip {
            0
        } else {
            get_usize(v, "type_vocab_size", Some(2))?
        },
        eps: get_f64(v, "layer_norm_eps", 1e-12)?,
        hidden_act: get_str(v, "hidden_act", "gelu"),
        position_embedding_type: get_str(v, "position_embedding_type", "absolute"),
    })
}

fn vision(v: &Value, blip: bool) -> Result<HfVision, String> {
    Ok(HfVision {
        image_size: get_usize(v, "image_size", Some(if blip { 384 } else { 224 }))?,
        patch_size: get_usize(v, "patch_size", Some(16))?,
        hidden: get_usize(v, "hidden_size", Some(768))?,
        layers: get_usize(v, "num_hidden_layers", Some(12))?,
        heads: get_usize(v, "num_attention_heads", Some(12))?,
        intermediate: get_usize(v, "intermediate_size", Some(3072))?,
        eps: get_f64(v, "layer_norm_eps", if blip { 1e-5 } else { 1e-12 })?,
        hidden_act: get_str(v, "hidden_act", "gelu"),
        qkv_bias: v.get("qkv_bias").and_then(Value::as_bool).unwrap_or(true),
    })
}

/// Reads the architecture out of a parsed HF `config.json`.
pub fn parse(v: &Value) -> Result<HfArch, String> {
    let model_type = get_str(v, "model_type", "");
    let arch = match model_type.as_str() {
        "bert" => HfArch {
            text: Some(text(v, false)?),
            vision: None,
            embed_dim: None,
            model_type,
        },
        "vit" | "deit" => HfArch {
            text: None,
            vision: Some(vision(v, false)?),
            embed_dim: None,
            model_type,
        },
        "blip" => {
            let empty = Value::Object(Default::default());
            let t = v.get("text_config").unwrap_or(&empty);
            let vis = v.get("vision_config").unwrap_or(&empty);
            HfArch {
                text: Some(text(t, true).map_err(|e| format!("text_config: {e}"))?),
                vision: Some(vision(vis, true).map_err(|e| format!("vision_config: {e}"))?),
                embed_dim: Some(get_usize(v, "image_text_hidden_size", Some(256))?),
                model_type,
            }
        }
        other => {
            return Err(format!(
                "model_type `{other}` is not one vlp imports (bert, vit, deit, blip)"
            ))
        }
    };
    Ok(arch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blip_config_gives_both_sides_and_its_own_eps() {
        let v: Value = serde_json::json!({
            "model_type": "blip",
            "image_text_hidden_size": 16,
            "text_config": {"vocab_size": 200, "hidden_size": 32, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "intermediate_size": 64,
                            "max_position_embeddings": 32},
            "vision_config": {"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                              "intermediate_size": 192, "image_size": 32, "patch_size": 8}
        });
        let a = parse(&v).unwrap();
        let vis = a.vision.unwrap();
        assert_eq!((vis.hidden, vis.image_size, vis.eps), (48, 32, 1e-5));
        let t = a.text.unwrap();
        assert_eq!((t.vocab_size, t.type_vocab_size, t.eps), (200, 0, 1e-12));
        assert_eq!(a.embed_dim, Some(16));
    }

    #[test]
    fn unknown_model_types_and_bad_values_are_errors() {
        assert!(parse(&serde_json::json!({"model_type": "gpt2"})).is_err());
        let e =
            parse(&serde_json::json!({"model_type": "bert", "hidden_size": "big"})).unwrap_err();
        assert!(e.contains("hidden_size"), "{e}");
    }
}
