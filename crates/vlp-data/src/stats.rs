//! Bad-data accounting: why a sample or a shard was skipped, counts by reason, the
//! `skip`/`fail` policy, and rate-limited warnings that name the shard and the key.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// What to do with bad data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BadDataPolicy {
    /// Count by reason, warn (rate-limited) with shard and key, go on.
    #[default]
    Skip,
    /// Stop with an error naming the shard and the key.
    Fail,
}

/// Why a sample (or a whole shard) was skipped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The shard file does not exist or cannot be opened.
    MissingShard,
    /// A `pipe:` command could not start or exited with an error.
    PipeFailed,
    /// The tar stream is truncated or malformed; the rest of the shard is lost.
    CorruptShard,
    /// The shard holds no sample.
    EmptyShard,
    /// Two files of one sample have the same extension.
    DuplicateField,
    /// The sample has no file with an image extension.
    NoImage,
    /// The image bytes do not decode (corrupt, zero bytes, unknown format).
    BadImage,
    /// The image is larger than the pixel limit (decompression-bomb guard).
    ImageTooLarge,
    /// No caption: no `txt`, no caption field in `json`, or an empty caption.
    MissingCaption,
    /// Caption bytes are not UTF-8, or the `json` does not parse.
    BadText,
}

impl SkipReason {
    pub const ALL: [SkipReason; 10] = [
        SkipReason::MissingShard,
        SkipReason::PipeFailed,
        SkipReason::CorruptShard,
        SkipReason::EmptyShard,
        SkipReason::DuplicateField,
        SkipReason::NoImage,
        SkipReason::BadImage,
        SkipReason::ImageTooLarge,
        SkipReason::MissingCaption,
        SkipReason::BadText,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::MissingShard => "missing_shard",
            SkipReason::PipeFailed => "pipe_failed",
            SkipReason::CorruptShard => "corrupt_shard",
            SkipReason::EmptyShard => "empty_shard",
            SkipReason::DuplicateField => "duplicate_field",
            SkipReason::NoImage => "no_image",
            SkipReason::BadImage => "bad_image",
            SkipReason::ImageTooLarge => "image_too_large",
            SkipReason::MissingCaption => "missing_caption",
            SkipReason::BadText => "bad_text",
        }
    }

    /// Whether this reason concerns a whole shard rather than one sample.
    pub fn is_shard_level(self) -> bool {
        matches!(
            self,
            SkipReason::MissingShard
                | SkipReason::PipeFailed
                | SkipReason::CorruptShard
                | SkipReason::EmptyShard
        )
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bad sample or shard: what, where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    pub reason: SkipReason,
    /// The shard's url.
    pub url: String,
    /// The sample key; empty for shard-level problems.
    pub key: String,
    /// Human-readable detail (decoder message, exit status...).
    pub detail: String,
}

impl Skip {
    /// The error this skip becomes under [`BadDataPolicy::Fail`].
    pub fn into_error(self) -> DataError {
        if self.key.is_empty() {
            DataError::BadShard {
                url: self.url,
                reason: format!("{}: {}", self.reason, self.detail),
            }
        } else {
            DataError::BadSample {
                url: self.url,
                key: self.key,
                reason: format!("{}: {}", self.reason, self.detail),
            }
        }
    }
}

/// Counts of skipped samples/shards by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipCounts(pub BTreeMap<SkipReason, u64>);

impl SkipCounts {
    pub fn add(&mut self, reason: SkipReason) {
        *self.0.entry(reason).or_default() += 1;
    }

    pub fn merge(&mut self, other: &SkipCounts) {
        for (reason, n) in &other.0 {
            *self.0.entry(*reason).or_default() += n;
        }
    }

    pub fn get(&self, reason: SkipReason) -> u64 {
        self.0.get(&reason).copied().unwrap_or(0)
    }

    /// Skipped samples (shard-level events are not samples and are not included).
    pub fn samples(&self) -> u64 {
        self.0
            .iter()
            .filter(|(r, _)| !r.is_shard_level())
            .map(|(_, n)| n)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.values().all(|&n| n == 0)
    }
}

impl fmt::Display for SkipCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let parts: Vec<String> = self
            .0
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        f.write_str(&parts.join(" "))
    }
}

/// Rate-limits bad-data warnings: the first `burst` are printed, then at most one per
/// `interval`, carrying how many were suppressed in between.
#[derive(Debug)]
pub struct WarnLimiter {
    burst: u32,
    interval: Duration,
    printed: u32,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for WarnLimiter {
    fn default() -> Self {
        WarnLimiter::new(10, Duration::from_secs(5))
    }
}

impl WarnLimiter {
    pub fn new(burst: u32, interval: Duration) -> Self {
        WarnLimiter {
            burst,
            interval,
            printed: 0,
            last: None,
            suppressed: 0,
        }
    }

    /// Logs `skip` through `tracing::warn!` unless rate-limited.
    pub fn warn(&mut self, skip: &Skip) {
        let now = Instant::now();
        let due = self.printed < self.burst
            || self
                .last
                .is_none_or(|last| now.duration_since(last) >= self.interval);
        if !due {
            self.suppressed += 1;
            return;
        }
        self.printed = self.printed.saturating_add(1);
        self.last = Some(now);
        let suppressed = std::mem::take(&mut self.suppressed);
        if skip.key.is_empty() {
            tracing::warn!(reason = %skip.reason, shard = %skip.url, suppressed, "skipping shard: {}", skip.detail);
        } else {
            tracing::warn!(reason = %skip.reason, shard = %skip.url, key = %skip.key, suppressed, "skipping sample: {}", skip.detail);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_display() {
        let mut c = SkipCounts::default();
        c.add(SkipReason::BadImage);
        c.add(SkipReason::BadImage);
        c.add(SkipReason::EmptyShard);
        assert_eq!(c.get(SkipReason::BadImage), 2);
        assert_eq!(c.samples(), 2);
        assert_eq!(c.to_string(), "empty_shard=1 bad_image=2");
        let mut d = SkipCounts::default();
        d.merge(&c);
        d.merge(&c);
        assert_eq!(d.get(SkipReason::BadImage), 4);
    }

    #[test]
    fn limiter_suppresses_after_burst() {
        let mut l = WarnLimiter::new(2, Duration::from_secs(3600));
        let skip = Skip {
            reason: SkipReason::BadImage,
            url: "a.tar".into(),
            key: "k".into(),
            detail: "x".into(),
        };
        for _ in 0..5 {
            l.warn(&skip);
        }
        assert_eq!(l.printed, 2);
        assert_eq!(l.suppressed, 3);
    }

    #[test]
    fn fail_policy_error_names_shard_and_key() {
        let skip = Skip {
            reason: SkipReason::MissingCaption,
            url: "s-000001.tar".into(),
            key: "000000017".into(),
            detail: "no txt".into(),
        };
        let msg = skip.into_error().to_string();
        assert!(
            msg.contains("s-000001.tar")
                && msg.contains("000000017")
                && msg.contains("missing_caption")
        );
    }
}
