//! Reading one shard as WebDataset samples. Grouping follows the Python `webdataset`
//! library: a member's key is its path up to the first dot of its file name, the rest is
//! the extension (lower-cased); consecutive members with the same key form one sample;
//! members without a dot in the file name and `__meta__`-style members are ignored.

use std::io::Read;
use std::ops::ControlFlow;
use std::sync::Arc;

use crate::source::{open_shard, OpenError, Patience};
use crate::spec::ShardUrl;
use crate::stats::{Skip, SkipReason};

/// Members larger than this are treated as corruption rather than read into memory.
pub const MAX_MEMBER_BYTES: u64 = 1 << 30;

/// One sample as stored: its key, its shard, its position in the shard, and its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawSample {
    /// `__key__`: the member path up to the first dot of the file name.
    pub key: String,
    /// `__url__`: the shard the sample came from.
    pub url: Arc<str>,
    /// Position of the sample within its shard (0-based, counting every grouped sample).
    pub index: u64,
    /// `(extension, bytes)` in member order; extensions are lower-case.
    pub fields: Vec<(String, Vec<u8>)>,
    /// Set when the sample is malformed as stored (a duplicate extension).
    pub problem: Option<(SkipReason, String)>,
}

impl RawSample {
    /// The bytes of the field with this extension.
    pub fn field(&self, ext: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(e, _)| e == ext)
            .map(|(_, b)| b.as_slice())
    }

    /// Approximate memory held by the sample.
    pub fn byte_size(&self) -> usize {
        self.fields
            .iter()
            .map(|(e, b)| e.len() + b.len())
            .sum::<usize>()
            + self.key.len()
    }
}

/// How reading a shard ended.
#[derive(Debug, Default)]
pub struct ShardOutcome {
    /// Samples grouped (including skipped-over ones before `skip_first`).
    pub samples: u64,
    /// A shard-level problem: missing, failed command, truncated/corrupt tar, or empty.
    pub problem: Option<Skip>,
    /// The callback asked to stop.
    pub stopped: bool,
}

/// Splits a member path into (key, extension) as WebDataset does.
pub fn split_key(path: &str) -> Option<(&str, &str)> {
    let name_start = path.rfind('/').map_or(0, |i| i + 1);
    let name = &path[name_start..];
    if name.starts_with("__") && name.len() > 2 {
        return None;
    }
    let dot = name.find('.')?;
    if dot == 0 {
        return None;
    }
    Some((&path[..name_start + dot], &name[dot + 1..]))
}

/// Streams the samples of one shard into `on_sample`. Samples with index < `skip_first`
/// are grouped but not read nor passed on (resuming within a shard). Never panics on bad
/// data: shard-level problems come back in [`ShardOutcome::problem`]; a sample in
/// progress when the stream breaks is dropped, the samples before it were delivered.
pub fn read_shard(
    url: &ShardUrl,
    skip_first: u64,
    on_sample: impl FnMut(RawSample) -> ControlFlow<()>,
) -> ShardOutcome {
    read_shard_with(url, skip_first, &Patience::default(), on_sample)
}

