"""The one interface every clustering algorithm implements, and the data it eats.

Pure NumPy/PyTorch: nothing here (or anywhere in ``raymmc.cluster``) imports Ray. The
quantities that span the whole data set (cluster frequencies, cross-view alignment counts,
k-means samples, per-item targets) go through :class:`GlobalOps`, which is the identity in
one process and all-reduce / all-gather under Ray Train (``raymmc.train``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

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

        n = len(self)
        # per-item arrays in extra (a global index, the kept view) are taken with the rows
        extra = {k: v[index] if isinstance(v, np.ndarray) and len(v) == n else v for k, v in self.extra.items()}
        return MultiViewData(
            image=take(self.image), text=take(self.text), has_image=take(self.has_image),
            has_text=take(self.has_text), pixels=take(self.pixels), ids=take(self.ids), extra=extra,
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

    def all_reduce_sum_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over workers that gradients flow through (the backward sums the workers'
        gradients): for a loss term of a statistic of the global batch. Under DDP's gradient averaging, the
        term's gradient is then exactly that of the global batch's statistic."""
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor.clone()

    def barrier(self) -> None:
        return None


LOCAL = GlobalOps()


def make_config(cls: type, value: Any = None) -> Any:
    """The one way a config is built: ``None`` gives the defaults, an instance of ``cls`` passes
    through, a dict (nested dicts for nested configs; unknown keys and wrong types raise) or another
    dataclass is converted."""
    from raymmc.typed import from_dict

    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return from_dict(cls, dict(value))


class Clusterer:
    """The estimator interface of all five algorithms (scikit-learn's conventions).

    ``__init__(n_clusters, config=None, *, seed=0)`` only stores (the config through
    :func:`make_config`); ``fit(data, ops)`` trains and returns ``self``; fitted attributes end in
    ``_`` and exist only once fitted: ``labels_``, ``n_iter_`` and ``history_`` always,
    ``cluster_centers_`` where centroids live in one space.
    ``usable(data)`` says which items the fitted model can assign; ``soft_assign`` / ``predict``
    refuse data with other items (an item without the view an algorithm uses is never put in a
    cluster by default). ``state_dict()`` / ``load_state_dict()`` carry the fitted model (tensors,
    arrays and plain values only: stored as safetensors, never pickled).
    """

    name: str = ""  # the registry name
    Config: type = object  # the algorithm's config dataclass
    # Trainer hooks (raymmc.cluster.deep): algorithms that do not checkpoint ignore them.
    checkpoint_fn: Any = None
    resume_state: dict[str, Any] | None = None
    # Warm start (a re-clustering of a grown archive): a previous fit's ``state_dict()`` that ``fit`` starts
    # from instead of its own initialisation, where the algorithm supports it (``supports_warm_start``).
    warm_start: dict[str, Any] | None = None
    supports_warm_start: bool = False

    def __init__(self, n_clusters: int, config: Any = None, *, seed: int = 0):
        self.n_clusters = int(n_clusters)
        self.config = make_config(self.Config, config)
        self.seed = int(seed)

    def fit(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> "Clusterer":
        raise NotImplementedError

    def _fitted(self, attr: str) -> Any:
        """A fitted attribute (they exist only after ``fit`` or ``load_state_dict``)."""
        value = getattr(self, attr, None)
        if value is None:
            raise RuntimeError(f"{self.name} is not fitted")
        return value

    def usable(self, data: MultiViewData) -> np.ndarray:
        """(n,) bool: the items this algorithm can assign (they have a view it uses)."""
        raise NotImplementedError

    def check_usable(self, data: MultiViewData) -> None:
        bad = ~self.usable(data)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} of {len(data)} items have no view {self.name} uses "
                             f"({self.uses()}); select them out with usable(data) and record them as rejected")

    def uses(self) -> str:
        """The view(s) the algorithm assigns through, in words (for messages)."""
        return "image or text"

    def soft_assign(self, data: MultiViewData) -> np.ndarray:
        """(n, K) rows summing to 1."""
        raise NotImplementedError

    def predict(self, data: MultiViewData) -> np.ndarray:
        return self.soft_assign(data).argmax(axis=1)

    def embed(self, data: MultiViewData) -> np.ndarray:
        raise NotImplementedError

    def outliers(self, data: MultiViewData) -> np.ndarray:
        """(n,) object array: why an item is left out of its nearest cluster ("" = assigned). Only
        algorithms with an outlier rule (k-means' ``outliers`` config) mark any."""
        return np.full(len(data), "", dtype=object)

    def assign(self, data: MultiViewData) -> tuple[np.ndarray, np.ndarray]:
        """``(soft_assign(data), outliers(data))`` for the prediction workers; an algorithm whose two share a
        pass over the rows (k-means: the distances) overrides it to make that pass once."""
        return self.soft_assign(data), self.outliers(data)

    def fit_predict(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> np.ndarray:
        return self.fit(data, ops).predict(data)

    def _header(self) -> dict[str, Any]:
        return {"algorithm": self.name, "n_clusters": self.n_clusters, "seed": self.seed,
                "config": dataclasses.asdict(self.config)}

    def _read_header(self, state: dict[str, Any]) -> None:
        if "algorithm" not in state:
            raise ValueError(f"this {self.name} model state predates raymmc's training engine (no 'algorithm' "
                             "key): fit it again")
        if state["algorithm"] != self.name:
            raise ValueError(f"a {state.get('algorithm')!r} model cannot be loaded into {self.name!r}")
        self.n_clusters = int(state["n_clusters"])
        self.seed = int(state["seed"])
        self.config = make_config(self.Config, state["config"])

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def warm_start_signature(self) -> dict[str, Any]:
        """The config a warm start must share with the model it starts from (what its fitted state means);
        by default all of it."""
        return dataclasses.asdict(self.config)

    def _check_warm_start(self, state: dict[str, Any]) -> None:
        if state.get("algorithm") != self.name or int(state.get("n_clusters", -1)) != self.n_clusters:
            raise ValueError(f"a warm start for {self.name} with {self.n_clusters} clusters cannot come from a "
                             f"{state.get('algorithm')!r} model with {state.get('n_clusters')} clusters")
        before = type(self)(self.n_clusters, state.get("config")).warm_start_signature()
        if before != self.warm_start_signature():
            raise ValueError(f"a warm start needs the previous {self.name} model's architecture and input "
                             f"preparation: it had {before}, this fit has {self.warm_start_signature()}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError
