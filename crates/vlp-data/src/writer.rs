//! Writing WebDataset tar shards (`PREFIX-000000.tar`, ...) and their manifest
//! (`PREFIX-manifest.json`), deterministically: the same samples give byte-identical files.
//!
//! Each shard is written under a hidden temporary name in the same directory and renamed to
//! its final name only once it is complete, so an interrupted run never leaves a truncated
//! shard that looks finished. Members are plain ustar regular files (`KEY.EXT`, mode 0644,
//! uid/gid 0, a fixed mtime) and the members of one sample are consecutive, which is what
//! Python's `webdataset` and [`crate::shard`] expect.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// The `format` field of every manifest this writer produces.
pub const MANIFEST_FORMAT: &str = "vlp-shards/1";

/// Modification time stamped on every tar member (2000-01-01T00:00:00Z), so that output
/// does not depend on when it was written.
pub const FIXED_MTIME: u64 = 946_684_800;

/// The longest member name a plain ustar header holds without an extension record.
const MAX_MEMBER_NAME: usize = 100;

/// One shard as listed in a manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestShard {
    /// Bare file name of the shard (no directory), e.g. `train-000000.tar`.
    pub file: String,
    /// Samples in this shard.
    pub samples: u64,
    /// Size of the shard file in bytes.
    pub bytes: u64,
}

/// What a set of shards holds: written as `PREFIX-manifest.json` next to the shards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Samples in all shards together.
    pub samples: u64,
    /// The shards, in writing order.
    pub shards: Vec<ManifestShard>,
}

impl Manifest {
    /// Reads and checks a manifest file (format tag, sample total = sum over shards).
    pub fn load(path: impl AsRef<Path>) -> Result<Manifest> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| DataError::Json {
            what: format!("manifest {}", path.display()),
            source: e,
        })?;
        let input = |reason: String| DataError::Input {
            source_name: format!("manifest {}", path.display()),
            reason,
        };
        if manifest.format != MANIFEST_FORMAT {
            return Err(input(format!(
                "format is `{}`, expected `{MANIFEST_FORMAT}`",
                manifest.format
            )));
        }
        let sum: u64 = manifest.shards.iter().map(|s| s.samples).sum();
        if sum != manifest.samples {
            return Err(input(format!(
                "`samples` is {} but its shards hold {sum}",
                manifest.samples
            )));
        }
        if let Some(bad) = manifest
            .shards
            .iter()
            .find(|s| s.file.is_empty() || s.file.contains(['/', '\\']))
        {
            return Err(input(format!(
                "shard file `{}` is not a bare file name",
                bad.file
            )));
        }
        Ok(manifest)
    }

    /// Writes the manifest as pretty JSON, through a temporary file and a rename.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| DataError::Json {
            what: format!("manifest {}", path.display()),
            source: e,
        })?;
        text.push(b'\n');
        let tmp = temp_path(path);
        fs::write(&tmp, &text).map_err(|e| DataError::io(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
    }
}

/// The manifest path that belongs to an output prefix: `PREFIX-manifest.json`.
pub fn manifest_path(prefix: impl AsRef<Path>) -> PathBuf {
    let prefix = prefix.as_ref();
    let mut name = prefix.file_name().unwrap_or_default().to_os_string();
    name.push("-manifest.json");
    prefix.with_file_name(name)
}

/// The WebDataset key of the `index`-th sample: nine zero-padded digits, like img2dataset.
pub fn sample_key(index: u64) -> String {
    format!("{index:09}")
}

/// For each shard path, the sample count that a `*-manifest.json` in the shard's directory
/// lists for that file name; `None` when no manifest lists it, or when the listed byte size
/// disagrees with the file on disk (a stale manifest). Unreadable or broken manifests are
/// ignored with a warning. Used by the loader to know an epoch's length without a scan.
pub fn manifest_counts(shards: &[PathBuf]) -> Vec<Option<u64>> {
    let mut by_dir: HashMap<PathBuf, BTreeMap<String, ManifestShard>> = HashMap::new();
    shards
        .iter()
        .map(|shard| {
            let dir = match shard.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            let listed = by_dir
                .entry(dir)
                .or_insert_with_key(|dir| manifests_in(dir));
            let name = shard.file_name()?.to_str()?;
            let entry = listed.get(name)?;
            if let Ok(meta) = fs::metadata(shard) {
                if meta.len() != entry.bytes {
                    tracing::warn!(
                        shard = %shard.display(),
                        on_disk = meta.len(),
                        in_manifest = entry.bytes,
                        "shard size differs from its manifest entry; ignoring the manifest count"
                    );
                    return None;
                }
            }
            Some(entry.samples)
        })
        .collect()
}

