"""Ray job: a Ray Tune sweep over run-config keys; every trial is one full `raymmc run`.

    ray job submit --working-dir . -- python jobs/tune_sweep.py --config jobs/configs/tune_kmeans.yaml \
        --output /abs/path/runs

The config file is an ordinary run config plus a ``tune:`` section (not part of RunConfig):

    tune:
      name: kmeans-sweep        # trial runs are <name>-<UTC time>-<trial id> under the output root
      metric: score             # score = nmi where the archive has labels, else silhouette
      mode: max
      num_samples: 1            # repeats of the search space (random samplers draw anew)
      max_concurrent_trials: 1  # trials share the feature cache: the first extracts, later ones reuse
      cpus_per_trial: 0         # the trial only drives Ray Data/Train work, which asks for its own CPUs/GPUs
      search_space:             # dotted config keys; a list is a grid search
        cluster.kmeans.nredo: [1, 5, 10]
        seed: {grid_search: [0, 1]}
        cluster.kmeans.niter: {choice: [20, 100]}
        cluster.clusters: {randint: [8, 15]}   # also uniform, loguniform, quniform, qrandint

Each trial reports the run's metrics (acc/nmi/ari/purity/f_score where labels exist), the
silhouette of the clustered embedding (label-free), ``score`` and the run URI. The sweep's
summary (every trial, best first) is written to ``<output>/tune/<sweep>/summary.json``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sys
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import cluster_archive as job  # noqa: E402  (ensures raymmc is importable)
import yaml  # noqa: E402

from raymmc.config import ConfigError, RunConfig, load_config  # noqa: E402
from raymmc.io import storage  # noqa: E402

TUNE_DEFAULTS: dict[str, Any] = {
    "name": "sweep", "metric": "score", "mode": "max", "num_samples": 1, "max_concurrent_trials": 1,
    "cpus_per_trial": 0, "search_space": {},
}
SAMPLERS = ("grid_search", "choice", "uniform", "loguniform", "randint", "qrandint", "quniform")


def split_config(path: str | None) -> tuple[dict, dict]:
    """``(run config mapping, tune section with defaults)`` from a job config file."""
    raw = (yaml.safe_load(open(path)) if path else None) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    section = raw.pop("tune", None) or {}
    unknown = set(section) - set(TUNE_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown tune key(s) {sorted(unknown)}; valid: {sorted(TUNE_DEFAULTS)}")
    return raw, {**TUNE_DEFAULTS, **section}


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_domain(spec: Any):
    """A search-space entry -> a Tune domain (a list is a grid search; anything else is a constant)."""
    from ray import tune

    if isinstance(spec, list):
        return tune.grid_search(spec)
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SAMPLERS:
        kind, arg = next(iter(spec.items()))
        return getattr(tune, kind)(list(arg)) if kind in ("grid_search", "choice") else getattr(tune, kind)(*arg)
    return spec


def _example(spec: Any) -> Any:
    """A value the entry can take (checked against RunConfig before the sweep starts)."""
    if isinstance(spec, list):
        return spec[0]
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SAMPLERS:
        return next(iter(spec.values()))[0]
    return spec


def overrides_of(params: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


def absolutize(data: dict) -> dict:
    """Local paths made absolute: trials may run with another working directory."""
    data = json.loads(json.dumps(data))
    for holder, key in ((data, "input"), (data, "output"), (data["extract"], "cache")):
        value = holder.get(key)
        if value and storage.scheme_of(value) == "file" and not value.startswith("file://"):
            holder[key] = os.path.abspath(os.path.expanduser(value))
    return data


def silhouette(run_uri: str, cfg: RunConfig, max_points: int = 5000) -> float | None:
    """Silhouette of the run's clusters on the features of the run (each view L2-normalised, a
    missing view zeros, concatenated), on a seeded sample of at most ``max_points`` items; None
    when undefined. Label-free, and the same input space for every algorithm."""
    import numpy as np
    from sklearn.metrics import silhouette_score

    from raymmc.cluster.views import l2_normalize
    from raymmc.features.extract import feature_matrix, load_features
    from raymmc.io.rundir import RunDir

    rundir = RunDir(run_uri, cfg.storage)
    table = load_features(rundir.read_json("features.json")["dirs"], cfg.storage)
    first: dict[str, int] = {}
    for n, item in enumerate(table.column("id").to_pylist()):  # the row an id was clustered from
        if item is not None:
            first.setdefault(item, n)
    assignments = rundir.read_table("assignments")
    rows = [first.get(item) for item in assignments.column("id").to_pylist()]
    labels = assignments.column("cluster").to_numpy()
    if None in rows or not 2 <= len(set(labels.tolist())) < len(labels):
        return None
    table = table.take(rows)
    parts = [l2_normalize(feature_matrix(table, column)) * table.column(flag).to_numpy(zero_copy_only=False)[:, None]
             for column, flag in (("image_feat", "has_image"), ("text_feat", "has_text"))
             if column in table.column_names]
    if not parts:
        return None
    x = np.concatenate(parts, axis=1)
    return float(silhouette_score(x, labels, sample_size=min(max_points, len(labels)), random_state=cfg.seed))


def trial(config: dict, base: dict, prefix: str) -> None:
    """One Tune trial: a pipeline run with the trial's overrides; reports its metrics."""
    from ray import tune

    from raymmc.pipeline import run

    params = config["params"]
    cfg = load_config(None, overrides_of(params), base)
    cfg.run_name = f"{prefix}-{tune.get_context().get_trial_id()}"
    result = run(cfg)
    metrics: dict[str, Any] = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    try:
        sil = silhouette(result.run_uri, cfg)
    except Exception as exc:  # noqa: BLE001 - a label-free extra; the run itself succeeded
        print(f"silhouette of {result.run_uri} not computed: {exc!r}")
        sil = None
    if sil is not None:
        metrics["silhouette"] = sil
    metrics["score"] = metrics.get("nmi", sil if sil is not None else float("nan"))
    metrics["run_uri"] = result.run_uri
    tune.report(metrics)


AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


@contextlib.contextmanager
def _credentials_kept_out_of_runtime_envs():
    """Ray Tune copies the driver's AWS_* variables into each trial actor's runtime_env, and Ray's runtime-env
    agent writes runtime envs, secrets included, to its log in plain text. Trials get their credentials the way
    every other raymmc worker does (the node's environment, an instance profile), so hide the driver's from Tune
    while it starts them."""
    saved = {k: os.environ.pop(k) for k in AWS_SECRETS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def sweep(cfg: RunConfig, tune_cfg: dict, base: dict) -> tuple[list[dict], int]:
    """Run the sweep; returns (trial summaries, best first) and the number of failed trials."""
    from ray import tune

    from raymmc.raysession import init_ray

    space = tune_cfg["search_space"] or {}
    for key, spec in space.items():  # catch a wrong key or value before any trial starts
        load_config(None, overrides_of({key: _example(spec)}), base)
    init_ray(cfg.ray)
    if __name__ != "__main__":  # imported (tests): workers cannot import this file by name
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    name = f"{tune_cfg['name']}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}"
    fs, path = storage.resolve(storage.join(base["output"], "tune"), cfg.storage)
    cpus = float(tune_cfg["cpus_per_trial"])
    # A trial needs some resource to be scheduled: with no CPU, one byte of memory.
    trainable = tune.with_resources(tune.with_parameters(trial, base=base, prefix=name),
                                    {"cpu": cpus} if cpus > 0 else {"cpu": 0, "memory": 1})
    tuner = tune.Tuner(
        trainable,
        param_space={"params": {k: to_domain(v) for k, v in space.items()}},
        tune_config=tune.TuneConfig(metric=tune_cfg["metric"], mode=tune_cfg["mode"],
                                    num_samples=int(tune_cfg["num_samples"]),
                                    max_concurrent_trials=tune_cfg["max_concurrent_trials"]),
        run_config=tune.RunConfig(name=name, storage_path=path,
                                  storage_filesystem=fs if storage.is_remote(base["output"]) else None),
    )
    if storage.is_remote(base["output"]):
        fs.create_dir(path, recursive=True)  # the driver's client connects (and keeps its credentials) now
    with _credentials_kept_out_of_runtime_envs():
        results = tuner.fit()
    rows, failed = [], 0
    for r in results:
        if r.error is not None:
            failed += 1
            rows.append({"params": r.config.get("params"), "error": str(r.error).splitlines()[0][:500]})
        else:
            rows.append({"params": r.config["params"], **{k: v for k, v in r.metrics.items()
                                                           if k in ("run_uri", "score", "silhouette", "acc",
                                                                    "nmi", "ari", "n_assigned")}})
    metric, sign = tune_cfg["metric"], (1 if tune_cfg["mode"] == "max" else -1)
    rows.sort(key=lambda row: -sign * row[metric] if isinstance(row.get(metric), (int, float))
              and row[metric] == row[metric] else float("inf"))
    storage.write_json(storage.join(base["output"], "tune", name, "summary.json"),
                       {"sweep": name, "metric": metric, "mode": tune_cfg["mode"], "trials": rows}, cfg.storage)
    return rows, failed


def main(argv: list[str] | None = None) -> int:
    args = job.build_parser(__doc__).parse_args(argv)
    job.log_environment()
    try:
        raw, tune_cfg = split_config(args.config)
        values = _deep_merge(raw, job.cli_values(args))
        cfg = load_config(None, args.overrides, values)
        base = absolutize(cfg.to_dict())
        rows, failed = sweep(cfg, tune_cfg, base)
    except ConfigError as exc:
        print(f"tune_sweep: config error: {exc}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - the job's exit status carries the failure
        traceback.print_exc()
        return 1
    for row in rows:
        print("trial " + json.dumps(row, default=str))
    if rows and "error" not in rows[0]:
        print(f"best: {json.dumps(rows[0]['params'])} -> {tune_cfg['metric']}={rows[0].get(tune_cfg['metric'])}")
    print(f"{len(rows)} trial(s), {failed} failed")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
