//! Resuming a run whose data moved: what differs between the checkpoint's recipe and the
//! given one, and `--resume-moved`, which takes the given recipe's locations once it has
//! checked that they hold the same shard files (by name, in order).

use std::path::Path;

use serde_json::Value;
use vlp_data::spec::{expand_spec, ShardUrl};

use crate::error::TrainError;
use crate::recipe::Recipe;

type Result<T> = std::result::Result<T, TrainError>;

/// The recipe keys that name where data lives, not what it is: the only ones
/// `--resume-moved` takes from the given recipe.
pub const LOCATIONS: [&str; 3] = ["data.shards", "data.tokenizer", "eval.sets"];

/// Every key whose value differs between `saved` and `given`, as `key (checkpoint X,
/// given Y)`, in key order.
pub fn differences(saved: &Recipe, given: &Recipe) -> Vec<String> {
    let (a, b) = (to_value(saved), to_value(given));
    let mut out = Vec::new();
    diff("", &a, &b, &mut out);
    out
}

fn to_value(r: &Recipe) -> Value {
    serde_json::to_value(r).unwrap_or(Value::Null)
}

fn diff(key: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let sub = if key.is_empty() {
                    k.clone()
                } else {
                    format!("{key}.{k}")
                };
                diff(
                    &sub,
                    x.get(k).unwrap_or(&Value::Null),
                    y.get(k).unwrap_or(&Value::Null),
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{key} (checkpoint {a}, given {b})")),
        _ => {}
    }
}

/// Takes `given`'s data locations into `saved` (the checkpoint's recipe), after checking
/// that each names the same shard files, by file name and in order, as the one it
/// replaces: the loader's position in the checkpoint is then valid at the new place.
pub fn take_locations(saved: &mut Recipe, given: &Recipe) -> Result<()> {
    same_files("data.shards", &saved.data.shards, &given.data.shards)?;
    if let (Some(old), Some(new)) = (&saved.eval, &given.eval) {
        let names = |e: &crate::recipe::EvalSection| -> Vec<String> {
            e.sets.iter().map(|s| s.name.clone()).collect()
        };
        if names(old) != names(new) {
            return Err(moved("eval.sets", "the given recipe names other eval sets"));
        }
        for (o, n) in old.sets.iter().zip(&new.sets) {
            same_files(&format!("eval.sets `{}`", o.name), &o.shards, &n.shards)?;
        }
    }
    let file = |p: &Option<std::path::PathBuf>| {
        p.as_deref().and_then(Path::file_name).map(|n| n.to_owned())
    };
    let shown = |p: &Option<std::path::PathBuf>| {
        p.as_deref().map_or_else(
            || "the init's tokenizer".to_string(),
            |p| p.display().to_string(),
        )
    };
    if given.data.tokenizer.is_some() && file(&saved.data.tokenizer) != file(&given.data.tokenizer)
    {
        return Err(moved(
            "data.tokenizer",
            format!(
                "{} is another file than {}",
                shown(&given.data.tokenizer),
                shown(&saved.data.tokenizer)
            ),
        ));
    }
    // Only names can be compared: the files at the old place are gone. That they hold
    // the same bytes is the caller's word, as the flag's name says.
    tracing::info!(
        "--resume-moved: data.shards {} (was {}; the same file names in the same order, \
         taken to be the same files)",
        given.data.shards,
        saved.data.shards
    );
    saved.data.shards = given.data.shards.clone();
    if given.data.tokenizer.is_some() {
        saved.data.tokenizer = given.data.tokenizer.clone();
    }
    if let (Some(old), Some(new)) = (&mut saved.eval, &given.eval) {
        for (o, n) in old.sets.iter_mut().zip(&new.sets) {
            o.shards = n.shards.clone();
        }
    }
    Ok(())
}

/// Checks that the specs `old` and `new` name the same files (the last path component
/// of each, or the command of a `pipe:`), in the same order.
fn same_files(key: &str, old: &str, new: &str) -> Result<()> {
    let list = |spec: &str| -> Result<Vec<String>> {
        Ok(expand_spec(spec)
            .map_err(|e| moved(key, format!("{spec}: {e}")))?
            .iter()
            .map(|u| match u {
                ShardUrl::Local(p) => p.file_name().map_or_else(
                    || p.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                ),
                ShardUrl::Pipe(c) => c.clone(),
            })
            .collect())
    };
    let (a, b) = (list(old)?, list(new)?);
    if a != b {
        let first = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len()));
        return Err(moved(
            key,
            format!(
                "{new} names {} shards and {old} {}; they first differ at shard {first} ({} vs {})",
                b.len(),
                a.len(),
                b.get(first).map_or("none", String::as_str),
                a.get(first).map_or("none", String::as_str)
            ),
        ));
    }
    Ok(())
}

fn moved(key: &str, why: impl Into<String>) -> TrainError {
    TrainError::Recipe(format!(
        "--resume-moved: {key}: {}; it takes new locations of the same files only",
        why.into()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(shards: &str, lr: &str) -> Recipe {
        Recipe::from_str_with(
            &format!(
                "[model]\npreset = \"tiny\"\n[data]\nshards = \"{shards}\"\ntokenizer = \
                 \"a/t.json\"\nbatch_size = 2\n[optim]\nlr = {lr}\nmin_lr = 0.0\nwarmup_lr = \
                 0.0\nwarmup_steps = 0\nweight_decay = 0.0\ntotal_steps = 9\n[run]\nout_dir = \
                 \"r\"\n"
            ),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn the_keys_that_differ_are_named_with_both_values() {
        let d = differences(
            &recipe("a/x-{0..1}.tar", "1e-4"),
            &recipe("b/x-{0..1}.tar", "2e-4"),
        );
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].starts_with("data.shards (checkpoint \"a/x-{0..1}.tar\""),
            "{d:?}"
        );
        assert!(d[1].starts_with("optim.lr"), "{d:?}");
    }

    #[test]
    fn moved_shards_are_taken_only_when_they_are_the_same_files() {
        let mut saved = recipe("/old/x-{0..3}.tar", "1e-4");
        let moved = recipe("/new/place/x-{0..3}.tar", "1e-4");
        take_locations(&mut saved, &moved).unwrap();
        assert_eq!(saved.data.shards, "/new/place/x-{0..3}.tar");
        let mut saved = recipe("/old/x-{0..3}.tar", "1e-4");
        let other = recipe("/new/x-{0..4}.tar", "1e-4");
        let err = take_locations(&mut saved, &other).unwrap_err().to_string();
        assert!(
            err.contains("names 5 shards") && err.contains("shard 4"),
            "{err}"
        );
        let renamed = recipe("/new/y-{0..3}.tar", "1e-4");
        let err = take_locations(&mut saved, &renamed)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shard 0 (y-0.tar vs x-0.tar)"), "{err}");
    }
}
