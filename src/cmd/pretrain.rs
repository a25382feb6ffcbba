//! `vlp pretrain`: ALBEF pretraining from a recipe, with `--set` overrides and `--resume`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
    /// No progress bar: one log line per logged step instead, as when standard error is
    /// not a terminal.
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
    let mut bar = Bar::new(!args.no_progress, joined.is_main());
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

/// How the main process shows a run's progress: on a terminal, an indicatif bar with the
/// loss parts, lr and samples/s; where standard error is not a terminal (a log file, a job
/// scheduler's capture), where an animated bar shows nothing, or with `--no-progress`, one
/// plain log line per logged step (`run.log_every`) with the same numbers and an ETA.
struct Bar {
    mode: Mode,
    bar: Option<ProgressBar>,
    /// When the run (re)started and at which step, for the ETA of the plain lines.
    start: (Instant, u64),
    total_steps: u64,
}

#[derive(PartialEq)]
enum Mode {
    Bar,
    Lines,
    /// Another process of a data-parallel run: rank 0 reports.
    Off,
}

impl Bar {
    fn new(bar_wanted: bool, main: bool) -> Self {
        let mode = match (main, bar_wanted && std::io::stderr().is_terminal()) {
            (false, _) => Mode::Off,
            (true, true) => Mode::Bar,
            (true, false) => Mode::Lines,
        };
        Bar {
            mode,
            bar: None,
            start: (Instant::now(), 0),
            total_steps: 0,
        }
    }
}

impl Progress for Bar {
    fn start(&mut self, first_step: u64, total_steps: u64) {
        self.start = (Instant::now(), first_step);
        self.total_steps = total_steps;
        if self.mode != Mode::Bar {
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

    fn log(&mut self, step: u64, record: &Map<String, Value>) {
        match self.mode {
            Mode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_message(numbers(record));
                }
            }
            Mode::Lines => {
                let (since, first) = self.start;
                let left = self.total_steps.saturating_sub(step);
                let eta = eta(since.elapsed(), step.saturating_sub(first), left);
                tracing::info!(
                    "step {step}/{} | {} | ETA {eta}",
                    self.total_steps,
                    numbers(record)
                );
            }
            Mode::Off => {}
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// A logged record's loss parts, lr and samples/s, as the bar and the log lines show them.
fn numbers(record: &Map<String, Value>) -> String {
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
    msg
}

/// The time left at the pace so far: `done` steps took `elapsed`, `left` remain.
fn eta(elapsed: Duration, done: u64, left: u64) -> String {
    if done == 0 {
        return "unknown".into();
    }
    let secs = (elapsed.as_secs_f64() / done as f64 * left as f64).round() as u64;
    match (secs / 3600, secs / 60 % 60, secs % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_is_the_pace_so_far_times_the_steps_left() {
        let secs = Duration::from_secs;
        assert_eq!(eta(secs(10), 0, 5), "unknown");
        assert_eq!(eta(secs(10), 10, 5), "5s");
        assert_eq!(eta(secs(10), 10, 252), "4m12s");
        assert_eq!(eta(secs(10), 10, 7380), "2h03m");
        assert_eq!(eta(secs(10), 10, 0), "0s");
    }
}
