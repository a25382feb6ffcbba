//! Training checkpoints: `RUN/checkpoints/step-000123/` with `model.safetensors` (every
//! variable: online, momentum, queues), `optim.safetensors`, `state.json` (where training
//! stands, the recipe included), `config.json` (the architecture), and the run's text
//! side ([`TextRecord`]): `tokenizer.json` (a copy of the run's tokenizer) and `text.json`
//! (`max_tokens`, `max_words`), so that evaluating or fine-tuning the checkpoint reads
//! captions as training did. Written to a hidden temporary folder and renamed into place,
//! so a kill mid-save leaves the previous checkpoint intact; retention is a pure policy
//! ([`to_delete`]).

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
pub use vlp_eval::tokenizer::{TEXT_FILE, TOKENIZER_FILE};
use vlp_eval::TextSettings;

/// What a checkpoint keeps of its run's text side: the bytes of the tokenizer file the run
/// read (written as [`TOKENIZER_FILE`]; read once at the start, so a file changed on disk
/// mid-run is not what the checkpoint claims it trained with) and the caption settings
/// (written as [`TEXT_FILE`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TextRecord {
    pub tokenizer: Vec<u8>,
    pub settings: TextSettings,
}

impl TextRecord {
    /// The record of a run reading captions with the tokenizer file `tokenizer`.
    pub fn read(tokenizer: &Path, settings: TextSettings) -> Result<Self> {
        let bytes = std::fs::read(tokenizer).map_err(|e| TrainError::io(tokenizer, e))?;
        Ok(TextRecord {
            tokenizer: bytes,
            settings,
        })
    }

    /// Writes both files into `dir`, synced (created as any file is: the umask's mode).
    fn write(&self, dir: &Path) -> Result<()> {
        for (file, bytes) in [
            (TOKENIZER_FILE, self.tokenizer.as_slice()),
            (TEXT_FILE, self.settings.to_json().as_bytes()),
        ] {
            write_synced(&dir.join(file), bytes)?;
        }
        Ok(())
    }
}

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
    /// Each rank's `LoaderState` as JSON, rank-major (checkpoints written before runs had
    /// ranks hold one, under `loader`).
    #[serde(alias = "loader", deserialize_with = "one_per_rank")]
    pub loaders: Vec<serde_json::Value>,
    /// Whether the momentum update ends each step (it started the next one in checkpoints
    /// written before; resuming one of those runs that update first, so the continuation
    /// is exact either way).
    #[serde(default)]
    pub momentum_updated: bool,
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

/// Reads `loaders` as a list, or one state (older checkpoints) as a list of one.
fn one_per_rank<'de, D>(d: D) -> std::result::Result<Vec<serde_json::Value>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Array(states) => states,
        one => vec![one],
    })
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

/// The file in [`BEST_DIR`] that says where the best checkpoint was reached.
pub const BEST_RECORD: &str = "best.json";

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

/// The folder of the checkpoint of `step` in `run_dir`.
pub fn dir_of(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(CHECKPOINTS).join(dir_name(step))
}

/// The checkpoint folder that `path` names, for commands that read a model (`eval
/// retrieval`, `embed`, `score`, `convert --init`) and recipes' `model.init` and
/// `objectives.distill.teacher`: a folder with `config.json` is one; a training run
/// folder means its `best/` when it has one (fine-tuning's selected weights), else its
/// newest complete checkpoint ([`latest`]). The choice is logged. A path that is no
/// folder is returned as it is, for the loader to name what is missing.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    if path.join(CONFIG_FILE).is_file() || !path.is_dir() {
        return Ok(path.to_path_buf());
    }
    let best = path.join(BEST_DIR);
    let (chosen, which) = if best.join(CONFIG_FILE).is_file() {
        (best, "its best checkpoint")
    } else {
        match latest(path)? {
            Some(dir) => (dir, "its newest complete checkpoint"),
            None => {
                return Err(TrainError::Checkpoint(format!(
                    "{} holds no {CONFIG_FILE}, and is no training run with a checkpoint \
                     (no {BEST_DIR}/, nothing under {CHECKPOINTS}/)",
                    path.display()
                )))
            }
        }
    };
    tracing::info!(
        "{} is a training run: using {which}, {}",
        path.display(),
        chosen.display()
    );
    Ok(chosen)
}

