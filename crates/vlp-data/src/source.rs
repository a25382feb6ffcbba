//! Opening a shard: a local file, or the standard output of a `pipe:` shell command
//! (`pipe:aws s3 cp s3://bucket/x.tar -`, `pipe:curl -s URL`). A command that fails is
//! noticed when its stream ends, through its exit status, and reported with the tail of
//! its standard error. A command that sends nothing for [`Patience::stall`] is given up
//! on, and killed: its stream fails with a message naming it. Each command runs in a
//! process group of its own, killed with everything in it when its stream is dropped,
//! when vlp ends by a second signal ([`kill_all_pipes`]), and (its shell, by the kernel,
//! on Linux) when the thread that started it ends, which a killed vlp's threads all do.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::spec::ShardUrl;

/// How much of a failed command's standard error is kept for the message.
const STDERR_TAIL: usize = 2048;

/// How long a `pipe:` source may send nothing before it is given up on, by default: long
/// enough for an object store's slowest first byte, short enough that a stalled command
/// is reported within minutes rather than never.
pub const DEFAULT_STALL: Duration = Duration::from_secs(300);

/// How long reads of a `pipe:` source wait for data.
#[derive(Clone, Debug)]
pub struct Patience {
    /// A source that sends nothing for this long fails; `None` waits forever.
    pub stall: Option<Duration>,
    /// Set by the owner (a loader shutting down) to end a wait at once.
    pub stop: Option<Arc<AtomicBool>>,
}

impl Default for Patience {
    fn default() -> Self {
        Patience {
            stall: Some(DEFAULT_STALL),
            stop: None,
        }
    }
}

/// An open shard stream. Call [`ShardStream::finish`] after reading to learn whether a
/// `pipe:` command succeeded; dropping it early kills the command.
pub struct ShardStream {
    reader: Box<dyn Read + Send>,
    child: Option<PipeChild>,
}

struct PipeChild {
    command: String,
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
    /// The slot of its process group in [`LIVE_GROUPS`].
    slot: Option<usize>,
}

/// Why a shard could not be opened or its command failed.
#[derive(Debug)]
pub enum OpenError {
    /// The local file is missing or unreadable.
    Missing(String),
    /// The command could not be started or exited with an error.
    PipeFailed(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Missing(m) | OpenError::PipeFailed(m) => f.write_str(m),
        }
    }
}

/// The process groups of the running `pipe:` commands (0: a free slot). Fixed-size and
/// atomic so that a signal handler can read it ([`kill_all_pipes`]); a command started
/// when every slot is taken still runs and is killed with its stream, only not by
/// [`kill_all_pipes`].
static LIVE_GROUPS: [AtomicI32; 256] = [const { AtomicI32::new(0) }; 256];

fn register_group(pgid: i32) -> Option<usize> {
    LIVE_GROUPS.iter().position(|slot| {
        slot.compare_exchange(0, pgid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    })
}

/// Kills the process group of every running `pipe:` command. Async-signal-safe (atomic
/// loads and `kill`): the program's handler calls it before exiting at once on a second
/// signal, so that no command outlives the run.
pub fn kill_all_pipes() {
    for slot in &LIVE_GROUPS {
        let pgid = slot.load(Ordering::SeqCst);
        if pgid > 0 {
            // SAFETY: `kill` is async-signal-safe; a negative pid names a process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// A command's stdout that waits for data in short slices, so that a stall is noticed
/// and a stop request is honoured within a fraction of a second.
struct PatientPipe {
    inner: ChildStdout,
    patience: Patience,
    /// Why a read failed (a stall, a stop, the pipe): later reads (the drain in
    /// [`ShardStream::finish`]) fail at once instead of waiting a second time.
    gave_up: Option<(io::ErrorKind, String)>,
}

impl Read for PatientPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some((kind, why)) = &self.gave_up {
            return Err(io::Error::new(*kind, why.clone()));
        }
        let result = self.wait_and_read(buf);
        if let Err(e) = &result {
            self.gave_up = Some((e.kind(), e.to_string()));
        }
        result
    }
}

impl PatientPipe {
    fn wait_and_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let since = Instant::now();
        loop {
            let mut fd = libc::pollfd {
                fd: self.inner.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, a bounded timeout.
            let ready = unsafe { libc::poll(&mut fd, 1, 200) };
            if ready > 0 {
                // Data, or the end of the stream (POLLHUP): `read` returns it at once.
                return self.inner.read(buf);
            }
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            if self
                .patience
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
            {
                // Not `ErrorKind::Interrupted`: readers retry that one.
                return Err(io::Error::other("the reader is stopping"));
            }
            if let Some(stall) = self.patience.stall {
                if since.elapsed() >= stall {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("sent nothing for {} s", stall.as_secs_f64()),
                    ));
                }
            }
        }
    }
}

