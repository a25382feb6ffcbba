//! The config format of the PyTorch reference implementation of the ALBEF step (the one
//! that wrote `tests/fixtures/albef/config.json`): `vision` {image_size, patch_size,
//! hidden, layers, heads, mlp_ratio, eps}, `text` {vocab_size, hidden, layers (all),
//! fusion_layers, heads, intermediate, max_positions, eps, dropout, pad/cls/sep/mask ids},
//! `embed_dim`, `temp`, `queue_size`, plus training keys we ignore here (`momentum`
//! among them: it is the objectives' setting, not the architecture's).
//! Omitted architecture keys take ALBEF-base values, as they do there.

use serde_json::Value;

use crate::config::{AlbefConfig, Layout};

fn usize_at(v: &Value, key: &str, default: usize) -> Result<usize, String> {
    match v.get(key) {
        None => Ok(default),
        Some(x) => x
            .as_u64()
            .map(|x| x as usize)
            .ok_or_else(|| format!("`{key}` is not a non-negative integer: {x}")),
    }
}

fn f64_at(v: &Value, key: &str, default: f64) -> Result<f64, String> {
    match v.get(key) {
        None => Ok(default),
        Some(x) => x
            .as_f64()
            .ok_or_else(|| format!("`{key}` is not a number: {x}")),
    }
}

/// Whether `v` looks like that format (a `text.fusion_layers` key, no `text.layout`).
pub fn is_bench_config(v: &Value) -> bool {
    v.get("text")
        .is_some_and(|t| t.get("fusion_layers").is_some() && t.get("layout").is_none())
}

/// Our config for a reference-implementation config.
pub fn config_from_bench(v: &Value) -> Result<AlbefConfig, String> {
    let mut cfg = AlbefConfig::preset("albef-base").map_err(|e| e.to_string())?;
    let empty = Value::Object(Default::default());
    let vis = v.get("vision").unwrap_or(&empty);
    let txt = v.get("text").unwrap_or(&empty);
    let c = &mut cfg.vision;
    c.image_size = usize_at(vis, "image_size", c.image_size)?;
    c.patch_size = usize_at(vis, "patch_size", c.patch_size)?;
    c.hidden = usize_at(vis, "hidden", c.hidden)?;
    c.layers = usize_at(vis, "layers", c.layers)?;
    c.heads = usize_at(vis, "heads", c.heads)?;
    c.mlp_ratio = f64_at(vis, "mlp_ratio", c.mlp_ratio)?;
    c.eps = f64_at(vis, "eps", c.eps)?;
    let t = &mut cfg.text;
    t.vocab_size = usize_at(txt, "vocab_size", t.vocab_size)?;
    t.hidden = usize_at(txt, "hidden", t.hidden)?;
    t.layers = usize_at(txt, "layers", t.layers)?;
    let fusion_layers = usize_at(txt, "fusion_layers", 6)?;
    t.layout = Layout::Albef {
        fusion_layer: t.layers.checked_sub(fusion_layers).ok_or_else(|| {
            format!(
                "text.fusion_layers {fusion_layers} exceeds text.layers {}",
                t.layers
            )
        })?,
    };
    t.heads = usize_at(txt, "heads", t.heads)?;
    t.intermediate = usize_at(txt, "intermediate", t.intermediate)?;
    t.max_positions = usize_at(txt, "max_positions", t.max_positions)?;
    t.eps = f64_at(txt, "eps", t.eps)?;
    t.dropout = f64_at(txt, "dropout", t.dropout)?;
    let id = |key: &str, default: u32| usize_at(txt, key, default as usize).map(|x| x as u32);
    t.pad_id = id("pad_id", t.pad_id)?;
    t.cls_id = id("cls_id", t.cls_id)?;
    t.sep_id = id("sep_id", t.sep_id)?;
    t.mask_id = id("mask_id", t.mask_id)?;
    cfg.embed_dim = usize_at(v, "embed_dim", cfg.embed_dim)?;
    cfg.temp = f64_at(v, "temp", cfg.temp)?;
    cfg.queue_size = usize_at(v, "queue_size", cfg.queue_size)?;
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_config_maps_onto_ours() {
        let v: Value = serde_json::json!({
            "vision": {"image_size": 32, "patch_size": 8, "hidden": 32, "layers": 2, "heads": 4,
                       "mlp_ratio": 4.0, "eps": 1e-6},
            "text": {"vocab_size": 300, "hidden": 32, "layers": 4, "fusion_layers": 2, "heads": 4,
                     "intermediate": 128, "max_positions": 32, "eps": 1e-12, "dropout": 0.0,
                     "pad_id": 0, "cls_id": 101, "sep_id": 102, "mask_id": 103},
            "embed_dim": 32, "temp": 0.07, "momentum": 0.995, "queue_size": 8, "alpha": 0.4
        });
        assert!(is_bench_config(&v));
        let cfg = config_from_bench(&v).unwrap();
        assert_eq!(cfg.text.layout, Layout::Albef { fusion_layer: 2 });
        assert_eq!(
            (cfg.vision.hidden, cfg.text.vocab_size, cfg.queue_size),
            (32, 300, 8)
        );
        assert_eq!(cfg.text.dropout, 0.0);
        let ours: Value = serde_json::from_str(&cfg.to_json()).unwrap();
        assert!(!is_bench_config(&ours));
    }
}
