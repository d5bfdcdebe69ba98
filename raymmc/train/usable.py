"""The accounting pass on Ray workers: which feature rows are clustered, which are rejected and why,
with nothing per item on the driver.

Rules that need only the row (an unusable id, nothing this run clusters on) run where the row is read.
Duplicate ids need every row of an id together: the light columns (id, source, row, flags, notes: about
100 bytes a row, not the features) are hash-partitioned by id and each partition finds its duplicates
(``raymmc.accounting.id_group_rejects``, the same kernel the in-process ``account`` uses). The workers
write ``rejects/``; the duplicates' (source, row) keys travel to the feature readers through the object
store (their memory grows with the number of duplicates, not of items). Each usable row gets a global
``index`` = the row's position in the input (file offset + row), unique and in input order, from a
dictionary of O(files) offsets.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raymmc.accounting import LIGHT_COLUMNS, REJECT_SCHEMA, id_group_rejects, id_rejects, row_reasons

ROWS_PER_PARTITION = 500_000  # light rows per id partition: ~50 MB a task, enough partitions to spread


def id_buckets(ids: pa.Array | pa.ChunkedArray, partitions: int) -> list[int]:
    """The id partition of each id: CRC-32 of its UTF-8 bytes modulo ``partitions`` (-1 for a null id).
    Stable across processes and runs (Python's ``hash`` is salted per process), so the accounting pass and
    the overlap of two runs put an id in the same partition on every worker."""
    return [-1 if i is None else zlib.crc32(i) % partitions for i in ids.cast(pa.binary()).to_pylist()]


@dataclass
class UsableRows:
    dataset: Any  # ray.data.Dataset of usable feature rows (+ ``index``), materialised, in input order
    usable: int
    rejected: int
    duplicates: int
    missing_id: int


def _annotate(batch: pa.Table, modalities: frozenset[str], decode: Any, partitions: int) -> pa.Table:
    reasons = row_reasons(batch, modalities, decode)
    problems = reasons.column("id_problem").to_pylist()
    # -1: an unusable id, rejected where it is read; the others go to the partition of their id
    bucket = [-1 if p is not None else b for b, p in zip(id_buckets(batch.column("id"), partitions), problems)]
    out = batch.select(LIGHT_COLUMNS)
    for name in reasons.column_names:
        out = out.append_column(name, reasons.column(name))
    return out.append_column("bucket", pa.array(bucket, pa.int64()))


def _id_rejects(batch: pa.Table) -> pa.Table:
    rejects = id_rejects(batch)
    return rejects.append_column("duplicate", pa.array(np.zeros(rejects.num_rows, dtype=bool)))


def _global_index(batch: pa.Table, offsets: dict[str, int]) -> np.ndarray:
    """Each row's index in the archive: its file's offset + its row, vectorised over the batch's few files."""
    sources = batch.column("source").combine_chunks().dictionary_encode()
    base = np.array([offsets[v] for v in sources.dictionary.to_pylist()], dtype=np.int64)
    return base[sources.indices.to_numpy(zero_copy_only=False)] + batch.column("row").to_numpy().astype(np.int64)


def _sorted_contains(sorted_values: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``np.isin(x, sorted_values)`` by binary search: the duplicates are sorted once per worker, where ``np.isin``
    would sort them again with every batch."""
    if len(sorted_values) == 0:
        return np.zeros(len(x), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_values, x), len(sorted_values) - 1)
    return sorted_values[pos] == x


def _select(batch: pa.Table, modalities: frozenset[str], decode: Any, offsets: dict[str, int],
            duplicate_refs: list) -> pa.Table:
    reasons = row_reasons(batch, modalities, decode)
    ok = pc.and_(pc.is_null(reasons.column("id_problem")), pc.is_null(reasons.column("unusable"))).to_numpy(
        zero_copy_only=False)
    index = _global_index(batch, offsets)
    if duplicate_refs:
        ok &= ~_sorted_contains(_duplicate_index(tuple(duplicate_refs), offsets), index)
    keep = np.flatnonzero(ok)
    return batch.take(pa.array(keep, pa.int64())).append_column("index", pa.array(index[keep]))


def reject_counts(rejects) -> tuple[int, int]:
    """(duplicates, rows without an id) among the rejects: two numbers per block come to the driver (an
    aggregation through Ray Data's shuffle costs seconds of fixed overhead)."""
    def block_counts(batch: pa.Table) -> pa.Table:
        missing = pc.sum(pc.equal(batch.column("reason"), "missing id")).as_py() or 0
        return pa.table({"duplicates": [int(pc.sum(batch.column("duplicate")).as_py() or 0)], "missing": [missing]})

    rows = rejects.map_batches(block_counts, batch_format="pyarrow", batch_size=None).take_all()
    return sum(int(r["duplicates"]) for r in rows), sum(int(r["missing"]) for r in rows)


_DUPLICATES: dict[tuple, np.ndarray] = {}


def _duplicate_index(refs: tuple, offsets: dict[str, int]) -> np.ndarray:
    """The duplicates' archive indices, sorted int64 (8 bytes each, where (source, row) tuples cost ~150), fetched
    once per worker process."""
    import ray

    if refs not in _DUPLICATES:
        tables = ray.get(list(refs))
        _DUPLICATES.clear()
        parts = [_global_index(t, offsets) for t in tables if t.num_rows]
        _DUPLICATES[refs] = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
    return _DUPLICATES[refs]


def usable_rows(files: list[str], filesystem, *, modalities: frozenset[str], decode: Any, offsets: dict[str, int],
                n_rows: int, rejects_path: str, rejects_filesystem) -> UsableRows:
    """Account for every row of the feature ``files``: write the rejects under ``rejects_path`` (from the
    workers) and return the usable rows, materialised in the object store, with counts."""
    import ray
    from ray.data.expressions import col

    from raymmc.raysession import ordered_execution

    partitions = int(min(1024, max(1, n_rows // ROWS_PER_PARTITION)))
    light = ray.data.read_parquet(sorted(files), filesystem=filesystem).select_columns(LIGHT_COLUMNS).map_batches(
        _annotate, batch_format="pyarrow", fn_kwargs={"modalities": modalities, "decode": decode,
                                                     "partitions": partitions}).materialize()
    bad_ids = light.filter(expr=col("bucket") < 0).map_batches(_id_rejects, batch_format="pyarrow")
    with_id = light.filter(expr=col("bucket") >= 0)
    if partitions == 1:  # every id in one task: no shuffle (its actors take seconds to start on any size)
        grouped = with_id.repartition(1).map_batches(id_group_rejects, batch_format="pyarrow", batch_size=None)
    else:
        grouped = with_id.groupby("bucket").map_groups(id_group_rejects, batch_format="pyarrow")
    rejects = bad_ids.union(grouped).materialize()
    rejects.select_columns(REJECT_SCHEMA.names).write_parquet(rejects_path, filesystem=rejects_filesystem)
    n_dup, missing = reject_counts(rejects)
    refs = []
    if n_dup:  # the duplicates' (source, row) keys, for the readers below to leave out
        refs = rejects.filter(expr=col("duplicate")).select_columns(["source", "row"]).materialize().to_arrow_refs()
    with ordered_execution():  # input order: the Ray Train shards are slices of it
        ds = ray.data.read_parquet(sorted(files), filesystem=filesystem).map_batches(
            _select, batch_format="pyarrow", fn_kwargs={"modalities": modalities, "decode": decode,
                                                       "offsets": offsets, "duplicate_refs": refs}).materialize()
    return UsableRows(ds, ds.count(), rejects.count(), n_dup, missing)
