//! `vlp`: the command-line program. Glue only: parse arguments, set up logging, call the
//! library crates, map errors to exit codes.

/// `print!`/`println!`/`eprint!`/`eprintln!` that never panic: a closed pipe (`vlp
/// pretrain ... 2>&1 | head`, a `vlp launch` whose launcher is gone) must not kill a run
/// that has more to do, nor turn its exit status into a panic's. What cannot be written is
/// dropped; the run's files hold everything that matters.
macro_rules! stdout {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}
macro_rules! stdoutln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
macro_rules! stderr {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($t)*);
    }};
}
macro_rules! stderrln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

mod cmd;
mod signals;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vlp",
    version,
    about = "ALBEF/BLIP-style vision-language pretraining on candle"
)]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax); RUST_LOG also works.
    #[arg(long, global = true, default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make and check WebDataset shards.
    #[command(subcommand)]
    Shards(ShardsCommand),
    /// Train a WordPiece tokenizer on the captions of shards.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Benchmarks (throughput and peak memory).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Convert a published checkpoint (HF BERT/ViT/BLIP, timm/DeiT, ALBEF .pth) to vlp's format.
    Convert(cmd::convert::ConvertArgs),
    /// Evaluate checkpoints (image-text retrieval).
    #[command(subcommand)]
    Eval(EvalCommand),
    /// ITC embeddings (projected, L2-normalised) of images and/or captions to safetensors.
    Embed(cmd::embed::EmbedArgs),
    /// ITC similarity and ITM match probability of every image x caption pair.
    Score(cmd::embed::ScoreArgs),
    /// Fine-tune a checkpoint for retrieval from a recipe (ITC with image-id positives, ITM),
    /// validating every epoch and keeping the best checkpoint.
    Finetune(cmd::pretrain::PretrainArgs),
    /// Pretrain (ITC + ITM + MLM) from a recipe; `--resume` continues a run exactly.
    Pretrain(cmd::pretrain::PretrainArgs),
    /// Start the processes of a data-parallel run on this machine (one per GPU), as
    /// torchrun does: `vlp launch --nproc-per-node 8 -- pretrain --recipe X.toml`.
    Launch(cmd::launch::LaunchArgs),
    /// Draw the curves of a run (or several, overlaid) to RUN_DIR/curves.png.
    Plot(cmd::plot::PlotArgs),
}

#[derive(Subcommand)]
enum ShardsCommand {
    /// Write shards from a JSON annotation list, a folder of images with .txt sidecars, or a CSV/TSV.
    Write(cmd::shards_write::WriteArgs),
    /// Generate a deterministic synthetic dataset of coloured shapes with compositional captions.
    Synth(cmd::shards_synth::SynthArgs),
    /// Count samples and extensions, decode-check every sample, report bad samples by reason.
    Inspect(cmd::shards_inspect::InspectArgs),
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a BERT-style WordPiece tokenizer on the (cleaned) captions of shards.
    Train(cmd::tokenizer::TrainArgs),
}

#[derive(Subcommand)]
enum EvalCommand {
    /// Image-text retrieval on a shard set: ITC ranking, ITM re-ranking of the top k,
    /// TR/IR R@1/5/10, ranks; JSON report and Markdown table.
    Retrieval(cmd::eval::RetrievalArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Throughput and peak RSS of the full training data pipeline, and the decode-only limit.
    Loader(cmd::bench::LoaderArgs),
    /// Forward + backward samples/s and memory of a model preset on random batches.
    Step(cmd::bench_step::StepArgs),
    /// Retrieval evaluation (ITC + ITM re-ranking) timed phase by phase on a synthetic set.
    Eval(cmd::bench_eval::EvalArgs),
    /// Forward + backward of attention, LayerNorm, bias + GELU, soft cross-entropy and a
    /// ViT-B stack at ALBEF-base shapes, one JSON line each (the PyTorch operator peer's
    /// format).
    Ops(cmd::bench_ops::OpsArgs),
    /// The gradient all-reduce of a step alone: a model's gradient bytes averaged over the
    /// processes (run under `vlp launch`), median time and bandwidth.
    Allreduce(cmd::bench_comm::AllReduceArgs),
}

/// Keeps freed batch buffers in the process for reuse.
///
/// A batch of 64 images at 256 px is a 50 MB allocation. glibc serves allocations that
/// large with a fresh `mmap` and returns them with `munmap` on free, so every batch
/// page-faults 12,000 zeroed pages in, and worker threads' arenas cannot hold them at all.
/// Raising the mmap and trim thresholds and using one arena lets the next batch reuse the
/// last one's memory: +30% loader throughput on 2 cores (see docs/benchmarks.md). Peak
/// memory is unchanged (the loader bounds the batches in flight).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// How long candle's CPU worker threads spin waiting for work before they sleep, unless
/// `CANDLE_BARRIER_POOL_SPIN_LIMIT` says otherwise. candle's default (25 000 spins) keeps
/// its pool threads busy between its elementwise ops, taking the cores from the rayon
/// threads that run the matrix products and the fused kernels: on 2 cores a pretraining
/// step of the `tiny` model took 1.40 s with the default and 1.16-1.19 s with 1 000-3 000.
const CANDLE_SPIN_LIMIT: &str = "2000";

fn tune_threads() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT) };
    }
}

fn main() -> std::process::ExitCode {
    tune_threads();
    tune_allocator();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    // Colour codes only for a terminal: in a log file they are noise around every level.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written is dropped: tracing's report of the failure
        // would be an `eprintln!` to the same closed stderr, which panics.
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let result = match cli.command {
        Command::Shards(ShardsCommand::Write(a)) => cmd::shards_write::run(a),
        Command::Shards(ShardsCommand::Synth(a)) => cmd::shards_synth::run(a),
        Command::Shards(ShardsCommand::Inspect(a)) => cmd::shards_inspect::run(a),
        Command::Tokenizer(TokenizerCommand::Train(a)) => cmd::tokenizer::run(a),
        Command::Bench(BenchCommand::Loader(a)) => cmd::bench::run(a),
        Command::Bench(BenchCommand::Step(a)) => cmd::bench_step::run(a),
        Command::Bench(BenchCommand::Eval(a)) => cmd::bench_eval::run(a),
        Command::Bench(BenchCommand::Ops(a)) => cmd::bench_ops::run(a),
        Command::Bench(BenchCommand::Allreduce(a)) => cmd::bench_comm::run(a),
        Command::Eval(EvalCommand::Retrieval(a)) => cmd::eval::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Pretrain(a) => return exit(cmd::pretrain::run(a)),
        Command::Launch(a) => return exit(cmd::launch::run(a)),
        Command::Finetune(a) => return exit(cmd::pretrain::run_finetune(a)),
        Command::Embed(a) => cmd::embed::run_embed(a),
        Command::Score(a) => cmd::embed::run_score(a),
        Command::Plot(a) => cmd::plot::run(a),
    };
    exit(result.map(|()| std::process::ExitCode::SUCCESS))
}

/// The process's exit: the command's status, or its error printed with its causes.
fn exit(result: anyhow::Result<std::process::ExitCode>) -> std::process::ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            stderrln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes joined by ": ", each cause once: a cause whose text the message
/// so far already holds (an error type that prints its source inside its own message)
/// is not repeated.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
