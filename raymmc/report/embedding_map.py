"""A 2-D map of the clustering space for the report: t-SNE of a seeded sample."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits


TSNE_ITERATIONS = 500


@dataclass
class EmbeddingMap:
    index: np.ndarray  # (m,) rows of the embedding that were mapped, ascending
    xy: np.ndarray  # (m, 2) float coordinates
    method: str  # how the coordinates were made, for the report's caption


def sample_rows(n: int, max_points: int, seed: int) -> np.ndarray:
    """At most ``max_points`` of ``range(n)``, a seeded uniform sample, ascending."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def embedding_map(embedding: np.ndarray, *, seed: int = 0, max_points: int = 5000) -> EmbeddingMap:
    """t-SNE (PCA to 50-d first when d > 50) of a seeded sample of ≤ ``max_points`` rows.

    t-SNE needs a handful of points; below that (or for 1-d data) PCA/identity stands in so a
    tiny run still gets a map.
    """
    # One thread: OpenMP/BLAS threads spin-wait badly when the cores are busy (Ray workers,
    # other jobs) -- t-SNE ran 10x slower in wall time on a loaded 2-core box -- and a single
    # thread makes the map the same on every machine.
    with threadpool_limits(limits=1):
        return _embedding_map(embedding, seed, max_points)


def _embedding_map(embedding: np.ndarray, seed: int, max_points: int) -> EmbeddingMap:
    x = np.asarray(embedding, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embedding must be 2-D (n, d), got shape {x.shape}")
    idx = sample_rows(len(x), max_points, seed)
    x = x[idx]
    n, d = x.shape
    if n == 0:
        return EmbeddingMap(idx, np.zeros((0, 2)), "no items")
    if d > 50 and n > 50:
        from sklearn.decomposition import PCA

        # t-SNE's neighbour search is cheaper and less noisy on 50 principal components.
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
        post = f" after PCA {d}→50-d"
    else:
        post = ""
    if n >= 8:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, (n - 1) / 3))  # sklearn requires perplexity < n
        # 500 iterations, not 1000: half the time (~9 s CPU for 5,000 points) for a picture that
        # looks the same; the layout is settled long before. sklearn < 1.5 calls it n_iter.
        iters = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
        xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                  learning_rate="auto", **{iters: TSNE_ITERATIONS}).fit_transform(x)
        method = f"t-SNE (perplexity {perplexity:g}){post}"
    elif d >= 2 and n >= 2:
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=seed).fit_transform(x)
        method = "PCA (too few items for t-SNE)"
    else:
        xy = np.zeros((n, 2))
        xy[:, 0] = x[:, 0] if d else 0.0
        method = "raw coordinates (too few items or dimensions)"
    return EmbeddingMap(idx, np.asarray(xy, dtype=np.float64), method)
