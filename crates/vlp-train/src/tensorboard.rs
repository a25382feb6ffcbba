//! `RUN/tb/events.out.tfevents.*`: a run's metrics as TensorBoard event files, so that
//! `tensorboard --logdir runs` shows the curves `vlp plot` draws.
//!
//! An event file is a TFRecord stream of `Event` protocol buffers. Both formats are small
//! and fixed, so they are written by hand here rather than through a protobuf and a
//! TensorFlow crate: a record is `u64` length (little-endian), the masked CRC-32C of the
//! length, the data, the masked CRC-32C of the data; an `Event` is `wall_time` (field 1,
//! double), `step` (2, int64), `file_version` (3, string), `summary` (5: `Summary.value`
//! entries, field 1, of `tag` (1, string) and `simple_value` (2, float)) and `session_log`
//! (7: `status`, field 1).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::TrainError;

type Result<T> = std::result::Result<T, TrainError>;

/// The folder of a run's event files.
pub const TB_DIR: &str = "tb";
/// What every event file's name starts with (TensorBoard finds the files by it).
const FILE_PREFIX: &str = "events.out.tfevents.";
/// The version string of the first event of a file: the event format TensorBoard reads.
const FILE_VERSION: &str = "brain.Event:2";
/// `SessionLog.status` START: a (re)start of the run at the event's step.
const SESSION_START: u64 = 1;

/// Appends scalar events to one new event file in `RUN/tb`.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// Starts a new event file in `dir`. A fresh run (`resume_step` None) first removes
    /// the event files of an earlier start, as `metrics.jsonl` starts empty. A resumed run
    /// keeps them and marks its start at `resume_step + 1`: TensorBoard then drops the
    /// older files' events from that step on (those the interrupted run logged after its
    /// checkpoint), so the curves read as one uninterrupted run, like `metrics.jsonl`.
    pub fn create(dir: &Path, resume_step: Option<u64>) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let existing = event_files(dir)?;
        if resume_step.is_none() {
            for old in &existing {
                std::fs::remove_file(old).map_err(|e| TrainError::io(old, e))?;
            }
        }
        // TensorBoard reads a folder's files in name order: a later start must sort after
        // every earlier one even within the same second (the name's time is in seconds).
        let newest = existing
            .iter()
            .filter_map(|p| file_time(p))
            .max()
            .map_or(0, |t| t + 1);
        let secs = unix_now().as_secs().max(newest);
        let path = dir.join(format!("{FILE_PREFIX}{secs:010}.{}", host_for_name()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| TrainError::io(&path, e))?;
        let mut writer = EventWriter { path, file };
        let wall_time = unix_now().as_secs_f64();
        writer.write_event(&Event {
            wall_time,
            file_version: Some(FILE_VERSION),
            ..Event::default()
        })?;
        if let Some(step) = resume_step {
            writer.write_event(&Event {
                wall_time,
                step: step + 1,
                session_start: true,
                ..Event::default()
            })?;
        }
        Ok(writer)
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event of `step` holding each (tag, value) as a scalar.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f32)]) -> Result<()> {
        self.write_event(&Event {
            wall_time: unix_now().as_secs_f64(),
            step,
            scalars,
            ..Event::default()
        })
    }

    fn write_event(&mut self, event: &Event) -> Result<()> {
        // One write per record, unbuffered: TensorBoard reads the file while it grows.
        self.file
            .write_all(&record(&event.encode()))
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// The event files in `dir`, in name order.
fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))? {
        let path = entry.map_err(|e| TrainError::io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(FILE_PREFIX) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The seconds in an event file's name (`events.out.tfevents.SECS.HOST`).
fn file_time(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    name.strip_prefix(FILE_PREFIX)?
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn unix_now() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// This machine's name as it may stand in a file name (TensorBoard's writers put it there
/// to keep the files of several machines apart).
fn host_for_name() -> String {
    let host: String = crate::run_lock::hostname()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .collect();
    if host.is_empty() {
        "localhost".into()
    } else {
        host
    }
}

/// The fields of an `Event` that vlp writes.
#[derive(Default)]
struct Event<'a> {
    wall_time: f64,
    step: u64,
    file_version: Option<&'a str>,
    scalars: &'a [(&'a str, f32)],
    session_start: bool,
}

