//! `vlp-data`: everything from WebDataset tar shards on disk (or behind a `pipe:` command)
//! to batches of candle tensors, and the tools that write such shards.
//!
//! Reading: [`spec`] expands shard specs, [`source`] opens shards, [`shard`] groups tar
//! members into samples, [`fields`] picks image, captions and image id out of a sample,
//! [`caption`] cleans captions, [`image_ops`] decodes and augments images, [`tokenize`]
//! turns captions into ids, and [`loader`] runs the whole pipeline on worker threads with
//! shuffling, rank/worker splitting, batching and an exact resume state.
//!
//! Writing: [`writer`] writes shards and their manifest, [`ingest`] reads annotation lists,
//! folders and CSV files, [`synth`] generates a synthetic shapes dataset.

pub mod caption;
pub mod error;
pub mod fields;
pub mod image_ops;
pub mod ingest;
pub mod loader;
pub mod randaugment;
pub mod shard;
pub mod source;
pub mod spec;
pub mod stats;
pub mod synth;
pub mod tokenize;
pub mod writer;

pub use error::{DataError, Result};
/// The seeded, serialisable RNG (shared with the model crates).
pub use vlp_core::rng;
