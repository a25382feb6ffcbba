//! `vlp launch`: starts the processes of a data-parallel run on this machine, the way
//! `torchrun` does — one per GPU, each told its place through torchrun's variables
//! (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`)
//! — forwards SIGINT/SIGTERM to them (they stop at a step boundary with a checkpoint),
//! and when one fails stops the others and reports that one's exit status and last lines.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

#[derive(clap::Args)]
pub struct LaunchArgs {
    /// Processes on this machine, one per GPU (each computes on `cuda:LOCAL_RANK` when the
    /// command asks for `cuda`).
    #[arg(long)]
    pub nproc_per_node: usize,
    /// Machines taking part (run `vlp launch` on each, with its `--node-rank`).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This machine's index, `0..nnodes` (machine 0 runs rank 0).
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Address of machine 0, as the other machines reach it.
    #[arg(long, default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rank 0's port; vlp's rendezvous listens on the next one (`MASTER_PORT + 1`).
    #[arg(long, default_value_t = 29500)]
    pub master_port: u16,
    /// Seconds the others get to stop after one process failed, before they are killed.
    #[arg(long, default_value_t = 30)]
    pub grace: u64,
    /// The vlp command every process runs, after `--`: `pretrain --recipe X.toml ...`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Lines of each process's standard error kept for the failure report.
const TAIL: usize = 20;

/// Signals received by the launcher and not yet forwarded (a count per signal).
static SIGINTS: AtomicUsize = AtomicUsize::new(0);
static SIGTERMS: AtomicUsize = AtomicUsize::new(0);
/// The first signal received (0: none): the launcher's exit status when it ends the run.
static FIRST_SIGNAL: AtomicI32 = AtomicI32::new(0);

fn install_forwarding() {
    extern "C" fn on_signal(signal: libc::c_int) {
        let _ = FIRST_SIGNAL.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst);
        if signal == libc::SIGINT {
            SIGINTS.fetch_add(1, Ordering::SeqCst);
        } else {
            SIGTERMS.fetch_add(1, Ordering::SeqCst);
        }
    }
    crate::signals::on_sigint_and_sigterm(on_signal);
}

struct Worker {
    rank: usize,
    child: Child,
    tail: Arc<Mutex<VecDeque<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn send_signal(w: &Worker, signal: libc::c_int) {
    if w.status.is_none() {
        // SAFETY: kill(2) on a child this process started and has not reaped.
        unsafe { libc::kill(w.child.id() as libc::pid_t, signal) };
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => format!("ended ({status})"),
    }
}

fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code.clamp(0, 255) as u8,
        (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
        _ => 1,
    }
}

