//! The one error type of `vlp-train`: every variant names what caused it (objective,
//! input, config key).

/// Errors of the training crate.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),

    /// The device asked for cannot be used.
    #[error(transparent)]
    Device(#[from] vlp_core::device::DeviceError),

    /// The model refused an input or a parameter.
    #[error(transparent)]
    Model(#[from] vlp_models::ModelError),

    /// A step input does not fit (batch sizes, replayed draws, dtypes).
    #[error("bad input `{what}`: {reason}")]
    Input { what: String, reason: String },

    /// The objective config is inconsistent with itself or with the model.
    #[error("invalid objective config `{field}`: {reason}")]
    Config { field: String, reason: String },

    /// The data pipeline failed (shards, tokenizer, loader state).
    #[error(transparent)]
    Data(#[from] vlp_data::DataError),

    /// The processes of a data-parallel run could not meet or exchange.
    #[error(transparent)]
    Dist(#[from] vlp_dist::DistError),

    /// The retrieval evaluation failed.
    #[error(transparent)]
    Eval(#[from] vlp_eval::EvalError),

    /// A recipe could not be read, overridden or validated; the message names the key.
    #[error("recipe: {0}")]
    Recipe(String),

    /// The optimizer refused its parameters or its saved state.
    #[error("optimizer: {0}")]
    Optim(String),

    /// A checkpoint could not be written, found or read.
    #[error("checkpoint: {0}")]
    Checkpoint(String),

    /// A loss or a gradient became NaN or infinite.
    #[error("non-finite {what} at step {step}")]
    NonFinite { step: u64, what: String },

    /// Every step of a run was skipped under `run.on_nonfinite = "skip"`: the run trained
    /// nothing, which is not a success.
    #[error(
        "every step of the run ({steps} in all) was skipped for non-finite values \
         (run.on_nonfinite = \"skip\"): nothing was trained, and no final checkpoint or \
         evaluation was written (look for an optim.lr too high for the model, or NaN in the \
         data)"
    )]
    EveryStepSkipped { steps: u64 },

    /// Another run holds the run folder.
    #[error(
        "{run_dir} is in use by another run ({holder}); wait for it to end or choose another \
         run.out_dir"
    )]
    Busy {
        run_dir: std::path::PathBuf,
        holder: String,
    },

    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl TrainError {
    pub fn io(path: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        TrainError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn input(what: impl Into<String>, reason: impl Into<String>) -> Self {
        TrainError::Input {
            what: what.into(),
            reason: reason.into(),
        }
    }

    pub fn config(field: impl Into<String>, reason: impl Into<String>) -> Self {
        TrainError::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Result with [`TrainError`].
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
