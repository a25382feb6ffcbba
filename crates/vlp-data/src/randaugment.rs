//! ALBEF's RandAugment, re-implemented on `image::RgbImage`: the `RandomAugment(2, 7,
//! isPIL=True, augs=[Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX,
//! ShearY, TranslateX, TranslateY, Rotate])` of salesforce/ALBEF `dataset/randaugment.py`
//! (itself an OpenCV/numpy port of RandAugment, Cubuk et al. 2019).
//!
//! Semantics kept from ALBEF: `n` ops drawn uniformly with replacement from the ten, each
//! applied with probability 0.5 at level `m` of `MAX_LEVEL = 10`; enhance factors
//! `m/10 * 1.8 + 0.1`; shear `m/10 * 0.3`; translate `m/10 * 10` *pixels* (absolute, not a
//! fraction of the size); rotate `m/10 * 30` degrees; shear, translate and rotate take a
//! random sign; geometric ops are OpenCV's `warpAffine` (bilinear, fixed point) with border
//! value 128; AutoContrast and Equalize work per channel like `PIL.ImageOps`.
//!
//! Two deliberate differences, both places where ALBEF's numpy code overflows rather than
//! doing what it documents:
//! - AutoContrast: ALBEF negates the channel minimum as a `uint8` numpy scalar, which wraps
//!   (`-np.uint8(10) == 246`) and turns every channel whose minimum is above zero pure
//!   white. Here the channel is stretched to 0..255, as its docstring ("same output as
//!   PIL.ImageOps.autocontrast") intends.
//! - Sharpness: ALBEF casts the blended float image to `uint8` without clipping, so
//!   overshoots wrap around (300 -> 44); here they saturate.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// `RandomAugment(n, m)`: `n` ops per image at magnitude `m` (of 10).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RandAugmentConfig {
    /// Number of ops drawn (with replacement) per image.
    pub n: usize,
    /// Magnitude level, 0..=10 in ALBEF (larger values extrapolate).
    pub m: u32,
}

impl RandAugmentConfig {
    /// ALBEF's setting: `RandomAugment(2, 7)`.
    pub const fn albef() -> Self {
        RandAugmentConfig { n: 2, m: 7 }
    }
}

impl Default for RandAugmentConfig {
    fn default() -> Self {
        Self::albef()
    }
}

/// The operations of ALBEF's augmentation list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AugOp {
    Identity,
    AutoContrast,
    Equalize,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
}

/// Working memory of the RandAugment ops, reused between images so that a worker stops
/// allocating once it has seen one image of its output size.
#[derive(Clone, Debug, Default)]
pub struct AugScratch {
    /// Copy of the image before the op.
    pixels: Vec<u8>,
    /// Per-column (or per-value) integer terms.
    ints_a: Vec<i32>,
    ints_b: Vec<i32>,
}

/// ALBEF's `augs` list, in its order.
pub const ALBEF_OPS: [AugOp; 10] = [
    AugOp::Identity,
    AugOp::AutoContrast,
    AugOp::Equalize,
    AugOp::Brightness,
    AugOp::Sharpness,
    AugOp::ShearX,
    AugOp::ShearY,
    AugOp::TranslateX,
    AugOp::TranslateY,
    AugOp::Rotate,
];

const MAX_LEVEL: f64 = 10.0;
const TRANSLATE_CONST: f64 = 10.0;
/// Border value of the geometric ops (ALBEF's `replace_value`).
const FILL: u8 = 128;
/// Probability that a drawn op is applied.
const APPLY_PROB: f64 = 0.5;

impl AugOp {
    /// The op's argument at level `m`, before the random sign: enhance factor, shear
    /// factor, translation in pixels or rotation in degrees (0 for argument-less ops).
    pub fn magnitude(self, m: u32) -> f64 {
        let level = f64::from(m) / MAX_LEVEL;
        match self {
            AugOp::Identity | AugOp::AutoContrast | AugOp::Equalize => 0.0,
            AugOp::Brightness | AugOp::Sharpness => level * 1.8 + 0.1,
            AugOp::ShearX | AugOp::ShearY => level * 0.3,
            AugOp::TranslateX | AugOp::TranslateY => level * TRANSLATE_CONST,
            AugOp::Rotate => level * 30.0,
        }
    }

