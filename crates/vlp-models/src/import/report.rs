//! What an import did: every one of our tensors is loaded, missing, mis-shaped, a copy of
//! its online twin, or freshly initialised; every source tensor is used, dropped for a
//! stated reason, or unexpected.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use super::names::Format;

/// A source tensor with no place in our model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unexpected {
    pub source: String,
    /// Where it would have gone, when the name is known but the target lacks it.
    pub ours: Option<String>,
}

/// A source tensor whose shape does not fit ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub ours: String,
    pub source: String,
    pub source_shape: Vec<usize>,
    pub expected_shape: Vec<usize>,
    pub why: String,
}

/// An architecture setting the checkpoint's own config gives differently from the target
/// config, where tensor shapes cannot show it (head count, activation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConfigMismatch {
    pub key: String,
    pub checkpoint: String,
    pub target: String,
}

/// A known source tensor deliberately not imported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dropped {
    pub source: String,
    pub reason: String,
}

/// The outcome of an import, name by name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImportReport {
    pub format: Format,
    /// Our tensors filled from the checkpoint.
    pub loaded: Vec<String>,
    /// Our tensors this format carries but the checkpoint lacks (freshly initialised;
    /// an error unless partial imports are allowed).
    pub missing: Vec<String>,
    /// Source tensors with no place in our model (an error unless partial).
    pub unexpected: Vec<Unexpected>,
    /// Source tensors of the wrong shape (an error unless partial; ours stays fresh).
    pub mismatched: Vec<Mismatch>,
    /// Settings of the checkpoint's config that differ from the target's (an error
    /// unless partial).
    pub config_mismatches: Vec<ConfigMismatch>,
    /// Our tensors this format does not carry: freshly initialised.
    pub fresh: Vec<String>,
    /// Our tensors kept from the initial model (`--init`) because the checkpoint does not
    /// carry them.
    pub kept: Vec<String>,
    /// Momentum-twin tensors set to a copy of their online twin.
    pub momentum_copied: Vec<String>,
    /// Source tensors not imported on purpose (poolers, classifier heads, tied aliases,
    /// `position_ids`).
    pub dropped: Vec<Dropped>,
    /// Everything else worth knowing (interpolation, dtype conversion, config values).
    pub notes: Vec<String>,
}

