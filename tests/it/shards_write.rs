//! End-to-end tests of `vlp shards write` and `vlp shards synth`: run the built binary on
//! tiny inputs in a temporary directory and read the shards back with the `tar` crate; and,
//! when `VLP_PYTHON` names a Python with `webdataset` installed, with Python's `webdataset`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vlp_data::image_ops::{EvalTransform, ImageTransform};
use vlp_data::loader::{Loader, LoaderConfig};

use crate::common::{all_batches, small_cfg, tokenizer, vlp};

fn vlp_ok(args: &[&str], cwd: &Path) -> String {
    let out = vlp(args, cwd);
    assert!(
        out.status.success(),
        "vlp {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Tar members `(name, bytes)` in archive order.
fn members(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut ar = tar::Archive::new(fs::File::open(path).unwrap());
    ar.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            (name, data)
        })
        .collect()
}

fn names(members: &[(String, Vec<u8>)]) -> Vec<&str> {
    members.iter().map(|m| m.0.as_str()).collect()
}

fn member<'a>(members: &'a [(String, Vec<u8>)], name: &str) -> &'a [u8] {
    &members
        .iter()
        .find(|m| m.0 == name)
        .unwrap_or_else(|| panic!("no member {name} in {:?}", names(members)))
        .1
}

fn json_of(members: &[(String, Vec<u8>)], name: &str) -> serde_json::Value {
    serde_json::from_slice(member(members, name)).unwrap()
}

fn manifest(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn save(dir: &Path, rel: &str, w: u32, h: u32, format: image::ImageFormat) -> PathBuf {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]));
    img.save_with_format(&p, format).unwrap();
    p
}

fn jpg(dir: &Path, rel: &str, w: u32, h: u32) -> PathBuf {
    save(dir, rel, w, h, image::ImageFormat::Jpeg)
}

fn png(dir: &Path, rel: &str, w: u32, h: u32) -> PathBuf {
    save(dir, rel, w, h, image::ImageFormat::Png)
}

#[test]
fn write_json_merges_captions_of_one_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = jpg(d, "data/images/a.jpeg", 12, 8);
    png(d, "data/images/b.png", 6, 6);
    fs::write(
        d.join("data/ann.json"),
        r#"[
            {"image": "images/a.jpeg", "caption": "a first caption", "image_id": "coco_1"},
            {"image": "images/b.png", "caption": "only one for b", "image_id": 2},
            {"image": "images/a.jpeg", "caption": "a second caption", "image_id": "coco_1"}
        ]"#,
    )
    .unwrap();
    let stdout = vlp_ok(
        &[
            "shards",
            "write",
            "--json",
            "data/ann.json",
            "--out",
            "out/train",
            "--per-shard",
            "1",
        ],
        d,
    );
    assert!(
        stdout.contains("wrote 2 samples") && stdout.contains("skipped 0"),
        "{stdout}"
    );
    assert!(stdout.contains("out/train-manifest.json"), "{stdout}");

    let m = manifest(&d.join("out/train-manifest.json"));
    assert_eq!(m["format"], "vlp-shards/1");
    assert_eq!(m["samples"], 2);
    assert_eq!(m["shards"][0]["file"], "train-000000.tar");
    assert_eq!(m["shards"][1]["file"], "train-000001.tar");
    for s in m["shards"].as_array().unwrap() {
        assert_eq!(s["samples"], 1);
        let len = fs::metadata(d.join("out").join(s["file"].as_str().unwrap()))
            .unwrap()
            .len();
        assert_eq!(s["bytes"], len);
    }

    let first = members(&d.join("out/train-000000.tar"));
    assert_eq!(
        names(&first),
        ["000000000.jpg", "000000000.json"],
        "two captions: no txt"
    );
    assert_eq!(
        member(&first, "000000000.jpg"),
        fs::read(&a).unwrap(),
        "original bytes kept"
    );
    let meta = json_of(&first, "000000000.json");
    assert_eq!(
        meta,
        serde_json::json!({
            "caption": ["a first caption", "a second caption"],
            "image_id": "coco_1",
            "source": "images/a.jpeg"
        })
    );
    let second = members(&d.join("out/train-000001.tar"));
    assert_eq!(
        names(&second),
        ["000000001.png", "000000001.txt", "000000001.json"]
    );
    assert_eq!(member(&second, "000000001.txt"), b"only one for b");
    assert_eq!(json_of(&second, "000000001.json")["image_id"], "2");
}

