"""The archive contract the builders write, and the pieces they share.

An archive is a directory of ``part-00000.parquet``, ``part-00001.parquet``, ... with the
columns of :data:`SCHEMA`. Rows keep the order the builder gives them, so the same source
always gives byte-identical shards.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from raymmc.io.shards import SCHEMA
from raymmc.io.storage import StorageOptions, resolve

SHARD_NAME = "part-{:05d}.parquet"
_SHARD_RE = re.compile(r"^part-\d{5,}\.parquet$")


@dataclass
class Items:
    """What a builder collected, column-wise, in output order."""

    ids: list[str]
    images: list[bytes | None]
    captions: list[str | None]
    labels: list[str | None]
    source: str  # where the data came from, e.g. "debian:tuxpaint-stamps-default=2022.06.04-1"
    notes: dict[str, Any] = field(default_factory=dict)  # selection rules, skipped counts

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not (len(self.images) == len(self.captions) == len(self.labels) == n):
            raise ValueError("Items columns must have equal lengths")
        if len(set(self.ids)) != n:
            dup = [k for k, c in Counter(self.ids).items() if c > 1][:5]
            raise ValueError(f"duplicate ids, e.g. {dup}")

    def limited(self, limit: int | None) -> "Items":
        """The class-proportional subset of :func:`stratified_subset` (``self`` if nothing is cut)."""
        keep = stratified_subset(self.labels, limit)
        if len(keep) == len(self.ids):
            return self
        return Items(
            ids=[self.ids[i] for i in keep],
            images=[self.images[i] for i in keep],
            captions=[self.captions[i] for i in keep],
            labels=[self.labels[i] for i in keep],
            source=self.source,
            notes={**self.notes, "limit": f"first items of each class, class-proportional: {len(keep)} of {len(self.ids)}"},
        )

    def table(self) -> pa.Table:
        return pa.table(
            {"id": self.ids, "image": self.images, "caption": self.captions, "label": self.labels},
            schema=SCHEMA,
        )


def stratified_subset(labels: Sequence[Any], limit: int | None) -> np.ndarray:
    """Indices (ascending) of a deterministic, class-proportional subset of at most ``limit`` items.

    Each class gets a quota proportional to its size (largest-remainder rounding, ties to the
    class that sorts first) and contributes its *first* items in source order. So a limited build
    keeps the class balance of the full one, and its ids are a subset of the full build's ids.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit}")
    keys = np.asarray([str(x) for x in labels])
    classes, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    exact = counts * (limit / n)
    quota = np.floor(exact).astype(int)
    # Hand the leftover slots to the largest fractional parts; np.argsort is stable, so ties go
    # to the class that sorts first.
    leftover = limit - int(quota.sum())
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:leftover]] += 1
    taken = np.zeros(len(classes), dtype=int)
    keep = np.zeros(n, dtype=bool)
    for i, c in enumerate(inverse):
        if taken[c] < quota[c]:
            taken[c] += 1
            keep[i] = True
    return np.flatnonzero(keep)


def encode_png(pixels: np.ndarray) -> bytes:
    """A 2-D uint8 array (grey) or HxWx3 (RGB) -> PNG bytes. Deterministic (no timestamps)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(
    table: pa.Table,
    out_uri: str,
    rows_per_shard: int,
    storage_options: StorageOptions | None = None,
) -> list[str]:
    """Write ``table`` as ``part-NNNNN.parquet`` files under ``out_uri``; return their paths.

    Shards left by an earlier build in the same directory are deleted first: a smaller rebuild
    must not leave stale rows behind. Other files there are left alone.
    """
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if table.num_rows == 0:
        raise ValueError("refusing to write an empty archive")
    table = table.cast(SCHEMA)
    fs, root = resolve(out_uri, storage_options)
    root = root.rstrip("/")
    fs.create_dir(root, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type == pafs.FileType.File and _SHARD_RE.match(info.base_name):
            fs.delete_file(info.path)
    paths = []
    for i, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        path = f"{root}/{SHARD_NAME.format(i)}"
        pq.write_table(table.slice(start, rows_per_shard), path, filesystem=fs)
        paths.append(path)
    return paths
