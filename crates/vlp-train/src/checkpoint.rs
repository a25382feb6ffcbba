//! Training checkpoints: `RUN/checkpoints/step-000123/` with `model.safetensors` (every
//! variable: online, momentum, queues), `optim.safetensors`, `state.json` (where training
//! stands, the recipe included) and `config.json` (the architecture). Written to a hidden
//! temporary folder and renamed into place, so a kill mid-save leaves the previous
//! checkpoint intact; retention is a pure policy ([`to_delete`]).

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use vlp_core::rng::Rng;
use vlp_models::AlbefConfig;

use crate::error::TrainError;
use crate::optim::AdamW;
use crate::recipe::Recipe;

type Result<T> = std::result::Result<T, TrainError>;

pub const CHECKPOINTS: &str = "checkpoints";
pub use vlp_models::{CONFIG_FILE, MODEL_FILE};
pub const OPTIM_FILE: &str = "optim.safetensors";
pub const STATE_FILE: &str = "state.json";

/// Where training stands after `step` optimizer steps: enough, with the model and the
/// optimizer files, to continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done; the next step to run.
    pub step: u64,
    /// The loader's epoch at the last batch taken.
    pub epoch: u64,
    /// The schedule's length, fixed at the start of the run.
    pub total_steps: u64,
    /// Steps over which alpha ramps up, fixed at the start of the run.
    pub alpha_ramp_steps: u64,
    pub samples_seen: u64,
    /// Samples of steps skipped for a non-finite loss or gradient.
    pub skipped_samples: u64,
    /// The loader's `LoaderState` as JSON.
    pub loader: serde_json::Value,
    /// The run's random stream (per-step seeds for dropout and the objectives' draws).
    pub rng: Rng,
    pub recipe: Recipe,
    /// The best validation so far (fine-tuning with `eval.validate`).
    #[serde(default)]
    pub best: Option<BestSoFar>,
    /// The step of the last validation.
    #[serde(default)]
    pub validated_at: Option<u64>,
}

/// Where the best validation mean recall was reached.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BestSoFar {
    pub step: u64,
    pub epoch: u64,
    pub r_mean: f64,
}

/// The folder, inside a run folder, that holds the best checkpoint.
pub const BEST_DIR: &str = "best";

/// The folder name of the checkpoint after `step` steps.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// The step of a checkpoint folder name, `None` for anything else (temporary folders).
pub fn parse_dir_name(name: &str) -> Option<u64> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Retention policy: of the checkpoints at `steps`, those to delete so that the newest
/// `keep_last` remain (`keep_last == 0` keeps all). Pure.
pub fn to_delete(steps: &[u64], keep_last: usize) -> Vec<u64> {
    if keep_last == 0 {
        return Vec::new();
    }
    let mut sorted = steps.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let n = sorted.len().saturating_sub(keep_last);
    sorted.truncate(n);
    sorted
}

/// Steps of the complete checkpoints under `run_dir` (a folder counts once its rename into
/// place happened and its state file is there).
pub fn list(run_dir: &Path) -> Result<Vec<u64>> {
    let dir = run_dir.join(CHECKPOINTS);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut steps = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| TrainError::io(&dir, e))? {
        let entry = entry.map_err(|e| TrainError::io(&dir, e))?;
        let name = entry.file_name();
        if let Some(step) = name.to_str().and_then(parse_dir_name) {
            if entry.path().join(STATE_FILE).is_file() {
                steps.push(step);
            }
        }
    }
    steps.sort_unstable();
    Ok(steps)
}

/// The newest complete checkpoint folder of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run_dir)?
        .last()
        .map(|s| run_dir.join(CHECKPOINTS).join(dir_name(*s))))
}

/// Whether every element of a float tensor is finite (`x * 0 + 0` is 0 for finite `x`
/// and NaN for NaN and infinities).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    let zeros = t.to_dtype(DType::F32)?.affine(0.0, 0.0)?;
    Ok(zeros.sum_all()?.to_scalar::<f32>()? == 0.0)
}

/// Writes a checkpoint after `state.step` steps and applies the retention policy.
/// Refuses (and writes nothing) if any model tensor is non-finite.
pub fn save(
    run_dir: &Path,
    varmap: &VarMap,
    optim: &AdamW,
    config: &AlbefConfig,
    state: &TrainState,
    keep_last: usize,
) -> Result<PathBuf> {
    {
        let data = varmap.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            if !all_finite(data[name].as_tensor())? {
                return Err(TrainError::Checkpoint(format!(
                    "refusing to save step {}: tensor {name} is not finite",
                    state.step
                )));
            }
        }
    }
    let root = run_dir.join(CHECKPOINTS);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let name = dir_name(state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    varmap
        .save(tmp.join(MODEL_FILE))
        .map_err(|e| TrainError::Checkpoint(format!("writing {}: {e}", tmp.display())))?;
    optim.save(&tmp.join(OPTIM_FILE))?;
    config
        .save(&tmp.join(CONFIG_FILE))
        .map_err(TrainError::Model)?;
    let json = serde_json::to_string_pretty(state)
        .map_err(|e| TrainError::Checkpoint(format!("state: {e}")))?;
    write_synced(&tmp.join(STATE_FILE), json.as_bytes())?;
    for f in [MODEL_FILE, OPTIM_FILE, CONFIG_FILE] {
        sync(&tmp.join(f))?;
    }
    let dst = root.join(&name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst).map_err(|e| TrainError::io(&dst, e))?;
    }
    std::fs::rename(&tmp, &dst).map_err(|e| TrainError::io(&dst, e))?;
    if let Ok(d) = std::fs::File::open(&root) {
        let _ = d.sync_all();
    }
    for old in to_delete(&list(run_dir)?, keep_last) {
        let p = root.join(dir_name(old));
        std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
    }
    Ok(dst)
}

