//! Picking the fields of a sample: the image (first of `jpg`, `jpeg`, `png`, `webp`), the
//! caption(s) (`txt`, else a field of `json`, whose value may be a string or a list of
//! strings = several captions of one image) and the image id (a `json` field, else the
//! sample key). img2dataset's samples (`KEY.jpg`, `KEY.txt`, `KEY.json`) read as-is.

use serde::{Deserialize, Serialize};

use crate::shard::RawSample;
use crate::stats::{Skip, SkipReason};

/// Which members and JSON fields hold what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FieldsConfig {
    /// Image extensions, in order of preference.
    pub image_exts: Vec<String>,
    /// JSON field with the caption (string or list of strings).
    pub caption_key: String,
    /// JSON field with the image id (string or number).
    pub image_id_key: String,
}

impl Default for FieldsConfig {
    fn default() -> Self {
        FieldsConfig {
            image_exts: ["jpg", "jpeg", "png", "webp"].map(String::from).to_vec(),
            caption_key: "caption".into(),
            image_id_key: "image_id".into(),
        }
    }
}

/// A sample with its fields picked out, image still encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedSample {
    pub key: String,
    pub url: std::sync::Arc<str>,
    pub index: u64,
    pub image_ext: String,
    pub image_bytes: Vec<u8>,
    /// Raw captions (not yet cleaned), at least one, none empty.
    pub captions: Vec<String>,
    /// The `json` image id, or the key when there is none.
    pub image_id: String,
}

/// Picks image, captions and image id out of `raw`, or says why the sample is unusable.
pub fn parse_sample(mut raw: RawSample, cfg: &FieldsConfig) -> Result<ParsedSample, Skip> {
    let skip = |raw: &RawSample, reason: SkipReason, detail: String| Skip {
        reason,
        url: raw.url.to_string(),
        key: raw.key.clone(),
        detail,
    };
    if let Some((reason, detail)) = raw.problem.take() {
        return Err(skip(&raw, reason, detail));
    }
    let json: Option<serde_json::Value> = match raw.field("json") {
        None => None,
        Some(bytes) => match serde_json::from_slice(bytes) {
            Ok(v) => Some(v),
            Err(e) => return Err(skip(&raw, SkipReason::BadText, format!("json: {e}"))),
        },
    };
    let captions: Vec<String> = if let Some(bytes) = raw.field("txt") {
        match std::str::from_utf8(bytes) {
            Ok(text) => vec![text.to_string()],
            Err(e) => {
                return Err(skip(
                    &raw,
                    SkipReason::BadText,
                    format!("txt is not UTF-8: {e}"),
                ))
            }
        }
    } else {
        match json.as_ref().and_then(|j| j.get(&cfg.caption_key)) {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    };
    let captions: Vec<String> = captions
        .into_iter()
        .filter(|c| !c.trim().is_empty())
        .collect();
    if captions.is_empty() {
        return Err(skip(
            &raw,
            SkipReason::MissingCaption,
            format!("no txt and no non-empty `{}` in json", cfg.caption_key),
        ));
    }
    let image_id = match json.as_ref().and_then(|j| j.get(&cfg.image_id_key)) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Number(n)) => n.to_string(),
        _ => raw.key.clone(),
    };
    let Some(pos) = cfg
        .image_exts
        .iter()
        .find_map(|ext| raw.fields.iter().position(|(e, _)| e == ext))
    else {
        let exts: Vec<&str> = raw.fields.iter().map(|(e, _)| e.as_str()).collect();
        return Err(skip(
            &raw,
            SkipReason::NoImage,
            format!("no image member (has: {})", exts.join(", ")),
        ));
    };
    let (image_ext, image_bytes) = raw.fields.swap_remove(pos);
    Ok(ParsedSample {
        key: raw.key,
        url: raw.url,
        index: raw.index,
        image_ext,
        image_bytes,
        captions,
        image_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(fields: &[(&str, &[u8])]) -> RawSample {
        RawSample {
            key: "000000007".into(),
            url: "s.tar".into(),
            index: 7,
            fields: fields
                .iter()
                .map(|(e, b)| (e.to_string(), b.to_vec()))
                .collect(),
            problem: None,
        }
    }

    #[test]
    fn img2dataset_sample() {
        let s = parse_sample(
            raw(&[
                ("jpg", b"JPEG"),
                ("txt", b"a dog"),
                ("json", br#"{"caption":"a dog","key":"000000007"}"#),
            ]),
            &FieldsConfig::default(),
        )
        .unwrap();
        assert_eq!(s.captions, ["a dog"]);
        assert_eq!(s.image_id, "000000007");
        assert_eq!(s.image_bytes, b"JPEG");
    }

    #[test]
    fn json_caption_list_and_image_id() {
        let s = parse_sample(
            raw(&[
                ("png", b"P"),
                ("json", br#"{"caption":["a","b",""],"image_id":42}"#),
            ]),
            &FieldsConfig::default(),
        )
        .unwrap();
        assert_eq!(s.captions, ["a", "b"]);
        assert_eq!(s.image_id, "42");
        assert_eq!(s.image_ext, "png");
    }

    #[test]
    fn problems_have_reasons() {
        let cfg = FieldsConfig::default();
        let reason = |r: RawSample| parse_sample(r, &cfg).unwrap_err().reason;
        assert_eq!(reason(raw(&[("jpg", b"J")])), SkipReason::MissingCaption);
        assert_eq!(
            reason(raw(&[("jpg", b"J"), ("txt", b"  ")])),
            SkipReason::MissingCaption
        );
        assert_eq!(
            reason(raw(&[("jpg", b"J"), ("txt", &[0xff, 0xfe])])),
            SkipReason::BadText
        );
        assert_eq!(
            reason(raw(&[("jpg", b"J"), ("json", b"{oops")])),
            SkipReason::BadText
        );
        assert_eq!(reason(raw(&[("txt", b"a cat")])), SkipReason::NoImage);
        let mut dup = raw(&[("jpg", b"J"), ("txt", b"x")]);
        dup.problem = Some((SkipReason::DuplicateField, "jpg twice".into()));
        assert_eq!(reason(dup), SkipReason::DuplicateField);
    }

    #[test]
    fn custom_caption_key() {
        let cfg = FieldsConfig {
            caption_key: "text".into(),
            ..Default::default()
        };
        let s = parse_sample(raw(&[("webp", b"W"), ("json", br#"{"text":"hi"}"#)]), &cfg).unwrap();
        assert_eq!(s.captions, ["hi"]);
    }
}
