//! Image decoding and the ALBEF image transforms: a decompression-bomb-guarded decoder to
//! 8-bit RGB, torchvision's `RandomResizedCrop` (parameters as in
//! `RandomResizedCrop.get_params`, resampling Pillow-exact bicubic), `RandomHorizontalFlip`,
//! ALBEF's RandAugment ([`crate::randaugment`]) and torchvision's `ToTensor` + `Normalize`,
//! written straight into a CHW `f32` buffer. The transform definitions follow
//! salesforce/ALBEF (`Pretrain.py`, `Retrieval.py`: `pretrain_transform`, `train_transform`,
//! `test_transform`).

use std::fmt;
use std::io::Cursor;
use std::mem::MaybeUninit;

use fast_image_resize as fir;
use image::{DynamicImage, ImageDecoder, ImageError, ImageReader, Limits, RgbImage};
use serde::{Deserialize, Serialize};

use crate::randaugment::{self, AugScratch, RandAugmentConfig};
use crate::rng::Rng;

/// CLIP's normalisation constants, which ALBEF and BLIP use. Written with the published
/// digits; they parse to the same f32 values torchvision uses.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];
/// The usual ImageNet normalisation constants.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Which per-channel mean/std `Normalize` uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Normalization {
    #[default]
    Clip,
    Imagenet,
}

impl Normalization {
    /// `(mean, std)` per RGB channel, in units of the `[0, 1]` range.
    pub fn mean_std(self) -> ([f32; 3], [f32; 3]) {
        match self {
            Normalization::Clip => (CLIP_MEAN, CLIP_STD),
            Normalization::Imagenet => (IMAGENET_MEAN, IMAGENET_STD),
        }
    }
}

/// Why an image could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum DecodeError {
    /// The header announces more pixels than allowed; nothing was decoded.
    TooLarge {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    /// Empty, truncated, corrupt or of an unsupported format.
    Corrupt(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge {
                width,
                height,
                max_pixels,
            } => write!(
                f,
                "image is {width}x{height} = {} pixels, more than the limit of {max_pixels}",
                u64::from(*width) * u64::from(*height)
            ),
            DecodeError::Corrupt(reason) => write!(f, "cannot decode image: {reason}"),
        }
    }
}

impl std::error::Error for DecodeError {}

fn corrupt(err: impl fmt::Display) -> DecodeError {
    DecodeError::Corrupt(err.to_string())
}

/// A reader over in-memory bytes whose format is sniffed from the content, never from a name:
/// shard members are often misnamed (`.jpg` holding a PNG).
fn sniffed_reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Corrupt("empty image data".into()));
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(corrupt)?;
    if reader.format().is_none() {
        return Err(DecodeError::Corrupt(
            "unknown image format (expected JPEG, PNG or WebP)".into(),
        ));
    }
    Ok(reader)
}

fn check_pixels(width: u32, height: u32, max_pixels: u64) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt(format!(
            "image has an empty size {width}x{height}"
        )));
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            max_pixels,
        });
    }
    Ok(())
}

/// Bytes a decoder may allocate beyond 8 per pixel ([`decode_alloc_limit`]): what a file
/// holds besides its pixels and is decoded with them (ICC profiles, EXIF and XMP blocks,
/// PNG text chunks; the PNG decoder inflates an iCCP chunk whole before the first pixel),
/// and working buffers (PNG row buffers, WebP's ARGB planes). Profiles that cameras and
/// editors write are kilobytes, the largest printer profiles a few megabytes, so 32 MiB
/// refuses nothing real; a chunk of a few kilobytes that inflates to gigabytes stops there.
pub const DECODE_SLACK_BYTES: u64 = 32 << 20;

/// The most bytes decoding a `width` x `height` image may allocate: 8 per pixel (16-bit
/// RGBA, the widest layout JPEG, PNG and WebP decode to) plus [`DECODE_SLACK_BYTES`].
/// Derived from the image's own size, not from the pixel limit: an 8x8 image may take
/// 32 MiB, not the 750 MB the largest image under the limit needs.
pub fn decode_alloc_limit(width: u32, height: u32) -> u64 {
    alloc_limit(width, height, DECODE_SLACK_BYTES)
}

fn alloc_limit(width: u32, height: u32, slack: u64) -> u64 {
    (u64::from(width) * u64::from(height))
        .saturating_mul(8)
        .saturating_add(slack)
}

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

/// A PNG's size from its IHDR, which the format puts first: the PNG decoder's own header
/// read goes on through every chunk before the pixel data and inflates their compressed
/// metadata, which is just what must not happen before the size is known.
fn png_dimensions(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    let be =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    if bytes.len() < 24 || be(8) != 13 || &bytes[12..16] != b"IHDR" {
        return Err(DecodeError::Corrupt(
            "PNG does not start with its IHDR chunk".into(),
        ));
    }
    Ok((be(16), be(20)))
}

/// Width and height from the image header, without decoding any pixel and without
/// allocating more than [`DECODE_SLACK_BYTES`] (a large-but-honest header is reported with
/// its size, never refused for it).
pub fn image_dimensions(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    if bytes.starts_with(PNG_SIGNATURE) {
        return png_dimensions(bytes);
    }
    let mut reader = sniffed_reader(bytes)?;
    // JPEG and WebP headers copy their metadata (nothing is inflated), so the slack bounds
    // what they may allocate.
    reader.limits(alloc_limits(DECODE_SLACK_BYTES));
    reader.into_dimensions().map_err(corrupt)
}

fn alloc_limits(max_alloc: u64) -> Limits {
    let mut limits = Limits::default();
    limits.max_alloc = Some(max_alloc);
    limits
}

/// Width and height from the image header, refused as [`DecodeError::TooLarge`] above
/// `max_pixels` (and as corrupt when empty): the check [`decode_rgb`] makes before
/// decoding, for callers that keep the encoded bytes.
pub fn checked_dimensions(bytes: &[u8], max_pixels: u64) -> Result<(u32, u32), DecodeError> {
    let (width, height) = image_dimensions(bytes)?;
    check_pixels(width, height, max_pixels)?;
    Ok((width, height))
}

