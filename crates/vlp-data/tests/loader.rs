//! The streaming loader end to end: coverage across ranks x workers, shuffling, resume,
//! every bad-data case, img2dataset's layout, `pipe:` sources.

use std::collections::{BTreeMap, HashSet};

use vlp_data::image_ops::{EvalTransform, ImageTransform};
use vlp_data::loader::{Batch, Loader, LoaderConfig, Mode};
use vlp_data::stats::{BadDataPolicy, SkipReason};
use vlp_data::DataError;

mod common;
use common::*;

fn captions(batches: &[Batch]) -> Vec<String> {
    batches.iter().flat_map(|b| b.captions.clone()).collect()
}

fn images(batches: &[Batch]) -> Vec<Vec<f32>> {
    batches
        .iter()
        .map(|b| b.images.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn every_sample_exactly_once_per_epoch_across_ranks_and_workers() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_dataset(dir.path(), 7, 9);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for rank in 0..2 {
        let cfg = LoaderConfig {
            rank,
            world_size: 2,
            workers: 2,
            ..small_cfg()
        };
        let mut loader = Loader::new(&spec, cfg, tokenizer(16)).unwrap();
        let batches = all_batches(&mut loader);
        for b in &batches {
            assert_eq!(b.images.dims()[1..], [3, 8, 8]);
            assert_eq!(b.input_ids.dims(), b.attention_mask.dims());
            assert_eq!(b.input_ids.dims()[0], b.len());
        }
        for c in captions(&batches) {
            *seen.entry(c).or_default() += 1;
        }
        let summary = &loader.epoch_summaries()[0];
        assert!(summary.skipped.is_empty());
    }
    let expected: BTreeMap<String, usize> = (0..7)
        .flat_map(|s| (0..9).map(move |i| (caption(s, i), 1)))
        .collect();
    assert_eq!(seen, expected);
}

#[test]
fn fewer_shards_than_processes_is_an_error_unless_resampled() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_dataset(dir.path(), 2, 4);
    let cfg = LoaderConfig {
        rank: 2,
        world_size: 3,
        ..small_cfg()
    };
    let err = Loader::new(&spec, cfg.clone(), tokenizer(16))
        .err()
        .expect("rank 2 would have no shard")
        .to_string();
    assert!(err.contains("2 shard(s) for 3 processes"), "{err}");
    let resampled = LoaderConfig {
        mode: vlp_data::loader::Mode::Resampled,
        ..cfg
    };
    let mut loader = Loader::new(&spec, resampled, tokenizer(16)).unwrap();
    assert!(loader.next_batch().unwrap().is_some());
}

#[test]
fn shuffling_is_determined_by_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_dataset(dir.path(), 4, 10);
    let run = |seed| {
        let cfg = LoaderConfig {
            seed,
            ..small_cfg()
        };
        captions(&all_batches(
            &mut Loader::new(&spec, cfg, tokenizer(16)).unwrap(),
        ))
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a, b);
    assert_ne!(a, c);
    let mut sorted_a = a.clone();
    sorted_a.sort();
    let mut sorted_c = c.clone();
    sorted_c.sort();
    assert_eq!(sorted_a, sorted_c, "same samples, other order");
    // Samples are mixed across shards, not read shard after shard.
    let first_shards: HashSet<&str> = a[..8].iter().map(|c| &c[..3]).collect();
    assert!(first_shards.len() > 1, "{a:?}");
    // A new epoch reshuffles.
    let cfg = LoaderConfig {
        max_epochs: Some(2),
        ..small_cfg()
    };
    let both = captions(&all_batches(
        &mut Loader::new(&spec, cfg, tokenizer(16)).unwrap(),
    ));
    assert_eq!(both.len(), 80);
    assert_ne!(both[..40], both[40..]);
}

