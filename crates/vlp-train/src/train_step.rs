//! One optimizer step, in order: micro-batches (forward, backward, gradients summed) ->
//! gradients (and the loss parts) averaged over the ranks -> their global norm, clipped -> the non-finite
//! policy -> AdamW -> the momentum update -> the enqueue. The step reads back one small
//! tensor (the gradient norm with the total loss), which the non-finite policy needs,
//! besides the batch's similarities that ITM's hard-negative sampling draws from on the
//! host; the loss parts stay tensors until the loop logs them.
//!
//! The momentum update ends the step instead of starting the next forward (where ALBEF
//! puts it): no weight changes in between, so the momentum forward sees the same weights,
//! and a step the non-finite policy skips leaves the twin and the queues untouched.

use std::sync::Arc;

use candle_core::{DType, Tensor};
use vlp_core::rng::derive_seed;
use vlp_models::AlbefModel;

use crate::error::Result;
use crate::objectives::ObjectiveConfig;
use crate::optim::{AdamW, Gradients};
use crate::step::{pretrain_losses_across, read_parts, Draws, QueueEntry, StepBatch};
use vlp_dist::Collective;

/// What one step does, besides its batches.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings<'a> {
    pub objectives: &'a ObjectiveConfig,
    /// Micro-batches per optimizer step; gradients are averaged over them.
    pub accumulate: u64,
    pub clip_grad_norm: Option<f64>,
    pub lr: f64,
    /// The distillation weight in effect.
    pub alpha: f64,
    /// The step's seed; each micro-batch's draws come from (seed, rank, micro-batch).
    pub seed: u64,
    /// A frozen model that teaches `objectives.distill` (none: the model itself).
    pub teacher: Option<&'a AlbefModel>,
}

