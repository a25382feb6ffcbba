//! The data commands end to end through the binary: synth -> tokenizer train -> inspect
//! -> bench loader, and `inspect` reporting bad samples by reason.

use std::process::Command;

use crate::common::*;

fn vlp(args: &[&str]) -> String {
    let out = Command::new(vlp_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run vlp");
    assert!(
        out.status.success(),
        "vlp {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON last line")
}

#[test]
fn synth_tokenizer_inspect_bench() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("synth");
    let prefix = prefix.to_str().unwrap();
    vlp(&[
        "shards",
        "synth",
        "--out",
        prefix,
        "--count",
        "40",
        "--per-shard",
        "10",
        "--image-size",
        "32",
    ]);
    let spec = format!("{prefix}-{{000000..000003}}.tar");
    let tok = dir.path().join("tok.json");
    let said = vlp(&[
        "tokenizer",
        "train",
        &spec,
        "--out",
        tok.to_str().unwrap(),
        "--vocab-size",
        "120",
        "--min-frequency",
        "1",
    ]);
    assert!(said.contains("trained on 80 captions"), "{said}");
    let t = vlp_data::tokenize::TextTokenizer::from_file(&tok, 30).unwrap();
    assert_eq!(t.token_id("[MASK]"), Some(4));
    let ids = t.encode("a small red circle").unwrap();
    assert!(
        !ids.contains(&1),
        "caption words are in the vocabulary, no [UNK]: {ids:?}"
    );

    let report = last_json(&vlp(&["shards", "inspect", &spec, "--json"]));
    assert_eq!(report["total"]["samples"], 40);
    assert_eq!(report["total"]["good"], 40);
    assert_eq!(report["total"]["captions"], 80);
    assert_eq!(report["shards"].as_array().unwrap().len(), 4);

    let bench = last_json(&vlp(&[
        "bench",
        "loader",
        &spec,
        "--tokenizer",
        tok.to_str().unwrap(),
        "--seconds",
        "0.5",
        "--decode-seconds",
        "0.2",
        "--batch-size",
        "8",
        "--image-size",
        "32",
    ]));
    assert!(bench["samples_per_s"].as_f64().unwrap() > 0.0, "{bench}");
    assert!(
        bench["decode_only_samples_per_s"].as_f64().unwrap() > 0.0,
        "{bench}"
    );
    assert!(bench["peak_rss_mb"].as_f64().unwrap() > 1.0, "{bench}");
}

#[test]
fn inspect_reports_bad_samples_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let samples = vec![
        good_sample(0, 0),
        (
            "bad".to_string(),
            vec![
                ("jpg".to_string(), b"xx".to_vec()),
                ("txt".to_string(), b"c".to_vec()),
            ],
        ),
        ("nocap".to_string(), vec![("png".to_string(), png(4, 4, 0))]),
    ];
    let shard = dir.path().join("s.tar");
    write_tar(&shard, &samples);
    let spec = format!(
        "{}::{}",
        shard.display(),
        dir.path().join("gone.tar").display()
    );
    let report = last_json(&vlp(&["shards", "inspect", &spec, "--json"]));
    let skipped = &report["total"]["skipped"];
    assert_eq!(skipped["bad_image"], 1, "{report}");
    assert_eq!(skipped["missing_caption"], 1, "{report}");
    assert_eq!(skipped["missing_shard"], 1, "{report}");
    assert_eq!(report["total"]["good"], 1);
    assert!(
        report["bad"].to_string().contains("s.tar bad: bad_image"),
        "{report}"
    );
}

#[test]
fn bench_step_times_the_full_pretraining_step_on_a_reference_config() {
    // The reference implementation's own config format, as the side-by-side benchmark uses.
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/albef/config.json"
    );
    let out = last_json(&vlp(&[
        "bench",
        "step",
        "--full",
        "--config",
        config,
        "--batch-size",
        "4",
        "--text-len",
        "8",
        "--steps",
        "2",
        "--warmup",
        "1",
    ]));
    assert_eq!(out["step"], "full", "{out}");
    assert!(out["samples_per_s"].as_f64().unwrap() > 0.0, "{out}");
    assert!(out["trainable_params"].as_u64().unwrap() > 10_000, "{out}");
}

#[test]
fn bench_step_times_a_recipes_own_step_and_its_overrides() {
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/quickstart.toml");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "step",
            "--recipe",
            recipe,
            "--batch-size",
            "4",
            "--steps",
            "1",
            "--warmup",
            "0",
        ];
        args.extend_from_slice(extra);
        last_json(&vlp(&args))
    };
    let out = run(&[]);
    assert_eq!(out["step"], "full", "{out}");
    assert_eq!(out["batch_size"], 4, "{out}");
    // The recipe's caption length (data.max_tokens) when --text-len is not given.
    assert!(out["text_len"].as_u64().unwrap() >= 8, "{out}");
    assert!(out["samples_per_s"].as_f64().unwrap() > 0.0, "{out}");
    // --set reaches the recipe, and a bad key is refused by name.
    let bad = Command::new(env!("CARGO_BIN_EXE_vlp"))
        .args([
            "bench",
            "step",
            "--recipe",
            recipe,
            "--set",
            "objectives.nope=1",
            "--steps",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
