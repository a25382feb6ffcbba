//! The evaluation report: JSON (everything measured) and a Markdown table.

use serde_json::{json, Value};

use crate::metrics::RetrievalMetrics;
use crate::retrieval::{EvalConfig, EvalOutcome};

/// The JSON report of one evaluated set.
pub fn json_report(name: &str, outcome: &EvalOutcome, cfg: &EvalConfig) -> Value {
    json!({
        "set": name,
        "score": outcome.score.to_string(),
        "k_test": outcome.k_test,
        "itc": outcome.itc,
        "reranked": outcome.reranked,
        "phases_s": outcome.phases.iter().map(|(n, s)| (n.clone(), json!((s * 1000.0).round() / 1000.0))).collect::<serde_json::Map<_, _>>(),
        "fused_pairs": outcome.fused_pairs,
        "protocol_pairs": outcome.protocol_pairs,
        "image_states_kept": outcome.image_states_kept,
        "states_mb": (outcome.states_mb * 10.0).round() / 10.0,
        "non_finite_scores": outcome.non_finite_scores,
        "config": cfg,
    })
}

/// One Markdown table row per ranking (`itc`, then the re-ranked one), recalls x100.
pub fn markdown_table(name: &str, outcome: &EvalOutcome) -> String {
    let mut s = String::from(
        "| set | ranking | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 | mean | rsum | TR medr | IR medr |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut row = |label: &str, m: &RetrievalMetrics| {
        s.push_str(&format!(
            "| {name} | {label} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
            m.tr1, m.tr5, m.tr10, m.ir1, m.ir5, m.ir10, m.r_mean, m.rsum, m.tr_median_rank, m.ir_median_rank
        ));
    };
    row("itc", &outcome.itc);
    if let Some(r) = &outcome.reranked {
        row(&format!("{} (k={})", outcome.score, outcome.k_test), r);
    }
    s
}
