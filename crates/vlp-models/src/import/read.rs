//! Reading a checkpoint file into named tensors: safetensors, or a PyTorch zip `.pth`
//! through `candle_core::pickle` (which interprets the pickle's opcodes as data and never
//! runs any of its code).

use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::ImportError;

/// The kinds of file a checkpoint comes in, told apart by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Safetensors,
    /// PyTorch >= 1.6 `torch.save` (a zip archive holding `data.pkl`).
    TorchZip,
    /// PyTorch's legacy (pre-1.6) pickle-only format.
    TorchLegacy,
}

fn read_head(path: &Path) -> Result<Vec<u8>, ImportError> {
    let mut f = std::fs::File::open(path).map_err(|e| ImportError::io(path, e))?;
    let mut head = Vec::with_capacity(16);
    f.by_ref()
        .take(16)
        .read_to_end(&mut head)
        .map_err(|e| ImportError::io(path, e))?;
    Ok(head)
}

/// Tells the file kind from its first bytes.
pub fn file_kind(path: &Path) -> Result<FileKind, ImportError> {
    let head = read_head(path)?;
    if head.starts_with(b"PK\x03\x04") {
        return Ok(FileKind::TorchZip);
    }
    // A pickle starts with PROTO (0x80) and a protocol number.
    if head.len() >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) {
        return Ok(FileKind::TorchLegacy);
    }
    // safetensors: an 8-byte little-endian header length, then a JSON object.
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(FileKind::Safetensors);
    }
    Err(ImportError::Read {
        path: path.to_owned(),
        message: format!(
            "neither safetensors nor a PyTorch checkpoint (file starts with {:02x?}; {} bytes)",
            &head,
            std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
        ),
    })
}

/// All tensors of a checkpoint, on the CPU, under the file's own names (sorted).
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>, ImportError> {
    let read_err = |message: String| ImportError::Read {
        path: path.to_owned(),
        message,
    };
    let mut tensors: Vec<(String, Tensor)> = match file_kind(path)? {
        FileKind::Safetensors => candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| read_err(format!("invalid safetensors file: {e}")))?
            .into_iter()
            .collect(),
        FileKind::TorchZip => read_pth(path)?,
        FileKind::TorchLegacy => {
            return Err(read_err(
                "a PyTorch checkpoint in the legacy (pre-1.6) format, which cannot be read \
                 without running its pickle; re-save it with a current PyTorch: \
                 `torch.save(torch.load(path, weights_only=True), new_path)`"
                    .into(),
            ))
        }
    };
    if tensors.is_empty() {
        return Err(read_err("the file holds no tensors".into()));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// A zip `.pth`: the state dict under `model` (ALBEF, DeiT), `state_dict`, or at the top.
fn read_pth(path: &Path) -> Result<Vec<(String, Tensor)>, ImportError> {
    let mut last_error = String::new();
    for key in [Some("model"), Some("state_dict"), None] {
        match candle_core::pickle::PthTensors::new(path, key) {
            Ok(pth) if !pth.tensor_infos().is_empty() => {
                let mut names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
                names.sort();
                let mut out = Vec::with_capacity(names.len());
                for name in names {
                    let tensor = pth.get(&name).map_err(|e| ImportError::Read {
                        path: path.to_owned(),
                        message: format!("tensor `{name}`: {e}"),
                    })?;
                    if let Some(t) = tensor {
                        out.push((name, t));
                    }
                }
                return Ok(out);
            }
            Ok(_) => last_error = format!("no tensors under key {key:?}"),
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(ImportError::Read {
        path: path.to_owned(),
        message: format!("not a readable PyTorch zip checkpoint: {last_error}"),
    })
}
