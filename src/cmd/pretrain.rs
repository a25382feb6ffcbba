//! `vlp pretrain`: ALBEF pretraining from a recipe, with `--set` overrides and `--resume`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};
use vlp_core::device::DeviceSpec;
use vlp_train::pretrain::{pretrain_with, Progress, Start};
use vlp_train::recipe::Recipe;

#[derive(clap::Args)]
pub struct PretrainArgs {
    /// The recipe (TOML; see recipes/).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe key before it is read, e.g. `--set optim.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue from the newest checkpoint in the run folder.
    #[arg(long)]
    pub resume: bool,
    /// --resume for a run whose data moved: the given recipe's `data.shards`,
    /// `data.tokenizer` and eval set shards replace the checkpoint's, if they name the
    /// same files (by name, in order).
    #[arg(long)]
    pub resume_moved: bool,
    /// No progress bar (logs only).
    #[arg(long)]
    pub no_progress: bool,
    /// Where to train: `cpu`, `cuda` or `cuda:N` [default: the recipe's `run.device`].
    #[arg(long)]
    pub device: Option<DeviceSpec>,
}

/// Runs the recipe. SIGINT and SIGTERM stop it at the next step boundary with a
/// checkpoint; the process then exits with the conventional `128 + signal`.
pub fn run(args: PretrainArgs) -> anyhow::Result<ExitCode> {
    let mut recipe = Recipe::load(&args.recipe, &args.set)?;
    if let Some(device) = args.device {
        recipe.run.device = device;
    }
    // One process, or one of those `vlp launch` (torchrun, srun) started. A signal during
    // the rendezvous ends the process at once; from here on, at a step boundary.
    let joined = crate::cmd::world::join(recipe.run.device)?;
    crate::signals::stop_at_step_boundary();
    recipe.run.device = joined.spec;
    let mut bar = Bar::new(!args.no_progress && joined.is_main());
    let start = match (args.resume, args.resume_moved) {
        (_, true) => Start::ResumeMoved,
        (true, false) => Start::Resume,
        (false, false) => Start::Fresh,
    };
    let summary = pretrain_with(recipe, start, joined.collective.clone(), &mut bar)?;
    if !joined.is_main() {
        // Rank 0 reports; the others share its exit status.
        return Ok(match summary.interrupted {
            Some(signal) => ExitCode::from((128 + signal).clamp(0, 255) as u8),
            None => ExitCode::SUCCESS,
        });
    }
    for (name, outcome) in &summary.eval {
        stdout!("{}", vlp_eval::report::markdown_table(name, outcome));
    }
    let checkpoint = summary
        .last_checkpoint
        .map(|p| format!(", last checkpoint {}", p.display()))
        .unwrap_or_default();
    if let Some(signal) = summary.interrupted {
        stderrln!(
            "stopped by signal {signal} after {} steps in {}{checkpoint}; continue with --resume",
            summary.steps,
            summary.run_dir.display(),
        );
        return Ok(ExitCode::from((128 + signal).clamp(0, 255) as u8));
    }
    stderrln!(
        "done: {} steps in {}{checkpoint}",
        summary.steps,
        summary.run_dir.display(),
    );
    Ok(ExitCode::SUCCESS)
}

/// `vlp finetune`: the same loop as `vlp pretrain`, for a recipe that starts from a
/// checkpoint (`model.init`) and usually validates every epoch (`eval.validate`), keeping
/// the best checkpoint in `RUN_DIR/best`.
pub fn run_finetune(args: PretrainArgs) -> anyhow::Result<ExitCode> {
    let recipe = Recipe::load(&args.recipe, &args.set)?;
    anyhow::ensure!(
        recipe.model.init.is_some() || args.resume || args.resume_moved,
        "a fine-tuning recipe starts from a checkpoint: set model.init (a folder from \
         `vlp pretrain` or `vlp convert`)"
    );
    if recipe.eval.as_ref().is_none_or(|e| e.validate.is_none()) {
        tracing::warn!("no eval.validate set: no per-epoch validation, the last weights are kept");
    }
    if recipe.objectives.mlm.enabled && recipe.objectives.mlm.weight != 0.0 {
        tracing::warn!("MLM is on; ALBEF's retrieval fine-tuning turns it off (objectives.mlm.enabled = false)");
    }
    run(args)
}

/// An indicatif bar with the loss parts, lr and samples/s; hidden when not wanted or when
/// standard error is not a terminal.
struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    fn new(enabled: bool) -> Self {
        Bar {
            bar: enabled.then(ProgressBar::hidden),
        }
    }
}

impl Progress for Bar {
    fn start(&mut self, first_step: u64, total_steps: u64) {
        if self.bar.is_none() {
            return;
        }
        let bar = ProgressBar::new(total_steps).with_position(first_step);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise} < {eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(500));
        self.bar = Some(bar);
    }

    fn step(&mut self, step: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
        }
    }

    fn log(&mut self, _step: u64, record: &Map<String, Value>) {
        let Some(bar) = &self.bar else { return };
        let mut msg = String::new();
        for (k, v) in record {
            if let (Some(name), Some(x)) = (k.strip_prefix("loss_"), v.as_f64()) {
                msg.push_str(&format!("{name} {x:.3} "));
            }
        }
        let get = |k: &str| record.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        msg.push_str(&format!(
            "lr {:.2e} {:.1} samples/s",
            get("lr"),
            get("samples_per_s")
        ));
        bar.set_message(msg);
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