    /// Whether the argument gets a random sign.
    pub fn is_signed(self) -> bool {
        matches!(
            self,
            AugOp::ShearX | AugOp::ShearY | AugOp::TranslateX | AugOp::TranslateY | AugOp::Rotate
        )
    }

    /// Applies the op in place with its final (signed) argument.
    ///
    /// Geometry (OpenCV's forward-matrix convention, x right, y down): `ShearX(f)` maps
    /// `(x, y) -> (x + f*y, y)`, `TranslateX(t)` moves content by `-t` pixels in x
    /// (`TranslateY` likewise in y), `Rotate(d)` turns by `d` degrees counter-clockwise on
    /// screen about `(w/2, h/2)`.
    pub fn apply(self, img: &mut RgbImage, arg: f64, scratch: &mut AugScratch) {
        // ALBEF builds the shear and translate matrices with np.float32.
        let f32_arg = f64::from(arg as f32);
        match self {
            AugOp::Identity => {}
            AugOp::AutoContrast => autocontrast(img),
            AugOp::Equalize => equalize(img),
            AugOp::Brightness => brightness(img, arg),
            AugOp::Sharpness => sharpness(img, arg, scratch),
            AugOp::ShearX => warp_affine(img, [1.0, f32_arg, 0.0, 0.0, 1.0, 0.0], scratch),
            AugOp::ShearY => warp_affine(img, [1.0, 0.0, 0.0, f32_arg, 1.0, 0.0], scratch),
            AugOp::TranslateX => warp_affine(img, [1.0, 0.0, -f32_arg, 0.0, 1.0, 0.0], scratch),
            AugOp::TranslateY => warp_affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, -f32_arg], scratch),
            AugOp::Rotate => {
                let m = rotation_matrix(img.width(), img.height(), arg);
                warp_affine(img, m, scratch)
            }
        }
    }
}

/// Draws one op of ALBEF's list and decides whether and with which argument it applies.
fn draw_op(rng: &mut Rng, m: u32) -> Option<(AugOp, f64)> {
    let op = ALBEF_OPS[rng.below(ALBEF_OPS.len() as u64) as usize];
    if rng.uniform() > APPLY_PROB {
        return None;
    }
    let mut arg = op.magnitude(m);
    if op.is_signed() && rng.bernoulli(0.5) {
        arg = -arg;
    }
    Some((op, arg))
}

/// ALBEF's `RandomAugment(cfg.n, cfg.m)` on `img`, in place. Allocates its working memory;
/// see [`rand_augment_with_scratch`] for the allocation-free form.
pub fn rand_augment(img: &mut RgbImage, cfg: &RandAugmentConfig, rng: &mut Rng) {
    rand_augment_with_scratch(img, cfg, rng, &mut AugScratch::default());
}

/// [`rand_augment`] with caller-owned working memory, so that a worker reusing `scratch`
/// allocates nothing once it has grown to one image.
pub fn rand_augment_with_scratch(
    img: &mut RgbImage,
    cfg: &RandAugmentConfig,
    rng: &mut Rng,
    scratch: &mut AugScratch,
) {
    for _ in 0..cfg.n {
        if let Some((op, arg)) = draw_op(rng, cfg.m) {
            op.apply(img, arg, scratch);
        }
    }
}

/// Applies one 256-entry table per channel.
fn apply_luts(img: &mut RgbImage, luts: &[[u8; 256]; 3]) {
    for px in img.chunks_exact_mut(3) {
        for (v, lut) in px.iter_mut().zip(luts) {
            *v = lut[*v as usize];
        }
    }
}

fn histograms(img: &RgbImage) -> [[u32; 256]; 3] {
    let mut hist = [[0u32; 256]; 3];
    for px in img.chunks_exact(3) {
        for (h, &v) in hist.iter_mut().zip(px) {
            h[v as usize] += 1;
        }
    }
    hist
}

/// Per channel, maps [min, max] linearly onto [0, 255] (truncating, as PIL does).
fn autocontrast(img: &mut RgbImage) {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; 3];
    for (lut, h) in luts.iter_mut().zip(&hist) {
        let lo = h.iter().position(|&n| n > 0);
        let hi = h.iter().rposition(|&n| n > 0);
        match (lo, hi) {
            (Some(lo), Some(hi)) if hi > lo => {
                let scale = 255.0 / (hi - lo) as f64;
                let offset = -(lo as f64) * scale;
                for (i, slot) in lut.iter_mut().enumerate() {
                    *slot = (i as f64 * scale + offset).clamp(0.0, 255.0) as u8;
                }
            }
            _ => identity_lut(lut),
        }
    }
    apply_luts(img, &luts);
}

