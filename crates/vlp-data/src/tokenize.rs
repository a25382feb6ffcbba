//! Captions to token ids with HF `tokenizers`: a `tokenizer.json` loaded with its own
//! padding/truncation settings overridden (truncate to `max_tokens` including `[CLS]`/`[SEP]`,
//! pad to the longest caption of the batch, as ALBEF's `tokenizer(..., padding='longest',
//! truncation=True, max_length=...)`), and a BERT-style WordPiece trainer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ahash::AHashMap;
use candle_core::{Device, Tensor};
use compact_str::CompactString;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
    PreTokenizer, Tokenizer, TruncationParams,
};

use crate::error::{DataError, Result};

/// BERT's special tokens, in the id order the trainer gives them (0..=4).
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Token ids and mask of a batch, padded to its longest caption.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedBatch {
    /// Row-major `[batch, len]`.
    pub ids: Vec<u32>,
    /// Row-major `[batch, len]`, 1 for real tokens, 0 for padding.
    pub mask: Vec<u32>,
    pub batch: usize,
    pub len: usize,
}

impl EncodedBatch {
    /// `(input_ids, attention_mask)`, both `[batch, len]` u32.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let ids = Tensor::from_slice(&self.ids, (self.batch, self.len), device)?;
        let mask = Tensor::from_slice(&self.mask, (self.batch, self.len), device)?;
        Ok((ids, mask))
    }
}

/// A tokenizer configured for vlp: truncation to `max_tokens`, padding done per batch.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    source: String,
    max_tokens: usize,
    pad_id: u32,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source)
            .field("max_tokens", &self.max_tokens)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`. Its own padding is switched off and its truncation
    /// replaced by `max_tokens` (special tokens included).
    pub fn from_file(path: impl AsRef<Path>, max_tokens: usize) -> Result<Self> {
        let path = path.as_ref();
        let source = path.display().to_string();
        if !path.exists() {
            return Err(DataError::Tokenizer {
                path: source,
                reason: "file not found".into(),
            });
        }
        let json = std::fs::read(path).map_err(|e| DataError::Tokenizer {
            path: source.clone(),
            reason: e.to_string(),
        })?;
        Self::from_json(&json, source, max_tokens)
    }

    /// A `tokenizer.json`'s content, read by the caller (`source` names it in errors).
    pub fn from_json(json: &[u8], source: String, max_tokens: usize) -> Result<Self> {
        let fail = |reason: String| DataError::Tokenizer {
            path: source.clone(),
            reason,
        };
        // JSON is UTF-8; the parser's own complaint at a stray byte names a syntax error.
        let json = std::str::from_utf8(json)
            .map_err(|e| fail(format!("not UTF-8 text (byte {})", e.valid_up_to())))?;
        let inner = Tokenizer::from_bytes(json).map_err(|e| fail(e.to_string()))?;
        Self::from_tokenizer(inner, source, max_tokens)
    }

    /// Wraps an in-memory tokenizer (e.g. one just trained).
    pub fn from_tokenizer(mut inner: Tokenizer, source: String, max_tokens: usize) -> Result<Self> {
        if max_tokens < 3 {
            return Err(DataError::config(
                "max_tokens",
                "must be at least 3 ([CLS] x [SEP])",
            ));
        }
        let pad_token = inner
            .get_padding()
            .map(|p| p.pad_token.clone())
            .unwrap_or_else(|| "[PAD]".to_string());
        let pad_id = inner
            .token_to_id(&pad_token)
            .ok_or_else(|| DataError::Tokenizer {
                path: source.clone(),
                reason: format!("no pad token `{pad_token}` in the vocabulary"),
            })?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| DataError::Tokenizer {
                path: source.clone(),
                reason: e.to_string(),
            })?;
        Ok(TextTokenizer {
            inner,
            source,
            max_tokens,
            pad_id,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token such as `[CLS]`, `[SEP]`, `[MASK]`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Ids of one caption, special tokens added, truncated.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, true)
            .map_err(|e| DataError::Tokenizer {
                path: self.source.clone(),
                reason: format!("encoding {text:?}: {e}"),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes a batch, sequentially (the loader already runs one batch per worker
    /// thread), padded to its longest caption.
    pub fn encode_batch(&self, texts: &[String]) -> Result<EncodedBatch> {
        let encoded: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| self.encode(t))
            .collect::<Result<_>>()?;
        let len = encoded.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(texts.len() * len);
        let mut mask = Vec::with_capacity(texts.len() * len);
        for row in &encoded {
            ids.extend_from_slice(row);
            ids.resize(ids.len() + len - row.len(), self.pad_id);
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.resize(mask.len() + len - row.len(), 0);
        }
        Ok(EncodedBatch {
            ids,
            mask,
            batch: texts.len(),
            len,
        })
    }
}

/// Trains a lower-casing BERT WordPiece tokenizer (`[PAD]`=0, `[UNK]`=1, `[CLS]`=2,
/// `[SEP]`=3, `[MASK]`=4; `[CLS] $A [SEP]` post-processing) on `texts`.
///
/// The same texts give the same tokenizer, byte for byte, on every run: a checkpoint
/// keeps the tokenizer it was trained with and refuses one whose content differs, and
/// training again on the same captions must not give such a one. The `tokenizers`
/// trainer alone does not: it numbers the word-continuing pieces (`##e`) in the order it
/// meets them in a randomly seeded hash map, and merges of equal counts are then chosen
/// by those numbers. Here the words are counted in order and every single-character
/// piece is numbered up front (sorted, as the trainer numbers the alphabet), so the
/// trainer meets no new piece before its merges; the vocabulary is the one it would
/// learn, in one fixed order.
pub fn train_wordpiece<I, S>(texts: I, vocab_size: usize, min_frequency: u64) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    let fail = |reason: String| DataError::Tokenizer {
        path: "<training>".into(),
        reason,
    };
    let mut tokenizer = bert_pipeline(WordPiece::default(), true).map_err(fail)?;
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for text in texts {
        for word in words_of(&tokenizer, text.as_ref()).map_err(fail)? {
            *counts.entry(word).or_default() += 1;
        }
    }
    let chars: BTreeSet<char> = counts.keys().flat_map(|w| w.chars()).collect();
    let continuing: BTreeSet<char> = counts.keys().flat_map(|w| w.chars().skip(1)).collect();
    let pieces = SPECIAL_TOKENS
        .iter()
        .map(|t| t.to_string())
        .chain(chars.iter().map(char::to_string))
        .chain(continuing.iter().map(|c| format!("{CONTINUING}{c}")))
        .map(|t| AddedToken::from(t, true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .continuing_subword_prefix(CONTINUING.into())
        .special_tokens(pieces)
        .build();
    let words: AHashMap<CompactString, u64> = counts
        .into_iter()
        .map(|(w, n)| (CompactString::from(w), n))
        .collect();
    let mut bpe = BPE::default();
    trainer
        .do_train(&words, &mut bpe)
        .map_err(|e| fail(e.to_string()))?;
    tokenizer.with_model(WordPiece::from_bpe(&bpe));
    // Only the five are special: the pieces above were numbered, not reserved.
    tokenizer
        .add_special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)))
        .map_err(|e| fail(e.to_string()))?;
    with_bert_template(tokenizer).map_err(fail)
}

