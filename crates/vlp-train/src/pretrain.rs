//! The pretraining loop, top to bottom: model, data, optimizer; then per step the
//! learning rate, alpha, losses, backward, clipping, AdamW, metrics and checkpoints; then
//! the zero-shot evaluations of the recipe.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Map, Value};
use vlp_core::rng::{derive_seed, Rng};
use vlp_data::loader::{Batch, Loader, LoaderState};
use vlp_data::tokenize::TextTokenizer;
use vlp_models::{AlbefConfig, AlbefModel};

use crate::checkpoint::{self, BestSoFar, TrainState};
use crate::error::TrainError;
use crate::metrics::MetricsLog;
use crate::objectives::itc::alpha_at;
use crate::optim::{AdamW, AdamWConfig, Gradients};
use crate::recipe::{OnNonFinite, Recipe};
use crate::step::{pretrain_losses, Draws, StepBatch};
use vlp_eval::report::{json_report, markdown_table};
use vlp_eval::set::{evaluate_set, EvalSet};
use vlp_eval::{EvalConfig, EvalOutcome, ScoreMode};

type Result<T> = std::result::Result<T, TrainError>;

pub const RESOLVED_RECIPE: &str = "recipe.resolved.toml";
pub const EVAL_FILE: &str = "eval.json";

/// What the caller sees of the run as it goes (the CLI draws a progress bar).
pub trait Progress {
    fn start(&mut self, _first_step: u64, _total_steps: u64) {}
    /// Every step's record (loss parts, lr, samples/s, ...).
    fn step(&mut self, _step: u64, _record: &Map<String, Value>) {}
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
}

