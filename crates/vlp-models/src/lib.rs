//! `vlp-models`: the trainable networks of ALBEF-style vision-language pretraining on
//! candle, and checkpoint import.
//!
//! [`nn`] holds the building blocks (all with a backward), [`attention`] the one attention
//! function, [`config`] the architecture configs and presets, [`vit`] the image encoder,
//! [`bert`] the text/fusion encoder with its MLM head, [`albef`] the whole model with its
//! momentum twin and queues, [`import`] the checkpoint importers. Parameter names are
//! ALBEF's checkpoint names throughout (see docs/models.md).

pub mod albef;
pub mod attention;
pub mod bert;
pub mod config;
mod dispatch;
pub mod error;
mod fused;
pub mod import;
pub mod load;
pub mod nn;
mod params;
pub mod recompute;
#[doc(hidden)]
pub mod test_support;
pub mod vit;

pub use albef::{smoke_loss, AlbefModel, SmokeLoss};
pub use attention::{attention, AttentionBackend};
pub use bert::{BertModel, FusionInput, FusionText};
pub use config::{AlbefConfig, Layout, TextConfig, VisionConfig};
pub use error::{ModelError, Result, TensorProblem};
pub use load::{
    check_tensor_names, expected_tensors, load_into_varmap, load_model, LoadMode, LoadedModel,
    CONFIG_FILE, MODEL_FILE,
};
pub use vit::{interpolate_pos_embed, VisionTransformer};
