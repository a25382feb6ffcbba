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

/// Reads every record of a run's `metrics.jsonl` (a torn last line is ignored).
pub fn read(run_dir: &Path) -> Result<Vec<Value>> {
    let path = run_dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect())
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
}
