"""Tux Paint stamps (Debian ``tuxpaint-stamps-default``): a small real image + caption set.

Each stamp is ``stamps/<category>/.../<name>.png`` with ``<name>.txt`` beside it whose first
line is the English description (the other lines are translations, ``fr.utf8=...``).

Selection rules, applied in this order (package version 2022.06.04-1 in brackets):
  1. leave out the ``symbols`` category: letters, digits and signs, not objects [247 stamps];
  2. a stamp needs a PNG: SVG-only stamps are left out, since the feature decoder reads raster
     images only [163 outside ``symbols``]; where both exist the PNG is used;
  3. a PNG needs its caption ``.txt``: the ones without are the ``*_mirror.png`` pictures Tux
     Paint shows when a stamp is flipped, the same stamp rather than a new item [11];
  4. leave out categories with fewer than ``min_class_size`` (10) stamps: too small to be a
     cluster [naturalforces 3, medical 5, people 6, military 8].
This gives 516 stamps in 11 classes, the set the baselines in ENVIRONMENT.md were measured on.
PNG bytes are kept as they are (most are RGBA; the decoder composites alpha).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from raymmc.datasets.shards import Items
from raymmc.datasets.sources import DatasetError, fetch_deb

PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = "usr/share/tuxpaint/stamps"
EXCLUDED_CATEGORIES = ("symbols",)
MIN_CLASS_SIZE = 10


def read_caption(txt: Path) -> str:
    """The English description: the first line of the stamp's .txt, whitespace stripped."""
    text = txt.read_text(encoding="utf-8-sig", errors="replace")
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


def collect_from_dir(stamps: Path, *, min_class_size: int = MIN_CLASS_SIZE, source: str = "") -> Items:
    """Stamps under ``stamps`` (the ``.../tuxpaint/stamps`` folder), selected as in the module doc."""
    if not stamps.is_dir():
        raise DatasetError(f"{stamps} is not a directory: the {PACKAGE} package has no stamps where expected")
    skipped: Counter[str] = Counter()
    found: list[tuple[str, Path, str, str]] = []  # (id, png, caption, label)
    for dirpath, dirnames, filenames in os.walk(stamps):
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(stamps)
        if not rel_dir.parts:
            continue  # files directly under stamps/ have no category
        category = rel_dir.parts[0]
        names = set(filenames)
        for fname in sorted(names):
            stem, ext = os.path.splitext(fname)
            if ext == ".svg" and stem + ".png" not in names and stem + ".txt" in names:
                skipped[f"svg only ({category})" if category in EXCLUDED_CATEGORIES else "svg only"] += 1
            if ext != ".png":
                continue
            if category in EXCLUDED_CATEGORIES:
                skipped[f"category {category}"] += 1
                continue
            if stem + ".txt" not in names:
                skipped["png without caption .txt (mirror variants)"] += 1
                continue
            caption = read_caption(Path(dirpath) / (stem + ".txt"))
            if not caption:
                skipped["empty caption"] += 1
                continue
            item_id = "tuxpaint/" + (rel_dir / stem).as_posix()
            found.append((item_id, Path(dirpath) / fname, caption, category))

    sizes = Counter(label for _, _, _, label in found)
    small = {c: n for c, n in sorted(sizes.items()) if n < min_class_size}
    for c, n in small.items():
        skipped[f"class {c} smaller than min_class_size={min_class_size}"] += n
    found = sorted(f for f in found if f[3] not in small)
    if not found:
        raise DatasetError(f"no stamps selected under {stamps} (skipped: {dict(skipped)})")
    return Items(
        ids=[f[0] for f in found],
        images=[f[1].read_bytes() for f in found],
        captions=[f[2] for f in found],
        labels=[f[3] for f in found],
        source=source or str(stamps),
        notes={
            "skipped": dict(sorted(skipped.items())),
            "min_class_size": min_class_size,
            "excluded_categories": list(EXCLUDED_CATEGORIES),
        },
    )


def collect(cache_dir: Path, limit: int | None = None, *, min_class_size: int = MIN_CLASS_SIZE) -> Items:
    # Only images and captions: the package is mostly sound files (.ogg) no builder reads.
    deb = fetch_deb(PACKAGE, cache_dir, include=(f"{STAMPS_DIR}/*.png", f"{STAMPS_DIR}/*.svg", f"{STAMPS_DIR}/*.txt"))
    items = collect_from_dir(deb.root / STAMPS_DIR, min_class_size=min_class_size, source=deb.label)
    return items.limited(limit)
