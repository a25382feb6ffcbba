//! A deterministic synthetic image-text dataset: small RGB images of one or two coloured
//! shapes (circle, square, triangle; six colours; small or large) on a white or light
//! background, with compositional captions whose spatial relations match the drawing.
//!
//! Two shapes get the relation and its converse ("a small red circle left of a large blue
//! square" / "a large blue square right of a small red circle"); one shape gets its plain
//! description and its position ("a small red circle" / "a small red circle in the top
//! left"). Sample `index` of seed `seed` is a pure function of `(index, seed, size)`, so
//! the same arguments always give byte-identical shards.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{DataError, Result};
use crate::ingest::encode_rgb;
use crate::rng::{derive_seed, Rng};
use crate::writer::{sample_key, Manifest, ShardWriter};

/// Shapes that can be drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// Colour names and their base RGB values.
pub const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [215, 40, 40]),
    ("green", [40, 160, 60]),
    ("blue", [40, 80, 215]),
    ("yellow", [235, 200, 30]),
    ("purple", [135, 60, 185]),
    ("orange", [240, 135, 30]),
];

/// Where the first shape is relative to the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    pub const ALL: [Relation; 4] = [
        Relation::LeftOf,
        Relation::RightOf,
        Relation::Above,
        Relation::Below,
    ];

    pub fn words(self) -> &'static str {
        match self {
            Relation::LeftOf => "left of",
            Relation::RightOf => "right of",
            Relation::Above => "above",
            Relation::Below => "below",
        }
    }

    /// The relation seen from the other shape.
    pub fn converse(self) -> Relation {
        match self {
            Relation::LeftOf => Relation::RightOf,
            Relation::RightOf => Relation::LeftOf,
            Relation::Above => Relation::Below,
            Relation::Below => Relation::Above,
        }
    }
}

/// One drawn shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    pub shape: Shape,
    /// Index into [`COLOURS`].
    pub colour: usize,
    pub large: bool,
    /// Centre in pixels (x to the right, y downwards).
    pub cx: f32,
    pub cy: f32,
    /// Half the side of the shape's bounding square, in pixels.
    pub half: f32,
}

impl Object {
    /// "a small red circle".
    pub fn phrase(&self) -> String {
        format!(
            "a {} {} {}",
            if self.large { "large" } else { "small" },
            COLOURS[self.colour].0,
            self.shape.name()
        )
    }
}

/// What an image shows: one or two objects and, for two, how the first relates to the
/// second.
#[derive(Clone, Debug, PartialEq)]
pub struct Scene {
    pub background: [u8; 3],
    pub objects: Vec<Object>,
    pub relation: Option<Relation>,
}

/// One generated sample.
#[derive(Clone, Debug)]
pub struct SynthSample {
    pub image: RgbImage,
    /// Two captions (see the module documentation).
    pub captions: Vec<String>,
    /// `synth-s{seed}-{index:09}`: unique across seeds.
    pub image_id: String,
    pub scene: Scene,
}

/// Smallest and largest supported image side.
pub const MIN_SIZE: u32 = 16;
pub const MAX_SIZE: u32 = 1024;

/// Image encoding of synthetic shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SynthFormat {
    #[default]
    Png,
    /// JPEG at quality [`SYNTH_JPEG_QUALITY`].
    Jpg,
}

pub const SYNTH_JPEG_QUALITY: u8 = 95;

fn check_size(size: u32) -> Result<()> {
    if (MIN_SIZE..=MAX_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(DataError::config(
            "image-size",
            format!("{size} is not in {MIN_SIZE}..={MAX_SIZE}"),
        ))
    }
}

fn random_object(rng: &mut Rng, size: f32) -> Object {
    let large = rng.below(2) == 1;
    Object {
        shape: Shape::ALL[rng.below(3) as usize],
        colour: rng.below(COLOURS.len() as u64) as usize,
        large,
        cx: 0.0,
        cy: 0.0,
        half: size * if large { 0.2 } else { 0.11 },
    }
}

/// A random centre coordinate keeping a shape of half-extent `half` one pixel inside.
fn coord(rng: &mut Rng, size: f32, half: f32) -> f32 {
    rng.uniform_range((half + 1.0) as f64, (size - half - 1.0) as f64) as f32
}

