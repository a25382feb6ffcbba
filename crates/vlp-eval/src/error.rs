//! The evaluation crate's error type.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EvalError {
    #[error("{what}: {detail}")]
    Input { what: String, detail: String },
    /// A tokenizer whose vocabulary or special-token ids differ from the model's: its ids
    /// would index the wrong embedding rows.
    #[error("tokenizer {path} does not fit the model: {mismatch}")]
    Tokenizer { path: PathBuf, mismatch: String },
    /// A tokenizer whose content differs from the one the checkpoint keeps (it was
    /// trained with): it fits the model's sizes and ids, and numbers the words otherwise.
    #[error(
        "tokenizer {given} is not the one the model was trained with ({kept}): the same \
         ids would stand for other words; use that one, or {switch} to go on with this one"
    )]
    OtherTokenizer {
        given: PathBuf,
        kept: PathBuf,
        switch: String,
    },
    /// An image pass found images whose header reads but whose data does not decode;
    /// [`crate::set::EvalSet::with_images`] skips them and evaluates again.
    #[error("{count} eval image(s) whose header reads do not decode")]
    Undecodable { count: usize },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Model(#[from] vlp_models::ModelError),
    #[error(transparent)]
    Data(#[from] vlp_data::error::DataError),
    /// The ranks of a parallel evaluation could not exchange their scores.
    #[error(transparent)]
    Dist(#[from] vlp_dist::DistError),
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
