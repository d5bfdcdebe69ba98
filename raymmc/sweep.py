"""`raymmc tune`: a Ray Tune sweep over an algorithm's hyperparameters (and K), chosen without labels.

Composition: features are prepared once (the feature cache, as for a run) into the sweep directory; the trials
share a keyed sample of the usable rows through the object store (raymmc.train.tune); the winning configuration is
run on the whole archive as an ordinary run directory (``<sweep>/best``). Written under ``<output>/<NAME>/``:
``trials.csv``, ``best.json``, ``manifest.json``, ``report/index.html``, ``tune/`` (Ray Tune's own state) and
``best/``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import io
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from raymmc.config import ConfigError, RunConfig
from raymmc.io import storage
from raymmc.io.rundir import RunDir, StageTimer, check_run_location, open_run, package_versions

SCORE_COLUMNS = ("score", "silhouette", "calinski_harabasz", "agreement", "silhouette_agreement", "agreed_silhouette",
                 "stability", "nmi", "acc", "ari")
AWS_SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


@dataclass
class SweepResult:
    sweep_uri: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    manifest: dict[str, Any]


@contextlib.contextmanager
def credentials_kept_out_of_runtime_envs():
    """Ray Tune copies the driver's AWS_* variables into each trial actor's runtime_env, and Ray's runtime-env
    agent logs runtime envs, secrets included, in plain text. Trials get credentials as every other raymmc worker
    does (the node's environment, an instance profile): hide the driver's from Tune while it starts them."""
    saved = {k: os.environ.pop(k) for k in AWS_SECRETS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def base_params(cfg: RunConfig) -> dict[str, Any]:
    """The run config's settings of its algorithm, as the dict the search point is applied to."""
    c = cfg.cluster
    if c.algorithm == "kmeans":
        return dataclasses.asdict(c.kmeans)
    return copy.deepcopy(c.params.get(c.algorithm) or {})


def with_point(cfg: RunConfig, point: dict[str, Any], k: int, specs: dict[str, Any]) -> RunConfig:
    """``cfg`` with a trial's values and K: the config of the winning trial's run."""
    from raymmc.config import from_dict, validate
    from raymmc.train.tune_space import to_params

    data = cfg.to_dict()
    params = to_params(cfg.cluster.algorithm, point, base_params(cfg), specs)
    if cfg.cluster.algorithm == "kmeans":
        data["cluster"]["kmeans"] = params
    else:
        data["cluster"]["params"][cfg.cluster.algorithm] = params
    data["cluster"]["clusters"] = int(k)
    out = from_dict(RunConfig, data)
    validate(out)
    return out


def _row(result, setup, specs) -> dict[str, Any]:
    from raymmc.train.tune import point_of

    row: dict[str, Any] = {"trial_id": os.path.basename(result.path or "") or None}
    config = result.config or {}
    point, k = point_of(config, setup)
    row.update(point)
    row["clusters"] = k
    metrics = result.metrics or {}
    row["trial_id"] = metrics.get("trial_id") or row["trial_id"]
    for key in SCORE_COLUMNS:
        value = metrics.get(key)
        row[key] = float(value) if isinstance(value, (int, float)) else None
    row["step"] = metrics.get("step")
    row["completed"] = bool(metrics.get("final")) and result.error is None
    row["error"] = str(result.error).splitlines()[0][:300] if result.error is not None else ""
    return row


def choose_best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the highest label-free score (a stopped trial's score is from a shorter fit)."""
    done = [r for r in rows if r["completed"] and isinstance(r["score"], float) and math.isfinite(r["score"])]
    return max(done, key=lambda r: r["score"]) if done else None


def write_csv(rundir: RunDir, name: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    import csv

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    rundir.write_bytes(name, buf.getvalue().encode("utf-8"))


def score_sample(prep, setup) -> tuple[Any, np.ndarray | None]:
    """The score's keyed sample of the whole archive's usable rows (bounded: ``score_rows`` rows to the driver)."""
    from raymmc.hashing import keep_fraction
    from raymmc.train.blocks import concat_blocks
    from raymmc.train.trainer import table_to_multiview
    from raymmc.train.tune import score_mask, trial_sample_filter
    import ray

    ds = prep.dataset.map_batches(trial_sample_filter, batch_format="pyarrow",
                                  fn_kwargs={"fraction": keep_fraction(setup.score_rows, setup.n_total),
                                             "seed": setup.seed ^ 0x5C0E})
    table = concat_blocks(ray.get(ds.materialize().to_arrow_refs())).sort_by("index")
    table = table.filter(pa.array(score_mask(table.column("id").to_pylist(), setup.n_total, setup.score_rows,
                                             setup.seed)))
    labels = None
    if "label" in table.column_names and table.column("label").null_count < table.num_rows:
        labels = np.array(["" if v is None else str(v) for v in table.column("label").to_pylist()], dtype=object)
    return table_to_multiview(table, setup.pixel_channels), labels


def tune(cfg: RunConfig, clusters: str | int | None = None, log: Callable[[str], None] = print) -> SweepResult:
    """Run the sweep; ``clusters``: K or "LO:HI" (default the config's K)."""
    from ray import tune as ray_tune

    from raymmc.pipeline import demo_input, prepare, run, seed_everything, used_modalities
    from raymmc.raysession import alive_nodes
    from raymmc.report.sweep import spearman, write_sweep_report
    from raymmc.train.tune import (TrialSetup, Scorer, make_scheduler, make_search, mlflow_callbacks, resolve_score,
                                   run_trial, sample_refs)
    from raymmc.train.tune_space import parse_clusters, space

    algorithm = cfg.cluster.algorithm
    if algorithm == "auto":
        raise ConfigError("raymmc tune needs --algorithm (a sweep searches one algorithm's hyperparameters)")
    settings = cfg.tune
    score_name = resolve_score(settings, algorithm)
    lo, hi = parse_clusters(clusters if clusters is not None else cfg.cluster.clusters)
    specs = space(algorithm, settings.space.get(algorithm))
    used_modalities(cfg)
    seed_everything(cfg.seed)
    timer = StageTimer()
    started = _dt.datetime.now(_dt.timezone.utc)
    default_name = f"tune-{algorithm}-{started.strftime('%Y%m%d-%H%M%S')}"
    check_run_location(cfg.output, cfg.run_name)
    mlflow_callbacks(settings, default_name)  # before any work: mlflow may be missing
    input_uri = cfg.input or demo_input(cfg, log)
    rundir = open_run(cfg.output, cfg.run_name, default_name, cfg.storage, command="tune")
    name = rundir.name
    cfg = dataclasses.replace(cfg, input=input_uri, run_name=name)
    callbacks = mlflow_callbacks(settings, name)
    rundir.write_json("config.json", {**cfg.to_dict(), "tune_clusters": [lo, hi]})

    prep = prepare(cfg, input_uri, rundir, timer, log)
    if prep.usable < hi:
        raise ValueError(f"only {prep.usable} usable items for up to {hi} clusters; see {rundir.path('rejects')}")
    setup = TrialSetup(algorithm=algorithm, clusters=(lo, hi), base_params=base_params(cfg), space=specs,
                       score=score_name, seed=cfg.seed, pixel_channels=cfg.extract.pixels.channels,
                       n_total=prep.usable, score_rows=settings.score_rows, report_steps=settings.report_steps,
                       threads=max(1, int(settings.cpus_per_trial)), agreement_floor=settings.agreement_floor)
    with timer("sample"):
        refs = sample_refs(prep.dataset, prep.usable, settings, cfg.seed)
    log(f"tune: {settings.trials} {algorithm} trial(s), K {lo}..{hi}, score {score_name}, "
        f"{settings.search} search, scheduler {settings.scheduler}; trials fit on "
        f"{'all' if prep.usable <= settings.max_items else f'a keyed sample of about {settings.max_items} of'} "
        f"{prep.usable} usable items")
    max_steps = int((base_params(cfg).get("cluster") or {}).get("max_iter", 20000)) if algorithm in ("dec", "jecl") \
        else 1
    resources = {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial}
    if not settings.cpus_per_trial and not settings.gpus_per_trial:
        resources = {"cpu": 0, "memory": 1}  # a trial needs some resource to be scheduled
    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, setup=setup, refs=refs), resources)
    fs, tune_path = storage.resolve(rundir.path("tune"), cfg.storage)
    remote = storage.is_remote(rundir.uri)
    if remote:
        fs.create_dir(tune_path, recursive=True)  # the driver's client connects (and keeps its credentials) now
    tuner = ray_tune.Tuner(
        trainable,
        tune_config=ray_tune.TuneConfig(search_alg=make_search(settings, setup),
                                        scheduler=make_scheduler(settings, setup, max_steps),
                                        num_samples=settings.trials, max_concurrent_trials=settings.max_concurrent),
        run_config=ray_tune.RunConfig(name="trials", storage_path=tune_path if remote else os.path.abspath(tune_path),
                                      storage_filesystem=fs if remote else None, verbose=0, callbacks=callbacks),
    )
    with timer("trials"), credentials_kept_out_of_runtime_envs():
        results = tuner.fit()
    rows = [_row(r, setup, specs) for r in results]
    rows.sort(key=lambda r: str(r["trial_id"]))
    best = choose_best(rows)
    rho, n_rho = spearman([r for r in rows if r["completed"]])
    columns = ["trial_id", *specs, "clusters", *SCORE_COLUMNS, "step", "completed", "error"]
    write_csv(rundir, "trials.csv", rows, columns)
    summary: dict[str, Any] = {
        "score_name": score_name, "trials": len(rows), "completed": sum(r["completed"] for r in rows),
        "stopped_early": sum(1 for r in rows if not r["completed"] and not r["error"]),
        "failed": sum(1 for r in rows if r["error"]),
        "spearman_score_nmi": rho, "spearman_trials": n_rho,
    }
    best_out = None
    if best is not None:
        log(f"tune: best trial {best['trial_id']}: K={best['clusters']}, {score_name}={best['score']:.4f}; "
            "running it on the whole archive")
        point = {k: best[k] for k in specs if k in best}
        best_cfg = dataclasses.replace(with_point(cfg, point, best["clusters"], specs),
                                       output=rundir.uri, run_name="best")
        with timer("best_run"):
            result = run(best_cfg, log=log)
        from raymmc.pipeline import load_model

        data, labels = score_sample(prep, setup)
        # the trials' score, of the finished run's model on the whole archive's score sample
        scores = Scorer(data, labels, setup, sampled=True)(load_model(RunDir(result.run_uri, cfg.storage), best_cfg))
        nmi_rank = None
        if isinstance(best.get("nmi"), float):
            nmis = [r["nmi"] for r in rows if r["completed"] and isinstance(r.get("nmi"), float)]
            nmi_rank = 1 + sum(1 for v in nmis if v > best["nmi"])
        best_out = {
            "clusters": int(best["clusters"]), "score": best["score"], "score_name": score_name,
            "trial_id": best["trial_id"], "params": point, "algorithm": algorithm,
            # `raymmc run --config best.json`-ready: the cluster section of the winning run's config
            "config": {"cluster": {"algorithm": algorithm, "clusters": int(best["clusters"]),
                                   **({"kmeans": dataclasses.asdict(best_cfg.cluster.kmeans)} if algorithm == "kmeans"
                                      else {"params": {algorithm: best_cfg.cluster.params[algorithm]}})}},
            "run": result.run_uri, "run_score": scores["score"], "run_scores": scores,
            "trial_metrics": {k: best.get(k) for k in SCORE_COLUMNS if best.get(k) is not None},
            "nmi_rank": nmi_rank,
        }
        rundir.write_json("best.json", best_out)
        import yaml

        winner = best_cfg.to_dict()  # a whole run config: `raymmc run --config <sweep>/best.yaml`
        for key in ("run_name", "tune"):
            winner.pop(key, None)
        rundir.write_bytes("best.yaml", yaml.safe_dump(winner, sort_keys=False).encode("utf-8"))
    report = write_sweep_report(rundir, rows, best_out, list(specs),
                                title=f"{os.path.basename(input_uri.rstrip('/'))} · tune {algorithm}")
    log(f"report: {report}")
    manifest = {
        "raymmc_tune": rundir.uri, "started_utc": started.isoformat(), "config": cfg.to_dict(), "seed": cfg.seed,
        "versions": package_versions(), "ray_resources": prep.resources, "ray_nodes": alive_nodes(),
        "inputs": {"uri": input_uri, "files": [s.to_dict() for s in prep.shards]}, "input_format": prep.input_format,
        "counts": {"read": prep.stats.rows, "usable": prep.usable, "rejected": prep.rejected,
                   "trial_items": min(prep.usable, settings.max_items)},
        "features": {"cache": prep.stats.cache, "files_cached": prep.stats.files_cached,
                     "files_extracted": prep.stats.files_extracted},
        "search": {"algorithm": algorithm, "clusters": [lo, hi], "space": {k: v[0] for k, v in specs.items()},
                   "keys": {k: list(v[1]) for k, v in specs.items()}},
        "summary": summary, "best": best_out, "stage_seconds": timer.seconds,
    }
    rundir.write_json("manifest.json", manifest)
    return SweepResult(rundir.uri, rows, best_out, manifest)
