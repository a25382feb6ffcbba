//! vlp-models (being built).