/// Restoring the state taken after batch k reproduces batches k+1.. exactly: same
/// samples, same captions, same augmented pixels.
fn check_resume(cfg: LoaderConfig, spec: &str, total: usize) {
    let mut full = Loader::new(spec, cfg.clone(), tokenizer(16)).unwrap();
    let mut reference = Vec::new();
    let mut states = Vec::new();
    for _ in 0..total {
        states.push(full.state().to_json().unwrap());
        reference.push(full.next_batch().unwrap().expect("enough batches"));
    }
    for k in [1, 3, total / 2, total - 2] {
        let mut resumed = Loader::new(spec, cfg.clone(), tokenizer(16)).unwrap();
        let state = vlp_data::loader::LoaderState::from_json(&states[k]).unwrap();
        resumed.restore(state).unwrap();
        let rest: Vec<Batch> = (k..total)
            .map(|_| resumed.next_batch().unwrap().unwrap())
            .collect();
        assert_eq!(
            captions(&rest),
            captions(&reference[k..]),
            "resumed at batch {k}"
        );
        assert_eq!(
            images(&rest),
            images(&reference[k..]),
            "pixels after resume at {k}"
        );
        let keys: Vec<_> = rest.iter().map(|b| b.keys.clone()).collect();
        let ref_keys: Vec<_> = reference[k..].iter().map(|b| b.keys.clone()).collect();
        assert_eq!(keys, ref_keys);
    }
}

#[test]
fn resume_reproduces_the_uninterrupted_sequence_across_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_dataset(dir.path(), 5, 11);
    let cfg = LoaderConfig {
        max_epochs: Some(3),
        ..small_cfg()
    };
    // 55 samples per epoch in batches of 4 from 2 workers: ~15 batches an epoch; 30 spans two epochs.
    check_resume(cfg, &spec, 30);
}

#[test]
fn resume_in_resampled_mode() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_dataset(dir.path(), 3, 6);
    let cfg = LoaderConfig {
        mode: Mode::Resampled,
        max_epochs: None,
        ..small_cfg()
    };
    check_resume(cfg, &spec, 20);
}

#[test]
fn resume_refuses_a_state_from_other_settings() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_dataset(dir.path(), 3, 6);
    let mut a = Loader::new(&spec, small_cfg(), tokenizer(16)).unwrap();
    a.next_batch().unwrap();
    let cfg = LoaderConfig {
        seed: 9,
        ..small_cfg()
    };
    let mut b = Loader::new(&spec, cfg, tokenizer(16)).unwrap();
    let err = b.restore(a.state()).unwrap_err().to_string();
    assert!(err.contains("seed"), "{err}");
}

#[test]
fn resampled_mode_runs_past_the_dataset_size() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_dataset(dir.path(), 2, 5);
    let cfg = LoaderConfig {
        mode: Mode::Resampled,
        max_epochs: None,
        ..small_cfg()
    };
    let mut loader = Loader::new(&spec, cfg, tokenizer(16)).unwrap();
    let n: usize = (0..10)
        .map(|_| loader.next_batch().unwrap().unwrap().len())
        .sum();
    assert_eq!(
        n, 40,
        "resampled mode yields full batches forever (10 samples on disk)"
    );
}

/// Shards with one instance of every bad-data case, plus good samples around them.
fn write_bad_dataset(dir: &std::path::Path) -> String {
    let mut samples = vec![good_sample(0, 0)];
    let bad = |key: &str, members: Vec<(&str, Vec<u8>)>| {
        (
            key.to_string(),
            members
                .into_iter()
                .map(|(e, b)| (e.to_string(), b))
                .collect::<Vec<_>>(),
        )
    };
    samples.push(bad(
        "corrupt",
        vec![
            ("jpg", b"not a jpeg at all".to_vec()),
            ("txt", b"x".to_vec()),
        ],
    ));
    samples.push(bad(
        "zerobyte",
        vec![("png", Vec::new()), ("txt", b"x".to_vec())],
    ));
    samples.push(bad("nocaption", vec![("png", png(4, 4, 1))]));
    samples.push(bad(
        "notutf8",
        vec![("png", png(4, 4, 2)), ("txt", vec![0xff, 0xfe, 0x41])],
    ));
    samples.push(bad(
        "dup",
        vec![
            ("png", png(4, 4, 3)),
            ("txt", b"a".to_vec()),
            ("txt", b"b".to_vec()),
        ],
    ));
    samples.push(bad(
        "huge",
        vec![("png", png(300, 300, 4)), ("txt", b"x".to_vec())],
    ));
    samples.push(good_sample(0, 1));
    write_tar(&dir.join("bad-000000.tar"), &samples);
    // A truncated shard: two good samples, then the stream is cut inside the third.
    write_tar(
        &dir.join("full.tar"),
        &(0..3).map(|i| good_sample(1, i)).collect::<Vec<_>>(),
    );
    let full = std::fs::read(dir.join("full.tar")).unwrap();
    // From the end: two zero blocks, the txt member (header + block), then the png's data block.
    let cut = full.len() - 1024 - 1024 - 512 + 40;
    std::fs::write(dir.join("bad-000001.tar"), &full[..cut]).unwrap();
    // An empty shard (zero bytes) and a missing one (000003).
    std::fs::write(dir.join("bad-000002.tar"), b"").unwrap();
    let base = dir.display();
    format!("{base}/bad-{{000000..000003}}.tar::pipe:exit 7")
}