impl ImportReport {
    pub fn new(format: Format) -> Self {
        Self {
            format,
            loaded: Vec::new(),
            missing: Vec::new(),
            unexpected: Vec::new(),
            mismatched: Vec::new(),
            config_mismatches: Vec::new(),
            fresh: Vec::new(),
            kept: Vec::new(),
            momentum_copied: Vec::new(),
            dropped: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Whether the import may be written: nothing missing, unexpected or mis-shaped,
    /// unless `allow_partial`.
    pub fn is_ok(&self, allow_partial: bool) -> bool {
        allow_partial
            || (self.missing.is_empty()
                && self.unexpected.is_empty()
                && self.mismatched.is_empty()
                && self.config_mismatches.is_empty())
    }

    /// The whole model came from the checkpoint: nothing missing, unexpected, mis-shaped,
    /// fresh, kept or copied.
    pub fn is_clean(&self) -> bool {
        self.is_ok(false)
            && self.fresh.is_empty()
            && self.kept.is_empty()
            && self.momentum_copied.is_empty()
    }

    pub(crate) fn sort(&mut self) {
        self.loaded.sort();
        self.missing.sort();
        self.fresh.sort();
        self.momentum_copied.sort();
        self.unexpected.sort_by(|a, b| a.source.cmp(&b.source));
        self.mismatched.sort_by(|a, b| a.ours.cmp(&b.ours));
        self.dropped.sort_by(|a, b| a.source.cmp(&b.source));
    }
}

/// Groups names that differ only in a layer index: `a.blocks.{0-11}.attn.*` (n).
pub fn summarize(names: &[String]) -> Vec<String> {
    let mut groups: BTreeMap<String, (Vec<usize>, usize)> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for name in names {
        let segs: Vec<&str> = name.split('.').collect();
        let key_and_index = segs
            .iter()
            .position(|s| s.parse::<usize>().is_ok())
            .map(|i| {
                let head = segs[..i].join(".");
                let next = segs.get(i + 1).copied().unwrap_or("");
                let tail = if segs.len() > i + 2 { ".*" } else { "" };
                (
                    format!("{head}.{{}}.{next}{tail}"),
                    segs[i].parse::<usize>().unwrap_or(0),
                )
            });
        let (key, index) = match key_and_index {
            Some((k, i)) => (k, Some(i)),
            None => (name.clone(), None),
        };
        let entry = groups.entry(key.clone()).or_insert_with(|| {
            order.push(key.clone());
            (Vec::new(), 0)
        });
        if let Some(i) = index {
            if !entry.0.contains(&i) {
                entry.0.push(i);
            }
        }
        entry.1 += 1;
    }
    order
        .into_iter()
        .map(|key| {
            let (mut idx, count) = groups.remove(&key).unwrap_or_default();
            if idx.is_empty() {
                return key;
            }
            idx.sort_unstable();
            let contiguous = idx.windows(2).all(|w| w[1] == w[0] + 1);
            let range = match (idx.len(), contiguous) {
                (1, _) => idx[0].to_string(),
                (_, true) => format!("{}-{}", idx[0], idx[idx.len() - 1]),
                _ => idx
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            };
            let shown = key.replacen("{}", &format!("{{{range}}}"), 1);
            if count > 1 {
                format!("{shown} ({count})")
            } else {
                shown
            }
        })
        .collect()
}

fn shape(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "import from {}: {} loaded, {} missing, {} unexpected, {} mismatched, {} fresh, \
             {}{} momentum copies, {} dropped",
            self.format,
            self.loaded.len(),
            self.missing.len(),
            self.unexpected.len(),
            self.mismatched.len(),
            self.fresh.len(),
            if self.kept.is_empty() {
                String::new()
            } else {
                format!("{} kept, ", self.kept.len())
            },
            self.momentum_copied.len(),
            self.dropped.len()
        )?;
        let list = |f: &mut fmt::Formatter<'_>, title: &str, names: &[String]| {
            if names.is_empty() {
                return Ok(());
            }
            writeln!(f, "{title}:")?;
            for line in summarize(names) {
                writeln!(f, "  {line}")?;
            }
            Ok(())
        };
        list(
            f,
            "missing (the checkpoint should have these)",
            &self.missing,
        )?;
        if !self.unexpected.is_empty() {
            writeln!(f, "unexpected (no place in the target model):")?;
            for u in &self.unexpected {
                match &u.ours {
                    Some(ours) => writeln!(f, "  {} -> {ours}", u.source)?,
                    None => writeln!(f, "  {} (not a name of {})", u.source, self.format)?,
                }
            }
        }
        if !self.mismatched.is_empty() {
            writeln!(f, "mismatched shapes:")?;
            for m in &self.mismatched {
                write!(
                    f,
                    "  {} {} -> {} expects {}",
                    m.source,
                    shape(&m.source_shape),
                    m.ours,
                    shape(&m.expected_shape)
                )?;
                if m.why.is_empty() {
                    writeln!(f)?;
                } else {
                    writeln!(f, " ({})", m.why)?;
                }
            }
        }
        for c in &self.config_mismatches {
            writeln!(
                f,
                "config mismatch: {}: checkpoint {}, target {}",
                c.key, c.checkpoint, c.target
            )?;
        }
        list(
            f,
            "initialised fresh (the checkpoint does not carry these)",
            &self.fresh,
        )?;
        list(f, "kept from the initial model", &self.kept)?;
        if !self.momentum_copied.is_empty() {
            // One line per twin root: the names mirror the online ones listed above.
            let mut roots: BTreeMap<&str, usize> = BTreeMap::new();
            for name in &self.momentum_copied {
                *roots
                    .entry(name.split('.').next().unwrap_or(name))
                    .or_default() += 1;
            }
            let roots: Vec<String> = roots.iter().map(|(r, n)| format!("{r}.* ({n})")).collect();
            writeln!(
                f,
                "momentum twin copied from the online weights: {}",
                roots.join(", ")
            )?;
        }
        if !self.dropped.is_empty() {
            let mut by_reason: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for d in &self.dropped {
                by_reason
                    .entry(d.reason.as_str())
                    .or_default()
                    .push(d.source.clone());
            }
            writeln!(f, "dropped:")?;
            for (reason, names) in by_reason {
                writeln!(f, "  {reason}: {}", summarize(&names).join(", "))?;
            }
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_collapse_layer_indices() {
        let names: Vec<String> = (0..3)
            .flat_map(|i| {
                [
                    format!("visual_encoder.blocks.{i}.attn.qkv.weight"),
                    format!("visual_encoder.blocks.{i}.attn.qkv.bias"),
                ]
            })
            .chain([
                "temp".to_string(),
                "a.layer.1.b.c".to_string(),
                "a.layer.3.b.d".to_string(),
            ])
            .collect();
        assert_eq!(
            summarize(&names),
            vec![
                "visual_encoder.blocks.{0-2}.attn.* (6)",
                "temp",
                "a.layer.{1,3}.b.* (2)"
            ]
        );
    }

    #[test]
    fn display_lists_problems_by_name() {
        let mut r = ImportReport::new(Format::HfBert);
        r.unexpected.push(Unexpected {
            source: "foo.bar".into(),
            ours: None,
        });
        r.mismatched.push(Mismatch {
            ours: "text_encoder.bert.embeddings.word_embeddings.weight".into(),
            source: "embeddings.word_embeddings.weight".into(),
            source_shape: vec![100, 32],
            expected_shape: vec![200, 32],
            why: String::new(),
        });
        let s = r.to_string();
        assert!(s.contains("foo.bar (not a name of hf-bert)"), "{s}");
        assert!(
            s.contains("embeddings.word_embeddings.weight [100, 32] -> text_encoder.bert.embeddings.word_embeddings.weight expects [200, 32]"),
            "{s}"
        );
        assert!(!r.is_ok(false));
    }
}