/// WordPiece's prefix of a piece that continues a word.
const CONTINUING: &str = "##";

/// The words the trainer counts in `text`: normalised and pre-tokenised by the
/// tokenizer's own pipeline, as `Tokenizer::train` feeds its trainer.
fn words_of(tokenizer: &Tokenizer, text: &str) -> std::result::Result<Vec<String>, String> {
    let mut normalized = NormalizedString::from(text);
    if let Some(n) = tokenizer.get_normalizer() {
        n.normalize(&mut normalized).map_err(|e| e.to_string())?;
    }
    let mut pre = PreTokenizedString::from(normalized);
    if let Some(p) = tokenizer.get_pre_tokenizer() {
        p.pre_tokenize(&mut pre).map_err(|e| e.to_string())?;
    }
    Ok(pre
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_owned())
        .collect())
}

/// A BERT tokenizer (`tokenizer.json`'s content) from a WordPiece vocabulary (the content
/// of a `vocab.txt`, one token per line, as HF BERT checkpoints ship it; `source` names it
/// in errors): BERT's normaliser (lower-casing and accent stripping when `lowercase`),
/// pre-tokeniser and `[CLS] $A [SEP]` template, `[UNK]` for unknown words. A vocabulary
/// that is not UTF-8 or lacks `[CLS]` or `[SEP]` is an error.
pub fn wordpiece_from_vocab(vocab: &[u8], source: &Path, lowercase: bool) -> Result<Tokenizer> {
    let fail = |reason: String| DataError::Tokenizer {
        path: source.display().to_string(),
        reason,
    };
    if let Err(e) = std::str::from_utf8(vocab) {
        return Err(fail(format!("not UTF-8 text (byte {})", e.valid_up_to())));
    }
    let vocab = WordPiece::read_bytes(vocab).map_err(|e| fail(e.to_string()))?;
    let model = WordPiece::builder()
        .vocab(vocab)
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| fail(e.to_string()))?;
    let mut tokenizer = bert_pipeline(model, lowercase).map_err(fail)?;
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .filter(|t| tokenizer.token_to_id(t).is_some())
        .map(|t| AddedToken::from(*t, true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| fail(e.to_string()))?;
    with_bert_template(tokenizer).map_err(fail)
}

