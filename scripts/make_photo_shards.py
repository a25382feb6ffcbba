#!/usr/bin/env python3
"""Photo-like benchmark shards: COCO-like 500x375 JPEGs (quality 90) cut from
scikit-image's sample photographs, with a short caption each, written as WebDataset
shards by `vlp shards write --folder`, plus a WordPiece tokenizer trained on them.

Tiny synthetic images flatter every loader; these cost what real photos cost to decode.

    python scripts/make_photo_shards.py --out /tmp/photo --count 2000 --vlp target/release/vlp

Needs: numpy, pillow, scikit-image (pip install scikit-image pillow).
Writes OUT/photo-000000.tar ... (500 samples each), OUT/photo-manifest.json,
OUT/tokenizer.json.
"""
from __future__ import annotations

import argparse
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import skimage.data as data
from PIL import Image, ImageEnhance

# (loader name, caption words): colour photographs of scikit-image's gallery.
PHOTOS = [
    ("astronaut", "an astronaut in a white suit posing in front of a flag"),
    ("coffee", "a cup of coffee on a saucer with a spoon"),
    ("chelsea", "a tabby cat looking to the side"),
    ("rocket", "a rocket standing on a launch pad under a blue sky"),
    ("hubble_deep_field", "many distant galaxies in a dark sky"),
    ("immunohistochemistry", "a stained tissue sample under a microscope"),
    ("retina", "a photograph of the back of a human eye"),
    ("colorwheel", "a circle of bright colours on a white background"),
]
W, H = 500, 375


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--vlp", default="target/release/vlp", help="the vlp binary")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sources = [(np.asarray(getattr(data, name)()), words) for name, words in PHOTOS]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i in range(args.count):
            pixels, words = sources[i % len(sources)]
            img = Image.fromarray(pixels).convert("RGB")
            # A random crop of 45-100% of the photo's shorter side, at the 4:3 aspect of COCO
            # images, scaled to 500x375, with mild brightness/contrast changes.
            scale = rng.uniform(0.45, 1.0)
            cw = min(img.width, int(round(min(img.width, img.height * 4 / 3) * scale)))
            ch = min(img.height, int(round(cw * 3 / 4)))
            left = rng.randint(0, img.width - cw)
            top = rng.randint(0, img.height - ch)
            img = img.crop((left, top, left + cw, top + ch)).resize((W, H), Image.BICUBIC)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
            img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.2))
            img.save(folder / f"{i:06d}.jpg", quality=90)
            (folder / f"{i:06d}.txt").write_text(f"{words.capitalize()}, photo {i}.\n")
        subprocess.run(
            [args.vlp, "shards", "write", "--folder", str(folder), "--out", str(args.out / "photo"),
             "--per-shard", str(args.per_shard), "--shuffle-seed", str(args.seed)],
            check=True,
        )
    subprocess.run(
        [args.vlp, "tokenizer", "train", f"{args.out}/photo-{{000000..{(args.count - 1) // args.per_shard:06d}}}.tar",
         "--out", str(args.out / "tokenizer.json"), "--vocab-size", "500", "--min-frequency", "1"],
        check=True,
    )


if __name__ == "__main__":
    main()
