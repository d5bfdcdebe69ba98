"""External clustering metrics: predicted cluster ids against ground-truth labels.

NumPy/SciPy/scikit-learn only (no Ray): the evaluation job gathers labels and predictions
and calls :func:`evaluate`. Labels may be strings or integers; cluster ids are integers.
Everything is computed from the class x cluster contingency table, so it is O(n + k*c).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

ArrayLike = Sequence[Any] | np.ndarray

METRICS = ("acc", "nmi", "ari", "purity", "f_score")


def _codes(y: ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == object and any(v is None for v in arr):
        raise ValueError(f"{what} contains None: evaluate only the items that have a label")
    return np.unique(arr, return_inverse=True)[1].reshape(-1)


def _check(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    t, p = _codes(y_true, "y_true"), _codes(y_pred, "y_pred")
    if len(t) != len(p):
        raise ValueError(f"y_true has {len(t)} items but y_pred has {len(p)}")
    if len(t) == 0:
        raise ValueError("cannot evaluate an empty clustering")
    return t, p


def contingency(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """``C[i, j]`` = number of items of class i (sorted labels) in cluster j (sorted cluster ids)."""
    t, p = _check(y_true, y_pred)
    table = np.zeros((t.max() + 1, p.max() + 1), dtype=np.int64)
    np.add.at(table, (t, p), 1)
    return table


def cluster_acc(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Accuracy under the best one-to-one mapping of clusters to classes (Hungarian algorithm).

    With more clusters than classes, the clusters left unmatched count as wrong; with fewer,
    the unmatched classes do.
    """
    c = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum() / c.sum())


def purity(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of items that belong to their cluster's majority class (many-to-one mapping)."""
    c = contingency(y_true, y_pred)
    return float(c.max(axis=0).sum() / c.sum())


def nmi(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (sklearn's default)."""
    t, p = _check(y_true, y_pred)
    return float(normalized_mutual_info_score(t, p, average_method="arithmetic"))


def ari(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Adjusted Rand index (sklearn)."""
    t, p = _check(y_true, y_pred)
    return float(adjusted_rand_score(t, p))


def _pairs(counts: np.ndarray) -> int:
    counts = counts.astype(np.int64)
    return int((counts * (counts - 1) // 2).sum())


def pairwise_precision_recall_f(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[float, float, float]:
    """Pairwise ``(precision, recall, F1)`` over the n(n-1)/2 item pairs.

    A pair is a true positive when both items share a cluster and a class. precision = TP /
    pairs sharing a cluster, recall = TP / pairs sharing a class. Where a denominator is zero
    (all singletons) the ratio is taken as 1 if the other side has no pairs either (the two
    partitions are both all-singletons, identical) and 0 otherwise.
    """
    c = contingency(y_true, y_pred)
    tp = _pairs(c)
    pred_pairs = _pairs(c.sum(axis=0))
    true_pairs = _pairs(c.sum(axis=1))
    if pred_pairs == 0 and true_pairs == 0:
        return 1.0, 1.0, 1.0
    precision = tp / pred_pairs if pred_pairs else 0.0
    recall = tp / true_pairs if true_pairs else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return float(precision), float(recall), float(f)


def pairwise_f_score(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Pairwise F1 (see :func:`pairwise_precision_recall_f`)."""
    return pairwise_precision_recall_f(y_true, y_pred)[2]


def evaluate(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """``{"acc", "nmi", "ari", "purity", "f_score"}`` as Python floats."""
    return evaluate_contingency(contingency(y_true, y_pred))


def evaluate_contingency(c: np.ndarray) -> dict[str, float]:
    """The metrics of :func:`evaluate` from a class x cluster count table alone: what a distributed run
    aggregates (K x L counts) instead of gathering every item's label and cluster."""
    from sklearn.metrics import mutual_info_score

    c = np.asarray(c, dtype=np.int64)
    c = c[c.sum(1) > 0][:, c.sum(0) > 0]  # classes and clusters that occur
    n = int(c.sum())
    if n == 0:
        raise ValueError("cannot evaluate an empty clustering")
    rows, cols = linear_sum_assignment(c, maximize=True)

    def entropy(counts: np.ndarray) -> float:
        p = counts[counts > 0].astype(np.float64)  # sklearn's arithmetic, so the values match it exactly
        return float(-np.sum((p / n) * (np.log(p) - np.log(n))))

    h_true, h_pred = entropy(c.sum(1)), entropy(c.sum(0))
    if c.shape[0] == c.shape[1] == 1 or (h_true == 0 and h_pred == 0):
        nmi_value = 1.0  # sklearn: two single-cluster partitions agree
    else:
        mi = float(mutual_info_score(None, None, contingency=c))
        nmi_value = min(1.0, mi / max((h_true + h_pred) / 2, np.finfo(float).eps))
    pairs_both, pairs_true, pairs_pred = _pairs(c), _pairs(c.sum(1)), _pairs(c.sum(0))
    total = n * (n - 1) // 2
    expected = pairs_true * pairs_pred / total if total else 0.0
    top = (pairs_true + pairs_pred) / 2
    ari_value = 1.0 if top == expected else (pairs_both - expected) / (top - expected)
    if pairs_pred == 0 and pairs_true == 0:
        f = 1.0
    else:
        precision = pairs_both / pairs_pred if pairs_pred else 0.0
        recall = pairs_both / pairs_true if pairs_true else 0.0
        f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"acc": float(c[rows, cols].sum() / n), "nmi": float(nmi_value), "ari": float(ari_value),
            "purity": float(c.max(axis=0).sum() / n), "f_score": float(f)}


def cluster_sizes(y_pred: ArrayLike) -> dict[int, int]:
    """``{cluster id: number of items}`` for the clusters that occur, sorted by id."""
    ids, counts = np.unique(np.asarray(y_pred), return_counts=True)
    return {int(i): int(n) for i, n in zip(ids, counts)}


def summarize(values: Sequence[float], ddof: int = 0) -> tuple[float, float]:
    """``(mean, std)`` over runs (e.g. seeds).

    The std is the population std (``ddof=0``, NumPy's default) as in the baseline table of
    ENVIRONMENT.md; pass ``ddof=1`` for the sample std. One value gives std 0.
    """
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("summarize needs at least one value")
    std = float(arr.std(ddof=ddof)) if arr.size > ddof else 0.0
    return float(arr.mean()), std


def format_mean_std(values: Sequence[float], digits: int = 3, ddof: int = 0) -> str:
    """``"0.541 ± 0.024"`` (population std by default, see :func:`summarize`)."""
    mean, std = summarize(values, ddof=ddof)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
