//! Reading users' own image-text data for shard writing: ALBEF/BLIP JSON annotation lists,
//! folders of images with `.txt` caption sidecars, and CSV/TSV files (open_clip's format);
//! then preparing the image bytes (keep, or resize and re-encode) and writing the records as
//! shards in the `vlp shards write` layout.
//!
//! Every reader merges entries that name the same image into one [`Record`] holding all its
//! captions in first-seen order, so an image is stored once. Errors name the input file and
//! the entry index or line number.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::image_ops::{self, decode_rgb, DecodeError};
use crate::stats::{SkipCounts, SkipReason};
use crate::writer::{sample_key, Manifest, ShardWriter};

/// One image with its captions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Where the image file is (input path joined to the image root).
    pub image: PathBuf,
    /// All captions of the image, trimmed, non-empty, in first-seen order.
    pub captions: Vec<String>,
    /// The image id given by the input, if any (integers are kept as their decimal text).
    pub image_id: Option<String>,
    /// The image path as written in the input (relative to the image root or folder);
    /// stored as `source` in each sample's JSON.
    pub source: String,
}

/// One record per caption: each image repeated with one of its captions, its image id
/// kept (the input's, else its path), so that image-id positives and evaluation grouping
/// still see one image. ALBEF's training annotation files list every caption as its own
/// entry and its fine-tuning epochs go over every caption; merged records would make an
/// epoch one caption per image.
pub fn one_record_per_caption(records: Vec<Record>) -> Vec<Record> {
    records
        .into_iter()
        .flat_map(|r| {
            let id = r.image_id.clone().unwrap_or_else(|| r.source.clone());
            r.captions
                .iter()
                .map(|c| Record {
                    image: r.image.clone(),
                    captions: vec![c.clone()],
                    image_id: Some(id.clone()),
                    source: r.source.clone(),
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Options shared by the readers.
#[derive(Clone, Debug, Default)]
pub struct IngestOptions {
    /// Directory that relative image paths of a JSON list or CSV are resolved against
    /// (default: the directory of the JSON/CSV file). Not used for folders.
    pub image_root: Option<PathBuf>,
    /// Skip (and count) records whose image file is missing, or folder images without a
    /// caption sidecar, instead of failing.
    pub skip_missing: bool,
    /// CSV column with the image path (default: `filepath`, else `image`).
    pub image_col: Option<String>,
    /// CSV column with the caption (default: `title`, else `caption`).
    pub caption_col: Option<String>,
    /// CSV field separator (default: tab for `.tsv` files, comma otherwise).
    pub sep: Option<char>,
}

/// The records of one input, and how many entries were skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ingested {
    pub records: Vec<Record>,
    /// Images skipped under [`IngestOptions::skip_missing`].
    pub skipped: u64,
}

/// Image file extensions a folder is scanned for (case-insensitive).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

fn input_err(source_name: impl Into<String>, reason: impl Into<String>) -> DataError {
    DataError::Input {
        source_name: source_name.into(),
        reason: reason.into(),
    }
}

fn base_dir(file: &Path, image_root: Option<&Path>) -> PathBuf {
    match image_root {
        Some(root) => root.to_path_buf(),
        None => match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        },
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = fs::read(path).map_err(|e| DataError::io(path, e))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        input_err(
            path.display().to_string(),
            format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        )
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// Collects entries, merging those that name the same image.
struct Merger {
    base: PathBuf,
    by_source: HashMap<String, usize>,
    records: Vec<Record>,
    /// Where each record was first seen (for error messages).
    origins: Vec<String>,
    conflicting_ids: u64,
}

impl Merger {
    fn new(base: PathBuf) -> Self {
        Merger {
            base,
            by_source: HashMap::new(),
            records: Vec::new(),
            origins: Vec::new(),
            conflicting_ids: 0,
        }
    }

    fn add(
        &mut self,
        source: &str,
        captions: Vec<String>,
        image_id: Option<String>,
        origin: String,
    ) {
        if let Some(&i) = self.by_source.get(source) {
            let rec = &mut self.records[i];
            rec.captions.extend(captions);
            match (&rec.image_id, image_id) {
                (None, id @ Some(_)) => rec.image_id = id,
                (Some(a), Some(b)) if *a != b => self.conflicting_ids += 1,
                _ => {}
            }
            return;
        }
        self.by_source
            .insert(source.to_string(), self.records.len());
        self.records.push(Record {
            image: self.base.join(source),
            captions,
            image_id,
            source: source.to_string(),
        });
        self.origins.push(origin);
    }

    /// Checks that every image exists; missing ones fail or are skipped.
    fn finish(self, what: &Path, skip_missing: bool) -> Result<Ingested> {
        if self.conflicting_ids > 0 {
            tracing::warn!(
                input = %what.display(),
                entries = self.conflicting_ids,
                "entries of the same image disagree on image_id; the first id is kept"
            );
        }
        let mut out = Ingested::default();
        for (rec, origin) in self.records.into_iter().zip(self.origins) {
            if rec.image.is_file() {
                out.records.push(rec);
            } else if skip_missing {
                if out.skipped < 10 {
                    tracing::warn!(%origin, image = %rec.image.display(), "image not found; skipped");
                }
                out.skipped += 1;
            } else {
                return Err(input_err(
                    origin,
                    format!(
                        "image {} not found (use --skip-missing to skip such entries)",
                        rec.image.display()
                    ),
                ));
            }
        }
        Ok(out)
    }
}

fn clean_caption(c: &str) -> Option<String> {
    let t = c.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Reads an ALBEF/BLIP-style JSON annotation list:
/// `[{"image": "rel/path.jpg", "caption": "..." | ["...", ...], "image_id": "..." | 123}, ...]`.
/// Entries naming the same `image` are merged into one record.
pub fn read_json_list(path: impl AsRef<Path>, opts: &IngestOptions) -> Result<Ingested> {
    let path = path.as_ref();
    let text = read_text(path)?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| DataError::Json {
        what: format!("annotation list {}", path.display()),
        source: e,
    })?;
    let name = path.display().to_string();
    let serde_json::Value::Array(entries) = value else {
        return Err(input_err(
            name,
            "expected a JSON list of {\"image\": ..., \"caption\": ...} objects",
        ));
    };
    let mut merger = Merger::new(base_dir(path, opts.image_root.as_deref()));
    for (i, entry) in entries.iter().enumerate() {
        let origin = format!("{name}, entry {i}");
        let Some(obj) = entry.as_object() else {
            return Err(input_err(origin, "not a JSON object"));
        };
        let image = match obj.get("image") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim(),
            Some(_) => return Err(input_err(origin, "`image` is not a non-empty string")),
            None => return Err(input_err(origin, "no `image` field")),
        };
        let captions: Vec<String> = match obj.get("caption") {
            Some(serde_json::Value::String(s)) => clean_caption(s).into_iter().collect(),
            Some(serde_json::Value::Array(list)) => {
                let mut out = Vec::with_capacity(list.len());
                for (j, c) in list.iter().enumerate() {
                    let Some(s) = c.as_str() else {
                        return Err(input_err(origin, format!("`caption[{j}]` is not a string")));
                    };
                    out.extend(clean_caption(s));
                }
                out
            }
            Some(_) => {
                return Err(input_err(
                    origin,
                    "`caption` is neither a string nor a list of strings",
                ))
            }
            None => return Err(input_err(origin, "no `caption` field")),
        };
        if captions.is_empty() {
            return Err(input_err(origin, "no non-empty caption"));
        }
        let image_id = match obj.get("image_id") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => Some(n.to_string()),
            Some(_) => {
                return Err(input_err(
                    origin,
                    "`image_id` is neither a string nor an integer",
                ))
            }
        };
        merger.add(image, captions, image_id, origin);
    }
    merger.finish(path, opts.skip_missing)
}

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// All image files under `dir`, recursively, in sorted path order. Hidden entries (names
/// starting with `.`, such as macOS `._x.jpg` files) are ignored; symbolic links to files
/// are followed, links to directories are not.
fn walk_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<(PathBuf, fs::FileType)> = fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .map(|e| {
            let e = e.map_err(|err| DataError::io(dir, err))?;
            let ft = e.file_type().map_err(|err| DataError::io(e.path(), err))?;
            Ok((e.path(), ft))
        })
        .collect::<Result<_>>()?;
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, ft) in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if ft.is_dir() {
            walk_images(&path, out)?;
        } else if is_image_file(&path) && path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads a folder of images (`jpg`, `jpeg`, `png`, `webp`; recursive; sorted), each with a
/// `.txt` sidecar of the same stem holding one caption per non-empty line.
pub fn read_folder(dir: impl AsRef<Path>, opts: &IngestOptions) -> Result<Ingested> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(input_err(dir.display().to_string(), "not a directory"));
    }
    let mut images = Vec::new();
    walk_images(dir, &mut images)?;
    let mut out = Ingested::default();
    for image in images {
        let sidecar = image.with_extension("txt");
        let source = image
            .strip_prefix(dir)
            .unwrap_or(&image)
            .to_string_lossy()
            .replace('\\', "/");
        let problem = if sidecar.is_file() {
            let captions: Vec<String> = read_text(&sidecar)?
                .lines()
                .filter_map(clean_caption)
                .collect();
            if !captions.is_empty() {
                out.records.push(Record {
                    image,
                    captions,
                    image_id: None,
                    source,
                });
                continue;
            }
            format!("caption file {} has no non-empty line", sidecar.display())
        } else {
            format!("no caption file {}", sidecar.display())
        };
        if opts.skip_missing {
            if out.skipped < 10 {
                tracing::warn!(image = %image.display(), "{problem}; skipped");
            }
            out.skipped += 1;
        } else {
            return Err(input_err(
                image.display().to_string(),
                format!("{problem} (use --skip-missing to skip such images)"),
            ));
        }
    }
    Ok(out)
}

