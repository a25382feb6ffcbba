//! Helpers shared by the loader tests here and the CLI tests of the `vlp` binary (which
//! include this file): tiny shards written on the fly with captions like `003_7` (shard
//! 3, sample 7), so coverage can be counted (open_clip's trick).
// Each test binary uses a different part of these helpers.
#![allow(dead_code)]

use std::path::Path;

use vlp_data::image_ops::ImageTransform;
use vlp_data::loader::{Batch, Loader, LoaderConfig};
use vlp_data::tokenize::{train_wordpiece, TextTokenizer};

/// One tar member: extension and bytes.
pub type Member = (String, Vec<u8>);

/// Writes a tar with the given samples (key, members), members in the given order.
pub fn write_tar(path: &Path, samples: &[(String, Vec<Member>)]) {
    let file = std::fs::File::create(path).unwrap();
    let mut builder = tar::Builder::new(file);
    for (key, members) in samples {
        for (ext, bytes) in members {
            let mut header = tar::Header::new_ustar();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_cksum();
            builder
                .append_data(&mut header, format!("{key}.{ext}"), bytes.as_slice())
                .unwrap();
        }
    }
    builder.finish().unwrap();
}

/// A small PNG whose colour encodes `seed`, so images differ between samples.
pub fn png(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (seed.wrapping_mul(37) % 256) as u8,
            ((x * 255) / width.max(1)) as u8,
            ((y * 255 + seed) / height.max(1) % 256) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The caption of sample `i` of shard `s`.
pub fn caption(shard: usize, i: usize) -> String {
    format!("{shard:03}_{i}")
}

/// A good sample: PNG + txt caption `SSS_I`.
pub fn good_sample(shard: usize, i: usize) -> (String, Vec<Member>) {
    (
        format!("{shard:03}{i:06}"),
        vec![
            ("png".into(), png(12, 10, (shard * 1000 + i) as u32)),
            ("txt".into(), caption(shard, i).into_bytes()),
        ],
    )
}

/// `n_shards` shards of `per_shard` good samples: `dir/train-000000.tar` ...; returns the spec.
pub fn write_dataset(dir: &Path, n_shards: usize, per_shard: usize) -> String {
    for s in 0..n_shards {
        let samples: Vec<_> = (0..per_shard).map(|i| good_sample(s, i)).collect();
        write_tar(&dir.join(format!("train-{s:06}.tar")), &samples);
    }
    format!(
        "{}/train-{{000000..{:06}}}.tar",
        dir.display(),
        n_shards - 1
    )
}

/// A tokenizer trained on the `SSS_I` captions: digits and `_` are its words.
pub fn tokenizer(max_tokens: usize) -> TextTokenizer {
    let corpus: Vec<String> = (0..50)
        .flat_map(|s| (0..50).map(move |i| caption(s, i)))
        .collect();
    let tok = train_wordpiece(corpus.iter(), 200, 1).unwrap();
    TextTokenizer::from_tokenizer(tok, "test".into(), max_tokens).unwrap()
}

pub fn path_str(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// A loader over tiny 8x8 crops, one epoch, small buffers: fast and deterministic.
pub fn small_cfg() -> LoaderConfig {
    LoaderConfig {
        batch_size: 4,
        workers: 2,
        shuffle_buffer: 8,
        shuffle_initial: 3,
        max_epochs: Some(1),
        image: ImageTransform::Train(vlp_data::image_ops::TrainTransform {
            randaugment: None,
            ..vlp_data::image_ops::TrainTransform::albef_finetune(8)
        }),
        ..LoaderConfig::default()
    }
}

/// Every batch until the loader ends.
pub fn all_batches(loader: &mut Loader) -> Vec<Batch> {
    let mut out = Vec::new();
    while let Some(b) = loader.next_batch().unwrap() {
        out.push(b);
    }
    out
}
