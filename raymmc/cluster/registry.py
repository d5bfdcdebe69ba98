"""Build any clustering algorithm by name: ``make_clusterer("jecl", 11, {"lam": 0.5}, seed=0)``.

Algorithms are imported lazily (DM2C and MMDC live in their own modules).  ``config`` may be
``None`` (defaults), a dict (nested dicts for nested dataclasses; unknown keys raise) or the
algorithm's config dataclass.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from raymmc.cluster.base import Clusterer
from raymmc.cluster.base import make_config as base_make_config
from raymmc.cluster.deep import DeepClusterer

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
    return base_make_config(config_class(name), config)


def make_clusterer(name: str, n_clusters: int, config: dict | Any | None = None, seed: int = 0,
                   on_epoch: Callable[[dict], None] | None = None,
                   wrap: Callable[[Any], Any] | None = None) -> Clusterer:
    """An unfitted estimator; ``on_epoch`` / ``wrap`` (progress hook, DDP wrapper) go to the deep ones."""
    mod, cls_name, _ = _lookup(name)
    cls = getattr(importlib.import_module(mod), cls_name)
    hooks = {"on_epoch": on_epoch, "wrap": wrap} if issubclass(cls, DeepClusterer) else {}
    return cls(int(n_clusters), make_config(name, config), seed=int(seed), **hooks)
