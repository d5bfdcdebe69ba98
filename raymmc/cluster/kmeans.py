"""Seeded FAISS k-means: on all points, on a sample gathered over workers (the deep algorithms'
initialisation), and the k-means baseline estimator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import faiss
import numpy as np
import torch

from raymmc.cluster.base import LOCAL, Clusterer, GlobalOps, MultiViewData
from raymmc.cluster.calibration import discriminant_variance, gaussian_posterior
from raymmc.cluster.lloyd import NearestSearch, item_keys, lloyd, shard_sample
from raymmc.cluster.seeding import Stream, derive_seed
from raymmc.cluster.views import ConfiguredView, view_matrix
from raymmc.hashing import keyed_priority


@dataclass
class OutlierConfig:
    """Items marked as outliers (cluster -1 in the assignments, with the reason) instead of being forced
    into their nearest cluster. Off by default: every item is assigned."""

    min_confidence: float | None = None  # calibrated confidence below this (e.g. 0.5)
    # squared distance to the centroid above this quantile of the fit's distances (e.g. 0.99)
    distance_quantile: float | None = None


@dataclass
class KMeansConfig:
    niter: int = 100  # Lloyd iterations (FAISS's default is 25; 100 converges on the demo)
    nredo: int = 5  # restarts of the initialisation on the sample, best inertia kept (sklearn's n_init)
    # k-means++ (scikit-learn's default): FAISS's random rows put two starts in one cluster and none in another
    # often enough that 5 restarts on 5 well-separated clusters all failed in a test.
    init: Literal["k-means++", "random"] = "k-means++"
    # The initialisation runs FAISS on at most this many items, chosen by a keyed hash of their ids (the same
    # items for any number of workers), on rank 0; the Lloyd iterations then use every item on its own worker.
    # 200k rows of 1,580 floats is 1.3 GB on rank 0; k-means++-quality centroids need a few hundred per cluster.
    sample: int = 200_000
    tol: float = 1e-6  # Lloyd stops when the inertia improves by less than this fraction
    # Which features: "concat" = each view L2-normalised, missing view zeros, concatenated.
    view: Literal["concat", "image", "text"] = "concat"
    # "concat" only: the image block's rows are multiplied by this (the caption block's by 1), so the views weigh
    # image_weight^2 : 1 in the squared distances. 1 = equal weight; `raymmc tune` searches it.
    image_weight: float = 1.0
    use_gpu: bool = True  # used only where faiss has GPUs (the worker's own)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)


@dataclass
class InitConfig:
    """k-means initialisation of the deep algorithms' centroids on their embeddings."""

    nredo: int = 20  # restarts, lowest inertia kept (DEC: 20)
    niter: int = 100
    # At most this many embeddings gathered over all workers: k-means++-quality centroids need
    # a few hundred points per cluster, not the archive, and rank 0 must hold the sample.
    sample: int = 200_000


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, niter: int = 100, nredo: int = 5, use_gpu: bool = True,
           init: Literal["random", "k-means++"] = "random") -> tuple[np.ndarray, np.ndarray, float]:
    """k-means on every row of ``x`` (FAISS otherwise subsamples to 256*k points silently), ``nredo``
    restarts, the lowest inertia kept. ``init``: FAISS's random rows, or scikit-learn's greedy
    k-means++ (``kmeans_plusplus``) followed by FAISS's iterations.

    Returns ``(centroids (k, d), labels (n,), inertia)``.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    # One GPU, the first this process sees (faiss's gpu=True would use every visible GPU). Under Ray Train the
    # workers of a node see all its GPUs: this runs on rank 0 only (the deep algorithms' start, a short fit on
    # a sample) and takes the node's first GPU, which may be another worker's; the distributed Lloyd steps place
    # each worker's index on its own GPU (raymmc.cluster.lloyd).
    gpu = 1 if use_gpu and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0 else False
    opts = dict(niter=niter, gpu=gpu, max_points_per_centroid=max(256, -(-n // k)), min_points_per_centroid=1,
                verbose=False, spherical=False)
    if init == "random":
        km = faiss.Kmeans(d, k, nredo=nredo, seed=int(seed), **opts)
        km.train(x)
        best = km
    elif init == "k-means++":
        from sklearn.cluster import kmeans_plusplus

        rng, best, best_obj = np.random.default_rng(seed), None, np.inf
        for _ in range(nredo):
            start, _ = kmeans_plusplus(x, k, random_state=int(rng.integers(2**31)))
            km = faiss.Kmeans(d, k, nredo=1, seed=int(seed), **opts)
            km.train(x, init_centroids=np.ascontiguousarray(start, dtype=np.float32))
            if km.obj[-1] < best_obj:
                best, best_obj = km, km.obj[-1]
    else:
        raise ValueError(f"k-means init must be 'random' or 'k-means++', not {init!r}")
    dist, labels = best.index.search(x, 1)
    return best.centroids.copy(), labels[:, 0].astype(np.int64), float(dist.sum())


def init_centroids(z: torch.Tensor, k: int, cfg: InitConfig, ops: GlobalOps, *, seed: int,
                   priority: np.ndarray, use_gpu: bool = True) -> torch.Tensor:
    """FAISS k-means (``nredo`` restarts) on the (at most ``cfg.sample``) rows of lowest ``priority`` over all
    workers (a keyed hash per item: the same sample, in the same order, for any worker count), run once on
    rank 0 and broadcast. Returns (k, d) float32 centroids on the CPU."""
    sample = shard_sample(z.detach().float().cpu().numpy(), np.asarray(priority, dtype=np.uint64), cfg.sample, ops)
    size = int(ops.broadcast(torch.tensor([len(sample)], dtype=torch.int64), src=0)[0]) if ops.world_size > 1 \
        else len(sample)
    if size < k:  # rank 0's count on every worker: all refuse together
        raise ValueError(f"k-means initialisation needs at least k={k} points over all workers, got {size}")
    cent = torch.zeros(k, z.shape[1])
    if ops.rank == 0:
        cent = torch.from_numpy(kmeans(sample, k, seed=seed, niter=cfg.niter, nredo=cfg.nredo, use_gpu=use_gpu)[0])
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
    """The k-means baseline on image, text or concatenated features (each view L2-normalised).

    Data-parallel without gathering the rows: FAISS restarts on a bounded sample (rank 0), then Lloyd
    iterations over every worker's own rows (:mod:`raymmc.cluster.lloyd`). The same seed gives the same
    clustering for any number of workers. Confidences are Gaussian-mixture posteriors with the variance
    measured from the fit (:mod:`raymmc.cluster.calibration`)."""

    name = "kmeans"
    Config = KMeansConfig
    supports_warm_start = True  # Lloyd iterations from the previous centroids

    def warm_start_signature(self) -> dict[str, Any]:
        return {"view": self.config.view, "image_weight": self.config.image_weight}  # the centroids' space

    def fit(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> "KMeans":
        self.check_usable(data)
        c, k = self.config, self.n_clusters
        if c.sample < k:
            raise ValueError(f"kmeans.sample={c.sample} is fewer than the {k} clusters")
        x, _ = view_matrix(data, c.view, image_weight=c.image_weight)
        n_total = int(ops.all_reduce_sum(torch.tensor([float(len(x))], dtype=torch.float64)).item())
        if n_total < k:  # the same total on every worker: all refuse together
            raise ValueError(f"k-means needs at least k={k} points, got {n_total}")
        keys = item_keys(data.ids, data.extra.get("index"), len(x))
        sample = shard_sample(x, keyed_priority(keys, derive_seed(self.seed, Stream.ITEM_SAMPLE)), c.sample, ops)
        centers = np.zeros((k, x.shape[1]), np.float32)
        if self.warm_start is not None:
            self._check_warm_start(self.warm_start)
            centers = np.asarray(self.warm_start["centroids"], dtype=np.float32)
            if centers.shape != (k, x.shape[1]):
                raise ValueError(f"warm-start centroids {centers.shape} do not fit {k} clusters of {x.shape[1]}-d "
                                 "features")
        elif ops.rank == 0:
            centers = kmeans(sample, k, seed=derive_seed(self.seed, Stream.KMEANS), niter=c.niter, nredo=c.nredo,
                             use_gpu=c.use_gpu, init=c.init)[0]
        centers = self._shared(centers, ops)
        search = NearestSearch(x.shape[1], c.use_gpu)
        fit = lloyd(x, centers, ops, max_iter=c.niter, tol=c.tol, search=search)
        self.cluster_centers_, self.labels_, self.inertia_, self.n_iter_ = fit.centers, fit.labels, fit.inertia, fit.n_iter
        self._calibrate(sample, search, ops)
        self.history_ = [{"phase": "kmeans", "inertia": fit.inertia, "n_iter": fit.n_iter, "converged": fit.converged,
                          "n_items": n_total, "sample": c.sample if n_total > c.sample else n_total,
                          "warm_start": self.warm_start is not None,
                          "variance": self.variance_}]
        return self

    @staticmethod
    def _shared(value: np.ndarray, ops: GlobalOps) -> np.ndarray:
        return ops.broadcast(torch.from_numpy(value), src=0).numpy() if ops.world_size > 1 else value

    def _calibrate(self, sample: np.ndarray, search: "NearestSearch", ops: GlobalOps) -> None:
        """Confidence variance and outlier distance from rank 0's sample, shared by every worker."""
        stats = np.zeros(2, np.float64)
        if ops.rank == 0:
            labels, sq = search(sample, self.cluster_centers_)
            stats[0] = discriminant_variance(sample - self.cluster_centers_[labels], self.cluster_centers_)
            q = self.config.outliers.distance_quantile
            stats[1] = np.quantile(sq, q) if q is not None else np.inf
        self.variance_, self.distance_threshold_ = (float(v) for v in self._shared(stats, ops))

    def soft_assign(self, data: MultiViewData) -> np.ndarray:
        return gaussian_posterior(self._sq_dist(data), self._fitted("variance_"))

    def outliers(self, data: MultiViewData) -> np.ndarray:
        """(n,) the reason an item is an outlier under ``config.outliers`` ("" when it is not)."""
        o = self.config.outliers
        if o.distance_quantile is None and o.min_confidence is None:  # no rule: no pass over the rows
            return np.full(len(data), "", dtype=object)
        return self.assign(data)[1]

    def assign(self, data: MultiViewData) -> tuple[np.ndarray, np.ndarray]:
        sq = self._sq_dist(data)  # once for both
        soft = gaussian_posterior(sq, self._fitted("variance_"))
        o = self.config.outliers
        out = np.full(len(data), "", dtype=object)
        if o.distance_quantile is not None:
            far = sq.min(1) > self._fitted("distance_threshold_")
            out[far] = f"outlier: farther from its centroid than {o.distance_quantile:.0%} of the fitted items"
        if o.min_confidence is not None:
            low = (soft.max(1) < o.min_confidence) & (out == "")
            out[low] = f"outlier: confidence below {o.min_confidence}"
        return soft, out

    def embed(self, data: MultiViewData) -> np.ndarray:
        self.check_usable(data)
        return view_matrix(data, self.config.view, image_weight=self.config.image_weight)[0]

    def state_dict(self) -> dict[str, Any]:
        return {**self._header(), "centroids": self._fitted("cluster_centers_"),
                "calibration": np.array([self._fitted("variance_"), self.distance_threshold_])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._read_header(state)
        if "calibration" not in state:
            raise ValueError("this k-means model predates calibrated confidences (no 'calibration'): fit it again")
        self.cluster_centers_ = np.asarray(state["centroids"], dtype=np.float32)
        self.variance_, self.distance_threshold_ = (float(v) for v in state["calibration"])
