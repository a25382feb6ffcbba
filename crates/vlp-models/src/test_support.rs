//! Test support, not model API: the tiny model config the unit tests of every crate of
//! the workspace build on. Public only because tests in other crates cannot see this
//! crate's `#[cfg(test)]` items; hidden from the documentation.

use crate::config::{AlbefConfig, Layout, TextConfig, VisionConfig};

/// A model small enough for unit tests in every crate (ALBEF layout, hidden 32,
/// 1 text + 1 fusion layer, 2 ViT layers, 32 x 32 images, vocabulary 50, queue 8,
/// dropout 0.1). Not a preset: nothing trains usefully at this size.
pub fn micro_config() -> AlbefConfig {
    AlbefConfig {
        vision: VisionConfig {
            image_size: 32,
            patch_size: 8,
            hidden: 32,
            layers: 2,
            heads: 4,
            mlp_ratio: 2.0,
            eps: 1e-6,
            qkv_bias: true,
        },
        text: TextConfig {
            vocab_size: 50,
            hidden: 32,
            layers: 2,
            heads: 4,
            intermediate: 64,
            max_positions: 16,
            eps: 1e-12,
            dropout: 0.1,
            type_vocab_size: 2,
            layout: Layout::Albef { fusion_layer: 1 },
            has_mlm_head: true,
            pad_id: 0,
            cls_id: 2,
            sep_id: 3,
            mask_id: 4,
            enc_id: None,
        },
        embed_dim: 16,
        temp: 0.07,
        queue_size: 8,
    }
}
