//! Opening a shard: a local file, or the standard output of a `pipe:` shell command
//! (`pipe:aws s3 cp s3://bucket/x.tar -`, `pipe:curl -s URL`). A command that fails is
//! noticed when its stream ends, through its exit status, and reported with the tail of
//! its standard error.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::spec::ShardUrl;

/// How much of a failed command's standard error is kept for the message.
const STDERR_TAIL: usize = 2048;

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

/// Opens a shard for sequential reading.
pub fn open_shard(url: &ShardUrl) -> Result<ShardStream, OpenError> {
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
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(command)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| OpenError::PipeFailed(format!("cannot start `{command}`: {e}")))?;
            let stdout = child.stdout.take().expect("stdout was piped");
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
        // Read what is left so the command is not killed by SIGPIPE before it exits.
        let _ = io::copy(&mut self.reader, &mut io::sink());
        let status = pipe
            .child
            .wait()
            .map_err(|e| OpenError::PipeFailed(format!("`{}`: {e}", pipe.command)))?;
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

impl Drop for ShardStream {
    fn drop(&mut self) {
        if let Some(pipe) = &mut self.child {
            let _ = pipe.child.kill();
            let _ = pipe.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_reads_stdout_and_reports_failure() {
        let mut ok = open_shard(&ShardUrl::Pipe("printf hello".into())).unwrap();
        let mut s = String::new();
        ok.reader().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        ok.finish().unwrap();

        let mut bad = open_shard(&ShardUrl::Pipe("echo oops >&2; exit 3".into())).unwrap();
        let mut s = String::new();
        bad.reader().read_to_string(&mut s).unwrap();
        let err = bad.finish().unwrap_err().to_string();
        assert!(err.contains("oops") && err.contains('3'), "{err}");
    }

    #[test]
    fn missing_file_is_reported() {
        let err = match open_shard(&ShardUrl::Local("/nonexistent/x.tar".into())) {
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
