"""The checkpoint protocol of the deep algorithms: named phases and the checkpoint record.

A fit calls its trainer's ``checkpoint_fn`` at the end of each phase (and every
``checkpoint_every`` target updates or epochs inside a long one) with a :func:`record`; given such
a record as ``resume_state``, a fit continues from it and ends exactly where an uninterrupted fit
with the same seed ends (same worker count). A record holds everything a fit's future depends on:
weights, optimizer and scheduler state, counters, and every worker's random streams. The self-training
loop's per-item state is not in it: its last labels and current target are functions of the
checkpointed weights and are recomputed on resume, so a DEC / JECL / DM2C record stays O(model) at
any archive size (MMDC's record holds its N x d target table, which is the model's state).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raymmc.cluster.base import GlobalOps

FORMAT = "raymmc-checkpoint/1"


class Phase(str, enum.Enum):
    PRETRAINED = "pretrained"  # autoencoders trained (DEC, JECL, DM2C); next: initialisation or adversarial
    INITIALISED = "initialised"  # centroids chosen by k-means (DEC, JECL); next: self-training from step 0
    SELF_TRAINING = "self_training"  # right after a target update of the self-training loop (DEC, JECL)
    ADVERSARIAL = "adversarial"  # after an adversarial epoch (DM2C)
    EPOCH = "epoch"  # after a training epoch (MMDC)
    DONE = "done"  # the final model (the trainer's last checkpoint)


@dataclass
class Resume:
    phase: Phase
    state: dict[str, Any]  # the algorithm's own part
    streams: dict[str, Any] | None  # this worker's random streams; None: re-derived (other worker count)
    history: list[dict[str, Any]]


def to_cpu(tree: Any) -> Any:
    """A deep copy of a state tree with every tensor detached on the CPU (state dicts alias live weights)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [to_cpu(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(to_cpu(v) for v in tree)
    return tree


def gather_strings(text: str, ops: GlobalOps) -> list[str]:
    """Every worker's ``text``, in rank order (two all-gathers: lengths, then bytes)."""
    data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.zeros(0, dtype=torch.uint8)
    lengths = ops.all_gather_cat(torch.tensor([len(data)], dtype=torch.int64)).tolist()
    allbytes = ops.all_gather_cat(data).numpy().tobytes()
    out, pos = [], 0
    for n in lengths:
        out.append(allbytes[pos:pos + n].decode())
        pos += n
    return out


def record(algorithm: str, phase: Phase, state: dict[str, Any], streams: list[str],
           history: list[dict[str, Any]]) -> dict[str, Any]:
    return {"format": FORMAT, "algorithm": algorithm, "phase": phase.value, "world_size": len(streams),
            "streams": list(streams), "history": json.loads(json.dumps(history)), "state": to_cpu(state)}


def read(saved: dict[str, Any], algorithm: str, ops: GlobalOps) -> Resume:
    """This worker's view of a checkpoint record; a record of another algorithm or format is refused."""
    if saved.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} checkpoint (format {saved.get('format')!r})")
    if saved.get("algorithm") != algorithm:
        raise ValueError(f"a checkpoint of {saved.get('algorithm')!r} cannot resume {algorithm!r}")
    phase = Phase(saved["phase"])
    streams = None
    if int(saved["world_size"]) == ops.world_size:
        streams = json.loads(saved["streams"][ops.rank])
    return Resume(phase, saved["state"], streams, list(saved.get("history", [])))