#[test]
fn bad_data_is_skipped_and_counted_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_bad_dataset(dir.path());
    let cfg = LoaderConfig {
        workers: 1,
        max_pixels: 200 * 200,
        ..small_cfg()
    };
    let mut loader = Loader::new(&spec, cfg, tokenizer(16)).unwrap();
    let batches = all_batches(&mut loader);
    let mut got = captions(&batches);
    got.sort();
    assert_eq!(got, ["000_0", "000_1", "001_0", "001_1"]);
    let skipped = &loader.epoch_summaries()[0].skipped;
    for reason in [
        SkipReason::BadImage,
        SkipReason::MissingCaption,
        SkipReason::BadText,
        SkipReason::DuplicateField,
        SkipReason::ImageTooLarge,
        SkipReason::CorruptShard,
        SkipReason::EmptyShard,
        SkipReason::MissingShard,
        SkipReason::PipeFailed,
    ] {
        assert!(skipped.get(reason) >= 1, "{reason} not counted: {skipped}");
    }
    assert_eq!(skipped.get(SkipReason::BadImage), 2, "corrupt + zero-byte");
    assert_eq!(loader.epoch_summaries()[0].samples, 4);
}

#[test]
fn fail_policy_names_shard_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut samples = vec![good_sample(0, 0)];
    samples.push((
        "broken_key".into(),
        vec![
            ("jpg".into(), b"garbage".to_vec()),
            ("txt".into(), b"x".to_vec()),
        ],
    ));
    write_tar(&dir.path().join("f.tar"), &samples);
    let cfg = LoaderConfig {
        workers: 1,
        on_bad_data: BadDataPolicy::Fail,
        shuffle_buffer: 1,
        ..small_cfg()
    };
    let mut loader = Loader::new(
        &path_str(&dir.path().join("f.tar")),
        cfg.clone(),
        tokenizer(16),
    )
    .unwrap();
    let err = loop {
        match loader.next_batch() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the bad sample was not reported"),
            Err(e) => break e.to_string(),
        }
    };
    assert!(
        err.contains("f.tar") && err.contains("broken_key") && err.contains("bad_image"),
        "{err}"
    );

    let missing = path_str(&dir.path().join("missing.tar"));
    let mut loader = Loader::new(&missing, cfg, tokenizer(16)).unwrap();
    let err = loader.next_batch().unwrap_err().to_string();
    assert!(
        err.contains("missing.tar") && err.contains("missing_shard"),
        "{err}"
    );
}

#[test]
fn img2dataset_folder_reads_as_is() {
    let dir = tempfile::tempdir().unwrap();
    for shard in 0..2 {
        let samples: Vec<_> = (0..3)
            .map(|i| {
                let key = format!("{:09}", shard * 10_000 + i);
                let cap = caption(shard, i);
                let json = serde_json::json!({
                    "url": "http://example.com/x.jpg", "caption": cap, "key": key, "status": "success",
                    "width": 12, "height": 10, "original_width": 640, "original_height": 480,
                    "exif": "{}", "sha256": "00"
                });
                (
                    key,
                    vec![
                        ("jpg".to_string(), jpeg(12, 10)),
                        ("txt".to_string(), cap.into_bytes()),
                        ("json".to_string(), json.to_string().into_bytes()),
                    ],
                )
            })
            .collect();
        write_tar(&dir.path().join(format!("{shard:05}.tar")), &samples);
        std::fs::write(dir.path().join(format!("{shard:05}_stats.json")), b"{}").unwrap();
        std::fs::write(dir.path().join(format!("{shard:05}.parquet")), b"PAR1").unwrap();
    }
    let cfg = LoaderConfig {
        image: ImageTransform::Eval(EvalTransform { size: 8 }),
        ..small_cfg()
    };
    let mut loader = Loader::new(&path_str(dir.path()), cfg, tokenizer(16)).unwrap();
    let batches = all_batches(&mut loader);
    let mut got = captions(&batches);
    got.sort();
    assert_eq!(got, ["000_0", "000_1", "000_2", "001_0", "001_1", "001_2"]);
    let ids: HashSet<String> = batches.iter().flat_map(|b| b.image_ids.clone()).collect();
    assert!(
        ids.contains("000010001"),
        "image id falls back to the key: {ids:?}"
    );
    assert!(batches
        .iter()
        .all(|b| b.urls.iter().all(|u| u.ends_with(".tar"))));
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 20) as u8, (y * 20) as u8, 90])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