/// All shard entries listed by the `*-manifest.json` files of `dir` (first manifest in name
/// order wins when two list the same file).
fn manifests_in(dir: &Path) -> BTreeMap<String, ManifestShard> {
    let mut out = BTreeMap::new();
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot list shard directory");
            return out;
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with("-manifest.json") && !n.starts_with('.'))
        })
        .collect();
    paths.sort();
    for path in paths {
        match Manifest::load(&path) {
            Ok(m) => {
                for shard in m.shards {
                    out.entry(shard.file.clone()).or_insert(shard);
                }
            }
            Err(e) => {
                tracing::warn!(manifest = %path.display(), error = %e, "ignoring a broken manifest")
            }
        }
    }
    out
}

/// `dir/.name.tmp` for `dir/name`: hidden, so shard globs never pick it up.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(".tmp");
    path.with_file_name(name)
}

/// The shard being filled.
struct OpenShard {
    builder: tar::Builder<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    samples: u64,
    last_key: Option<String>,
}

/// Writes samples into numbered tar shards of a fixed number of samples each.
pub struct ShardWriter {
    prefix: PathBuf,
    samples_per_shard: usize,
    current: Option<OpenShard>,
    shards: Vec<ManifestShard>,
    samples: u64,
}

impl ShardWriter {
    /// A writer for `PREFIX-000000.tar`, `PREFIX-000001.tar`, ...; `prefix` is a path whose
    /// last component is the file-name stem (`out/train`). Creates the parent directories.
    pub fn create(prefix: impl AsRef<Path>, samples_per_shard: usize) -> Result<Self> {
        let prefix = prefix.as_ref().to_path_buf();
        if samples_per_shard == 0 {
            return Err(DataError::config("samples per shard", "must be at least 1"));
        }
        let text = prefix.to_string_lossy();
        let stem_ok = prefix
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| !n.is_empty() && n != "." && n != "..");
        if !stem_ok || text.ends_with('/') || text.ends_with(std::path::MAIN_SEPARATOR) {
            return Err(DataError::config(
                "output prefix",
                format!(
                    "`{text}` has no file-name stem; give a prefix such as `out/train` \
                     (shards become `out/train-000000.tar`)"
                ),
            ));
        }
        if let Some(dir) = prefix.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        Ok(ShardWriter {
            prefix,
            samples_per_shard,
            current: None,
            shards: Vec::new(),
            samples: 0,
        })
    }

    /// Path of shard number `index` of this writer.
    pub fn shard_path(&self, index: usize) -> PathBuf {
        let mut name = self.prefix.file_name().unwrap_or_default().to_os_string();
        name.push(format!("-{index:06}.tar"));
        self.prefix.with_file_name(name)
    }

    /// Where [`ShardWriter::finish`] writes the manifest.
    pub fn manifest_path(&self) -> PathBuf {
        manifest_path(&self.prefix)
    }

    /// Samples written so far.
    pub fn samples_written(&self) -> u64 {
        self.samples
    }

    /// Appends one sample: `files` are `(extension, bytes)` pairs, the extension lower-case
    /// without a dot (`jpg`, `txt`, `json`). Keys must be non-empty and contain no `.` or
    /// `/`; an extension may appear once per sample; a key may not repeat the previous
    /// sample's key (the two would merge into one sample when read back).
    pub fn write_sample(&mut self, key: &str, files: &[(&str, &[u8])]) -> Result<()> {
        let bad = |reason: String| DataError::Input {
            source_name: format!("sample `{key}`"),
            reason,
        };
        if key.is_empty() {
            return Err(bad("empty key".into()));
        }
        if let Some(c) = key.chars().find(|c| matches!(c, '.' | '/' | '\\' | '\0')) {
            return Err(bad(format!("key contains `{}`", c.escape_debug())));
        }
        if files.is_empty() {
            return Err(bad("no files".into()));
        }
        for (i, (ext, _)) in files.iter().enumerate() {
            if ext.is_empty()
                || !ext
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
            {
                return Err(bad(format!(
                    "extension `{ext}` must be lower-case letters, digits, `_` or `-`, without a dot"
                )));
            }
            if files[..i].iter().any(|(e, _)| e == ext) {
                return Err(bad(format!("extension `{ext}` appears twice")));
            }
            let name_len = key.len() + 1 + ext.len();
            if name_len > MAX_MEMBER_NAME {
                return Err(bad(format!(
                    "member name `{key}.{ext}` is {name_len} bytes; at most {MAX_MEMBER_NAME} fit"
                )));
            }
        }
        if self.current.is_none() {
            self.open_next()?;
        }
        let shard = self.current.as_mut().expect("a shard is open");
        if shard.last_key.as_deref() == Some(key) {
            return Err(bad(
                "same key as the previous sample; the two would be read back as one".into(),
            ));
        }
        for (ext, data) in files {
            let name = format!("{key}.{ext}");
            let mut header = tar::Header::new_ustar();
            header
                .set_path(&name)
                .map_err(|e| bad(format!("member name `{name}`: {e}")))?;
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(FIXED_MTIME);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            shard
                .builder
                .append(&header, *data)
                .map_err(|e| DataError::io(&shard.tmp, e))?;
        }
        shard.samples += 1;
        shard.last_key = Some(key.to_string());
        self.samples += 1;
        if shard.samples as usize >= self.samples_per_shard {
            self.close_current()?;
        }
        Ok(())
    }

    /// Closes the last shard, writes `PREFIX-manifest.json` and returns the manifest.
    pub fn finish(mut self) -> Result<Manifest> {
        self.close_current()?;
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_string(),
            samples: self.samples,
            shards: std::mem::take(&mut self.shards),
        };
        manifest.save(self.manifest_path())?;
        let next = self.shard_path(manifest.shards.len());
        if next.exists() {
            tracing::warn!(
                shard = %next.display(),
                "a shard from an earlier run follows the ones just written; \
                 delete it or it will be read together with the new ones"
            );
        }
        Ok(manifest)
    }

    fn open_next(&mut self) -> Result<()> {
        let path = self.shard_path(self.shards.len());
        let tmp = temp_path(&path);
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        self.current = Some(OpenShard {
            builder: tar::Builder::new(BufWriter::with_capacity(1 << 20, file)),
            tmp,
            path,
            samples: 0,
            last_key: None,
        });
        Ok(())
    }

    fn close_current(&mut self) -> Result<()> {
        let Some(shard) = self.current.take() else {
            return Ok(());
        };
        let OpenShard {
            builder,
            tmp,
            path,
            samples,
            ..
        } = shard;
        let result = (|| {
            let mut out = builder.into_inner()?;
            out.flush()?;
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            file.metadata().map(|m| m.len())
        })();
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(DataError::io(&tmp, e));
            }
        };
        fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))?;
        self.shards.push(ManifestShard {
            file: path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            samples,
            bytes,
        });
        Ok(())
    }
}

