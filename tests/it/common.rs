//! Helpers shared by the integration tests: the shard and loader helpers of `vlp-data`'s
//! own tests, and the path of the built `vlp` binary.

use std::path::PathBuf;

#[path = "../../crates/vlp-data/tests/common/mod.rs"]
mod data;
pub use data::*;

#[allow(dead_code)]
pub fn vlp_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vlp"))
}