/// Reads a checkpoint's state file.
pub fn load_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", path.display())))
}

/// Loads a checkpoint's model variables into a built model's `VarMap` (every name must be
/// there) and the optimizer state.
pub fn load_into(dir: &Path, varmap: &mut VarMap, optim: &mut AdamW) -> Result<()> {
    let model = dir.join(MODEL_FILE);
    varmap
        .load(&model)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", model.display())))?;
    optim.load(&dir.join(OPTIM_FILE))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| TrainError::io(path, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io(path, e))?;
    f.sync_all().map_err(|e| TrainError::io(path, e))
}

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(path, e))
}

/// Writes the model and its config to `RUN_DIR/best` (with `best.json` saying where it
/// was reached), replacing the previous best only once the new one is complete: the new
/// folder is written beside it, the old one is moved aside, the new one moved in, and
/// only then the old one removed.
pub fn save_best(
    run_dir: &Path,
    varmap: &VarMap,
    config: &AlbefConfig,
    best: &BestSoFar,
) -> Result<PathBuf> {
    let tmp = run_dir.join(format!(".tmp-{BEST_DIR}"));
    let old = run_dir.join(format!(".old-{BEST_DIR}"));
    let dst = run_dir.join(BEST_DIR);
    for stale in [&tmp, &old] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(|e| TrainError::io(stale, e))?;
        }
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    varmap
        .save(tmp.join(MODEL_FILE))
        .map_err(|e| TrainError::Checkpoint(format!("writing {}: {e}", tmp.display())))?;
    config
        .save(&tmp.join(CONFIG_FILE))
        .map_err(TrainError::Model)?;
    let json = serde_json::to_string_pretty(best)
        .map_err(|e| TrainError::Checkpoint(format!("best: {e}")))?;
    write_synced(&tmp.join("best.json"), json.as_bytes())?;
    for f in [MODEL_FILE, CONFIG_FILE] {
        sync(&tmp.join(f))?;
    }
    if dst.exists() {
        std::fs::rename(&dst, &old).map_err(|e| TrainError::io(&dst, e))?;
    }
    std::fs::rename(&tmp, &dst).map_err(|e| TrainError::io(&dst, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    }
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_keeps_the_newest() {
        assert_eq!(to_delete(&[30, 10, 20, 40], 2), vec![10, 20]);
        assert_eq!(to_delete(&[10], 2), Vec::<u64>::new());
        assert_eq!(to_delete(&[10, 20], 0), Vec::<u64>::new());
        assert_eq!(to_delete(&[10, 20, 30], 1), vec![10, 20]);
    }

    #[test]
    fn names_round_trip_and_temporaries_are_ignored() {
        assert_eq!(dir_name(123), "step-000123");
        assert_eq!(parse_dir_name("step-000123"), Some(123));
        assert_eq!(parse_dir_name(".tmp-step-000123"), None);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(CHECKPOINTS);
        std::fs::create_dir_all(root.join("step-000010")).unwrap();
        std::fs::write(root.join("step-000010").join(STATE_FILE), "{}").unwrap();
        // Interrupted saves: a temporary folder, and one without its state file.
        std::fs::create_dir_all(root.join(".tmp-step-000020")).unwrap();
        std::fs::create_dir_all(root.join("step-000030")).unwrap();
        assert_eq!(list(dir.path()).unwrap(), vec![10]);
        assert_eq!(
            latest(dir.path()).unwrap().unwrap(),
            root.join("step-000010")
        );
    }

    #[test]
    fn finiteness_check() {
        let dev = candle_core::Device::Cpu;
        assert!(all_finite(&Tensor::new(&[1f32, -2.0], &dev).unwrap()).unwrap());
        assert!(!all_finite(&Tensor::new(&[1f32, f32::NAN], &dev).unwrap()).unwrap());
        assert!(!all_finite(&Tensor::new(&[f32::INFINITY, 0.0], &dev).unwrap()).unwrap());
        assert!(all_finite(&Tensor::new(&[3i64], &dev).unwrap()).unwrap());
    }
}
