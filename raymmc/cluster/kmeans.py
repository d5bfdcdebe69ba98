"""Seeded FAISS k-means on all points, and the k-means baseline estimator."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np

from raymmc.cluster.base import LOCAL, Clusterer, GlobalOps, MultiViewData


@dataclass
class KMeansConfig:
    niter: int = 100
    nredo: int = 5  # restarts, best inertia kept (sklearn's n_init)
    # Which features: "concat" = each view L2-normalised, missing view zeros, concatenated.
    view: Literal["concat", "image", "text"] = "concat"
    use_gpu: bool = True  # used only where faiss has GPUs


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


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


def view_features(data: MultiViewData, view: str) -> np.ndarray:
    """The features k-means sees: one view, or both views L2-normalised and concatenated
    (a missing view of an item contributes zeros)."""
    parts = []
    if view in ("image", "concat") and data.image is not None:
        parts.append(l2_normalize(data.image) * data.has_image[:, None])
    if view in ("text", "concat") and data.text is not None:
        parts.append(l2_normalize(data.text) * data.has_text[:, None])
    if not parts:
        raise ValueError(f"k-means view {view!r} is not available in this data")
    return np.concatenate(parts, axis=1).astype(np.float32)


def soft_from_distances(sq_dist: np.ndarray) -> np.ndarray:
    """Student-t (DEC, a=1) soft assignment from squared distances: a confidence per cluster."""
    q = 1.0 / (1.0 + sq_dist)
    return q / q.sum(axis=1, keepdims=True)


class KMeans(Clusterer):
    """The k-means baseline on image, text or concatenated features."""

    def __init__(self, n_clusters: int, config: KMeansConfig | None = None, seed: int = 0):
        self.n_clusters = n_clusters
        self.config = config or KMeansConfig()
        self.seed = seed
        self.centroids: np.ndarray | None = None
        self.inertia_: float | None = None

    def fit(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> "KMeans":
        x = view_features(data, self.config.view)
        self.centroids, _, self.inertia_ = kmeans(x, self.n_clusters, seed=self.seed, niter=self.config.niter,
                                                  nredo=self.config.nredo, use_gpu=self.config.use_gpu)
        return self

    def embed(self, data: MultiViewData) -> np.ndarray:
        return view_features(data, self.config.view)

    def _sq_dist(self, data: MultiViewData) -> np.ndarray:
        if self.centroids is None:
            raise RuntimeError("KMeans is not fitted")
        x = self.embed(data)
        return ((x[:, None, :] - self.centroids[None, :, :]) ** 2).sum(-1)

    def soft_assign(self, data: MultiViewData) -> np.ndarray:
        return soft_from_distances(self._sq_dist(data))

    def predict(self, data: MultiViewData) -> np.ndarray:
        return self._sq_dist(data).argmin(axis=1)

    def state_dict(self) -> dict[str, Any]:
        return {"centroids": self.centroids, "seed": self.seed, "config": self.config.__dict__,
                "n_clusters": self.n_clusters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.centroids = np.asarray(state["centroids"], dtype=np.float32)
        self.n_clusters = int(state["n_clusters"])
        self.seed = int(state["seed"])
        self.config = KMeansConfig(**state["config"])
