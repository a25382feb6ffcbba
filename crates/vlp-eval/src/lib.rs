//! Image-text retrieval evaluation, following ALBEF's protocol (`docs/eval.md`):
//! encode every image and caption, rank by the ITC cosine, re-score each query's top `k`
//! candidates with the fusion encoder's ITM head, and report TR/IR recalls and ranks.
//!
//! - [`metrics`]: recalls, their means, rsum, median and mean ranks, from rankings.
//! - [`set`]: an evaluation shard set: captions grouped by image id, images streamed.
//! - [`retrieval`]: encoding, the candidate pairs, the batched re-ranking, the outcome.
//! - [`report`]: the JSON report and the Markdown table.
//! - [`score`]: the ITC cosine and ITM probability of given image-caption pairs.
//! - [`tokenizer`]: the checks that a tokenizer fits a model and is the one a checkpoint
//!   was trained with; the text side a checkpoint keeps.

pub mod error;
pub mod metrics;
pub mod report;
pub mod retrieval;
pub mod score;
pub mod set;
pub mod tokenizer;

pub use error::{EvalError, Result};
pub use metrics::RetrievalMetrics;
pub use retrieval::{EvalConfig, EvalOutcome, ScoreMode};
pub use score::{score_pairs, PairScore};
pub use tokenizer::{check_same_tokenizer, check_tokenizer, AllowOther, TextSettings};
