"""The in-memory record batch every format's reader yields: the shard contract's columns plus provenance,
so that decoding, encoding and accounting are the same whatever the archive looks like.

Columns: ``id``, ``image`` (encoded bytes), ``caption``, ``label``, ``source`` (file URI), ``row`` (the item's
position in that file), and where a reader has something to say: ``reject`` (the item is unusable at the source,
e.g. img2dataset's failed download: the reason), ``image_issue`` / ``caption_issue`` (a note on that view, e.g. a
caption that was not UTF-8), ``image_feat`` / ``text_feat`` (precomputed vectors, null where unusable)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa

BASE = pa.schema([("id", pa.string()), ("image", pa.binary()), ("caption", pa.string()), ("label", pa.string()),
                  ("source", pa.string()), ("row", pa.int64())])
NOTES = ("reject", "image_issue", "caption_issue")


def records(ids: Sequence, images: Sequence, captions: Sequence, labels: Sequence, source: str, first_row: int,
            notes: dict[str, Sequence[str | None]] | None = None,
            vectors: dict[str, pa.Array] | None = None) -> pa.Table:
    """One record batch. ``notes``: optional NOTES columns; ``vectors``: ``image_feat`` / ``text_feat``."""
    n = len(ids)
    cols = {
        "id": pa.array(ids, pa.string()), "image": pa.array(images, pa.binary()),
        "caption": pa.array(captions, pa.string()), "label": pa.array(labels, pa.string()),
        "source": pa.array([source] * n, pa.string()),
        "row": pa.array(np.arange(first_row, first_row + n), pa.int64()),
    }
    for name in NOTES:
        if notes and name in notes:
            cols[name] = pa.array(notes[name], pa.string())
    for name, arr in (vectors or {}).items():
        cols[name] = arr
    return pa.table(cols)


def text_of(raw: bytes | None, what: str) -> tuple[str | None, str | None]:
    """Bytes of a text member or field -> ``(text, note)``: text that is not UTF-8 keeps its readable part (the
    shard contract's rule for such captions) and says so."""
    if raw is None:
        return None, None
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return raw.decode("utf-8", errors="replace"), f"{what}: not valid UTF-8 (byte {exc.start}); bad bytes replaced"


def label_text(value: object) -> str | None:
    return None if value is None else str(value)
