"""Two runs' assignments side by side on Ray workers: the items they share, paired by id.

Both runs' ``(id, cluster)`` rows are hash-partitioned by id (as the accounting pass finds duplicate ids);
each partition joins its two sides with Arrow, and the driver receives only the O(K²) counts of
(previous cluster, current cluster) pairs. The paired rows stay in the object store for the bounded
list of moved items the drift report shows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymmc.train.usable import ROWS_PER_PARTITION, id_buckets


def _tag(batch: pa.Table, side: int, partitions: int) -> pa.Table:
    ids = batch.column("id").cast(pa.string())
    bucket = id_buckets(ids, partitions)
    return pa.table({"id": ids, "cluster": batch.column("cluster").cast(pa.int64()),
                     "side": pa.array([side] * batch.num_rows, pa.int8()), "bucket": pa.array(bucket, pa.int64())})


def _join_sides(group: pa.Table) -> pa.Table:
    """One partition: the ids on both sides, with their previous and current cluster."""
    prev = group.filter(pc.equal(group.column("side"), 0)).select(["id", "cluster"]).rename_columns(["id", "previous"])
    cur = group.filter(pc.equal(group.column("side"), 1)).select(["id", "cluster"]).rename_columns(["id", "current"])
    return prev.join(cur, "id", join_type="inner").select(["id", "previous", "current"])


def _pair_counts(batch: pa.Table) -> pa.Table:
    if batch.num_rows == 0:
        return pa.table({"previous": pa.array([], pa.int64()), "current": pa.array([], pa.int64()),
                         "n": pa.array([], pa.int64())})
    counts = batch.group_by(["previous", "current"]).aggregate([("id", "count")])
    return pa.table({"previous": counts.column("previous"), "current": counts.column("current"),
                     "n": counts.column("id_count").cast(pa.int64())})


@dataclass
class Overlap:
    """``matrix[i, j]``: items in previous cluster ``previous_ids[i]`` and current cluster ``current_ids[j]``;
    ``pairs``: the shared items' ``(id, previous, current)`` rows (a materialised Ray Dataset)."""

    previous_ids: np.ndarray
    current_ids: np.ndarray
    matrix: np.ndarray
    pairs: object

    def submatrix(self, previous_ids, current_ids) -> np.ndarray:
        """The counts on the given ids (zero rows/columns for ids without shared items)."""
        rows = {int(c): i for i, c in enumerate(self.previous_ids)}
        cols = {int(c): j for j, c in enumerate(self.current_ids)}
        out = np.zeros((len(previous_ids), len(current_ids)), dtype=np.int64)
        for a, p in enumerate(previous_ids):
            for b, c in enumerate(current_ids):
                if int(p) in rows and int(c) in cols:
                    out[a, b] = self.matrix[rows[int(p)], cols[int(c)]]
        return out


def assignment_overlap(previous, current, n_rows: int, rows_per_partition: int = ROWS_PER_PARTITION) -> Overlap:
    """``previous`` / ``current``: Ray Datasets with ``id`` and ``cluster`` columns (ids unique within each,
    as the accounting pass guarantees); ``n_rows`` their total size (with ``rows_per_partition``, sets the
    number of id partitions)."""
    partitions = int(min(1024, max(1, n_rows // rows_per_partition)))
    tagged = previous.map_batches(_tag, batch_format="pyarrow", fn_kwargs={"side": 0, "partitions": partitions}).union(
        current.map_batches(_tag, batch_format="pyarrow", fn_kwargs={"side": 1, "partitions": partitions}))
    if partitions == 1:  # one task, no shuffle (the groupby's actors take seconds to start at any size)
        pairs = tagged.repartition(1).map_batches(_join_sides, batch_format="pyarrow", batch_size=None)
    else:
        pairs = tagged.groupby("bucket").map_groups(_join_sides, batch_format="pyarrow")
    pairs = pairs.materialize()
    rows = pairs.map_batches(_pair_counts, batch_format="pyarrow").take_all()  # O(blocks x K²) rows
    prev_col = np.array([r["previous"] for r in rows], dtype=np.int64)
    cur_col = np.array([r["current"] for r in rows], dtype=np.int64)
    n = np.array([r["n"] for r in rows], dtype=np.int64)
    previous_ids, current_ids = np.unique(prev_col), np.unique(cur_col)
    matrix = np.zeros((len(previous_ids), len(current_ids)), dtype=np.int64)
    np.add.at(matrix, (np.searchsorted(previous_ids, prev_col), np.searchsorted(current_ids, cur_col)),
              n)
    return Overlap(previous_ids.astype(np.int64), current_ids.astype(np.int64), matrix, pairs)


def cluster_sizes(dataset) -> dict[int, int]:
    """Items per ``cluster`` of a Ray Dataset (O(K) rows reach the driver)."""
    def count(batch: pa.Table) -> pa.Table:
        c = batch.group_by("cluster").aggregate([("cluster", "count")])
        return pa.table({"cluster": c.column("cluster").cast(pa.int64()),
                         "n": c.column("cluster_count").cast(pa.int64())})

    sizes: dict[int, int] = {}
    for row in dataset.select_columns(["cluster"]).map_batches(count, batch_format="pyarrow").take_all():
        sizes[int(row["cluster"])] = sizes.get(int(row["cluster"]), 0) + int(row["n"])
    return sizes


def relabel(current: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Model cluster indices -> stable ids (``ids[j]`` for cluster ``j``); an outlier (-1) stays -1."""
    current = np.asarray(current, dtype=np.int64)
    return np.where(current >= 0, np.asarray(ids, dtype=np.int64)[np.maximum(current, 0)], current)


def moved_examples(pairs, ids: np.ndarray, limit: int) -> list[dict]:
    """Up to ``limit`` shared items whose current cluster, renamed by ``ids`` (see :func:`relabel`), is not
    their previous one: the first in id order, the same list on every run."""
    if limit <= 0:
        return []

    def moved(batch: pa.Table) -> pa.Table:
        cur = relabel(batch.column("current").to_numpy(), ids)
        keep = cur != batch.column("previous").to_numpy()
        out = batch.filter(pa.array(keep)).select(["id", "previous"])
        out = out.append_column("current", pa.array(cur[keep], pa.int64()))
        return out.sort_by("id").slice(0, limit)

    rows = pairs.map_batches(moved, batch_format="pyarrow").take_all()
    return sorted(({"id": r["id"], "previous": int(r["previous"]), "current": int(r["current"])} for r in rows),
                  key=lambda r: r["id"])[:limit]
