//! The import plan: which of our tensors come from which source tensors, and the report
//! that goes with it. A pure function of names and shapes, so every decision the importer
//! makes (renames, fusing, aliases, interpolation, momentum copies, what is missing,
//! unexpected or mis-shaped) is testable without a file or a tensor.

use std::collections::{BTreeMap, BTreeSet};

use super::names::{map_name, online_twin, Format, Rule};
use super::report::{Dropped, ImportReport, Mismatch, Unexpected};

/// How one of our tensors is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The source tensor as is (reshaped only when both are scalars or 1-element).
    Copy { source: String },
    /// Source tensors stacked by rows, in order (separate q/k/v -> fused qkv).
    Concat { sources: Vec<String> },
    /// A ViT position embedding resampled from a `from` x `from` patch grid to `to` x `to`
    /// (bicubic, the `[CLS]` row kept).
    Interpolate {
        source: String,
        from: usize,
        to: usize,
    },
    /// A momentum-twin tensor the source lacks: a copy of the online tensor (after that
    /// one is loaded or freshly initialised), as ALBEF initialises its twin.
    CopyOnline { online: String },
}

/// A source tensor that must equal one of ours (tied weights under a second name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasCheck {
    pub source: String,
    pub ours: String,
}

/// Everything the importer will do, and what it will report.
#[derive(Debug, Clone)]
pub struct Plan {
    pub actions: BTreeMap<String, Action>,
    pub alias_checks: Vec<AliasCheck>,
    pub report: ImportReport,
}

/// The side of a square patch grid of a `[1, 1 + n*n, D]` position embedding.
fn grid_side(shape: &[usize]) -> Option<usize> {
    let [1, tokens, _] = shape else { return None };
    let patches = tokens.checked_sub(1)?;
    let side = (patches as f64).sqrt().round() as usize;
    (side * side == patches && side > 0).then_some(side)
}

