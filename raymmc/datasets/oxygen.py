"""KDE's Oxygen icons (Debian ``oxygen-icon-theme``): a real image + caption set of desktop icons.

Each icon is ``usr/share/icons/oxygen/base/<size>/<category>/<name>.png``; the category (actions, apps,
devices, mimetypes, places, status, ...) is the label and the icon's name the caption, its words split at
``-`` and ``_`` ("document-open-recent" -> "document open recent", the words a desktop search matches).

Selection rules, in this order (package version 5:5.103.0-1 in brackets):
  1. regular PNG files only: the package's symlinks are aliases of another icon (one icon, several
     names), not new items [they are never extracted];
  2. one item per (category, name): the icon at the size nearest the encoders' 224 px input, preferring
     larger (128, 256, 64, 48, 32, 22, 16, 8 px);
  3. leave out categories with fewer than ``min_class_size`` (10) icons [animations 4, special 4].
This gives 1,415 icons in 10 classes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from raymmc.datasets.shards import Items
from raymmc.datasets.sources import DatasetError, fetch_deb

PACKAGE = "oxygen-icon-theme"
ICONS_DIR = "usr/share/icons/oxygen/base"
SIZES = ("128x128", "256x256", "64x64", "48x48", "32x32", "22x22", "16x16", "8x8")  # preference order
MIN_CLASS_SIZE = 10


def caption_of(name: str) -> str:
    return " ".join(name.replace("_", "-").split("-")).strip()


def collect_from_dir(base: Path, *, min_class_size: int = MIN_CLASS_SIZE, source: str = "") -> Items:
    if not base.is_dir():
        raise DatasetError(f"{base} is not a directory: the {PACKAGE} package has no icons where expected")
    chosen: dict[tuple[str, str], Path] = {}
    skipped: Counter[str] = Counter()
    for size in SIZES:
        for png in sorted((base / size).glob("*/*.png")) if (base / size).is_dir() else []:
            if png.is_symlink():
                skipped["symlink (an alias of another icon)"] += 1
                continue
            key = (png.parent.name, png.stem)
            if key in chosen:
                skipped["the same icon at another size"] += 1
            else:
                chosen[key] = png
    sizes = Counter(category for category, _ in chosen)
    small = {c: n for c, n in sorted(sizes.items()) if n < min_class_size}
    for c, n in small.items():
        skipped[f"class {c} smaller than min_class_size={min_class_size}"] += n
    found = sorted((k, p) for k, p in chosen.items() if k[0] not in small)
    if not found:
        raise DatasetError(f"no icons selected under {base} (skipped: {dict(skipped)})")
    return Items(
        ids=[f"oxygen/{category}/{name}" for (category, name), _ in found],
        images=[p.read_bytes() for _, p in found],
        captions=[caption_of(name) for (_, name), _ in found],
        labels=[category for (category, _), _ in found],
        source=source or str(base),
        notes={"skipped": dict(sorted(skipped.items())), "min_class_size": min_class_size,
               "size_preference": list(SIZES)},
    )


def collect(cache_dir: Path, limit: int | None = None, *, min_class_size: int = MIN_CLASS_SIZE) -> Items:
    deb = fetch_deb(PACKAGE, cache_dir, include=(f"{ICONS_DIR}/*.png",))
    return collect_from_dir(deb.root / ICONS_DIR, min_class_size=min_class_size, source=deb.label).limited(limit)