/// Decodes JPEG, PNG or WebP bytes to 8-bit RGB.
///
/// The header is parsed first and an image of more than `max_pixels` pixels is refused with
/// [`DecodeError::TooLarge`] before any pixel buffer is allocated (decompression bombs);
/// the decoder may then allocate at most [`decode_alloc_limit`] of the header's size, so
/// metadata that inflates far past the pixels (a PNG's iCCP chunk) is bounded too: it is
/// refused as corrupt naming the limit, or dropped where the decoder drops a bad profile.
/// Grayscale, 16-bit and palette images are converted to RGB8 (16-bit values rounded);
/// images with an alpha channel are composited onto white, because transparent regions of
/// web images are meant to be seen on a white page and dropping alpha would reveal
/// whatever colour the encoder left under them. EXIF orientation and ICC profiles are
/// ignored, as by PIL's `Image.open(...).convert("RGB")`.
///
/// # Shapes
/// Returns an `RgbImage` of the header's width x height, row-major, interleaved RGB.
pub fn decode_rgb(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, DecodeError> {
    decode_within(bytes, max_pixels, DECODE_SLACK_BYTES)
}

/// [`decode_rgb`] with `slack` bytes beyond the pixels (tests shrink it).
fn decode_within(bytes: &[u8], max_pixels: u64, slack: u64) -> Result<RgbImage, DecodeError> {
    let (width, height) = checked_dimensions(bytes, max_pixels)?;
    let limit = alloc_limit(width, height, slack);
    let refused = |err: ImageError| match err {
        ImageError::Limits(_) => DecodeError::Corrupt(format!(
            "decoding this {width}x{height} image needs more than its allocation limit of \
             {limit} bytes (8 per pixel and {slack} for metadata such as an ICC profile)"
        )),
        err => corrupt(err),
    };
    let mut reader = sniffed_reader(bytes)?;
    reader.limits(alloc_limits(limit));
    let decoder = reader.into_decoder().map_err(refused)?;
    if decoder.dimensions() != (width, height) {
        return Err(DecodeError::Corrupt(format!(
            "the header says {width}x{height}, the decoder {:?}",
            decoder.dimensions()
        )));
    }
    let img = DynamicImage::from_decoder(decoder).map_err(refused)?;
    Ok(into_rgb8_on_white(img))
}

fn into_rgb8_on_white(img: DynamicImage) -> RgbImage {
    let color = img.color();
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        img if !color.has_alpha() => img.into_rgb8(),
        img if color.bytes_per_pixel() == color.channel_count() => {
            composite_on_white_8(&img.into_rgba8())
        }
        img => composite_on_white_16(&img.into_rgba16()),
    }
}

fn composite_on_white_8(rgba: &image::RgbaImage) -> RgbImage {
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (dst, src) in out.chunks_exact_mut(3).zip(rgba.chunks_exact(4)) {
        let a = u32::from(src[3]);
        for c in 0..3 {
            // c*a/255 + 255*(1 - a/255), rounded to nearest.
            dst[c] = ((u32::from(src[c]) * a + 255 * (255 - a) + 127) / 255) as u8;
        }
    }
    out
}

fn composite_on_white_16(rgba: &image::ImageBuffer<image::Rgba<u16>, Vec<u16>>) -> RgbImage {
    const MAX: u64 = 65535;
    let (w, h) = rgba.dimensions();
    let mut out = RgbImage::new(w, h);
    for (dst, src) in out.chunks_exact_mut(3).zip(rgba.chunks_exact(4)) {
        let a = u64::from(src[3]);
        for c in 0..3 {
            // Composite at 16 bits, then scale by 255/65535 once, so only one rounding.
            let num = u64::from(src[c]) * a + MAX * (MAX - a);
            let den = MAX * 257;
            dst[c] = ((num + den / 2) / den) as u8;
        }
    }
    out
}

/// ALBEF's training transform: `RandomResizedCrop(size, scale, ratio, BICUBIC)` ->
/// `RandomHorizontalFlip(hflip_prob)` -> optional `RandomAugment` -> `ToTensor` -> `Normalize`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainTransform {
    /// Output side length (square output).
    pub size: u32,
    /// Range of the crop's area as a fraction of the image area.
    pub scale: (f64, f64),
    /// Range of the crop's aspect ratio (width / height), sampled log-uniformly.
    pub ratio: (f64, f64),
    /// Probability of a horizontal flip.
    pub hflip_prob: f64,
    /// RandAugment after the flip, if any.
    pub randaugment: Option<RandAugmentConfig>,
}

impl TrainTransform {
    /// ALBEF pre-training (`pretrain_transform`): scale 0.2..1, ratio 3/4..4/3, flip 0.5,
    /// RandAugment(2, 7).
    pub fn albef_pretrain(size: u32) -> Self {
        TrainTransform {
            size,
            scale: (0.2, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip_prob: 0.5,
            randaugment: Some(RandAugmentConfig::albef()),
        }
    }

    /// ALBEF fine-tuning (`train_transform` of the downstream scripts): as pre-training
    /// with scale 0.5..1.
    pub fn albef_finetune(size: u32) -> Self {
        TrainTransform {
            scale: (0.5, 1.0),
            ..Self::albef_pretrain(size)
        }
    }
}

/// ALBEF's test transform: `Resize((size, size), BICUBIC)` -> `ToTensor` -> `Normalize`.
/// The image is squashed to a square; its aspect ratio is not kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalTransform {
    pub size: u32,
}

/// A training or an evaluation transform.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ImageTransform {
    Train(TrainTransform),
    Eval(EvalTransform),
}

