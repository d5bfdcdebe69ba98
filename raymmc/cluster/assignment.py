"""Linear assignment and cluster-label matching (Hungarian algorithm via SciPy).

Conventions used everywhere in ``raymmc.cluster``:

* ``cooccurrence(a, b, k)[i, j]`` = number of items with label ``i`` in ``a`` and ``j`` in ``b``.
* ``align_clusters(labels_a, labels_b, k)`` returns ``perm`` with ``perm[i]`` = the cluster of ``b``
  that corresponds to cluster ``i`` of ``a``.  To re-index ``b``'s centroids so that its cluster ``i``
  is ``a``'s cluster ``i``: ``centroids_b_aligned = centroids_b[perm]``; labels: ``inverse_permutation(perm)[labels_b]``.
* ``match_labels(new, old, k)`` relabels ``new`` so that it agrees best with ``old``
  (``match_mapping`` gives the mapping itself: ``mapping[new_cluster] = old_cluster``).

All functions are pure NumPy; under data-parallel training compute the co-occurrence matrix
per worker, sum it with ``ops.all_reduce_sum`` and call :func:`align_from_cooccurrence`.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def linear_assignment(cost: np.ndarray, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost (or maximum with ``maximize=True``) one-to-one assignment of rows to columns.

    Returns ``(rows, cols)`` index arrays (int64), ``rows`` sorted ascending; for a rectangular
    matrix only ``min(shape)`` pairs are returned.  Replaces the removed
    ``sklearn.utils.linear_assignment_`` that the reference implementations used.
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-D matrix, got shape {cost.shape}")
    if not np.all(np.isfinite(cost)):
        raise ValueError("cost matrix contains NaN or infinite entries")
    rows, cols = linear_sum_assignment(cost, maximize=maximize)
    return rows.astype(np.int64), cols.astype(np.int64)


def cooccurrence(labels_a: np.ndarray, labels_b: np.ndarray, k: int) -> np.ndarray:
    """(k, k) int64 matrix C[i, j] = #items with ``labels_a == i`` and ``labels_b == j``."""
    a = np.asarray(labels_a, dtype=np.int64).ravel()
    b = np.asarray(labels_b, dtype=np.int64).ravel()
    if a.shape != b.shape:
        raise ValueError("label arrays must have the same length")
    if a.size and (a.min() < 0 or b.min() < 0 or a.max() >= k or b.max() >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    c = np.zeros((k, k), dtype=np.int64)
    np.add.at(c, (a, b), 1)
    return c


def align_from_cooccurrence(c: np.ndarray) -> np.ndarray:
    """``perm`` maximising ``sum_i C[i, perm[i]]`` (Hungarian on ``max(C) - C``)."""
    c = np.asarray(c, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"co-occurrence matrix must be square, got {c.shape}")
    rows, cols = linear_assignment(c.max() - c if c.size else c)
    perm = np.empty(c.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm


def align_clusters(labels_a: np.ndarray, labels_b: np.ndarray, k: int) -> np.ndarray:
    """Permutation aligning clustering ``b`` to clustering ``a`` of the same items.

    ``perm[i]`` is the cluster of ``b`` matched to cluster ``i`` of ``a`` (JECL: a = image, b = text;
    the text centroids become ``nu[perm]``).
    """
    return align_from_cooccurrence(cooccurrence(labels_a, labels_b, k))


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    perm = np.asarray(perm, dtype=np.int64)
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm), dtype=np.int64)
    return inv


def match_mapping(new: np.ndarray, old: np.ndarray, k: int) -> np.ndarray:
    """``mapping`` (k,) with ``mapping[new_cluster] = old_cluster``, maximising agreement."""
    perm = align_clusters(old, new, k)  # perm[old_cluster] = new_cluster
    return inverse_permutation(perm)


def match_labels(new: np.ndarray, old: np.ndarray, k: int) -> np.ndarray:
    """``new`` relabelled so that it agrees with ``old`` on as many items as possible
    (one-to-one cluster mapping; e.g. MMDC's k-means refresh matched to its old targets)."""
    new = np.asarray(new, dtype=np.int64)
    return match_mapping(new, old, k)[new]


def stable_cluster_ids(overlap: np.ndarray, previous_ids: np.ndarray, next_id: int) -> tuple[np.ndarray, int]:
    """Cluster ids that survive a re-clustering. ``overlap[i, j]`` = items in the previous run's cluster
    ``previous_ids[i]`` and in the new model's cluster ``j`` (items of both runs only). Each new cluster
    matched one-to-one (Hungarian, most shared items) to a previous cluster it shares items with keeps that
    cluster's id; the others get fresh ids ``next_id, next_id + 1, ...`` (never used before in the lineage).

    Returns ``(ids, next_id)``: ``ids[j]`` the id of new cluster ``j``, and the lineage's next fresh id."""
    overlap = np.asarray(overlap, dtype=np.float64)
    previous_ids = np.asarray(previous_ids, dtype=np.int64)
    if overlap.ndim != 2 or overlap.shape[0] != len(previous_ids):
        raise ValueError(f"overlap {overlap.shape} does not have one row per previous id ({len(previous_ids)})")
    if len(previous_ids) and int(previous_ids.max()) >= next_id:
        raise ValueError(f"next_id {next_id} is not above the previous ids (max {int(previous_ids.max())})")
    ids = np.full(overlap.shape[1], -1, dtype=np.int64)
    if overlap.size:
        rows, cols = linear_assignment(overlap, maximize=True)
        shared = overlap[rows, cols] > 0  # a pairing forced on clusters with nothing in common is no match
        ids[cols[shared]] = previous_ids[rows[shared]]
    for j in np.flatnonzero(ids < 0):
        ids[j], next_id = next_id, next_id + 1
    return ids, int(next_id)