#[test]
fn write_json_per_caption_gives_one_sample_per_caption_with_the_image_id() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = jpg(d, "img/a.jpg", 10, 10);
    jpg(d, "img/b.jpg", 10, 10);
    fs::write(
        d.join("train.json"),
        r#"[
            {"image": "img/a.jpg", "caption": "first of a", "image_id": "coco_1"},
            {"image": "img/a.jpg", "caption": "second of a", "image_id": "coco_1"},
            {"image": "img/b.jpg", "caption": "only b"}
        ]"#,
    )
    .unwrap();
    let stdout = vlp_ok(
        &[
            "shards",
            "write",
            "--json",
            "train.json",
            "--out",
            "out/t",
            "--per-caption",
        ],
        d,
    );
    assert!(stdout.contains("wrote 3 samples"), "{stdout}");
    // `--format albef-json` is the same thing, spelled as ALBEF users expect.
    let again = vlp_ok(
        &[
            "shards",
            "write",
            "--json",
            "train.json",
            "--out",
            "out/u",
            "--format",
            "albef-json",
        ],
        d,
    );
    assert!(again.contains("wrote 3 samples"), "{again}");
    assert_eq!(
        fs::read(d.join("out/u-000000.tar")).unwrap(),
        fs::read(d.join("out/t-000000.tar")).unwrap()
    );
    let m = members(&d.join("out/t-000000.tar"));
    let metas: Vec<serde_json::Value> = (0..3)
        .map(|i| json_of(&m, &format!("{i:09}.json")))
        .collect();
    let got: Vec<(&str, &str)> = metas
        .iter()
        .map(|j| {
            (
                j["caption"].as_str().unwrap(),
                j["image_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("first of a", "coco_1"),
            ("second of a", "coco_1"),
            ("only b", "img/b.jpg")
        ]
    );
    assert_eq!(member(&m, "000000001.jpg"), fs::read(&a).unwrap());
}

#[test]
fn write_folder_reads_caption_sidecars() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "photos/cats/one.png", 5, 5);
    jpg(d, "photos/dogs/two.jpg", 5, 5);
    fs::write(d.join("photos/cats/one.txt"), "a cat\n\na sleeping cat\n").unwrap();
    fs::write(d.join("photos/dogs/two.txt"), "a dog\n").unwrap();
    vlp_ok(
        &["shards", "write", "--folder", "photos", "--out", "shards/f"],
        d,
    );
    let ms = members(&d.join("shards/f-000000.tar"));
    assert_eq!(
        names(&ms),
        [
            "000000000.png",
            "000000000.json",
            "000000001.jpg",
            "000000001.txt",
            "000000001.json"
        ]
    );
    let meta = json_of(&ms, "000000000.json");
    assert_eq!(
        meta["caption"],
        serde_json::json!(["a cat", "a sleeping cat"])
    );
    assert_eq!(meta["source"], "cats/one.png");
    assert!(meta.get("image_id").is_none());
    assert_eq!(member(&ms, "000000001.txt"), b"a dog");
    assert_eq!(manifest(&d.join("shards/f-manifest.json"))["samples"], 2);

    // An image without a caption file is an error naming it, or skipped on request.
    png(d, "photos/lonely.png", 4, 4);
    let out = vlp(
        &["shards", "write", "--folder", "photos", "--out", "shards/g"],
        d,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lonely.png"), "{err}");
    assert!(!d.join("shards/g-000000.tar").exists());
    let stdout = vlp_ok(
        &[
            "shards",
            "write",
            "--folder",
            "photos",
            "--out",
            "shards/g",
            "--skip-missing",
        ],
        d,
    );
    assert!(
        stdout.contains("wrote 2 samples") && stdout.contains("skipped 1"),
        "{stdout}"
    );
}