fn identity_lut(lut: &mut [u8; 256]) {
    for (i, slot) in lut.iter_mut().enumerate() {
        *slot = i as u8;
    }
}

/// PIL's `ImageOps.equalize`, per channel: the cumulative histogram, excluding the last
/// occupied bin, is spread evenly over 0..=255.
fn equalize(img: &mut RgbImage) {
    let hist = histograms(img);
    let mut luts = [[0u8; 256]; 3];
    for (lut, h) in luts.iter_mut().zip(&hist) {
        let total: u64 = h.iter().map(|&n| u64::from(n)).sum();
        let last = h.iter().rev().find(|&&n| n > 0).copied().unwrap_or(0);
        let step = (total - u64::from(last)) / 255;
        if step == 0 {
            identity_lut(lut);
            continue;
        }
        let mut acc = step / 2;
        for (slot, &n) in lut.iter_mut().zip(h) {
            *slot = (acc / step).min(255) as u8;
            acc += u64::from(n);
        }
    }
    apply_luts(img, &luts);
}

/// ALBEF's brightness: `v * factor` in float32, clipped, truncated (not PIL's blend).
fn brightness(img: &mut RgbImage, factor: f64) {
    let factor = factor as f32;
    let mut lut = [0u8; 256];
    for (i, slot) in lut.iter_mut().enumerate() {
        *slot = (i as f32 * factor).clamp(0.0, 255.0) as u8;
    }
    for v in img.iter_mut() {
        *v = lut[*v as usize];
    }
}

/// OpenCV's `BORDER_REFLECT_101` index.
fn reflect101(i: isize, len: usize) -> usize {
    let len = len as isize;
    if len == 1 {
        return 0;
    }
    let mut i = i;
    if i < 0 {
        i = -i;
    }
    if i >= len {
        i = 2 * len - 2 - i;
    }
    i.clamp(0, len - 1) as usize
}

/// cv2.filter2D's result for the smoothing kernel: `round(s / 13)` of the weighted sum `s`
/// (never exactly halfway for an integer `s`).
fn smooth_round(s: i32) -> i32 {
    (2 * s + 13) / 26
}

/// Blend between the image and a 3x3-smoothed copy (kernel 1 1 1 / 1 5 1 / 1 1 1, over 13).
/// As in ALBEF, the outermost rows and columns keep their values unless `factor` is 0.
fn sharpness(img: &mut RgbImage, factor: f64, scratch: &mut AugScratch) {
    if factor == 1.0 {
        return;
    }
    let (w, h) = (img.width() as usize, img.height() as usize);
    scratch.pixels.clear();
    scratch.pixels.extend_from_slice(img.as_raw());
    let src = &scratch.pixels[..];
    if factor == 0.0 {
        // ALBEF returns the smoothed image itself, borders included (OpenCV reflects).
        let out: &mut [u8] = img;
        let at = |x: isize, y: isize, c: usize| {
            i32::from(src[(reflect101(y, h) * w + reflect101(x, w)) * 3 + c])
        };
        for y in 0..h as isize {
            for x in 0..w as isize {
                for c in 0..3 {
                    let mut s = 4 * at(x, y, c);
                    for dy in -1..=1 {
                        for dx in -1..=1 {
                            s += at(x + dx, y + dy, c);
                        }
                    }
                    out[(y as usize * w + x as usize) * 3 + c] = smooth_round(s) as u8;
                }
            }
        }
        return;
    }
    if w < 3 || h < 3 {
        return;
    }
    let stride = 3 * w;
    let f = factor as f32;
    let colsum = &mut scratch.ints_a;
    colsum.clear();
    colsum.resize(stride, 0);
    let out: &mut [u8] = img;
    for y in 1..h - 1 {
        let up = &src[(y - 1) * stride..y * stride];
        let cur = &src[y * stride..(y + 1) * stride];
        let down = &src[(y + 1) * stride..(y + 2) * stride];
        for (((s, &a), &b), &c) in colsum.iter_mut().zip(up).zip(cur).zip(down) {
            *s = i32::from(a) + i32::from(b) + i32::from(c);
        }
        let out_row = &mut out[y * stride + 3..(y + 1) * stride - 3];
        // Byte i and its left/right neighbours i -/+ 3 of the same channel.
        let left = &colsum[..stride - 6];
        let mid = &colsum[3..stride - 3];
        let right = &colsum[6..];
        let centre = &cur[3..stride - 3];
        for ((((o, &l), &m), &r), &x) in
            out_row.iter_mut().zip(left).zip(mid).zip(right).zip(centre)
        {
            let x = i32::from(x);
            let d = smooth_round(l + m + r + 4 * x) as f32;
            // float32 like ALBEF's numpy; saturate where ALBEF's cast wraps.
            let v = d + f * (x as f32 - d);
            *o = v.clamp(0.0, 255.0) as u8;
        }
    }
}

