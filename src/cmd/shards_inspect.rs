//! `vlp shards inspect`: counts, extensions, a decode check of every image, bad samples by
//! reason — per shard and in total.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use vlp_data::caption::usable_captions;
use vlp_data::fields::{parse_sample, FieldsConfig};
use vlp_data::image_ops::{decode_rgb, DecodeError};
use vlp_data::shard::read_shard;
use vlp_data::spec::expand_spec;
use vlp_data::stats::{SkipCounts, SkipReason};

#[derive(clap::Args)]
pub struct InspectArgs {
    /// Shard spec, e.g. 'shards/train-{000000..000009}.tar'.
    pub spec: String,
    /// Only read headers and fields; do not decode images.
    #[arg(long)]
    pub no_decode: bool,
    /// Images with more pixels count as `image_too_large`.
    #[arg(long, default_value_t = vlp_core::MAX_IMAGE_PIXELS)]
    pub max_pixels: u64,
    /// JSON field holding captions.
    #[arg(long, default_value = "caption")]
    pub caption_key: String,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// List up to this many bad samples (shard, key, reason).
    #[arg(long, default_value_t = 20)]
    pub show_bad: usize,
}

#[derive(Default, serde::Serialize)]
struct ShardReport {
    shard: String,
    samples: u64,
    good: u64,
    captions: u64,
    image_ids: u64,
    extensions: BTreeMap<String, u64>,
    skipped: SkipCounts,
    image_sizes: Option<(u32, u32, u32, u32)>,
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let urls = expand_spec(&args.spec)?;
    let fields = FieldsConfig {
        caption_key: args.caption_key.clone(),
        ..Default::default()
    };
    let mut reports = Vec::new();
    let mut bad = Vec::new();
    for url in &urls {
        let mut r = ShardReport {
            shard: url.to_string(),
            ..Default::default()
        };
        let mut ids = std::collections::HashSet::new();
        let mut note_bad = |reason: SkipReason, key: &str, detail: String, r: &mut ShardReport| {
            r.skipped.add(reason);
            if bad.len() < args.show_bad {
                bad.push(format!("{url} {key}: {reason}: {detail}"));
            }
        };
        let outcome = read_shard(url, 0, |raw| {
            r.samples += 1;
            for (ext, _) in &raw.fields {
                *r.extensions.entry(ext.clone()).or_default() += 1;
            }
            match parse_sample(raw, &fields) {
                Err(skip) => note_bad(skip.reason, &skip.key, skip.detail, &mut r),
                Ok(s) => {
                    // The loader's caption rule, so that `good` counts what training can
                    // use. Usability does not depend on the word limit, hence none here.
                    let usable = usable_captions(&s.captions, usize::MAX).len() as u64;
                    if usable == 0 {
                        note_bad(
                            SkipReason::MissingCaption,
                            &s.key,
                            "no caption is left after cleaning (punctuation or whitespace only)"
                                .into(),
                            &mut r,
                        );
                        return ControlFlow::Continue(());
                    }
                    let checked = if args.no_decode {
                        Ok(())
                    } else {
                        decode_rgb(&s.image_bytes, args.max_pixels).map(|img| {
                            let (w, h) = img.dimensions();
                            r.image_sizes = Some(match r.image_sizes {
                                None => (w, w, h, h),
                                Some((a, b, c, d)) => (a.min(w), b.max(w), c.min(h), d.max(h)),
                            });
                        })
                    };
                    match checked {
                        Ok(()) => {
                            r.good += 1;
                            r.captions += usable;
                            ids.insert(s.image_id);
                        }
                        Err(e @ DecodeError::TooLarge { .. }) => {
                            note_bad(SkipReason::ImageTooLarge, &s.key, e.to_string(), &mut r)
                        }
                        Err(e) => note_bad(SkipReason::BadImage, &s.key, e.to_string(), &mut r),
                    }
                }
            }
            ControlFlow::Continue(())
        });
        if let Some(problem) = outcome.problem {
            note_bad(problem.reason, "-", problem.detail, &mut r);
        }
        r.image_ids = ids.len() as u64;
        reports.push(r);
    }
    let mut total = ShardReport {
        shard: format!("total ({} shards)", reports.len()),
        ..Default::default()
    };
    for r in &reports {
        total.samples += r.samples;
        total.good += r.good;
        total.captions += r.captions;
        total.image_ids += r.image_ids;
        total.skipped.merge(&r.skipped);
        for (e, n) in &r.extensions {
            *total.extensions.entry(e.clone()).or_default() += n;
        }
    }
    // A spec whose shards are all missing (a typo, an unmounted disk) must not look like a
    // successful check of an empty dataset to a script.
    let unreadable = if reports.iter().all(|r| r.samples == 0) {
        Err(anyhow::anyhow!(
            "none of the {} shards gave a sample (skipped: {}); check the spec `{}`",
            reports.len(),
            total.skipped,
            args.spec
        ))
    } else {
        Ok(())
    };
    if args.json {
        let out = serde_json::json!({"shards": reports, "total": total, "bad": bad});
        stdoutln!("{out}");
        return unreadable;
    }
    stdoutln!(
        "{:<48} {:>8} {:>8} {:>9}  extensions / skipped",
        "shard",
        "samples",
        "good",
        "captions"
    );
    for r in reports.iter().chain(std::iter::once(&total)) {
        let exts: Vec<String> = r
            .extensions
            .iter()
            .map(|(e, n)| format!("{e}:{n}"))
            .collect();
        stdoutln!(
            "{:<48} {:>8} {:>8} {:>9}  {} / {}",
            r.shard,
            r.samples,
            r.good,
            r.captions,
            exts.join(" "),
            r.skipped
        );
    }
    if let Some((w0, w1, h0, h1)) = reports
        .iter()
        .filter_map(|r| r.image_sizes)
        .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1), a.2.min(b.2), a.3.max(b.3)))
    {
        stdoutln!("image widths {w0}..{w1}, heights {h0}..{h1}");
    }
    for line in &bad {
        stdoutln!("bad: {line}");
    }
    unreadable
}
