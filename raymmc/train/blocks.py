"""Blocks of a Ray dataset brought together on one process."""

from __future__ import annotations

from typing import Iterable

import pyarrow as pa


def concat_blocks(tables: Iterable[pa.Table]) -> pa.Table:
    """One table of a dataset's blocks (or batches). Ray Data can hand back a 0-row block without any column (an
    empty input block through ``map_batches``, e.g. from an empty Parquet file under the classic reader), which
    ``pa.concat_tables`` refuses beside the others: empty blocks are left out (all empty: the first one)."""
    tables = list(tables)
    full = [t for t in tables if t.num_rows > 0]
    if not full:
        return tables[0] if tables else pa.table({})
    return pa.concat_tables(full)
