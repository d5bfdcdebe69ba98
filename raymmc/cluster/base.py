"""The one interface every clustering algorithm implements, and the data it eats.

Pure NumPy/PyTorch: nothing here (or anywhere in ``raymmc.cluster``) imports Ray. The
quantities that span the whole data set (cluster frequencies, cross-view alignment counts,
k-means samples, per-item targets) go through :class:`GlobalOps`, which is the identity in
one process and all-reduce / all-gather under Ray Train (``raymmc.train``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class MultiViewData:
    """Features of n items. A missing view is ``None``; a missing value for one item is
    flagged by ``has_image`` / ``has_text`` (its feature row is zeros and must be ignored)."""

    image: np.ndarray | None = None  # (n, d_img) float32
    text: np.ndarray | None = None  # (n, d_txt) float32
    has_image: np.ndarray | None = None  # (n,) bool; None means all True when image is set
    has_text: np.ndarray | None = None  # (n,) bool; None means all True when text is set
    pixels: np.ndarray | None = None  # (n, C, H, W) uint8, for end-to-end models (MMDC)
    ids: np.ndarray | None = None  # (n,) str, carried along, never used by the math
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = None
        for arr in (self.image, self.text, self.pixels):
            if arr is not None:
                if n is not None and len(arr) != n:
                    raise ValueError("views of a MultiViewData must have the same number of rows")
                n = len(arr)
        if n is None:
            raise ValueError("MultiViewData needs at least one of image, text or pixels")
        if self.has_image is None:
            self.has_image = np.full(n, self.image is not None or self.pixels is not None)
        if self.has_text is None:
            self.has_text = np.full(n, self.text is not None)
        self.has_image = np.asarray(self.has_image, dtype=bool)
        self.has_text = np.asarray(self.has_text, dtype=bool)

    def __len__(self) -> int:
        for arr in (self.image, self.text, self.pixels):
            if arr is not None:
                return len(arr)
        return 0  # unreachable: __post_init__ rejects an empty MultiViewData

    def subset(self, index: np.ndarray) -> "MultiViewData":
        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return MultiViewData(
            image=take(self.image), text=take(self.text), has_image=take(self.has_image),
            has_text=take(self.has_text), pixels=take(self.pixels), ids=take(self.ids), extra=dict(self.extra),
        )


class GlobalOps:
    """Collective operations over all data-parallel workers. The base class is the
    single-process identity; ``raymmc.train`` supplies a torch.distributed-backed one."""

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over workers (returns a new tensor; input unchanged)."""
        return tensor.clone()

    def all_gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0 the tensors of all workers (shapes may differ in dim 0)."""
        return tensor.clone()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor.clone()

    def barrier(self) -> None:
        return None


LOCAL = GlobalOps()


class Clusterer:
    """Shared estimator interface (scikit-learn style).

    Fault tolerance: a trainer may set ``checkpoint_fn`` (called by ``fit`` at safe points, on
    every worker in lock-step, with a resumable state) and ``resume_state`` (such a state, from
    which ``fit`` continues instead of starting over). Algorithms that do not checkpoint ignore
    both and restart from scratch. A run that had finished is the trainer's business: it loads
    the final ``state_dict`` and does not call ``fit``.
    """

    n_clusters: int
    checkpoint_fn: Callable[[dict[str, Any]], None] | None = None
    resume_state: dict[str, Any] | None = None

    def fit(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> "Clusterer":
        raise NotImplementedError

    def soft_assign(self, data: MultiViewData) -> np.ndarray:
        """(n, K) rows summing to 1."""
        raise NotImplementedError

    def predict(self, data: MultiViewData) -> np.ndarray:
        return self.soft_assign(data).argmax(axis=1)

    def embed(self, data: MultiViewData) -> np.ndarray:
        raise NotImplementedError

    def fit_predict(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> np.ndarray:
        return self.fit(data, ops).predict(data)

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError
