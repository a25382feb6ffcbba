//! `vlp-core`: the few pieces that both the data and the model crates need and that must
//! behave identically in both — today the seeded, serialisable RNG that makes shuffling,
//! augmentation, masking, negative sampling and dropout reproducible and resumable.

pub mod rng;