pub fn run(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.nproc_per_node >= 1,
        "--nproc-per-node must be at least 1"
    );
    anyhow::ensure!(args.nnodes >= 1, "--nnodes must be at least 1");
    anyhow::ensure!(
        args.node_rank < args.nnodes,
        "--node-rank {} is not below --nnodes {}",
        args.node_rank,
        args.nnodes
    );
    anyhow::ensure!(
        args.master_port < u16::MAX,
        "--master-port {}: the rendezvous needs the next port too",
        args.master_port
    );
    anyhow::ensure!(
        args.command.first().is_some_and(|c| c != "launch"),
        "give the vlp command to run after `--`, e.g. `vlp launch --nproc-per-node 2 -- \
         pretrain --recipe r.toml`"
    );
    let exe = std::env::current_exe().context("finding the vlp executable")?;
    let world = args
        .nproc_per_node
        .checked_mul(args.nnodes)
        .filter(|&n| n <= vlp_dist::world::MAX_WORLD_SIZE)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--nproc-per-node x --nnodes is over {} processes",
                vlp_dist::world::MAX_WORLD_SIZE
            )
        })?;
    install_forwarding();
    let mut workers = Vec::new();
    for local in 0..args.nproc_per_node {
        let rank = args.node_rank * args.nproc_per_node + local;
        let mut cmd = Command::new(&exe);
        cmd.args(&args.command)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("LOCAL_WORLD_SIZE", args.nproc_per_node.to_string())
            .env("GROUP_RANK", args.node_rank.to_string())
            .env("MASTER_ADDR", &args.master_addr)
            .env("MASTER_PORT", args.master_port.to_string())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's Ctrl-C reaches the launcher only, which
            // forwards it once.
            .process_group(0);
        stop_when_orphaned(&mut cmd);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                for w in &workers {
                    send_signal(w, libc::SIGKILL);
                }
                return Err(e).with_context(|| format!("starting rank {rank}"));
            }
        };
        let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL)));
        let stderr = child.stderr.take().expect("piped");
        let kept = tail.clone();
        let reader = std::thread::spawn(move || {
            let mut lines = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match lines.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']);
                let _ = writeln!(std::io::stderr().lock(), "[rank {rank}] {line}");
                let mut t = kept.lock().unwrap_or_else(|p| p.into_inner());
                if t.len() == TAIL {
                    t.pop_front();
                }
                t.push_back(line.to_string());
            }
        });
        workers.push(Worker {
            rank,
            child,
            tail,
            reader: Some(reader),
            status: None,
        });
    }
    stderrln!(
        "vlp launch: ranks {}..{} of {world} started on this machine (rendezvous at {}:{})",
        args.node_rank * args.nproc_per_node,
        (args.node_rank + 1) * args.nproc_per_node - 1,
        args.master_addr,
        args.master_port + 1
    );

    let mut failed: Option<usize> = None; // index into workers
    let mut deadline: Option<Instant> = None;
    let (mut ints, mut terms) = (0usize, 0usize);
    loop {
        // Forward what arrived since the last look.
        for (count, seen, signal) in [
            (&SIGINTS, &mut ints, libc::SIGINT),
            (&SIGTERMS, &mut terms, libc::SIGTERM),
        ] {
            let now = count.load(Ordering::SeqCst);
            while *seen < now {
                *seen += 1;
                for w in &workers {
                    send_signal(w, signal);
                }
            }
        }
        for (i, w) in workers.iter_mut().enumerate() {
            if w.status.is_none() {
                if let Some(status) = w.child.try_wait().context("waiting for a process")? {
                    w.status = Some(status);
                    let interrupted = FIRST_SIGNAL.load(Ordering::SeqCst) != 0;
                    if !status.success() && failed.is_none() && !interrupted {
                        failed = Some(i);
                    }
                }
            }
        }
        if let Some(first) = failed {
            if deadline.is_none() {
                // The others notice a dead peer within milliseconds and fail too: look a
                // moment longer and blame the one killed by a signal, if any.
                std::thread::sleep(Duration::from_millis(300));
                for w in workers.iter_mut().filter(|w| w.status.is_none()) {
                    if let Some(status) = w.child.try_wait().context("waiting for a process")? {
                        w.status = Some(status);
                    }
                }
                let i = workers
                    .iter()
                    .position(|w| w.status.is_some_and(|s| s.signal().is_some()))
                    .unwrap_or(first);
                failed = Some(i);
                stderrln!(
                    "vlp launch: rank {} {}; stopping the others",
                    workers[i].rank,
                    describe(workers[i].status.expect("ended"))
                );
                for w in &workers {
                    send_signal(w, libc::SIGTERM);
                }
                deadline = Some(Instant::now() + Duration::from_secs(args.grace));
            } else if deadline.is_some_and(|d| Instant::now() > d) {
                for w in &workers {
                    send_signal(w, libc::SIGKILL);
                }
            }
        }
        if workers.iter().all(|w| w.status.is_some()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for w in &mut workers {
        if let Some(r) = w.reader.take() {
            let _ = r.join();
        }
    }
    if let Some(i) = failed {
        let w = &workers[i];
        let status = w.status.expect("ended");
        let tail = w.tail.lock().unwrap_or_else(|p| p.into_inner());
        stderrln!(
            "vlp launch: the run failed: rank {} {}. Its last lines:",
            w.rank,
            describe(status)
        );
        for line in tail.iter() {
            stderrln!("  {line}");
        }
        return Ok(ExitCode::from(exit_code(status).max(1)));
    }
    // Stopped by a signal (each process wrote its checkpoint), or all done.
    let worst = workers
        .iter()
        .map(|w| exit_code(w.status.expect("ended")))
        .max()
        .unwrap_or(0);
    Ok(ExitCode::from(worst))
}

/// A rank whose launcher dies (SIGKILL, an OOM kill) gets SIGTERM from the kernel, and
/// stops as a signalled run does: at a step boundary, with a checkpoint, releasing the
/// run folder. Linux only (`PR_SET_PDEATHSIG`); elsewhere an orphaned rank runs on until
/// its peers or its collective's timeout stop it.
fn stop_when_orphaned(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let launcher = std::process::id() as libc::pid_t;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                // The launcher may have died before the request was made.
                if libc::getppid() != launcher {
                    libc::raise(libc::SIGTERM);
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cmd;
}
