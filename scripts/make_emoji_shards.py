#!/usr/bin/env python3
"""Builds the embedded example data in shards/: emoji in two artists' styles as a real
image-caption retrieval set.

- Images: the 64x64 PNGs of the npm packages emoji-datasource-google@16.0.0 (Noto Emoji,
  Apache-2.0) and emoji-datasource-twitter@16.0.0 (Twemoji, CC-BY-4.0), flattened onto a
  white background and re-encoded as RGB PNG by `vlp shards write --format png`.
- Captions, two per image (like COCO's five): the lower-cased Unicode name
  ("grinning face with smiling eyes") and "label: tags" from emojibase-data@17.0.0
  ("grinning face with smiling eyes: eye, face, grin, smile").
- Image ids: the emoji's code points, shared by both styles.
- Only emoji that have an image in every style of emoji-datasource (1857).

google-style shards are for training, twitter-style shards the held-out zero-shot set:
a model that learned the concepts, not the pixels, transfers from one to the other.

    python3 scripts/make_emoji_shards.py --vlp target/release/vlp --out shards

Needs npm (to fetch the packages) and the vlp binary. Writes OUT/emoji-google-*.tar,
OUT/emoji-twitter-*.tar, their manifests, and OUT/emoji-tokenizer.json (WordPiece,
2000 tokens, trained on the captions).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {
    "google": "emoji-datasource-google@16.0.0",
    "twitter": "emoji-datasource-twitter@16.0.0",
    "emojibase": "emojibase-data@17.0.0",
}
STYLES_WITH_IMAGES = ("apple", "google", "twitter", "facebook")


def fetch(package: str, into: Path) -> Path:
    """`npm pack` the package and unpack it; returns its `package/` folder."""
    out = subprocess.run(["npm", "pack", package, "--silent"], cwd=into, check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    dest = into / package.replace("@", "-").replace("/", "-")
    dest.mkdir()
    with tarfile.open(into / out) as tar:
        tar.extractall(dest, filter="data")
    return dest / "package"


def second_caption(entry: dict, emojibase: dict[str, dict]) -> str:
    hexcode = entry["unified"].replace("-FE0F", "")
    base = emojibase.get(hexcode)
    if base is None:
        return entry["name"].lower() + ": " + ", ".join(entry["short_names"]).replace("_", " ")
    tags = base.get("tags") or []
    return base["label"] + (": " + ", ".join(tags) if tags else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vlp", default="target/release/vlp")
    ap.add_argument("--out", default="shards", type=Path)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pkgs = {name: fetch(spec, tmp) for name, spec in PACKAGES.items()}
        emoji = json.loads((pkgs["google"] / "emoji.json").read_text())
        emojibase = {e["hexcode"]: e for e in json.loads((pkgs["emojibase"] / "en" / "data.json").read_text())}
        chosen = sorted((e for e in emoji if all(e.get(f"has_img_{s}") for s in STYLES_WITH_IMAGES)),
                        key=lambda e: e["unified"])
        print(f"{len(chosen)} emoji with an image in every style")
        shards = {}
        for style in ("google", "twitter"):
            records = [{
                "image": f"img/{style}/64/{e['image']}",
                "caption": [e["name"].lower(), second_caption(e, emojibase)],
                "image_id": e["unified"].lower(),
            } for e in chosen]
            ann = tmp / f"{style}.json"
            ann.write_text(json.dumps(records))
            prefix = args.out / f"emoji-{style}"
            # The same seed shuffles both styles identically, so shard k of each holds the same emoji.
            subprocess.run([args.vlp, "shards", "write", "--json", str(ann), "--image-root", str(pkgs[style]),
                            "--out", str(prefix), "--per-shard", str(args.per_shard), "--format", "png",
                            "--shuffle-seed", str(args.seed)], check=True)
            last = (len(records) - 1) // args.per_shard
            shards[style] = f"{prefix}-{{000000..{last:06d}}}.tar"
        subprocess.run([args.vlp, "tokenizer", "train", shards["google"], "--out",
                        str(args.out / "emoji-tokenizer.json"), "--vocab-size", "2000"], check=True)


if __name__ == "__main__":
    main()
