//! vlp's CUDA kernels as PTX text, loaded at run time through candle's `CudaDevice`
//! (`vlp_models::fused::cuda` does the loading and launching).
//!
//! One module per source file in `cuda/`: [`ATTENTION`] (FlashAttention-2 style forward
//! and backward), [`ROWS`] (LayerNorm, bias + GELU, broadcast add, column sums, softmax and
//! log-softmax, soft-target cross-entropy, dropout, EMA) and [`OPTIM`] (AdamW). Every kernel has an `_f32` and a
//! `_bf16` instance (f32 arithmetic inside); AdamW works on f32 master weights only.
//! Without the `cuda` feature the crate holds nothing.

#[cfg(feature = "cuda")]
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/ptx.rs"));
}

#[cfg(feature = "cuda")]
pub use ptx::{ATTENTION, OPTIM, ROWS};
