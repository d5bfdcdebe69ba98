"""Ray Tune glue of `raymmc tune`: the trial, the search (Optuna) and the stopping rule (ASHA).

Every trial reads the same bounded sample of the prepared feature rows from the object store (never the
archive, never a per-trial extraction), fits one configuration in its own actor, and reports the label-free
score of :mod:`raymmc.cluster.selection`: DEC and JECL also at their target updates (every
``report_steps`` self-training steps), so ASHA stops a poor configuration before it converges. Labels, where
the archive has them, are scored too (nmi/acc/ari) but the search and the choice never see them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from raymmc.cluster.base import MultiViewData
from raymmc.cluster.selection import AGREEMENT_FLOOR
from raymmc.hashing import keep_fraction, keyed_priority, under
from raymmc.train.blocks import concat_blocks

SELF_TRAINING = frozenset({"dec", "jecl"})  # report a score at their target updates


@dataclass
class TuneSettings:
    """``tune.*``: how `raymmc tune` searches."""

    trials: int = 12  # --trials
    # What the sweep maximises (raymmc.cluster.selection). "auto": agreed_silhouette for JECL (the input-space
    # silhouette of the trials whose two views agree on the clusters), silhouette otherwise; chosen on dev
    # archives (docs/tune.md, benchmarks/tune_scores.py).
    score: Literal["auto", "silhouette", "calinski_harabasz", "agreement", "silhouette_agreement",
                   "agreed_silhouette", "stability"] = "auto"
    # agreed_silhouette: the cross-view agreement (NMI) from which a trial's two views count as agreeing
    agreement_floor: float = AGREEMENT_FLOOR
    search: Literal["optuna", "random"] = "optuna"  # Optuna's TPE, or its random sampler
    scheduler: Literal["asha", "none"] = "asha"
    report_steps: int = 100  # DEC/JECL: a score at the first target update after every this many steps
    grace_steps: int = 200  # ASHA never stops a trial before this many self-training steps
    reduction_factor: int = 3  # ASHA keeps the best 1/this at each rung
    max_concurrent: int = 1  # trials at once (each fits in one actor)
    cpus_per_trial: float = 1.0  # also the trial's torch threads
    gpus_per_trial: float = 0.0
    # Trials fit on a keyed sample of about this many usable items (the same items in every trial); the winning
    # configuration is then run on the whole archive.
    max_items: int = 100_000
    score_rows: int = 5000  # the score's keyed sample (silhouette is quadratic in it)
    # name -> [kind, *args] (or null to drop it), per algorithm: {"jecl": {"lam": ["uniform", 0.3, 0.7]}}
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    # MLflow tracking URI (e.g. sqlite:///mlflow.db, http://mlflow:5000): every trial's values and scores are logged
    # there as a run of the experiment named after the sweep. Needs `pip install 'raymmc[mlflow]'`.
    mlflow_uri: str | None = None


def default_score(algorithm: str) -> str:
    return "agreed_silhouette" if algorithm == "jecl" else "silhouette"


def resolve_score(settings: TuneSettings, algorithm: str) -> str:
    from raymmc.typed import ConfigError

    score = default_score(algorithm) if settings.score == "auto" else settings.score
    if score in ("agreement", "silhouette_agreement", "agreed_silhouette") and algorithm != "jecl":
        raise ConfigError(f"tune.score={score} needs a two-view model (jecl), not {algorithm}")
    return score


def score_mask(ids, n_total: int, rows: int, seed: int) -> np.ndarray:
    """(n,) bool: the items of the score's keyed sample among ``ids`` (the ``rows`` lowest priorities of those
    under the share that holds them in ``n_total`` items): the same items in a trial and in the finished run."""
    keys = keyed_priority([str(i) for i in ids], seed ^ 0x5C0E)
    mask = under(keys, keep_fraction(rows, n_total))
    if mask.sum() > rows:
        chosen = np.flatnonzero(mask)[np.argsort(keys[mask], kind="stable")[:rows]]
        mask = np.zeros(len(keys), dtype=bool)
        mask[chosen] = True
    return mask


def trial_sample_filter(batch: pa.Table, *, fraction: float, seed: int) -> pa.Table:
    """The rows of the trials' keyed sample (a Ray Data ``map_batches`` function)."""
    keys = keyed_priority([str(i) for i in batch.column("id").to_pylist()], seed)
    return batch.filter(pa.array(under(keys, fraction)))


