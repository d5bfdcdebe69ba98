"""The same image under several ids: groups of usable items whose image bytes hash alike (``image_hash``,
written by the decode stage), found on Ray workers after the accounting pass.

Scraped archives hold many copies of one picture under different keys (mirrors, re-uploads); they are not
duplicate ids, so the accounting keeps them all. Here they are counted and a few groups listed for the manifest;
with ``archive.duplicate_images=drop`` every copy after the first (in input order) is also rejected as
``duplicate image: same bytes as <first id>``. The driver receives counts and the listed groups only; the dropped
rows' indices travel to the filter through the object store (memory grows with the duplicates, not the items).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raymmc.accounting import REJECT_SCHEMA
from raymmc.train.usable import ROWS_PER_PARTITION

COLUMNS = ["id", "image_hash", "source", "row", "index"]
IDS_SHOWN = 10  # ids listed per group in the manifest


@dataclass
class DuplicateImages:
    groups: int = 0  # hashes shared by 2+ usable items
    items: int = 0  # usable items in those groups
    dropped: int = 0  # copies rejected (drop mode)
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first groups: size and ids, first one first

    def to_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "items": self.items, "dropped": self.dropped, "examples": self.examples}


def copies(rows: pa.Table) -> pa.Table:
    """The rows of hashes held by 2+ rows, given every row of each hash: ``rank`` 0 is the first by input
    ``index``, ``first_id`` is its id, ``size`` the group's."""
    rows = rows.sort_by([("image_hash", "ascending"), ("index", "ascending")])
    hashes = rows.column("image_hash").to_pylist()
    ids = rows.column("id").to_pylist()
    keep, rank, first, size = [], [], [], []
    i = 0
    while i < len(hashes):
        j = i
        while j < len(hashes) and hashes[j] == hashes[i]:
            j += 1
        if j - i > 1:
            keep += range(i, j)
            rank += range(j - i)
            first += [ids[i]] * (j - i)
            size += [j - i] * (j - i)
        i = j
    out = rows.take(pa.array(keep, pa.int64()))
    out = out.append_column("rank", pa.array(rank, pa.int64()))
    out = out.append_column("first_id", pa.array(first, pa.string()))
    return out.append_column("size", pa.array(size, pa.int64()))


def _drop(batch: pa.Table, refs: list) -> pa.Table:
    import ray

    drop = np.concatenate([t.column("index").to_numpy() for t in ray.get(list(refs))]) if refs else np.array([])
    return batch.filter(pa.array(~np.isin(batch.column("index").to_numpy(), drop)))


def _rejects(batch: pa.Table) -> pa.Table:
    reasons = [f"duplicate image: same bytes as {f}" for f in batch.column("first_id").to_pylist()]
    return pa.table({"id": batch.column("id"), "reason": pa.array(reasons, pa.string()),
                     "source": batch.column("source"), "row": batch.column("row")}, schema=REJECT_SCHEMA)


def find_duplicate_images(dataset: Any, usable: int, *, drop: bool, shown: int, rejects_path: str,
                          rejects_filesystem: Any) -> tuple[Any, DuplicateImages]:
    """Group ``dataset``'s usable rows by image hash; with ``drop``, write the later copies into ``rejects_path``
    and return the dataset without them. Returns ``(dataset, DuplicateImages)``."""
    from ray.data.expressions import col

    from raymmc.raysession import ordered_execution

    if dataset is None or "image_hash" not in dataset.schema().names:
        return dataset, DuplicateImages()
    light = dataset.select_columns(COLUMNS).filter(expr=col("image_hash").is_not_null())
    if usable <= ROWS_PER_PARTITION:  # one task: no shuffle (its actors take seconds to start on any size)
        found = light.repartition(1).map_batches(copies, batch_format="pyarrow", batch_size=None)
    else:
        found = light.groupby("image_hash").map_groups(copies, batch_format="pyarrow")
    found = found.materialize()
    report = DuplicateImages(items=found.count())
    if report.items == 0:
        return dataset, report
    firsts = found.filter(expr=col("rank") == 0).materialize()
    report.groups = firsts.count()
    listed = {r["image_hash"] for r in firsts.take(shown)}
    if listed:
        members = found.filter(expr=(col("rank") < IDS_SHOWN)).filter(
            lambda r: r["image_hash"] in listed).take_all()
        groups: dict[str, dict[str, Any]] = {}
        for r in sorted(members, key=lambda r: (r["first_id"], r["rank"])):
            g = groups.setdefault(r["image_hash"], {"size": int(r["size"]), "ids": []})
            g["ids"].append(r["id"])
        report.examples = sorted(groups.values(), key=lambda g: g["ids"][0])
    if not drop:
        return dataset, report
    later = found.filter(expr=col("rank") > 0).materialize()
    report.dropped = later.count()
    later.map_batches(_rejects, batch_format="pyarrow").write_parquet(rejects_path, filesystem=rejects_filesystem)
    refs = later.select_columns(["index"]).materialize().to_arrow_refs()
    with ordered_execution():  # input order, as the accounting left it
        kept = dataset.map_batches(_drop, batch_format="pyarrow", fn_kwargs={"refs": refs}).materialize()
    return kept, report

