//! ALBEF's caption cleaning (`pre_caption` in its `dataset/utils.py`): lower-case; delete
//! `,.'!?"()*#:;~`; `-` and `/` become spaces; `<person>` becomes `person`; every run of two
//! or more whitespace characters becomes one space; trailing newline and surrounding spaces
//! are stripped; at most `max_words` space-separated words are kept.

/// Cleans one caption exactly as ALBEF's `pre_caption(caption, max_words)`.
pub fn pre_caption(caption: &str, max_words: usize) -> String {
    let lowered = caption.to_lowercase();
    let mut text = String::with_capacity(lowered.len());
    for ch in lowered.chars() {
        match ch {
            ',' | '.' | '\'' | '!' | '?' | '"' | '(' | ')' | '*' | '#' | ':' | ';' | '~' => {}
            '-' | '/' => text.push(' '),
            _ => text.push(ch),
        }
    }
    let text = text.replace("<person>", "person");
    // `re.sub(r"\s{2,}", ' ', s)`: only runs of two or more collapse; a lone tab stays.
    let mut collapsed = String::with_capacity(text.len());
    let mut run: Vec<char> = Vec::new();
    for ch in text.chars() {
        if ch.is_whitespace() {
            run.push(ch);
            continue;
        }
        flush_whitespace(&mut collapsed, &mut run);
        collapsed.push(ch);
    }
    flush_whitespace(&mut collapsed, &mut run);
    let trimmed = collapsed.trim_end_matches('\n').trim_matches(' ');
    let words: Vec<&str> = trimmed.split(' ').collect();
    if words.len() > max_words {
        words[..max_words].join(" ")
    } else {
        trimmed.to_string()
    }
}

/// Whether a caption cleaned by [`pre_caption`] can be trained or evaluated on: it must
/// keep a character other than whitespace. Punctuation-only captions (`"!!! ..."`) clean to
/// nothing and are not usable; raw captions must be cleaned first, because cleaning is what
/// removes the punctuation.
pub fn is_usable(cleaned: &str) -> bool {
    cleaned.chars().any(|c| !c.is_whitespace())
}

/// `raw` cleaned with [`pre_caption`], or `None` when the cleaned caption is not usable
/// ([`is_usable`]): the one rule by which training, evaluation, inspection, scoring and
/// embedding take or leave a caption.
pub fn usable_caption(raw: &str, max_words: usize) -> Option<String> {
    let cleaned = pre_caption(raw, max_words);
    is_usable(&cleaned).then_some(cleaned)
}

/// The usable captions of `raw`, cleaned with [`pre_caption`], in their order.
pub fn usable_captions<'a>(
    raw: impl IntoIterator<Item = &'a String>,
    max_words: usize,
) -> Vec<String> {
    raw.into_iter()
        .filter_map(|c| usable_caption(c, max_words))
        .collect()
}

fn flush_whitespace(out: &mut String, run: &mut Vec<char>) {
    match run.len() {
        0 => {}
        1 => out.push(run[0]),
        _ => out.push(' '),
    }
    run.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values produced by ALBEF's `pre_caption` (Python `re`), pasted here:
    //   pre_caption("A Man's  bike-rack, (red)!", 30) == "a mans bike rack red"
    //   pre_caption("  Hello\tworld\n", 30) == "hello\tworld"
    //   pre_caption("a/b -- c", 30) == "a b c"
    //   pre_caption("<PERSON> rides", 30) == "person rides"
    //   pre_caption("one two three four", 2) == "one two"
    #[test]
    fn matches_albef_pre_caption() {
        assert_eq!(
            pre_caption("A Man's  bike-rack, (red)!", 30),
            "a mans bike rack red"
        );
        assert_eq!(pre_caption("  Hello\tworld\n", 30), "hello\tworld");
        assert_eq!(pre_caption("a/b -- c", 30), "a b c");
        assert_eq!(pre_caption("<PERSON> rides", 30), "person rides");
        assert_eq!(pre_caption("one two three four", 2), "one two");
        assert_eq!(
            pre_caption("grinning face: face, grin", 30),
            "grinning face face grin"
        );
        assert_eq!(pre_caption("", 30), "");
    }

    #[test]
    fn punctuation_only_captions_are_not_usable() {
        for raw in ["!!! ...", "?!", "-- / --", "\"()\"", " \t\n "] {
            assert!(!is_usable(&pre_caption(raw, 30)), "{raw:?}");
        }
        for raw in ["a", "A dog!", "&", "1"] {
            assert!(is_usable(&pre_caption(raw, 30)), "{raw:?}");
        }
        let raw = [
            "!!!".to_string(),
            "Two dogs.".to_string(),
            "...".to_string(),
        ];
        assert_eq!(usable_captions(&raw, 30), ["two dogs"]);
        assert_eq!(usable_caption("A Dog!", 30).as_deref(), Some("a dog"));
        assert_eq!(usable_caption("   ", 30), None);
    }
}
