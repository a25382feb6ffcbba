//! The one error type of `vlp-data`: every variant names the shard, sample key, file or
//! option that caused it, so a user can act on the message without a debugger.
//!
//! A variant that wraps another error keeps it as its `source` and leaves it out of its
//! own message: the CLI prints the whole chain (`outer: inner`), so writing the source
//! into the message too would print it twice.

use std::path::PathBuf;

/// Errors of the data crate.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A shard specification could not be parsed (bad brace range, empty source...).
    #[error("bad shard spec `{spec}`: {reason}")]
    Spec { spec: String, reason: String },

    /// A shard spec expanded to no shard at all.
    #[error("shard spec `{spec}` matches no shard")]
    NoShards { spec: String },

    /// Reading or opening a file failed.
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A sample was bad and the policy is `fail`.
    #[error("bad sample `{key}` in shard {url}: {reason}")]
    BadSample {
        url: String,
        key: String,
        reason: String,
    },

    /// A whole shard could not be read and the policy is `fail`.
    #[error("bad shard {url}: {reason}")]
    BadShard { url: String, reason: String },

    /// A tokenizer could not be loaded, configured, trained or used.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: String, reason: String },

    /// A loader or writer option is out of range or inconsistent.
    #[error("invalid option `{option}`: {reason}")]
    Config { option: String, reason: String },

    /// A signal asked the program to stop while the loader waited for a batch (the
    /// batch sequence is unchanged: nothing was handed out).
    #[error("stopped by signal {signal} while waiting for data")]
    Interrupted { signal: i32 },

    /// A resume state does not fit the loader it is restored into.
    #[error("cannot resume the loader: {reason}")]
    Resume { reason: String },

    /// An input record (annotation list, CSV row, image file) could not be used when writing shards.
    #[error("{source_name}: {reason}")]
    Input { source_name: String, reason: String },

    /// Building a tensor failed.
    #[error("building a batch tensor")]
    Tensor(#[from] candle_core::Error),

    /// An epoch ended without a single batch (or, in resampled mode, shard after shard
    /// gave no usable sample): every shard missing, empty, corrupt or failing, or fewer
    /// usable samples than a batch. Training on would wait forever.
    #[error("epoch {epoch} gave no batch of {batch_size}: {detail}; nothing to train on")]
    NoBatch {
        epoch: u64,
        batch_size: usize,
        detail: String,
    },

    /// JSON could not be read or written (manifest, loader state).
    #[error("{what}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(option: &str, reason: impl Into<String>) -> Self {
        DataError::Config {
            option: option.to_string(),
            reason: reason.into(),
        }
    }
}

/// Result alias of the data crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The message as the CLI prints it: each error of the chain once, joined by `: `.
    fn chain(err: &dyn std::error::Error) -> String {
        let mut parts = vec![err.to_string()];
        let mut source = err.source();
        while let Some(e) = source {
            parts.push(e.to_string());
            source = e.source();
        }
        parts.join(": ")
    }

    #[test]
    fn a_wrapped_cause_is_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = DataError::io("/data/train-000000.tar", io);
        assert_eq!(chain(&err), "/data/train-000000.tar: no such file");
        let json = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        let err = DataError::Json {
            what: "manifest m.json".into(),
            source: json,
        };
        let text = chain(&err);
        assert_eq!(text.matches("EOF").count(), 1, "{text}");
    }
}
