//! The pretraining (and fine-tuning) loop, in named parts a reader finds from
//! [`pretrain_with`]: `Run::setup` (device, run-folder lock, resume point, model, data,
//! optimizer), `Run::train` (per step the learning rate, alpha and seed, then
//! [`train_step`]; the non-finite policy, metrics, checkpoints, signals), `Run::finish`
//! (the last checkpoint, validation and the zero-shot evaluations of the recipe).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Map, Value};
use vlp_core::rng::{derive_seed, Rng};
use vlp_data::loader::{Batch, Loader, LoaderState};
use vlp_data::tokenize::TextTokenizer;
use vlp_models::{AlbefConfig, AlbefModel};

use crate::checkpoint::{self, BestSoFar, TextRecord, TrainState};
use crate::error::TrainError;
use crate::interrupt;
use crate::metrics::MetricsLog;
use crate::objectives::itc::alpha_at;
use crate::optim::{AdamW, AdamWConfig};
use crate::recipe::{OnNonFinite, Recipe};
use crate::run_lock::RunLock;
use crate::step::{read_parts, StepBatch};
use crate::train_step::{train_step, StepReport, StepSettings};
use vlp_dist::{Collective, SingleProcess};
use vlp_eval::report::json_report;
use vlp_eval::set::{evaluate_set, EvalSet};
use vlp_eval::tokenizer::checkpoint_tokenizer;
use vlp_eval::{
    check_same_tokenizer, AllowOther, EvalConfig, EvalOutcome, ScoreMode, TextSettings,
};

type Result<T> = std::result::Result<T, TrainError>;

pub const RESOLVED_RECIPE: &str = "recipe.resolved.toml";
pub const EVAL_FILE: &str = "eval.json";

/// What the caller sees of the run as it goes (the CLI draws a progress bar).
pub trait Progress {
    fn start(&mut self, _first_step: u64, _total_steps: u64) {}
    /// A step is done (cheap: nothing is read from the device for it).
    fn step(&mut self, _step: u64) {}
    /// The record logged at this step (loss parts, lr, samples/s, ...), every
    /// `run.log_every` steps.
    fn log(&mut self, _step: u64, _record: &Map<String, Value>) {}
    fn finish(&mut self) {}
}

/// No progress display.
pub struct Quiet;
impl Progress for Quiet {}

/// How a run ended.
#[derive(Debug)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub last_checkpoint: Option<PathBuf>,
    pub eval: Vec<(String, EvalOutcome)>,
    pub skipped_samples: u64,
    /// The signal that stopped the run at a step boundary (after its checkpoint), if any.
    pub interrupted: Option<i32>,
}

/// Trains as `recipe` says, in `recipe.run.out_dir`, in this one process. With `resume`,
/// continues from the newest usable checkpoint there (the checkpoint's recipe and
/// architecture win over the given ones, the given device is used) exactly as the
/// uninterrupted run would have gone on.
pub fn pretrain(recipe: Recipe, start: Start, progress: &mut dyn Progress) -> Result<Summary> {
    pretrain_with(recipe, start, Arc::new(SingleProcess), progress)
}

/// How a run starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// From step 0; a run folder that holds checkpoints is refused.
    Fresh,
    /// From the newest usable checkpoint, with the checkpoint's recipe.
    Resume,
    /// As [`Start::Resume`], with the data's locations taken from the given recipe
    /// (`data.shards`, `data.tokenizer`, the eval sets' shards): the same shard files,
    /// by name and order, moved elsewhere.
    ResumeMoved,
}

/// [`pretrain`] as one of `collective.world_size()` data-parallel processes: every rank
/// runs this; rank 0 logs, saves and evaluates.
pub fn pretrain_with(
    recipe: Recipe,
    start: Start,
    collective: Arc<dyn Collective>,
    progress: &mut dyn Progress,
) -> Result<Summary> {
    let mut run = Run::setup(recipe, start, collective)?;
    let ended = run.train(progress)?;
    run.finish(ended)
}

/// Why the training loop ended.
enum Ended {
    /// `total_steps` reached.
    Done,
    /// The loader had no more batches (a finite data stream).
    DataEnded,
    /// A signal asked the run to stop.
    Interrupted(i32),
}

/// Everything a run holds between its steps.
struct Run {
    recipe: Recipe,
    cfg: AlbefConfig,
    device: Device,
    run_dir: PathBuf,
    varmap: VarMap,
    model: AlbefModel,
    tokenizer: TextTokenizer,
    /// What every checkpoint keeps of the run's text side.
    text: TextRecord,
    batches: Batches,
    optim: AdamW,
    state: TrainState,
    /// `metrics.jsonl`, on the main process only.
    metrics: Option<MetricsLog>,
    last_checkpoint: Option<PathBuf>,
    collective: Arc<dyn Collective>,
    /// The frozen model of `objectives.distill.teacher`, if any.
    teacher: Option<AlbefModel>,
    /// The run folder's lock, held by the main process for the whole run.
    _lock: Option<RunLock>,
}