#[test]
fn write_csv_with_quoted_commas_and_tsv() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "imgs/x.png", 4, 4);
    png(d, "imgs/y.png", 4, 4);
    fs::write(
        d.join("meta.csv"),
        "filepath,title\nimgs/x.png,\"a red, round thing\"\nimgs/y.png,\"she said \"\"hi\"\"\"\n",
    )
    .unwrap();
    vlp_ok(
        &["shards", "write", "--csv", "meta.csv", "--out", "c/csv"],
        d,
    );
    let ms = members(&d.join("c/csv-000000.tar"));
    assert_eq!(member(&ms, "000000000.txt"), b"a red, round thing");
    assert_eq!(member(&ms, "000000001.txt"), b"she said \"hi\"");
    assert_eq!(json_of(&ms, "000000001.json")["source"], "imgs/y.png");

    // TSV with other column names and an image root elsewhere.
    fs::create_dir_all(d.join("lists")).unwrap();
    fs::write(
        d.join("lists/meta.tsv"),
        "path\ttext\nx.png\tcommas, fine here\n",
    )
    .unwrap();
    vlp_ok(
        &[
            "shards",
            "write",
            "--csv",
            "lists/meta.tsv",
            "--image-root",
            "imgs",
            "--image-col",
            "path",
            "--caption-col",
            "text",
            "--out",
            "c/tsv",
        ],
        d,
    );
    let ms = members(&d.join("c/tsv-000000.tar"));
    assert_eq!(
        names(&ms),
        ["000000000.png", "000000000.txt", "000000000.json"]
    );
    assert_eq!(member(&ms, "000000000.txt"), b"commas, fine here");

    // A missing column is reported with the columns that exist.
    let out = vlp(
        &[
            "shards",
            "write",
            "--csv",
            "lists/meta.tsv",
            "--out",
            "c/bad",
        ],
        d,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`path`, `text`"), "{err}");
}

#[test]
fn write_resize_max_bounds_the_longer_side() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    jpg(d, "i/wide.jpg", 64, 20);
    png(d, "i/tall.png", 10, 50);
    png(d, "i/small.png", 8, 8);
    fs::write(
        d.join("ann.json"),
        r#"[{"image": "i/wide.jpg", "caption": "wide"},
            {"image": "i/tall.png", "caption": "tall"},
            {"image": "i/small.png", "caption": "small"}]"#,
    )
    .unwrap();
    let stdout = vlp_ok(
        &[
            "shards",
            "write",
            "--json",
            "ann.json",
            "--out",
            "r/s",
            "--resize-max",
            "16",
        ],
        d,
    );
    assert!(stdout.contains("2 images re-encoded"), "{stdout}");
    let ms = members(&d.join("r/s-000000.tar"));
    let dims = |name: &str| {
        image::load_from_memory(member(&ms, name))
            .unwrap()
            .to_rgb8()
            .dimensions()
    };
    assert_eq!(dims("000000000.jpg"), (16, 5));
    assert_eq!(dims("000000001.png"), (3, 16));
    assert_eq!(dims("000000002.png"), (8, 8), "never upscaled");
    assert_eq!(
        member(&ms, "000000002.png"),
        fs::read(d.join("i/small.png")).unwrap()
    );

    // --format jpg re-encodes everything to JPEG.
    vlp_ok(
        &[
            "shards",
            "write",
            "--json",
            "ann.json",
            "--out",
            "r/j",
            "--format",
            "jpg",
            "--quality",
            "80",
        ],
        d,
    );
    let ms = members(&d.join("r/j-000000.tar"));
    assert_eq!(
        names(&ms),
        [
            "000000000.jpg",
            "000000000.txt",
            "000000000.json",
            "000000001.jpg",
            "000000001.txt",
            "000000001.json",
            "000000002.jpg",
            "000000002.txt",
            "000000002.json"
        ]
    );
}

