//! `vlp eval retrieval`, `vlp embed`, `vlp score` and `vlp bench eval` end to end on the
//! converted BLIP fixture (32 px, vocabulary 200): `--device`, a broken (NaN) checkpoint,
//! a set with a bad image, and the messages of failures.

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::Device;

use crate::common::{bert_ids_tokenizer, good_sample, path_str, text, vlp, write_tar, Member};

/// A checkpoint converted from the HF BLIP fixture and a tokenizer with its ids.
fn checkpoint(dir: &Path) -> (PathBuf, PathBuf) {
    let ckpt = dir.join("blip");
    let input =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/hf_blip/model.safetensors");
    let out = vlp(
        &["convert", &path_str(&input), "--out", &path_str(&ckpt)],
        dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    (ckpt, bert_ids_tokenizer(dir))
}

/// Six images with one caption each, and the given extra samples; returns the shard.
fn eval_set(dir: &Path, extra: Vec<(String, Vec<Member>)>) -> PathBuf {
    let mut samples: Vec<_> = (0..6).map(|i| good_sample(0, i)).collect();
    samples.extend(extra);
    let shard = dir.join("set-000000.tar");
    write_tar(&shard, &samples);
    shard
}

fn eval(dir: &Path, ckpt: &Path, tok: &Path, shard: &Path) -> Output {
    vlp(
        &[
            "eval",
            "retrieval",
            "--checkpoint",
            &path_str(ckpt),
            "--shards",
            &path_str(shard),
            "--tokenizer",
            &path_str(tok),
            "--k-test",
            "3",
            "--max-tokens",
            "12",
            "--no-progress",
        ],
        dir,
    )
}

/// The members of good sample `i` of shard 0, the one of extension `ext` changed by `f`.
fn good_sample_with(i: usize, ext: &str, f: impl Fn(&[u8]) -> Vec<u8>) -> Vec<Member> {
    let (_, members) = good_sample(0, i);
    members
        .into_iter()
        .map(|(e, bytes)| match e == ext {
            true => (e, f(&bytes)),
            false => (e, bytes),
        })
        .collect()
}

fn report(out: &Output) -> serde_json::Value {
    let stdout = text(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("a report line")).unwrap()
}

/// A checkpoint with one NaN in an attention weight made every score NaN, and NaN
/// compared as "not better" ranked every correct item first: R@1 100 and exit 0.
#[test]
fn a_checkpoint_with_a_nan_weight_is_no_perfect_model_and_fails_eval() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ckpt, tok) = checkpoint(d);
    let shard = eval_set(d, Vec::new());
    let good = eval(d, &ckpt, &tok, &shard);
    assert!(good.status.success(), "{}", text(&good.stderr));
    assert_eq!(report(&good)["non_finite_scores"], 0);

    let weights = ckpt.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    let mut names: Vec<String> = tensors
        .keys()
        .filter(|n| n.contains("attn") || n.contains("attention"))
        .filter(|n| n.ends_with("weight") && tensors[*n].rank() == 2)
        .cloned()
        .collect();
    names.sort();
    let name = names.first().expect("an attention weight").clone();
    let t = &tensors[&name];
    let mut values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    values[0] = f32::NAN;
    let poisoned = candle_core::Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap();
    tensors.insert(name.clone(), poisoned);
    candle_core::safetensors::save(&tensors, &weights).unwrap();

    let bad = eval(d, &ckpt, &tok, &shard);
    let (stdout, stderr) = (text(&bad.stdout), text(&bad.stderr));
    assert_eq!(bad.status.code(), Some(1), "{name}: {stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lower = stderr.to_lowercase();
    assert!(
        lower.contains("nan") || lower.contains("non-finite"),
        "the error names the problem: {stderr}"
    );
    // Where a report was written, nothing in it is a hit.
    if let Ok(r) = serde_json::from_str::<serde_json::Value>(stdout.lines().last().unwrap_or("")) {
        assert!(r["non_finite_scores"].as_u64().unwrap() > 0, "{r}");
        for ranking in ["itc", "reranked"] {
            assert_ne!(r[ranking]["tr1"], 100.0, "{r}");
            assert_ne!(r[ranking]["ir1"], 100.0, "{r}");
        }
    }
}

