//! Helpers shared by the integration tests: tiny shards written on the fly with captions
//! like `003_7` (shard 3, sample 7), so coverage can be counted (open_clip's trick).

use std::path::{Path, PathBuf};

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

#[allow(dead_code)]
pub fn vlp_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vlp"))
}

/// A tokenizer with BERT's special-token ids (`[PAD]` 0, `[UNK]` 100, `[CLS]` 101,
/// `[SEP]` 102, `[MASK]` 103) and 200 tokens, as the checkpoint fixtures expect: the
/// emoji set's tokenizer with those ids swapped into place and the vocabulary cut at 200.
/// Written to `dir/bert-ids-tokenizer.json`.
#[allow(dead_code)]
pub fn bert_ids_tokenizer(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("shards/emoji-tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source).unwrap()).unwrap();
    let swap = |id: u64| match id {
        1..=4 => id + 99,
        100..=103 => id - 99,
        other => other,
    };
    let vocab = json["model"]["vocab"].as_object().unwrap().clone();
    let kept: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .map(|(token, id)| (token, swap(id.as_u64().unwrap())))
        .filter(|(_, id)| *id < 200)
        .map(|(token, id)| (token, id.into()))
        .collect();
    json["model"]["vocab"] = kept.into();
    for added in json["added_tokens"].as_array_mut().unwrap() {
        added["id"] = swap(added["id"].as_u64().unwrap()).into();
    }
    for special in json["post_processor"]["special_tokens"]
        .as_object_mut()
        .unwrap()
        .values_mut()
    {
        special["ids"] = special["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| serde_json::Value::from(swap(id.as_u64().unwrap())))
            .collect();
    }
    let path = dir.join("bert-ids-tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}