#[test]
fn write_shuffle_seed_reorders_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ann = Vec::new();
    for i in 0..12 {
        png(d, &format!("i/{i}.png"), 3, 3);
        ann.push(serde_json::json!({"image": format!("i/{i}.png"), "caption": format!("c{i}")}));
    }
    fs::write(d.join("ann.json"), serde_json::to_vec(&ann).unwrap()).unwrap();
    let captions = |prefix: &str| -> Vec<String> {
        let ms = members(&d.join(format!("{prefix}-000000.tar")));
        ms.iter()
            .filter(|m| m.0.ends_with(".txt"))
            .map(|m| String::from_utf8(m.1.clone()).unwrap())
            .collect()
    };
    for p in ["s/a", "s/b"] {
        vlp_ok(
            &[
                "shards",
                "write",
                "--json",
                "ann.json",
                "--out",
                p,
                "--shuffle-seed",
                "4",
            ],
            d,
        );
    }
    let a = captions("s/a");
    assert_eq!(a, captions("s/b"));
    let in_order: Vec<String> = (0..12).map(|i| format!("c{i}")).collect();
    assert_ne!(a, in_order);
    let mut sorted = a.clone();
    sorted.sort_by_key(|c| c[1..].parse::<u32>().unwrap());
    assert_eq!(sorted, in_order);
}

#[test]
fn write_missing_image_fails_unless_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png", 3, 3);
    fs::write(
        d.join("ann.json"),
        r#"[{"image": "a.png", "caption": "here"}, {"image": "gone.png", "caption": "not here"}]"#,
    )
    .unwrap();
    let out = vlp(
        &["shards", "write", "--json", "ann.json", "--out", "m/x"],
        d,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ann.json, entry 1") && err.contains("gone.png"),
        "{err}"
    );
    let stdout = vlp_ok(
        &[
            "shards",
            "write",
            "--json",
            "ann.json",
            "--out",
            "m/x",
            "--skip-missing",
        ],
        d,
    );
    assert!(
        stdout.contains("wrote 1 samples") && stdout.contains("skipped 1"),
        "{stdout}"
    );
}

#[test]
fn synth_same_seed_gives_identical_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = |out: &'static str, seed: &'static str| {
        vec![
            "shards",
            "synth",
            "--out",
            out,
            "--count",
            "10",
            "--per-shard",
            "4",
            "--image-size",
            "32",
            "--seed",
            seed,
        ]
    };
    vlp_ok(&args("a/syn", "7"), d);
    vlp_ok(&args("b/syn", "7"), d);
    vlp_ok(&args("c/syn", "8"), d);
    let m = manifest(&d.join("a/syn-manifest.json"));
    assert_eq!(m["samples"], 10);
    assert_eq!(m["shards"].as_array().unwrap().len(), 3);
    for i in 0..3 {
        let name = format!("syn-{i:06}.tar");
        assert_eq!(
            fs::read(d.join("a").join(&name)).unwrap(),
            fs::read(d.join("b").join(&name)).unwrap()
        );
    }
    assert_eq!(
        fs::read(d.join("a/syn-manifest.json")).unwrap(),
        fs::read(d.join("b/syn-manifest.json")).unwrap()
    );
    assert_ne!(
        fs::read(d.join("a/syn-000000.tar")).unwrap(),
        fs::read(d.join("c/syn-000000.tar")).unwrap()
    );

    let ms = members(&d.join("a/syn-000000.tar"));
    assert_eq!(names(&ms)[..2], ["000000000.png", "000000000.json"]);
    let meta = json_of(&ms, "000000000.json");
    let caps = meta["caption"].as_array().unwrap();
    assert_eq!(caps.len(), 2);
    assert!(caps.iter().all(|c| c.as_str().unwrap().starts_with("a ")));
    assert_eq!(meta["image_id"], "synth-s7-000000000");
    let img = image::load_from_memory(member(&ms, "000000000.png")).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
}

/// Runs `scripts/check_webdataset.py` with the Python named by `VLP_PYTHON`.
fn python_check(python: &str, spec: &str, expected: u64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_webdataset.py");
    let out = Command::new(python)
        .arg(&script)
        .arg(spec)
        .arg(expected.to_string())
        .output()
        .expect("run the Python check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "Python webdataset check failed for {spec}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["samples"], expected);
}

