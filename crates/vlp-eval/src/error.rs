//! The evaluation crate's error type.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EvalError {
    #[error("{what}: {detail}")]
    Input { what: String, detail: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] vlp_models::ModelError),
    #[error(transparent)]
    Data(#[from] vlp_data::error::DataError),
}

impl EvalError {
    pub fn input(what: impl Into<String>, detail: impl Into<String>) -> Self {
        EvalError::Input {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, EvalError>;
