//! The checks that a tokenizer fits a model: its vocabulary inside the model's embedding
//! rows and the special tokens at the ids the model was built with ([`check_tokenizer`]),
//! and, for a checkpoint that keeps the tokenizer it was trained with, the same content
//! ([`check_same_tokenizer`]). A tokenizer trained anew on other captions passes the
//! first check (same size, same special ids) and still numbers every word differently.
//!
//! A checkpoint folder keeps its text side beside `config.json`: [`TOKENIZER_FILE`] (a
//! copy of the tokenizer file) and [`TEXT_FILE`] ([`TextSettings`]: how captions were
//! cleaned and truncated). Both are absent from checkpoints written before they were
//! kept, and from converted models whose tokenizer was not found.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vlp_data::tokenize::TextTokenizer;
use vlp_models::TextConfig;

use crate::error::{EvalError, Result};

/// The tokenizer a checkpoint folder keeps (the one it was trained with).
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// The caption settings a checkpoint folder keeps ([`TextSettings`]).
pub const TEXT_FILE: &str = "text.json";

/// How a model's captions were read in training: cleaned to `max_words` words, tokenised
/// to `max_tokens` tokens ([CLS] and [SEP] included). Evaluating with others scores the
/// same model differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSettings {
    pub max_tokens: usize,
    pub max_words: usize,
}

impl TextSettings {
    /// The settings checkpoint folder `dir` keeps; `None` when it keeps none.
    pub fn load(dir: &Path) -> Result<Option<TextSettings>> {
        let path = dir.join(TEXT_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let bad = |detail: String| EvalError::input(path.display().to_string(), detail);
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    /// The file's content.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("two numbers are JSON")
    }
}

/// The tokenizer checkpoint folder `dir` keeps, if it keeps one.
pub fn checkpoint_tokenizer(dir: &Path) -> Option<PathBuf> {
    Some(dir.join(TOKENIZER_FILE)).filter(|p| p.is_file())
}

/// The content hash of a tokenizer file's bytes: FNV-1a of its JSON as `serde_json` writes
/// it back, so that the same tokenizer saved pretty or compact hashes alike (bytes that
/// are no JSON are hashed as they are).
pub fn tokenizer_hash(bytes: &[u8]) -> u64 {
    let canonical = serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| serde_json::to_vec(&v).ok());
    vlp_core::hash::fnv1a64(canonical.as_deref().unwrap_or(bytes))
}

/// How a caller lets through a tokenizer other than the checkpoint's: whether it was
/// asked to, and how to ask, said in the refusal (`pass --allow-other-tokenizer`).
#[derive(Clone, Copy, Debug)]
pub struct AllowOther<'a> {
    pub allowed: bool,
    pub switch: &'a str,
}

/// Checks that `given` has the content of the tokenizer checkpoint folder `dir` keeps
/// ([`tokenizer_hash`]); a checkpoint that keeps none passes. One that differs is refused
/// ([`EvalError::OtherTokenizer`]) unless `allow.allowed`, which logs a warning instead.
pub fn check_same_tokenizer(dir: &Path, given: &Path, allow: AllowOther<'_>) -> Result<()> {
    let Some(kept) = checkpoint_tokenizer(dir) else {
        return Ok(());
    };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| EvalError::input(path.display().to_string(), e.to_string()))
    };
    if tokenizer_hash(&read(given)?) == tokenizer_hash(&read(&kept)?) {
        return Ok(());
    }
    if !allow.allowed {
        return Err(EvalError::OtherTokenizer {
            given: given.to_path_buf(),
            kept,
            switch: allow.switch.to_string(),
        });
    }
    tracing::warn!(
        "tokenizer {} is not the one the model was trained with ({}); going on with it, \
         as allowed",
        given.display(),
        kept.display()
    );
    Ok(())
}