/// A bad image was logged twice (by the caption pass and the image pass), the second
/// time without its shard or reason.
#[test]
fn a_skipped_sample_is_logged_once_with_its_shard_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ckpt, tok) = checkpoint(d);
    let broken = (
        "broken-key".to_string(),
        vec![
            ("png".to_string(), b"not a png at all".to_vec()),
            ("txt".to_string(), b"000_9".to_vec()),
        ],
    );
    let shard = eval_set(d, vec![broken]);
    let out = eval(d, &ckpt, &tok, &shard);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stderr.matches("broken-key").count(), 1, "{stderr}");
    let line = stderr.lines().find(|l| l.contains("broken-key")).unwrap();
    assert!(line.contains("set-000000.tar"), "the shard: {line}");
    assert!(
        line.len() > line.find("broken-key").unwrap() + 20,
        "a reason: {line}"
    );
    assert_eq!(report(&out)["skipped_samples"], 1);
}

/// `--device cuda` on a build without CUDA: a clean failure naming the feature, from
/// every inference command.
#[test]
fn cuda_without_the_feature_is_a_clear_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let commands: [&[&str]; 4] = [
        &[
            "eval",
            "retrieval",
            "--checkpoint",
            "c",
            "--shards",
            "s.tar",
            "--tokenizer",
            "t.json",
        ],
        &[
            "embed",
            "--checkpoint",
            "c",
            "--texts",
            "t.txt",
            "--tokenizer",
            "t.json",
            "--out",
            "e.safetensors",
        ],
        &[
            "score",
            "--checkpoint",
            "c",
            "--image",
            "a.png",
            "--text",
            "a",
            "--tokenizer",
            "t.json",
        ],
        &[
            "bench",
            "eval",
            "--images",
            "2",
            "--k",
            "1",
            "--no-progress",
        ],
    ];
    for args in commands {
        let mut args = args.to_vec();
        args.extend(["--device", "cuda"]);
        let out = vlp(&args, d);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("--features cuda"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    let out = vlp(
        &[
            "score",
            "--checkpoint",
            "c",
            "--image",
            "a.png",
            "--text",
            "a",
            "--tokenizer",
            "t.json",
            "--device",
            "tpu",
        ],
        d,
    );
    assert!(
        text(&out.stderr).contains("unknown device `tpu`"),
        "{}",
        text(&out.stderr)
    );
}

/// Errors that print their cause inside their own message and also as their source were
/// printed as "X: X"; each part of a message is said once.
#[test]
fn a_missing_checkpoint_is_named_once_with_its_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = vlp(
        &[
            "eval",
            "retrieval",
            "--checkpoint",
            "nowhere",
            "--shards",
            "s.tar",
            "--tokenizer",
            "t.json",
        ],
        d,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let error = stderr.lines().find(|l| l.starts_with("error:")).unwrap();
    assert_eq!(error.matches("nowhere/config.json").count(), 1, "{error}");
    assert_eq!(
        error.matches("No such file or directory").count(),
        1,
        "{error}"
    );
}

/// The tokenizer check of eval, embed and score (its cases are unit-tested in vlp-eval): a
/// tokenizer larger than the model's vocabulary is refused, naming the file.
#[test]
fn a_tokenizer_that_does_not_fit_the_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ckpt, _) = checkpoint(d);
    let emoji = concat!(env!("CARGO_MANIFEST_DIR"), "/shards/emoji-tokenizer.json");
    let shard = eval_set(d, Vec::new());
    let out = eval(d, &ckpt, Path::new(emoji), &shard);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("emoji-tokenizer.json does not fit the model"),
        "{stderr}"
    );
}

/// A caption of punctuation only is no caption, by the training loader's rule: its sample
/// is skipped and counted, not scored as an image with an empty text.
#[test]
fn a_punctuation_only_caption_is_skipped_as_training_skips_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ckpt, tok) = checkpoint(d);
    let members = good_sample_with(7, "txt", |_| b"!!! ... ?".to_vec());
    let shard = eval_set(d, vec![("punct-key".to_string(), members)]);
    let out = eval(d, &ckpt, &tok, &shard);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("punct-key"))
        .expect(&stderr);
    assert!(line.contains("no usable caption"), "{line}");
    let report = report(&out);
    assert_eq!(report["skipped_samples"], 1, "{report}");
    assert_eq!(report["itc"]["images"], 6, "{report}");
}