/// True when `a` is unambiguously `rel` of `b`: their extents are apart by `gap` along the
/// relation's axis, and that axis dominates the offset between the centres.
pub fn relation_holds(a: &Object, b: &Object, rel: Relation, gap: f32) -> bool {
    let (along, across) = match rel {
        Relation::LeftOf => (b.cx - a.cx, b.cy - a.cy),
        Relation::RightOf => (a.cx - b.cx, a.cy - b.cy),
        Relation::Above => (b.cy - a.cy, b.cx - a.cx),
        Relation::Below => (a.cy - b.cy, a.cx - b.cx),
    };
    along - a.half - b.half >= gap && across.abs() * 2.0 <= along
}

fn region(obj: &Object, size: f32) -> &'static str {
    let third = |v: f32| {
        if v < size / 3.0 {
            0
        } else if v > size * 2.0 / 3.0 {
            2
        } else {
            1
        }
    };
    match (third(obj.cy), third(obj.cx)) {
        (0, 0) => "in the top left",
        (0, 1) => "at the top",
        (0, _) => "in the top right",
        (1, 0) => "on the left",
        (1, 1) => "in the centre",
        (1, _) => "on the right",
        (_, 0) => "in the bottom left",
        (_, 1) => "at the bottom",
        _ => "in the bottom right",
    }
}

fn scene(rng: &mut Rng, size: u32) -> Scene {
    let s = size as f32;
    let background = if rng.below(2) == 0 {
        [255, 255, 255]
    } else {
        [
            225 + rng.below(31) as u8,
            225 + rng.below(31) as u8,
            225 + rng.below(31) as u8,
        ]
    };
    let mut a = random_object(rng, s);
    if rng.below(4) == 0 {
        a.cx = coord(rng, s, a.half);
        a.cy = coord(rng, s, a.half);
        return Scene {
            background,
            objects: vec![a],
            relation: None,
        };
    }
    let mut b = random_object(rng, s);
    while (b.shape, b.colour, b.large) == (a.shape, a.colour, a.large) {
        b = random_object(rng, s);
    }
    let rel = Relation::ALL[rng.below(4) as usize];
    let gap = (s / 32.0).max(1.0);
    let mut placed = false;
    for _ in 0..200 {
        a.cx = coord(rng, s, a.half);
        a.cy = coord(rng, s, a.half);
        b.cx = coord(rng, s, b.half);
        b.cy = coord(rng, s, b.half);
        if relation_holds(&a, &b, rel, gap) {
            placed = true;
            break;
        }
    }
    if !placed {
        // Always feasible: centres a quarter of the canvas either side of the middle.
        let (da, db) = match rel {
            Relation::LeftOf | Relation::Above => (-0.25 * s, 0.25 * s),
            Relation::RightOf | Relation::Below => (0.25 * s, -0.25 * s),
        };
        let horizontal = matches!(rel, Relation::LeftOf | Relation::RightOf);
        let mid = s / 2.0;
        (a.cx, a.cy, b.cx, b.cy) = if horizontal {
            (mid + da, mid, mid + db, mid)
        } else {
            (mid, mid + da, mid, mid + db)
        };
    }
    Scene {
        background,
        objects: vec![a, b],
        relation: Some(rel),
    }
}

fn jitter(rng: &mut Rng, base: [u8; 3]) -> [u8; 3] {
    base.map(|c| (c as i32 + rng.below(25) as i32 - 12).clamp(0, 255) as u8)
}

fn inside(obj: &Object, x: f32, y: f32) -> bool {
    let (dx, dy, h) = (x - obj.cx, y - obj.cy, obj.half);
    match obj.shape {
        Shape::Circle => dx * dx + dy * dy <= h * h,
        Shape::Square => dx.abs() <= h * 0.9 && dy.abs() <= h * 0.9,
        Shape::Triangle => {
            // Apex at the top, base at the bottom of the bounding square.
            if dy > h || dy < -h {
                return false;
            }
            let width_at = (dy + h) / 2.0; // 0 at the apex, h at the base
            dx.abs() <= width_at
        }
    }
}