#[test]
fn grouping_and_pipe_sources() {
    let dir = tempfile::tempdir().unwrap();
    // Keys with dots in directories and multi-dot extensions, members in one group.
    let samples = vec![
        (
            "a.d/x1".to_string(),
            vec![
                ("PNG".to_string(), png(6, 6, 1)),
                ("seg.txt".to_string(), b"s".to_vec()),
                ("txt".to_string(), b"one".to_vec()),
            ],
        ),
        (
            "a.d/x2".to_string(),
            vec![
                ("png".to_string(), png(6, 6, 2)),
                ("txt".to_string(), b"two".to_vec()),
            ],
        ),
    ];
    write_tar(&dir.path().join("g.tar"), &samples);
    let spec = format!("pipe:cat {}", dir.path().join("g.tar").display());
    let mut raw = Vec::new();
    let url = vlp_data::spec::expand_spec(&spec).unwrap().remove(0);
    let outcome = vlp_data::shard::read_shard(&url, 0, |s| {
        raw.push(s);
        std::ops::ControlFlow::Continue(())
    });
    assert!(outcome.problem.is_none(), "{:?}", outcome.problem);
    assert_eq!(raw.len(), 2);
    assert_eq!(raw[0].key, "a.d/x1");
    let exts: Vec<&str> = raw[0].fields.iter().map(|(e, _)| e.as_str()).collect();
    assert_eq!(
        exts,
        ["png", "seg.txt", "txt"],
        "extensions lower-cased, rest after the first dot"
    );
    assert_eq!(&*raw[1].url, spec.as_str());
    let cfg = LoaderConfig {
        workers: 1,
        ..small_cfg()
    };
    let batches = all_batches(&mut Loader::new(&spec, cfg, tokenizer(16)).unwrap());
    let mut got = captions(&batches);
    got.sort();
    assert_eq!(got, ["one", "two"]);
}

#[test]
fn epoch_length_comes_from_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_dataset(dir.path(), 3, 4);
    let cfg = LoaderConfig {
        workers: 1,
        ..small_cfg()
    };
    let loader = Loader::new(&spec, cfg.clone(), tokenizer(16)).unwrap();
    assert_eq!(loader.samples_in_epoch(0), None, "no manifest yet");
    let manifest = serde_json::json!({
        "format": "vlp-shards/1", "samples": 12,
        "shards": (0..3).map(|s| {
            let file = format!("train-{s:06}.tar");
            let bytes = std::fs::metadata(dir.path().join(&file)).unwrap().len();
            serde_json::json!({"file": file, "samples": 4, "bytes": bytes})
        }).collect::<Vec<_>>()
    });
    std::fs::write(dir.path().join("train-manifest.json"), manifest.to_string()).unwrap();
    let loader = Loader::new(&spec, cfg, tokenizer(16)).unwrap();
    assert_eq!(loader.samples_in_epoch(0), Some(12));
}

/// The training loader's settings (`vlp-train`'s pretrain: full batches only, no epoch
/// limit), where a dataset without a single batch used to spin on empty epochs forever.
fn training_cfg() -> LoaderConfig {
    LoaderConfig {
        drop_last: true,
        max_epochs: None,
        ..small_cfg()
    }
}

/// The loader's first answer, which must come within `limit` (run on a thread so that a
/// hang fails the test instead of stalling it).
fn first_answer(spec: String, cfg: LoaderConfig) -> Result<Option<usize>, DataError> {
    let limit = std::time::Duration::from_secs(30);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let answer = Loader::new(&spec, cfg, tokenizer(16))
            .and_then(|mut loader| loader.next_batch())
            .map(|batch| batch.map(|b| b.len()));
        let _ = tx.send(answer);
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the loader gave no answer within {limit:?}"))
}

fn no_batch_error(spec: String, cfg: LoaderConfig) -> String {
    match first_answer(spec, cfg) {
        Err(e @ DataError::NoBatch { .. }) => e.to_string(),
        other => panic!("expected a no-batch error, got {other:?}"),
    }
}

