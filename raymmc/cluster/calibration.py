"""Confidences for hard clusterings: the posterior of the Gaussian mixture that k-means is the hard
limit of, with its variance measured from the clustering.

k-means with centroids c_k is EM's limit for a mixture of equal-weight Gaussians N(c_k, s^2 I). With
the centroids fixed, an item's posterior is softmax_k(-|x - c_k|^2 / (2 s^2)). That posterior depends on
x only through its projection on the span of the centroid differences (|x - c_j|^2 - |x - c_k|^2 is
linear in x . (c_j - c_k)), so s^2 is measured there: the within-cluster residual variance per dimension
of that (K-1)-dimensional subspace. Image and text features spread their residuals over a few dozen of
their d dimensions, so inertia / (n d) would understate s^2 many times over and make every item look
certain; for truly isotropic clusters both estimates are the maximum-likelihood s^2.

The confidence says how clearly an item belongs to its cluster rather than another one, not whether
the cluster is a class: an item deep inside a cluster that mixes two classes is still confident.
"""

from __future__ import annotations

import numpy as np


def discriminant_variance(residuals: np.ndarray, centers: np.ndarray) -> float:
    """s^2: mean squared residual ``x - c[label]`` per dimension of the span of ``centers - mean``."""
    r = np.asarray(residuals, dtype=np.float64)
    m = np.asarray(centers, dtype=np.float64)
    m = m - m.mean(0)
    _, sv, vt = np.linalg.svd(m, full_matrices=False)
    basis = vt[sv > sv.max(initial=0.0) * 1e-6]  # (rank, d), orthonormal rows
    if len(r) < 2 or len(basis) == 0:
        raise ValueError("calibration needs at least 2 residuals and 2 distinct centroids")
    s2 = float(((r @ basis.T) ** 2).sum(1).mean() / len(basis))
    return max(s2, 1e-12)  # every item on its centroid: certain, not a division by zero


def gaussian_posterior(sq_dist: np.ndarray, s2: float) -> np.ndarray:
    """(n, K) posteriors softmax(-d^2 / (2 s^2)), computed stably (rows sum to 1)."""
    logits = -np.asarray(sq_dist, dtype=np.float64) / (2.0 * max(s2, 1e-12))
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)