/// The newest checkpoint folder of a run that [`verify`] accepts; `None` when the run has
/// no checkpoint at all. Newer ones it refuses (a model file cut short by a full disk, a
/// tensor that is not finite) are passed over with a warning naming them and why. When
/// there are checkpoints and none can be used, the error names each and why it failed:
/// a resumed run never starts over from nothing, and nothing in the folder is changed.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let steps = list(run_dir)?;
    let mut refused = Vec::new();
    for &step in steps.iter().rev() {
        let dir = dir_of(run_dir, step);
        match verify(&dir) {
            Ok(()) => return Ok(Some(dir)),
            Err(e) => {
                tracing::warn!("passing over {}: {e}", dir.display());
                refused.push(format!("{}: {e}", dir_name(step)));
            }
        }
    }
    if refused.is_empty() {
        return Ok(None);
    }
    Err(TrainError::Checkpoint(format!(
        "none of the {} checkpoint(s) in {} can be used: {}",
        refused.len(),
        run_dir.join(CHECKPOINTS).display(),
        refused.join("; ")
    )))
}

/// Checks that a checkpoint folder can be resumed from: its state parses, its config is
/// there, its model file holds every tensor of that config at its shape, its model and
/// optimizer files are whole safetensors files (every tensor's bytes present) and every
/// float in the model file is finite.
pub fn verify(dir: &Path) -> Result<()> {
    load_state(dir)?;
    let config_path = dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(TrainError::Checkpoint(format!(
            "{} is missing",
            config_path.display()
        )));
    }
    let config = AlbefConfig::load(&config_path)?;
    // The text side it keeps, when it keeps one: a resumed run reads captions with it.
    vlp_eval::tokenizer::TextSettings::load(dir)
        .map_err(|e| TrainError::Checkpoint(format!("{}: {e}", dir.join(TEXT_FILE).display())))?;
    // Parsed as JSON only (the resumed run builds the tokenizer itself): a file cut short
    // or overwritten is caught here, so `latest` passes over its checkpoint.
    let tokenizer = dir.join(TOKENIZER_FILE);
    if tokenizer.is_file() {
        let bytes = std::fs::read(&tokenizer).map_err(|e| TrainError::io(&tokenizer, e))?;
        serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| {
            TrainError::Checkpoint(format!("{} does not load ({e})", tokenizer.display()))
        })?;
    }
    for (file, is_model) in [(MODEL_FILE, true), (OPTIM_FILE, false)] {
        let path = dir.join(file);
        // Mapped, not read: the optimizer file (twice the model's size) is only checked for
        // completeness, and the model file's pages stay cached for the load that follows.
        // SAFETY: the run holds the folder's lock; nothing writes a finished checkpoint.
        let tensors =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }.map_err(|e| {
                TrainError::Checkpoint(format!("{} is incomplete or corrupt ({e})", path.display()))
            })?;
        if is_model {
            let views = tensors.tensors();
            let shapes = views
                .iter()
                .map(|(name, view)| (name.clone(), view.shape().to_vec()))
                .collect();
            let mut bad: Vec<String> = vlp_models::check_tensor_names(&config, &shapes)?
                .iter()
                .map(ToString::to_string)
                .collect();
            if !bad.is_empty() {
                bad.truncate(8);
                return Err(TrainError::Checkpoint(format!(
                    "{} does not hold the model of its {CONFIG_FILE}: {}",
                    path.display(),
                    bad.join(", ")
                )));
            }
            let mut bad: Vec<String> = views
                .into_iter()
                .filter(|(_, view)| !view_is_finite(view))
                .map(|(name, _)| name)
                .collect();
            if !bad.is_empty() {
                bad.sort();
                return Err(TrainError::Checkpoint(format!(
                    "{} holds non-finite values in {}",
                    path.display(),
                    bad.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// Whether every float of a stored tensor is finite (integers always are).
fn view_is_finite(view: &safetensors::tensor::TensorView) -> bool {
    use safetensors::Dtype;
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        Dtype::F64 => data
            .chunks_exact(8)
            .all(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")).is_finite()),
        // bf16 and f16: an exponent of all ones is infinity or NaN.
        Dtype::BF16 => data
            .chunks_exact(2)
            .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7F80 != 0x7F80),
        Dtype::F16 => data
            .chunks_exact(2)
            .all(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7C00 != 0x7C00),
        _ => true,
    }
}

/// Renames every checkpoint after step `step` to `step-N.broken` (kept for inspection,
/// never listed, resumed from or pruned). Resuming from `step` when newer checkpoints
/// failed [`verify`]: the run writes those step numbers again, and pruning, which keeps
/// the newest steps, must not prefer the broken ones to them.
pub fn set_aside_after(run_dir: &Path, step: u64) -> Result<()> {
    let root = run_dir.join(CHECKPOINTS);
    for newer in list(run_dir)?.into_iter().filter(|&s| s > step) {
        let from = root.join(dir_name(newer));
        let to = root.join(format!("{}.broken", dir_name(newer)));
        tracing::warn!("setting {} aside as {}", from.display(), to.display());
        if to.exists() {
            std::fs::remove_dir_all(&to).map_err(|e| TrainError::io(&to, e))?;
        }
        std::fs::rename(&from, &to).map_err(|e| TrainError::io(&from, e))?;
    }
    Ok(())
}

/// The training run or checkpoint folder that `path` is, or lies inside, with what marks
/// it as one; `None` for a path outside every run. The one rule of which paths other
/// commands (`vlp convert --out`, `vlp embed --out`) never write to: a run's next save
/// sweeps what it does not know under `checkpoints/`, and a file replaced inside a
/// checkpoint would be resumed as the run's own. A checkpoint holds `state.json` or
/// `optim.safetensors`; a best folder `best.json`; a run folder `.lock`,
/// `recipe.resolved.toml`, or a `checkpoints/` folder with a `step-N` folder in it (a
/// folder of downloaded checkpoints named `checkpoints` is no run).
pub fn enclosing_run(path: &Path) -> Option<Enclosing> {
    let path = resolved(path);
    let has_steps = |dir: &Path| {
        std::fs::read_dir(dir.join(CHECKPOINTS)).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_str().and_then(parse_dir_name).is_some())
        })
    };
    path.ancestors().find_map(|dir| {
        let mut holds: Vec<&'static str> = [
            STATE_FILE,
            OPTIM_FILE,
            BEST_RECORD,
            crate::run_lock::LOCK_FILE,
            crate::pretrain::RESOLVED_RECIPE,
        ]
        .into_iter()
        .filter(|f| dir.join(f).is_file())
        .collect();
        if has_steps(dir) {
            holds.push("checkpoints/step-N");
        }
        (!holds.is_empty()).then(|| Enclosing {
            dir: dir.to_path_buf(),
            depth: path
                .strip_prefix(dir)
                .map_or(0, |rel| rel.components().count()),
            holds,
        })
    })
}

