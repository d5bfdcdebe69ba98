"""Build any clustering algorithm by name: ``make_clusterer("jecl", 11, {"lam": 0.5}, seed=0)``.

Algorithms are imported lazily (DM2C and MMDC live in their own modules).  ``config`` may be
``None`` (defaults), a dict (nested dicts for nested dataclasses; unknown keys raise) or the
algorithm's config dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable

from raymmc.cluster.base import Clusterer

# name -> (module, estimator class, config class)
ALGORITHMS: dict[str, tuple[str, str, str]] = {
    "kmeans": ("raymmc.cluster.kmeans", "KMeans", "KMeansConfig"),
    "dec": ("raymmc.cluster.dec", "DEC", "DECConfig"),
    "jecl": ("raymmc.cluster.jecl", "JECL", "JECLConfig"),
    "dm2c": ("raymmc.cluster.dm2c", "DM2C", "DM2CConfig"),
    "mmdc": ("raymmc.cluster.mmdc", "MMDC", "MMDCConfig"),
}


def available() -> list[str]:
    """Names whose module imports here."""
    out = []
    for name, (mod, _, _) in ALGORITHMS.items():
        try:
            importlib.import_module(mod)
        except ImportError:
            continue
        out.append(name)
    return out


def config_class(name: str) -> type:
    mod, _, cfg = _lookup(name)
    return getattr(importlib.import_module(mod), cfg)


def _lookup(name: str) -> tuple[str, str, str]:
    key = name.lower()
    if key not in ALGORITHMS:
        raise ValueError(f"unknown clustering algorithm {name!r}; known: {sorted(ALGORITHMS)}")
    return ALGORITHMS[key]


def make_config(name: str, config: dict | Any | None = None) -> Any:
    from raymmc.cluster.dec import config_from_dict

    return config_from_dict(config_class(name), config)


def make_clusterer(name: str, n_clusters: int, config: dict | Any | None = None, seed: int = 0,
                   on_epoch: Callable[[dict], None] | None = None,
                   wrap: Callable[[Any], Any] | None = None) -> Clusterer:
    """An unfitted estimator.  ``seed`` goes to the constructor, or into ``config.seed`` for an
    algorithm whose constructor has no seed argument; ``on_epoch`` / ``wrap`` (progress hook,
    DDP wrapper) are passed where the algorithm accepts them."""
    mod, cls_name, _ = _lookup(name)
    cls = getattr(importlib.import_module(mod), cls_name)
    cfg = make_config(name, config)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    if "seed" in params:
        kwargs["seed"] = int(seed)
    elif dataclasses.is_dataclass(cfg) and any(f.name == "seed" for f in dataclasses.fields(cfg)):
        cfg = dataclasses.replace(cfg, seed=int(seed))
    if on_epoch is not None and "on_epoch" in params:
        kwargs["on_epoch"] = on_epoch
    if wrap is not None and "wrap" in params:
        kwargs["wrap"] = wrap
    return cls(int(n_clusters), cfg, **kwargs)
