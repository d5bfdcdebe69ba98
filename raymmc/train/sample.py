"""The map sample of a prediction: which rows the prediction workers embed for the report's 2-D map.

A uniform sample of at most ``points`` items, drawn as the bottom ``points`` of a keyed hash of the id: the same
items whatever the blocks, their order or the worker count. Each worker embeds only the rows whose key falls
in a share of about twice ``points`` (so the bottom ``points`` are among them), never the whole archive.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class MapSample:
    points: int  # the sample's size
    seed: int  # keys the hash
    n_total: int  # the items being predicted (sets the sampled share)


def sample_keys(ids, seed: int) -> np.ndarray:
    """uint64 keyed hashes (BLAKE2b keyed by the seed) of the ids: the map sample's order."""
    key = int(seed).to_bytes(8, "little", signed=True)
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8, key=key).digest(), "little")
                     for i in ids], dtype=np.uint64)


def sample_fraction(n: int, points: int) -> float:
    """The share of items whose embedding a worker computes: about twice ``points``, so the bottom ``points``
    keys are among them (fewer only with a probability that is negligible from ~100 points)."""
    if points <= 0 or n <= 0:
        return 0.0
    return min(1.0, 2.0 * points / n)


def sample_mask(ids, sample: MapSample) -> tuple[np.ndarray, np.ndarray]:
    """The keys of ``ids`` and the mask of those whose embedding the map sample may need."""
    keys = sample_keys(ids, sample.seed)
    fraction = sample_fraction(sample.n_total, sample.points)
    if fraction >= 1.0:
        return keys, np.ones(len(keys), dtype=bool)
    return keys, keys.astype(np.float64) < fraction * 2.0**64


def with_sample(table: pa.Table, keys: np.ndarray, mask: np.ndarray, vectors: np.ndarray) -> pa.Table:
    """``table`` with its ``sample_key`` column and an ``embedding`` column holding ``vectors`` (the
    embeddings of the ``mask`` rows, in order) on those rows and null elsewhere."""
    column: list = [None] * table.num_rows
    for j, i in enumerate(np.flatnonzero(mask)):
        column[i] = np.asarray(vectors[j], dtype=np.float32)
    return table.append_column("sample_key", pa.array(keys, pa.uint64())).append_column(
        "embedding", pa.array(column, pa.list_(pa.float32())))
