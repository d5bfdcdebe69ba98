"""The base of the four deep algorithms: devices, random streams, progress and the checkpoint protocol.

``fit`` is the same for all of them: read the resume record (if any), fork torch's random state
(the caller's stays untouched), seed this worker's streams (or restore them from the record), and
run the algorithm's ``_fit``, which calls :meth:`DeepClusterer._checkpoint` at its phase ends.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from raymmc.cluster import checkpoint
from raymmc.cluster.base import LOCAL, Clusterer, GlobalOps, MultiViewData
from raymmc.cluster.checkpoint import Phase, Resume
from raymmc.cluster.nets import Wrap, identity_wrap, resolve_device
from raymmc.cluster.seeding import RandomStreams, Stream, derive_seed

Callback = Callable[[dict[str, Any]], None]


class DeepClusterer(Clusterer):
    """Trainer hooks (all optional): ``on_epoch(record)`` receives every progress record (also kept in
    ``history_``); ``wrap(module)`` wraps each trained network (DDP under Ray Train); ``checkpoint_fn``
    receives checkpoint records, on every worker in lock-step; ``resume_state`` is such a record to
    continue from."""

    def __init__(self, n_clusters: int, config: Any = None, *, seed: int = 0, on_epoch: Callback | None = None,
                 wrap: Wrap | None = None):
        super().__init__(n_clusters, config, seed=seed)
        self.on_epoch = on_epoch
        self.wrap = wrap or identity_wrap
        self.checkpoint_fn: Callable[[dict[str, Any]], None] | None = None
        self.resume_state: dict[str, Any] | None = None
        self._streams: RandomStreams | None = None

    @property
    def device(self) -> torch.device:
        return resolve_device(self.config.device)

    # ------------------------------------------------------------------ fit
    def fit(self, data: MultiViewData, ops: GlobalOps = LOCAL) -> "DeepClusterer":
        resume = checkpoint.read(self.resume_state, self.name, ops) if self.resume_state is not None else None
        device = self.device
        fork = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            self._streams = RandomStreams(self.seed, ops.rank, device, generation=int(
                resume is not None and resume.streams is None))
            self.history_ = []
            if resume is not None:
                self.history_ = list(resume.history)
                if resume.streams is not None:
                    self._streams.load(resume.streams)
                self._report({"phase": "resumed", "from": resume.phase.value,
                              "streams": "restored" if resume.streams is not None else "re-derived"})
            try:
                self._fit(data, ops, resume)
            finally:
                self._streams = None
        return self

    def _fit(self, data: MultiViewData, ops: GlobalOps, resume: Resume | None) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for _fit
    @property
    def streams(self) -> RandomStreams:
        if self._streams is None:
            raise RuntimeError("random streams exist only during fit")
        return self._streams

    @contextlib.contextmanager
    def _seeded_weights(self) -> Iterator[None]:
        """Build networks inside this block: the same initial weights on every worker, from the seed alone."""
        with torch.random.fork_rng(devices=[]):
            # networks are built on the CPU: seed its generator alone (torch.manual_seed would also
            # reseed every CUDA generator, i.e. this worker's restored noise stream)
            torch.random.default_generator.manual_seed(derive_seed(self.seed, Stream.WEIGHTS))
            yield

    def _kmeans_seed(self, index: int = 0) -> int:
        return derive_seed(self.seed, Stream.KMEANS, index=index)

    def _report(self, rec: dict[str, Any]) -> None:
        self.history_.append(rec)
        if self.on_epoch is not None:
            self.on_epoch(rec)

    def _checkpoint(self, phase: Phase, ops: GlobalOps, state: dict[str, Any]) -> None:
        """Hand a checkpoint record to the trainer (a collective: every worker calls it at the same point)."""
        if self.checkpoint_fn is None:
            return
        streams = checkpoint.gather_strings(json.dumps(self.streams.state()), ops)
        self.checkpoint_fn(checkpoint.record(self.name, phase, state, streams, self.history_))

    @staticmethod
    def _bool_tensor(mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(mask, dtype=bool).copy())

    @staticmethod
    def _net_state(module: nn.Module) -> dict[str, torch.Tensor]:
        return checkpoint.to_cpu(module.state_dict())
