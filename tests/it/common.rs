//! Helpers shared by the integration tests: the shard and loader helpers of `vlp-data`'s
//! own tests, the path of the built `vlp` binary, and the gates of the tests that need a
//! variable (`gates`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../crates/vlp-data/tests/common/mod.rs"]
mod data;
pub use data::*;

pub mod gates;

#[allow(dead_code)]
pub fn vlp_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vlp"))
}

/// Runs `vlp args` in `cwd`, logging warnings only.
#[allow(dead_code)]
pub fn vlp(args: &[&str], cwd: &Path) -> Output {
    Command::new(vlp_bin())
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run vlp")
}

/// A process's output as text.
#[allow(dead_code)]
pub fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// A tokenizer with BERT's special-token ids (`[PAD]` 0, `[UNK]` 100, `[CLS]` 101,
/// `[SEP]` 102, `[MASK]` 103) and 200 tokens, as the checkpoint fixtures expect: the
/// emoji set's tokenizer with those ids swapped into place and the vocabulary cut at 200.
/// Written to `dir/bert-ids-tokenizer.json`.
#[allow(dead_code)]
pub fn bert_ids_tokenizer(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("shards/emoji-tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source).unwrap()).unwrap();
    let swap = |id: u64| match id {
        1..=4 => id + 99,
        100..=103 => id - 99,
        other => other,
    };
    let vocab = json["model"]["vocab"].as_object().unwrap().clone();
    let kept: serde_json::Map<String, serde_json::Value> = vocab
        .into_iter()
        .map(|(token, id)| (token, swap(id.as_u64().unwrap())))
        .filter(|(_, id)| *id < 200)
        .map(|(token, id)| (token, id.into()))
        .collect();
    json["model"]["vocab"] = kept.into();
    for added in json["added_tokens"].as_array_mut().unwrap() {
        added["id"] = swap(added["id"].as_u64().unwrap()).into();
    }
    for special in json["post_processor"]["special_tokens"]
        .as_object_mut()
        .unwrap()
        .values_mut()
    {
        special["ids"] = special["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|id| serde_json::Value::from(swap(id.as_u64().unwrap())))
            .collect();
    }
    let path = dir.join("bert-ids-tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    path
}

/// The fields of `/proc/PID/stat` after the command name (state, ppid, pgrp, ...); `None`
/// when there is no such process.
pub fn proc_stat(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: the command name may hold spaces and parentheses.
    let rest = stat.rsplit(')').next()?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Whether process `pid` is alive (a zombie waiting for its reaper is not).
pub fn alive(pid: i32) -> bool {
    proc_stat(pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
}

/// Whether a live process's command line contains `needle`.
pub fn process_running(needle: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(needle)
        })
    })
}
