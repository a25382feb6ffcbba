//! The one error type of `vlp-models`: every variant names the preset, config field,
//! tensor or file that caused it.

use std::path::PathBuf;

/// Errors of the models crate.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed (shape mismatch, missing tensor in a `VarBuilder`...).
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),

    /// No preset of that name.
    #[error("unknown model preset `{name}` (known: {known})")]
    UnknownPreset { name: String, known: String },

    /// A config field is out of range or inconsistent with another.
    #[error("invalid model config `{field}`: {reason}")]
    Config { field: String, reason: String },

    /// An input does not fit the model (image size, sequence length, batch mismatch).
    #[error("bad input `{what}`: {reason}")]
    Input { what: String, reason: String },

    /// A parameter cannot be used the way asked (not a variable, missing momentum twin).
    #[error("parameter `{name}`: {reason}")]
    Param { name: String, reason: String },

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// JSON could not be read or written (config.json).
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ModelError {
    pub(crate) fn config(field: &str, reason: impl Into<String>) -> Self {
        ModelError::Config {
            field: field.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn input(what: &str, reason: impl Into<String>) -> Self {
        ModelError::Input {
            what: what.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn param(name: &str, reason: impl Into<String>) -> Self {
        ModelError::Param {
            name: name.to_string(),
            reason: reason.into(),
        }
    }
}

/// Result alias of the models crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
