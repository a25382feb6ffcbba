//! `vlp convert` end to end on the checkpoint fixtures (`tests/fixtures/albef`,
//! `tests/fixtures/hf`), and on broken checkpoints: a clear error naming the file and the
//! tensor, a nonzero exit, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use vlp_models::{AlbefConfig, Layout};

use crate::common::{text, vlp_bin};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn convert(args: &[&str]) -> Output {
    Command::new(vlp_bin())
        .arg("convert")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run vlp convert")
}

/// Runs `vlp convert`, asserts success, returns stdout.
fn convert_ok(args: &[&str]) -> String {
    let out = convert(args);
    assert!(
        out.status.success(),
        "vlp convert {args:?} failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Runs `vlp convert`, asserts a clean failure (exit 1, no panic), returns stdout + stderr.
fn convert_fails(args: &[&str]) -> String {
    let out = convert(args);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "vlp convert {args:?}:\n{all}");
    assert!(
        !all.contains("panicked"),
        "vlp convert {args:?} panicked:\n{all}"
    );
    all
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// How many tensors a safetensors file's bytes hold.
fn load_len(bytes: &[u8]) -> usize {
    safetensors::SafeTensors::deserialize(bytes).unwrap().len()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The HF fixtures' BERT (vocabulary 200, 32 wide, 2 layers) + one fusion layer, and
/// their ViT (32 px, patch 8, 32 wide, 2 layers), as a vlp config file.
fn write_hf_fixture_config(dir: &Path) -> PathBuf {
    let mut cfg = AlbefConfig::preset("tiny").unwrap();
    cfg.vision.image_size = 32;
    cfg.vision.hidden = 32;
    cfg.vision.layers = 2;
    let t = &mut cfg.text;
    (
        t.vocab_size,
        t.hidden,
        t.layers,
        t.intermediate,
        t.max_positions,
    ) = (200, 32, 3, 64, 32);
    t.layout = Layout::Albef { fusion_layer: 2 };
    (t.pad_id, t.cls_id, t.sep_id, t.mask_id) = (0, 1, 2, 3);
    let path = dir.join("hf-fixture-config.json");
    cfg.save(&path).unwrap();
    path
}

#[test]
fn albef_pth_and_safetensors_convert_to_identical_models() {
    let dir = tempfile::tempdir().unwrap();
    let albef = fixtures().join("albef");
    // The fixture's config.json is the PyTorch reference implementation's format.
    let config = albef.join("config.json");
    let (a, b) = (dir.path().join("from-pth"), dir.path().join("from-st"));
    let said = convert_ok(&[
        "--from",
        "albef-pth",
        s(&albef.join("albef.pth")),
        "--config",
        s(&config),
        "--out",
        s(&a),
    ]);
    assert!(
        said.contains(
            "import from albef-pth: 262 loaded, 0 missing, 0 unexpected, 0 mismatched, 1 fresh, 0 momentum copies, 6 dropped"
        ),
        "{said}"
    );
    assert!(said.contains("wrote "), "{said}");
    // auto: the names say it is ALBEF's.
    convert_ok(&[
        s(&albef.join("albef.safetensors")),
        "--config",
        s(&config),
        "--out",
        s(&b),
    ]);

    let (ta, tb) = (
        load(&a.join("model.safetensors")),
        load(&b.join("model.safetensors")),
    );
    assert_eq!(ta.len(), 263);
    assert_eq!(ta.len(), tb.len());
    for (name, x) in &ta {
        let y = &tb[name];
        assert_eq!(x.dims(), y.dims(), "{name}");
        let (x, y) = (
            x.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
            y.to_dtype(DType::F64).unwrap().flatten_all().unwrap(),
        );
        assert_eq!(
            x.to_vec1::<f64>().unwrap(),
            y.to_vec1::<f64>().unwrap(),
            "{name}"
        );
    }
    let ca = std::fs::read_to_string(a.join("config.json")).unwrap();
    assert_eq!(ca, std::fs::read_to_string(b.join("config.json")).unwrap());
    let cfg = AlbefConfig::from_json(&ca).unwrap();
    assert_eq!(cfg.text.layout, Layout::Albef { fusion_layer: 2 });
    assert_eq!(cfg.queue_size, 8);
    // Converting our own output again is the identity (our names are ALBEF's).
    let c = dir.path().join("again");
    let again = convert_ok(&[
        s(&a.join("model.safetensors")),
        "--config",
        s(&a.join("config.json")),
        "--out",
        s(&c),
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(again.trim()).unwrap();
    assert_eq!(report["format"], "albef-pth");
    assert_eq!(report["loaded"].as_array().unwrap().len(), 263);
    assert!(report["fresh"].as_array().unwrap().is_empty());
}

#[test]
fn hf_blip_converts_without_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("blip");
    let said = convert_ok(&[
        s(&fixtures().join("hf/hf_blip/model.safetensors")),
        "--out",
        s(&out),
    ]);
    assert!(said.contains("import from hf-blip"), "{said}");
    assert!(said.contains("model config derived from"), "{said}");
    assert!(
        said.contains("momentum twin copied from the online weights"),
        "{said}"
    );
    let cfg = AlbefConfig::load(&out.join("config.json")).unwrap();
    assert_eq!(cfg.text.layout, Layout::Blip);
    assert_eq!(cfg.vision.eps, 1e-5);
    assert!(!cfg.text.has_mlm_head);
    let tensors = load(&out.join("model.safetensors"));
    assert_eq!(
        tensors["visual_encoder.blocks.0.attn.qkv.weight"].dims(),
        &[144, 48]
    );
    assert!(!tensors.contains_key("text_encoder.bert.embeddings.token_type_embeddings.weight"));
}

#[test]
fn hf_bert_vit_and_timm_into_one_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_hf_fixture_config(dir.path());
    let hf = fixtures().join("hf");
    for (from, file) in [
        ("hf-bert", "hf_bert/model.safetensors"),
        ("hf-bert", "hf_bert_mlm/model.safetensors"),
        ("hf-vit", "hf_vit/model.safetensors"),
        ("timm-vit", "timm_vit/model.safetensors"),
        ("timm-vit", "timm_vit/model.pth"),
    ] {
        for given in [from, "auto"] {
            let out = dir
                .path()
                .join(format!("{}-{given}", file.replace('/', "-")));
            let said = convert_ok(&[
                "--from",
                given,
                s(&hf.join(file)),
                "--config",
                s(&config),
                "--out",
                s(&out),
            ]);
            assert!(
                said.contains(&format!("import from {from}:")),
                "{file}: {said}"
            );
            assert!(
                said.contains("0 missing, 0 unexpected, 0 mismatched"),
                "{file}: {said}"
            );
            assert!(out.join("model.safetensors").is_file());
        }
    }
}

#[test]
fn init_combines_a_vit_and_a_bert() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_hf_fixture_config(dir.path());
    let hf = fixtures().join("hf");
    let (vit, both) = (dir.path().join("vit"), dir.path().join("both"));
    let v = hf.join("hf_vit/model.safetensors");
    convert_ok(&[s(&v), "--config", s(&config), "--out", s(&vit)]);
    let b = hf.join("hf_bert_mlm/model.safetensors");
    let said = convert_ok(&[s(&b), "--init", s(&vit), "--out", s(&both)]);
    assert!(said.contains(" 0 fresh, "), "{said}");
    assert!(said.contains("kept from the initial model:"), "{said}");
    let (a, c) = (
        load(&vit.join("model.safetensors")),
        load(&both.join("model.safetensors")),
    );
    for name in [
        "visual_encoder.blocks.1.attn.qkv.weight",
        "visual_encoder_m.pos_embed",
    ] {
        let (x, y) = (
            a[name].flatten_all().unwrap(),
            c[name].flatten_all().unwrap(),
        );
        assert_eq!(
            x.to_vec1::<f32>().unwrap(),
            y.to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }
    // A target config other than the initial model's is refused.
    let all = convert_fails(&[
        s(&b),
        "--init",
        s(&vit),
        "--preset",
        "tiny",
        "--out",
        s(&dir.path().join("tiny")),
    ]);
    assert!(all.contains("differs from the target config"), "{all}");
}

/// Commands that read captions default to the tokenizer and text settings a model folder
/// keeps: an image encoder converted into a model keeps the model's, and a model replaced
/// with --force takes its own away with it.
#[test]
fn an_image_encoder_converted_into_a_model_keeps_its_text_side_and_a_replaced_one_loses_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_hf_fixture_config(dir.path());
    let v = fixtures().join("hf/hf_vit/model.safetensors");
    let (first, again) = (dir.path().join("first"), dir.path().join("again"));
    convert_ok(&[s(&v), "--config", s(&config), "--out", s(&first)]);
    let text_side = [
        ("tokenizer.json", "{\"a\": 1}"),
        ("text.json", "{\"max_tokens\": 30, \"max_words\": 30}"),
    ];
    for (file, bytes) in text_side {
        std::fs::write(first.join(file), bytes).unwrap();
    }
    convert_ok(&[s(&v), "--init", s(&first), "--out", s(&again)]);
    for (file, bytes) in text_side {
        assert_eq!(
            std::fs::read_to_string(again.join(file)).unwrap(),
            bytes,
            "{file}"
        );
    }
    convert_ok(&[s(&v), "--config", s(&config), "--out", s(&again), "--force"]);
    for (file, _) in text_side {
        assert!(!again.join(file).exists(), "{file} outlived its model");
    }
}

#[test]
fn a_checkpoint_that_does_not_fit_names_the_tensors_and_partial_writes_anyway() {
    let dir = tempfile::tempdir().unwrap();
    let input = fixtures().join("hf/hf_bert/model.safetensors");
    let out = dir.path().join("out");
    // The tiny preset's BERT is 128 wide with a vocabulary of 2000.
    let all = convert_fails(&[
        "--from",
        "hf-bert",
        s(&input),
        "--preset",
        "tiny",
        "--out",
        s(&out),
    ]);
    assert!(all.contains("hf_bert/model.safetensors"), "{all}");
    assert!(
        all.contains(
            "embeddings.word_embeddings.weight [200, 32] -> text_encoder.bert.embeddings.word_embeddings.weight expects [2000, 128]"
        ),
        "{all}"
    );
    assert!(all.contains("--allow-partial"), "{all}");
    assert!(!out.join("model.safetensors").exists());

    let said = convert_ok(&[
        "--from",
        "hf-bert",
        s(&input),
        "--preset",
        "tiny",
        "--out",
        s(&out),
        "--allow-partial",
    ]);
    assert!(said.contains("mismatched shapes:"), "{said}");
    let cfg = AlbefConfig::load(&out.join("config.json")).unwrap();
    assert_eq!(cfg, AlbefConfig::preset("tiny").unwrap());
}

#[test]
fn broken_checkpoints_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let albef = fixtures().join("albef");
    let config = albef.join("config.json");
    let out = d.join("out");
    let run = |input: &Path, from: &str| {
        convert_fails(&[
            "--from",
            from,
            s(input),
            "--config",
            s(&config),
            "--out",
            s(&out),
        ])
    };

    // Truncated files.
    for name in ["albef.safetensors", "albef.pth"] {
        let bytes = std::fs::read(albef.join(name)).unwrap();
        let cut = d.join(format!("cut-{name}"));
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let all = run(&cut, "auto");
        assert!(all.contains(&format!("cut-{name}")), "{all}");
        let all = run(&cut, "albef-pth");
        assert!(all.contains(&format!("cut-{name}")), "{all}");
    }

    // One tensor of the wrong shape.
    let mut tensors = load(&albef.join("albef.safetensors"));
    tensors.insert(
        "itm_head.weight".into(),
        Tensor::zeros((3, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let bad = d.join("bad-shape.safetensors");
    candle_core::safetensors::save(&tensors, &bad).unwrap();
    let all = run(&bad, "albef-pth");
    assert!(all.contains("bad-shape.safetensors"), "{all}");
    assert!(
        all.contains("itm_head.weight [3, 32] -> itm_head.weight expects [2, 32]"),
        "{all}"
    );

    // A tied alias that is not equal to its tensor.
    let mut tensors = load(&albef.join("albef.safetensors"));
    let name = "text_encoder.cls.predictions.decoder.bias";
    let shifted = (&tensors[name] + 1.0).unwrap();
    tensors.insert(name.into(), shifted);
    let untied = d.join("untied.safetensors");
    candle_core::safetensors::save(&tensors, &untied).unwrap();
    let all = run(&untied, "albef-pth");
    assert!(all.contains(name) && all.contains("tied"), "{all}");

    // Not a checkpoint at all; a safetensors file of unknown names; no file.
    let junk = d.join("junk.bin");
    std::fs::write(&junk, b"this is not a checkpoint").unwrap();
    let all = run(&junk, "auto");
    assert!(
        all.contains("junk.bin") && all.contains("neither safetensors"),
        "{all}"
    );
    let other = d.join("other.safetensors");
    let t = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &HashMap::from([("decoder.lm_head.w".to_string(), t)]),
        &other,
    )
    .unwrap();
    let all = run(&other, "auto");
    assert!(all.contains("cannot tell the checkpoint format"), "{all}");
    assert!(all.contains("decoder.lm_head.w"), "{all}");
    let all = run(&d.join("absent.pth"), "auto");
    assert!(all.contains("absent.pth"), "{all}");
    let all = run(&junk, "gpt2");
    assert!(all.contains("unknown format `gpt2`"), "{all}");
    assert!(!out.exists(), "nothing is written on failure");
}

/// `vlp embed` of the captions of `caps.txt` (and `extra`, e.g. an image folder) into
/// `e.safetensors`, for the fixture tokenizer.
fn embed_args<'a>(checkpoint: &'a Path, tokenizer: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "embed",
        "--checkpoint",
        s(checkpoint),
        "--texts",
        "caps.txt",
    ];
    args.extend(["--tokenizer", s(tokenizer), "--max-tokens", "12"]);
    args.extend(["--out", "e.safetensors"]);
    args.extend(extra);
    args
}

/// A converted HF BLIP-ITM checkpoint (BLIP layout, no token types, no MLM head) serves
/// `vlp score` and `vlp embed` like our own.
#[test]
fn a_converted_blip_checkpoint_scores_and_embeds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("blip");
    convert_ok(&[
        s(&fixtures().join("hf/hf_blip/model.safetensors")),
        "--out",
        s(&out),
    ]);
    // A vocabulary inside the fixture's 200 ids, with its special-token ids.
    let tok = crate::common::bert_ids_tokenizer(d);
    let run = |args: &[&str]| {
        let o = Command::new(vlp_bin())
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let px = image::RgbImage::from_fn(20, 30, |x, y| {
        image::Rgb([(x * 9) as u8, (y * 7) as u8, 90])
    });
    std::fs::create_dir_all(d.join("imgs")).unwrap();
    px.save(d.join("imgs/a.png")).unwrap();
    let said = run(&[
        "score",
        "--checkpoint",
        s(&out),
        "--image",
        "imgs/a.png",
        "--text",
        "a smiling face",
        "--tokenizer",
        s(&tok),
        "--max-tokens",
        "12",
    ]);
    let scores: serde_json::Value = serde_json::from_str(said.lines().last().unwrap()).unwrap();
    let p = scores["pairs"][0]["itm_match_probability"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&p), "{scores}");
    std::fs::write(d.join("caps.txt"), "a smiling face\na red heart\n").unwrap();
    run(&embed_args(&out, &tok, &["--images", "imgs"]));
    let t = load(&d.join("e.safetensors"));
    assert_eq!(t["image_embeds"].dim(0).unwrap(), 1);
    assert_eq!(t["text_embeds"].dim(0).unwrap(), 2);
}