/// Opens a shard for sequential reading; reads of a `pipe:` command wait as `patience`
/// says.
pub fn open_shard(url: &ShardUrl, patience: &Patience) -> Result<ShardStream, OpenError> {
    match url {
        ShardUrl::Local(path) => {
            let file =
                File::open(path).map_err(|e| OpenError::Missing(format!("cannot open: {e}")))?;
            Ok(ShardStream {
                reader: Box::new(BufReader::with_capacity(1 << 20, file)),
                child: None,
            })
        }
        ShardUrl::Pipe(command) => {
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg(command)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            // SAFETY: between fork and exec only async-signal-safe calls: a process group
            // of its own (so the whole pipeline can be killed), and on Linux death with
            // vlp (SIGKILL included).
            unsafe {
                cmd.pre_exec(|| {
                    libc::setpgid(0, 0);
                    #[cfg(target_os = "linux")]
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| OpenError::PipeFailed(format!("cannot start `{command}`: {e}")))?;
            let slot = register_group(child.id() as i32);
            let stdout = PatientPipe {
                inner: child.stdout.take().expect("stdout was piped"),
                patience: patience.clone(),
                gave_up: None,
            };
            let mut stderr_pipe = child.stderr.take().expect("stderr was piped");
            let stderr = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&stderr);
            // Drain stderr on its own thread so a chatty command never blocks on a full pipe.
            let stderr_thread = std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr_pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut tail = sink.lock().unwrap_or_else(|p| p.into_inner());
                    tail.extend_from_slice(&buf[..n]);
                    if tail.len() > 2 * STDERR_TAIL {
                        let cut = tail.len() - STDERR_TAIL;
                        tail.drain(..cut);
                    }
                }
            });
            Ok(ShardStream {
                reader: Box::new(BufReader::with_capacity(1 << 20, stdout)),
                child: Some(PipeChild {
                    command: command.clone(),
                    child,
                    stderr,
                    stderr_thread: Some(stderr_thread),
                    slot,
                }),
            })
        }
    }
}

impl ShardStream {
    /// The byte stream.
    pub fn reader(&mut self) -> &mut (dyn Read + Send) {
        &mut *self.reader
    }

    /// Waits for a `pipe:` command and reports a non-zero exit with its standard error.
    /// For local files this is a no-op.
    pub fn finish(mut self) -> Result<(), OpenError> {
        let Some(mut pipe) = self.child.take() else {
            return Ok(());
        };
        // Read what is left so the command is not killed by SIGPIPE before it exits. A
        // command that stalls (or a reader told to stop) is killed, never waited for.
        if let Err(e) = io::copy(&mut self.reader, &mut io::sink()) {
            pipe.kill();
            return Err(OpenError::PipeFailed(format!("`{}` {e}", pipe.command)));
        }
        let status = pipe
            .child
            .wait()
            .map_err(|e| OpenError::PipeFailed(format!("`{}`: {e}", pipe.command)))?;
        pipe.release();
        if let Some(t) = pipe.stderr_thread.take() {
            let _ = t.join();
        }
        if status.success() {
            return Ok(());
        }
        let tail = pipe
            .stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let tail = String::from_utf8_lossy(&tail);
        let tail = tail.trim();
        Err(OpenError::PipeFailed(if tail.is_empty() {
            format!("`{}` exited with {status}", pipe.command)
        } else {
            format!("`{}` exited with {status}: {tail}", pipe.command)
        }))
    }
}

