//! vlp-train (being built).