impl Event<'_> {
    /// The protobuf encoding, fields in number order and zero values left out, as
    /// protobuf's own encoders write them.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        key(&mut out, 1, WIRE_FIXED64);
        out.extend_from_slice(&self.wall_time.to_le_bytes());
        if self.step != 0 {
            key(&mut out, 2, WIRE_VARINT);
            varint(&mut out, self.step);
        }
        if let Some(version) = self.file_version {
            bytes_field(&mut out, 3, version.as_bytes());
        }
        if !self.scalars.is_empty() {
            let mut summary = Vec::new();
            for (tag, value) in self.scalars {
                let mut v = Vec::new();
                bytes_field(&mut v, 1, tag.as_bytes());
                key(&mut v, 2, WIRE_FIXED32);
                v.extend_from_slice(&value.to_le_bytes());
                bytes_field(&mut summary, 1, &v);
            }
            bytes_field(&mut out, 5, &summary);
        }
        if self.session_start {
            let mut log = Vec::new();
            key(&mut log, 1, WIRE_VARINT);
            varint(&mut log, SESSION_START);
            bytes_field(&mut out, 7, &log);
        }
        out
    }
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn key(out: &mut Vec<u8>, field: u64, wire: u8) {
    varint(out, (field << 3) | u64::from(wire));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, data: &[u8]) {
    key(out, field, WIRE_LEN);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// One TFRecord: length, its masked CRC, the data, its masked CRC.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// TFRecord's checksum: CRC-32C rotated and offset, because a CRC of data that holds CRCs
/// is weak.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn crc32c_matches_the_castagnoli_check_value() {
        // The standard check value of CRC-32C (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// The bytes TensorBoard's own `RecordWriter` writes for these three events (its
    /// `event_pb2.Event(...).SerializeToString()` framed by
    /// `tensorboard.summary.writer.record_writer.RecordWriter`, tensorboard 2.18).
    #[test]
    fn records_match_tensorboards_own_writer() {
        let mut bytes = Vec::new();
        for event in [
            Event {
                wall_time: 1.5,
                file_version: Some(FILE_VERSION),
                ..Event::default()
            },
            Event {
                wall_time: 2.25,
                step: 3,
                scalars: &[("loss_itc", 0.5), ("lr", 1e-4)],
                ..Event::default()
            },
            Event {
                wall_time: 3.0,
                step: 11,
                session_start: true,
                ..Event::default()
            },
        ] {
            bytes.extend(record(&event.encode()));
        }
        assert_eq!(
            hex(&bytes),
            "1800000000000000a37f4b2209000000000000f83f1a0d627261696e2e4576656e743a322a28646c29\
             0000000000000037ff5f0009000000000000024010032a1c0a0f0a086c6f73735f69746315000000\
             3f0a090a026c721517b7d1387882991d0f000000000000006d532b09090000000000000840100b3a\
             020801a233afed"
        );
    }

    #[test]
    fn varints_take_seven_bits_a_byte() {
        for (v, expected) in [
            (0u64, "00"),
            (1, "01"),
            (127, "7f"),
            (128, "8001"),
            (300, "ac02"),
            (u64::MAX, "ffffffffffffffffff01"),
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(hex(&out), expected, "{v}");
        }
    }

    #[test]
    fn a_fresh_run_replaces_the_event_files_and_a_resume_adds_one_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let tb = dir.path().join(TB_DIR);
        let first = EventWriter::create(&tb, None).unwrap();
        let resumed = EventWriter::create(&tb, Some(4)).unwrap();
        assert!(first.path() < resumed.path(), "a resume's file sorts last");
        assert_eq!(event_files(&tb).unwrap().len(), 2);
        let fresh = EventWriter::create(&tb, None).unwrap();
        assert_eq!(event_files(&tb).unwrap(), vec![fresh.path().to_path_buf()]);
    }
}