impl ImageTransform {
    /// Side length of the square output.
    pub fn output_size(&self) -> u32 {
        match self {
            ImageTransform::Train(t) => t.size,
            ImageTransform::Eval(t) => t.size,
        }
    }
}

/// Python's `round()` (ties to even) of a non-negative value, as used by torchvision.
fn py_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// Crop box of torchvision's `RandomResizedCrop.get_params`, for an image of
/// `width` x `height`.
///
/// Up to ten attempts draw a target area `area * U(scale)` and an aspect ratio
/// `exp(U(ln ratio.0, ln ratio.1))`, round `w = sqrt(area * aspect)` and
/// `h = sqrt(area / aspect)` half-to-even, and accept the first box that fits; its top and
/// left are then drawn uniformly (top first). If none fits, the fallback is a centred crop
/// of the whole image with its aspect ratio clamped into `ratio`.
///
/// Returns `(left, top, width, height)`, always inside the image with `width, height >= 1`
/// when the image is not empty (an empty image gives `(0, 0, 0, 0)`).
pub fn random_resized_crop_params(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut Rng,
) -> (u32, u32, u32, u32) {
    if width == 0 || height == 0 {
        return (0, 0, 0, 0);
    }
    let (wf, hf) = (f64::from(width), f64::from(height));
    let area = wf * hf;
    let (log_r0, log_r1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * rng.uniform_range(scale.0, scale.1);
        let aspect = rng.uniform_range(log_r0, log_r1).exp();
        let w = py_round((target_area * aspect).sqrt());
        let h = py_round((target_area / aspect).sqrt());
        // Written so that NaN (from a non-positive ratio) fails the test.
        if w > 0.0 && w <= wf && h > 0.0 && h <= hf {
            let (w, h) = (w as u32, h as u32);
            let top = rng.below(u64::from(height - h) + 1) as u32;
            let left = rng.below(u64::from(width - w) + 1) as u32;
            return (left, top, w, h);
        }
    }
    let in_ratio = wf / hf;
    let (rmin, rmax) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (w, h) = if in_ratio < rmin {
        (width, clamp_side(py_round(wf / rmin), height))
    } else if in_ratio > rmax {
        (clamp_side(py_round(hf * rmax), width), height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

fn clamp_side(v: f64, max: u32) -> u32 {
    // `as` saturates (NaN -> 0), then the side is kept within 1..=max.
    (v as u32).clamp(1, max)
}

/// Applies an [`ImageTransform`] sample after sample, reusing its resampler and scratch
/// images so that the hot path does not allocate. Create one per worker thread.
pub struct ImageTransformer {
    transform: ImageTransform,
    /// `lut[c][v] = (v / 255 - mean[c]) / std[c]`, computed with torchvision's f32 operations
    /// so the output is bit-identical to `ToTensor` + `Normalize` on the same pixels.
    lut: Box<[[f32; 256]; 3]>,
    resizer: fir::Resizer,
    options: fir::ResizeOptions,
    /// The resized `size` x `size` image before normalisation.
    resized: RgbImage,
    /// The horizontally resampled crop (`size` x crop height) between the two passes.
    between_passes: Vec<u8>,
    /// Working memory of RandAugment.
    scratch: AugScratch,
}

impl fmt::Debug for ImageTransformer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImageTransformer")
            .field("transform", &self.transform)
            .finish_non_exhaustive()
    }
}

impl ImageTransformer {
    pub fn new(transform: ImageTransform, normalization: Normalization) -> Self {
        let (mean, std) = normalization.mean_std();
        let mut lut = Box::new([[0.0f32; 256]; 3]);
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = (v as f32 / 255.0 - mean[c]) / std[c];
            }
        }
        let size = transform.output_size();
        ImageTransformer {
            transform,
            lut,
            resizer: fir::Resizer::new(),
            // CatmullRom is the a = -0.5 cubic that Pillow calls BICUBIC, with Pillow's
            // support scaling when downsampling (antialiasing).
            options: fir::ResizeOptions::new()
                .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::CatmullRom)),
            resized: RgbImage::new(size, size),
            between_passes: Vec::new(),
            scratch: AugScratch::default(),
        }
    }

    /// Side length of the square output.
    pub fn output_size(&self) -> u32 {
        self.transform.output_size()
    }

    /// Number of `f32` values [`apply`](Self::apply) writes: `3 * size * size`.
    pub fn output_len(&self) -> usize {
        let s = self.output_size() as usize;
        3 * s * s
    }

    /// The transform this transformer applies.
    pub fn transform(&self) -> &ImageTransform {
        &self.transform
    }

    /// Transforms `img` and writes the normalised result into `out`.
    ///
    /// Training: RandomResizedCrop (bicubic) -> horizontal flip -> RandAugment (if set) ->
    /// ToTensor -> Normalize, drawing from `rng` in that order. Evaluation: bicubic resize to
    /// a square, no randomness. An empty (0-pixel) image yields all zeros.
    ///
    /// # Shapes
    /// `out` must have length `3 * S * S` for `S = output_size()` (panics otherwise); it
    /// receives a CHW tensor (channel planes R, G, B, each row-major `S x S`) holding
    /// `(x / 255 - mean) / std`, exactly torchvision's `ToTensor` + `Normalize` layout.
    pub fn apply(&mut self, img: &image::RgbImage, rng: &mut Rng, out: &mut [f32]) {
        // SAFETY: `MaybeUninit<f32>` has the layout of `f32`, and `apply_uninit` only ever
        // stores initialised values, so `out` stays valid `f32`s.
        let out = unsafe { &mut *(out as *mut [f32] as *mut [MaybeUninit<f32>]) };
        self.apply_uninit(img, rng, out);
    }

    /// [`ImageTransformer::apply`] into memory that need not be initialised: every element
    /// of `out` is written. The loader writes straight into a batch's spare capacity, which
    /// saves zero-filling 786 KB per 256 px sample.
    pub fn apply_uninit(
        &mut self,
        img: &image::RgbImage,
        rng: &mut Rng,
        out: &mut [MaybeUninit<f32>],
    ) {
        assert_eq!(
            out.len(),
            self.output_len(),
            "ImageTransformer::apply: `out` must hold 3*size*size values"
        );
        let (w, h) = img.dimensions();
        if w == 0 || h == 0 {
            out.fill(MaybeUninit::new(0.0));
            return;
        }
        let Self {
            transform,
            lut,
            resizer,
            options,
            resized,
            between_passes,
            scratch,
        } = self;
        match transform {
            ImageTransform::Train(t) => {
                let crop = random_resized_crop_params(w, h, t.scale, t.ratio, rng);
                // torchvision draws the flip coin even when it lands on "no flip".
                let flip = rng.bernoulli(t.hflip_prob);
                resize_crop(resizer, options, img, crop, between_passes, resized);
                match &t.randaugment {
                    Some(cfg) => {
                        // RandAugment's ops are not mirror-symmetric, so the flip must
                        // really happen before them.
                        if flip {
                            image::imageops::flip_horizontal_in_place(resized);
                        }
                        randaugment::rand_augment_with_scratch(resized, cfg, rng, scratch);
                        write_chw(resized, lut, false, out);
                    }
                    // Without RandAugment the flip is folded into the normalising pass.
                    None => write_chw(resized, lut, flip, out),
                }
            }
            ImageTransform::Eval(_) => {
                resize_crop(resizer, options, img, (0, 0, w, h), between_passes, resized);
                write_chw(resized, lut, false, out);
            }
        }
    }
}