impl PipeChild {
    /// Kills the command's process group and reaps its shell.
    fn kill(&mut self) {
        // SAFETY: a negative pid names the process group the command leads.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.release();
    }

    fn release(&mut self) {
        if let Some(slot) = self.slot.take() {
            LIVE_GROUPS[slot].store(0, Ordering::SeqCst);
        }
    }
}

impl Drop for ShardStream {
    fn drop(&mut self) {
        if let Some(pipe) = &mut self.child {
            pipe.kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_reads_stdout_and_reports_failure() {
        let mut ok =
            open_shard(&ShardUrl::Pipe("printf hello".into()), &Patience::default()).unwrap();
        let mut s = String::new();
        ok.reader().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        ok.finish().unwrap();

        let mut bad = open_shard(
            &ShardUrl::Pipe("echo oops >&2; exit 3".into()),
            &Patience::default(),
        )
        .unwrap();
        let mut s = String::new();
        bad.reader().read_to_string(&mut s).unwrap();
        let err = bad.finish().unwrap_err().to_string();
        assert!(err.contains("oops") && err.contains('3'), "{err}");
    }

    /// Whether any process of the group `pgid` is alive (a zombie waiting for its
    /// reaper is not).
    fn group_alive(pgid: i32) -> bool {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                return false;
            };
            // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
            let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string()
        })
    }

    fn group_of(stream: &ShardStream) -> i32 {
        stream.child.as_ref().expect("a pipe").child.id() as i32
    }

    #[test]
    fn a_stalled_pipe_is_given_up_on_named_and_killed_with_its_children() {
        // The sleep runs as a child of the shell (the `;` keeps the shell from exec'ing
        // it): the whole process group must go, not only the shell.
        let command = "sleep 617; true";
        let patience = Patience {
            stall: Some(Duration::from_millis(500)),
            stop: None,
        };
        let started = Instant::now();
        let mut stalled = open_shard(&ShardUrl::Pipe(command.into()), &patience).unwrap();
        let group = group_of(&stalled);
        let mut buf = Vec::new();
        let err = stalled.reader().read_to_end(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        let err = stalled.finish().unwrap_err().to_string();
        assert!(
            err.contains(command) && err.contains("sent nothing for 0.5 s"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // Killed, not waited for: give the kernel a moment to reap.
        std::thread::sleep(Duration::from_millis(200));
        assert!(!group_alive(group));
    }

    #[test]
    fn a_stop_request_ends_a_wait_at_once() {
        let stop = Arc::new(AtomicBool::new(false));
        let patience = Patience {
            stall: None,
            stop: Some(Arc::clone(&stop)),
        };
        let mut stalled = open_shard(&ShardUrl::Pipe("sleep 619; true".into()), &patience).unwrap();
        let group = group_of(&stalled);
        let setter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::Relaxed);
        });
        let started = Instant::now();
        let mut buf = [0u8; 16];
        assert!(stalled.reader().read(&mut buf).is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
        setter.join().unwrap();
        drop(stalled);
        std::thread::sleep(Duration::from_millis(200));
        assert!(!group_alive(group));
    }

    #[test]
    fn missing_file_is_reported() {
        let err = match open_shard(
            &ShardUrl::Local("/nonexistent/x.tar".into()),
            &Patience::default(),
        ) {
            Err(OpenError::Missing(m)) => m,
            _ => panic!("expected Missing"),
        };
        assert!(err.contains("cannot open"), "{err}");
        // The shard is named once, by the problem's url, not again inside its detail.
        let url = ShardUrl::Local("/nonexistent/x.tar".into());
        let problem = crate::shard::read_shard(&url, 0, |_| std::ops::ControlFlow::Continue(()))
            .problem
            .expect("a missing shard is a problem");
        let message = problem.into_error().to_string();
        assert_eq!(
            message.matches("/nonexistent/x.tar").count(),
            1,
            "{message}"
        );
    }
}