/// The run or checkpoint folder [`enclosing_run`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enclosing {
    /// The folder.
    pub dir: PathBuf,
    /// The files that mark it.
    pub holds: Vec<&'static str>,
    /// How many components below it the path is (0: the folder itself).
    pub depth: usize,
}

impl Enclosing {
    /// Whether the folder is a checkpoint (or a run's `best/`) rather than a run folder.
    pub fn is_checkpoint(&self) -> bool {
        self.holds
            .iter()
            .any(|f| [STATE_FILE, OPTIM_FILE, BEST_RECORD].contains(f))
    }

    /// What marks it, for messages: `holds state.json, optim.safetensors`.
    pub fn why(&self) -> String {
        format!("holds {}", self.holds.join(", "))
    }
}

/// `path` with its longest existing prefix resolved (symbolic links, `..`), so that a
/// link into a run is judged by where it leads; the part that does not exist yet is
/// kept as given.
pub fn resolved(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut head = path.as_path();
    loop {
        if let Ok(real) = head.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (head.parent(), head.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                head = parent;
            }
            _ => return path,
        }
    }
}

/// Removes what interrupted saves and deletions leave under `RUN/checkpoints`: temporary
/// folders, folders being deleted, and step folders without their state file (which are
/// never complete checkpoints: the state is written before the folder is renamed into
/// place). Only the run holding the folder's lock calls this.
pub fn sweep(run_dir: &Path) -> Result<()> {
    let root = run_dir.join(CHECKPOINTS);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry.map_err(|e| TrainError::io(&root, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let leftover = name.starts_with(".tmp-")
            || name.starts_with(".del-")
            || (parse_dir_name(&name).is_some() && !path.join(STATE_FILE).is_file());
        if leftover && path.is_dir() {
            tracing::info!("removing the leftover {}", path.display());
            std::fs::remove_dir_all(&path).map_err(|e| TrainError::io(&path, e))?;
        }
    }
    Ok(())
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
    text: &TextRecord,
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
    sweep(run_dir)?;
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
    text.write(&tmp)?;
    for f in [MODEL_FILE, OPTIM_FILE, CONFIG_FILE] {
        same_mode_as(&tmp.join(f), &tmp.join(STATE_FILE))?;
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
        // Renamed first: a kill mid-deletion leaves a `.del-` folder the next save sweeps,
        // never a half-deleted checkpoint that looks like one.
        let p = root.join(dir_name(old));
        let doomed = root.join(format!(".del-{}", dir_name(old)));
        std::fs::rename(&p, &doomed).map_err(|e| TrainError::io(&p, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| TrainError::io(&doomed, e))?;
    }
    Ok(dst)
}

/// Whether the momentum twin (and the queues) of the checkpoint folder `dir` were ever
/// trained: `Some(false)` when the run that wrote it never ran a step that updates them
/// ([`crate::objectives::ObjectiveConfig::updates_momentum`]), `Some(true)` when it did,
/// `None` when `dir` does not say (a converted model, whose twin is a copy of its online
/// weights or the published one). Read from a step folder's `state.json`, or for a
/// run's `best/` from its `best.json` and the run's `recipe.resolved.toml`.
pub fn twin_trained(dir: &Path) -> Option<bool> {
    let (recipe, steps) = if dir.join(STATE_FILE).is_file() {
        let state = load_state(dir).ok()?;
        (state.recipe, state.step)
    } else {
        let best: BestSoFar =
            serde_json::from_str(&std::fs::read_to_string(dir.join(BEST_RECORD)).ok()?).ok()?;
        let text =
            std::fs::read_to_string(dir.parent()?.join(crate::pretrain::RESOLVED_RECIPE)).ok()?;
        (Recipe::from_str_with(&text, &[]).ok()?, best.step)
    };
    // Objectives only switch on as steps go by (ITM's and MLM's start steps): the last
    // step's say whether any step did.
    Some(steps > 0 && recipe.objectives.at_step(steps - 1).updates_momentum())
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

/// Gives `path` (written owner-only by the safetensors writer) the permissions of `like`,
/// a file this process created with the default mode.
fn same_mode_as(path: &Path, like: &Path) -> Result<()> {
    vlp_core::fs::same_mode_as(path, like).map_err(|e| TrainError::io(path, e))
}

fn sync(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainError::io(path, e))
}

/// Writes the model, its config and its text side to `RUN_DIR/best` (with `best.json`
/// saying where it was reached), replacing the previous best only once the new one is
/// complete: the new folder is written beside it, the old one is moved aside, the new one
/// moved in, and only then the old one removed.
pub fn save_best(
    run_dir: &Path,
    varmap: &VarMap,
    config: &AlbefConfig,
    text: &TextRecord,
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
    write_synced(&tmp.join(BEST_RECORD), json.as_bytes())?;
    text.write(&tmp)?;
    for f in [MODEL_FILE, CONFIG_FILE] {
        same_mode_as(&tmp.join(f), &tmp.join(BEST_RECORD))?;
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
        // Its state is no training state: nothing to resume from, which is an error.
        let err = latest(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("step-000010") && err.contains("missing field"),
            "{err}"
        );
    }

    /// The tensor the tests below corrupt.
    const W: &str = "text_proj.weight";

    /// The text side the test checkpoints keep.
    fn text() -> TextRecord {
        TextRecord {
            // A real tokenizer: verification loads the one a checkpoint keeps.
            tokenizer: std::fs::read(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shards/emoji-tokenizer.json"),
            )
            .unwrap(),
            settings: TextSettings {
                max_tokens: 30,
                max_words: 25,
            },
        }
    }

    #[test]
    fn checkpoints_and_the_best_keep_the_runs_tokenizer_and_text_settings() {
        let (dir, varmap) = saved_run(&[1], 0);
        let config = vlp_models::test_support::micro_config();
        let best = BestSoFar {
            step: 1,
            epoch: 0,
            r_mean: 1.0,
        };
        let best = save_best(dir.path(), &varmap, &config, &text(), &best).unwrap();
        for ckpt in [step_dir(dir.path(), 1), best] {
            assert_eq!(
                std::fs::read(ckpt.join(TOKENIZER_FILE)).unwrap(),
                text().tokenizer,
                "{}",
                ckpt.display()
            );
            assert_eq!(
                TextSettings::load(&ckpt).unwrap(),
                Some(text().settings),
                "{}",
                ckpt.display()
            );
        }
    }

    #[test]
    fn a_run_folder_means_its_best_else_its_newest_complete_checkpoint() {
        let (dir, varmap) = saved_run(&[1, 2], 0);
        let run = dir.path();
        // A checkpoint folder, or a path that is none, is taken as it is.
        assert_eq!(
            resolve_checkpoint(&step_dir(run, 1)).unwrap(),
            step_dir(run, 1)
        );
        let nowhere = run.join("nowhere");
        assert_eq!(resolve_checkpoint(&nowhere).unwrap(), nowhere);
        // A run folder: its newest checkpoint that verifies (step 1 once step 2 is cut).
        assert_eq!(resolve_checkpoint(run).unwrap(), step_dir(run, 2));
        std::fs::write(step_dir(run, 2).join(MODEL_FILE), b"cut").unwrap();
        assert_eq!(resolve_checkpoint(run).unwrap(), step_dir(run, 1));
        // The best, once there is one.
        let config = vlp_models::test_support::micro_config();
        let best = BestSoFar {
            step: 1,
            epoch: 0,
            r_mean: 1.0,
        };
        save_best(run, &varmap, &config, &text(), &best).unwrap();
        assert_eq!(resolve_checkpoint(run).unwrap(), run.join(BEST_DIR));
        // A folder that is neither, and a run none of whose checkpoints can be used.
        let other = tempfile::tempdir().unwrap();
        let e = resolve_checkpoint(other.path()).unwrap_err().to_string();
        assert!(e.contains("no training run"), "{e}");
        let (broken, _) = saved_run(&[1], 0);
        std::fs::write(step_dir(broken.path(), 1).join(MODEL_FILE), b"cut").unwrap();
        let e = resolve_checkpoint(broken.path()).unwrap_err().to_string();
        assert!(e.contains("none of the 1 checkpoint(s)"), "{e}");
    }

    /// A run folder with checkpoints of the micro model at `steps`.
    fn saved_run(steps: &[u64], keep_last: usize) -> (tempfile::TempDir, VarMap) {
        let dir = tempfile::tempdir().unwrap();
        let varmap = VarMap::new();
        let dev = candle_core::Device::Cpu;
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let config = vlp_models::test_support::micro_config();
        vlp_models::AlbefModel::new(&config, vb).unwrap();
        let optim = AdamW::new(
            varmap
                .all_vars()
                .into_iter()
                .filter(|v| v.dtype() == DType::F32)
                .enumerate()
                .map(|(i, v)| (format!("p{i}"), v))
                .collect(),
            Default::default(),
        )
        .unwrap();
        let recipe = Recipe::from_str_with(
            "[model]\npreset = \"tiny\"\n[data]\nshards = \"x.tar\"\ntokenizer = \"t.json\"\n\
             batch_size = 2\n[optim]\nlr = 1e-4\nmin_lr = 0.0\nwarmup_lr = 0.0\n\
             warmup_steps = 0\nweight_decay = 0.0\ntotal_steps = 9\n[run]\nout_dir = \"r\"\n",
            &[],
        )
        .unwrap();
        for &step in steps {
            let state = TrainState {
                step,
                epoch: 0,
                total_steps: 9,
                alpha_ramp_steps: 0,
                samples_seen: 0,
                skipped_samples: 0,
                loaders: vec![serde_json::json!({})],
                momentum_updated: true,
                rng: Rng::new(1),
                recipe: recipe.clone(),
                best: None,
                validated_at: None,
            };
            save(
                dir.path(),
                &varmap,
                &optim,
                &config,
                &text(),
                &state,
                keep_last,
            )
            .unwrap();
        }
        (dir, varmap)
    }

    fn step_dir(run: &Path, step: u64) -> PathBuf {
        run.join(CHECKPOINTS).join(dir_name(step))
    }

    #[test]
    fn resume_passes_over_a_truncated_or_non_finite_newest_checkpoint() {
        let (dir, varmap) = saved_run(&[1, 2, 3], 0);
        let run = dir.path();
        assert_eq!(latest(run).unwrap().unwrap(), step_dir(run, 3));
        // A model file cut short (a full disk, a kill after the rename on a filesystem
        // that reordered the writes).
        let model = step_dir(run, 3).join(MODEL_FILE);
        let len = std::fs::metadata(&model).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&model)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        assert!(verify(&step_dir(run, 3))
            .unwrap_err()
            .to_string()
            .contains("incomplete"));
        assert_eq!(latest(run).unwrap().unwrap(), step_dir(run, 2));
        // A NaN written into step 2's weights is named, and passed over too.
        let w = varmap.data().lock().unwrap()[W].clone();
        let poisoned = (w.ones_like().unwrap() * f64::NAN).unwrap();
        w.set(&poisoned).unwrap();
        varmap.save(step_dir(run, 2).join(MODEL_FILE)).unwrap();
        let err = verify(&step_dir(run, 2)).unwrap_err().to_string();
        assert!(err.contains("non-finite") && err.contains(W), "{err}");
        assert_eq!(latest(run).unwrap().unwrap(), step_dir(run, 1));
    }

    /// Every file of a run folder with its bytes, to show that nothing was changed.
    fn snapshot(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push((p.clone(), std::fs::read(&p).unwrap()));
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn resume_refuses_when_no_checkpoint_verifies_naming_each_and_changes_nothing() {
        let (dir, _) = saved_run(&[1, 2], 0);
        let run = dir.path();
        // Step 2: a state written by a newer build (a recipe key this one does not know);
        // step 1: a model file cut short.
        let state = step_dir(run, 2).join(STATE_FILE);
        let text = std::fs::read_to_string(&state).unwrap();
        let text = text.replacen("\"seed\"", "\"future_key\": 1, \"seed\"", 1);
        std::fs::write(&state, text).unwrap();
        std::fs::write(step_dir(run, 1).join(MODEL_FILE), b"cut").unwrap();
        let before = snapshot(run);
        let err = latest(run).unwrap_err().to_string();
        assert!(
            err.contains("none of the 2 checkpoint(s)")
                && err.contains("step-000002")
                && err.contains("future_key")
                && err.contains("step-000001")
                && err.contains("incomplete"),
            "{err}"
        );
        assert_eq!(snapshot(run), before);
        // A run with no checkpoint at all has nothing to resume, and that is no error.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(latest(empty.path()).unwrap(), None);
    }

    #[test]
    fn verification_checks_the_text_side_a_checkpoint_keeps() {
        let (dir, _) = saved_run(&[1, 2], 0);
        let run = dir.path();
        std::fs::write(step_dir(run, 2).join(TOKENIZER_FILE), b"garbage").unwrap();
        let err = verify(&step_dir(run, 2)).unwrap_err().to_string();
        assert!(err.contains(TOKENIZER_FILE), "{err}");
        std::fs::write(step_dir(run, 1).join(TEXT_FILE), b"{1}").unwrap();
        let err = verify(&step_dir(run, 1)).unwrap_err().to_string();
        assert!(err.contains(TEXT_FILE), "{err}");
    }

    #[test]
    fn verification_checks_the_model_file_holds_its_configs_tensors() {
        let (dir, varmap) = saved_run(&[1, 2], 0);
        let run = dir.path();
        // Step 2's model file overwritten by a whole, finite safetensors file of other
        // tensors (what `vlp embed --out` once wrote there).
        let other = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&other, DType::F32, &candle_core::Device::Cpu);
        vb.get_with_hints((4, 2), "image_embeds", candle_nn::init::Init::Const(0.5))
            .unwrap();
        other.save(step_dir(run, 2).join(MODEL_FILE)).unwrap();
        let err = verify(&step_dir(run, 2)).unwrap_err().to_string();
        assert!(
            err.contains("does not hold the model") && err.contains("missing tensor"),
            "{err}"
        );
        assert_eq!(latest(run).unwrap().unwrap(), step_dir(run, 1));
        // A tensor of the wrong shape is named too.
        let data = varmap.data().lock().unwrap();
        let mut tensors: std::collections::HashMap<String, Tensor> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        drop(data);
        let wrong = Tensor::zeros((1, 1), DType::F32, &candle_core::Device::Cpu).unwrap();
        tensors.insert(W.to_string(), wrong);
        candle_core::safetensors::save(&tensors, step_dir(run, 1).join(MODEL_FILE)).unwrap();
        let err = verify(&step_dir(run, 1)).unwrap_err().to_string();
        assert!(err.contains(W) && err.contains("[1, 1]"), "{err}");
    }

    #[test]
    fn newer_broken_checkpoints_are_set_aside_so_pruning_keeps_the_resumed_run() {
        let (dir, varmap) = saved_run(&[1, 2, 3], 0);
        let run = dir.path();
        let model = step_dir(run, 3).join(MODEL_FILE);
        std::fs::write(&model, b"cut").unwrap();
        assert_eq!(latest(run).unwrap().unwrap(), step_dir(run, 2));
        set_aside_after(run, 2).unwrap();
        assert_eq!(list(run).unwrap(), vec![1, 2]);
        assert!(run.join(CHECKPOINTS).join("step-000003.broken").is_dir());
        // The resumed run's next checkpoint is the one pruning keeps.
        let state = TrainState {
            step: 3,
            ..load_state(&step_dir(run, 2)).unwrap()
        };
        let optim = AdamW::new(Vec::new(), Default::default()).unwrap();
        let config = vlp_models::test_support::micro_config();
        save(run, &varmap, &optim, &config, &text(), &state, 1).unwrap();
        assert_eq!(list(run).unwrap(), vec![3]);
        verify(&step_dir(run, 3)).unwrap();
    }

    #[test]
    fn pruning_leaves_no_half_deleted_checkpoint_and_leftovers_are_swept() {
        let (dir, _) = saved_run(&[1], 1);
        let root = dir.path().join(CHECKPOINTS);
        // What kills left behind: a deletion cut short before and after its rename, and
        // an interrupted save.
        std::fs::create_dir_all(root.join("step-000000").join("x")).unwrap();
        std::fs::create_dir_all(root.join(".del-step-000001")).unwrap();
        std::fs::create_dir_all(root.join(".tmp-step-000007")).unwrap();
        let (_, varmap) = saved_run(&[], 1);
        let optim = AdamW::new(Vec::new(), Default::default()).unwrap();
        let state: TrainState = load_state(&step_dir(dir.path(), 1)).unwrap();
        let config = vlp_models::test_support::micro_config();
        for step in [2, 3] {
            let state = TrainState {
                step,
                ..state.clone()
            };
            save(dir.path(), &varmap, &optim, &config, &text(), &state, 1).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, vec!["step-000003"]);
    }

    #[cfg(unix)]
    #[test]
    fn checkpoint_files_get_the_mode_of_the_files_the_run_creates() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, _) = saved_run(&[1], 0);
        let step = step_dir(dir.path(), 1);
        let mode = |f: &str| {
            std::fs::metadata(step.join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        for f in [
            MODEL_FILE,
            OPTIM_FILE,
            CONFIG_FILE,
            TOKENIZER_FILE,
            TEXT_FILE,
        ] {
            assert_eq!(mode(f), mode(STATE_FILE), "{f}");
        }
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