#[test]
#[cfg_attr(not(vlp_python), ignore = "needs VLP_PYTHON, a Python with webdataset")]
fn python_webdataset_reads_the_shards() {
    let python = crate::common::gates::PYTHON.required();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    vlp_ok(
        &[
            "shards",
            "synth",
            "--out",
            "py/syn",
            "--count",
            "30",
            "--per-shard",
            "8",
            "--image-size",
            "32",
        ],
        d,
    );
    python_check(
        &python,
        &d.join("py/syn-{000000..000003}.tar").to_string_lossy(),
        30,
    );

    // Real-data path: JPEG, PNG with alpha and WebP inputs, one and several captions.
    jpg(d, "i/a.jpg", 9, 7);
    save(d, "i/c.webp", 6, 6, image::ImageFormat::WebP);
    let rgba = image::RgbaImage::from_pixel(5, 5, image::Rgba([10, 200, 10, 128]));
    rgba.save_with_format(d.join("i/b.png"), image::ImageFormat::Png)
        .unwrap();
    fs::write(
        d.join("ann.json"),
        r#"[{"image": "i/a.jpg", "caption": ["one", "two"]},
            {"image": "i/b.png", "caption": "alpha"},
            {"image": "i/c.webp", "caption": "webp", "image_id": 3}]"#,
    )
    .unwrap();
    vlp_ok(
        &[
            "shards",
            "write",
            "--json",
            "ann.json",
            "--out",
            "py/real",
            "--per-shard",
            "2",
        ],
        d,
    );
    python_check(&python, &d.join("py/real-*.tar").to_string_lossy(), 3);
    vlp_ok(
        &[
            "shards",
            "write",
            "--json",
            "ann.json",
            "--out",
            "py/jpg",
            "--format",
            "jpg",
            "--resize-max",
            "4",
        ],
        d,
    );
    python_check(&python, &d.join("py/jpg-000000.tar").to_string_lossy(), 3);
}

#[test]
fn shards_written_by_vlp_read_back_identically() {
    use vlp_data::image_ops::{Normalization, CLIP_MEAN, CLIP_STD};
    use vlp_data::loader::CaptionChoice;
    let dir = tempfile::tempdir().unwrap();
    let mut records = Vec::new();
    let mut originals = Vec::new();
    for i in 0..7u32 {
        let img = image::RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([(x * 30) as u8, (y * 30) as u8, (i * 35) as u8])
        });
        let name = format!("img{i}.png");
        img.save(dir.path().join(&name)).unwrap();
        originals.push(img);
        records.push(serde_json::json!({
            "image": name,
            "caption": [format!("Caption {i}, first!"), format!("caption {i} second")],
            "image_id": format!("id{i}"),
        }));
    }
    let ann = dir.path().join("ann.json");
    std::fs::write(&ann, serde_json::to_string(&records).unwrap()).unwrap();
    let prefix = dir.path().join("out/rt");
    vlp_ok(
        &[
            "shards",
            "write",
            "--json",
            ann.to_str().unwrap(),
            "--out",
            prefix.to_str().unwrap(),
            "--per-shard",
            "3",
        ],
        dir.path(),
    );
    let spec = format!("{}-{{000000..000002}}.tar", prefix.display());
    let cfg = LoaderConfig {
        workers: 1,
        batch_size: 7,
        shuffle_shards: false,
        shuffle_buffer: 1,
        caption_choice: CaptionChoice::First,
        image: ImageTransform::Eval(EvalTransform { size: 8 }),
        normalization: Normalization::Clip,
        ..small_cfg()
    };
    let mut loader = Loader::new(&spec, cfg, tokenizer(16)).unwrap();
    assert_eq!(loader.samples_in_epoch(0), Some(7), "from the manifest");
    let batches = all_batches(&mut loader);
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(
        b.captions,
        (0..7)
            .map(|i| format!("caption {i} first"))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        b.image_ids,
        (0..7).map(|i| format!("id{i}")).collect::<Vec<_>>()
    );
    let pixels = b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, img) in originals.iter().enumerate() {
        for c in 0..3 {
            for (p, px) in img.pixels().enumerate() {
                let expected = (px[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
                let got = pixels[i * 192 + c * 64 + p];
                assert!(
                    (got - expected).abs() < 1e-5,
                    "sample {i} channel {c} pixel {p}: {got} vs {expected}"
                );
            }
        }
    }
}

#[test]
fn write_skips_undecodable_images_unless_strict() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png", 3, 3);
    png(d, "b.png", 4, 3);
    fs::write(d.join("broken.jpg"), b"\xff\xd8 this is not a jpeg").unwrap();
    fs::write(d.join("zero.png"), b"").unwrap();
    fs::write(
        d.join("ann.json"),
        r#"[{"image": "a.png", "caption": "one"}, {"image": "broken.jpg", "caption": "two"},
            {"image": "zero.png", "caption": "three"}, {"image": "b.png", "caption": "four"}]"#,
    )
    .unwrap();
    let stdout = vlp_ok(
        &["shards", "write", "--json", "ann.json", "--out", "o/x"],
        d,
    );
    assert!(
        stdout.contains("wrote 2 samples")
            && stdout.contains("skipped 2 images that cannot be used: bad_image=2")
            && stdout.contains("broken.jpg")
            && stdout.contains("zero.png"),
        "{stdout}"
    );
    assert_eq!(manifest(&d.join("o/x-manifest.json"))["samples"], 2);

    let out = vlp(
        &[
            "shards", "write", "--json", "ann.json", "--out", "s/x", "--strict",
        ],
        d,
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.jpg") && err.contains("bad_image"),
        "{err}"
    );
}

