"""Seeded FAISS k-means: on all points, on a sample gathered over workers (the deep algorithms'
initialisation), and the k-means baseline estimator."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np
import torch

from raymmc.cluster.base import LOCAL, Clusterer, GlobalOps, MultiViewData
from raymmc.cluster.seeding import Stream, derive_seed
from raymmc.cluster.views import ConfiguredView, view_matrix


@dataclass
class KMeansConfig:
    niter: int = 100  # Lloyd iterations per restart (FAISS's default is 25; 100 converges on the demo)
    nredo: int = 5  # restarts, best inertia kept (sklearn's n_init)
    # Which features: "concat" = each view L2-normalised, missing view zeros, concatenated.
    view: Literal["concat", "image", "text"] = "concat"
    use_gpu: bool = True  # used only where faiss has GPUs


@dataclass
class InitConfig:
    """k-means initialisation of the deep algorithms' centroids on their embeddings."""

    nredo: int = 20  # restarts, lowest inertia kept (DEC: 20)
    niter: int = 100
    # At most this many embeddings gathered over all workers: k-means++-quality centroids need
    # a few hundred points per cluster, not the archive, and rank 0 must hold the sample.
    sample: int = 200_000


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, niter: int = 100, nredo: int = 5,
           use_gpu: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means on every row of ``x`` (FAISS otherwise subsamples to 256*k points silently).

    Returns ``(centroids (k, d), labels (n,), inertia)``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    gpu = use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    km = faiss.Kmeans(d, k, niter=niter, nredo=nredo, seed=int(seed), gpu=gpu,
                      max_points_per_centroid=max(256, -(-n // k)), min_points_per_centroid=1,
                      verbose=False, spherical=False)
    km.train(x)
    dist, labels = km.index.search(x, 1)
    return km.centroids.copy(), labels[:, 0].astype(np.int64), float(dist.sum())


def gather_sample(z: torch.Tensor, max_total: int, ops: GlobalOps, rng: np.random.Generator) -> torch.Tensor:
    """At most ``max_total`` rows of ``z`` over all workers (each worker draws its share at random)."""
    per_worker = max(1, math.ceil(max_total / max(ops.world_size, 1)))
    if len(z) > per_worker:
        z = z[torch.from_numpy(np.sort(rng.choice(len(z), per_worker, replace=False)))]
    return ops.all_gather_cat(z.detach().float().cpu().contiguous())


def init_centroids(z: torch.Tensor, k: int, cfg: InitConfig, ops: GlobalOps, *, seed: int,
                   rng: np.random.Generator, use_gpu: bool = True) -> torch.Tensor:
    """FAISS k-means (``nredo`` restarts) on a gathered sample of the local embeddings ``z``, run once
    on rank 0 and broadcast. Returns (k, d) float32 centroids on the CPU."""
    sample = gather_sample(z, cfg.sample, ops, rng)
    if len(sample) < k:  # the same gathered sample on every worker: all refuse together
        raise ValueError(f"k-means initialisation needs at least k={k} points over all workers, got {len(sample)}")
    cent = torch.zeros(k, z.shape[1])
    if ops.rank == 0:
        cent = torch.from_numpy(kmeans(sample.numpy(), k, seed=seed, niter=cfg.niter, nredo=cfg.nredo,
                                       use_gpu=use_gpu)[0])
    return ops.broadcast(cent, src=0) if ops.world_size > 1 else cent


def squared_distances(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """(n, K) squared euclidean distances, |x|^2 - 2 x.c + |c|^2 in float64 (no n x K x d temporary)."""
    x = np.asarray(x, dtype=np.float64)
    c = np.asarray(centers, dtype=np.float64)
    return np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :], 0.0)


def soft_from_distances(sq_dist: np.ndarray) -> np.ndarray:
    """Student-t (DEC, a=1) soft assignment from squared distances: a confidence per cluster."""
    q = 1.0 / (1.0 + sq_dist)
    return q / q.sum(axis=1, keepdims=True)


class NearestCentroid:
    """``soft_assign`` / ``predict`` of a model whose clusters are the centroids ``cluster_centers_`` in
    the space of its ``embed``: nearest centroid, Student-t confidences."""

    def _sq_dist(self, data: MultiViewData) -> np.ndarray:
        return squared_distances(self.embed(data), self._fitted("cluster_centers_"))

    def soft_assign(self, data: MultiViewData) -> np.ndarray:
        return soft_from_distances(self._sq_dist(data))

    def predict(self, data: MultiViewData) -> np.ndarray:
        return self._sq_dist(data).argmin(axis=1)


class KMeans(ConfiguredView, NearestCentroid, Clusterer):
    """The k-means baseline on image, text or concatenated features (each view L2-normalised)."""

    name = "kmeans"
    Config = KMeansConfig

    def fit(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> "KMeans":
        self.check_usable(data)
        x, _ = view_matrix(data, self.config.view)
        c = self.config
        # Data-parallel: every worker's rows gathered on rank 0, its centroids broadcast (one model on every
        # worker). Distributed Lloyd iterations that never gather the rows are issue 12's.
        xs = ops.all_gather_cat(torch.from_numpy(x)).numpy() if ops.world_size > 1 else x
        if len(xs) < self.n_clusters:  # every worker holds xs: all refuse together
            raise ValueError(f"k-means needs at least k={self.n_clusters} points, got {len(xs)}")
        centers, self.inertia_ = np.zeros((self.n_clusters, x.shape[1]), np.float32), None
        if ops.rank == 0:
            centers, _, self.inertia_ = kmeans(xs, self.n_clusters, seed=derive_seed(self.seed, Stream.KMEANS),
                                               niter=c.niter, nredo=c.nredo, use_gpu=c.use_gpu)
        if ops.world_size > 1:
            centers = ops.broadcast(torch.from_numpy(centers), src=0).numpy()
        self.cluster_centers_ = centers
        self.labels_ = squared_distances(x, centers).argmin(1)
        self.n_iter_ = c.niter
        self.history_ = [{"phase": "kmeans", "inertia": self.inertia_}]
        return self

    def embed(self, data: MultiViewData) -> np.ndarray:
        self.check_usable(data)
        return view_matrix(data, self.config.view)[0]

    def state_dict(self) -> dict[str, Any]:
        return {**self._header(), "centroids": self._fitted("cluster_centers_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._read_header(state)
        self.cluster_centers_ = np.asarray(state["centroids"], dtype=np.float32)
