//! The one error type of `vlp-dist`: each variant names the rank, address or variable
//! concerned.

use std::time::Duration;

/// Errors of the launch environment, the rendezvous and the collectives.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A launch variable is missing, malformed or inconsistent with another.
    #[error("launch environment: `{var}`: {reason}")]
    Env { var: String, reason: String },

    /// Rank 0 waited for the others and some never arrived.
    #[error(
        "rendezvous at {addr}: rank(s) {missing:?} of {world_size} did not arrive within {} s \
         (each process needs the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE; under SLURM, \
         start one task per process with srun)",
        waited.as_secs()
    )]
    Missing {
        addr: String,
        missing: Vec<usize>,
        world_size: usize,
        waited: Duration,
    },

    /// A rank other than 0 could not reach rank 0, or was turned away.
    #[error("rendezvous: rank {rank} could not join rank 0 at {addr}: {reason}")]
    Join {
        rank: usize,
        addr: String,
        reason: String,
    },

    /// A peer closed its connection or stopped answering during a collective.
    #[error("rank {peer} {what} during {op} (it stopped or failed; see its own output)")]
    PeerLost {
        peer: usize,
        op: &'static str,
        what: String,
    },

    /// The ranks called different collectives, or the same one with different inputs: a
    /// bug or a divergence between the processes, never combined silently.
    #[error("ranks out of step: {0}")]
    OutOfStep(String),

    /// A tensor that this backend cannot exchange (dtype, device, shape).
    #[error("{op}: {reason}")]
    Unsupported { op: &'static str, reason: String },

    /// A socket operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// A tensor operation failed.
    #[error("tensor: {0}")]
    Tensor(#[from] candle_core::Error),

    /// NCCL refused an operation.
    #[error("NCCL {op}: {reason}")]
    Nccl { op: &'static str, reason: String },
}

impl DistError {
    pub(crate) fn env(var: &str, reason: impl Into<String>) -> Self {
        DistError::Env {
            var: var.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        DistError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, DistError>;