#[test]
fn all_shards_missing_is_an_error_not_an_endless_run() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("{}/gone-{{0..3}}.tar", dir.path().display());
    let e = no_batch_error(spec.clone(), training_cfg());
    assert!(
        e.contains("epoch 0 gave no batch of 4")
            && e.contains("missing_shard=4")
            && e.contains("nothing to train on"),
        "{e}"
    );
    // Resampled mode never ends an epoch; it gives up after a bounded number of draws.
    let resampled = LoaderConfig {
        mode: Mode::Resampled,
        ..training_cfg()
    };
    let e = no_batch_error(spec, resampled);
    assert!(
        e.contains("resampled") && e.contains("missing_shard"),
        "{e}"
    );
}

#[test]
fn all_shards_empty_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        std::fs::write(dir.path().join(format!("e-{i}.tar")), b"").unwrap();
    }
    let spec = format!("{}/e-{{0..2}}.tar", dir.path().display());
    let e = no_batch_error(spec, training_cfg());
    assert!(e.contains("empty_shard=3"), "{e}");
}

#[test]
fn all_shards_corrupt_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..3 {
        std::fs::write(dir.path().join(format!("c-{i}.tar")), vec![0xAB; 3000]).unwrap();
    }
    let spec = format!("{}/c-{{0..2}}.tar", dir.path().display());
    let e = no_batch_error(spec.clone(), training_cfg());
    assert!(e.contains("corrupt_shard=3"), "{e}");
    let resampled = LoaderConfig {
        mode: Mode::Resampled,
        ..training_cfg()
    };
    let e = no_batch_error(spec, resampled);
    assert!(e.contains("corrupt_shard"), "{e}");
}

#[test]
fn a_failing_pipe_is_an_error() {
    let e = no_batch_error("pipe:false::pipe:false".into(), training_cfg());
    assert!(e.contains("pipe_failed=2"), "{e}");
}

#[test]
fn fewer_samples_than_a_batch_with_drop_last_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write_dataset(dir.path(), 1, 3);
    let e = no_batch_error(spec.clone(), training_cfg());
    assert!(
        e.contains("3 samples read") && e.contains("drop_last"),
        "{e}"
    );
    // Without drop_last the short batch is a batch.
    let keep_last = LoaderConfig {
        drop_last: false,
        ..training_cfg()
    };
    assert_eq!(first_answer(spec, keep_last).unwrap(), Some(3));
}

#[test]
fn punctuation_only_captions_are_skipped_and_others_of_the_sample_kept() {
    let dir = tempfile::tempdir().unwrap();
    let json = |captions: &[&str]| serde_json::json!({ "caption": captions }).to_string();
    let samples = vec![
        (
            "mixed".to_string(),
            vec![
                ("png".to_string(), png(6, 6, 1)),
                (
                    "json".to_string(),
                    json(&["!!! ...", "a red square"]).into_bytes(),
                ),
            ],
        ),
        (
            "noise".to_string(),
            vec![
                ("png".to_string(), png(6, 6, 2)),
                ("json".to_string(), json(&["?!", "-- /"]).into_bytes()),
            ],
        ),
    ];
    write_tar(&dir.path().join("p.tar"), &samples);
    let cfg = LoaderConfig {
        workers: 1,
        ..small_cfg()
    };
    let mut loader = Loader::new(&path_str(&dir.path().join("p.tar")), cfg, tokenizer(16)).unwrap();
    let batches = all_batches(&mut loader);
    assert_eq!(captions(&batches), ["a red square"]);
    let skipped = &loader.epoch_summaries()[0].skipped;
    assert_eq!(skipped.get(SkipReason::MissingCaption), 1, "{skipped}");
}

/// A `pipe:` shard whose command stalls (`sleep` beside good shards, 2 workers) blocked
/// the loader forever with nothing printed: it is given up on after `stall_timeout_s`,
/// named, and counted as `pipe_failed`; the good shards are all delivered.
#[test]
fn a_stalled_pipe_shard_is_skipped_and_counted_after_the_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_dataset(dir.path(), 2, 6);
    let spec = format!("{good}::pipe:sleep 623; true");
    let cfg = LoaderConfig {
        stall_timeout_s: 1,
        ..small_cfg()
    };
    let started = std::time::Instant::now();
    let mut loader = Loader::new(&spec, cfg, tokenizer(16)).unwrap();
    let batches = all_batches(&mut loader);
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    assert_eq!(captions(&batches).len(), 12);
    let skipped = &loader.epoch_summaries()[0].skipped;
    assert_eq!(skipped.get(vlp_data::stats::SkipReason::PipeFailed), 1);
}