/// A PNG whose header reads but whose data is cut short: eval retrieval and embed
/// --shards stopped ("header read but the image does not decode"); it is skipped and
/// counted as the training loader skips it.
#[test]
fn a_truncated_png_is_skipped_and_counted_by_eval_and_embed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ckpt, tok) = checkpoint(d);
    // The signature and IHDR (33 bytes) kept, the end of the data cut.
    let members = good_sample_with(8, "png", |png| png[..png.len() - 20].to_vec());
    let shard = eval_set(d, vec![("cut-key".to_string(), members)]);
    let out = eval(d, &ckpt, &tok, &shard);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("cut-key"))
        .expect(&stderr);
    assert!(line.contains("does not decode"), "{line}");
    let report = report(&out);
    assert_eq!(report["skipped_samples"], 1, "{report}");
    assert_eq!(report["itc"]["images"], 6, "{report}");

    let out = vlp(
        &[
            "embed",
            "--checkpoint",
            &path_str(&ckpt),
            "--shards",
            &path_str(&shard),
            "--out",
            "e.safetensors",
        ],
        d,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let embeds = candle_core::safetensors::load(d.join("e.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(embeds["image_embeds"].dims()[0], 6);
}

/// `vlp embed --out` replaced any file, a checkpoint's `model.safetensors` included, and
/// `eval retrieval --out` to an unwritable place failed after the whole evaluation: the
/// outputs are checked first, existing files need --force, and a run's files never.
#[test]
fn outputs_are_checked_before_the_work_and_never_replace_a_runs_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ckpt, tok) = checkpoint(d);
    let shard = eval_set(d, Vec::new());
    let embed = |out: &Path, force: bool| {
        let mut args = vec![
            "embed".to_string(),
            "--checkpoint".into(),
            path_str(&ckpt),
            "--shards".into(),
            path_str(&shard),
            "--out".into(),
            path_str(out),
        ];
        if force {
            args.push("--force".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        vlp(&args, d)
    };
    // A checkpoint of a run: never, --force or not.
    let step = d.join("run/checkpoints/step-000004");
    std::fs::create_dir_all(&step).unwrap();
    for f in ["model.safetensors", "state.json"] {
        std::fs::write(step.join(f), b"training").unwrap();
    }
    for force in [false, true] {
        let out = embed(&step.join("model.safetensors"), force);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("training run or checkpoint"),
            "{}",
            text(&out.stderr)
        );
    }
    assert_eq!(
        std::fs::read(step.join("model.safetensors")).unwrap(),
        b"training"
    );
    // Any other existing file: only with --force.
    let e = d.join("e.safetensors");
    std::fs::write(&e, b"mine").unwrap();
    let out = embed(&e, false);
    assert!(
        text(&out.stderr).contains("--force"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&e).unwrap(), b"mine");
    let out = embed(&e, true);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A report into a folder that does not exist: refused before evaluating.
    let mut args = vec![
        "eval",
        "retrieval",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--shards",
        shard.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--k-test",
        "3",
        "--max-tokens",
        "12",
        "--no-progress",
        "--out",
        "missing/report.json",
    ];
    let out = vlp(&args, d);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("does not exist"),
        "{stderr}"
    );
    assert!(!stderr.contains("TR@1"), "evaluated first: {stderr}");
    // A new file inside a checkpoint, or the report and the table in one file: refused.
    for (flag, target) in [
        ("--out", "run/checkpoints/step-000004/new.json"),
        ("--markdown", "run/checkpoints/new.md"),
    ] {
        let mut a = args.clone();
        a.truncate(a.len() - 2);
        a.extend([flag, target]);
        let out = vlp(&a, d);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("inside the training run"),
            "{stderr}"
        );
        assert!(!d.join(target).exists());
    }
    let mut a = args.clone();
    a.truncate(a.len() - 2);
    a.extend(["--out", "r.json", "--markdown", "r.json"]);
    let out = vlp(&a, d);
    assert!(
        text(&out.stderr).contains("name the same file"),
        "{}",
        text(&out.stderr)
    );
    // Into a run folder, as a new file, it is written.
    args.pop();
    args.push("run/eval-extra.json");
    let out = vlp(&args, d);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(d.join("run/eval-extra.json").is_file());
}

/// `bench eval` scored with `itm`, `eval retrieval` with `itm+itc`: the same flag, two
/// defaults. Both take the one default (`ScoreMode::default()`, `itm+itc`).
#[test]
fn bench_eval_and_eval_retrieval_default_to_the_same_score() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bench = vlp(
        &[
            "bench",
            "eval",
            "--images",
            "4",
            "--captions-per-image",
            "1",
            "--k",
            "2",
            "--no-progress",
        ],
        d,
    );
    assert!(bench.status.success(), "{}", text(&bench.stderr));
    let (ckpt, tok) = checkpoint(d);
    let shard = eval_set(d, Vec::new());
    let eval = eval(d, &ckpt, &tok, &shard);
    assert!(eval.status.success(), "{}", text(&eval.stderr));
    let default = vlp_eval::ScoreMode::default().to_string();
    assert_eq!(default, "itm+itc");
    assert_eq!(report(&bench)["score"], default.as_str());
    assert_eq!(report(&eval)["score"], default.as_str());
}

