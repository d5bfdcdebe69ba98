"""Label-free scores of a clustering, for choosing among the trials of a sweep (and K) without labels.

Every score here is comparable across trials that differ in hyperparameters, in the embedding the
algorithm learns and in the number of clusters, because it is computed in a space no trial changes:

* ``silhouette``: the silhouette of the labels on the *input* features (each view L2-normalised, a
  missing view zeros, the views side by side: the space the concatenated k-means baseline clusters),
  on a bounded, seeded sample;
* ``calinski_harabasz``: the variance-ratio criterion in the same space;
* ``agreement``: for a two-view model (JECL), the NMI between the clusters its image branch and its
  caption branch give the items that have both; two views that were never told each other's clusters
  agreeing is evidence that the clusters are in the data, not in one encoder;
* ``silhouette_agreement``: their product, for a two-view model: compact in the input space *and* agreed on
  by both views;
* ``agreed_silhouette``: for a two-view model, agreement as a gate rather than a factor: a clustering whose two
  views agree (``agreement >= floor``) is scored by its silhouette, one whose views do not by its silhouette
  - 2, below every agreeing one (silhouette is in [-1, 1]). Beyond the floor, more agreement is not better:
  two branches can agree readily on poor clusters (a small latent, a target dominated by one view). The
  default for JECL (docs/tune.md);
* ``stability``: the NMI between two fits that differ only in their seed (the caller fits twice).

Which one a sweep maximises is ``tune.score``; docs/tune.md says which was chosen and why, with the
Spearman correlation of each with NMI measured on the dev archives. No Ray here: plain NumPy/sklearn.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raymmc.cluster.base import MultiViewData
from raymmc.cluster.views import view_matrix

SCORES = ("silhouette", "calinski_harabasz", "agreement", "silhouette_agreement", "agreed_silhouette", "stability")
AGREEMENT_FLOOR = 0.5  # the default of tune.agreement_floor


def sample_rows(n: int, max_rows: int, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded sample of at most ``max_rows`` of ``n`` rows (all when n <= max_rows)."""
    if n <= max_rows:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))


def input_space(data: MultiViewData) -> np.ndarray:
    """The fixed space the scores are computed in: every view the data has, each row L2-normalised, a missing
    view zeros, concatenated."""
    return view_matrix(data, "concat", normalize=True, scale=1.0)[0]


def _valid(labels: np.ndarray) -> bool:
    k = len(np.unique(labels))
    return 2 <= k < len(labels)


def silhouette(x: np.ndarray, labels: np.ndarray, *, max_rows: int = 5000, seed: int = 0) -> float:
    """Silhouette of ``labels`` on ``x`` (Euclidean; on L2-normalised rows that is the cosine ranking), on a seeded
    sample of at most ``max_rows`` rows; NaN when undefined (one cluster, or every item its own)."""
    from sklearn.metrics import silhouette_score

    rows = sample_rows(len(labels), max_rows, seed)
    x, labels = x[rows], np.asarray(labels)[rows]
    return float(silhouette_score(x, labels)) if _valid(labels) else float("nan")


def calinski_harabasz(x: np.ndarray, labels: np.ndarray, *, max_rows: int = 20000, seed: int = 0) -> float:
    from sklearn.metrics import calinski_harabasz_score

    rows = sample_rows(len(labels), max_rows, seed)
    x, labels = x[rows], np.asarray(labels)[rows]
    return float(calinski_harabasz_score(x, labels)) if _valid(labels) else float("nan")


def agreement(image_labels: np.ndarray, text_labels: np.ndarray) -> float:
    """NMI between two labelings of the same items (the two views of a model, or two fits); NaN with no items."""
    from sklearn.metrics import normalized_mutual_info_score

    if len(image_labels) == 0:
        return float("nan")
    return float(normalized_mutual_info_score(image_labels, text_labels))


def agreed_silhouette(silhouette: float, agreement: float, floor: float = AGREEMENT_FLOOR) -> float:
    """``silhouette`` when the views agree (``agreement >= floor``), else ``silhouette - 2`` (below every
    agreeing clustering); NaN when either is undefined."""
    if not (np.isfinite(silhouette) and np.isfinite(agreement)):
        return float("nan")
    return float(silhouette if agreement >= floor else silhouette - 2.0)


def view_labels(model: Any, data: MultiViewData) -> tuple[np.ndarray, np.ndarray] | None:
    """``(image clusters, caption clusters)`` of the items with both views, from a model with per-view soft
    assignments (``view_assignments``: JECL); None for a one-view model."""
    if not hasattr(model, "view_assignments") or data.image is None or data.text is None:
        return None
    both = np.flatnonzero(np.asarray(data.has_image, bool) & np.asarray(data.has_text, bool))
    if len(both) == 0:
        return None
    q, r = model.view_assignments(data.subset(both))
    return q.argmax(1), r.argmax(1)


def label_free_scores(model: Any, data: MultiViewData, labels: np.ndarray, *, max_rows: int = 5000,
                      seed: int = 0, agreement_floor: float = AGREEMENT_FLOOR) -> dict[str, float]:
    """Every single-fit score of a fitted ``model`` whose clusters of ``data`` are ``labels`` (items a model does
    not assign carry -1 and are left out). ``agreement`` and the scores built on it only for a two-view model."""
    labels = np.asarray(labels)
    keep = np.flatnonzero(labels >= 0)
    rows = keep[sample_rows(len(keep), max_rows, seed)]
    sub = data.subset(rows)
    x, y = input_space(sub), labels[rows]
    out = {"silhouette": silhouette(x, y, max_rows=max_rows, seed=seed),
           "calinski_harabasz": calinski_harabasz(x, y, max_rows=max_rows, seed=seed)}
    views = view_labels(model, sub)
    if views is not None:
        out["agreement"] = agreement(*views)
        out["silhouette_agreement"] = out["silhouette"] * out["agreement"]
        out["agreed_silhouette"] = agreed_silhouette(out["silhouette"], out["agreement"], agreement_floor)
    return out