#[test]
fn write_summary_counts_what_was_written_and_every_skip() {
    // Two usable images with three captions, one undecodable image with two captions and
    // one entry whose image is missing: the summary counts the two samples and their
    // three captions, and both skipped entries.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png", 3, 3);
    png(d, "b.png", 4, 3);
    fs::write(d.join("broken.jpg"), b"\xff\xd8 this is not a jpeg").unwrap();
    fs::write(
        d.join("ann.json"),
        r#"[{"image": "a.png", "caption": ["one", "two"]},
            {"image": "broken.jpg", "caption": ["three", "four"]},
            {"image": "gone.png", "caption": "five"},
            {"image": "b.png", "caption": "six"}]"#,
    )
    .unwrap();
    let args: Vec<&str> = "shards write --json ann.json --out o/x --skip-missing"
        .split(' ')
        .collect();
    let stdout = vlp_ok(&args, d);
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("wrote "))
        .unwrap_or_else(|| panic!("no summary line in {stdout}"));
    assert!(
        summary.starts_with("wrote 2 samples (3 captions) in 1 shards")
            && summary.ends_with("skipped 2 (1 missing, 1 that cannot be used)"),
        "{stdout}"
    );
    assert_eq!(manifest(&d.join("o/x-manifest.json"))["samples"], 2);
}

#[test]
fn inspect_fails_when_no_shard_can_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = vlp(&["shards", "inspect", "gone-{0..2}.tar"], d);
    assert!(!out.status.success(), "every shard missing must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("none of the 3 shards gave a sample") && err.contains("missing_shard=3"),
        "{err}"
    );
    // One readable shard among missing ones: a report, not a failure.
    png(d, "a.png", 3, 3);
    fs::write(
        d.join("ann.json"),
        r#"[{"image": "a.png", "caption": "one"}]"#,
    )
    .unwrap();
    vlp_ok(
        &["shards", "write", "--json", "ann.json", "--out", "ok/x"],
        d,
    );
    let stdout = vlp_ok(&["shards", "inspect", "ok/x-000000.tar::gone-0.tar"], d);
    assert!(stdout.contains("missing_shard=1"), "{stdout}");
}

#[test]
fn inspect_counts_punctuation_only_captions_as_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    png(d, "a.png", 3, 3);
    png(d, "b.png", 3, 4);
    fs::write(
        d.join("ann.json"),
        r#"[{"image": "a.png", "caption": "!!! ..."}, {"image": "b.png", "caption": ["a dog", "?!"]}]"#,
    )
    .unwrap();
    vlp_ok(
        &["shards", "write", "--json", "ann.json", "--out", "p/x"],
        d,
    );
    let stdout = vlp_ok(&["shards", "inspect", "--json", "p/x-000000.tar"], d);
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let total = &report["total"];
    assert_eq!(total["samples"], 2, "{total}");
    assert_eq!(total["good"], 1, "{total}");
    assert_eq!(total["captions"], 1, "{total}");
    assert_eq!(total["skipped"]["missing_caption"], 1, "{total}");
}