/// Trains as `recipe` says, in `recipe.run.out_dir`. With `resume`, continues from the
/// newest checkpoint there (the checkpoint's recipe and architecture win over the given
/// ones) exactly as the uninterrupted run would have gone on.
pub fn pretrain(recipe: Recipe, resume: bool, progress: &mut dyn Progress) -> Result<Summary> {
    let dev = Device::Cpu;
    let run_dir = recipe.run.out_dir.clone();
    std::fs::create_dir_all(&run_dir).map_err(|e| TrainError::io(&run_dir, e))?;

    // Where to start: a checkpoint (resume) or nothing.
    let resume_from = if resume {
        let dir = checkpoint::latest(&run_dir)?;
        if dir.is_none() {
            tracing::warn!(
                "--resume: no checkpoint in {}, starting fresh",
                run_dir.display()
            );
        }
        dir
    } else {
        if !checkpoint::list(&run_dir)?.is_empty() {
            return Err(TrainError::Checkpoint(format!(
                "{} already holds checkpoints: pass --resume to continue, or choose another \
                 run.out_dir",
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
            if state.recipe != recipe {
                tracing::warn!("resuming with the checkpoint's recipe; the given one differs");
            }
            state.recipe.clone()
        }
        None => recipe,
    };
    write_atomically(&run_dir.join(RESOLVED_RECIPE), recipe.to_toml()?.as_bytes())?;

    // The model: architecture from the checkpoint, the init folder, a config or a preset.
    let cfg = match (
        &resume_from,
        &recipe.model.init,
        &recipe.model.config,
        &recipe.model.preset,
    ) {
        (Some(dir), ..) => AlbefConfig::load(&dir.join(checkpoint::CONFIG_FILE))?,
        (None, Some(init), ..) => AlbefConfig::load(&init.join(checkpoint::CONFIG_FILE))?,
        (None, None, Some(path), _) => AlbefConfig::load(path)?,
        (None, None, None, Some(preset)) => AlbefConfig::preset(preset)?,
        (None, None, None, None) => unreachable!("Recipe::validate requires a model"),
    };
    // A data.image_size other than the architecture's (fine-tuning at 384 px a model
    // pretrained at 256): the model is built at the data's size and an init checkpoint's
    // position embeddings are interpolated to it (ALBEF's `interpolate_pos_embed`).
    let mut cfg = cfg;
    if let (None, Some(size)) = (&resume_from, recipe.data.image_size) {
        if size as usize != cfg.vision.image_size {
            tracing::info!(
                "model built at {size} px (the architecture says {})",
                cfg.vision.image_size
            );
            cfg.vision.image_size = size as usize;
            cfg.validate()?;
        }
    }
    let mut varmap = VarMap::new();
    let model = AlbefModel::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, &dev))?;
    match (&resume_from, &recipe.model.init) {
        (Some(_), _) => {} // loaded below, with the optimizer
        (None, Some(init)) => {
            load_init(
                &varmap,
                &init.join(checkpoint::MODEL_FILE),
                cfg.vision.grid(),
            )?;
        }
        (None, None) => {
            seeded_init(&varmap, recipe.run.seed)?;
            model.copy_params_to_momentum()?;
        }
    }

    // The data.
    let tokenizer = TextTokenizer::from_file(&recipe.data.tokenizer, recipe.data.max_tokens)?;
    if tokenizer.vocab_size() > cfg.text.vocab_size {
        return Err(TrainError::input(
            "data.tokenizer",
            format!(
                "{} has {} tokens, the model's vocabulary {}",
                recipe.data.tokenizer.display(),
                tokenizer.vocab_size(),
                cfg.text.vocab_size
            ),
        ));
    }
    let t = &cfg.text;
    for (token, id) in [
        ("[PAD]", t.pad_id),
        ("[CLS]", t.cls_id),
        ("[SEP]", t.sep_id),
        ("[MASK]", t.mask_id),
    ] {
        if tokenizer.token_id(token) != Some(id) {
            return Err(TrainError::input(
                "data.tokenizer",
                format!(
                    "{} gives {token} id {:?}, the model expects {id}",
                    recipe.data.tokenizer.display(),
                    tokenizer.token_id(token)
                ),
            ));
        }
    }
    let mut loader_cfg = recipe.loader_config(cfg.vision.image_size as u32);
    // ALBEF's training loader keeps full batches only. The run ends at `total_steps`, so
    // the loader runs on past the last epoch (epoch lengths in steps are estimates).
    loader_cfg.drop_last = true;
    loader_cfg.max_epochs = None;
    let batch_size = loader_cfg.batch_size;
    let mut loader = Loader::new(&recipe.data.shards, loader_cfg, tokenizer.clone())?;

    // The optimizer.
    let mut optim = AdamW::new(
        model.trainable_vars()?,
        AdamWConfig {
            weight_decay: recipe.optim.weight_decay,
            ..AdamWConfig::default()
        },
    )?;

    // Lengths fixed at the start of the run: the schedule and the alpha ramp.
    let accumulate = recipe.optim.accumulate as u64;
    let steps_per_epoch = loader
        .samples_in_epoch(0)
        .map(|n| n / batch_size as u64 / accumulate);
    let mut state = match saved {
        Some(state) => {
            let dir = resume_from.as_deref().expect("saved state has a folder");
            checkpoint::load_into(dir, &mut varmap, &mut optim)?;
            let loader_state: LoaderState =
                serde_json::from_value(state.loader.clone()).map_err(|e| {
                    TrainError::Checkpoint(format!("{}: loader state: {e}", dir.display()))
                })?;
            loader.restore(loader_state)?;
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
            loader: serde_json::to_value(loader.state()).expect("loader state is JSON"),
            rng: Rng::new(derive_seed(&[recipe.run.seed, 0x7EA1])),
            recipe: recipe.clone(),
            best: None,
            validated_at: None,
        },
    };
    let schedule = recipe.schedule(state.total_steps);
    let params: usize = optim.decay_groups().0.len() + optim.decay_groups().1.len();
    tracing::info!(
        "training {} parameter tensors for {} steps (batch {batch_size} x {accumulate}), {} steps \
         per epoch, alpha ramp {} steps",
        params,
        state.total_steps,
        steps_per_epoch.map_or("unknown".into(), |s| s.to_string()),
        state.alpha_ramp_steps
    );

    let mut metrics = MetricsLog::open(&run_dir, resume_from.as_ref().map(|_| state.step))?;
    let mut last_checkpoint = resume_from.clone();
    progress.start(state.step, state.total_steps);
    let mut window = (Instant::now(), 0u64); // samples/s over the steps since the last log

    // Test hook: NaN images at this step (counted from 1) exercise the non-finite guard end to end.
    let inject_nan_at: Option<u64> = std::env::var("VLP_INJECT_NAN_AT_STEP")
        .ok()
        .and_then(|v| v.parse().ok());

    let validate = |state: &mut TrainState, metrics: &mut MetricsLog| {
        validate_epoch(
            &model, &tokenizer, &recipe, &cfg, &varmap, &run_dir, state, metrics,
        )
    };

    'train: while state.step < state.total_steps {
        let step = state.step;
        let lr = schedule.get_lr(step);
        let alpha = alpha_at(step, state.alpha_ramp_steps, recipe.objectives.alpha);
        let step_seed = state.rng.next_u64();

        // Forward and backward over `accumulate` micro-batches; gradients are averaged.
        let mut grads: Option<Gradients> = None;
        let mut parts: Vec<(&'static str, f64)> = Vec::new();
        let (mut temp, mut itm_fallbacks, mut samples) = (0.0, 0usize, 0u64);
        let mut nonfinite: Option<String> = None;
        // The step writes the queues as it goes; a skipped step must not leave its
        // (possibly non-finite) features in them.
        let queues = match recipe.run.on_nonfinite {
            OnNonFinite::Skip => Some(snapshot(&varmap, QUEUE_VARS)?),
            OnNonFinite::Stop => None,
        };
        for micro in 0..accumulate {
            let Some(batch) = loader.next_batch()? else {
                break 'train; // the loader's epochs are done
            };
            if batch.epoch > state.epoch && state.step > 0 && micro == 0 {
                // An epoch ended with the last step: validate the weights it left.
                validate(&mut state, &mut metrics)?;
            }
            state.epoch = batch.epoch;
            samples += batch.len() as u64;
            let mut inputs = step_batch(&batch, recipe.objectives.image_id_positives)?;
            if inject_nan_at == Some(step + 1) {
                inputs.images = (inputs.images * f64::NAN)?;
            }
            let losses = pretrain_losses(
                &model,
                &inputs,
                &recipe.objectives,
                alpha,
                Draws::Seeded(derive_seed(&[step_seed, micro])),
            )?;
            if let Some((name, value)) = losses.parts.iter().find(|(_, v)| !v.is_finite()) {
                nonfinite = Some(format!("loss part `{name}` ({value})"));
                break;
            }
            let store = losses.total.backward()?;
            let g = optim.gradients(&store, 1.0 / accumulate as f64)?;
            match &mut grads {
                Some(acc) => acc.add(&g)?,
                None => grads = Some(g),
            }
            accumulate_parts(&mut parts, &losses.parts, accumulate);
            temp = losses.temp;
            itm_fallbacks += losses.stats.itm_fallbacks;
        }
        state.samples_seen += samples;

        // Clipping returns the norm before clipping; a non-finite one poisons the update.
        let mut grad_norm = f64::NAN;
        if nonfinite.is_none() {
            let grads = grads.as_mut().expect("at least one micro-batch");
            grad_norm = match recipe.optim.clip_grad_norm {
                Some(max) => grads.clip_global_norm(max)?,
                None => grads.global_norm()?,
            };
            if !grad_norm.is_finite() {
                nonfinite = Some(format!("gradient norm ({grad_norm})"));
            }
        }
        match (&nonfinite, recipe.run.on_nonfinite) {
            (None, _) => optim.step(grads.as_ref().expect("gradients"), lr)?,
            (Some(what), OnNonFinite::Stop) => {
                progress.finish();
                tracing::error!(
                    "stopped without saving; last good checkpoint: {}",
                    last_checkpoint
                        .as_ref()
                        .map_or("none".into(), |p| p.display().to_string())
                );
                // Steps are counted from 1, as in metrics.jsonl and checkpoint names.
                return Err(TrainError::NonFinite {
                    step: step + 1,
                    what: what.clone(),
                });
            }
            (Some(what), OnNonFinite::Skip) => {
                tracing::warn!("step {}: non-finite {what}; update skipped", step + 1);
                restore(&varmap, queues.expect("snapshot taken in skip mode"))?;
                state.skipped_samples += samples;
            }
        }
        state.step += 1;
        window.1 += samples;

        // Metrics.
        let mut record = Map::new();
        record.insert("step".into(), json!(state.step));
        record.insert("epoch".into(), json!(state.epoch));
        record.insert("lr".into(), json!(lr));
        for (name, value) in &parts {
            record.insert(format!("loss_{name}"), json!(value));
        }
        record.insert("temp".into(), json!(temp));
        record.insert("alpha".into(), json!(alpha));
        let secs = window.0.elapsed().as_secs_f64();
        record.insert(
            "samples_per_s".into(),
            json!(window.1 as f64 / secs.max(1e-9)),
        );
        record.insert("grad_norm".into(), json!(grad_norm));
        record.insert("skipped_samples".into(), json!(state.skipped_samples));
        record.insert("itm_fallbacks".into(), json!(itm_fallbacks));
        progress.step(state.step, &record);
        let last = state.step == state.total_steps;
        if state.step % recipe.run.log_every.max(1) == 0 || last || state.step == 1 {
            metrics.write(&record)?;
            tracing::debug!("{}", serde_json::Value::Object(record.clone()));
            window = (Instant::now(), 0);
        }

        // Checkpoints: every `save_every` steps; the last one after the loop.
        let every = recipe.run.save_every;
        if every > 0 && state.step % every == 0 && !last {
            state.loader = serde_json::to_value(loader.state()).expect("loader state is JSON");
            last_checkpoint = Some(save(&run_dir, &varmap, &optim, &cfg, &state, &recipe)?);
        }
    }
    progress.finish();
    // (No checkpoint for a run that trained nothing: its weights are its init's.)
    if state.step > 0
        && last_checkpoint
            .as_ref()
            .is_none_or(|p| !p.ends_with(checkpoint::dir_name(state.step)))
    {
        state.loader = serde_json::to_value(loader.state()).expect("loader state is JSON");
        last_checkpoint = Some(save(&run_dir, &varmap, &optim, &cfg, &state, &recipe)?);
    }
    tracing::info!("trained {} steps", state.step);

    // The last epoch's validation, unless it already ran at this step.
    if state.validated_at != Some(state.step) && state.step > 0 {
        validate(&mut state, &mut metrics)?;
    }
    // Fine-tuning: the final evaluation uses the best validated weights.
    if let Some(best) = &state.best {
        let path = run_dir
            .join(checkpoint::BEST_DIR)
            .join(checkpoint::MODEL_FILE);
        load_init(&varmap, &path, cfg.vision.grid())?;
        tracing::info!(
            "evaluating the best checkpoint: step {}, epoch {}, validation r_mean {:.2}",
            best.step,
            best.epoch,
            best.r_mean
        );
    }

    // Zero-shot retrieval on each eval set: ITC ranking, then ITM re-ranking of the top k.
    let mut eval = Vec::new();
    if let Some(sets) = &recipe.eval {
        let eval_cfg = eval_config(sets)?;
        let mut json = Map::new();
        for set in &sets.sets {
            let data = EvalSet::open(
                &set.shards,
                cfg.vision.image_size as u32,
                recipe.data.max_words,
            )?;
            let (outcome, _) = evaluate_set(&model, &tokenizer, &data, &eval_cfg)?;
            print!("{}", markdown_table(&set.name, &outcome));
            let mut report = json_report(&set.name, &outcome, &eval_cfg);
            if let Some(best) = &state.best {
                report["best"] = serde_json::to_value(best).expect("JSON");
            }
            json.insert(set.name.clone(), report);
            eval.push((set.name.clone(), outcome));
        }
        write_atomically(
            &run_dir.join(EVAL_FILE),
            serde_json::to_string_pretty(&json)
                .expect("JSON")
                .as_bytes(),
        )?;
    }
    Ok(Summary {
        run_dir,
        steps: state.step,
        last_checkpoint,
        eval,
        skipped_samples: state.skipped_samples,
    })
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

/// The model's queue variables (FIFO feature queues and their write position).
const QUEUE_VARS: &[&str] = &["image_queue", "text_queue", "idx_queue", "queue_ptr"];

/// Copies of the named variables.
fn snapshot(varmap: &VarMap, names: &[&str]) -> Result<Vec<(String, Tensor)>> {
    let data = varmap.data().lock().expect("varmap lock");
    names
        .iter()
        .filter_map(|n| data.get(*n).map(|v| (n.to_string(), v)))
        .map(|(n, v)| Ok((n, v.as_tensor().copy()?)))
        .collect()
}

/// Writes snapshot copies back into their variables.
fn restore(varmap: &VarMap, saved: Vec<(String, Tensor)>) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    for (name, t) in saved {
        data[&name].set(&t)?;
    }
    Ok(())
}

/// The schedule's length: `optim.total_steps`, or `optim.epochs` epochs of full batches,
/// whichever is smaller.
fn total_steps(recipe: &Recipe, steps_per_epoch: Option<u64>) -> Result<u64> {
    let from_epochs = match (recipe.optim.epochs, steps_per_epoch) {
        (Some(e), Some(s)) => Some(e * s),
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

fn save(
    run_dir: &Path,
    varmap: &VarMap,
    optim: &AdamW,
    cfg: &AlbefConfig,
    state: &TrainState,
    recipe: &Recipe,
) -> Result<PathBuf> {
    let dir = checkpoint::save(run_dir, varmap, optim, cfg, state, recipe.run.keep_last)?;
    tracing::info!("saved {}", dir.display());
    Ok(dir)
}

/// The loader's batch as the step takes it; image ids (numbers, or hashes of other ids)
/// only when the objectives use them.
fn step_batch(batch: &Batch, with_image_ids: bool) -> Result<StepBatch> {
    let image_ids = if with_image_ids {
        let ids: Vec<i64> = batch
            .image_ids
            .iter()
            .map(|id| {
                id.parse::<i64>()
                    .unwrap_or_else(|_| (vlp_core::hash::fnv1a64(id.as_bytes()) >> 1) as i64)
            })
            .collect();
        let n = ids.len();
        Some(Tensor::from_vec(ids, n, batch.images.device())?)
    } else {
        None
    };
    Ok(StepBatch {
        images: batch.images.clone(),
        input_ids: batch.input_ids.clone(),
        attention_mask: batch.attention_mask.clone(),
        image_ids,
    })
}

/// Adds a micro-batch's loss parts, averaged over the micro-batches, into `sum`.
fn accumulate_parts(sum: &mut Vec<(&'static str, f64)>, parts: &[(&'static str, f64)], n: u64) {
    for (name, value) in parts {
        match sum.iter_mut().find(|(s, _)| s == name) {
            Some((_, s)) => *s += value / n as f64,
            None => sum.push((name, value / n as f64)),
        }
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// The retrieval evaluation settings of a recipe's `[eval]` section.
fn eval_config(sets: &crate::recipe::EvalSection) -> Result<EvalConfig> {
    Ok(EvalConfig {
        k_test: sets.k_test,
        score: sets.score.parse::<ScoreMode>()?,
        image_batch: sets.batch_size,
        text_batch: sets.batch_size.max(1) * 4,
        progress: true,
        ..EvalConfig::default()
    })
}

/// After an epoch (fine-tuning, `eval.validate` set): evaluates the validation set, logs
/// `val_*` metrics, and keeps the weights in `RUN_DIR/best` when the mean recall beats
/// the best so far. No-op without `eval.validate`.
#[allow(clippy::too_many_arguments)]
fn validate_epoch(
    model: &AlbefModel,
    tokenizer: &TextTokenizer,
    recipe: &Recipe,
    cfg: &AlbefConfig,
    varmap: &VarMap,
    run_dir: &Path,
    state: &mut TrainState,
    metrics: &mut MetricsLog,
) -> Result<()> {
    let Some(sets) = &recipe.eval else {
        return Ok(());
    };
    let Some(name) = &sets.validate else {
        return Ok(());
    };
    state.validated_at = Some(state.step);
    let set = sets
        .sets
        .iter()
        .find(|s| &s.name == name)
        .expect("Recipe::validate checks eval.validate");
    let data = EvalSet::open(
        &set.shards,
        cfg.vision.image_size as u32,
        recipe.data.max_words,
    )?;
    let (outcome, _) = evaluate_set(model, tokenizer, &data, &eval_config(sets)?)?;
    let m = outcome.main();
    let mut record = Map::new();
    record.insert("step".into(), json!(state.step));
    record.insert("epoch".into(), json!(state.epoch));
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
    let better = state.best.as_ref().is_none_or(|b| m.r_mean > b.r_mean);
    tracing::info!(
        "epoch {} validation on {name}: r_mean {:.2}{}",
        state.epoch,
        m.r_mean,
        if better { " (best so far)" } else { "" }
    );
    if better {
        let best = BestSoFar {
            step: state.step,
            epoch: state.epoch,
            r_mean: m.r_mean,
        };
        checkpoint::save_best(run_dir, varmap, cfg, &best)?;
        state.best = Some(best);
    }
    Ok(())
}

/// Loads a checkpoint's weights into `varmap` by name, interpolating position embeddings
/// whose grid differs from `grid` (the model's).
fn load_init(varmap: &VarMap, path: &Path, grid: usize) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| TrainError::Checkpoint(format!("init {}: {e}", path.display())))?;
    let data = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let Some(t) = tensors.get(name) else {
            return Err(TrainError::Checkpoint(format!(
                "init {}: no tensor {name}",
                path.display()
            )));
        };
        let t = if t.dims() != var.dims() && name.ends_with("pos_embed") {
            tracing::info!(
                "init: {name} {:?} interpolated to a {grid}x{grid} grid",
                t.dims()
            );
            vlp_models::interpolate_pos_embed(t, grid)?
        } else {
            t.clone()
        };
        if t.dims() != var.dims() {
            return Err(TrainError::Checkpoint(format!(
                "init {}: {name} is {:?}, the model's {:?}",
                path.display(),
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