def sample_refs(dataset, usable: int, settings: TuneSettings, seed: int) -> list:
    """Object refs of the trials' rows: the keyed sample of about ``max_items`` usable rows, materialised once."""
    ds = dataset
    if usable > settings.max_items:
        ds = ds.map_batches(trial_sample_filter, batch_format="pyarrow",
                            fn_kwargs={"fraction": keep_fraction(settings.max_items, usable), "seed": seed})
    return ds.materialize().to_arrow_refs()


@dataclass
class TrialSetup:
    """What every trial shares (passed once through the object store)."""

    algorithm: str
    clusters: tuple[int, int]
    base_params: dict[str, Any]  # the run config's settings of the algorithm
    space: dict[str, Any]  # raymmc.train.tune_space specs
    score: str
    seed: int
    pixel_channels: int
    n_total: int  # usable items of the archive (the score sample's share)
    score_rows: int
    report_steps: int
    threads: int
    agreement_floor: float = AGREEMENT_FLOOR


def trial_data(refs: list, channels: int) -> tuple[MultiViewData, np.ndarray | None]:
    """The trial's rows in input order, and their labels (None when the archive has none)."""
    import ray

    table = concat_blocks(ray.get(list(refs))).sort_by("index")
    labels = None
    if "label" in table.column_names:
        values = table.column("label").to_pylist()
        if any(v is not None for v in values):
            labels = np.array(["" if v is None else str(v) for v in values], dtype=object)
    from raymmc.train.trainer import table_to_multiview

    return table_to_multiview(table, channels), labels


class Scorer:
    """The label-free score (and the labelled metrics, for the record) of a model on the trial's score sample."""

    def __init__(self, data: MultiViewData, labels: np.ndarray | None, setup: TrialSetup, *, sampled: bool = False):
        # sampled: ``data`` is the score sample already (the finished run's, drawn on the workers)
        self.rows = np.arange(len(data)) if sampled else np.flatnonzero(
            score_mask(data.ids, setup.n_total, setup.score_rows, setup.seed))
        self.data = data.subset(self.rows)
        self.labels = None if labels is None else labels[self.rows]
        self.setup = setup

    def __call__(self, model, other=None) -> dict[str, float]:
        import torch

        from raymmc.cluster.selection import agreement, label_free_scores

        with torch.no_grad():
            pred = self.predict(model)  # as the run's assignments are: the fitted model's prediction
            out = label_free_scores(model, self.data, pred, max_rows=self.setup.score_rows, seed=self.setup.seed,
                                    agreement_floor=self.setup.agreement_floor)
            if other is not None:  # a second fit with another seed
                theirs = self.predict(other)
                keep = (pred >= 0) & (theirs >= 0)
                out["stability"] = agreement(pred[keep], theirs[keep])
        out["score"] = out.get(self.setup.score, float("nan"))
        if self.labels is not None:
            from raymmc.report.metrics import evaluate

            keep = (pred >= 0) & (self.labels != "")
            if keep.sum():
                out.update({k: v for k, v in evaluate(self.labels[keep], pred[keep]).items()
                            if k in ("nmi", "acc", "ari")})
        return out

    def predict(self, model) -> np.ndarray:
        usable = np.asarray(model.usable(self.data), bool)
        pred = np.full(len(self.data), -1, dtype=np.int64)
        if usable.any():
            pred[usable] = model.predict(self.data.subset(np.flatnonzero(usable)))
        return pred


def point_of(config: dict[str, Any], setup: TrialSetup) -> tuple[dict[str, Any], int]:
    """The searched values of a trial's config (Optuna's flat names) and its K."""
    lo, hi = setup.clusters
    point = {name: config[name] for name in setup.space if name in config}
    return point, int(config.get("clusters", lo)) if hi > lo else lo


