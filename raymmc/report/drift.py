"""What changed between two runs of a growing archive (``drift.json`` and the report's drift section).

Pure NumPy over O(clusters²) counts: the overlap of the two runs' clusters on the items they share, each
run's cluster sizes, and a bounded list of example moves gathered by the caller (raymmc.train.overlap).
Clusters are named by their stable ids (raymmc.cluster.assignment.stable_cluster_ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

OUTLIER = -1  # the cluster id of an item an outlier rule left out (raymmc.train.predict.OUTLIER)


@dataclass(frozen=True)
class DriftLimits:
    # A previous cluster *split* when at least two new clusters each take this share of its kept items; a new
    # cluster *merged* when at least two previous clusters each give it this share of its kept items. 20%: a
    # fifth of a cluster is a real part of it, not the boundary items every re-clustering moves.
    part_share: float = 0.2
    examples: int = 20  # moved items listed (ids with their previous and new cluster)


def drift_report(overlap: np.ndarray, previous_ids: np.ndarray, current_ids: np.ndarray,
                 previous_sizes: dict[int, int], current_sizes: dict[int, int], *,
                 examples: list[dict[str, Any]] | None = None, limits: DriftLimits = DriftLimits()) -> dict[str, Any]:
    """``overlap[i, j]``: items in previous cluster ``previous_ids[i]`` and current cluster ``current_ids[j]``
    (stable ids; the outlier id -1 may be among them). ``*_sizes``: every item of each run per cluster.
    Returns the drift document (plain JSON types)."""
    ov = np.asarray(overlap, dtype=np.int64)
    prev, cur = [int(i) for i in previous_ids], [int(j) for j in current_ids]
    if ov.shape != (len(prev), len(cur)):
        raise ValueError(f"overlap {ov.shape} does not match {len(prev)} previous x {len(cur)} current ids")
    common = int(ov.sum())
    stayed = sum(int(ov[i, cur.index(c)]) for i, c in enumerate(prev) if c in cur)
    n_prev, n_cur = int(sum(previous_sizes.values())), int(sum(current_sizes.values()))
    kept_from = dict(zip(prev, ov.sum(axis=1).tolist()))
    kept_into = dict(zip(cur, ov.sum(axis=0).tolist()))
    # the outlier id (-1) is not a cluster: counted in the items and the moves, never split, merged, born or gone
    split = []
    for i, c in enumerate(prev):
        if c == OUTLIER:
            continue
        parts = [cur[j] for j in np.flatnonzero(ov[i] >= limits.part_share * max(kept_from[c], 1))
                 if ov[i, j] > 0 and cur[j] != OUTLIER]
        if len(parts) >= 2:
            split.append({"cluster": c, "into": parts, "items": [int(ov[i, cur.index(p)]) for p in parts]})
    merged = []
    for j, c in enumerate(cur):
        if c == OUTLIER:
            continue
        parts = [prev[i] for i in np.flatnonzero(ov[:, j] >= limits.part_share * max(kept_into[c], 1))
                 if ov[i, j] > 0 and prev[i] != OUTLIER]
        if len(parts) >= 2:
            merged.append({"cluster": c, "from": parts, "items": [int(ov[prev.index(p), j]) for p in parts]})
    ids = sorted(set(previous_sizes) | set(current_sizes))
    clusters = []
    for c in ids:
        before, after = int(previous_sizes.get(c, 0)), int(current_sizes.get(c, 0))
        new_items = after - int(kept_into.get(c, 0))  # items the previous run did not have
        clusters.append({"cluster": c, "previous_size": before, "size": after, "change": after - before,
                         "new_items": new_items, "new_share": round(new_items / after, 6) if after else 0.0})
    return {
        "items": {"previous": n_prev, "current": n_cur, "kept": common, "added": n_cur - common,
                  "removed": n_prev - common},
        "moved": {"count": common - stayed, "share": round((common - stayed) / common, 6) if common else 0.0,
                  "examples": list(examples or [])[:limits.examples]},
        "clusters_born": sorted(set(current_sizes) - set(previous_sizes) - {OUTLIER}),
        "clusters_vanished": sorted(set(previous_sizes) - set(current_sizes) - {OUTLIER}),
        "split": split,
        "merged": merged,
        "clusters": clusters,
        "limits": {"part_share": limits.part_share, "examples": limits.examples},
    }