/// Resamples the `(left, top, width, height)` box of `src` to the size of `dst`, as
/// Pillow's `crop(box).resize(size, BICUBIC)` does.
///
/// Two details make the result match Pillow rather than merely resemble it:
/// - The box is given to the resizer as a cropped *view*: torchvision crops first and then
///   resizes the crop, so the filter must not read source pixels outside the box.
///   (`ResizeOptions::crop` behaves like Pillow's `resize(box=...)`, which does read them;
///   see the `pil_box_down_24` fixture.) The view also avoids copying the crop.
/// - Pillow resamples horizontally first and stores the intermediate rows as clipped u8,
///   while fast_image_resize runs the vertical pass first for u8 images. With bicubic
///   overshoot at edges the order changes results by up to ~10 levels, so when both axes
///   change the passes are run one at a time, horizontal first, through `between_passes`.
fn resize_crop(
    resizer: &mut fir::Resizer,
    options: &fir::ResizeOptions,
    src: &RgbImage,
    (left, top, width, height): (u32, u32, u32, u32),
    between_passes: &mut Vec<u8>,
    dst: &mut RgbImage,
) {
    const EXPECT_BUF: &str = "buffers hold width*height*3 bytes";
    const EXPECT_RESIZE: &str = "source and destination are both U8x3";
    let (sw, sh) = src.dimensions();
    let (dw, dh) = dst.dimensions();
    let src_view =
        fir::images::ImageRef::new(sw, sh, src.as_raw(), fir::PixelType::U8x3).expect(EXPECT_BUF);
    let cropped = fir::images::CroppedImage::new(&src_view, left, top, width, height)
        .expect("crop box lies inside the image");
    let mut dst_view =
        fir::images::Image::from_slice_u8(dw, dh, dst, fir::PixelType::U8x3).expect(EXPECT_BUF);
    if width == dw || height == dh {
        // At most one pass is needed; the resizer skips the other.
        resizer
            .resize(&cropped, &mut dst_view, options)
            .expect(EXPECT_RESIZE);
        return;
    }
    let len = dw as usize * height as usize * 3;
    if between_passes.len() < len {
        between_passes.resize(len, 0);
    }
    let mut mid = fir::images::Image::from_slice_u8(
        dw,
        height,
        &mut between_passes[..len],
        fir::PixelType::U8x3,
    )
    .expect(EXPECT_BUF);
    // Same height: horizontal pass only.
    resizer
        .resize(&cropped, &mut mid, options)
        .expect(EXPECT_RESIZE);
    // Same width: vertical pass only.
    resizer
        .resize(&mid, &mut dst_view, options)
        .expect(EXPECT_RESIZE);
}