fn draw(scene: &Scene, colours: &[[u8; 3]], size: u32) -> RgbImage {
    const SUB: u32 = 4;
    let mut img = RgbImage::from_pixel(size, size, Rgb(scene.background));
    for (obj, colour) in scene.objects.iter().zip(colours) {
        let lo_x = (obj.cx - obj.half - 1.0).floor().max(0.0) as u32;
        let hi_x = ((obj.cx + obj.half + 1.0).ceil() as u32).min(size - 1);
        let lo_y = (obj.cy - obj.half - 1.0).floor().max(0.0) as u32;
        let hi_y = ((obj.cy + obj.half + 1.0).ceil() as u32).min(size - 1);
        for y in lo_y..=hi_y {
            for x in lo_x..=hi_x {
                let mut hits = 0u32;
                for j in 0..SUB {
                    for i in 0..SUB {
                        let px = x as f32 + (i as f32 + 0.5) / SUB as f32;
                        let py = y as f32 + (j as f32 + 0.5) / SUB as f32;
                        hits += inside(obj, px, py) as u32;
                    }
                }
                if hits == 0 {
                    continue;
                }
                let total = SUB * SUB;
                let p = img.get_pixel_mut(x, y);
                for c in 0..3 {
                    let v = p[c] as u32 * (total - hits) + colour[c] as u32 * hits;
                    p[c] = ((v + total / 2) / total) as u8;
                }
            }
        }
    }
    img
}

/// Generates sample `index` of the dataset with `seed`, as a `size`x`size` image.
/// `size` is clamped to [`MIN_SIZE`]..=[`MAX_SIZE`].
pub fn synth_sample(index: u64, seed: u64, size: u32) -> SynthSample {
    let size = size.clamp(MIN_SIZE, MAX_SIZE);
    let mut rng = Rng::new(derive_seed(&[seed, index]));
    let scene = scene(&mut rng, size);
    let colours: Vec<[u8; 3]> = scene
        .objects
        .iter()
        .map(|o| jitter(&mut rng, COLOURS[o.colour].1))
        .collect();
    let image = draw(&scene, &colours, size);
    let captions = match (scene.objects.as_slice(), scene.relation) {
        ([a, b], Some(rel)) => vec![
            format!("{} {} {}", a.phrase(), rel.words(), b.phrase()),
            format!("{} {} {}", b.phrase(), rel.converse().words(), a.phrase()),
        ],
        ([a, ..], _) => vec![
            a.phrase(),
            format!("{} {}", a.phrase(), region(a, size as f32)),
        ],
        _ => unreachable!("a scene has at least one object"),
    };
    SynthSample {
        image,
        captions,
        image_id: format!("synth-s{seed}-{index:09}"),
        scene,
    }
}

/// The image and captions of sample `index` (see [`synth_sample`]).
pub fn synth_record(index: u64, seed: u64, size: u32) -> (RgbImage, Vec<String>) {
    let s = synth_sample(index, seed, size);
    (s.image, s.captions)
}

