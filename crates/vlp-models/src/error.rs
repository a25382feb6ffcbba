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

    /// A size given on the command line (`--image-size`) or in a recipe (`data.image_size`)
    /// is out of what the model and memory allow.
    #[error("{}: {reason}", shown_size(flag, *value))]
    Size {
        flag: String,
        value: usize,
        reason: String,
    },

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

    /// A checkpoint's tensors do not fit the model or hold NaN/Inf; every bad tensor is
    /// listed by name.
    #[error("{}: {}", path.display(), list_problems(problems))]
    Checkpoint {
        path: PathBuf,
        problems: Vec<TensorProblem>,
    },

    /// JSON could not be read or written (config.json).
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One bad tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TensorProblem {
    /// The model has the tensor, the file does not.
    Missing { name: String },
    /// The file's tensor has another shape than the model's (after interpolating
    /// position embeddings).
    Shape {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// The file's tensor holds NaN or infinite values.
    NonFinite {
        name: String,
        nan: usize,
        inf: usize,
    },
    /// The tensor could not be read or converted.
    Unreadable { name: String, message: String },
}

impl std::fmt::Display for TensorProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorProblem::Missing { name } => write!(f, "missing tensor {name}"),
            TensorProblem::Shape {
                name,
                found,
                expected,
            } => write!(f, "{name} is {found:?}, the model's {expected:?}"),
            TensorProblem::NonFinite { name, nan, inf } => {
                let counts: Vec<String> = [(*nan, "NaN"), (*inf, "Inf")]
                    .iter()
                    .filter(|(n, _)| *n > 0)
                    .map(|(n, what)| format!("{n} {what}"))
                    .collect();
                write!(f, "non-finite values in {name} ({})", counts.join(", "))
            }
            TensorProblem::Unreadable { name, message } => write!(f, "{name}: {message}"),
        }
    }
}

/// Bad tensors for a message: the first 20, then how many more.
pub(crate) fn list_problems(problems: &[TensorProblem]) -> String {
    let shown: Vec<String> = problems.iter().take(20).map(|p| p.to_string()).collect();
    let more = problems.len().saturating_sub(shown.len());
    let mut text = shown.join("; ");
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    text
}

/// A size as it was given: `--image-size 4096` for a flag, `data.image_size = 4096` for a
/// recipe key.
fn shown_size(flag: &str, value: usize) -> String {
    if flag.starts_with("--") {
        format!("{flag} {value}")
    } else {
        format!("{flag} = {value}")
    }
}

impl ModelError {
    pub(crate) fn size(flag: &str, value: usize, reason: impl Into<String>) -> Self {
        ModelError::Size {
            flag: flag.to_string(),
            value,
            reason: reason.into(),
        }
    }

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