/// HWC u8 -> CHW normalised f32 in one pass, optionally reading each row mirrored.
fn write_chw(img: &RgbImage, lut: &[[f32; 256]; 3], flip: bool, out: &mut [MaybeUninit<f32>]) {
    let s = img.width() as usize;
    let plane = s * img.height() as usize;
    debug_assert_eq!(out.len(), 3 * plane);
    if plane == 0 {
        return;
    }
    let (r_plane, rest) = out.split_at_mut(plane);
    let (g_plane, b_plane) = rest.split_at_mut(plane);
    let rows = img
        .as_raw()
        .chunks_exact(3 * s)
        .zip(r_plane.chunks_exact_mut(s))
        .zip(g_plane.chunks_exact_mut(s))
        .zip(b_plane.chunks_exact_mut(s));
    let [lr, lg, lb] = lut;
    for (((src, r), g), b) in rows {
        let dst = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
        type Slot<'a> = &'a mut MaybeUninit<f32>;
        let put = |((r, g), b): ((Slot, Slot), Slot), px: &[u8]| {
            r.write(lr[px[0] as usize]);
            g.write(lg[px[1] as usize]);
            b.write(lb[px[2] as usize]);
        };
        if flip {
            dst.zip(src.chunks_exact(3).rev())
                .for_each(|(d, px)| put(d, px));
        } else {
            dst.zip(src.chunks_exact(3)).for_each(|(d, px)| put(d, px));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn write_chw_init(img: &RgbImage, lut: &[[f32; 256]; 3], flip: bool, out: &mut [f32]) {
        let mut slots: Vec<MaybeUninit<f32>> = out.iter().map(|&v| MaybeUninit::new(v)).collect();
        write_chw(img, lut, flip, &mut slots);
        for (o, s) in out.iter_mut().zip(slots) {
            // SAFETY: write_chw initialises every slot (and they started initialised).
            *o = unsafe { s.assume_init() };
        }
    }
    use std::path::PathBuf;

    fn fixture(name: &str) -> Vec<u8> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/image_ops")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    fn fixture_f32(name: &str) -> Vec<f32> {
        fixture(name)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
    }

    fn input_png() -> RgbImage {
        let img = decode_rgb(&fixture("input.png"), 1 << 20).unwrap();
        assert_eq!(img.dimensions(), (61, 47));
        img
    }

    fn encode(img: &DynamicImage, format: image::ImageFormat) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        img.write_to(&mut buf, format).unwrap();
        buf.into_inner()
    }

    fn resize_with(img: &RgbImage, crop: (u32, u32, u32, u32), size: u32) -> RgbImage {
        let mut t = ImageTransformer::new(
            ImageTransform::Eval(EvalTransform { size }),
            Normalization::Clip,
        );
        let mut dst = RgbImage::new(size, size);
        resize_crop(
            &mut t.resizer,
            &t.options,
            img,
            crop,
            &mut Vec::new(),
            &mut dst,
        );
        dst
    }

    // Crop boxes of tests/fixtures/make_image_fixture.py, as (left, top, width, height).
    const CROP_DOWN: (u32, u32, u32, u32) = (7, 5, 40, 33);
    const CROP_UP: (u32, u32, u32, u32) = (20, 10, 13, 11);

    #[test]
    fn crop_resize_matches_pil() {
        let img = input_png();
        // Measured against Pillow 13.0: down bit-identical; up 8 of 1728 values off by 1
        // (fixed-point coefficient precision).
        let down = resize_with(&img, CROP_DOWN, 24);
        assert!(max_abs_diff(&down, &fixture("pil_crop_down_24.bin")) <= 1);
        let up = resize_with(&img, CROP_UP, 24);
        assert!(max_abs_diff(&up, &fixture("pil_crop_up_24.bin")) <= 1);
        // And it is not Pillow's `resize(box=...)`, which reads outside the box.
        assert!(max_abs_diff(&down, &fixture("pil_box_down_24.bin")) > 1);
    }

    #[test]
    fn eval_transform_matches_pil_and_torchvision() {
        let img = input_png();
        // Measured: 10 of 3072 values off by 1.
        let full = resize_with(&img, (0, 0, 61, 47), 32);
        assert!(max_abs_diff(&full, &fixture("pil_resize_32.bin")) <= 1);

        let mut t = ImageTransformer::new(
            ImageTransform::Eval(EvalTransform { size: 32 }),
            Normalization::Clip,
        );
        let mut out = vec![0.0; t.output_len()];
        t.apply(&img, &mut Rng::new(0), &mut out);
        let expected = fixture_f32("tv_resize_32_clip.f32");
        assert_eq!(out.len(), expected.len());
        let tol = 1.0 / 255.0 / CLIP_STD.iter().cloned().fold(f32::MAX, f32::min) + 1e-5;
        let worst = out
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= tol, "max abs diff {worst} > {tol}");
    }

    #[test]
    fn normalisation_is_torchvision_bit_exact_on_equal_pixels() {
        // Feed PIL's own resized pixels through the normalising pass: no resampling
        // difference is left, so the values must agree exactly.
        let pil = RgbImage::from_raw(32, 32, fixture("pil_resize_32.bin")).unwrap();
        let t = ImageTransformer::new(
            ImageTransform::Eval(EvalTransform { size: 32 }),
            Normalization::Clip,
        );
        let mut out = vec![0.0; 3 * 32 * 32];
        write_chw_init(&pil, &t.lut, false, &mut out);
        assert_eq!(out, fixture_f32("tv_resize_32_clip.f32"));
    }

    #[test]
    fn jpeg_decode_close_to_pil() {
        let ours = decode_rgb(&fixture("input_q90.jpg"), 1 << 20).unwrap();
        assert_eq!(ours.dimensions(), (61, 47));
        let pil = fixture("pil_jpeg_decode.bin");
        // Measured against Pillow 13.0 (libjpeg-turbo) on this noisy q90 4:2:0 image:
        // max abs diff 3, 73% of values identical, mean abs diff 0.33. zune-jpeg's IDCT
        // and chroma upsampling round differently from libjpeg-turbo's.
        let diff = max_abs_diff(&ours, &pil);
        assert!(diff <= 3, "max abs diff {diff}");
        let mean = ours
            .iter()
            .zip(&pil)
            .map(|(a, b)| f64::from(a.abs_diff(*b)))
            .sum::<f64>()
            / pil.len() as f64;
        assert!(mean < 0.5, "mean abs diff {mean}");
    }

    #[test]
    fn output_layout_is_chw() {
        // Left half pure red, right half pure blue; an identity-size eval resize keeps it.
        let mut img = RgbImage::new(4, 4);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = if x < 2 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            };
        }
        let mut t = ImageTransformer::new(
            ImageTransform::Eval(EvalTransform { size: 4 }),
            Normalization::Imagenet,
        );
        let mut out = vec![0.0; 48];
        t.apply(&img, &mut Rng::new(0), &mut out);
        let hi = |c: usize| (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        let lo = |c: usize| (0.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        for y in 0..4 {
            for x in 0..4 {
                let at = |c: usize| out[c * 16 + y * 4 + x];
                let left = x < 2;
                assert!((at(0) - if left { hi(0) } else { lo(0) }).abs() < 1e-6);
                assert!((at(1) - lo(1)).abs() < 1e-6);
                assert!((at(2) - if left { lo(2) } else { hi(2) }).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn hflip_mirrors() {
        let img = RgbImage::from_fn(8, 8, |x, y| image::Rgb([(x * 30) as u8, (y * 30) as u8, 7]));
        let t = ImageTransformer::new(
            ImageTransform::Eval(EvalTransform { size: 8 }),
            Normalization::Clip,
        );
        let mut plain = vec![0.0; 192];
        let mut flipped = vec![0.0; 192];
        write_chw_init(&img, &t.lut, false, &mut plain);
        write_chw_init(&img, &t.lut, true, &mut flipped);
        for c in 0..3 {
            for y in 0..8 {
                for x in 0..8 {
                    assert_eq!(flipped[c * 64 + y * 8 + x], plain[c * 64 + y * 8 + 7 - x]);
                }
            }
        }

        // Through the public path: with hflip_prob 1 and a full-image crop, the output is
        // the mirror of the unflipped one.
        let transform = |p: f64| {
            ImageTransform::Train(TrainTransform {
                size: 8,
                scale: (1.0, 1.0),
                ratio: (1.0, 1.0),
                hflip_prob: p,
                randaugment: None,
            })
        };
        let mut a = vec![0.0; 192];
        let mut b = vec![0.0; 192];
        ImageTransformer::new(transform(0.0), Normalization::Clip).apply(
            &img,
            &mut Rng::new(1),
            &mut a,
        );
        ImageTransformer::new(transform(1.0), Normalization::Clip).apply(
            &img,
            &mut Rng::new(1),
            &mut b,
        );
        assert_eq!(a, plain);
        assert_eq!(b, flipped);
    }

    #[test]
    fn eval_output_size_and_train_runs() {
        let img = input_png();
        let mut eval = ImageTransformer::new(
            ImageTransform::Eval(EvalTransform { size: 20 }),
            Normalization::Clip,
        );
        assert_eq!(eval.output_size(), 20);
        assert_eq!(eval.output_len(), 1200);
        let mut out = vec![f32::NAN; 1200];
        eval.apply(&img, &mut Rng::new(0), &mut out);
        assert!(out.iter().all(|v| v.is_finite()));

        let mut train = ImageTransformer::new(
            ImageTransform::Train(TrainTransform::albef_pretrain(24)),
            Normalization::Clip,
        );
        let mut rng = Rng::new(5);
        let mut out = vec![f32::NAN; train.output_len()];
        for _ in 0..50 {
            out.fill(f32::NAN);
            train.apply(&img, &mut rng, &mut out);
            assert!(out.iter().all(|v| v.is_finite()));
        }
        // Deterministic given the seed.
        let (mut x, mut y) = (vec![0.0; 1728], vec![0.0; 1728]);
        train.apply(&img, &mut Rng::new(9), &mut x);
        train.apply(&img, &mut Rng::new(9), &mut y);
        assert_eq!(x, y);
    }

    #[test]
    #[should_panic(expected = "3*size*size")]
    fn wrong_out_len_panics() {
        let mut t = ImageTransformer::new(
            ImageTransform::Eval(EvalTransform { size: 4 }),
            Normalization::Clip,
        );
        t.apply(&RgbImage::new(3, 3), &mut Rng::new(0), &mut [0.0; 10]);
    }

    #[test]
    fn empty_image_gives_zeros() {
        let mut t = ImageTransformer::new(
            ImageTransform::Train(TrainTransform::albef_pretrain(4)),
            Normalization::Clip,
        );
        let mut out = vec![1.0; 48];
        t.apply(&RgbImage::new(0, 5), &mut Rng::new(0), &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn crop_params_always_in_bounds() {
        let mut rng = Rng::new(11);
        let sizes = [
            (1, 1),
            (1, 300),
            (300, 1),
            (2, 3),
            (500, 375),
            (375, 500),
            (4000, 7),
        ];
        let configs = [
            ((0.2, 1.0), (3.0 / 4.0, 4.0 / 3.0)),
            ((0.5, 1.0), (3.0 / 4.0, 4.0 / 3.0)),
            ((0.08, 1.0), (0.1, 10.0)),
            ((1.0, 1.0), (1.0, 1.0)),
        ];
        for &(w, h) in &sizes {
            for &(scale, ratio) in &configs {
                for _ in 0..200 {
                    let (l, t, cw, ch) = random_resized_crop_params(w, h, scale, ratio, &mut rng);
                    assert!(cw >= 1 && ch >= 1, "{w}x{h}: empty crop");
                    assert!(l + cw <= w && t + ch <= h, "{w}x{h}: {l},{t},{cw},{ch}");
                }
            }
        }
        assert_eq!(
            random_resized_crop_params(0, 10, (0.2, 1.0), (0.75, 1.33), &mut rng),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn crop_area_fraction_follows_scale() {
        let mut rng = Rng::new(12);
        let (w, h) = (500u32, 375u32);
        let n = 20_000;
        // Mean area fractions of torchvision 0.29's get_params on a 500x375 image over
        // 40000 draws: rejected attempts (boxes too wide or too tall, which happen at large
        // areas) pull them below the midpoints of the scale ranges.
        for (scale, torchvision_mean) in [((0.2, 1.0), 0.4962), ((0.5, 1.0), 0.6621)] {
            let mut sum = 0.0;
            for _ in 0..n {
                let (_, _, cw, ch) =
                    random_resized_crop_params(w, h, scale, (3.0 / 4.0, 4.0 / 3.0), &mut rng);
                let frac = f64::from(cw * ch) / f64::from(w * h);
                // Rounding w and h moves the area a little outside the drawn fraction.
                assert!(frac >= scale.0 * 0.98 && frac <= 1.0, "{frac}");
                sum += frac;
            }
            let mean = sum / f64::from(n);
            assert!(
                (mean - torchvision_mean).abs() < 0.01,
                "{scale:?}: mean area fraction {mean}, torchvision {torchvision_mean}"
            );
        }
    }

    #[test]
    fn crop_fallback_is_centred_with_clamped_ratio() {
        let mut rng = Rng::new(13);
        // A 1000x10 strip cannot hold any box of aspect ~1 with 50%+ of its area, so all
        // ten attempts fail and the fallback crops the centre at the maximum ratio.
        let (l, t, w, h) =
            random_resized_crop_params(1000, 10, (0.5, 1.0), (3.0 / 4.0, 4.0 / 3.0), &mut rng);
        assert_eq!((w, h), (13, 10));
        assert_eq!((l, t), ((1000 - 13) / 2, 0));
        // Tall image: width kept, height = round(width / min ratio).
        let (l, t, w, h) =
            random_resized_crop_params(10, 1000, (0.5, 1.0), (3.0 / 4.0, 4.0 / 3.0), &mut rng);
        assert_eq!((w, h), (10, 13));
        assert_eq!((l, t), (0, (1000 - 13) / 2));
        // Inverted and non-positive ranges degrade to a valid box instead of panicking.
        let (l, t, w, h) = random_resized_crop_params(50, 40, (0.5, 1.0), (0.0, -1.0), &mut rng);
        assert!(w >= 1 && h >= 1 && l + w <= 50 && t + h <= 40);
    }

    #[test]
    fn python_rounding_is_half_to_even() {
        assert_eq!(py_round(2.5), 2.0);
        assert_eq!(py_round(3.5), 4.0);
        assert_eq!(py_round(2.4999), 2.0);
    }

    #[test]
    fn alpha_is_composited_on_white() {
        let mut rgba = image::RgbaImage::new(3, 1);
        rgba.put_pixel(0, 0, image::Rgba([255, 0, 0, 0])); // fully transparent red
        rgba.put_pixel(1, 0, image::Rgba([255, 0, 0, 255])); // opaque red
        rgba.put_pixel(2, 0, image::Rgba([0, 0, 0, 128])); // half-transparent black
        for format in [image::ImageFormat::Png, image::ImageFormat::WebP] {
            let bytes = encode(&DynamicImage::ImageRgba8(rgba.clone()), format);
            let rgb = decode_rgb(&bytes, 100).unwrap();
            assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255], "{format:?}");
            assert_eq!(rgb.get_pixel(1, 0).0, [255, 0, 0], "{format:?}");
            assert_eq!(rgb.get_pixel(2, 0).0, [127, 127, 127], "{format:?}");
        }
        // 16-bit with alpha and gray+alpha take the same path.
        let mut la16 = image::ImageBuffer::<image::LumaA<u16>, Vec<u16>>::new(2, 1);
        la16.put_pixel(0, 0, image::LumaA([0, 0]));
        la16.put_pixel(1, 0, image::LumaA([0, 65535]));
        let bytes = encode(&DynamicImage::ImageLumaA16(la16), image::ImageFormat::Png);
        let rgb = decode_rgb(&bytes, 100).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(rgb.get_pixel(1, 0).0, [0, 0, 0]);
    }

    #[test]
    fn grayscale_and_16_bit_decode_to_rgb() {
        let gray = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 50 + y) as u8]));
        let bytes = encode(&DynamicImage::ImageLuma8(gray), image::ImageFormat::Png);
        let rgb = decode_rgb(&bytes, 100).unwrap();
        assert_eq!(rgb.dimensions(), (5, 4));
        assert_eq!(rgb.get_pixel(3, 2).0, [152, 152, 152]);

        let rgb16 = image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(3, 2, |x, _| {
            image::Rgb([x as u16 * 257 * 100, 65535, 0])
        });
        let bytes = encode(&DynamicImage::ImageRgb16(rgb16), image::ImageFormat::Png);
        let rgb = decode_rgb(&bytes, 100).unwrap();
        assert_eq!(rgb.get_pixel(2, 1).0, [200, 255, 0]);

        let gray_jpeg = encode(
            &DynamicImage::ImageLuma8(image::GrayImage::from_pixel(16, 16, image::Luma([90]))),
            image::ImageFormat::Jpeg,
        );
        let rgb = decode_rgb(&gray_jpeg, 1000).unwrap();
        let p = rgb.get_pixel(8, 8).0;
        assert!(
            p[0] == p[1] && p[1] == p[2] && p[0].abs_diff(90) <= 1,
            "{p:?}"
        );
    }

    #[test]
    fn palette_png_decodes_to_rgb() {
        // 2x1 indexed PNG, palette [red, green], pixels [1, 0], written by hand because
        // the image crate cannot encode palettes.
        let bytes = palette_png();
        let rgb = decode_rgb(&bytes, 100).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [0, 255, 0]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 0, 0]);
    }

    fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    /// An RGB PNG of any declared size whose IDAT holds no valid data: reading its header
    /// works, decoding pixels fails (ingest's tests use it too).
    pub(crate) fn header_only_png(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = png_header(width, height, 2);
        png_chunk(&mut bytes, b"IDAT", &[0x78, 0x01]);
        png_chunk(&mut bytes, b"IEND", &[]);
        bytes
    }

    fn png_header(width: u32, height: u32, color_type: u8) -> Vec<u8> {
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&width.to_be_bytes());
        ihdr.extend_from_slice(&height.to_be_bytes());
        ihdr.extend_from_slice(&[8, color_type, 0, 0, 0]);
        png_chunk(&mut out, b"IHDR", &ihdr);
        out
    }

    /// zlib stream of `data` using stored (uncompressed) deflate blocks.
    fn zlib_stored(data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x78, 0x01, 0x01];
        let len = data.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(data);
        let (mut a, mut b) = (1u32, 0u32);
        for &d in data {
            a = (a + u32::from(d)) % 65521;
            b = (b + a) % 65521;
        }
        out.extend_from_slice(&((b << 16) | a).to_be_bytes());
        out
    }

    fn palette_png() -> Vec<u8> {
        let mut out = png_header(2, 1, 3);
        png_chunk(&mut out, b"PLTE", &[255, 0, 0, 0, 255, 0]);
        png_chunk(&mut out, b"IDAT", &zlib_stored(&[0, 1, 0]));
        png_chunk(&mut out, b"IEND", &[]);
        out
    }

    #[test]
    fn empty_and_garbage_are_corrupt() {
        for bytes in [
            &b""[..],
            b"hello, not an image",
            &[0xFF, 0xD8, 0xFF, 0xE0, 0, 0],
        ] {
            assert!(
                matches!(decode_rgb(bytes, 1 << 20), Err(DecodeError::Corrupt(_))),
                "{bytes:?}"
            );
            assert!(matches!(
                image_dimensions(bytes),
                Err(DecodeError::Corrupt(_))
            ));
        }
        // A valid header followed by a cut-off body.
        let jpg = fixture("input_q90.jpg");
        let png = fixture("input.png");
        assert!(matches!(
            decode_rgb(&png[..png.len() / 2], 1 << 20),
            Err(DecodeError::Corrupt(_))
        ));
        // Truncated JPEG data may decode (grey fill, like libjpeg's warning) or fail, but
        // never panics.
        let _ = decode_rgb(&jpg[..jpg.len() / 2], 1 << 20);
    }

    #[test]
    fn huge_header_is_refused_before_decoding() {
        // Only a header: a 20000x20000 RGB PNG would need 1.2 GB. The IDAT holds no valid
        // data, so reaching the pixel decoder would give Corrupt, not TooLarge.
        let bytes = header_only_png(20_000, 20_000);
        assert!(matches!(
            decode_rgb(&bytes, u64::MAX),
            Err(DecodeError::Corrupt(_))
        ));
        assert_eq!(image_dimensions(&bytes), Ok((20_000, 20_000)));
        let err = decode_rgb(&bytes, 50_000_000).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLarge {
                width: 20_000,
                height: 20_000,
                max_pixels: 50_000_000
            }
        );
        assert!(err.to_string().contains("400000000 pixels"), "{err}");

        // A real image just over the limit, and exactly at it.
        let png = fixture("input.png");
        assert!(matches!(
            decode_rgb(&png, 61 * 47 - 1),
            Err(DecodeError::TooLarge {
                width: 61,
                height: 47,
                ..
            })
        ));
        assert!(decode_rgb(&png, 61 * 47).is_ok());
        let jpg = fixture("input_q90.jpg");
        assert!(matches!(
            decode_rgb(&jpg, 100),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    /// An 8x8 RGB PNG with an iCCP chunk whose profile is `profile` (stored, not
    /// compressed) ahead of its pixels.
    fn png_with_profile(profile: &[u8]) -> Vec<u8> {
        let mut out = png_header(8, 8, 2);
        let mut iccp = b"icc\0\0".to_vec();
        iccp.extend(zlib_stored(profile));
        png_chunk(&mut out, b"iCCP", &iccp);
        let rows: Vec<u8> = (0..8).flat_map(|_| [0u8; 25]).collect();
        png_chunk(&mut out, b"IDAT", &zlib_stored(&rows));
        png_chunk(&mut out, b"IEND", &[]);
        out
    }

    #[test]
    fn what_a_decoder_may_allocate_follows_the_image_size_and_is_named_when_passed() {
        assert_eq!(decode_alloc_limit(8, 8), 8 * 8 * 8 + DECODE_SLACK_BYTES);
        assert_eq!(decode_alloc_limit(u32::MAX, u32::MAX), u64::MAX);
        // The largest image under the pixel limit keeps room for 16-bit RGBA.
        let (w, h) = (9459, 9459);
        assert!(w * h <= vlp_core::MAX_IMAGE_PIXELS);
        assert!(decode_alloc_limit(w as u32, h as u32) >= w * h * 8);

        let png = png_with_profile(&[7u8; 4000]);
        assert_eq!(image_dimensions(&png), Ok((8, 8)));
        let img = decode_rgb(&png, 64).unwrap();
        assert_eq!(img.dimensions(), (8, 8));
        // A profile larger than what the decoder may allocate past the pixels: refused,
        // naming the limit.
        let err = decode_within(&png, 64, 1000).unwrap_err();
        assert!(
            matches!(&err, DecodeError::Corrupt(m) if m.contains("allocation limit of 1512 bytes")),
            "{err}"
        );
        // A PNG must start with its IHDR: the size is read from there.
        let mut no_ihdr = png.clone();
        no_ihdr[12..16].copy_from_slice(b"iCCP");
        assert!(matches!(
            image_dimensions(&no_ihdr),
            Err(DecodeError::Corrupt(_))
        ));
    }

    #[test]
    fn webp_decodes_losslessly() {
        let img = input_png();
        let webp = encode(
            &DynamicImage::ImageRgb8(img.clone()),
            image::ImageFormat::WebP,
        );
        // Lossless WebP round-trips exactly.
        assert_eq!(decode_rgb(&webp, 1 << 20).unwrap(), img);
        assert_eq!(image_dimensions(&webp), Ok((61, 47)));
    }

    #[test]
    fn transform_constructors_and_serde() {
        let p = TrainTransform::albef_pretrain(256);
        assert_eq!(p.scale, (0.2, 1.0));
        assert_eq!(p.ratio, (0.75, 4.0 / 3.0));
        assert_eq!(p.hflip_prob, 0.5);
        assert_eq!(p.randaugment, Some(RandAugmentConfig { n: 2, m: 7 }));
        let f = TrainTransform::albef_finetune(384);
        assert_eq!((f.size, f.scale), (384, (0.5, 1.0)));
        assert_eq!(ImageTransform::Train(f).output_size(), 384);
        assert_eq!(
            serde_json::to_string(&Normalization::Imagenet).unwrap(),
            "\"imagenet\""
        );
        assert_eq!(
            serde_json::from_str::<Normalization>("\"clip\"").unwrap(),
            Normalization::Clip
        );
        let t = ImageTransform::Train(p);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(serde_json::from_str::<ImageTransform>(&json).unwrap(), t);
    }

    #[test]
    fn transformer_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<ImageTransformer>();
    }
}
