"""Evaluation protocols that change which views each item has (seeded, reproducible).

* :func:`drop_captions` -- JECL's missing-text experiment: a random ``fraction`` of the items
  that have a caption lose it (``has_text`` False, text row zeroed).
* :func:`mixed_modal` -- DM2C's mixed-modal setting: every item keeps exactly one modality,
  chosen at random (items that have only one view keep it).
* :func:`load_features_npz` -- the demo feature archive (keys image, text, labels[, ids,
  has_image, has_text]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raymmc.cluster.base import MultiViewData


def _copy(data: MultiViewData, has_image: np.ndarray, has_text: np.ndarray) -> MultiViewData:
    image = None if data.image is None else (data.image * has_image[:, None]).astype(np.float32)
    text = None if data.text is None else (data.text * has_text[:, None]).astype(np.float32)
    return MultiViewData(image=image, text=text, has_image=has_image, has_text=has_text, pixels=data.pixels,
                         ids=data.ids, extra=dict(data.extra))


def drop_captions(data: MultiViewData, fraction: float, seed: int = 0) -> MultiViewData:
    """A copy of ``data`` where round(fraction * #captioned) captioned items, drawn at random
    with ``seed``, have no caption."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("fraction must lie in [0, 1]")
    has_text = data.has_text.copy()
    captioned = np.flatnonzero(has_text)
    n_drop = int(round(fraction * len(captioned)))
    rng = np.random.default_rng(seed)
    has_text[rng.choice(captioned, size=n_drop, replace=False)] = False
    return _copy(data, data.has_image.copy(), has_text)


def mixed_modal(data: MultiViewData, seed: int = 0, p_image: float = 0.5) -> MultiViewData:
    """A copy of ``data`` where every item with both views keeps only its image (probability
    ``p_image``) or only its text; ``data.extra["kept"]`` records "image"/"text" per item."""
    rng = np.random.default_rng(seed)
    both = data.has_image & data.has_text
    keep_image = rng.random(len(data)) < p_image
    has_image = data.has_image & (~both | keep_image)
    has_text = data.has_text & (~both | ~keep_image)
    out = _copy(data, has_image, has_text)
    out.extra["kept"] = np.where(has_image, "image", "text")
    return out


def load_features_npz(path: str | Path) -> tuple[MultiViewData, np.ndarray | None]:
    """``(MultiViewData, labels or None)`` from an .npz of features."""
    z = np.load(path, allow_pickle=False)
    get = (lambda k: z[k] if k in z.files else None)
    image, text = get("image"), get("text")
    data = MultiViewData(image=None if image is None else image.astype(np.float32),
                         text=None if text is None else text.astype(np.float32),
                         has_image=get("has_image"), has_text=get("has_text"), ids=get("ids"))
    return data, get("labels")