def fit_point(data: MultiViewData, point: dict[str, Any], k: int, setup: TrialSetup, seed: int | None = None,
              on_epoch=None):
    """One configuration fitted in-process (the trial's fit; also the benchmarks')."""
    from raymmc.cluster.registry import make_clusterer
    from raymmc.train.tune_space import to_params

    params = to_params(setup.algorithm, point, setup.base_params, setup.space)
    model = make_clusterer(setup.algorithm, k, params, seed=setup.seed if seed is None else seed, on_epoch=on_epoch)
    return model.fit(data)


def run_trial(config: dict[str, Any], *, setup: TrialSetup, refs: list) -> None:
    """A Tune trial: fit the configuration on the shared sample, report the score (also at target updates)."""
    import torch
    from ray import tune

    torch.set_num_threads(max(1, setup.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, setup.threads)))
    data, labels = trial_data(refs, setup.pixel_channels)
    point, k = point_of(config, setup)
    scorer = Scorer(data, labels, setup)
    holder: dict[str, Any] = {"next": setup.report_steps}

    def progress(rec: dict[str, Any]) -> None:
        # a score at the first target update past every report_steps steps, for ASHA (the final one follows)
        if setup.algorithm not in SELF_TRAINING or rec.get("phase") != "self_training":
            return
        if rec["step"] >= holder["next"] and "model" in holder:
            holder["next"] = (rec["step"] // setup.report_steps + 1) * setup.report_steps
            tune.report({**scorer(holder["model"]), "step": int(rec["step"]), "clusters": k, "final": 0})

    from raymmc.cluster.registry import make_clusterer
    from raymmc.train.tune_space import to_params

    params = to_params(setup.algorithm, point, setup.base_params, setup.space)
    model = make_clusterer(setup.algorithm, k, params, seed=setup.seed, on_epoch=progress)
    holder["model"] = model
    model.fit(data)
    other = fit_point(data, point, k, setup, seed=setup.seed + 1) if setup.score == "stability" else None
    final = scorer(model, other=other)
    steps = int(getattr(model, "n_iter_", 0) or 0)
    tune.report({**final, "step": max(steps, holder["next"]), "clusters": k, "final": 1})


@dataclass
class DefineSpace:
    """Optuna's define-by-run space: the algorithm's specs, and K when it is a range (a picklable callable: Tune
    saves the searcher with the sweep's state)."""

    specs: dict[str, Any]
    clusters: tuple[int, int]

    def __call__(self, trial) -> None:
        from raymmc.train.tune_space import suggest

        suggest(trial, self.specs)
        lo, hi = self.clusters
        if hi > lo:
            trial.suggest_int("clusters", lo, hi)


def make_search(settings: TuneSettings, setup: TrialSetup):
    """Optuna (TPE, or its random sampler) over the space and K, seeded by the run's seed."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = (optuna.samplers.TPESampler(seed=setup.seed) if settings.search == "optuna"
               else optuna.samplers.RandomSampler(seed=setup.seed))
    return OptunaSearch(space=DefineSpace(setup.space, setup.clusters), metric="score", mode="max", sampler=sampler)


def mlflow_callbacks(settings: TuneSettings, experiment: str) -> list:
    """Ray Tune's MLflow logger where ``tune.mlflow_uri`` is set (a clear error where mlflow is not installed)."""
    if not settings.mlflow_uri:
        return []
    try:
        import mlflow  # noqa: F401
    except ImportError:
        from raymmc.typed import ConfigError

        raise ConfigError("tune.mlflow_uri is set but mlflow is not installed: pip install 'raymmc[mlflow]'") from None
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=settings.mlflow_uri, experiment_name=experiment,
                                 tags={"raymmc": "tune"}, save_artifact=False)]


def make_scheduler(settings: TuneSettings, setup: TrialSetup, max_steps: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "none" or setup.algorithm not in SELF_TRAINING:
        return FIFOScheduler()
    return ASHAScheduler(time_attr="step", metric="score", mode="max", max_t=max(max_steps, settings.grace_steps + 1),
                         grace_period=settings.grace_steps, reduction_factor=settings.reduction_factor)
