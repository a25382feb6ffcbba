//! Image-text retrieval evaluation, following ALBEF's protocol (`docs/eval.md`):
//! encode every image and caption, rank by the ITC cosine, re-score each query's top `k`
//! candidates with the fusion encoder's ITM head, and report TR/IR recalls and ranks.
//!
//! - [`metrics`]: recalls, their means, rsum, median and mean ranks, from rankings.
//! - [`set`]: an evaluation shard set: captions grouped by image id, images streamed.
//! - [`retrieval`]: encoding, the candidate pairs, the batched re-ranking, the outcome.
//! - [`report`]: the JSON report and the Markdown table.

pub mod error;
pub mod metrics;
pub mod report;
pub mod retrieval;
pub mod set;

pub use error::{EvalError, Result};
pub use metrics::RetrievalMetrics;
pub use retrieval::{EvalConfig, EvalOutcome, ScoreMode};
