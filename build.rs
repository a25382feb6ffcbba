//! Turns the test gates that are on (`tests/it/common/gates.rs`: `VLP_SLOW_TESTS`,
//! `VLP_PYTHON`) into `--cfg`s of this package's targets. A gated test is marked
//! `#[cfg_attr(not(CFG), ignore = "...")]`: built without its variable, `cargo test`
//! counts it as ignored and says why, instead of counting a test that did not run as
//! passed. Cargo rebuilds when a gate variable changes.

include!("tests/it/common/gates.rs");

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=tests/it/common/gates.rs");
    for gate in GATES {
        println!("cargo::rerun-if-env-changed={}", gate.var);
        println!("cargo::rustc-check-cfg=cfg({})", gate.cfg);
        if gate.value().is_some() {
            println!("cargo::rustc-cfg={}", gate.cfg);
        }
    }
}
