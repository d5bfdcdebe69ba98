"""The map sample of a prediction: which rows the prediction workers embed for the report's 2-D map.

A uniform sample of at most ``points`` items, drawn as the ``points`` lowest keyed priorities of the ids
(:mod:`raymmc.hashing`): the same items whatever the blocks, their order or the worker count. Each worker embeds
only the rows whose priority falls in the share that holds those lowest ones, never the whole archive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raymmc.hashing import keep_fraction, keyed_priority, under


@dataclass(frozen=True)
class MapSample:
    points: int  # the sample's size
    seed: int  # keys the hash
    n_total: int  # the items being predicted (sets the sampled share)


def sample_mask(ids, sample: MapSample) -> tuple[np.ndarray, np.ndarray]:
    """The keyed priorities of ``ids`` and the mask of those whose embedding the map sample may need."""
    keys = keyed_priority([str(i) for i in ids], sample.seed)
    if sample.points <= 0:
        return keys, np.zeros(len(keys), dtype=bool)
    return keys, under(keys, keep_fraction(sample.points, sample.n_total))


def with_sample(table: pa.Table, keys: np.ndarray, mask: np.ndarray, vectors: np.ndarray) -> pa.Table:
    """``table`` with its ``sample_key`` column and an ``embedding`` column holding ``vectors`` (the
    embeddings of the ``mask`` rows, in order) on those rows and null elsewhere."""
    column: list = [None] * table.num_rows
    for j, i in enumerate(np.flatnonzero(mask)):
        column[i] = np.asarray(vectors[j], dtype=np.float32)
    return table.append_column("sample_key", pa.array(keys, pa.uint64())).append_column(
        "embedding", pa.array(column, pa.list_(pa.float32())))