/// `cv2.getRotationMatrix2D((w/2, h/2), degrees, 1)`.
fn rotation_matrix(w: u32, h: u32, degrees: f64) -> [f64; 6] {
    let (cx, cy) = (f64::from(w) / 2.0, f64::from(h) / 2.0);
    let rad = degrees.to_radians();
    let (a, b) = (rad.cos(), rad.sin());
    [
        a,
        b,
        (1.0 - a) * cx - b * cy,
        -b,
        a,
        b * cx + (1.0 - a) * cy,
    ]
}

/// OpenCV's `cvRound`: nearest, ties to even, saturating.
fn cv_round(v: f64) -> i32 {
    v.round_ties_even() as i32
}

/// `cv2.warpAffine(img, m, (w, h), flags=INTER_LINEAR, borderValue=(FILL,)*3)` with `m` the
/// forward (source -> destination) 2x3 matrix, row-major.
///
/// Follows OpenCV's fixed-point scheme so results match it, not just approximately: source
/// coordinates in 1/1024 steps rounded to 1/32 of a pixel, bilinear weights in 1/32768,
/// and neighbours outside the image read as the border value.
fn warp_affine(img: &mut RgbImage, m: [f64; 6], scratch: &mut AugScratch) {
    const AB_SCALE: f64 = 1024.0;
    const ROUND_DELTA: i32 = 16; // AB_SCALE / INTER_TAB_SIZE / 2
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return;
    }
    // cv::invertAffineTransform.
    let det = m[0] * m[4] - m[1] * m[3];
    let d = if det != 0.0 { 1.0 / det } else { 0.0 };
    let (a11, a22, a12, a21) = (m[4] * d, m[0] * d, -m[1] * d, -m[3] * d);
    let b1 = -a11 * m[2] - a12 * m[5];
    let b2 = -a21 * m[2] - a22 * m[5];

    // OpenCV rounds the x-dependent and the y-dependent terms separately.
    let AugScratch {
        pixels,
        ints_a: x_delta,
        ints_b: y_delta,
    } = scratch;
    x_delta.clear();
    x_delta.extend((0..w).map(|x| cv_round(a11 * x as f64 * AB_SCALE)));
    y_delta.clear();
    y_delta.extend((0..w).map(|x| cv_round(a21 * x as f64 * AB_SCALE)));
    pixels.clear();
    pixels.extend_from_slice(img.as_raw());
    let src = &pixels[..];
    let stride = 3 * w;
    let fill = i32::from(FILL);
    let fetch = |sx: i32, sy: i32, c: usize| -> i32 {
        if sx >= 0 && sy >= 0 && (sx as usize) < w && (sy as usize) < h {
            i32::from(src[sy as usize * stride + sx as usize * 3 + c])
        } else {
            fill
        }
    };
    let out: &mut [u8] = img;
    for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let yf = y as f64;
        let x0 = cv_round((a12 * yf + b1) * AB_SCALE).saturating_add(ROUND_DELTA);
        let y0 = cv_round((a22 * yf + b2) * AB_SCALE).saturating_add(ROUND_DELTA);
        for ((px, &dx), &dy) in out_row.chunks_exact_mut(3).zip(&*x_delta).zip(&*y_delta) {
            let xq = x0.saturating_add(dx) >> 5;
            let yq = y0.saturating_add(dy) >> 5;
            let (sx, fx) = (xq >> 5, xq & 31);
            let (sy, fy) = (yq >> 5, yq & 31);
            // (1-a)(1-b) etc. in multiples of 1/1024, scaled to 1/32768: exact, sum 32768.
            let w00 = (32 - fx) * (32 - fy) * 32;
            let w01 = fx * (32 - fy) * 32;
            let w10 = (32 - fx) * fy * 32;
            let w11 = fx * fy * 32;
            let round = |sum: i32| ((sum + (1 << 14)) >> 15).clamp(0, 255) as u8;
            if sx >= 0 && sy >= 0 && (sx as usize) + 1 < w && (sy as usize) + 1 < h {
                let i0 = sy as usize * stride + sx as usize * 3;
                let (p0, p1) = (&src[i0..i0 + 6], &src[i0 + stride..i0 + stride + 6]);
                for c in 0..3 {
                    let sum = w00 * i32::from(p0[c])
                        + w01 * i32::from(p0[c + 3])
                        + w10 * i32::from(p1[c])
                        + w11 * i32::from(p1[c + 3]);
                    px[c] = round(sum);
                }
            } else {
                for (c, v) in px.iter_mut().enumerate() {
                    let sum = w00 * fetch(sx, sy, c)
                        + w01 * fetch(sx + 1, sy, c)
                        + w10 * fetch(sx, sy + 1, c)
                        + w11 * fetch(sx + 1, sy + 1, c);
                    *v = round(sum);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Vec<u8> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/image_ops")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The 29x23 RandAugment input of tests/fixtures/make_image_fixture.py.
    fn ra_input() -> RgbImage {
        RgbImage::from_raw(29, 23, fixture("ra_input.bin")).unwrap()
    }

    fn applied(op: AugOp, arg: f64, img: &RgbImage) -> RgbImage {
        let mut out = img.clone();
        op.apply(&mut out, arg, &mut AugScratch::default());
        out
    }

    /// (max abs diff, number of differing values)
    fn diff(a: &[u8], b: &[u8]) -> (u8, usize) {
        assert_eq!(a.len(), b.len());
        let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        (max, a.iter().zip(b).filter(|(x, y)| x != y).count())
    }

    #[test]
    fn ops_match_opencv_and_pil_references() {
        let img = ra_input();
        let m = 7;
        let cases = [
            (
                AugOp::ShearX,
                AugOp::ShearX.magnitude(m),
                "ra_shear_x_pos.bin",
            ),
            (
                AugOp::ShearY,
                -AugOp::ShearY.magnitude(m),
                "ra_shear_y_neg.bin",
            ),
            (
                AugOp::TranslateX,
                AugOp::TranslateX.magnitude(m),
                "ra_translate_x_pos.bin",
            ),
            (
                AugOp::TranslateY,
                -AugOp::TranslateY.magnitude(m),
                "ra_translate_y_neg.bin",
            ),
            (
                AugOp::Rotate,
                AugOp::Rotate.magnitude(m),
                "ra_rotate_pos.bin",
            ),
            (
                AugOp::Rotate,
                -AugOp::Rotate.magnitude(m),
                "ra_rotate_neg.bin",
            ),
            (
                AugOp::Brightness,
                AugOp::Brightness.magnitude(m),
                "ra_brightness.bin",
            ),
            (
                AugOp::Sharpness,
                AugOp::Sharpness.magnitude(m),
                "ra_sharpness.bin",
            ),
            (AugOp::AutoContrast, 0.0, "ra_autocontrast.bin"),
            (AugOp::Equalize, 0.0, "ra_equalize.bin"),
        ];
        for (op, arg, name) in cases {
            let ours = applied(op, arg, &img);
            let (max, count) = diff(&ours, &fixture(name));
            // Measured: bit-identical for all ten (OpenCV 4.14, Pillow 13.0, numpy 2.4).
            assert!(
                max == 0,
                "{op:?}({arg}) vs {name}: max diff {max} in {count} values"
            );
        }
    }

    #[test]
    fn magnitudes_at_albef_level() {
        assert!((AugOp::Brightness.magnitude(7) - 1.36).abs() < 1e-12);
        assert!((AugOp::ShearX.magnitude(7) - 0.21).abs() < 1e-12);
        assert!((AugOp::TranslateY.magnitude(7) - 7.0).abs() < 1e-12);
        assert!((AugOp::Rotate.magnitude(7) - 21.0).abs() < 1e-12);
        assert_eq!(AugOp::Equalize.magnitude(7), 0.0);
        // Level 5 is the neutral enhance factor.
        assert_eq!(AugOp::Sharpness.magnitude(5), 1.0);
    }

    #[test]
    fn identity_and_neutral_args_leave_image_unchanged() {
        let img = ra_input();
        assert_eq!(applied(AugOp::Identity, 0.0, &img), img);
        assert_eq!(applied(AugOp::Brightness, 1.0, &img), img);
        assert_eq!(applied(AugOp::Sharpness, 1.0, &img), img);
        for op in [
            AugOp::ShearX,
            AugOp::ShearY,
            AugOp::TranslateX,
            AugOp::Rotate,
        ] {
            assert_eq!(applied(op, 0.0, &img), img, "{op:?}");
        }
    }

    #[test]
    fn autocontrast_stretches_each_channel() {
        let img = RgbImage::from_fn(10, 10, |x, y| {
            image::Rgb([50 + (x * 10) as u8, 100 + y as u8, 7])
        });
        let out = applied(AugOp::AutoContrast, 0.0, &img);
        for c in 0..3 {
            let vals: Vec<u8> = out.pixels().map(|p| p.0[c]).collect();
            let (lo, hi) = (*vals.iter().min().unwrap(), *vals.iter().max().unwrap());
            if c < 2 {
                assert_eq!((lo, hi), (0, 255), "channel {c}");
            } else {
                // A constant channel is left alone.
                assert_eq!((lo, hi), (7, 7));
            }
        }
        // Channel 0 spans 50..=140: 90 maps to (90 - 50) * 255 / 90 = 113.3 -> 113.
        assert_eq!(out.get_pixel(4, 0).0[0], 113);
    }

    #[test]
    fn equalize_flattens_histogram() {
        // Four equally common grey levels crammed into 10..13 (green: 40..43).
        let img = RgbImage::from_fn(32, 32, |_, y| {
            let v = (y / 8) as u8;
            image::Rgb([10 + v, 40 + v, 10 + v])
        });
        let out = applied(AugOp::Equalize, 0.0, &img);
        // step = (1024 - 256) / 255 = 3; level i maps to (1 + 256 i) / 3, capped at 255.
        for (y, expect) in [(0, 0), (8, 85), (16, 171), (31, 255)] {
            assert_eq!(out.get_pixel(5, y).0, [expect; 3], "row {y}");
        }
        // A single-colour image has nothing to equalise.
        let flat = RgbImage::from_pixel(5, 5, image::Rgb([9, 9, 9]));
        assert_eq!(applied(AugOp::Equalize, 0.0, &flat), flat);
    }

    #[test]
    fn brightness_scales_and_clips() {
        let img = RgbImage::from_vec(3, 1, vec![100, 0, 255, 10, 187, 188, 1, 2, 3]).unwrap();
        let out = applied(AugOp::Brightness, 1.36, &img);
        assert_eq!(&out.as_raw()[..6], &[136, 0, 255, 13, 254, 255]);
    }

    #[test]
    fn translate_moves_pixels_and_fills_grey() {
        let img = RgbImage::from_fn(10, 6, |x, y| image::Rgb([x as u8 * 20, y as u8 * 40, 1]));
        // +3 moves content 3 pixels left; the 3 rightmost columns become fill.
        let out = applied(AugOp::TranslateX, 3.0, &img);
        for y in 0..6 {
            for x in 0..10 {
                let expect = if x < 7 {
                    img.get_pixel(x + 3, y).0
                } else {
                    [FILL; 3]
                };
                assert_eq!(out.get_pixel(x, y).0, expect, "({x},{y})");
            }
        }
        // -2 in y moves content 2 pixels down.
        let out = applied(AugOp::TranslateY, -2.0, &img);
        for y in 0..6 {
            for x in 0..10 {
                let expect = if y >= 2 {
                    img.get_pixel(x, y - 2).0
                } else {
                    [FILL; 3]
                };
                assert_eq!(out.get_pixel(x, y).0, expect, "({x},{y})");
            }
        }
    }

    #[test]
    fn rotate_90_turns_counter_clockwise() {
        // About (w/2, h/2) = (2, 2) of a 4x4 image, +90 degrees maps source (x, y) to
        // (y, 4 - x): dst(X, Y) = src(4 - Y, X), with row 0 falling outside.
        let img = RgbImage::from_fn(4, 4, |x, y| image::Rgb([(10 * y + x) as u8, 0, 0]));
        let out = applied(AugOp::Rotate, 90.0, &img);
        for y in 0..4u32 {
            for x in 0..4u32 {
                let expect = if y == 0 {
                    FILL
                } else {
                    img.get_pixel(4 - y, x).0[0]
                };
                assert_eq!(out.get_pixel(x, y).0[0], expect, "({x},{y})");
            }
        }
    }

    #[test]
    fn shear_x_keeps_row_zero() {
        let img = ra_input();
        let out = applied(AugOp::ShearX, 0.21, &img);
        // Row 0 has y = 0, so x + f*y = x: unchanged. Lower rows shift right.
        assert_eq!(&out.as_raw()[..29 * 3], &img.as_raw()[..29 * 3]);
        assert_ne!(out, img);
        assert_eq!(out.get_pixel(0, 22).0, [FILL; 3]);
    }

    #[test]
    fn sharpness_keeps_border_and_sharpens_interior() {
        let mut img = RgbImage::from_pixel(5, 5, image::Rgb([100, 100, 100]));
        img.put_pixel(2, 2, image::Rgb([200, 0, 100]));
        let out = applied(AugOp::Sharpness, 1.36, &img);
        // Smoothed centre: (8*100 + 5*200)/13 = 138.46 -> 138; 138 + 1.36*(200-138) = 222.3.
        assert_eq!(out.get_pixel(2, 2).0, [222, 0, 100]);
        // Green: (800 + 0)/13 = 61.5 -> 62; 62 + 1.36*(0-62) = -22.3 -> saturates to 0.
        for (x, y, p) in out.enumerate_pixels() {
            if x == 0 || y == 0 || x == 4 || y == 4 {
                assert_eq!(p.0, [100, 100, 100]);
            }
        }
        // Tiny images have no interior and pass through.
        let tiny = RgbImage::from_pixel(2, 7, image::Rgb([1, 2, 3]));
        assert_eq!(applied(AugOp::Sharpness, 1.9, &tiny), tiny);
        // Factor 0 is the smoothed image everywhere, borders reflected.
        let smooth = applied(AugOp::Sharpness, 0.0, &img);
        assert_eq!(smooth.get_pixel(2, 2).0[0], 138);
        assert_eq!(smooth.get_pixel(0, 0).0[0], 100);
    }

    #[test]
    fn draws_cover_all_ops_with_albef_probabilities() {
        let mut rng = Rng::new(21);
        let mut counts = std::collections::HashMap::new();
        let (mut applied_n, mut negative, mut signed) = (0, 0, 0);
        let n = 20_000;
        for _ in 0..n {
            if let Some((op, arg)) = draw_op(&mut rng, 7) {
                applied_n += 1;
                *counts.entry(op).or_insert(0) += 1;
                if op.is_signed() {
                    signed += 1;
                    negative += usize::from(arg < 0.0);
                }
            }
        }
        let rate = applied_n as f64 / n as f64;
        assert!((0.48..0.52).contains(&rate), "apply rate {rate}");
        assert_eq!(counts.len(), 10);
        assert!(
            counts.values().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        let neg = negative as f64 / signed as f64;
        assert!((0.46..0.54).contains(&neg), "negative fraction {neg}");
    }

    #[test]
    fn rand_augment_is_seeded_and_sometimes_identity() {
        let img = ra_input();
        let cfg = RandAugmentConfig::albef();
        let run = |seed| {
            let mut out = img.clone();
            rand_augment(&mut out, &cfg, &mut Rng::new(seed));
            out
        };
        assert_eq!(run(3), run(3));
        // P(unchanged) is about 0.25 (both skipped) + chances of Identity: well inside (0, 1).
        let unchanged = (0..400).filter(|&s| run(s) == img).count();
        assert!((60..220).contains(&unchanged), "{unchanged}");
        // n = 0 never touches the image.
        let mut out = img.clone();
        rand_augment(
            &mut out,
            &RandAugmentConfig { n: 0, m: 7 },
            &mut Rng::new(1),
        );
        assert_eq!(out, img);
    }

    #[test]
    fn config_serde_round_trip() {
        let cfg = RandAugmentConfig::albef();
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(json, r#"{"n":2,"m":7}"#);
        assert_eq!(
            serde_json::from_str::<RandAugmentConfig>(&json).unwrap(),
            cfg
        );
    }
}