/// `--out` on a folder that holds a model replaced its weights without a word; now it
/// needs `--force`, and a training run's checkpoint is refused even with it.
#[test]
fn convert_refuses_to_replace_a_model_without_force_and_a_training_checkpoint_ever() {
    let dir = tempfile::tempdir().unwrap();
    let blip = fixtures().join("hf/hf_blip/model.safetensors");
    let out = dir.path().join("model");
    convert_ok(&[s(&blip), "--out", s(&out)]);
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    let all = convert_fails(&[s(&blip), "--out", s(&out)]);
    assert!(all.contains("already holds a model"), "{all}");
    assert!(all.contains("--force"), "{all}");
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        before
    );
    convert_ok(&[s(&blip), "--out", s(&out), "--force"]);
    assert_eq!(
        load(&out.join("model.safetensors")).len(),
        load_len(&before)
    );

    // A training checkpoint (its optimizer state beside the model), a run folder, and a
    // step folder of a run: never, --force or not.
    let step = dir.path().join("run/checkpoints/step-000010");
    std::fs::create_dir_all(&step).unwrap();
    for f in [
        "model.safetensors",
        "optim.safetensors",
        "state.json",
        "config.json",
    ] {
        std::fs::write(step.join(f), b"training").unwrap();
    }
    let run = dir.path().join("run");
    // A new folder under the run's checkpoints (the next save would sweep it away) or
    // anywhere inside the run: refused before it exists, and not created.
    let new_step = dir.path().join("run/checkpoints/step-000099");
    let inside = dir.path().join("run/converted");
    for target in [&step, &run, &new_step, &inside] {
        for force in [false, true] {
            let mut args = vec![s(&blip), "--out", s(target)];
            if force {
                args.push("--force");
            }
            let all = convert_fails(&args);
            assert!(all.contains("training run or checkpoint"), "{all}");
        }
    }
    assert_eq!(
        std::fs::read(step.join("model.safetensors")).unwrap(),
        b"training"
    );
    assert!(!new_step.exists() && !inside.exists());
    // Through a symbolic link into the run's checkpoints: refused as well.
    std::os::unix::fs::symlink(dir.path().join("run/checkpoints"), dir.path().join("lnk")).unwrap();
    let linked = dir.path().join("lnk/step-000008");
    let all = convert_fails(&[s(&blip), "--out", s(&linked)]);
    assert!(all.contains("training run or checkpoint"), "{all}");
    assert!(!dir.path().join("run/checkpoints/step-000008").exists());
    // A folder of downloaded checkpoints that happens to be named `checkpoints` is no run.
    let downloads = dir.path().join("checkpoints/blip-converted");
    std::fs::create_dir_all(dir.path().join("checkpoints")).unwrap();
    convert_ok(&[s(&blip), "--out", s(&downloads)]);
}

