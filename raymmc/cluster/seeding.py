"""Every random number of a fit comes from the one user seed, through :func:`derive_seed`.

A fit draws from several independent streams, each derived from ``(seed, stream, rank, index)`` with
NumPy's ``SeedSequence`` (which mixes its words, so nearby seeds give unrelated streams; the
arithmetic offsets this replaces, ``seed + 1`` or ``seed * 1_000_003 + 7919 * rank``, could collide
across seeds and workers):

* shared streams (``rank=None``) are the same on every data-parallel worker: initial weights (DDP
  starts from identical replicas), FAISS k-means restarts, MMDC's fixed target set;
* per-worker streams differ between workers: each sampler's batch order, the rows a worker
  contributes to a gathered sample, and torch's global generator (masking noise, augmentations).

:class:`RandomStreams` holds one worker's per-worker streams and their state, which is what a
checkpoint saves and a resume restores.
"""

from __future__ import annotations

import copy
import enum
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from raymmc.cluster.sampler import EpochSampler


class Stream(enum.IntEnum):
    WEIGHTS = 1  # initial weights (shared)
    KMEANS = 2  # FAISS k-means restarts (shared)
    TARGETS = 3  # MMDC's target set (shared)
    BATCHES = 4  # one sampler's batch order (per worker)
    NOISE = 5  # torch's global generator: masking noise, augmentations (per worker)
    SAMPLE = 6  # rows a worker contributes to a gathered sample (per worker)
    ITEM_SAMPLE = 7  # k-means' sample, by a keyed hash of each item (shared: the same for any sharding)


def derive_seed(seed: int, stream: Stream, rank: int | None = None, index: int | str = 0,
                generation: int = 0) -> int:
    """A seed in [0, 2**31) (FAISS takes a C int) for one stream. ``index`` tells apart streams of one
    kind (a name is hashed); ``generation`` > 0 gives fresh streams after a resume on another worker
    count, where the saved per-worker streams no longer apply."""
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if isinstance(index, str):
        index = zlib.crc32(index.encode())
    words = [int(seed), int(stream), 0 if rank is None else int(rank) + 1, int(index), int(generation)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint32)[0] >> 1)


def seeded_generator(seed: int, stream: Stream, rank: int | None = None, index: int | str = 0,
                     generation: int = 0) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, stream, rank, index, generation))


class RandomStreams:
    """The per-worker random streams of one fit (seeds torch's CPU generator and the worker's CUDA
    generator on construction: the caller runs the fit inside ``torch.random.fork_rng``).

    ``state()`` is JSON-serialisable; ``load(state)`` restores it, including samplers and
    generators created after the call (a resumed fit creates them as it goes)."""

    def __init__(self, seed: int, rank: int, device: torch.device, generation: int = 0):
        self.seed, self.rank, self.generation = int(seed), int(rank), int(generation)
        self.cuda = device.type == "cuda"
        self.cuda_index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if self.cuda else None
        noise = derive_seed(seed, Stream.NOISE, rank, generation=generation)
        torch.random.default_generator.manual_seed(noise)
        if self.cuda:  # this worker's device only (the fit forks exactly that one)
            with torch.cuda.device(self.cuda_index):
                torch.cuda.manual_seed(noise)
        self._samplers: dict[str, EpochSampler] = {}
        self._generators: dict[str, np.random.Generator] = {}
        self._pending: dict[str, Any] = {"samplers": {}, "generators": {}}

    def sampler(self, name: str, n: int, steps: int, min_batch: int = 1, *, keys: np.ndarray | None = None,
                ops: Any = None) -> "EpochSampler":
        """A new :class:`EpochSampler` over ``n`` local rows, ``steps`` batches per epoch; keyed by ``keys``
        (its salt shared by all workers, so their batches are the same for any worker count) when given."""
        from raymmc.cluster.base import LOCAL
        from raymmc.cluster.sampler import EpochSampler

        s = EpochSampler(n, steps, seeded_generator(self.seed, Stream.BATCHES, self.rank, name, self.generation),
                         min_batch=min_batch, keys=keys, salt=derive_seed(self.seed, Stream.BATCHES, None, name),
                         ops=ops if ops is not None else LOCAL)
        if name in self._pending["samplers"]:
            s.load_state_dict(self._pending["samplers"].pop(name))
        self._samplers[name] = s
        return s

    def row_keys(self, items: np.ndarray) -> np.ndarray:
        """uint64 keys of the local rows for keyed samplers and samples, from the items' stable keys (ids):
        the same on any worker."""
        from raymmc.cluster.sampler import row_keys

        return row_keys(items, derive_seed(self.seed, Stream.BATCHES, None, "rows"))

    def generator(self, name: str) -> np.random.Generator:
        """The worker's generator for ``name`` (e.g. which rows go into a gathered sample)."""
        if name not in self._generators:
            g = seeded_generator(self.seed, Stream.SAMPLE, self.rank, name, self.generation)
            if name in self._pending["generators"]:
                g.bit_generator.state = self._pending["generators"].pop(name)
            self._generators[name] = g
        return self._generators[name]

    def state(self) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state().tolist(),
            "cuda": torch.cuda.get_rng_state(self.cuda_index).tolist() if self.cuda else None,
            "samplers": {k: s.state_dict() for k, s in self._samplers.items()},
            "generators": {k: copy.deepcopy(g.bit_generator.state) for k, g in self._generators.items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if self.cuda and state.get("cuda") is not None:
            torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), self.cuda_index)
        self._pending = {"samplers": dict(state["samplers"]), "generators": dict(state["generators"])}
        for name in list(self._pending["samplers"]):
            if name in self._samplers:
                self._samplers[name].load_state_dict(self._pending["samplers"].pop(name))
        for name in list(self._pending["generators"]):
            if name in self._generators:
                self._generators[name].bit_generator.state = self._pending["generators"].pop(name)
