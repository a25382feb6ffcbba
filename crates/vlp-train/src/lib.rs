//! `vlp-train`: ALBEF pretraining on candle. [`objectives`] holds one home per loss (ITC
//! with momentum distillation, VSE++, ITM with hard negatives, MLM with momentum
//! distillation) and their config; [`step`] runs them in the reference order for one
//! batch and returns the total loss with its named parts.

mod bounds;
pub mod checkpoint;
pub mod error;
/// The stop request a signal records (kept in `vlp-core`, where the loader reads it too).
pub use vlp_core::interrupt;
pub mod metrics;
pub mod objectives;
pub mod optim;
pub mod pretrain;
pub mod recipe;
pub mod relocate;
pub mod run_lock;
pub mod schedule;
pub mod step;
pub mod tensorboard;
pub mod train_step;

pub use error::{Result, TrainError};
pub use objectives::ObjectiveConfig;
pub use step::{pretrain_losses, Draws, HostTokens, QueueEntry, StepBatch, StepLosses, StepStats};
pub use train_step::{train_step, StepReport, StepSettings};
/// The processes of a run and their exchanges (`vlp-dist`).
pub use vlp_dist as dist;
