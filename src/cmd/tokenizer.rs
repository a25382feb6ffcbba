//! `vlp tokenizer train`: a BERT-style WordPiece tokenizer trained on the cleaned captions
//! of shards, written as `tokenizer.json`.

use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::Context;
use vlp_data::caption::usable_captions;
use vlp_data::fields::{parse_sample, FieldsConfig};
use vlp_data::shard::read_shard;
use vlp_data::spec::expand_spec;
use vlp_data::tokenize::{train_wordpiece, TextTokenizer};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Shard spec, e.g. 'shards/train-{000000..000009}.tar'.
    pub spec: String,
    /// Where to write tokenizer.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Vocabulary size including the special tokens.
    #[arg(long, default_value_t = 2000)]
    pub vocab_size: usize,
    /// Ignore word pieces seen fewer times.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Captions are cleaned as in training (ALBEF's pre_caption) with this word limit.
    #[arg(long, default_value_t = 30)]
    pub max_words: usize,
    /// JSON field holding captions.
    #[arg(long, default_value = "caption")]
    pub caption_key: String,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    let urls = expand_spec(&args.spec)?;
    let fields = FieldsConfig {
        caption_key: args.caption_key.clone(),
        ..Default::default()
    };
    let mut captions = Vec::new();
    let mut skipped = 0u64;
    for url in &urls {
        let outcome = read_shard(url, 0, |raw| {
            match parse_sample(raw, &fields) {
                // Trained on what the loader will tokenise: usable captions, cleaned.
                Ok(s) => captions.extend(usable_captions(&s.captions, args.max_words)),
                Err(_) => skipped += 1,
            }
            ControlFlow::Continue(())
        });
        if let Some(problem) = outcome.problem {
            anyhow::bail!("{}: {}: {}", problem.url, problem.reason, problem.detail);
        }
    }
    anyhow::ensure!(!captions.is_empty(), "no caption found in {}", args.spec);
    let tokenizer = train_wordpiece(captions.iter(), args.vocab_size, args.min_frequency)?;
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    tokenizer
        .save(&args.out, true)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", args.out.display()))?;
    let check = TextTokenizer::from_file(&args.out, 30)?;
    stdoutln!(
        "trained on {} captions from {} shards ({} samples skipped); vocabulary {}; written to {}",
        captions.len(),
        urls.len(),
        skipped,
        check.vocab_size(),
        args.out.display()
    );
    Ok(())
}
