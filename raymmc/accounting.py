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
import pyarrow.compute as pc

from raymmc.features.decode import DecodeConfig, id_problem

REJECT_SCHEMA = pa.schema([("id", pa.string()), ("reason", pa.string()), ("source", pa.string()),
                           ("row", pa.int64())])


LIGHT_COLUMNS = ["id", "source", "row", "has_image", "has_text", "image_note", "caption_note"]


@dataclass
class Accounting:
    usable: pa.Table  # rows to cluster
    keep: np.ndarray  # bool mask over the input table: which rows are usable
    rejects: pa.Table  # id, reason, source, row
    duplicates: int
    missing_id: int


def row_reasons(table: pa.Table, modalities: frozenset[str], decode: DecodeConfig | None = None) -> pa.Table:
    """The rules that need only the row itself, for every row of ``table`` (its LIGHT_COLUMNS):
    ``id_problem`` (why the id is unusable, or null), ``missing`` (no id at all) and ``unusable`` (why the
    row has nothing this run clusters on, or null)."""
    decode = decode or DecodeConfig()
    use_image = "image" in modalities or "pixels" in modalities
    use_text = "text" in modalities
    ids = table.column("id").to_pylist()
    has_image = table.column("has_image").to_numpy(zero_copy_only=False).astype(bool)
    has_text = table.column("has_text").to_numpy(zero_copy_only=False).astype(bool)
    image_note = table.column("image_note").to_pylist()
    caption_note = table.column("caption_note").to_pylist()
    problems, unusable = [], []
    for i, id_ in enumerate(ids):
        problems.append(id_problem(id_, decode))
        if (use_image and has_image[i]) or (use_text and has_text[i]):
            unusable.append(None)
            continue
        why = [image_note[i] or "no image", caption_note[i] or "no caption"]
        if has_image[i]:
            why[0] = "image present but this run does not use images"
        if has_text[i]:
            why[1] = "caption present but this run does not use text"
        unusable.append("; ".join(dict.fromkeys(why)))  # a reason given for both views (a source reject) once
    return pa.table({"id_problem": pa.array(problems, pa.string()),
                     "missing": pa.array([p == "missing id" for p in problems], pa.bool_()),
                     "unusable": pa.array(unusable, pa.string())})


def id_rejects(rows: pa.Table) -> pa.Table:
    """REJECT_SCHEMA rows of the rows (LIGHT_COLUMNS + row_reasons) whose id is unusable."""
    bad = rows.filter(pc.is_valid(rows.column("id_problem")))
    ids = [i or None for i in bad.column("id").to_pylist()]
    return pa.table({"id": pa.array(ids, pa.string()), "reason": bad.column("id_problem"),
                     "source": bad.column("source").cast(pa.string()), "row": bad.column("row").cast(pa.int64())},
                    schema=REJECT_SCHEMA)


def id_group_rejects(rows: pa.Table) -> pa.Table:
    """The rejects among rows with a usable id, given *every* row of each of their ids (a hash partition by
    id): an id's later occurrences, in (source, row) order, are duplicates naming the first; a first
    occurrence with nothing usable is rejected for that. Adds a ``duplicate`` flag to REJECT_SCHEMA."""
    rows = rows.sort_by([("id", "ascending"), ("source", "ascending"), ("row", "ascending")])
    ids, sources, rownums = (rows.column(c).to_pylist() for c in ("id", "source", "row"))
    unusable = rows.column("unusable").to_pylist()
    out: dict[str, list] = {"id": [], "reason": [], "source": [], "row": [], "duplicate": []}
    first = None
    for i, id_ in enumerate(ids):
        if i == 0 or id_ != ids[i - 1]:
            first = (sources[i], rownums[i])
            if unusable[i] is None:
                continue
            reason, dup = unusable[i], False
        else:
            reason, dup = f"duplicate id: first seen in {first[0]} row {first[1]}", True
        for key, value in (("id", id_), ("reason", reason), ("source", sources[i]), ("row", rownums[i]),
                           ("duplicate", dup)):
            out[key].append(value)
    return pa.table({"id": pa.array(out["id"], pa.string()), "reason": pa.array(out["reason"], pa.string()),
                     "source": pa.array(out["source"], pa.string()), "row": pa.array(out["row"], pa.int64()),
                     "duplicate": pa.array(out["duplicate"], pa.bool_())})


def account(table: pa.Table, modalities: frozenset[str] = frozenset({"image", "text"}),
            decode: DecodeConfig | None = None) -> Accounting:
    """Split ``table`` into usable rows and rejects, in one process: the same rules as the distributed
    pass (``raymmc.train.usable``), built from the same kernels (and tested equal to it)."""
    rows = pa.Table.from_arrays([*table.select(LIGHT_COLUMNS).columns, *row_reasons(table, modalities, decode).columns],
                                names=[*LIGHT_COLUMNS, "id_problem", "missing", "unusable"])
    valid = rows.filter(pc.is_null(rows.column("id_problem")))
    grouped = id_group_rejects(valid)
    rejects = pa.concat_tables([id_rejects(rows), grouped.drop_columns(["duplicate"])])
    rejected = set(zip(rejects.column("source").to_pylist(), rejects.column("row").to_pylist()))
    keep = np.array([(s, r) not in rejected for s, r in zip(table.column("source").to_pylist(),
                                                            table.column("row").to_pylist())], dtype=bool)
    return Accounting(table.filter(pa.array(keep)), keep,
                      rejects.sort_by([("source", "ascending"), ("row", "ascending")]),
                      int(pc.sum(grouped.column("duplicate")).as_py() or 0), int(pc.sum(rows.column("missing")).as_py() or 0))


def item_notes(table: pa.Table) -> list[str]:
    """Per usable row: why a modality was dropped ("" when nothing was)."""
    notes = []
    for img, cap in zip(table.column("image_note").to_pylist(), table.column("caption_note").to_pylist()):
        notes.append("; ".join(n for n in (img, cap) if n))
    return notes