/// [`read_shard`], with reads of a `pipe:` command waiting as `patience` says (a stalled
/// command is a [`SkipReason::PipeFailed`] problem naming it).
pub fn read_shard_with(
    url: &ShardUrl,
    skip_first: u64,
    patience: &Patience,
    mut on_sample: impl FnMut(RawSample) -> ControlFlow<()>,
) -> ShardOutcome {
    let url_str: Arc<str> = url.to_string().into();
    let shard_problem = |reason: SkipReason, detail: String| Skip {
        reason,
        url: url_str.to_string(),
        key: String::new(),
        detail,
    };
    let mut stream = match open_shard(url, patience) {
        Ok(s) => s,
        Err(OpenError::Missing(m)) => {
            return ShardOutcome {
                problem: Some(shard_problem(SkipReason::MissingShard, m)),
                ..Default::default()
            }
        }
        Err(OpenError::PipeFailed(m)) => {
            return ShardOutcome {
                problem: Some(shard_problem(SkipReason::PipeFailed, m)),
                ..Default::default()
            }
        }
    };
    let mut outcome = ShardOutcome::default();
    let mut current: Option<RawSample> = None;
    {
        let mut archive = tar::Archive::new(stream.reader());
        let entries = match archive.entries() {
            Ok(e) => e,
            Err(e) => {
                outcome.problem = Some(shard_problem(SkipReason::CorruptShard, e.to_string()));
                return finish(stream, outcome, &shard_problem);
            }
        };
        for entry in entries {
            let mut entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    outcome.problem = Some(shard_problem(
                        SkipReason::CorruptShard,
                        format!("tar stream broken after {} samples: {e}", outcome.samples),
                    ));
                    break;
                }
            };
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let path = match entry.path() {
                Ok(p) => p.to_string_lossy().into_owned(),
                Err(e) => {
                    outcome.problem = Some(shard_problem(SkipReason::CorruptShard, e.to_string()));
                    break;
                }
            };
            let Some((key, ext)) = split_key(&path) else {
                continue;
            };
            if current.as_ref().is_none_or(|s| s.key != key) {
                if let Some(done) = current.take() {
                    if done.index >= skip_first && on_sample(done).is_break() {
                        outcome.stopped = true;
                        return outcome;
                    }
                }
                current = Some(RawSample {
                    key: key.to_string(),
                    url: Arc::clone(&url_str),
                    index: outcome.samples,
                    fields: Vec::new(),
                    problem: None,
                });
                outcome.samples += 1;
            }
            let sample = current.as_mut().expect("set above");
            if sample.index < skip_first {
                continue;
            }
            let size = entry.size();
            if size > MAX_MEMBER_BYTES {
                outcome.problem = Some(shard_problem(
                    SkipReason::CorruptShard,
                    format!("member {path} claims {size} bytes (limit {MAX_MEMBER_BYTES})"),
                ));
                current = None;
                break;
            }
            let mut bytes = Vec::with_capacity(size as usize);
            let read = entry.read_to_end(&mut bytes);
            if read.is_err() || bytes.len() as u64 != size {
                outcome.problem = Some(shard_problem(
                    SkipReason::CorruptShard,
                    format!(
                        "truncated in member {path} ({} of {size} bytes) after {} complete samples",
                        bytes.len(),
                        outcome.samples - 1
                    ),
                ));
                current = None;
                break;
            }
            let ext = ext.to_lowercase();
            if sample.fields.iter().any(|(e, _)| *e == ext) {
                sample.problem = Some((
                    SkipReason::DuplicateField,
                    format!("extension `{ext}` appears twice"),
                ));
                continue;
            }
            sample.fields.push((ext, bytes));
        }
    }
    if outcome.problem.is_none() {
        if let Some(done) = current.take() {
            if done.index >= skip_first && on_sample(done).is_break() {
                outcome.stopped = true;
                return outcome;
            }
        }
    }
    finish(stream, outcome, &shard_problem)
}

fn finish(
    stream: crate::source::ShardStream,
    mut outcome: ShardOutcome,
    shard_problem: &dyn Fn(SkipReason, String) -> Skip,
) -> ShardOutcome {
    if let Err(e) = stream.finish() {
        // A failed command explains a broken stream better than the tar error does.
        outcome.problem = Some(shard_problem(SkipReason::PipeFailed, e.to_string()));
    } else if outcome.problem.is_none() && outcome.samples == 0 {
        outcome.problem = Some(shard_problem(
            SkipReason::EmptyShard,
            "no sample in shard".into(),
        ));
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_key_like_webdataset() {
        assert_eq!(split_key("a/b/000001.jpg"), Some(("a/b/000001", "jpg")));
        assert_eq!(split_key("x.seg.png"), Some(("x", "seg.png")));
        assert_eq!(split_key("dir.v2/x.txt"), Some(("dir.v2/x", "txt")));
        assert_eq!(split_key("README"), None);
        assert_eq!(split_key("__index__.json"), None);
    }
}