/// BERT's normaliser, pre-tokeniser and decoder around a WordPiece model.
fn bert_pipeline(model: WordPiece, lowercase: bool) -> std::result::Result<Tokenizer, String> {
    let mut tokenizer = Tokenizer::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
        .map_err(|e| e.to_string())?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    Ok(tokenizer)
}

/// The `[CLS] $A [SEP]` (and pair) template, with the vocabulary's ids.
fn with_bert_template(mut tokenizer: Tokenizer) -> std::result::Result<Tokenizer, String> {
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| format!("the vocabulary lacks {t}"))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let template = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .and_then(|b| b.try_pair("[CLS] $A [SEP] $B:1 [SEP]:1"))
        .map_err(|e| e.to_string())?
        .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
        .build()
        .map_err(|e| e.to_string())?;
    tokenizer.with_post_processor(Some(template));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let words = [
            "red", "blue", "circle", "square", "left", "of", "a", "large", "small",
        ];
        (0..200)
            .map(|i| {
                (0..6)
                    .map(|j| words[(i * 7 + j * 3) % words.len()])
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect()
    }

    #[test]
    fn trained_tokenizer_has_bert_specials_and_template() {
        let tok = train_wordpiece(corpus().into_iter(), 100, 1).unwrap();
        for (i, t) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(t), Some(i as u32));
        }
        let wrapped = TextTokenizer::from_tokenizer(tok, "mem".into(), 30).unwrap();
        let ids = wrapped.encode("A Red circle").unwrap();
        assert_eq!(ids.first(), Some(&2));
        assert_eq!(ids.last(), Some(&3));
        assert_eq!(ids.len(), 5, "lower-cased whole words: {ids:?}");
    }

    #[test]
    fn batch_pads_to_longest_and_truncates() {
        let tok = train_wordpiece(corpus().into_iter(), 100, 1).unwrap();
        let wrapped = TextTokenizer::from_tokenizer(tok, "mem".into(), 6).unwrap();
        let texts = ["red".to_string(), "a large blue square left of".to_string()];
        let b = wrapped.encode_batch(&texts).unwrap();
        assert_eq!((b.batch, b.len), (2, 6));
        assert_eq!(&b.mask[..6], &[1, 1, 1, 0, 0, 0]);
        assert_eq!(&b.mask[6..], &[1; 6]);
        assert_eq!(&b.ids[3..6], &[0, 0, 0]);
        assert_eq!(b.ids[11], 3, "truncation keeps [SEP] last");
        let (ids, mask) = b.to_tensors(&vlp_core::device::host()).unwrap();
        assert_eq!(ids.dims(), &[2, 6]);
        assert_eq!(mask.sum_all().unwrap().to_scalar::<u32>().unwrap(), 9);
    }

    /// Captions with many words of equal counts: the merges tie, and the tie-breaks
    /// decide which pieces make the vocabulary.
    fn tied_corpus() -> Vec<String> {
        let words = [
            "zebra", "yak", "walrus", "vole", "urchin", "tapir", "seal", "raven", "quail",
            "puffin", "otter", "newt", "moth", "lynx", "koala", "jay", "ibis", "heron",
        ];
        (0..words.len())
            .map(|i| {
                format!(
                    "{} {} {}",
                    words[i],
                    words[(i + 5) % words.len()],
                    words[(i + 11) % words.len()]
                )
            })
            .collect()
    }

    #[test]
    fn training_twice_on_the_same_captions_gives_the_same_file() {
        let train = || {
            train_wordpiece(tied_corpus().into_iter(), 60, 1)
                .unwrap()
                .to_string(true)
                .unwrap()
        };
        let first = train();
        for run in 2..10 {
            assert!(
                train() == first,
                "training run {run} gave another tokenizer"
            );
        }
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let err = TextTokenizer::from_file("/no/such/tokenizer.json", 30).unwrap_err();
        assert!(err.to_string().contains("/no/such/tokenizer.json"));
    }
}
