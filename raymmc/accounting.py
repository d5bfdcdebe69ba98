"""Account for every input row: usable (clustered) or rejected with a reason.

Rules, applied to the extracted feature table (ordered by file, then row):
- a row with no id is rejected ("missing id"), and so is an unusable id (a control character such as NUL,
  invalid UTF-8, longer than ``max_id_chars``: see ``raymmc.features.decode.id_problem``);
- an id seen before (earlier file, or earlier row of the same file) is rejected as a duplicate,
  naming where it was first seen; the first occurrence is kept;
- a row with neither a usable image nor a usable caption is rejected with the reasons of both;
- a row that lost one modality (corrupt image, empty caption) is kept, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raymmc.features.decode import DecodeConfig, id_problem

REJECT_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("source", pa.string()),
                           ("row", pa.int64())])


@dataclass
class Accounting:
    usable: pa.Table  # rows to cluster
    keep: np.ndarray  # bool mask over the input table: which rows are usable
    rejects: pa.Table  # id, reason, source, row
    duplicates: int
    missing_id: int


def account(table: pa.Table, modalities: frozenset[str] = frozenset({"image", "text"}),
            decode: DecodeConfig | None = None) -> Accounting:
    """Split ``table`` into usable rows and rejects. ``modalities``: what this run clusters on
    (an image-only algorithm or view rejects rows that only have a caption, and says so)."""
    decode = decode or DecodeConfig()
    use_image = "image" in modalities or "pixels" in modalities
    use_text = "text" in modalities
    ids = table.column("id").to_pylist()
    sources = table.column("source").to_pylist()
    rows = table.column("row").to_pylist()
    has_image = table.column("has_image").to_numpy(zero_copy_only=False).astype(bool)
    has_text = table.column("has_text").to_numpy(zero_copy_only=False).astype(bool)
    image_note = table.column("image_note").to_pylist()
    caption_note = table.column("caption_note").to_pylist()

    keep = np.zeros(len(ids), dtype=bool)
    reasons: list[tuple[str | None, str, str, int]] = []
    first_seen: dict[str, tuple[str, int]] = {}
    duplicates = missing = 0
    for i, id_ in enumerate(ids):
        problem = id_problem(id_, decode)
        if problem is not None:
            missing += int(problem == "missing id")  # the other id problems are counted as rejects only
            reasons.append((id_ or None, problem, sources[i], rows[i]))
            continue
        if id_ in first_seen:
            duplicates += 1
            src, row = first_seen[id_]
            reasons.append((id_, f"duplicate id: first seen in {src} row {row}", sources[i], rows[i]))
            continue
        first_seen[id_] = (sources[i], rows[i])
        if (use_image and has_image[i]) or (use_text and has_text[i]):
            keep[i] = True
            continue
        why = [image_note[i] or "no image", caption_note[i] or "no caption"]
        if has_image[i]:
            why[0] = "image present but this run does not use images"
        if has_text[i]:
            why[1] = "caption present but this run does not use text"
        reasons.append((id_, "; ".join(why), sources[i], rows[i]))
    rejects = pa.table(
        {
            "id": pa.array([r[0] for r in reasons], pa.string()),
            "reason": pa.array([r[1] for r in reasons], pa.string()),
            "source": pa.array([r[2] for r in reasons], pa.string()),
            "row": pa.array([r[3] for r in reasons], pa.int64()),
        },
        schema=REJECT_SCHEMA,
    )
    return Accounting(table.filter(pa.array(keep)), keep, rejects, duplicates, missing)


def item_notes(table: pa.Table) -> list[str]:
    """Per usable row: why a modality was dropped ("" when nothing was)."""
    notes = []
    for img, cap in zip(table.column("image_note").to_pylist(), table.column("caption_note").to_pylist()):
        notes.append("; ".join(n for n in (img, cap) if n))
    return notes
