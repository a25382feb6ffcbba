//! `RUN/metrics.jsonl`: one JSON object per logged step (step, epoch, lr, loss parts,
//! temp, alpha, throughput, gradient norm, skipped samples, ITM fallbacks); the same
//! numbers as TensorBoard scalars in `RUN/tb` ([`crate::tensorboard`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::TrainError;
use crate::tensorboard::{EventWriter, TB_DIR};

type Result<T> = std::result::Result<T, TrainError>;

pub const METRICS_FILE: &str = "metrics.jsonl";

/// Appends metric records to a run's `metrics.jsonl` and its TensorBoard event file.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    events: EventWriter,
}

impl MetricsLog {
    /// Opens the log of `run_dir`. When resuming from `resume_step`, records of later steps
    /// (written after that checkpoint by the interrupted run) are dropped first, so the
    /// file reads as one uninterrupted run; a fresh run starts an empty file. The event
    /// files follow the same rule ([`EventWriter::create`]).
    pub fn open(run_dir: &Path, resume_step: Option<u64>) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        let kept = match resume_step {
            Some(step) if path.exists() => read(run_dir)?
                .into_iter()
                .filter(|r| {
                    r.get("step")
                        .and_then(Value::as_u64)
                        .is_some_and(|s| s <= step)
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut text = String::new();
        for r in &kept {
            text.push_str(&r.to_string());
            text.push('\n');
        }
        std::fs::write(&path, text).map_err(|e| TrainError::io(&path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        let events = EventWriter::create(&run_dir.join(TB_DIR), resume_step)?;
        Ok(MetricsLog { path, file, events })
    }

    /// Appends a record; its numbers but `step` (the x axis) also go to TensorBoard as
    /// scalars under their names. A value that is not a number (a non-finite loss is
    /// `null` in JSON) is left out of both views alike.
    pub fn write(&mut self, record: &Map<String, Value>) -> Result<()> {
        let line = format!("{}\n", Value::Object(record.clone()));
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| TrainError::io(&self.path, e))?;
        let Some(step) = record.get("step").and_then(Value::as_u64) else {
            return Ok(());
        };
        let scalars: Vec<(&str, f32)> = record
            .iter()
            .filter(|(k, _)| k.as_str() != "step")
            .filter_map(|(k, v)| Some((k.as_str(), v.as_f64()? as f32)))
            .collect();
        self.events.scalars(step, &scalars)
    }
}

/// Reads every record of a run's `metrics.jsonl`. A line that is not a JSON object — a
/// torn last line, or one another program garbled, not UTF-8 included — is skipped, with
/// one warning counting them: the file is read as bytes, so one stray byte costs its line
/// only, not the whole log (and with it `--resume` and `vlp plot`).
pub fn read(run_dir: &Path) -> Result<Vec<Value>> {
    let path = run_dir.join(METRICS_FILE);
    let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
    let mut skipped = 0usize;
    let records = bytes
        .split(|&b| b == b'\n')
        .filter(|line| !line.trim_ascii().is_empty())
        .filter_map(|line| {
            // `from_slice` refuses bytes that are not UTF-8 as it refuses bad JSON.
            let record = serde_json::from_slice::<Value>(line)
                .ok()
                .filter(Value::is_object);
            skipped += usize::from(record.is_none());
            record
        })
        .collect();
    if skipped > 0 {
        tracing::warn!(
            "{}: skipped {skipped} line(s) that are not a JSON object (torn, or not UTF-8)",
            path.display()
        );
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn resume_drops_records_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), None).unwrap();
        for step in 1..=5u64 {
            let Value::Object(m) = json!({"step": step, "loss": 1.0}) else {
                unreachable!()
            };
            log.write(&m).unwrap();
        }
        drop(log);
        let _log = MetricsLog::open(dir.path(), Some(3)).unwrap();
        let steps: Vec<u64> = read(dir.path())
            .unwrap()
            .iter()
            .map(|r| r["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, vec![1, 2, 3]);
    }

    #[test]
    fn a_line_that_is_not_utf8_is_skipped_and_resume_still_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        bytes.extend(b"{\"step\": 1, \"loss\": 1.0}\n");
        bytes.extend(b"\xff\xfe{\"step\": 2}\n");
        bytes.extend(b"{\"step\": 2, \"loss\": 0.9, \"note\": \"\xc3\"}\n");
        bytes.extend(b"{\"step\": 3, \"loss\": 0.8}\r\n");
        bytes.extend(b"{\"step\": 4, \"loss\": 0.7}\n");
        bytes.extend(b"{\"step\": 5, \"lo");
        std::fs::write(dir.path().join(METRICS_FILE), &bytes).unwrap();
        let steps = |dir: &Path| -> Vec<u64> {
            read(dir)
                .unwrap()
                .iter()
                .map(|r| r["step"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(steps(dir.path()), vec![1, 3, 4]);
        let _log = MetricsLog::open(dir.path(), Some(3)).unwrap();
        assert_eq!(steps(dir.path()), vec![1, 3]);
    }
}