/// Splits delimited text into records of fields, the way Python's `csv` module and pandas
/// do by default: a field that starts with `"` is quoted and may hold separators, newlines
/// and doubled quotes (`""`); a quote elsewhere is an ordinary character. Blank lines are
/// skipped. Yields `(line number where the record starts, fields)`.
pub struct DelimitedRows<'a> {
    chars: std::iter::Peekable<std::str::Chars<'a>>,
    sep: char,
    line: usize,
}

impl<'a> DelimitedRows<'a> {
    pub fn new(text: &'a str, sep: char) -> Self {
        DelimitedRows {
            chars: text.chars().peekable(),
            sep,
            line: 1,
        }
    }
}

impl Iterator for DelimitedRows<'_> {
    /// `Err((line, reason))` for an unterminated quoted field.
    type Item = std::result::Result<(usize, Vec<String>), (usize, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            self.chars.peek()?;
            let start = self.line;
            let mut fields = Vec::new();
            let mut field = String::new();
            let mut at_start = true;
            let mut quoted = false;
            let mut quote_line = 0;
            loop {
                let Some(c) = self.chars.next() else {
                    if quoted {
                        return Some(Err((
                            quote_line,
                            "quoted field is never closed".to_string(),
                        )));
                    }
                    fields.push(field);
                    break;
                };
                if quoted {
                    match c {
                        '"' if self.chars.peek() == Some(&'"') => {
                            self.chars.next();
                            field.push('"');
                        }
                        '"' => quoted = false,
                        '\n' => {
                            self.line += 1;
                            field.push(c);
                        }
                        _ => field.push(c),
                    }
                    continue;
                }
                match c {
                    '"' if at_start => {
                        quoted = true;
                        quote_line = self.line;
                        at_start = false;
                    }
                    c if c == self.sep => {
                        fields.push(std::mem::take(&mut field));
                        at_start = true;
                    }
                    '\r' if self.chars.peek() == Some(&'\n') => {}
                    '\n' => {
                        self.line += 1;
                        fields.push(field);
                        break;
                    }
                    _ => {
                        field.push(c);
                        at_start = false;
                    }
                }
            }
            if fields.len() == 1 && fields[0].trim().is_empty() {
                continue;
            }
            return Some(Ok((start, fields)));
        }
    }
}