/// Writes `count` synthetic samples as shards under `prefix` (keys `000000000`, ...;
/// `KEY.png` or `KEY.jpg` and `KEY.json` with both captions, the image id and
/// `"source": "synth"`), and the manifest.
pub fn write_synth(
    prefix: impl AsRef<Path>,
    count: u64,
    per_shard: usize,
    size: u32,
    seed: u64,
    format: SynthFormat,
) -> Result<Manifest> {
    check_size(size)?;
    let mut writer = ShardWriter::create(prefix, per_shard)?;
    let ext = match format {
        SynthFormat::Png => "png",
        SynthFormat::Jpg => "jpg",
    };
    for index in 0..count {
        let sample = synth_sample(index, seed, size);
        let bytes =
            encode_rgb(&sample.image, ext, SYNTH_JPEG_QUALITY).map_err(|e| DataError::Input {
                source_name: format!("synthetic sample {index}"),
                reason: format!("cannot encode: {e}"),
            })?;
        writer.write_captioned(
            &sample_key(index),
            ext,
            &bytes,
            &sample.captions,
            Some(&sample.image_id),
            "synth",
        )?;
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixel_close(p: &Rgb<u8>, c: [u8; 3]) -> bool {
        p.0.iter()
            .zip(c)
            .all(|(&a, b)| (a as i32 - b as i32).abs() <= 14)
    }

    /// Mean position of the pixels close to `colour`.
    fn centroid(img: &RgbImage, colour: [u8; 3]) -> Option<(f32, f32)> {
        let (mut sx, mut sy, mut n) = (0.0, 0.0, 0.0);
        for (x, y, p) in img.enumerate_pixels() {
            if pixel_close(p, colour) {
                sx += x as f32 + 0.5;
                sy += y as f32 + 0.5;
                n += 1.0;
            }
        }
        (n > 0.0).then(|| (sx / n, sy / n))
    }

    #[test]
    fn captions_match_the_drawn_positions() {
        let mut pairs = 0;
        let mut singles = 0;
        for index in 0..60 {
            let s = synth_sample(index, 3, 64);
            assert_eq!(s.image.dimensions(), (64, 64));
            assert_eq!(s.captions.len(), 2);
            match (s.scene.objects.as_slice(), s.scene.relation) {
                ([a, b], Some(rel)) => {
                    pairs += 1;
                    assert!(relation_holds(a, b, rel, 2.0), "{index}: {:?}", s.scene);
                    let expect = format!("{} {} {}", a.phrase(), rel.words(), b.phrase());
                    assert_eq!(s.captions[0], expect);
                    let converse =
                        format!("{} {} {}", b.phrase(), rel.converse().words(), a.phrase());
                    assert_eq!(s.captions[1], converse);
                    // Check the pixels themselves when the two colours differ.
                    if a.colour != b.colour {
                        let ca = centroid(&s.image, COLOURS[a.colour].1).unwrap();
                        let cb = centroid(&s.image, COLOURS[b.colour].1).unwrap();
                        let ok = match rel {
                            Relation::LeftOf => ca.0 < cb.0,
                            Relation::RightOf => ca.0 > cb.0,
                            Relation::Above => ca.1 < cb.1,
                            Relation::Below => ca.1 > cb.1,
                        };
                        assert!(ok, "{index}: {} but centroids {ca:?} {cb:?}", s.captions[0]);
                    }
                }
                ([a], None) => {
                    singles += 1;
                    assert_eq!(s.captions[0], a.phrase());
                    assert!(s.captions[1].starts_with(&a.phrase()));
                    let c = centroid(&s.image, COLOURS[a.colour].1).unwrap();
                    // A triangle's centroid sits a third of the way down from the centre.
                    let ey = match a.shape {
                        Shape::Triangle => a.cy + a.half / 3.0,
                        _ => a.cy,
                    };
                    assert!(
                        (c.0 - a.cx).abs() < 1.5 && (c.1 - ey).abs() < 1.5,
                        "{c:?} {a:?}"
                    );
                }
                other => panic!("unexpected scene {other:?}"),
            }
        }
        assert!(
            pairs > 30 && singles > 5,
            "{pairs} pairs, {singles} singles"
        );
    }

    #[test]
    fn known_caption_shapes() {
        let s = synth_sample(0, 0, 64);
        let words: Vec<&str> = s.captions[0].split(' ').collect();
        assert_eq!(words[0], "a");
        assert!(["small", "large"].contains(&words[1]));
        assert!(COLOURS.iter().any(|c| c.0 == words[2]));
        assert_eq!(s.image_id, "synth-s0-000000000");
    }

    #[test]
    fn samples_are_deterministic_and_seed_dependent() {
        for index in [0, 1, 17] {
            let a = synth_sample(index, 5, 48);
            let b = synth_sample(index, 5, 48);
            assert_eq!(a.image, b.image);
            assert_eq!(a.captions, b.captions);
        }
        let differ = (0..10).any(|i| synth_record(i, 5, 48).0 != synth_record(i, 6, 48).0);
        assert!(differ);
        // Small canvases still place both shapes apart.
        for index in 0..20 {
            let s = synth_sample(index, 1, 16);
            if let ([a, b], Some(rel)) = (s.scene.objects.as_slice(), s.scene.relation) {
                assert!(relation_holds(a, b, rel, 0.5), "{:?}", s.scene);
            }
        }
    }

    #[test]
    fn write_synth_is_byte_identical() {
        let dir = tempfile::tempdir().unwrap();
        let ma = write_synth(dir.path().join("a/s"), 7, 3, 32, 9, SynthFormat::Png).unwrap();
        let mb = write_synth(dir.path().join("b/s"), 7, 3, 32, 9, SynthFormat::Png).unwrap();
        assert_eq!(ma, mb);
        assert_eq!(ma.samples, 7);
        assert_eq!(ma.shards.len(), 3);
        for s in &ma.shards {
            assert_eq!(
                std::fs::read(dir.path().join("a").join(&s.file)).unwrap(),
                std::fs::read(dir.path().join("b").join(&s.file)).unwrap()
            );
        }
        let mj = write_synth(dir.path().join("j/s"), 2, 5, 32, 9, SynthFormat::Jpg).unwrap();
        assert_eq!(mj.samples, 2);
        assert!(write_synth(dir.path().join("x/s"), 1, 1, 8, 0, SynthFormat::Png).is_err());
    }
}
