//! The one integration-test binary: end-to-end tests on tiny data written on the fly.

mod cli;
mod common;
mod convert;
mod distributed;
mod eval;
mod pretrain;
mod shards_write;
