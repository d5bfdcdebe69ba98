"""Fashion-MNIST (Debian ``dataset-fashion-mnist``): 70,000 28x28 grey images, 10 classes.

Rows are the 60,000 training images then the 10,000 test images, in file order, with ids
``fashion-mnist/train/00000`` ... and ``fashion-mnist/test/00000`` .... ``limit`` keeps the first
items of each class in that order, in proportion to class size (see ``stratified_subset``).
Images are stored as PNG (mode L); there are no captions.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from raymmc.datasets.shards import Items, encode_png, stratified_subset
from raymmc.datasets.sources import DatasetError, fetch_deb

PACKAGE = "dataset-fashion-mnist"
DATA_DIR = "usr/share/datasets/fashion-mnist"
SPLITS = (("train", "train"), ("test", "t10k"))  # (split name, file prefix)
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array: magic 0x0000080N, N big-endian int32 dims."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DatasetError(f"{path}: {len(data) - offset} bytes of data for shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def load_arrays(data_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(ids, images [N,28,28] uint8, labels [N] uint8)`` for train then test."""
    ids: list[str] = []
    images, labels = [], []
    for split, prefix in SPLITS:
        x = read_idx(data_dir / f"{prefix}-images-idx3-ubyte.gz")
        y = read_idx(data_dir / f"{prefix}-labels-idx1-ubyte.gz")
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(f"{data_dir}: {split} images {x.shape} do not match labels {y.shape}")
        if y.max(initial=0) >= len(CLASSES):
            raise DatasetError(f"{data_dir}: {split} labels go up to {y.max()}, expected < {len(CLASSES)}")
        ids += [f"fashion-mnist/{split}/{i:05d}" for i in range(len(y))]
        images.append(x)
        labels.append(y)
    return ids, np.concatenate(images), np.concatenate(labels)


def collect(cache_dir: Path, limit: int | None = None) -> Items:
    deb = fetch_deb(PACKAGE, cache_dir, include=(f"{DATA_DIR}/*-ubyte.gz",))
    ids, x, y = load_arrays(deb.root / DATA_DIR)
    # Pick the subset before encoding: PNG encoding is the slow part.
    keep = stratified_subset(y, limit)
    notes = {"splits": "train (60000) then test (10000)"}
    if len(keep) < len(ids):
        notes["limit"] = f"first items of each class, class-proportional: {len(keep)} of {len(ids)}"
    return Items(
        ids=[ids[i] for i in keep],
        images=[encode_png(x[i]) for i in keep],
        captions=[None] * len(keep),
        labels=[CLASSES[y[i]] for i in keep],
        source=deb.label,
        notes=notes,
    )
