"""The one mini-batch rule of every deep algorithm, and the step count that keeps workers in lock-step.

Data-parallel training (DDP) all-reduces gradients at every step, so every worker must take the same
number of steps or the others wait forever. ``batch_size`` is the global batch: an epoch is
``steps_per_epoch`` = ceil(all rows / batch_size) steps on every worker, whatever the worker count, so
step-counted schedules (update intervals, iteration caps, learning-rate schedules) mean the same for 1 and
N workers, and each step's averaged gradient is over about ``batch_size`` rows. Each worker shuffles its own
rows once per epoch and cuts them into that many near-equal batches (sizes differ by at most one): with
N equal shards, a local batch is about batch_size / N rows. Every local row is used exactly once per epoch,
whatever the shard sizes.

Two ways to cut an epoch into batches:

- **keyed** (``keys`` given: DEC, JECL): a row's batch in an epoch is a hash of its key (from the item id), the
  sampler's salt and the epoch, so the union of the workers' step-``b`` batches is the same set of rows for 1
  and N workers. Batch sizes vary a little (binomially around ``batch_size``); the global size of every batch is
  known from one all-reduce per epoch, and :attr:`EpochSampler.weight` scales a worker's batch-mean loss so that
  DDP's average of the workers' gradients is exactly the gradient of the global batch mean. With this (and
  masking noise keyed the same way) 1 and N workers differ only by floating-point summation order.
- **permuted** (no keys: DM2C, MMDC, whose BatchNorm statistics are per local batch anyway): each worker
  permutes its own rows and cuts them into ``steps`` near-equal parts, at least ``min_batch`` rows each.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch

from raymmc.cluster.base import LOCAL, GlobalOps
from raymmc.hashing import keyed_priority, mix64, unit_float


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


def row_keys(items: np.ndarray, seed: int) -> np.ndarray:
    """(n,) uint64 keys for keyed batches: a keyed hash of each item's stable key (its id, or its global row
    index: ``raymmc.cluster.lloyd.item_keys``), the same on any worker."""
    return keyed_priority(items, seed)


class EpochSampler:
    """Endless batches of local row indices, ``steps`` per epoch: keyed (``keys``, ``salt``, ``ops``) or a
    fresh permutation of the ``n`` rows cut into ``steps`` near-equal parts (see the module docstring).
    Batches run on into the next epoch when a caller draws more (DM2C's critic draws several per generator
    step). After each :meth:`next`, :attr:`weight` is the factor for the batch's mean loss (1 when permuted),
    :attr:`rows` the batch's share of the global batch (its global size / workers; the local size when
    permuted) and :meth:`noise_keys` a key per row of the batch for noise that must not depend on the worker.

    ``min_batch``: the fewest rows a non-empty shard's batches may have (2 under BatchNorm); a shard
    too small for that many steps is refused, naming the sizes (callers check this collectively
    first, with :func:`check_min_batch`, so that no worker is left waiting in a collective). With
    ``min_batch=1`` a small shard draws some empty batches and still takes part in every step.

    The state is O(1): the generator's state at the start of the epoch and the position in it (the
    permutation is drawn again on load)."""

    def __init__(self, n: int, steps: int, rng: np.random.Generator, min_batch: int = 1, *,
                 keys: np.ndarray | None = None, salt: int = 0, ops: GlobalOps = LOCAL):
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if keys is None and min_batch > 1 and 0 < n < steps * min_batch:
            raise ValueError(_too_small(n, steps, min_batch))
        if keys is not None and len(keys) != n:
            raise ValueError(f"{len(keys)} keys for {n} rows")
        self.n, self.steps, self.rng = int(n), int(steps), rng
        self.keys = None if keys is None else np.asarray(keys, dtype=np.uint64)
        self.salt, self.ops = int(salt) & (2**64 - 1), ops
        self.epoch = -1
        self._epoch_start: dict[str, Any] | None = None
        self._bounds = np.linspace(0, self.n, self.steps + 1).round().astype(np.int64)
        self._perm = np.empty(0, dtype=np.int64)
        self._global = np.zeros(self.steps, dtype=np.int64)
        self._pos = self.steps  # the first call starts epoch 0
        self._batch = np.empty(0, dtype=np.int64)
        self._hash = np.empty(0, dtype=np.uint64)  # this epoch's hash of every row (keyed mode)
        self.weight, self.rows = 1.0, 0.0

    @property
    def keyed(self) -> bool:
        return self.keys is not None

    def _epoch_hash(self, epoch: int) -> np.ndarray:
        return mix64(self.keys ^ mix64(np.array([self.salt ^ epoch], dtype=np.uint64)))

    def _new_epoch(self) -> None:
        self.epoch += 1
        self._pos = 0
        if self.keyed:
            h = self._hash = self._epoch_hash(self.epoch)
            bucket = np.minimum((unit_float(h) * self.steps).astype(np.int64), self.steps - 1)
            order = np.lexsort((h, bucket))  # by batch, then by hash: no dependence on the local row order
            counts = np.bincount(bucket, minlength=self.steps)
            self._perm = order.astype(np.int64)
            self._bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            # one collective per epoch, on every worker: the global size of each batch
            self._global = self.ops.all_reduce_sum(torch.from_numpy(counts.astype(np.int64))).numpy()
            return
        self._epoch_start = copy.deepcopy(self.rng.bit_generator.state)
        self._perm = self.rng.permutation(self.n).astype(np.int64)

    def next(self) -> np.ndarray:
        if self._pos >= self.steps:
            self._new_epoch()
        a, b = self._bounds[self._pos], self._bounds[self._pos + 1]
        self._batch = self._perm[a:b]
        if self.keyed:
            world, total = self.ops.world_size, float(max(int(self._global[self._pos]), 1))
            self.weight, self.rows = world * len(self._batch) / total, total / world
        else:
            self.weight, self.rows = 1.0, float(len(self._batch))
        self._pos += 1
        return self._batch

    def noise_keys(self) -> np.ndarray:
        """A key per row of the last batch, fresh each epoch (keyed mode), for worker-independent noise."""
        if not self.keyed:
            raise RuntimeError("noise keys exist only for a keyed sampler")
        return mix64(self._hash[self._batch] ^ np.uint64(0x6E6F697365))  # "noise"

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_start": copy.deepcopy(self._epoch_start), "epoch": self.epoch, "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.keyed:  # the epoch's batches follow from the keys and the epoch alone
            if int(state["epoch"]) < 0:  # saved before the first batch
                return
            self.epoch = int(state["epoch"]) - 1
            self._new_epoch()
            self._pos = int(state["pos"])
            return
        if state["epoch_start"] is None:  # saved before the first batch
            return
        self.rng.bit_generator.state = copy.deepcopy(state["epoch_start"])
        self._new_epoch()
        self.epoch, self._pos = int(state["epoch"]), int(state["pos"])
