"""The feature matrices the algorithms see: one view or both, rows normalised and scaled."""

from __future__ import annotations

import math

import numpy as np

from raymmc.cluster.base import MultiViewData

VIEWS = ("image", "text", "concat")


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, eps)).astype(np.float32)


def prepare_features(x: np.ndarray, normalize: bool = True, scale: float | str = 1.0) -> np.ndarray:
    """Rows L2-normalised (optionally) and multiplied by ``scale`` ("sqrt_dim": sqrt(d), which gives
    entries of unit mean square); rows of zeros stay zeros."""
    x = np.asarray(x, dtype=np.float32)
    if normalize:
        x = l2_normalize(x)
    s = math.sqrt(x.shape[1]) if scale == "sqrt_dim" else float(scale)
    return (x * s).astype(np.float32)


def has_view(data: MultiViewData, view: str) -> np.ndarray:
    """(n,) bool: the items that have ``view`` ("concat": at least one of the two)."""
    if view == "image":
        return data.has_image & (data.image is not None)
    if view == "text":
        return data.has_text & (data.text is not None)
    if view == "concat":
        return has_view(data, "image") | has_view(data, "text")
    raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")


def view_matrix(data: MultiViewData, view: str, normalize: bool = True,
                scale: float | str = 1.0, image_weight: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(features, has_view)``: "image", "text", or both concatenated ("concat"), each view prepared
    with :func:`prepare_features`; the row of an item without a view is zeros in that view's block.
    ``image_weight`` multiplies the image block of "concat"."""
    parts = []
    for name, arr, mask in (("image", data.image, data.has_image), ("text", data.text, data.has_text)):
        if view in (name, "concat") and arr is not None:
            w = image_weight if name == "image" and view == "concat" else 1.0
            parts.append(prepare_features(arr, normalize, scale) * (mask[:, None] * np.float32(w)))
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    if not parts:
        raise ValueError(f"view {view!r} is not in this data (no {'image or text' if view == 'concat' else view} "
                         "features)")
    return np.concatenate(parts, axis=1).astype(np.float32), has_view(data, view)


class ConfiguredView:
    """``uses`` / ``usable`` of an estimator that clusters one configured ``config.view``."""

    def uses(self) -> str:
        return {"concat": "image or text"}.get(self.config.view, self.config.view)

    def usable(self, data: MultiViewData) -> np.ndarray:
        return has_view(data, self.config.view)