fn pick_column(
    header: &[String],
    chosen: Option<&str>,
    defaults: &[&str],
    what: &str,
    flag: &str,
    name: &str,
) -> Result<usize> {
    let find = |c: &str| header.iter().position(|h| h == c);
    let found = match chosen {
        Some(c) => find(c),
        None => defaults.iter().find_map(|c| find(c)),
    };
    found.ok_or_else(|| {
        let wanted = match chosen {
            Some(c) => format!("`{c}`"),
            None => defaults
                .iter()
                .map(|d| format!("`{d}`"))
                .collect::<Vec<_>>()
                .join(" or "),
        };
        input_err(
            name,
            format!(
                "no {what} column {wanted} in the header (columns: {}); choose one with {flag}",
                header
                    .iter()
                    .map(|h| format!("`{h}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })
}

/// Reads a CSV or TSV file with a header row: an image-path column (default `filepath`,
/// else `image`) and a caption column (default `title`, else `caption`); an `image_id`
/// column is used when present. Rows naming the same image are merged into one record.
pub fn read_csv(path: impl AsRef<Path>, opts: &IngestOptions) -> Result<Ingested> {
    let path = path.as_ref();
    let name = path.display().to_string();
    let sep = opts.sep.unwrap_or_else(|| {
        let tsv = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
        if tsv {
            '\t'
        } else {
            ','
        }
    });
    if matches!(sep, '"' | '\n' | '\r') {
        return Err(DataError::config(
            "sep",
            format!("{sep:?} cannot separate fields"),
        ));
    }
    let text = read_text(path)?;
    let mut rows = DelimitedRows::new(&text, sep);
    let row_err =
        |(line, reason): (usize, String)| input_err(format!("{name}, line {line}"), reason);
    let header: Vec<String> = match rows.next() {
        None => return Err(input_err(name, "empty file (a header row is needed)")),
        Some(r) => r
            .map_err(row_err)?
            .1
            .into_iter()
            .map(|h| h.trim().to_string())
            .collect(),
    };
    let image_col = pick_column(
        &header,
        opts.image_col.as_deref(),
        &["filepath", "image"],
        "image path",
        "--image-col",
        &name,
    )?;
    let caption_col = pick_column(
        &header,
        opts.caption_col.as_deref(),
        &["title", "caption"],
        "caption",
        "--caption-col",
        &name,
    )?;
    let id_col = header.iter().position(|h| h == "image_id");
    let mut merger = Merger::new(base_dir(path, opts.image_root.as_deref()));
    for row in rows {
        let (line, fields) = row.map_err(row_err)?;
        let origin = format!("{name}, line {line}");
        if fields.len() != header.len() {
            return Err(input_err(
                origin,
                format!(
                    "{} fields but the header has {} (separator {sep:?}; quote fields that contain it)",
                    fields.len(),
                    header.len()
                ),
            ));
        }
        let image = fields[image_col].trim();
        if image.is_empty() {
            return Err(input_err(origin, format!("empty `{}`", header[image_col])));
        }
        let Some(caption) = clean_caption(&fields[caption_col]) else {
            return Err(input_err(
                origin,
                format!("empty `{}`", header[caption_col]),
            ));
        };
        let image_id = id_col
            .map(|c| fields[c].trim())
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        merger.add(image, vec![caption], image_id, origin);
    }
    merger.finish(path, opts.skip_missing)
}

/// Which format images are stored in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// The input's own format (JPEG, PNG or WebP, detected from the bytes).
    #[default]
    Keep,
    Jpg,
    Png,
}

/// How images are prepared for the shards.
#[derive(Clone, Debug)]
pub struct EncodeOptions {
    pub format: OutputFormat,
    /// Downscale so the longer side is at most this many pixels (never upscales).
    pub resize_max: Option<u32>,
    /// JPEG quality, 1..=100.
    pub quality: u8,
    /// Stop at the first image that cannot be used (undecodable, over the pixel limit)
    /// instead of skipping it and counting it in [`WriteSummary::skipped`].
    pub strict: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            format: OutputFormat::Keep,
            resize_max: None,
            quality: 90,
            strict: false,
        }
    }
}

/// Turns an image file's bytes into `(extension, bytes)` to store. The input format is
/// detected from the bytes (a PNG named `.jpg` is stored as `png`). The original bytes are
/// kept unless the image must shrink for `resize_max` or a format other than `Keep` is asked for (then it is always re-encoded); re-encoded images
/// are RGB, with any alpha composited onto white. WebP is re-encoded losslessly.
pub fn prepare_image(
    bytes: Vec<u8>,
    source_name: &str,
    opts: &EncodeOptions,
) -> Result<(&'static str, Vec<u8>)> {
    prepare(bytes, opts)
        .map(|(ext, out, _)| (ext, out))
        .map_err(|unusable| input_err(source_name, unusable.detail))
}

/// Why an image cannot go into a shard: the skip reason it is counted under, and a message.
struct Unusable {
    reason: SkipReason,
    detail: String,
}

impl From<DecodeError> for Unusable {
    fn from(e: DecodeError) -> Self {
        let reason = match e {
            DecodeError::TooLarge { .. } => SkipReason::ImageTooLarge,
            DecodeError::Corrupt(_) => SkipReason::BadImage,
        };
        Unusable {
            reason,
            detail: e.to_string(),
        }
    }
}

/// [`prepare_image`], also saying whether the image was re-encoded. The header is checked
/// and pixels are decoded by the loader's own guarded decoder, with its pixel limit, so a
/// shard never holds an image the loader would refuse for its size, and a decompression
/// bomb among the inputs is refused before anything is allocated.
fn prepare(
    bytes: Vec<u8>,
    opts: &EncodeOptions,
) -> std::result::Result<(&'static str, Vec<u8>, bool), Unusable> {
    use image::ImageFormat;
    let src_ext = match image::guess_format(&bytes) {
        Ok(ImageFormat::Jpeg) => "jpg",
        Ok(ImageFormat::Png) => "png",
        Ok(ImageFormat::WebP) => "webp",
        Ok(other) => {
            return Err(Unusable {
                reason: SkipReason::BadImage,
                detail: format!("{other:?} images are not supported (JPEG, PNG or WebP)"),
            })
        }
        Err(_) => {
            return Err(Unusable {
                reason: SkipReason::BadImage,
                detail: "not a JPEG, PNG or WebP image".into(),
            })
        }
    };
    let (w, h) = image_ops::checked_dimensions(&bytes, vlp_core::MAX_IMAGE_PIXELS)?;
    let target = opts.resize_max.filter(|&m| w.max(h) > m).map(|m| {
        let scale =
            |a: u32, b: u32| ((a as u64 * m as u64 + b as u64 / 2) / b as u64).max(1) as u32;
        if w >= h {
            (m, scale(h, w))
        } else {
            (scale(w, h), m)
        }
    });
    let out_ext = match opts.format {
        OutputFormat::Keep => src_ext,
        OutputFormat::Jpg => "jpg",
        OutputFormat::Png => "png",
    };
    // An explicit format always re-encodes, so the stored image is plain RGB (alpha
    // flattened onto white) whatever the input was.
    if target.is_none() && opts.format == OutputFormat::Keep {
        // Kept as it is, but decoded once all the same: a valid header over a cut or
        // corrupt body would pass the header check and then be refused by the loader.
        decode_rgb(&bytes, vlp_core::MAX_IMAGE_PIXELS)?;
        return Ok((src_ext, bytes, false));
    }
    let mut rgb = decode_rgb(&bytes, vlp_core::MAX_IMAGE_PIXELS)?;
    drop(bytes);
    if let Some((tw, th)) = target {
        rgb = image::imageops::resize(&rgb, tw, th, image::imageops::FilterType::Lanczos3);
    }
    let encoded = encode_rgb(&rgb, out_ext, opts.quality).map_err(|e| Unusable {
        reason: SkipReason::BadImage,
        detail: format!("cannot encode: {e}"),
    })?;
    Ok((out_ext, encoded, true))
}

/// Encodes an RGB image as `jpg` (with `quality`), `png` or `webp` (lossless).
pub fn encode_rgb(img: &image::RgbImage, ext: &str, quality: u8) -> image::ImageResult<Vec<u8>> {
    use image::ImageEncoder;
    let mut buf = Vec::new();
    let (w, h) = img.dimensions();
    let color = image::ExtendedColorType::Rgb8;
    match ext {
        "jpg" => image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
            .write_image(img.as_raw(), w, h, color)?,
        "png" => {
            // Shards are written once and read many times: spend the time on compression.
            image::codecs::png::PngEncoder::new_with_quality(
                &mut buf,
                image::codecs::png::CompressionType::Best,
                image::codecs::png::FilterType::Adaptive,
            )
            .write_image(img.as_raw(), w, h, color)?
        }
        _ => image::codecs::webp::WebPEncoder::new_lossless(&mut buf).write_image(
            img.as_raw(),
            w,
            h,
            color,
        )?,
    }
    Ok(buf)
}

/// What [`write_records`] did.
#[derive(Clone, Debug)]
pub struct WriteSummary {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    /// Captions of the samples written (the records left out not counted).
    pub captions: u64,
    /// Images that were resized or re-encoded rather than stored as they were.
    pub reencoded: u64,
    /// Records left out because their image could not be used, by reason.
    pub skipped: SkipCounts,
    /// The first [`LISTED_SKIPS`] of them, in record order.
    pub skipped_images: Vec<SkippedImage>,
}

/// How many skipped images [`WriteSummary::skipped_images`] lists (all are counted).
pub const LISTED_SKIPS: usize = 20;

/// A record whose image could not go into a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedImage {
    /// The image file.
    pub image: PathBuf,
    /// The record's image path as the input wrote it.
    pub source: String,
    pub reason: SkipReason,
    pub detail: String,
}

/// Writes records as shards under `prefix`: keys `000000000`, `000000001`, ... in record
/// order, `KEY.<jpg|png|webp>`, `KEY.txt` when a record has one caption, `KEY.json` always.
/// Images are read and prepared on `threads` threads; the output does not depend on it.
pub fn write_records(
    records: &[Record],
    prefix: impl AsRef<Path>,
    samples_per_shard: usize,
    opts: &EncodeOptions,
    threads: usize,
) -> Result<WriteSummary> {
    if !(1..=100).contains(&opts.quality) {
        return Err(DataError::config(
            "quality",
            format!("{} is not in 1..=100", opts.quality),
        ));
    }
    if opts.resize_max == Some(0) {
        return Err(DataError::config("resize-max", "must be at least 1"));
    }
    let threads = threads.max(1);
    let mut writer = ShardWriter::create(prefix, samples_per_shard)?;
    let manifest_path = writer.manifest_path();
    let mut reencoded = 0;
    let mut captions = 0;
    let mut skipped = SkipCounts::default();
    let mut skipped_images = Vec::new();
    // A file that cannot be read is an I/O failure and always stops the write; an image
    // that cannot be used is the input's problem and is skipped unless `strict`.
    type Prepared = std::result::Result<(&'static str, Vec<u8>, bool), Unusable>;
    let prepare = |rec: &Record| -> Result<Prepared> {
        let bytes = fs::read(&rec.image).map_err(|e| DataError::io(&rec.image, e))?;
        Ok(prepare(bytes, opts))
    };
    let chunk = threads * 16;
    let mut index = 0u64;
    for batch in records.chunks(chunk) {
        let prepared: Vec<Result<Prepared>> = if threads == 1 {
            batch.iter().map(prepare).collect()
        } else {
            let per = batch.len().div_ceil(threads);
            std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .chunks(per)
                    .map(|part| s.spawn(|| part.iter().map(prepare).collect::<Vec<_>>()))
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("image preparation thread panicked"))
                    .collect()
            })
        };
        for (rec, result) in batch.iter().zip(prepared) {
            let (ext, bytes, changed) = match result? {
                Ok(prepared) => prepared,
                Err(unusable) if opts.strict => {
                    return Err(input_err(
                        format!("{} (record `{}`)", rec.image.display(), rec.source),
                        format!("{}: {}", unusable.reason, unusable.detail),
                    ))
                }
                Err(unusable) => {
                    if skipped.samples() < 10 {
                        tracing::warn!(
                            image = %rec.image.display(),
                            reason = %unusable.reason,
                            "skipping record `{}`: {}",
                            rec.source,
                            unusable.detail
                        );
                    }
                    skipped.add(unusable.reason);
                    if skipped_images.len() < LISTED_SKIPS {
                        skipped_images.push(SkippedImage {
                            image: rec.image.clone(),
                            source: rec.source.clone(),
                            reason: unusable.reason,
                            detail: unusable.detail,
                        });
                    }
                    continue;
                }
            };
            if changed {
                reencoded += 1;
            }
            writer.write_captioned(
                &sample_key(index),
                ext,
                &bytes,
                &rec.captions,
                rec.image_id.as_deref(),
                &rec.source,
            )?;
            captions += rec.captions.len() as u64;
            index += 1;
        }
    }
    let manifest = writer.finish()?;
    Ok(WriteSummary {
        manifest,
        manifest_path,
        captions,
        reencoded,
        skipped,
        skipped_images,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_record_per_caption_keeps_the_image_id_or_the_path() {
        let recs = vec![
            Record {
                image: PathBuf::from("/i/a.jpg"),
                captions: vec!["one".into(), "two".into()],
                image_id: Some("7".into()),
                source: "a.jpg".into(),
            },
            Record {
                image: PathBuf::from("/i/b.jpg"),
                captions: vec!["three".into()],
                image_id: None,
                source: "b.jpg".into(),
            },
        ];
        let out = one_record_per_caption(recs);
        let got: Vec<(&str, &str)> = out
            .iter()
            .map(|r| (r.captions[0].as_str(), r.image_id.as_deref().unwrap()))
            .collect();
        assert_eq!(got, vec![("one", "7"), ("two", "7"), ("three", "b.jpg")]);
    }

    use super::*;
    use std::io::Cursor;

    fn png(dir: &Path, rel: &str, w: u32, h: u32) -> PathBuf {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb([200, 10, 10]))
            .save_with_format(&p, image::ImageFormat::Png)
            .unwrap();
        p
    }

    #[test]
    fn json_merges_entries_of_the_same_image() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "imgs/a.png", 4, 4);
        png(dir.path(), "imgs/b.png", 4, 4);
        let ann = dir.path().join("ann.json");
        fs::write(
            &ann,
            r#"[{"image": "imgs/a.png", "caption": "a one", "image_id": 5},
                {"image": "imgs/b.png", "caption": ["b one", " b two "], "image_id": "coco_7"},
                {"image": "imgs/a.png", "caption": "a two", "image_id": 5}]"#,
        )
        .unwrap();
        let got = read_json_list(&ann, &IngestOptions::default()).unwrap();
        assert_eq!(got.skipped, 0);
        assert_eq!(got.records.len(), 2);
        assert_eq!(got.records[0].captions, ["a one", "a two"]);
        assert_eq!(got.records[0].image_id.as_deref(), Some("5"));
        assert_eq!(got.records[0].source, "imgs/a.png");
        assert_eq!(got.records[0].image, dir.path().join("imgs/a.png"));
        assert_eq!(got.records[1].captions, ["b one", "b two"]);
        assert_eq!(got.records[1].image_id.as_deref(), Some("coco_7"));
    }

    #[test]
    fn json_errors_name_the_entry_and_missing_images_can_be_skipped() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "root/a.png", 4, 4);
        let ann = dir.path().join("ann.json");
        fs::write(
            &ann,
            r#"[{"image": "a.png", "caption": "x"}, {"image": "gone.png", "caption": "y"}]"#,
        )
        .unwrap();
        let opts = IngestOptions {
            image_root: Some(dir.path().join("root")),
            ..Default::default()
        };
        let e = read_json_list(&ann, &opts).unwrap_err().to_string();
        assert!(
            e.contains("ann.json, entry 1") && e.contains("gone.png"),
            "{e}"
        );
        let got = read_json_list(
            &ann,
            &IngestOptions {
                skip_missing: true,
                ..opts.clone()
            },
        )
        .unwrap();
        assert_eq!((got.records.len(), got.skipped), (1, 1));

        fs::write(
            &ann,
            r#"[{"image": "a.png", "caption": "x"}, {"caption": "y"}]"#,
        )
        .unwrap();
        let e = read_json_list(&ann, &opts).unwrap_err().to_string();
        assert!(e.contains("entry 1") && e.contains("no `image`"), "{e}");
        fs::write(&ann, r#"[{"image": "a.png", "caption": 3}]"#).unwrap();
        assert!(read_json_list(&ann, &opts)
            .unwrap_err()
            .to_string()
            .contains("entry 0"));
        fs::write(&ann, r#"{"image": "a.png"}"#).unwrap();
        assert!(read_json_list(&ann, &opts).is_err());
        fs::write(&ann, "[{").unwrap();
        assert!(read_json_list(&ann, &opts)
            .unwrap_err()
            .to_string()
            .contains("ann.json"));
    }

    #[test]
    fn folder_reads_sidecars_recursively_in_order() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "b/z.png", 4, 4);
        png(dir.path(), "a.PNG", 4, 4);
        png(dir.path(), ".hidden.png", 4, 4);
        fs::write(dir.path().join("b/z.txt"), "first\n\n  second  \n").unwrap();
        fs::write(dir.path().join("a.txt"), "only\n").unwrap();
        fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let got = read_folder(dir.path(), &IngestOptions::default()).unwrap();
        let sources: Vec<&str> = got.records.iter().map(|r| r.source.as_str()).collect();
        assert_eq!(sources, ["a.PNG", "b/z.png"]);
        assert_eq!(got.records[0].captions, ["only"]);
        assert_eq!(got.records[1].captions, ["first", "second"]);
        assert_eq!(got.records[1].image_id, None);
    }

    #[test]
    fn folder_missing_sidecar_names_the_image() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "a.png", 4, 4);
        png(dir.path(), "lonely.png", 4, 4);
        fs::write(dir.path().join("a.txt"), "cap").unwrap();
        let e = read_folder(dir.path(), &IngestOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("lonely.png") && e.contains("lonely.txt"), "{e}");
        let got = read_folder(
            dir.path(),
            &IngestOptions {
                skip_missing: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((got.records.len(), got.skipped), (1, 1));
    }

    #[test]
    fn delimited_rows_follow_python_csv_quoting() {
        let text = "a,b\r\n\"x, y\",\"say \"\"hi\"\"\"\n\n1,\"multi\nline\"\nplain \"q\",z";
        let rows: Vec<_> = DelimitedRows::new(text, ',').map(|r| r.unwrap()).collect();
        assert_eq!(
            rows,
            vec![
                (1, vec!["a".to_string(), "b".to_string()]),
                (2, vec!["x, y".to_string(), "say \"hi\"".to_string()]),
                (4, vec!["1".to_string(), "multi\nline".to_string()]),
                (6, vec!["plain \"q\"".to_string(), "z".to_string()]),
            ]
        );
        let bad: Vec<_> = DelimitedRows::new("a\n\"open,\nb", ',').collect();
        assert_eq!(bad[1], Err((2, "quoted field is never closed".to_string())));
    }

    #[test]
    fn csv_with_quoted_commas_and_merging() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "i/a.png", 4, 4);
        png(dir.path(), "i/b.png", 4, 4);
        let csv = dir.path().join("data.csv");
        fs::write(
            &csv,
            "filepath,title\ni/a.png,\"a dog, running\"\ni/b.png,plain\ni/a.png,\"another, one\"\n",
        )
        .unwrap();
        let got = read_csv(&csv, &IngestOptions::default()).unwrap();
        assert_eq!(got.records.len(), 2);
        assert_eq!(got.records[0].captions, ["a dog, running", "another, one"]);
        assert_eq!(got.records[1].source, "i/b.png");

        fs::write(&csv, "filepath,title\ni/a.png,a dog, unquoted\n").unwrap();
        let e = read_csv(&csv, &IngestOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.csv, line 2") && e.contains("3 fields"),
            "{e}"
        );
        fs::write(&csv, "path,text\ni/a.png,x\n").unwrap();
        let e = read_csv(&csv, &IngestOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`path`, `text`") && e.contains("--image-col"),
            "{e}"
        );
        let got = read_csv(
            &csv,
            &IngestOptions {
                image_col: Some("path".into()),
                caption_col: Some("text".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(got.records[0].captions, ["x"]);
    }

    #[test]
    fn tsv_separator_comes_from_the_extension() {
        let dir = tempfile::tempdir().unwrap();
        png(dir.path(), "imgs/a.png", 4, 4);
        let tsv = dir.path().join("meta/data.tsv");
        fs::create_dir_all(tsv.parent().unwrap()).unwrap();
        fs::write(
            &tsv,
            "caption\timage\timage_id\na cat, sitting\ta.png\t42\n",
        )
        .unwrap();
        let opts = IngestOptions {
            image_root: Some(dir.path().join("imgs")),
            ..Default::default()
        };
        let got = read_csv(&tsv, &opts).unwrap();
        assert_eq!(got.records.len(), 1);
        assert_eq!(got.records[0].captions, ["a cat, sitting"]);
        assert_eq!(got.records[0].image_id.as_deref(), Some("42"));
        assert_eq!(got.records[0].image, dir.path().join("imgs/a.png"));
        // Without the root, the path is relative to the TSV's directory: missing.
        let e = read_csv(&tsv, &IngestOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.tsv, line 2") && e.contains("not found"),
            "{e}"
        );
    }

    #[test]
    fn prepare_keeps_bytes_or_resizes_and_flattens_alpha() {
        let mut rgba = image::RgbaImage::from_pixel(40, 20, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 255]));
        let mut png_bytes = Vec::new();
        image::DynamicImage::ImageRgba8(rgba)
            .write_to(&mut Cursor::new(&mut png_bytes), image::ImageFormat::Png)
            .unwrap();
        let keep = EncodeOptions::default();
        let (ext, out) = prepare_image(png_bytes.clone(), "x.jpg", &keep).unwrap();
        assert_eq!((ext, &out), ("png", &png_bytes), "sniffed, kept verbatim");
        let small = EncodeOptions {
            resize_max: Some(100),
            ..Default::default()
        };
        assert_eq!(
            prepare_image(png_bytes.clone(), "x", &small).unwrap().1,
            png_bytes
        );

        let to_jpg = EncodeOptions {
            format: OutputFormat::Jpg,
            resize_max: Some(10),
            quality: 90,
            strict: false,
        };
        let (ext, out) = prepare_image(png_bytes.clone(), "x", &to_jpg).unwrap();
        assert_eq!(ext, "jpg");
        let img = image::load_from_memory(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (10, 5));
        let p = img.get_pixel(9, 4);
        assert!(
            p.0.iter().all(|&c| c > 240),
            "transparent became white: {p:?}"
        );

        let e = prepare_image(b"hello".to_vec(), "notes.jpg", &keep)
            .unwrap_err()
            .to_string();
        assert!(e.contains("notes.jpg"), "{e}");
        let mut truncated = png_bytes.clone();
        truncated.truncate(20);
        assert!(prepare_image(truncated, "t.png", &keep).is_err());
    }

    #[test]
    fn write_records_is_independent_of_threads() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<Record> = (0..5)
            .map(|i| Record {
                image: png(dir.path(), &format!("{i}.png"), 8 + i, 6),
                captions: vec![format!("c{i}")],
                image_id: None,
                source: format!("{i}.png"),
            })
            .collect();
        let opts = EncodeOptions {
            resize_max: Some(7),
            ..Default::default()
        };
        let one = write_records(&records, dir.path().join("o/one"), 2, &opts, 1).unwrap();
        let three = write_records(&records, dir.path().join("t/one"), 2, &opts, 3).unwrap();
        assert_eq!(one.manifest, three.manifest);
        assert_eq!(one.reencoded, 5);
        for s in &one.manifest.shards {
            assert_eq!(
                fs::read(dir.path().join("o").join(&s.file)).unwrap(),
                fs::read(dir.path().join("t").join(&s.file)).unwrap()
            );
        }
        assert!(write_records(
            &records,
            dir.path().join("q"),
            2,
            &EncodeOptions { quality: 0, ..opts },
            1
        )
        .is_err());
    }

    #[test]
    fn an_over_limit_header_is_refused_before_decoding() {
        // 100,000 x 100,000 declared in the header: far over the pixel limit. Whether kept
        // or re-encoded, the image is refused from the header with the size in the message.
        let huge = crate::image_ops::tests::header_only_png(100_000, 100_000);
        for opts in [
            EncodeOptions::default(),
            EncodeOptions {
                format: OutputFormat::Jpg,
                ..Default::default()
            },
        ] {
            let e = prepare_image(huge.clone(), "bomb.png", &opts)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("bomb.png") && e.contains("more than the limit"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_kept_image_with_a_cut_body_is_refused_as_the_loader_would() {
        let img =
            image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([x as u8 * 4, y as u8 * 4, 7]));
        let whole = encode_rgb(&img, "png", 90).unwrap();
        assert!(prepare_image(whole.clone(), "ok.png", &EncodeOptions::default()).is_ok());
        let cut = whole[..whole.len() / 2].to_vec();
        let e = prepare_image(cut, "cut.png", &EncodeOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cut.png"), "{e}");
    }

    #[test]
    fn write_records_skips_unusable_images_unless_strict() {
        let dir = tempfile::tempdir().unwrap();
        let mut records: Vec<Record> = (0..3)
            .map(|i| Record {
                image: png(dir.path(), &format!("{i}.png"), 4, 4),
                captions: vec![format!("c{i}")],
                image_id: None,
                source: format!("{i}.png"),
            })
            .collect();
        let garbage = dir.path().join("garbage.jpg");
        fs::write(&garbage, b"not an image").unwrap();
        let bomb = dir.path().join("bomb.png");
        fs::write(
            &bomb,
            crate::image_ops::tests::header_only_png(100_000, 100_000),
        )
        .unwrap();
        for (at, path) in [(1, &garbage), (3, &bomb)] {
            records.insert(
                at,
                Record {
                    image: path.clone(),
                    captions: vec!["bad".into()],
                    image_id: None,
                    source: path.file_name().unwrap().to_string_lossy().into(),
                },
            );
        }
        let opts = EncodeOptions::default();
        let got = write_records(&records, dir.path().join("o/x"), 2, &opts, 2).unwrap();
        assert_eq!(got.manifest.samples, 3);
        assert_eq!(
            got.captions, 3,
            "the skipped records' captions are not counted"
        );
        assert_eq!(got.skipped.get(SkipReason::BadImage), 1);
        assert_eq!(got.skipped.get(SkipReason::ImageTooLarge), 1);
        let listed: Vec<&str> = got
            .skipped_images
            .iter()
            .map(|s| s.source.as_str())
            .collect();
        assert_eq!(listed, ["garbage.jpg", "bomb.png"]);

        let strict = EncodeOptions {
            strict: true,
            ..Default::default()
        };
        let e = write_records(&records, dir.path().join("s/x"), 2, &strict, 2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("garbage.jpg") && e.contains("bad_image"), "{e}");
    }
}
