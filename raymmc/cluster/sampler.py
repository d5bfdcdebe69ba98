"""The one mini-batch rule of every deep algorithm, and the step count that keeps workers in lock-step.

Data-parallel training (DDP) all-reduces gradients at every step, so every worker must take the same
number of steps or the others wait forever. ``batch_size`` is the global batch: an epoch is
``steps_per_epoch`` = ceil(all rows / batch_size) steps on every worker, whatever the worker count, so
step-counted schedules (update intervals, iteration caps, learning-rate schedules) mean the same for 1 and
N workers, and each step's averaged gradient is over about ``batch_size`` rows. Each worker shuffles its own
rows once per epoch and cuts them into that many near-equal batches (sizes differ by at most one): with
N equal shards, a local batch is about batch_size / N rows. Every local row is used exactly once per epoch,
whatever the shard sizes.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

from raymmc.cluster.base import GlobalOps


def global_sum(value: int, ops: GlobalOps) -> int:
    return int(ops.all_reduce_sum(torch.tensor([int(value)], dtype=torch.int64))[0])


def steps_per_epoch(n_local: int, batch_size: int, ops: GlobalOps) -> int:
    """Steps per epoch, the same on every worker: all workers' rows over the global ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return max(1, math.ceil(global_sum(n_local, ops) / batch_size))


def _too_small(n: int, steps: int, min_batch: int) -> str:
    return (f"a worker holds {n} rows, too few for {steps} batches of at least {min_batch} (the steps per "
            "epoch are all rows over the global batch size): raise the batch size, balance the shards or use "
            "fewer workers")


def check_min_batch(n_local: int, steps: int, min_batch: int, ops: GlobalOps, what: str = "rows") -> None:
    """Raise on every worker (not only the short one, which would leave the others waiting) when some
    worker's ``n_local`` cannot fill ``steps`` batches of ``min_batch``."""
    short = torch.tensor([float(n_local < steps * min_batch)], dtype=torch.float64)
    if float(ops.all_reduce_sum(short)[0]) > 0:
        raise ValueError(f"{what}: " + _too_small(n_local, steps, min_batch) if n_local < steps * min_batch else
                         f"{what}: another worker holds too few rows for {steps} batches of at least {min_batch}: "
                         "balance the shards or use fewer workers")


class EpochSampler:
    """Endless batches of local row indices, ``steps`` per epoch, each epoch a fresh permutation of
    the ``n`` rows cut into ``steps`` near-equal parts. Batches run on into the next epoch when a
    caller draws more (DM2C's critic draws several per generator step).

    ``min_batch``: the fewest rows a non-empty shard's batches may have (2 under BatchNorm); a shard
    too small for that many steps is refused, naming the sizes (callers check this collectively
    first, with :func:`check_min_batch`, so that no worker is left waiting in a collective). With
    ``min_batch=1`` a small shard draws some empty batches and still takes part in every step.

    The state is O(1): the generator's state at the start of the epoch and the position in it (the
    permutation is drawn again on load)."""

    def __init__(self, n: int, steps: int, rng: np.random.Generator, min_batch: int = 1):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if min_batch > 1 and 0 < n < steps * min_batch:
            raise ValueError(_too_small(n, steps, min_batch))
        self.n, self.steps, self.rng = int(n), int(steps), rng
        self.epoch = -1
        self._epoch_start: dict[str, Any] | None = None
        self._bounds = np.linspace(0, self.n, self.steps + 1).round().astype(np.int64)
        self._perm = np.empty(0, dtype=np.int64)
        self._pos = self.steps  # the first call starts epoch 0

    def _new_epoch(self) -> None:
        self._epoch_start = copy.deepcopy(self.rng.bit_generator.state)
        self._perm = self.rng.permutation(self.n).astype(np.int64)
        self._pos = 0
        self.epoch += 1

    def next(self) -> np.ndarray:
        if self._pos >= self.steps:
            self._new_epoch()
        a, b = self._bounds[self._pos], self._bounds[self._pos + 1]
        self._pos += 1
        return self._perm[a:b]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_start": copy.deepcopy(self._epoch_start), "epoch": self.epoch, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["epoch_start"] is None:  # saved before the first batch
            return
        self.rng.bit_generator.state = copy.deepcopy(state["epoch_start"])
        self._new_epoch()
        self.epoch, self._pos = int(state["epoch"]), int(state["pos"])