impl Run {
    /// The model, the data, the optimizer and where training stands, fresh or resumed.
    fn setup(recipe: Recipe, start: Start, collective: Arc<dyn Collective>) -> Result<Self> {
        let resume = start != Start::Fresh;
        // A recipe built in code has not been through `Recipe::load`.
        recipe.validate()?;
        let device = recipe.run.device.resolve()?;
        let run_dir = recipe.run.out_dir.clone();
        let world = collective.world_size();
        let mut recipe = recipe;
        match recipe.data.world_size {
            Some(n) if n != world => {
                return Err(TrainError::Recipe(format!(
                    "data.world_size = {n} but {world} process(es) were started: launch {n} \
                     (vlp launch --nproc-per-node {n} -- ...), or set data.world_size = {world} \
                     (the global batch changes with it)"
                )))
            }
            _ => recipe.data.world_size = Some(world),
        }
        let main = collective.is_main();
        let lock = if main {
            Some(RunLock::acquire(&run_dir)?)
        } else {
            None
        };

        // Where to start: a checkpoint (resume) or nothing.
        let resume_from = if resume {
            // Rank 0 chooses the checkpoint; the others take the same folder (rank 0 may
            // set newer ones aside while they look).
            let dir = if main {
                checkpoint::latest(&run_dir).map_err(|e| {
                    TrainError::Checkpoint(format!(
                        "--resume: {}; nothing was changed",
                        without_prefix(e)
                    ))
                })?
            } else {
                None
            };
            let dir = if world > 1 {
                let step = dir
                    .as_deref()
                    .and_then(|d| checkpoint::parse_dir_name(&d.file_name()?.to_string_lossy()));
                match collective.all_gather_u64(step.unwrap_or(u64::MAX))?[0] {
                    u64::MAX => None,
                    step => Some(checkpoint::dir_of(&run_dir, step)),
                }
            } else {
                dir
            };
            if main {
                // Newer checkpoints `latest` passed over must not outrank the ones this
                // run writes (pruning keeps the newest steps): they are set aside.
                let resumed = dir.as_deref().map_or(0, |d| {
                    checkpoint::parse_dir_name(&d.file_name().unwrap_or_default().to_string_lossy())
                        .unwrap_or(0)
                });
                checkpoint::set_aside_after(&run_dir, resumed)?;
            }
            if dir.is_none() {
                tracing::warn!(
                    "--resume: no usable checkpoint in {}, starting fresh",
                    run_dir.display()
                );
            }
            dir
        } else {
            if !checkpoint::list(&run_dir)?.is_empty() {
                return Err(TrainError::Checkpoint(format!(
                    "{} already holds checkpoints: pass --resume to continue, or choose \
                     another run.out_dir",
                    run_dir.display()
                )));
            }
            None
        };
        let saved = resume_from
            .as_deref()
            .map(checkpoint::load_state)
            .transpose()?;
        let recipe = match &saved {
            Some(state) => {
                // The checkpoint's recipe, on the device asked for now.
                let mut from_checkpoint = state.recipe.clone();
                from_checkpoint.run.device = recipe.run.device;
                // `state.json` is read without the recipe checks: they run here.
                from_checkpoint.validate().map_err(|e| {
                    TrainError::Recipe(format!(
                        "the recipe of {}: {}",
                        resume_from.as_deref().unwrap_or(&run_dir).display(),
                        crate::recipe::strip(e)
                    ))
                })?;
                if start == Start::ResumeMoved {
                    crate::relocate::take_locations(&mut from_checkpoint, &recipe)?;
                }
                let differs = crate::relocate::differences(&from_checkpoint, &recipe);
                if !differs.is_empty() {
                    let moved = differs
                        .iter()
                        .all(|d| crate::relocate::LOCATIONS.iter().any(|k| d.starts_with(k)));
                    tracing::warn!(
                        "resuming with the checkpoint's recipe; the given one differs at {}{}",
                        differs.join("; "),
                        if moved {
                            " (if the data moved, --resume-moved takes the given locations)"
                        } else {
                            ""
                        }
                    );
                }
                from_checkpoint
            }
            None => resolve_sources(recipe, &*collective)?,
        };
        if main {
            write_atomically(&run_dir.join(RESOLVED_RECIPE), recipe.to_toml()?.as_bytes())?;
        }

        // The model.
        let cfg = recipe.model_config(resume_from.as_deref())?;
        let mut varmap = VarMap::new();
        let model = AlbefModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &device))?
            .with_compute_dtype(recipe.run.dtype.dtype())
            .with_grad_checkpoint(recipe.model.grad_checkpoint);
        match (&resume_from, &recipe.model.init) {
            (Some(_), _) => {} // loaded below, with the optimizer
            (None, Some(init)) => {
                vlp_models::load_into_varmap(
                    &varmap,
                    &init.join(checkpoint::MODEL_FILE),
                    cfg.vision.grid(),
                )?;
                // A twin that never moved (pretrained with CLIP's loss, say) holds the
                // pretraining's initial weights: ALBEF's ITC and MLM would distil from
                // them. It starts from the online weights, as ALBEF's own twin does.
                if checkpoint::twin_trained(init) == Some(false)
                    && recipe.objectives.updates_momentum()
                {
                    model.copy_params_to_momentum()?;
                    tracing::info!(
                        "{}: its momentum twin was never trained (pretrained without ALBEF's \
                         ITC or MLM); the twin starts from the online weights",
                        init.display()
                    );
                }
            }
            (None, None) => {
                seeded_init(&varmap, recipe.run.seed)?;
                model.copy_params_to_momentum()?;
            }
        }

        // The data. A resumed run reads captions with the tokenizer its checkpoint keeps:
        // the bytes it trained with, whatever became of the file since.
        let tokenizer_path =
            match resume_from.as_deref().and_then(checkpoint_tokenizer) {
                Some(kept) => kept,
                None => recipe.data.tokenizer.clone().ok_or_else(|| {
                    TrainError::Recipe("data.tokenizer: no tokenizer given".into())
                })?,
            };
        let allow_other = AllowOther {
            allowed: recipe.data.allow_other_tokenizer,
            switch: "set data.allow_other_tokenizer = true",
        };
        if let (None, Some(init)) = (&resume_from, &recipe.model.init) {
            // The init's own tokenizer (data.tokenizer left out) needs no comparing.
            if checkpoint_tokenizer(init).as_deref() != Some(tokenizer_path.as_path()) {
                check_same_tokenizer(init, &tokenizer_path, allow_other)
                    .map_err(|e| TrainError::Recipe(format!("data.tokenizer: {e}")))?;
            }
        }
        // Read once: the bytes the checkpoints keep are the ones the run tokenizes with.
        let text = TextRecord::read(
            &tokenizer_path,
            TextSettings {
                max_tokens: recipe.data.max_tokens,
                max_words: recipe.data.max_words,
            },
        )?;
        let tokenizer = TextTokenizer::from_json(
            &text.tokenizer,
            tokenizer_path.display().to_string(),
            recipe.data.max_tokens,
        )?;
        vlp_eval::check_tokenizer(&tokenizer, &cfg.text, &tokenizer_path)?;
        let mut loader_cfg = recipe.loader_config(cfg.vision.image_size as u32, collective.rank());
        // ALBEF's training loader keeps full batches only. The run ends at `total_steps`,
        // so the loader runs on past the last epoch (epoch lengths in steps are estimates).
        loader_cfg.drop_last = true;
        loader_cfg.max_epochs = None;
        let batch_size = loader_cfg.batch_size;
        let mut loader = Loader::new(&recipe.data.shards, loader_cfg, tokenizer.clone())?;
        check_eval_sets(&recipe, cfg.vision.image_size as u32)?;

        // The optimizer.
        let mut trainable = model.trainable_vars()?;
        trainable.retain(|(name, _)| recipe.objectives.trains(name));
        let mut optim = AdamW::new(
            trainable,
            AdamWConfig {
                weight_decay: recipe.optim.weight_decay,
                ..AdamWConfig::default()
            },
        )?;

        // Where training stands; lengths fixed at the start of the run.
        let accumulate = recipe.optim.accumulate as u64;
        let steps_per_epoch = loader
            .samples_in_epoch(0)
            .map(|n| n / batch_size as u64 / accumulate);
        // The ranks' shares of an epoch differ when shards do not divide evenly: the run's
        // length and alpha ramp follow rank 0's, so every rank plans the same steps.
        let steps_per_epoch = if world > 1 {
            match collective.all_gather_u64(steps_per_epoch.unwrap_or(u64::MAX))?[0] {
                u64::MAX => None,
                n => Some(n),
            }
        } else {
            steps_per_epoch
        };
        let state = match saved {
            Some(mut state) => {
                let dir = resume_from.as_deref().expect("saved state has a folder");
                checkpoint::load_into(dir, &mut varmap, &mut optim)?;
                let rank = collective.rank();
                if state.loaders.len() != collective.world_size() {
                    return Err(TrainError::Checkpoint(format!(
                        "{} holds the data position of {} process(es), this run has {}: \
                         resume with the same world size",
                        dir.display(),
                        state.loaders.len(),
                        collective.world_size()
                    )));
                }
                let mut loader_state: LoaderState =
                    serde_json::from_value(state.loaders[rank].clone()).map_err(|e| {
                        TrainError::Checkpoint(format!(
                            "{}: loader state of rank {rank}: {e}",
                            dir.display()
                        ))
                    })?;
                if start == Start::ResumeMoved {
                    // `take_locations` checked that the files are the same, by name
                    // and order: the state is valid for the list at its new place.
                    loader_state.fingerprint.shard_list_hash =
                        loader.state().fingerprint.shard_list_hash;
                }
                loader.restore(loader_state)?;
                if !state.momentum_updated {
                    // Written when the momentum update started each step: do the one the
                    // next step would have started with.
                    let o = &recipe.objectives;
                    if o.updates_momentum() {
                        model.momentum_update(o.momentum)?;
                    }
                    state.momentum_updated = true;
                }
                tracing::info!("resumed from {} at step {}", dir.display(), state.step);
                state
            }
            None => TrainState {
                step: 0,
                epoch: 0,
                total_steps: total_steps(&recipe, steps_per_epoch)?,
                alpha_ramp_steps: match recipe.objectives.alpha_ramp_steps {
                    0 => steps_per_epoch.unwrap_or(recipe.optim.alpha_ramp_fallback_steps),
                    n => n,
                },
                samples_seen: 0,
                skipped_samples: 0,
                loaders: Vec::new(), // filled at each save
                momentum_updated: true,
                rng: Rng::new(derive_seed(&[recipe.run.seed, 0x7EA1])),
                recipe: recipe.clone(),
                best: None,
                validated_at: None,
            },
        };
        // Every rank starts from rank 0's weights, momentum weights and queues.
        broadcast_vars(&varmap, &*collective)?;

        let params: usize = optim.decay_groups().0.len() + optim.decay_groups().1.len();
        tracing::info!(
            "training {params} parameter tensors on {} for {} steps (batch {batch_size} x \
             {accumulate} x {} process(es)), {} steps per epoch, alpha ramp {} steps",
            recipe.run.device,
            state.total_steps,
            collective.world_size(),
            steps_per_epoch.map_or("unknown".into(), |s| s.to_string()),
            state.alpha_ramp_steps
        );
        let metrics = if main {
            Some(MetricsLog::open(
                &run_dir,
                resume_from.as_ref().map(|_| state.step),
            )?)
        } else {
            None
        };
        let batches = Batches::new(
            loader,
            recipe.objectives.image_id_positives,
            device.clone(),
            world == 1,
        );
        let teacher = match (
            &recipe.objectives.distill.teacher,
            recipe.objectives.distill_on(),
        ) {
            (Some(dir), true) => {
                check_same_tokenizer(dir, &tokenizer_path, allow_other)
                    .map_err(|e| TrainError::Recipe(format!("objectives.distill.teacher: {e}")))?;
                let loaded = vlp_models::load_model(
                    dir,
                    Some(cfg.vision.image_size),
                    &device,
                    vlp_models::LoadMode::Frozen,
                )?;
                let vocab = loaded.model.config().text.vocab_size;
                if vocab != cfg.text.vocab_size {
                    return Err(TrainError::Recipe(format!(
                        "objectives.distill.teacher {}: its vocabulary has {vocab} tokens, the \
                         model's {}; the teacher must read the same token ids",
                        dir.display(),
                        cfg.text.vocab_size
                    )));
                }
                tracing::info!("distilling from the frozen teacher {}", dir.display());
                Some(loaded.model)
            }
            _ => None,
        };
        Ok(Run {
            recipe,
            cfg,
            device,
            run_dir,
            varmap,
            model,
            tokenizer,
            text,
            batches,
            optim,
            state,
            metrics,
            last_checkpoint: resume_from,
            collective,
            teacher,
            _lock: lock,
        })
    }

    /// The loop: one [`train_step`] per iteration, then logging and checkpoints, until
    /// `total_steps`, the end of the data, or a signal.
    fn train(&mut self, progress: &mut dyn Progress) -> Result<Ended> {
        let schedule = self.recipe.schedule(self.state.total_steps);
        // Test hook: NaN images at this step (counted from 1) exercise the non-finite
        // guard end to end.
        let inject_nan_at: Option<u64> = std::env::var("VLP_INJECT_NAN_AT_STEP")
            .ok()
            .and_then(|v| v.parse().ok());
        progress.start(self.state.step, self.state.total_steps);
        let mut window = (Instant::now(), 0u64); // samples/s since the last log
        let ended = loop {
            if self.state.step >= self.state.total_steps {
                break Ended::Done;
            }
            if let Some(signal) = self.agreed_stop()? {
                tracing::warn!(
                    "signal {signal}: stopping after step {}, with a checkpoint",
                    self.state.step
                );
                break Ended::Interrupted(signal);
            }
            let step = self.state.step;
            let lr = schedule.get_lr(step);
            let alpha = alpha_at(
                step,
                self.state.alpha_ramp_steps,
                self.recipe.objectives.alpha,
            );
            // Where the step starts, for a run that ends inside it (see `rewind_step`).
            let start = (self.state.rng.clone(), self.state.epoch);
            self.batches.mark();
            let seed = self.state.rng.next_u64();
            // The step's first batch, fetched here: when it opens a new epoch, the weights
            // the last step left are validated first (fine-tuning). A signal while the
            // loader waits (a stalled source) ends the run as one at a step boundary does.
            let first = match self.batches.next() {
                Err(e) => match stopped_by(&e) {
                    Some(signal) => {
                        self.rewind_step(start);
                        break Ended::Interrupted(signal);
                    }
                    None => return Err(e),
                },
                Ok(first) => first,
            };
            let Some(first) = first else {
                break Ended::DataEnded;
            };
            // A new epoch by rank 0's data (the ranks' epochs end at different steps).
            let new_epoch = first.0 > self.state.epoch && step > 0;
            if self.validates() && self.rank0_says(new_epoch)? {
                if let Err(e) = self.validate() {
                    // The epoch's training is kept: a checkpoint that resumes before this
                    // batch, so that the resumed run validates the same weights again.
                    self.rewind_step(start);
                    progress.finish();
                    tracing::error!("validation failed; saving the epoch's checkpoint first");
                    self.save()?;
                    return Err(e);
                }
            }
            let objectives = self.recipe.objectives.at_step(step);
            let settings = StepSettings {
                objectives: &objectives,
                accumulate: self.recipe.optim.accumulate as u64,
                clip_grad_norm: self.recipe.optim.clip_grad_norm,
                lr,
                alpha,
                seed,
                teacher: self.teacher.as_ref(),
            };
            let mut first = Some(first);
            let mut next = |_micro: u64| -> Result<Option<StepBatch>> {
                let (epoch, mut inputs) = match first.take() {
                    Some(batch) => batch,
                    None => match self.batches.next()? {
                        Some(batch) => batch,
                        None => return Ok(None),
                    },
                };
                self.state.epoch = epoch;
                if inject_nan_at == Some(step + 1) {
                    inputs.images = (inputs.images * f64::NAN)?;
                }
                Ok(Some(inputs))
            };
            let report = match train_step(
                &self.model,
                &mut self.optim,
                &self.collective,
                &settings,
                &mut next,
            ) {
                Ok(report) => report,
                Err(e) => match stopped_by(&e) {
                    // Stopped waiting for a later micro-batch: the step is dropped and the
                    // checkpoint resumes at its start.
                    Some(signal) => {
                        self.rewind_step(start);
                        break Ended::Interrupted(signal);
                    }
                    None => return Err(e),
                },
            };
            let Some(report) = report else {
                break Ended::DataEnded;
            };
            // Samples of every rank (equal batches: the loader drops short ones).
            let samples = report.samples * self.collective.world_size() as u64;
            self.state.samples_seen += samples;
            if let Some(what) = &report.nonfinite {
                match self.recipe.run.on_nonfinite {
                    OnNonFinite::Stop => {
                        progress.finish();
                        tracing::error!(
                            "stopped without saving; last good checkpoint: {}",
                            self.last_checkpoint
                                .as_ref()
                                .map_or("none".into(), |p| p.display().to_string())
                        );
                        // Steps are counted from 1, as in metrics.jsonl and checkpoint names.
                        return Err(TrainError::NonFinite {
                            step: step + 1,
                            what: what.clone(),
                        });
                    }
                    OnNonFinite::Skip => {
                        tracing::warn!("step {}: non-finite {what}; update skipped", step + 1);
                        self.state.skipped_samples += samples;
                    }
                }
            }
            self.state.step += 1;
            window.1 += samples;
            progress.step(self.state.step);

            let last = self.state.step == self.state.total_steps;
            if self.state.step % self.recipe.run.log_every.max(1) == 0
                || last
                || self.state.step == 1
            {
                let secs = window.0.elapsed().as_secs_f64();
                let record = self.record(
                    &report,
                    settings.lr,
                    settings.alpha,
                    window.1 as f64 / secs.max(1e-9),
                )?;
                if let Some(metrics) = &mut self.metrics {
                    metrics.write(&record)?;
                    tracing::debug!("{}", serde_json::Value::Object(record.clone()));
                    progress.log(self.state.step, &record);
                }
                window = (Instant::now(), 0);
            }
            // Checkpoints: every `save_every` steps; the last one after the loop.
            let every = self.recipe.run.save_every;
            if every > 0 && self.state.step % every == 0 && !last {
                self.save()?;
            }
        };
        progress.finish();
        Ok(ended)
    }

    /// Undoes what a step that will not finish took (its batches, its seed, the epoch it
    /// read into), so that the checkpoint the run ends with resumes exactly at its start.
    fn rewind_step(&mut self, (rng, epoch): (Rng, u64)) {
        self.batches.rewind();
        self.state.rng = rng;
        self.state.epoch = epoch;
    }

    /// A step's metrics record; the one place the loss parts are read from the device.
    fn record(
        &self,
        report: &StepReport,
        lr: f64,
        alpha: f64,
        samples_per_s: f64,
    ) -> Result<Map<String, Value>> {
        let mut parts = report.parts.clone();
        parts.push(("temp", report.temp.clone()));
        let values = read_parts(&parts)?;
        let mut record = Map::new();
        record.insert("step".into(), json!(self.state.step));
        record.insert("epoch".into(), json!(self.state.epoch));
        record.insert("lr".into(), json!(lr));
        for (name, value) in &values[..values.len() - 1] {
            record.insert(format!("loss_{name}"), json!(value));
        }
        record.insert("temp".into(), json!(values[values.len() - 1].1));
        record.insert("alpha".into(), json!(alpha));
        record.insert("samples_per_s".into(), json!(samples_per_s));
        record.insert("grad_norm".into(), json!(report.grad_norm));
        record.insert("skipped_samples".into(), json!(self.state.skipped_samples));
        record.insert("itm_fallbacks".into(), json!(report.itm_fallbacks));
        Ok(record)
    }

    /// Writes a checkpoint of the current step: every rank's data position is gathered,
    /// the main process writes.
    fn save(&mut self) -> Result<()> {
        let mine = serde_json::to_vec(self.batches.state()).expect("loader state is JSON");
        self.state.loaders = self
            .collective
            .all_gather_bytes(&mine)?
            .iter()
            .map(|bytes| serde_json::from_slice(bytes))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| TrainError::Checkpoint(format!("a rank's loader state: {e}")))?;
        if self.collective.is_main() {
            let dir = checkpoint::save(
                &self.run_dir,
                &self.varmap,
                &self.optim,
                &self.cfg,
                &self.text,
                &self.state,
                self.recipe.run.keep_last,
            )?;
            tracing::info!("saved {}", dir.display());
            self.last_checkpoint = Some(dir);
        }
        Ok(())
    }

    /// After the loop: the last checkpoint, the last validation, and the zero-shot
    /// evaluations of the recipe (on the best weights when fine-tuning kept some).
    fn finish(mut self, ended: Ended) -> Result<Summary> {
        // A run whose every step was skipped trained nothing: its weights are where it
        // started, and neither a checkpoint nor an evaluation of them is a result. (An
        // interrupted one goes on with --resume; its exit status is already non-zero.)
        let every_step_skipped =
            self.state.samples_seen > 0 && self.state.skipped_samples == self.state.samples_seen;
        if every_step_skipped && !matches!(ended, Ended::Interrupted(_)) {
            return Err(TrainError::EveryStepSkipped {
                steps: self.state.step,
            });
        }
        // (No checkpoint for a run that trained nothing: its weights are its init's.)
        let saved_now = self
            .last_checkpoint
            .as_ref()
            .is_some_and(|p| p.ends_with(checkpoint::dir_name(self.state.step)));
        if self.state.step > 0 && !saved_now {
            self.save()?;
        }
        tracing::info!("trained {} steps", self.state.step);
        let mut interrupted = match ended {
            Ended::Interrupted(signal) => Some(signal),
            Ended::Done | Ended::DataEnded => None,
        };
        let mut eval = Vec::new();
        if interrupted.is_none() {
            // The last epoch's validation, unless it already ran at this step.
            if self.state.validated_at != Some(self.state.step) && self.state.step > 0 {
                self.validate()?;
            }
            // Every rank evaluates (the re-ranking is split); the main process writes.
            eval = self.evaluate()?;
            // A signal during the evaluations cut them short: the status says so.
            interrupted = interrupt::requested();
        }
        Ok(Summary {
            run_dir: self.run_dir,
            steps: self.state.step,
            last_checkpoint: self.last_checkpoint,
            eval,
            skipped_samples: self.state.skipped_samples,
            interrupted,
        })
    }

    /// Zero-shot retrieval on each eval set of the recipe: ITC ranking, then ITM
    /// re-ranking of the top k; `eval.json` in the run folder. Fine-tuning evaluates the
    /// best validated weights.
    fn evaluate(&mut self) -> Result<Vec<(String, EvalOutcome)>> {
        let mut eval = Vec::new();
        let Some(sets) = &self.recipe.eval else {
            return Ok(eval);
        };
        // The main process knows whether validation kept a best checkpoint.
        if self.rank0_says(self.state.best.is_some())? {
            let path = self
                .run_dir
                .join(checkpoint::BEST_DIR)
                .join(checkpoint::MODEL_FILE);
            vlp_models::load_into_varmap(&self.varmap, &path, self.cfg.vision.grid())?;
            if let Some(best) = &self.state.best {
                tracing::info!(
                    "evaluating the best checkpoint: step {}, epoch {}, validation r_mean {:.2}",
                    best.step,
                    best.epoch,
                    best.r_mean
                );
            }
        }
        let eval_cfg = self.eval_config(sets)?;
        let mut json = Map::new();
        for set in &sets.sets {
            if self.agreed_stop()?.is_some() {
                tracing::warn!("signal: evaluation of {} and later sets skipped", set.name);
                break;
            }
            let data = EvalSet::open(
                &set.shards,
                self.cfg.vision.image_size as u32,
                self.recipe.data.max_words,
            )?;
            let (outcome, _) = evaluate_set(
                &self.model,
                &self.tokenizer,
                &data,
                &eval_cfg,
                &*self.collective,
            )?;
            let mut report = json_report(&set.name, &outcome, &eval_cfg);
            if let Some(best) = &self.state.best {
                report["best"] = serde_json::to_value(best).expect("JSON");
            }
            json.insert(set.name.clone(), report);
            eval.push((set.name.clone(), outcome));
        }
        if self.collective.is_main() {
            write_atomically(
                &self.run_dir.join(EVAL_FILE),
                serde_json::to_string_pretty(&json)
                    .expect("JSON")
                    .as_bytes(),
            )?;
        }
        Ok(eval)
    }

    /// The retrieval evaluation settings of a recipe's `[eval]` section (progress bars on
    /// the main process only).
    fn eval_config(&self, sets: &crate::recipe::EvalSection) -> Result<EvalConfig> {
        Ok(EvalConfig {
            device: self.device.clone(),
            k_test: sets.k_test,
            score: sets.score.parse::<ScoreMode>()?,
            image_batch: sets.batch_size,
            text_batch: sets.batch_size.max(1) * 4,
            progress: self.collective.is_main(),
            ..EvalConfig::default()
        })
    }

    /// A stop request (a signal) any rank received: every rank stops after the same step.
    fn agreed_stop(&self) -> Result<Option<i32>> {
        let mine = interrupt::requested();
        if self.collective.world_size() == 1 {
            return Ok(mine);
        }
        let all = self.collective.all_gather_u64(mine.unwrap_or(0) as u64)?;
        Ok(all.into_iter().find(|&s| s != 0).map(|s| s as i32))
    }

    /// Rank 0's `mine` on every rank (decisions that must not differ between ranks).
    fn rank0_says(&self, mine: bool) -> Result<bool> {
        if self.collective.world_size() == 1 {
            return Ok(mine);
        }
        Ok(self.collective.all_gather_u64(mine as u64)?[0] != 0)
    }

    /// Whether the recipe validates after each epoch (`eval.validate`).
    fn validates(&self) -> bool {
        self.recipe
            .eval
            .as_ref()
            .is_some_and(|e| e.validate.is_some())
    }

    /// After an epoch (fine-tuning, `eval.validate` set): evaluates the validation set,
    /// logs `val_*` metrics, and keeps the weights in `RUN_DIR/best` when the mean recall
    /// beats the best so far. No-op without `eval.validate`.
    fn validate(&mut self) -> Result<()> {
        let Some(sets) = &self.recipe.eval else {
            return Ok(());
        };
        let Some(name) = &sets.validate else {
            return Ok(());
        };
        let set = sets
            .sets
            .iter()
            .find(|s| &s.name == name)
            .expect("Recipe::validate checks eval.validate");
        let data = EvalSet::open(
            &set.shards,
            self.cfg.vision.image_size as u32,
            self.recipe.data.max_words,
        )?;
        let (outcome, _) = evaluate_set(
            &self.model,
            &self.tokenizer,
            &data,
            &self.eval_config(sets)?,
            &*self.collective,
        )?;
        self.state.validated_at = Some(self.state.step);
        let Some(metrics) = self.metrics.as_mut() else {
            return Ok(()); // the main process records and keeps the best
        };
        let m = outcome.main();
        let mut record = Map::new();
        record.insert("step".into(), json!(self.state.step));
        record.insert("epoch".into(), json!(self.state.epoch));
        for (k, v) in [
            ("val_tr1", m.tr1),
            ("val_tr5", m.tr5),
            ("val_tr10", m.tr10),
            ("val_ir1", m.ir1),
            ("val_ir5", m.ir5),
            ("val_ir10", m.ir10),
            ("val_r_mean", m.r_mean),
        ] {
            record.insert(k.into(), json!(v));
        }
        metrics.write(&record)?;
        let better = self.state.best.as_ref().is_none_or(|b| m.r_mean > b.r_mean);
        tracing::info!(
            "epoch {} validation on {name}: r_mean {:.2}{}",
            self.state.epoch,
            m.r_mean,
            if better { " (best so far)" } else { "" }
        );
        if better {
            let best = BestSoFar {
                step: self.state.step,
                epoch: self.state.epoch,
                r_mean: m.r_mean,
            };
            checkpoint::save_best(&self.run_dir, &self.varmap, &self.cfg, &self.text, &best)?;
            self.state.best = Some(best);
        }
        Ok(())
    }
}

