//! `vlp-core`: the few pieces that every vlp crate needs and that must behave identically
//! everywhere: the seeded, serialisable RNG that makes shuffling, augmentation, masking,
//! negative sampling and dropout reproducible and resumable; the device seam; stable
//! hashes; limits shared by the loader, the evaluator and the shard writer; the stop
//! request a signal records, which the training loop and the loader's waits read; the
//! file mode of what the safetensors writer writes.

pub mod device;
pub mod fs;
pub mod hash;
pub mod interrupt;
pub mod rng;

/// The most pixels a decoded image may have (PIL's `MAX_IMAGE_PIXELS`, 89,478,485): a
/// decompression bomb is refused from its header, before any pixel buffer is allocated.
pub const MAX_IMAGE_PIXELS: u64 = 89_478_485;
