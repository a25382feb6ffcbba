#!/usr/bin/env python3
"""Check that Python's `webdataset` reads shards written by `vlp shards write/synth`.

Usage: check_webdataset.py SPEC EXPECTED_COUNT

SPEC is a shard URL, a brace pattern (`out/train-{000000..000003}.tar`), a glob
(`out/train-*.tar`) or several of these separated by `::`. Every sample must have an
image (jpg/jpeg/png/webp) that PIL decodes and a caption (a non-empty `txt`, or a `json`
whose `caption` is a non-empty string or list of strings); keys must be unique and the
number of samples must equal EXPECTED_COUNT. Prints a JSON summary and exits 0 when all
checks pass, 1 when one fails, 2 on bad usage.
"""

import glob
import json
import sys
from collections import Counter

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand(spec):
    urls = []
    for part in spec.split("::"):
        if any(c in part for c in "*?["):
            found = sorted(glob.glob(part))
            if not found:
                raise SystemExit(f"no file matches {part}")
            urls.extend(found)
        else:
            try:
                from braceexpand import braceexpand  # a dependency of webdataset
            except ImportError:
                urls.append(part)
            else:
                urls.extend(braceexpand(part))
    return urls


def caption_of(sample):
    txt = sample.get("txt")
    if isinstance(txt, bytes):
        txt = txt.decode("utf-8")
    if isinstance(txt, str) and txt.strip():
        return txt
    meta = sample.get("json")
    if isinstance(meta, dict):
        cap = meta.get("caption")
        if isinstance(cap, str) and cap.strip():
            return cap
        if isinstance(cap, list) and cap and all(isinstance(c, str) and c.strip() for c in cap):
            return cap[0]
    return None


def main(argv):
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    spec, expected = argv[1], int(argv[2])

    import webdataset as wds

    urls = expand(spec)
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil")

    count = 0
    errors = []
    keys = Counter()
    exts = Counter()
    sizes = Counter()
    for sample in dataset:
        count += 1
        key = sample.get("__key__")
        keys[key] += 1
        fields = sorted(k for k in sample if not k.startswith("__"))
        exts.update(fields)
        image_keys = [k for k in fields if k in IMAGE_EXTS]
        if len(image_keys) != 1:
            errors.append(f"{key}: expected one image field, found {image_keys}")
        else:
            img = sample[image_keys[0]]
            try:
                img.load()
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise ValueError(f"size {w}x{h}")
                sizes[f"{w}x{h}"] += 1
            except Exception as e:  # noqa: BLE001 - report any decode failure
                errors.append(f"{key}: image does not decode: {e}")
        if caption_of(sample) is None:
            errors.append(f"{key}: no caption in txt or json")

    duplicates = [k for k, n in keys.items() if n > 1]
    if duplicates:
        errors.append(f"duplicate keys: {duplicates[:10]}")
    if count != expected:
        errors.append(f"read {count} samples, expected {expected}")

    summary = {
        "ok": not errors,
        "webdataset_version": getattr(wds, "__version__", "unknown"),
        "shards": len(urls),
        "samples": count,
        "expected": expected,
        "fields": dict(sorted(exts.items())),
        "image_sizes": dict(sizes.most_common(5)),
        "errors": errors[:20],
        "error_count": len(errors),
    }
    print(json.dumps(summary, indent=2))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
