//! The one check that a tokenizer fits a model: its vocabulary inside the model's
//! embedding rows, and the special tokens at the ids the model was built with.

use std::path::Path;

use vlp_data::tokenize::TextTokenizer;
use vlp_models::TextConfig;

use crate::error::{EvalError, Result};

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