/// The signal of an error that is a stop request met while waiting for data.
fn stopped_by(e: &TrainError) -> Option<i32> {
    match e {
        TrainError::Data(vlp_data::DataError::Interrupted { signal }) => Some(*signal),
        _ => None,
    }
}

/// A checkpoint error's message without its `checkpoint:` prefix, for a caller that says
/// where it came from.
fn without_prefix(e: TrainError) -> String {
    match e {
        TrainError::Checkpoint(m) => m,
        other => other.to_string(),
    }
}

/// A fresh run's recipe with `model.init` and `objectives.distill.teacher` resolved to the
/// checkpoint folders they name ([`checkpoint::resolve_checkpoint`]: a run folder means
/// its best, else its newest checkpoint) and `data.tokenizer`, when left out, set to the
/// one `model.init` keeps. Recorded so, the resolved recipe says which weights and
/// tokenizer were read, and a resumed run reads the same teacher. Every process must
/// resolve alike (a run still writing checkpoints could differ between them).
fn resolve_sources(mut recipe: Recipe, collective: &dyn Collective) -> Result<Recipe> {
    let resolve = |key: &str, path: &mut Option<PathBuf>| -> Result<()> {
        if let Some(p) = path.as_deref() {
            let dir = checkpoint::resolve_checkpoint(p)
                .map_err(|e| TrainError::Recipe(format!("{key}: {}", without_prefix(e))))?;
            *path = Some(dir);
        }
        Ok(())
    };
    resolve("model.init", &mut recipe.model.init)?;
    resolve(
        "objectives.distill.teacher",
        &mut recipe.objectives.distill.teacher,
    )?;
    if recipe.data.tokenizer.is_none() {
        // `Recipe::validate` lets the tokenizer be left out only with an init.
        let init = recipe.model.init.as_deref().unwrap_or(Path::new(""));
        let kept = checkpoint_tokenizer(init).ok_or_else(|| {
            TrainError::Recipe(format!(
                "data.tokenizer: not given, and model.init {} keeps no {} (written before \
                 checkpoints kept theirs): give the tokenizer it was trained with",
                init.display(),
                checkpoint::TOKENIZER_FILE
            ))
        })?;
        tracing::info!(
            "data.tokenizer: {}, the one model.init was trained with",
            kept.display()
        );
        recipe.data.tokenizer = Some(kept);
    }
    if collective.world_size() > 1 {
        let chosen = format!(
            "{:?} {:?}",
            recipe.model.init, recipe.objectives.distill.teacher
        );
        let mine = vlp_core::hash::fnv1a64(chosen.as_bytes());
        if collective.all_gather_u64(mine)?.iter().any(|&h| h != mine) {
            return Err(TrainError::Recipe(format!(
                "the processes resolved model.init / objectives.distill.teacher to different \
                 checkpoints (this one: {chosen}); name checkpoint folders, not a run that is \
                 still saving"
            )));
        }
    }
    Ok(recipe)
}

