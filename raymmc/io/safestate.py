"""Model and checkpoint state on storage without pickle.

A state is a tree of dicts, lists, tuples, strings, numbers, booleans, None, NumPy arrays and
torch tensors (what the clusterers' ``state_dict``, optimizers, schedulers and random streams
produce). It is stored as one safetensors file: the arrays as tensors, the tree around them as
JSON in the file's metadata. Loading parses a length-prefixed JSON header and raw buffers, so
bytes planted by someone who can write to a bucket can corrupt a state, never run code: nothing
read from storage is ever unpickled (``pickle``, ``torch.load(weights_only=False)``, joblib).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

FORMAT = "raymmc-state/1"
_TREE = "raymmc_tree"


class UnsafeStateError(ValueError):
    """A stored file is not a raymmc safetensors state (a pickle, say): it was refused unread.
    The message names the file."""


def dumps(state: Any) -> bytes:
    """Serialise ``state`` (see the module docstring) to safetensors bytes."""
    import torch  # here, not at import: Ray task workers that never touch a model skip torch
    from safetensors.torch import save

    tensors: dict[str, Any] = {}

    def enc(obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, (int, float)):
            return obj
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, torch.Tensor):
            key = f"t{len(tensors)}"
            # Own, contiguous CPU memory: safetensors refuses views that share storage.
            tensors[key] = obj.detach().cpu().contiguous().clone()
            return {"$tensor": key}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object or obj.dtype.kind in "USV":
                if obj.dtype.kind == "U" or all(isinstance(v, str) for v in obj.reshape(-1)):
                    return {"$strings": obj.reshape(-1).tolist(), "shape": list(obj.shape)}
                raise TypeError(f"cannot store a NumPy array of dtype {obj.dtype} safely")
            key = f"t{len(tensors)}"
            tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
            return {"$ndarray": key}
        if isinstance(obj, tuple):
            return {"$tuple": [enc(v) for v in obj]}
        if isinstance(obj, list):
            return [enc(v) for v in obj]
        if isinstance(obj, dict):
            # Pairs, not a JSON object: optimizer states are keyed by int parameter ids.
            return {"$dict": [[enc(k), enc(v)] for k, v in obj.items()]}
        raise TypeError(f"cannot store {type(obj).__name__} in a state file (tensors, arrays and plain types only)")

    tree = enc(state)
    meta = {"format": FORMAT, _TREE: json.dumps(tree, allow_nan=True)}
    return save(tensors, metadata=meta)


def loads(data: bytes, where: str = "state") -> Any:
    """The state stored by :func:`dumps`. Raises :class:`UnsafeStateError`, naming ``where``, for
    anything else (a pickle, a torch zip, a truncated file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    meta = _metadata(data, where)
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise UnsafeStateError(f"{where}: refused: not a valid safetensors file ({exc})") from exc
    try:
        tree = json.loads(meta[_TREE])
    except (KeyError, json.JSONDecodeError) as exc:
        raise UnsafeStateError(f"{where}: refused: its metadata holds no raymmc state tree") from exc

    def dec(node: Any) -> Any:
        if isinstance(node, list):
            return [dec(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$tensor" in node:
            return tensors[node["$tensor"]]
        if "$ndarray" in node:
            return tensors[node["$ndarray"]].numpy()
        if "$strings" in node:
            return np.array(node["$strings"], dtype=object).reshape(node["shape"])
        if "$tuple" in node:
            return tuple(dec(v) for v in node["$tuple"])
        if "$dict" in node:
            return {dec(k): dec(v) for k, v in node["$dict"]}
        raise UnsafeStateError(f"{where}: refused: unknown node {sorted(node)} in its state tree")

    try:
        return dec(tree)
    except KeyError as exc:
        raise UnsafeStateError(f"{where}: refused: its state tree names a missing tensor {exc}") from exc


def _metadata(data: bytes, where: str) -> dict[str, str]:
    """The safetensors header's metadata, read by hand first, so that a file that is not ours (a
    pickle starts with b"\\x80") is refused with a plain message before any parser sees it."""
    if len(data) < 8:
        raise UnsafeStateError(f"{where}: refused: {len(data)} bytes is not a safetensors state file")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > len(data) - 8 or data[8:9] != b"{":
        kind = "a Python pickle" if data[:1] == b"\x80" else ("a zip (torch.save) archive" if data[:2] == b"PK"
                                                              else "not a safetensors file")
        raise UnsafeStateError(f"{where}: refused: {kind}; raymmc only reads safetensors states "
                               "and never unpickles stored files")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UnsafeStateError(f"{where}: refused: unreadable safetensors header ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UnsafeStateError(f"{where}: refused: a safetensors file, but not a {FORMAT} state")
    return meta