/// What a step did. The update was applied unless `nonfinite` says why not.
#[derive(Debug)]
pub struct StepReport {
    /// Each loss part averaged over the micro-batches, 0-d tensors (read at log time).
    pub parts: Vec<(&'static str, Tensor)>,
    /// The clamped temperature, 0-d.
    pub temp: Tensor,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Samples this process trained on.
    pub samples: u64,
    pub itm_fallbacks: usize,
    /// The non-finite value that stopped the update (`loss part `itc` (NaN)`,
    /// `gradient norm (inf)`); the weights, momentum twin and queues are then unchanged.
    pub nonfinite: Option<String>,
    /// Seconds in the forward passes, the backward passes, and the update.
    pub phase_secs: [f64; 3],
}

/// Runs one optimizer step on the batches `next_batch(micro)` gives. `None` when the data
/// ran out before the step's last micro-batch (the step is then not taken).
pub fn train_step(
    model: &AlbefModel,
    optim: &mut AdamW,
    collective: &Arc<dyn Collective>,
    settings: &StepSettings,
    next_batch: &mut dyn FnMut(u64) -> Result<Option<StepBatch>>,
) -> Result<Option<StepReport>> {
    let accumulate = settings.accumulate.max(1);
    let scale = 1.0 / accumulate as f64;
    let mut grads: Option<Gradients> = None;
    let mut parts: Vec<(&'static str, Tensor)> = Vec::new();
    let mut entries: Vec<QueueEntry> = Vec::new();
    let (mut temp, mut samples, mut itm_fallbacks) = (None, 0u64, 0usize);
    let mut phase_secs = [0.0; 3];
    for micro in 0..accumulate {
        let Some(batch) = next_batch(micro)? else {
            return Ok(None);
        };
        samples += batch.input_ids.dim(0)? as u64;
        let t0 = std::time::Instant::now();
        let seed = derive_seed(&[settings.seed, collective.rank() as u64, micro]);
        let losses = pretrain_losses_across(
            model,
            &batch,
            settings.objectives,
            settings.alpha,
            Draws::Seeded(seed),
            collective,
            settings.teacher,
        )?;
        let t1 = std::time::Instant::now();
        // With the parameters of checkpointed blocks (`model.grad_checkpoint`).
        let store = vlp_models::recompute::backward(&losses.total)?;
        let g = optim.gradients(&store, scale)?;
        drop(store);
        match &mut grads {
            Some(acc) => acc.add(&g)?,
            None => grads = Some(g),
        }
        phase_secs[0] += (t1 - t0).as_secs_f64();
        phase_secs[1] += t1.elapsed().as_secs_f64();
        add_scaled(&mut parts, &losses.parts, scale)?;
        temp = Some(losses.temp);
        itm_fallbacks += losses.stats.itm_fallbacks;
        entries.extend(losses.queue_entry);
    }
    let t0 = std::time::Instant::now();
    let mut grads = grads.expect("accumulate >= 1 micro-batch");
    grads.all_reduce_mean(&**collective)?;
    // The loss parts as means over the ranks, like the gradients: what is logged, and what
    // the non-finite policy sees, is the same on every rank.
    if collective.world_size() > 1 {
        let mut values: Vec<Tensor> = parts.iter().map(|(_, t)| t.clone()).collect();
        collective.all_reduce_mean(&mut values)?;
        for ((_, t), v) in parts.iter_mut().zip(values) {
            *t = v;
        }
    }

    // The one read of the step: the gradient norm and the total loss together.
    let total = &parts
        .iter()
        .find(|(n, _)| *n == "total")
        .expect("a total part")
        .1;
    let total = total.to_dtype(DType::F64)?;
    let squared_norm = match grads.squared_norm()? {
        Some(sq) => sq,
        None => total.zeros_like()?,
    };
    let checked = Tensor::stack(&[&squared_norm, &total], 0)?.to_vec1::<f64>()?;
    let (grad_norm, total_loss) = (checked[0].sqrt(), checked[1]);
    let nonfinite = if !total_loss.is_finite() {
        let values = read_parts(&parts)?;
        let (name, value) = values
            .iter()
            .find(|(_, v)| !v.is_finite())
            .copied()
            .unwrap_or(("total", total_loss));
        Some(format!("loss part `{name}` ({value})"))
    } else if !grad_norm.is_finite() {
        Some(format!("gradient norm ({grad_norm})"))
    } else {
        None
    };
    if nonfinite.is_none() {
        if let Some(max) = settings.clip_grad_norm {
            grads.clip_known_norm(grad_norm, max)?;
        }
        optim.step(&grads, settings.lr)?;
        let o = settings.objectives;
        if o.updates_momentum() {
            model.momentum_update(o.momentum)?;
        }
        for entry in &entries {
            enqueue(model, collective, entry)?;
        }
    }
    phase_secs[2] = t0.elapsed().as_secs_f64();
    Ok(Some(StepReport {
        parts,
        temp: temp.expect("at least one micro-batch"),
        grad_norm,
        samples,
        itm_fallbacks,
        nonfinite,
        phase_secs,
    }))
}

/// Puts a micro-batch's momentum features into the queues, gathered from every rank
/// first (rank-major, as ALBEF's `concat_all_gather`).
fn enqueue(model: &AlbefModel, collective: &Arc<dyn Collective>, entry: &QueueEntry) -> Result<()> {
    let image = collective.all_gather(&entry.image_feat_m)?;
    let text = collective.all_gather(&entry.text_feat_m)?;
    let ids = entry
        .image_ids
        .as_ref()
        .map(|ids| collective.all_gather(ids))
        .transpose()?;
    model.enqueue(&image, &text, ids.as_ref())?;
    Ok(())
}

/// Adds `scale` times each part into `sum` (tensors: no read).
fn add_scaled(
    sum: &mut Vec<(&'static str, Tensor)>,
    parts: &[(&'static str, Tensor)],
    scale: f64,
) -> Result<()> {
    for (name, value) in parts {
        let scaled = if scale == 1.0 {
            value.clone()
        } else {
            value.affine(scale, 0.0)?
        };
        match sum.iter_mut().find(|(s, _)| s == name) {
            Some((_, s)) => *s = (&*s + scaled)?,
            None => sum.push((name, scaled)),
        }
    }
    Ok(())
}