fn is_pos_embed(ours: &str) -> bool {
    ours == "visual_encoder.pos_embed" || ours == "visual_encoder_m.pos_embed"
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Plans the import of `source` (names and shapes, in the source's naming) in `format`
/// into a model whose tensors are `target` (our names and shapes) and whose text encoder
/// runs `text_layers` layers on text alone (see [`Format::describes`]).
pub fn plan(
    format: Format,
    source: &[(String, Vec<usize>)],
    target: &BTreeMap<String, Vec<usize>>,
    text_layers: usize,
) -> Plan {
    let mut report = ImportReport::new(format);
    let shapes: BTreeMap<&str, &[usize]> = source
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let has_mlm_head = source.iter().any(|(n, _)| {
        matches!(map_name(format, n), Rule::To(ref t) if t.starts_with("text_encoder.cls."))
    });

    // 1. Each source name -> our name (or a part of one, an alias, a drop).
    let mut direct: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut parts: BTreeMap<String, BTreeMap<usize, (usize, String)>> = BTreeMap::new();
    let mut aliases: Vec<AliasCheck> = Vec::new();
    for (name, _) in source {
        match map_name(format, name) {
            Rule::To(ours) => direct.entry(ours).or_default().push(name.clone()),
            Rule::Part {
                to,
                index,
                parts: n,
            } => {
                parts
                    .entry(to)
                    .or_default()
                    .insert(index, (n, name.clone()));
            }
            Rule::Alias { of } => aliases.push(AliasCheck {
                source: name.clone(),
                ours: of,
            }),
            Rule::Drop(reason) => report.dropped.push(Dropped {
                source: name.clone(),
                reason: reason.to_string(),
            }),
            Rule::Unknown => report.unexpected.push(Unexpected {
                source: name.clone(),
                ours: None,
            }),
        }
    }

    // 2. Candidate actions with the shape each would produce.
    let mut candidates: BTreeMap<String, (Action, Vec<usize>, Vec<String>)> = BTreeMap::new();
    for (ours, sources) in direct {
        if sources.len() > 1 {
            // Two source names for one of ours (e.g. `LayerNorm.gamma` and `.weight`).
            for s in &sources[1..] {
                report.unexpected.push(Unexpected {
                    source: s.clone(),
                    ours: Some(format!("{ours} (already loaded from {})", sources[0])),
                });
            }
        }
        let s = sources[0].clone();
        let shape = shapes[s.as_str()].to_vec();
        candidates.insert(ours, (Action::Copy { source: s.clone() }, shape, vec![s]));
    }
    for (ours, blocks) in parts {
        let n = blocks.values().next().map(|(n, _)| *n).unwrap_or(0);
        let sources: Vec<String> = blocks.values().map(|(_, s)| s.clone()).collect();
        if blocks.len() != n || (0..n).any(|i| !blocks.contains_key(&i)) {
            let have: Vec<_> = sources.iter().map(String::as_str).collect();
            report.notes.push(format!(
                "{ours}: fused from {n} parts but the checkpoint has only {}",
                have.join(", ")
            ));
            for s in sources {
                report.unexpected.push(Unexpected {
                    source: s,
                    ours: Some(format!("part of {ours}, whose other parts are absent")),
                });
            }
            continue;
        }
        let part_shapes: Vec<&[usize]> = sources.iter().map(|s| shapes[s.as_str()]).collect();
        let rest = &part_shapes[0][1..];
        if part_shapes.iter().any(|p| p.is_empty() || &p[1..] != rest) {
            report.mismatched.push(Mismatch {
                ours: ours.clone(),
                source: sources.join(" + "),
                source_shape: part_shapes[0].to_vec(),
                expected_shape: target.get(&ours).cloned().unwrap_or_default(),
                why: "the parts to fuse differ in shape".into(),
            });
            continue;
        }
        let mut shape = part_shapes[0].to_vec();
        shape[0] = part_shapes.iter().map(|p| p[0]).sum();
        candidates.insert(
            ours,
            (
                Action::Concat {
                    sources: sources.clone(),
                },
                shape,
                sources,
            ),
        );
    }

    // 3. Check each candidate against the target model.
    let mut actions = BTreeMap::new();
    for (ours, (action, shape, sources)) in candidates {
        let Some(expected) = target.get(&ours) else {
            for s in sources {
                report.unexpected.push(Unexpected {
                    source: s,
                    ours: Some(format!("{ours}, which the target model does not have")),
                });
            }
            continue;
        };
        if &shape == expected
            || (numel(&shape) == 1
                && numel(expected) == 1
                && shape.len() <= 1
                && expected.len() <= 1)
        {
            actions.insert(ours.clone(), action);
            report.loaded.push(ours);
            continue;
        }
        if is_pos_embed(&ours) {
            if let (Some(from), Some(to), Action::Copy { source }) =
                (grid_side(&shape), grid_side(expected), &action)
            {
                if shape[2] == expected[2] {
                    report.notes.push(format!(
                        "{ours}: position embeddings interpolated from a {from}x{from} to a \
                         {to}x{to} patch grid (bicubic, [CLS] kept)"
                    ));
                    actions.insert(
                        ours.clone(),
                        Action::Interpolate {
                            source: source.clone(),
                            from,
                            to,
                        },
                    );
                    report.loaded.push(ours);
                    continue;
                }
            }
        }
        report.mismatched.push(Mismatch {
            ours: ours.clone(),
            source: sources.join(" + "),
            source_shape: shape,
            expected_shape: expected.clone(),
            why: String::new(),
        });
    }

    // 4. Aliases: checked against the tensor they duplicate; if that one is absent from
    // the checkpoint, the alias supplies it.
    let mut alias_checks = Vec::new();
    for alias in aliases {
        let shape = shapes[alias.source.as_str()];
        if actions.contains_key(&alias.ours) {
            report.dropped.push(Dropped {
                source: alias.source.clone(),
                reason: format!("tied to {} (checked equal)", alias.ours),
            });
            alias_checks.push(alias);
        } else if report.mismatched.iter().any(|m| m.ours == alias.ours) {
            report.dropped.push(Dropped {
                source: alias.source,
                reason: "tied to a tensor that does not fit (see mismatched)".into(),
            });
        } else if let Some(expected) = target.get(&alias.ours) {
            if shape == expected.as_slice() {
                let action = Action::Copy {
                    source: alias.source,
                };
                actions.insert(alias.ours.clone(), action);
                report.loaded.push(alias.ours);
            } else {
                report.mismatched.push(Mismatch {
                    ours: alias.ours,
                    source: alias.source,
                    source_shape: shape.to_vec(),
                    expected_shape: expected.clone(),
                    why: String::new(),
                });
            }
        } else {
            report.unexpected.push(Unexpected {
                source: alias.source,
                ours: Some(format!(
                    "{}, which the target model does not have",
                    alias.ours
                )),
            });
        }
    }

    // 5. What the checkpoint did not supply: missing, a momentum copy, or fresh.
    let mismatched: BTreeSet<String> = report.mismatched.iter().map(|m| m.ours.clone()).collect();
    for ours in target.keys() {
        if actions.contains_key(ours) || mismatched.contains(ours) {
            continue;
        }
        if format.describes(ours, has_mlm_head, text_layers) {
            report.missing.push(ours.clone());
            continue;
        }
        match online_twin(ours) {
            Some(online) if target.get(&online) == target.get(ours) => {
                actions.insert(ours.clone(), Action::CopyOnline { online });
                report.momentum_copied.push(ours.clone());
            }
            _ => report.fresh.push(ours.clone()),
        }
    }
    report.sort();
    Plan {
        actions,
        alias_checks,
        report,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(items: &[(&str, &[usize])]) -> BTreeMap<String, Vec<usize>> {
        items
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect()
    }

    fn src(items: &[(&str, &[usize])]) -> Vec<(String, Vec<usize>)> {
        items
            .iter()
            .map(|(n, s)| (n.to_string(), s.to_vec()))
            .collect()
    }

    #[test]
    fn hf_vit_qkv_is_fused_and_the_rest_is_fresh_or_copied() {
        let target = spec(&[
            ("visual_encoder.blocks.0.attn.qkv.weight", &[24, 8]),
            ("visual_encoder_m.blocks.0.attn.qkv.weight", &[24, 8]),
            ("vision_proj.weight", &[4, 8]),
        ]);
        let source = src(&[
            ("encoder.layer.0.attention.attention.value.weight", &[8, 8]),
            ("encoder.layer.0.attention.attention.query.weight", &[8, 8]),
            ("encoder.layer.0.attention.attention.key.weight", &[8, 8]),
            ("pooler.dense.weight", &[8, 8]),
        ]);
        let p = plan(Format::HfVit, &source, &target, 1);
        assert_eq!(
            p.actions["visual_encoder.blocks.0.attn.qkv.weight"],
            Action::Concat {
                sources: vec![
                    "encoder.layer.0.attention.attention.query.weight".into(),
                    "encoder.layer.0.attention.attention.key.weight".into(),
                    "encoder.layer.0.attention.attention.value.weight".into(),
                ]
            }
        );
        assert_eq!(
            p.actions["visual_encoder_m.blocks.0.attn.qkv.weight"],
            Action::CopyOnline {
                online: "visual_encoder.blocks.0.attn.qkv.weight".into()
            }
        );
        let r = &p.report;
        assert_eq!(r.fresh, vec!["vision_proj.weight".to_string()]);
        assert!(r.missing.is_empty() && r.unexpected.is_empty() && r.mismatched.is_empty());
        assert_eq!(r.dropped.len(), 1);
        assert!(r.is_ok(false));
    }

    #[test]
    fn incomplete_qkv_and_wrong_shapes_are_reported() {
        let target = spec(&[
            ("visual_encoder.blocks.0.attn.qkv.weight", &[24, 8]),
            ("visual_encoder.norm.weight", &[8]),
        ]);
        let source = src(&[
            ("encoder.layer.0.attention.attention.query.weight", &[8, 8]),
            ("encoder.layer.0.attention.attention.key.weight", &[8, 8]),
            ("layernorm.weight", &[9]),
            ("encoder.layer.0.bogus.weight", &[8]),
        ]);
        let r = plan(Format::HfVit, &source, &target, 1).report;
        assert_eq!(r.missing, vec!["visual_encoder.blocks.0.attn.qkv.weight"]);
        assert_eq!(r.mismatched.len(), 1);
        assert_eq!(r.mismatched[0].ours, "visual_encoder.norm.weight");
        assert_eq!(r.mismatched[0].source_shape, vec![9]);
        assert_eq!(r.unexpected.len(), 3);
        assert!(!r.is_ok(false));
        assert!(r.is_ok(true));
    }

    #[test]
    fn position_embeddings_are_interpolated_between_square_grids() {
        let target = spec(&[("visual_encoder.pos_embed", &[1, 37, 8])]);
        let p = plan(
            Format::TimmVit,
            &src(&[("pos_embed", &[1, 17, 8])]),
            &target,
            1,
        );
        assert_eq!(
            p.actions["visual_encoder.pos_embed"],
            Action::Interpolate {
                source: "pos_embed".into(),
                from: 4,
                to: 6
            }
        );
        assert_eq!(p.report.notes.len(), 1);
        assert!(p.report.is_ok(false));
        // A different width cannot be interpolated.
        let p = plan(
            Format::TimmVit,
            &src(&[("pos_embed", &[1, 17, 4])]),
            &target,
            1,
        );
        assert_eq!(p.report.mismatched.len(), 1);
    }

    #[test]
    fn aliases_are_checked_not_loaded_and_scalars_reshape() {
        let target = spec(&[
            (
                "text_encoder.bert.embeddings.word_embeddings.weight",
                &[10, 4],
            ),
            ("text_encoder.cls.predictions.bias", &[10]),
            ("temp", &[]),
        ]);
        let source = src(&[
            (
                "text_encoder.bert.embeddings.word_embeddings.weight",
                &[10, 4],
            ),
            ("text_encoder.cls.predictions.decoder.weight", &[10, 4]),
            ("text_encoder.cls.predictions.bias", &[10]),
            ("text_encoder.cls.predictions.decoder.bias", &[10]),
            ("text_encoder.bert.embeddings.position_ids", &[1, 32]),
            ("temp", &[1]),
        ]);
        let p = plan(Format::AlbefPth, &source, &target, 1);
        assert_eq!(p.alias_checks.len(), 2);
        assert_eq!(p.report.loaded.len(), 3);
        assert!(p.report.is_clean(), "{}", p.report);
    }

    #[test]
    fn bert_into_albef_leaves_cross_attention_fresh_and_reports_extra_layers() {
        let target = spec(&[
            (
                "text_encoder.bert.encoder.layer.0.attention.self.query.weight",
                &[4, 4],
            ),
            (
                "text_encoder.bert.encoder.layer.0.crossattention.self.key.weight",
                &[4, 6],
            ),
            ("text_encoder.cls.predictions.bias", &[10]),
        ]);
        let source = src(&[
            ("bert.encoder.layer.0.attention.self.query.weight", &[4, 4]),
            ("bert.encoder.layer.1.attention.self.query.weight", &[4, 4]),
        ]);
        let r = plan(Format::HfBert, &source, &target, 1).report;
        assert_eq!(r.loaded.len(), 1);
        assert!(r.missing.is_empty());
        assert_eq!(r.fresh.len(), 2, "cross-attention and the MLM head: {r}");
        assert_eq!(r.unexpected.len(), 1);
        assert!(r.unexpected[0].ours.as_deref().unwrap().contains("layer.1"));
    }

    #[test]
    fn a_shallow_bert_misses_text_layers_but_not_fusion_layers() {
        let q =
            |j: usize| format!("text_encoder.bert.encoder.layer.{j}.attention.self.query.weight");
        let target: BTreeMap<String, Vec<usize>> = (0..4).map(|j| (q(j), vec![4, 4])).collect();
        let source = src(&[("encoder.layer.0.attention.self.query.weight", &[4, 4])]);
        // Text layers 0 and 1: layer 1 is missing. Fusion layers 2 and 3: fresh.
        let r = plan(Format::HfBert, &source, &target, 2).report;
        assert_eq!(r.missing, vec![q(1)]);
        assert_eq!(r.fresh, vec![q(2), q(3)]);
    }
}