impl Drop for ShardWriter {
    /// A writer dropped without [`ShardWriter::finish`] (an error upstream) removes its
    /// half-written shard; completed shards stay.
    fn drop(&mut self) {
        if let Some(shard) = self.current.take() {
            let tmp = shard.tmp.clone();
            drop(shard);
            let _ = fs::remove_file(tmp);
        }
    }
}

/// The `KEY.json` document of a captioned sample: `caption` is a string when there is one
/// caption and a list otherwise; `image_id` only when known; `source` names the input.
#[derive(Serialize)]
struct SampleJson<'a> {
    caption: CaptionField<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_id: Option<&'a str>,
    source: &'a str,
}

#[derive(Serialize)]
#[serde(untagged)]
enum CaptionField<'a> {
    One(&'a str),
    Many(&'a [String]),
}

/// Builds the `KEY.json` bytes of a captioned image sample.
pub fn sample_json(captions: &[String], image_id: Option<&str>, source: &str) -> Vec<u8> {
    let caption = match captions {
        [one] => CaptionField::One(one),
        many => CaptionField::Many(many),
    };
    serde_json::to_vec(&SampleJson {
        caption,
        image_id,
        source,
    })
    .expect("serialising strings cannot fail")
}

impl ShardWriter {
    /// Writes an image-text sample in the layout of `vlp shards write`: `KEY.<image_ext>`,
    /// `KEY.txt` only when there is exactly one caption, and `KEY.json` always.
    pub fn write_captioned(
        &mut self,
        key: &str,
        image_ext: &str,
        image: &[u8],
        captions: &[String],
        image_id: Option<&str>,
        source: &str,
    ) -> Result<()> {
        let json = sample_json(captions, image_id, source);
        let mut files: Vec<(&str, &[u8])> = vec![(image_ext, image)];
        if let [one] = captions {
            files.push(("txt", one.as_bytes()));
        }
        files.push(("json", &json));
        self.write_sample(key, &files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(path: &Path) -> Vec<(String, Vec<u8>, u32, u64, u64)> {
        let mut ar = tar::Archive::new(File::open(path).unwrap());
        ar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_string_lossy().into_owned();
                let h = e.header().clone();
                assert_eq!(h.entry_type(), tar::EntryType::Regular);
                assert!(h.as_ustar().is_some(), "ustar header");
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                (
                    name,
                    data,
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect()
    }

    fn write_n(prefix: &Path, n: u64, per_shard: usize) -> Manifest {
        let mut w = ShardWriter::create(prefix, per_shard).unwrap();
        for i in 0..n {
            let caption = format!("caption {i}");
            w.write_sample(
                &sample_key(i),
                &[("jpg", b"not really a jpeg"), ("txt", caption.as_bytes())],
            )
            .unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn rolls_over_at_n_and_writes_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("nested/out/train");
        let m = write_n(&prefix, 7, 3);
        assert_eq!(m.format, MANIFEST_FORMAT);
        assert_eq!(m.samples, 7);
        let files: Vec<&str> = m.shards.iter().map(|s| s.file.as_str()).collect();
        assert_eq!(
            files,
            ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
        );
        assert_eq!(
            m.shards.iter().map(|s| s.samples).collect::<Vec<_>>(),
            [3, 3, 1]
        );
        let out = dir.path().join("nested/out");
        for s in &m.shards {
            assert_eq!(fs::metadata(out.join(&s.file)).unwrap().len(), s.bytes);
        }
        let loaded = Manifest::load(out.join("train-manifest.json")).unwrap();
        assert_eq!(loaded, m);
        // The manifest is the documented JSON shape.
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("train-manifest.json")).unwrap()).unwrap();
        assert_eq!(v["format"], "vlp-shards/1");
        assert_eq!(v["shards"][2]["file"], "train-000002.tar");
        assert_eq!(v["shards"][2]["samples"], 1);

        let first = members(&out.join("train-000000.tar"));
        let names: Vec<&str> = first.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "000000000.jpg",
                "000000000.txt",
                "000000001.jpg",
                "000000001.txt",
                "000000002.jpg",
                "000000002.txt"
            ]
        );
        for (_, _, mode, uid, mtime) in &first {
            assert_eq!((*mode, *uid, *mtime), (0o644, 0, FIXED_MTIME));
        }
        assert_eq!(first[3].1, b"caption 1");
        // No temporary files are left behind.
        let leftovers: Vec<_> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn exact_multiple_has_no_empty_trailing_shard() {
        let dir = tempfile::tempdir().unwrap();
        let m = write_n(&dir.path().join("s"), 4, 2);
        assert_eq!(m.shards.len(), 2);
        let empty = write_n(&dir.path().join("e"), 0, 2);
        assert_eq!((empty.samples, empty.shards.len()), (0, 0));
    }

    #[test]
    fn output_is_byte_identical_across_runs() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let ma = write_n(&a.path().join("x"), 5, 2);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let mb = write_n(&b.path().join("x"), 5, 2);
        assert_eq!(ma, mb);
        for s in &ma.shards {
            assert_eq!(
                fs::read(a.path().join(&s.file)).unwrap(),
                fs::read(b.path().join(&s.file)).unwrap()
            );
        }
        assert_eq!(
            fs::read(a.path().join("x-manifest.json")).unwrap(),
            fs::read(b.path().join("x-manifest.json")).unwrap()
        );
    }

    #[test]
    fn rejects_bad_samples() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path().join("t"), 10).unwrap();
        let e = w
            .write_sample("k1", &[("txt", b"a"), ("txt", b"b")])
            .unwrap_err();
        assert!(e.to_string().contains("appears twice"), "{e}");
        for key in ["a.b", "a/b", ""] {
            assert!(w.write_sample(key, &[("txt", b"a")]).is_err(), "{key}");
        }
        for ext in ["JPG", ".jpg", "seg.png", ""] {
            assert!(w.write_sample("k", &[(ext, b"a")]).is_err(), "{ext}");
        }
        assert!(w.write_sample("k", &[]).is_err());
        let long = "k".repeat(97);
        assert!(w.write_sample(&long, &[("txt", b"a")]).is_err());
        w.write_sample("k", &[("txt", b"a")]).unwrap();
        let e = w.write_sample("k", &[("json", b"{}")]).unwrap_err();
        assert!(e.to_string().contains("previous sample"), "{e}");
        let m = w.finish().unwrap();
        assert_eq!(m.samples, 1);
        assert!(ShardWriter::create(dir.path().join("t"), 0).is_err());
        assert!(ShardWriter::create("out/", 1).is_err());
    }

    #[test]
    fn open_shard_lives_under_a_temporary_name_until_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path().join("t"), 2).unwrap();
        w.write_sample("a", &[("txt", b"1")]).unwrap();
        let final_path = dir.path().join("t-000000.tar");
        let tmp = dir.path().join(".t-000000.tar.tmp");
        assert!(!final_path.exists());
        assert!(tmp.exists());
        w.write_sample("b", &[("txt", b"2")]).unwrap();
        assert!(final_path.exists());
        assert!(!tmp.exists());
        // A writer dropped mid-shard (an upstream error) removes its temporary file and
        // never creates the final name.
        w.write_sample("c", &[("txt", b"3")]).unwrap();
        assert!(dir.path().join(".t-000001.tar.tmp").exists());
        drop(w);
        assert!(!dir.path().join(".t-000001.tar.tmp").exists());
        assert!(!dir.path().join("t-000001.tar").exists());
        assert!(!dir.path().join("t-manifest.json").exists());
    }

    #[test]
    fn manifest_counts_finds_listed_shards() {
        let dir = tempfile::tempdir().unwrap();
        write_n(&dir.path().join("a"), 5, 3);
        write_n(&dir.path().join("b"), 2, 10);
        fs::write(dir.path().join("broken-manifest.json"), "{ nope").unwrap();
        fs::write(dir.path().join("c-000000.tar"), b"").unwrap();
        let paths = vec![
            dir.path().join("a-000001.tar"),
            dir.path().join("b-000000.tar"),
            dir.path().join("c-000000.tar"),
            dir.path().join("a-000000.tar"),
            PathBuf::from("/nonexistent-dir/a-000000.tar"),
        ];
        assert_eq!(
            manifest_counts(&paths),
            [Some(2), Some(2), None, Some(3), None]
        );
        // A shard rewritten after its manifest (different size) gets no count.
        fs::write(dir.path().join("b-000000.tar"), b"changed").unwrap();
        assert_eq!(manifest_counts(&[dir.path().join("b-000000.tar")]), [None]);
    }

    #[test]
    fn manifest_load_rejects_inconsistent_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m-manifest.json");
        fs::write(
            &p,
            r#"{"format":"vlp-shards/1","samples":3,"shards":[{"file":"m-000000.tar","samples":2,"bytes":10}]}"#,
        )
        .unwrap();
        assert!(Manifest::load(&p)
            .unwrap_err()
            .to_string()
            .contains("hold 2"));
        fs::write(&p, r#"{"format":"other","samples":0,"shards":[]}"#).unwrap();
        assert!(Manifest::load(&p).is_err());
        assert_eq!(
            manifest_path("out/train"),
            PathBuf::from("out/train-manifest.json")
        );
    }

    #[test]
    fn captioned_samples_have_txt_only_for_one_caption() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::create(dir.path().join("c"), 10).unwrap();
        w.write_captioned(
            "000000000",
            "png",
            b"img",
            &["one".into()],
            Some("7"),
            "a.png",
        )
        .unwrap();
        w.write_captioned(
            "000000001",
            "jpg",
            b"img",
            &["x".into(), "y".into()],
            None,
            "b.jpg",
        )
        .unwrap();
        w.finish().unwrap();
        let m = members(&dir.path().join("c-000000.tar"));
        let names: Vec<&str> = m.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "000000000.png",
                "000000000.txt",
                "000000000.json",
                "000000001.jpg",
                "000000001.json"
            ]
        );
        assert_eq!(
            String::from_utf8(m[2].1.clone()).unwrap(),
            r#"{"caption":"one","image_id":"7","source":"a.png"}"#
        );
        assert_eq!(
            String::from_utf8(m[4].1.clone()).unwrap(),
            r#"{"caption":["x","y"],"source":"b.jpg"}"#
        );
    }
}
