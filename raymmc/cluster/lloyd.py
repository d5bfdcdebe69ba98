"""Data-parallel k-means: a seeded sample that does not depend on how the rows are sharded, and
Lloyd iterations in which every worker searches only its own rows (FAISS) and the workers reduce
K x d sums and K counts. No worker ever sees another's rows; rank 0 sees the bounded sample."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

from raymmc.cluster.base import GlobalOps
from raymmc.hashing import keep_fraction, under


def item_keys(ids: np.ndarray | None, index: np.ndarray | None, n: int) -> np.ndarray:
    """(n,) stable per-item keys: the ids where there are any, else the global row index (``extra["index"]``),
    else the local position (one process only)."""
    if ids is not None:
        return np.asarray(ids, dtype=object)
    if index is not None:
        return np.asarray(index, dtype=np.int64)
    return np.arange(n, dtype=np.int64)


def shard_sample(x: np.ndarray, priority: np.ndarray, size: int, ops: GlobalOps) -> np.ndarray:
    """At most ``size`` rows over all workers, the ones of lowest priority, in priority order, on rank 0
    (an empty array elsewhere). Each worker sends only rows under a threshold that keeps ``size / n`` of
    the items in expectation (x 1.2 + 64, so a shortfall is rare and then only shrinks the sample)."""
    n_total = int(ops.all_reduce_sum(torch.tensor([len(x)], dtype=torch.float64)).item())
    keep = under(priority, keep_fraction(size, n_total))
    # Priorities travel as two exact float64 halves (torch has no uint64 collectives).
    hi, lo = (priority[keep] >> np.uint64(32)).astype(np.float64), (priority[keep] & np.uint64(2**32 - 1)).astype(
        np.float64)
    rows = torch.from_numpy(np.concatenate([hi[:, None], lo[:, None], x[keep].astype(np.float64)], axis=1))
    gathered = ops.all_gather_cat(rows).numpy() if ops.world_size > 1 else rows.numpy()
    if ops.rank != 0:
        return np.zeros((0, x.shape[1]), np.float32)
    order = np.lexsort((gathered[:, 1], gathered[:, 0]))[:size]
    return np.ascontiguousarray(gathered[order, 2:], dtype=np.float32)


class NearestSearch:
    """Exact nearest-centroid search on one worker: FAISS's flat L2 index, on this worker's own GPU when faiss has
    GPUs and ``use_gpu``: torch's current device, which Ray Train sets per worker (the workers of a node all see
    the node's GPUs, so device 0 would put every worker's index on one GPU)."""

    def __init__(self, d: int, use_gpu: bool = True):
        self.d = d
        self.gpu = use_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        self._res = faiss.StandardGpuResources() if self.gpu else None
        self._device = torch.cuda.current_device() if self.gpu and torch.cuda.is_available() else 0

    def __call__(self, x: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(labels (n,) int64, squared distances (n,) float32)`` of each row's nearest centroid."""
        index = faiss.IndexFlatL2(self.d)
        if self.gpu:
            index = faiss.index_cpu_to_gpu(self._res, self._device, index)
        index.add(np.ascontiguousarray(centers, dtype=np.float32))
        dist, labels = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return labels[:, 0].astype(np.int64), np.maximum(dist[:, 0], 0.0)


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums of the rows (k, d) and counts (k,)."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(labels), torch.from_numpy(np.asarray(x, dtype=np.float64)))
    return sums.numpy(), np.bincount(labels, minlength=k).astype(np.float64)


@dataclass
class LloydResult:
    centers: np.ndarray  # (k, d) float32
    labels: np.ndarray  # (n_local,) int64
    sq_dist: np.ndarray  # (n_local,) float32, to the nearest of ``centers``
    inertia: float  # over all workers
    n_iter: int
    converged: bool


def lloyd(x: np.ndarray, centers: np.ndarray, ops: GlobalOps, *, max_iter: int, tol: float,
          search: NearestSearch) -> LloydResult:
    """Lloyd iterations from ``centers`` (the same on every worker) over every worker's rows ``x``.

    Each iteration is one local search and one all-reduce of ``k * (d + 1) + 1`` float64 values, so
    every worker holds the same centroids and stops at the same step. Stops when the inertia improves
    by less than ``tol`` (relative) or after ``max_iter`` updates. An empty cluster keeps its centroid
    (FAISS would split the largest cluster, a choice that depends on every row at once)."""
    k, d = centers.shape
    centers = np.asarray(centers, dtype=np.float32)
    prev, it, converged = np.inf, 0, False
    while True:
        labels, sq = search(x, centers)
        sums, counts = cluster_sums(x, labels, k)
        packed = torch.from_numpy(np.concatenate([sums.ravel(), counts, [float(sq.astype(np.float64).sum())]]))
        total = ops.all_reduce_sum(packed).numpy() if ops.world_size > 1 else packed.numpy()
        sums, counts, inertia = total[: k * d].reshape(k, d), total[k * d: k * d + k], float(total[-1])
        if prev - inertia <= tol * max(inertia, 1e-30) or it >= max_iter:
            converged = prev - inertia <= tol * max(inertia, 1e-30)
            return LloydResult(centers, labels, sq, inertia, it, converged)
        prev, it = inertia, it + 1
        filled = counts > 0
        centers = centers.copy()
        centers[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
