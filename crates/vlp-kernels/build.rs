//! Compiles `cuda/*.cu` to PTX when the `cuda` feature is on and writes `ptx.rs`, one
//! `&str` constant per source file (`ATTENTION`, `ROWS`, `OPTIM`).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    #[cfg(feature = "cuda")]
    if let Err(e) = ptx() {
        panic!("compiling vlp's CUDA kernels: {e}");
    }
}

#[cfg(feature = "cuda")]
fn ptx() -> cudaforge::Result<()> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    cudaforge::KernelBuilder::new()
        .source_dir("cuda")
        .arg("-std=c++17")
        .arg("-O3")
        .arg("--expt-relaxed-constexpr")
        .build_ptx()?
        .write(out.join("ptx.rs"))
}