/// Opens every eval set of the recipe and reads its captions and image headers, so that
/// a mistyped path or an unreadable shard stops the run before it trains, not after its
/// first epoch.
fn check_eval_sets(recipe: &Recipe, image_size: u32) -> Result<()> {
    let Some(sets) = &recipe.eval else {
        return Ok(());
    };
    for set in &sets.sets {
        EvalSet::open(&set.shards, image_size, recipe.data.max_words)
            .and_then(|data| data.texts())
            .map_err(|e| TrainError::Recipe(format!("eval set `{}`: {e}", set.name)))?;
    }
    Ok(())
}

/// Redraws every randomly initialised variable from the run's seed, so that two runs with
/// one seed start from the same weights (candle's CPU generator cannot be seeded).
/// Weights are N(0, 0.02) as the model draws them; the feature queues N(0, 1) with unit
/// columns; constant-initialised tensors (norms, biases, temp, queue pointers) are kept.
pub fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        if !var.dtype().is_float() {
            continue;
        }
        let t = var.as_tensor().to_dtype(DType::F32)?.flatten_all()?;
        let (lo, hi) = (t.min(0)?.to_scalar::<f32>()?, t.max(0)?.to_scalar::<f32>()?);
        if lo == hi {
            continue;
        }
        let is_queue = name.ends_with("image_queue") || name.ends_with("text_queue");
        let std = if is_queue { 1.0 } else { 0.02 };
        let name_hash = vlp_core::hash::fnv1a64(name.as_bytes());
        let mut rng = Rng::new(derive_seed(&[seed, name_hash]));
        let values: Vec<f32> = (0..var.elem_count())
            .map(|_| {
                // Box-Muller on (0, 1] x [0, 1).
                let (u1, u2) = (1.0 - rng.uniform(), rng.uniform());
                (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect();
        let mut fresh = Tensor::from_vec(values, var.dims(), var.device())?;
        if is_queue {
            // [E, Q]: unit columns.
            fresh = fresh.broadcast_div(&fresh.sqr()?.sum_keepdim(0)?.sqrt()?)?;
        }
        var.set(&fresh.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// The schedule's length: `optim.total_steps`, or `optim.epochs` epochs of full batches,
/// whichever is smaller.
fn total_steps(recipe: &Recipe, steps_per_epoch: Option<u64>) -> Result<u64> {
    let from_epochs = match (recipe.optim.epochs, steps_per_epoch) {
        (Some(e), Some(s)) => Some(e.saturating_mul(s)),
        (Some(_), None) if recipe.optim.total_steps.is_none() => {
            return Err(TrainError::Recipe(
                "optim.epochs: the epoch length is unknown (resampled data or shards without \
                 a manifest); give optim.total_steps"
                    .into(),
            ))
        }
        _ => None,
    };
    let steps = match (from_epochs, recipe.optim.total_steps) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => unreachable!("Recipe::validate requires a length"),
    };
    // `optim.total_steps = 0` asks for no training: the run evaluates its init (zero-shot).
    if steps == 0 && recipe.optim.total_steps != Some(0) {
        return Err(TrainError::Recipe(
            "the run has 0 steps (fewer samples than one batch per epoch?)".into(),
        ));
    }
    Ok(steps)
}

/// The loader's batches on the model's device, one batch ahead on a GPU: while a step
/// runs, the next batch is already being copied to the device on another thread (the
/// CPU needs no copy and gets each batch as it comes). The loader state a checkpoint
/// records is the one right after the last batch handed out, not after the one in
/// flight, so resuming repeats or skips nothing.
struct Batches {
    loader: Loader,
    with_image_ids: bool,
    device: Device,
    /// The next batch: its epoch, the loader state after it, its upload.
    ahead: Option<(u64, LoaderState, std::thread::JoinHandle<Result<StepBatch>>)>,
    /// The loader state after the last batch handed out.
    consumed: LoaderState,
    /// The loader state at the start of the step in progress ([`Batches::mark`]).
    marked: LoaderState,
    /// Whether a signal ends a wait for data. One process only: the ranks of a parallel
    /// run stop together at a step boundary, and a rank that left a wait alone would
    /// meet the others in a different exchange.
    stop_while_waiting: bool,
}

impl Batches {
    fn new(loader: Loader, with_image_ids: bool, device: Device, stop_while_waiting: bool) -> Self {
        let consumed = loader.state();
        Self {
            loader,
            with_image_ids,
            device,
            stop_while_waiting,
            ahead: None,
            marked: consumed.clone(),
            consumed,
        }
    }

    /// The loader's next batch; a signal while it waits ends the wait only when
    /// `stop_while_waiting` (otherwise it waits on: the loader gave nothing out).
    fn next_from_loader(&mut self) -> Result<Option<Batch>> {
        loop {
            match self.loader.next_batch() {
                Err(vlp_data::DataError::Interrupted { .. }) if !self.stop_while_waiting => {}
                other => return Ok(other?),
            }
        }
    }

    /// Marks the start of a step: [`Batches::rewind`] comes back here.
    fn mark(&mut self) {
        self.marked = self.consumed.clone();
    }

    /// The batches handed out since the mark go unused (a run ending inside a step): the
    /// state to checkpoint is the mark's, so that a resumed run takes them again.
    fn rewind(&mut self) {
        self.consumed = self.marked.clone();
    }

    /// The loader state to checkpoint.
    fn state(&self) -> &LoaderState {
        &self.consumed
    }

    /// The next batch (its epoch and the step's inputs), `None` when the data ends.
    fn next(&mut self) -> Result<Option<(u64, StepBatch)>> {
        let current = match self.ahead.take() {
            Some((epoch, state, upload)) => {
                let inputs = upload
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
                Some((epoch, state, inputs))
            }
            None => match self.next_from_loader()? {
                Some(batch) => Some((
                    batch.epoch,
                    self.loader.state(),
                    step_batch(&batch, self.with_image_ids, &self.device)?,
                )),
                None => None,
            },
        };
        let Some((epoch, state, inputs)) = current else {
            return Ok(None);
        };
        self.consumed = state;
        if !self.device.is_cpu() {
            if let Some(batch) = self.next_from_loader()? {
                let (with_ids, device) = (self.with_image_ids, self.device.clone());
                let (epoch, after) = (batch.epoch, self.loader.state());
                // candle's CUDA device issues work on the calling thread's own stream:
                // the upload is complete, and safe to read from the training thread's
                // stream, once this thread's stream is synchronised.
                let upload = std::thread::spawn(move || {
                    let inputs = step_batch(&batch, with_ids, &device)?;
                    device.synchronize()?;
                    Ok(inputs)
                });
                self.ahead = Some((epoch, after, upload));
            }
        }
        Ok(Some((epoch, inputs)))
    }
}

/// The loader's batch as the step takes it, on `device`; image ids (numbers, or hashes of
/// other ids) only when the objectives use them.
fn step_batch(batch: &Batch, with_image_ids: bool, device: &Device) -> Result<StepBatch> {
    let image_ids = with_image_ids.then(|| {
        batch
            .image_ids
            .iter()
            .map(|id| {
                id.parse::<i64>()
                    .unwrap_or_else(|_| (vlp_core::hash::fnv1a64(id.as_bytes()) >> 1) as i64)
            })
            .collect()
    });
    StepBatch::new(
        &batch.images,
        &batch.input_ids,
        &batch.attention_mask,
        image_ids,
        device,
    )
}

/// Sets every variable to rank 0's value (weights, momentum weights, queues).
fn broadcast_vars(varmap: &VarMap, collective: &dyn Collective) -> Result<()> {
    if collective.world_size() == 1 {
        return Ok(());
    }
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut tensors: Vec<Tensor> = names
        .iter()
        .map(|n| data[*n].as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    collective.broadcast(&mut tensors)?;
    for (name, t) in names.into_iter().zip(tensors) {
        data[name].set(&t)?;
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}
