"""Seeded, order-free sampling: a keyed hash gives each item a priority; "the m lowest priorities" is then
the same sample however the items are split into files, blocks or workers."""

from __future__ import annotations

import hashlib

import numpy as np

SPAN = float(2**64)


def keyed_priority(keys, seed: int) -> np.ndarray:
    """(n,) uint64: BLAKE2b of each key (str, bytes or int) keyed with ``seed``, uniform on [0, 2**64)."""
    salt = int(seed).to_bytes(8, "little", signed=False)
    out = np.empty(len(keys), dtype=np.uint64)
    for i, key in enumerate(keys):
        if isinstance(key, bytes):
            raw = key
        elif isinstance(key, str):
            raw = key.encode("utf-8", "surrogatepass")
        else:
            raw = int(key).to_bytes(8, "little", signed=True)
        out[i] = int.from_bytes(hashlib.blake2b(raw, digest_size=8, key=salt).digest(), "little")
    return out


def keep_fraction(size: int, total: int) -> float:
    """The share of ``total`` items each part keeps (by priority) so that the union holds the ``size`` lowest
    with high probability: ``size / total`` x 1.2 + 64 items of slack (a shortfall only shrinks the sample)."""
    return 1.0 if size >= total else min(1.0, (1.2 * size + 64) / total)


def under(priority: np.ndarray, fraction: float) -> np.ndarray:
    """(n,) bool: the priorities below ``fraction`` of the range."""
    if fraction >= 1.0:
        return np.ones(len(priority), dtype=bool)
    return priority < np.uint64(min(SPAN * fraction, SPAN - 1))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic): a fast, well-mixed counter-based hash, so
    random draws keyed by (item, epoch, ...) are the same wherever the item is processed."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def unit_float(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniform on [0, 1) (their top 53 bits)."""
    return (np.asarray(h, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def keyed_keep_mask(keys: np.ndarray, width: int, rate: float) -> np.ndarray:
    """(n, width) bool: entry j of row i is dropped with probability ``rate``, from ``keys[i]`` and j alone
    (masking noise that does not depend on which worker or batch holds the row)."""
    keys = np.asarray(keys, dtype=np.uint64)
    cols = (np.arange(1, width + 1, dtype=np.uint64) * _GOLDEN)[None, :]
    return unit_float(mix64(mix64(keys)[:, None] ^ cols)) >= rate