/// Checks `tokenizer` (read from `tokenizer_path`, named in the error) against the text
/// config of a model: at most `vocab_size` tokens, and `[PAD]`, `[CLS]`, `[SEP]`, `[MASK]`
/// at the config's ids. A tokenizer that passes the size check but numbers its special
/// tokens differently would run without error and give meaningless results.
pub fn check_tokenizer(
    tokenizer: &TextTokenizer,
    text_cfg: &TextConfig,
    tokenizer_path: &Path,
) -> Result<()> {
    let mismatch = |mismatch: String| EvalError::Tokenizer {
        path: tokenizer_path.to_path_buf(),
        mismatch,
    };
    if tokenizer.vocab_size() > text_cfg.vocab_size {
        return Err(mismatch(format!(
            "it has {} tokens, the model's vocabulary {}",
            tokenizer.vocab_size(),
            text_cfg.vocab_size
        )));
    }
    for (token, id) in [
        ("[PAD]", text_cfg.pad_id),
        ("[CLS]", text_cfg.cls_id),
        ("[SEP]", text_cfg.sep_id),
        ("[MASK]", text_cfg.mask_id),
    ] {
        match tokenizer.token_id(token) {
            Some(found) if found == id => {}
            Some(found) => {
                return Err(mismatch(format!(
                    "it gives {token} id {found}, the model expects {id}"
                )))
            }
            None => {
                return Err(mismatch(format!(
                    "it has no {token} token, the model expects one at id {id}"
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlp_data::tokenize::train_wordpiece;

    /// A tokenizer trained on a few words: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3,
    /// `[MASK]`=4, as `AlbefConfig::micro` expects.
    fn tokenizer() -> TextTokenizer {
        let words = ["a red square", "a blue circle", "two green triangles"];
        let tok = train_wordpiece(words.iter(), 40, 1).unwrap();
        TextTokenizer::from_tokenizer(tok, "test".into(), 16).unwrap()
    }

    fn micro_text() -> TextConfig {
        vlp_models::test_support::micro_config().text
    }

    #[test]
    fn a_matching_tokenizer_passes() {
        check_tokenizer(&tokenizer(), &micro_text(), Path::new("tok.json")).unwrap();
    }

    #[test]
    fn a_vocabulary_larger_than_the_models_is_refused_naming_the_file() {
        let tok = tokenizer();
        let mut text = micro_text();
        text.vocab_size = tok.vocab_size() - 1;
        let e = check_tokenizer(&tok, &text, Path::new("dir/tok.json")).unwrap_err();
        let said = e.to_string();
        assert!(matches!(e, EvalError::Tokenizer { .. }), "{e:?}");
        assert!(said.contains("dir/tok.json"), "{said}");
        assert!(
            said.contains(&format!("{} tokens", tok.vocab_size())),
            "{said}"
        );
    }

    /// A tokenizer trained on other captions: the same size and special ids as
    /// [`tokenizer`], other numbers for the words.
    fn retrained() -> TextTokenizer {
        let words = ["one tall tower", "green hills", "a red square far away"];
        let tok = train_wordpiece(words.iter(), 40, 1).unwrap();
        TextTokenizer::from_tokenizer(tok, "other".into(), 16).unwrap()
    }

    #[test]
    fn a_tokenizer_other_than_the_checkpoints_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let (ckpt, d) = (dir.path().join("ckpt"), dir.path());
        std::fs::create_dir(&ckpt).unwrap();
        let save = |tok: &TextTokenizer, path: &Path, pretty: bool| {
            std::fs::write(path, tok.inner().to_string(pretty).unwrap()).unwrap();
        };
        let (mine, other) = (tokenizer(), retrained());
        save(&mine, &ckpt.join(TOKENIZER_FILE), true);
        save(&mine, &d.join("same-compact.json"), false);
        save(&other, &d.join("other.json"), true);
        // The retrained one fits the model as far as sizes and ids can tell.
        check_tokenizer(&other, &micro_text(), Path::new("other.json")).unwrap();
        let refuse = AllowOther {
            allowed: false,
            switch: "pass --allow-it",
        };
        let e = check_same_tokenizer(&ckpt, &d.join("other.json"), refuse).unwrap_err();
        let said = e.to_string();
        assert!(matches!(e, EvalError::OtherTokenizer { .. }), "{e:?}");
        assert!(
            said.contains("other.json")
                && said.contains(&ckpt.join(TOKENIZER_FILE).display().to_string())
                && said.contains("pass --allow-it"),
            "{said}"
        );
        let allow = AllowOther {
            allowed: true,
            ..refuse
        };
        check_same_tokenizer(&ckpt, &d.join("other.json"), allow).unwrap();
        // The same tokenizer saved compact is the same content.
        check_same_tokenizer(&ckpt, &d.join("same-compact.json"), refuse).unwrap();
        // A checkpoint that keeps no tokenizer has nothing to compare with.
        check_same_tokenizer(d, &d.join("other.json"), refuse).unwrap();
    }

    #[test]
    fn text_settings_are_read_back_and_absent_ones_are_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(TextSettings::load(dir.path()).unwrap(), None);
        let s = TextSettings {
            max_tokens: 30,
            max_words: 25,
        };
        std::fs::write(dir.path().join(TEXT_FILE), s.to_json()).unwrap();
        assert_eq!(TextSettings::load(dir.path()).unwrap(), Some(s));
        std::fs::write(dir.path().join(TEXT_FILE), "{\"max_tokens\": 30}").unwrap();
        let said = TextSettings::load(dir.path()).unwrap_err().to_string();
        assert!(
            said.contains(TEXT_FILE) && said.contains("max_words"),
            "{said}"
        );
    }

    #[test]
    fn a_mask_token_at_another_id_is_refused() {
        let mut text = micro_text();
        text.mask_id = 103;
        let said = check_tokenizer(&tokenizer(), &text, Path::new("tok.json"))
            .unwrap_err()
            .to_string();
        assert!(
            said.contains("[MASK] id 4, the model expects 103"),
            "{said}"
        );
    }
}
