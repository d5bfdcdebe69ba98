"""What `raymmc tune` searches: each algorithm's hyperparameters, as plain specs.

A spec is ``[kind, *args]`` with kind ``uniform`` / ``loguniform`` (low, high), ``randint`` (low, high, both
included) or ``choice`` (a list). A searched name maps to one or more dotted keys of the algorithm's config
(``cluster.params.<algorithm>``; for k-means ``cluster.kmeans``): JECL's ``latent`` sets both autoencoders'.
``tune.space`` in the config replaces or adds entries (``{"lam": ["uniform", 0.3, 0.7]}``) or removes one
(``{"beta": null}``). The defaults span what the papers and our measurements found usable; a user with a
GPU cluster widens them.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from raymmc.typed import ConfigError

Spec = list  # [kind, *args]
KINDS = ("uniform", "loguniform", "randint", "choice")

# name -> (spec, dotted config keys it sets)
SPACES: dict[str, dict[str, tuple[Spec, tuple[str, ...]]]] = {
    "jecl": {
        "lam": (["uniform", 0.1, 0.9], ("lam",)),
        "beta": (["loguniform", 0.01, 1.0], ("beta",)),  # alignment (JSD) weight
        "gamma": (["loguniform", 0.01, 1.0], ("gamma",)),  # regulariser weight
        # Adam's (JECL's self-training default); the stamps-icons screen found 3e-5 to 1e-3 usable
        "lr": (["loguniform", 3e-5, 1e-3], ("cluster.lr",)),
        "latent": (["choice", [10, 16, 32, 64]], ("image_ae.latent", "text_ae.latent")),
        "update_interval": (["choice", [10, 30, 100]], ("cluster.update_interval",)),
    },
    "dec": {
        "lr": (["loguniform", 0.001, 0.05], ("cluster.lr",)),  # SGD's (DEC's default)
        "latent": (["choice", [10, 16, 32, 64]], ("ae.latent",)),
        "update_interval": (["choice", [10, 30, 100]], ("cluster.update_interval",)),
        "noise": (["uniform", 0.0, 0.5], ("ae.noise",)),
    },
    "dm2c": {
        "lambda_cycle": (["loguniform", 0.1, 10.0], ("lambda_cycle",)),
        "lambda_adv": (["loguniform", 0.1, 10.0], ("lambda_adv",)),
        "lr_g": (["loguniform", 1e-5, 1e-3], ("lr_g",)),
        "lr_d": (["loguniform", 1e-5, 1e-3], ("lr_d",)),
        "n_critic": (["choice", [1, 3, 5]], ("n_critic",)),
    },
    "mmdc": {
        "lr": (["loguniform", 0.01, 0.2], ("lr",)),
        "rotate_degrees": (["uniform", 0.0, 45.0], ("rotate_degrees",)),
    },
    "kmeans": {
        # the image block's weight in the concatenation (not the view itself: a view changes which items can be
        # clustered, so it is the run's choice, not a trial's)
        "image_weight": (["loguniform", 0.25, 4.0], ("image_weight",)),
        "nredo": (["choice", [1, 5, 10]], ("nredo",)),
    },
}


def _check(name: str, spec: Any) -> Spec:
    if not isinstance(spec, (list, tuple)) or not spec or spec[0] not in KINDS:
        raise ConfigError(f"tune.space.{name}: expected [kind, ...] with kind one of {KINDS}, got {spec!r}")
    kind, args = spec[0], list(spec[1:])
    if kind == "choice":
        if len(args) != 1 or not isinstance(args[0], (list, tuple)) or not args[0]:
            raise ConfigError(f"tune.space.{name}: choice takes one non-empty list, got {spec!r}")
    elif len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or args[0] > args[1]:
        raise ConfigError(f"tune.space.{name}: {kind} takes low <= high, got {spec!r}")
    elif kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"tune.space.{name}: loguniform needs low > 0, got {spec!r}")
    return [kind, *args]


def space(algorithm: str, overrides: dict[str, Any] | None) -> dict[str, tuple[Spec, tuple[str, ...]]]:
    """The algorithm's search space with ``overrides`` (name -> spec, or name -> None to drop it; a new name is a
    dotted config key of the algorithm)."""
    if algorithm not in SPACES:
        raise ConfigError(f"no search space for {algorithm!r}; one of {sorted(SPACES)}")
    out = copy.deepcopy(SPACES[algorithm])
    for name, spec in (overrides or {}).items():
        if spec is None:
            out.pop(name, None)
            continue
        keys = out[name][1] if name in out else (name,)
        out[name] = (_check(name, spec), keys)
    return out


def parse_clusters(value: str | int) -> tuple[int, int]:
    """``K`` or ``LO:HI`` -> (lo, hi)."""
    text = str(value)
    try:
        lo, hi = (int(p) for p in text.split(":", 1)) if ":" in text else (int(text), int(text))
    except ValueError:
        raise ConfigError(f"--clusters must be K or LO:HI, got {value!r}") from None
    if not 2 <= lo <= hi:
        raise ConfigError(f"--clusters {value!r}: need 2 <= LO <= HI")
    return lo, hi


def draw(specs: dict[str, tuple[Spec, tuple[str, ...]]], rng: np.random.Generator) -> dict[str, Any]:
    """One random point of the space (for benchmarks without Optuna)."""
    out: dict[str, Any] = {}
    for name, (spec, _) in specs.items():
        kind, *args = spec
        if kind == "uniform":
            out[name] = float(rng.uniform(*args))
        elif kind == "loguniform":
            out[name] = float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
        elif kind == "randint":
            out[name] = int(rng.integers(args[0], args[1] + 1))
        else:
            choice = args[0][int(rng.integers(len(args[0])))]
            out[name] = choice.item() if hasattr(choice, "item") else choice
    return out


def suggest(trial: Any, specs: dict[str, tuple[Spec, tuple[str, ...]]]) -> dict[str, Any]:
    """One point from an Optuna trial (define-by-run)."""
    out: dict[str, Any] = {}
    for name, (spec, _) in specs.items():
        kind, *args = spec
        if kind in ("uniform", "loguniform"):
            out[name] = trial.suggest_float(name, float(args[0]), float(args[1]), log=kind == "loguniform")
        elif kind == "randint":
            out[name] = trial.suggest_int(name, int(args[0]), int(args[1]))
        else:
            out[name] = trial.suggest_categorical(name, list(args[0]))
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    for part in path:
        tree = tree.setdefault(part, {})
    tree[last] = value


def to_params(algorithm: str, point: dict[str, Any], base: dict[str, Any] | None,
              specs: dict[str, tuple[Spec, tuple[str, ...]]] | None = None) -> dict[str, Any]:
    """The algorithm's config dict: ``base`` (the run config's) with the point's values set at their keys."""
    specs = specs if specs is not None else space(algorithm, None)
    out = copy.deepcopy(base or {})
    for name, value in point.items():
        for key in specs[name][1]:
            _set(out, key, value)
    return out