/// [`checkpoint`] (as paths for arguments) and a 32 px image `a.png` for `vlp score`.
fn checkpoint_and_image(dir: &Path) -> (String, String) {
    let (ckpt, tok) = checkpoint(dir);
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 30, 30]))
        .save(dir.join("a.png"))
        .unwrap();
    (path_str(&ckpt), path_str(&tok))
}

/// `vlp score` scored "", "   " and "!!! ..." and `vlp embed --texts` embedded "!!! ...",
/// though training and evaluation call such captions unusable: score refuses one, naming
/// it; embed skips and counts such lines, its `text_lines` keying the captions embedded.
#[test]
fn score_refuses_and_embed_skips_captions_that_clean_to_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ckpt, tok) = checkpoint_and_image(d);
    for bad in ["", "   ", "!!! ..."] {
        let out = vlp(
            &[
                "score",
                "--checkpoint",
                &ckpt,
                "--image",
                "a.png",
                "--text",
                "a red square",
                "--text",
                bad,
                "--tokenizer",
                &tok,
            ],
            d,
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {stderr}");
        assert!(
            stderr.contains(&format!("--text: caption 2 {bad:?}")) && stderr.contains("cleaning"),
            "{stderr}"
        );
        assert!(
            text(&out.stdout).is_empty(),
            "scored: {}",
            text(&out.stdout)
        );
    }

    std::fs::write(
        d.join("t.txt"),
        "a red square\n\n!!! ...\n?!\na blue circle\n",
    )
    .unwrap();
    let out = vlp(
        &[
            "embed",
            "--checkpoint",
            &ckpt,
            "--texts",
            "t.txt",
            "--tokenizer",
            &tok,
            "--out",
            "e.safetensors",
        ],
        d,
    );
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("skipped 2 lines that clean to no caption (line 3, 4)"),
        "{stderr}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["skipped_texts"], 2, "{summary}");
    assert_eq!(summary["tensors"]["text_embeds"][0], 2, "{summary}");
    let bytes = std::fs::read(d.join("e.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let lines: Vec<usize> =
        serde_json::from_str(&meta.metadata().clone().unwrap()["text_lines"]).unwrap();
    assert_eq!(lines, [1, 5]);

    // Nothing usable at all: an error, no file.
    std::fs::write(d.join("p.txt"), "...\n!!!\n").unwrap();
    let out = vlp(
        &[
            "embed",
            "--checkpoint",
            &ckpt,
            "--texts",
            "p.txt",
            "--tokenizer",
            &tok,
            "--out",
            "p.safetensors",
        ],
        d,
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no usable caption"), "{stderr}");
    assert!(!d.join("p.safetensors").exists());
}

/// `vlp score --image-size 4096` on a small model aborted on a 17 GB allocation (exit
/// 134): every size is checked against what the model and memory allow first, and refused
/// with a message naming the flag and the range.
#[test]
fn image_sizes_and_batches_past_what_the_model_allows_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ckpt, tok) = checkpoint_and_image(d);
    let score = ["score", "--checkpoint", &ckpt, "--image", "a.png"];
    let score = [&score[..], &["--text", "a red square", "--tokenizer", &tok]].concat();
    let range = "must be a multiple of 8 from 8 to 128 px (4x the 32 px";
    for (extra, expected) in [
        (
            &["--image-size", "4096"][..],
            format!("--image-size 4096: {range}"),
        ),
        (&["--image-size", "36"], format!("--image-size 36: {range}")),
    ] {
        let out = vlp(&[&score[..], extra].concat(), d);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {stderr}");
        assert!(stderr.contains(&expected), "{stderr}");
    }
    let at_128 = vlp(&[&score[..], &["--image-size", "128"]].concat(), d);
    assert!(at_128.status.success(), "{}", text(&at_128.stderr));

    let embed = [
        "embed",
        "--checkpoint",
        &ckpt,
        "--images",
        ".",
        "--out",
        "e.safetensors",
    ];
    let out = vlp(&[&embed[..], &["--batch-size", "1000000000"]].concat(), d);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--batch-size 1000000000: 1000000000 images of 32 px are estimated"),
        "{stderr}"
    );
}