/// An HF BERT folder's tokenizer comes along: `vocab.txt` (+ `tokenizer_config.json`)
/// becomes a `tokenizer.json` in the output, a `tokenizer.json` is copied as it is, and a
/// vocabulary that does not fit the model is reported.
#[test]
fn convert_brings_the_tokenizer_beside_a_text_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_hf_fixture_config(dir.path());
    let src = dir.path().join("minilm");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(fixtures().join("hf/hf_bert").join(f), src.join(f)).unwrap();
    }
    // The fixture config's ids: [PAD] 0, [CLS] 1, [SEP] 2, [MASK] 3; 200 tokens in all.
    let mut vocab: Vec<String> = [
        "[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]", "hello", "world",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    while vocab.len() < 200 {
        vocab.push(format!("w{}", vocab.len()));
    }
    std::fs::write(src.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    std::fs::write(
        src.join("tokenizer_config.json"),
        r#"{"do_lower_case": true}"#,
    )
    .unwrap();
    let out = dir.path().join("init");
    let args = |out: &Path| {
        vec![
            "--from".to_string(),
            "hf-bert".into(),
            src.join("model.safetensors").display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--out".into(),
            out.display().to_string(),
        ]
    };
    let run = |out: &Path| {
        let a = args(out);
        let out = convert(&a.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let said = run(&out);
    assert!(
        said.contains("tokenizer.json (made from vocab.txt)"),
        "{said}"
    );
    assert!(!said.contains("warning"), "{said}");
    assert!(out.join("vocab.txt").is_file() && out.join("tokenizer_config.json").is_file());
    let tok = vlp_data::tokenize::TextTokenizer::from_file(out.join("tokenizer.json"), 16).unwrap();
    assert_eq!(tok.encode("Hello WORLD").unwrap(), vec![1, 5, 6, 2]);
    assert_eq!(tok.encode("unseen").unwrap(), vec![1, 4, 2]);

    // A tokenizer.json beside the model is copied byte for byte.
    std::fs::copy(out.join("tokenizer.json"), src.join("tokenizer.json")).unwrap();
    let again = dir.path().join("init2");
    let said = run(&again);
    assert!(
        said.contains("copied the tokenizer") && !said.contains("made from"),
        "{said}"
    );
    assert_eq!(
        std::fs::read(src.join("tokenizer.json")).unwrap(),
        std::fs::read(again.join("tokenizer.json")).unwrap()
    );

    // A vocabulary larger than the model's is copied, with a warning naming the sizes.
    std::fs::remove_file(src.join("tokenizer.json")).unwrap();
    while vocab.len() < 250 {
        vocab.push(format!("w{}", vocab.len()));
    }
    std::fs::write(src.join("vocab.txt"), vocab.join("\n") + "\n").unwrap();
    let said = run(&dir.path().join("init3"));
    assert!(said.contains("warning") && said.contains("250"), "{said}");
}

/// The safetensors writer creates its files owner-only; a converted model and an `embed`
/// output get the mode the umask gives, as the config beside the model does.
#[cfg(unix)]
#[test]
fn converted_models_and_embeddings_get_the_umasks_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("blip");
    let tok = crate::common::bert_ids_tokenizer(d);
    std::fs::write(d.join("caps.txt"), "a smiling face\n").unwrap();
    let under_umask_022 = |args: &[&str]| {
        let o = Command::new("sh")
            .arg("-c")
            .arg("umask 022 && exec \"$0\" \"$@\"")
            .arg(vlp_bin())
            .args(args)
            .current_dir(d)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    };
    let model = fixtures().join("hf/hf_blip/model.safetensors");
    under_umask_022(&["convert", s(&model), "--out", s(&out)]);
    under_umask_022(&embed_args(&out, &tok, &[]));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for file in [
        out.join("model.safetensors"),
        out.join("config.json"),
        d.join("e.safetensors"),
    ] {
        assert_eq!(mode(&file), 0o644, "{}", file.display());
    }
}

/// A bad tokenizer beside the model (not JSON, empty, not UTF-8, no `[CLS]`, too large)
/// fails the command before anything is written: no `--out` folder, or the one there as
/// it was; a good one into a folder that holds a model replaces it, leaving nothing
/// staged beside it.
#[test]
fn convert_checks_the_tokenizer_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let config = write_hf_fixture_config(d);
    let src = d.join("bert");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(fixtures().join("hf/hf_bert").join(f), src.join(f)).unwrap();
    }
    let model = src.join("model.safetensors");
    // `--from hf-bert MODEL --config CONFIG --out OUT [--force]`.
    fn args<'a>(model: &'a Path, config: &'a Path, out: &'a Path, force: bool) -> Vec<&'a str> {
        let mut a = vec!["--from", "hf-bert", s(model), "--config", s(config)];
        a.extend(["--out", s(out)]);
        if force {
            a.push("--force");
        }
        a
    }
    let staged = |out: &Path| {
        let name = format!(".{}.partial", out.file_name().unwrap().to_str().unwrap());
        out.with_file_name(name).exists()
    };
    let mut vocab: Vec<String> = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
        .iter()
        .map(|t| t.to_string())
        .collect();
    while vocab.len() < 200 {
        vocab.push(format!("w{}", vocab.len()));
    }
    let good_vocab = vocab.join("\n") + "\n";
    let set = |file: &str, bytes: &[u8]| {
        for f in ["tokenizer.json", "vocab.txt"] {
            let _ = std::fs::remove_file(src.join(f));
        }
        std::fs::write(src.join(file), bytes).unwrap();
    };
    let bad: [(&str, Vec<u8>, &str); 5] = [
        (
            "tokenizer.json",
            b"this is not JSON".to_vec(),
            "tokenizer.json",
        ),
        ("tokenizer.json", Vec::new(), "tokenizer.json"),
        (
            "tokenizer.json",
            b"{\"version\": \"\xff\xfe\"}".to_vec(),
            "tokenizer.json: not UTF-8",
        ),
        (
            "vocab.txt",
            good_vocab.replace("[CLS]", "cls").into_bytes(),
            "lacks [CLS]",
        ),
        (
            "vocab.txt",
            [good_vocab.as_bytes(), b"\xff\n"].concat(),
            "vocab.txt: not UTF-8",
        ),
    ];
    let fresh = d.join("fresh");
    let existing = d.join("existing");
    convert_ok(&args(&model, &config, &existing, false));
    let before: Vec<Vec<u8>> = ["model.safetensors", "config.json"]
        .iter()
        .map(|f| std::fs::read(existing.join(f)).unwrap())
        .collect();
    let check_refused = |said: &str| {
        let all = convert_fails(&args(&model, &config, &fresh, false));
        assert!(all.contains(said), "{all}");
        assert!(!fresh.exists() && !staged(&fresh), "{all}");
        let all = convert_fails(&args(&model, &config, &existing, true));
        assert!(all.contains(said), "{all}");
        assert!(!staged(&existing), "{all}");
        let now: Vec<Vec<u8>> = ["model.safetensors", "config.json"]
            .iter()
            .map(|f| std::fs::read(existing.join(f)).unwrap())
            .collect();
        assert!(now == before, "the model there changed: {all}");
        assert!(!existing.join("tokenizer.json").exists(), "{all}");
    };
    for (file, bytes, said) in &bad {
        set(file, bytes);
        check_refused(said);
    }
    // Refused from its size, before it is read (sparse: no disk or memory spent).
    set("vocab.txt", good_vocab.as_bytes());
    let huge = std::fs::File::create(src.join("tokenizer.json")).unwrap();
    huge.set_len((64 << 20) + 1).unwrap();
    check_refused("more than a tokenizer file holds");

    set("vocab.txt", good_vocab.as_bytes());
    convert_ok(&args(&model, &config, &existing, true));
    assert!(existing.join("tokenizer.json").is_file() && !staged(&existing));
}
