"""`raymmc recluster`: re-cluster a grown archive from a previous run, with stable cluster ids and a drift
report. Composition only, as :mod:`raymmc.pipeline`:

1. the previous run's config (``--set`` may change training, not the encoders) and its feature cache: only
   new or changed files are extracted, with the previous run's fitted text encoder;
2. an unchanged archive reuses the previous model as it is; otherwise training warm-starts from it
   (k-means from its centroids, DEC/JECL from its network, DM2C from its networks and centroids) where the
   algorithm supports it (not MMDC: its per-item targets are drawn for the previous archive's size);
3. the new model's clusters are matched to the previous run's by the items they share (Hungarian on the
   overlap, computed on Ray workers by id), unmatched clusters get ids never used before in the lineage;
4. assignments, report and ``drift.json`` (what moved, clusters born, vanished, split, merged); the manifest
   records the lineage.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from typing import Callable

import numpy as np

from raymmc.cluster.assignment import stable_cluster_ids
from raymmc.config import ConfigError, RunConfig, from_dict, validate, with_overrides
from raymmc.features.text import FITTED
from raymmc.io import storage
from raymmc.io.rundir import RunDir, StageTimer, open_run
from raymmc.io.storage import StorageOptions
from raymmc.pipeline import (MODEL_FILE, RunResult, fit_model, fitted_text_encoder, load_model, make_model,
                             model_params, prepare, save_model, seed_everything, train_nodes, write_manifest,
                             write_report, write_results)
from raymmc.report.drift import DriftLimits, drift_report


def previous_config(source: RunDir, overrides: list[str] | None,
                    storage_options: StorageOptions | None) -> tuple[dict, RunConfig]:
    """The previous run's manifest and its config with ``overrides``; the encoders may not change (the
    cached features and the fitted text encoder are the previous run's)."""
    manifest = source.read_json("manifest.json")
    if not source.exists(MODEL_FILE):
        raise ConfigError(f"{source.uri} has no fitted model ({MODEL_FILE}): re-cluster from a `raymmc run` or "
                          "`raymmc recluster` run directory")
    cfg = from_dict(RunConfig, with_overrides(manifest["config"], overrides))
    if storage_options is not None:
        cfg = dataclasses.replace(cfg, storage=storage_options)
    if cfg.extract != from_dict(RunConfig, manifest["config"]).extract:
        raise ConfigError("recluster keeps the previous run's encoders (extract.*); start a new lineage with "
                          "`raymmc run` to change them")
    return manifest, cfg


def start_mode(cfg: RunConfig, previous: RunConfig, unchanged: bool, warm: bool) -> tuple[str, str]:
    """How training starts: ``("reuse" | "warm" | "cold", why)``."""
    if not warm:
        return "cold", "warm start turned off (--cold)"
    same_model = (cfg.cluster.algorithm == previous.cluster.algorithm and cfg.cluster.clusters ==
                  previous.cluster.clusters and model_params(cfg) == model_params(previous) and cfg.seed == previous.seed)
    if unchanged and same_model:
        return "reuse", "the archive and the clustering config are unchanged: the previous model is reused as is"
    if cfg.cluster.algorithm != previous.cluster.algorithm or cfg.cluster.clusters != previous.cluster.clusters:
        return "cold", "another algorithm or number of clusters than the previous run's"
    model = make_model(cfg)
    if not model.supports_warm_start:
        return "cold", f"{cfg.cluster.algorithm} has no warm start"
    if model.warm_start_signature() != make_model(previous).warm_start_signature():
        return "cold", "the model's architecture or input preparation changed (--set)"
    return "warm", "training starts from the previous run's model"


def recluster(previous_run: str, output: str, *, input_uri: str | None = None, run_name: str | None = None,
              overrides: list[str] | None = None, warm: bool = True,
              storage_options: StorageOptions | None = None, drift_limits: DriftLimits = DriftLimits(),
              log: Callable[[str], None] = print) -> RunResult:
    """Re-cluster ``input_uri`` (default: the previous run's input) from ``previous_run`` into
    ``output/run_name``; see the module docstring."""
    from raymmc.io.storage import resolve

    started = _dt.datetime.now(_dt.timezone.utc)
    prev_manifest, cfg = previous_config(RunDir(previous_run, storage_options), overrides, storage_options)
    previous_cfg = from_dict(RunConfig, prev_manifest["config"])
    source = RunDir(previous_run, cfg.storage)  # the previous run's storage settings unless given
    input_uri = input_uri or prev_manifest["inputs"]["uri"]
    cfg = dataclasses.replace(cfg, input=input_uri, output=output, run_name=run_name)
    validate(cfg)  # (the run name and output too)
    seed_everything(cfg.seed)
    timer = StageTimer()
    rundir = open_run(output, run_name, f"recluster-{started.strftime('%Y%m%d-%H%M%S')}", cfg.storage,
                      command="recluster")
    name = rundir.name
    cfg = dataclasses.replace(cfg, run_name=name)
    rundir.write_json("config.json", cfg.to_dict())
    # marks the directory as a re-clustering: `raymmc run --resume` must not continue it as a plain run
    rundir.write_json("recluster.json", {"previous_run": previous_run, "overrides": list(overrides or []),
                                         "warm": warm})

    cache_root = prev_manifest["features"]["cache"]
    text_encoder = fitted_text_encoder(cfg, cache_root)
    if not storage.exists(cache_root, cfg.storage) or (
            text_encoder is None and prev_manifest["encoders"]["text"].get("model") in FITTED):
        # extracting and fitting anew would put v2's items in another feature space than the model's
        raise ConfigError(f"the previous run's feature cache {cache_root} (or its fitted text encoder) is gone: "
                          "re-cluster from a run whose cache exists, or start a new lineage with `raymmc run`")
    prep = prepare(cfg, input_uri, rundir, timer, log, text_encoder=text_encoder, cache_root=cache_root)
    if prep.usable < cfg.cluster.clusters:
        raise ValueError(f"only {prep.usable} usable items for {cfg.cluster.clusters} clusters; "
                         f"see {rundir.path('rejects')}")
    prev_counts = prev_manifest["counts"]
    unchanged = (sorted(prep.feature_dirs) == sorted(source.read_json("features.json")["dirs"])
                 and prep.stats.files_extracted == 0 and prep.stats.rows == prev_counts["read"]
                 and prep.usable == prev_counts["assigned"])
    mode, why = start_mode(cfg, previous_cfg, unchanged, warm)
    log(f"recluster from {previous_run}: {'unchanged' if unchanged else 'changed'} archive; {mode} start ({why})")
    with timer("cluster"):
        if mode == "reuse":
            model, train = load_model(source, previous_cfg), {}
        else:
            model, train = fit_model(cfg, prep, rundir, name, log,
                                     warm_start=source.read_bytes(MODEL_FILE) if mode == "warm" else None)
    state = save_model(rundir, model)

    with timer("match"):
        from raymmc.train.overlap import assignment_overlap, moved_examples, relabel
        from raymmc.train.predict import ModelSpec, predict_clusters

        t = cfg.cluster.train
        spec = ModelSpec(cfg.cluster.algorithm, cfg.cluster.clusters, model_params(cfg), cfg.seed,
                         cfg.extract.pixels.channels)
        current = predict_clusters(prep.dataset, spec, state, workers=t.workers,
                                   cpus_per_worker=t.cpus_per_worker, batch_rows=t.read_batch_rows)
        import ray

        fs, path = resolve(source.path("assignments"), cfg.storage)
        previous = ray.data.read_parquet(path, filesystem=fs).select_columns(["id", "cluster"])
        overlap = assignment_overlap(previous, current, n_rows=prep.usable + int(prev_counts["assigned"]))
        del current, previous  # their blocks leave the object store before the written prediction fills it
        prev_sizes = {int(c): int(n) for c, n in source.read_json("metrics.json")["cluster_sizes"].items()}
        prev_ids = np.array(sorted(c for c in prev_sizes if c >= 0), dtype=np.int64)
        # a plain run's model numbers its clusters 0..K-1 (an empty one too): fresh ids start above them
        lineage = prev_manifest.get("lineage") or {"runs": [], "next_cluster_id": previous_cfg.cluster.clusters}
        next_id = max(int(lineage["next_cluster_id"]), int(prev_ids.max()) + 1 if len(prev_ids) else 0)
        ids, next_id = stable_cluster_ids(overlap.submatrix(prev_ids, range(cfg.cluster.clusters)), prev_ids,
                                          next_id)
    with timer("predict"):
        metrics, predict_nodes, summary = write_results(rundir, cfg, prep, state, cluster_ids=ids.tolist())
    with timer("drift"):
        cur_sizes = {int(c): int(n) for c, n in metrics["cluster_sizes"].items()}
        # the overlap in stable ids (the model's clusters renamed; the outlier id -1 stays)
        stable = relabel(overlap.current_ids, ids)
        cur_ids = np.array(sorted(set(cur_sizes) | set(stable.tolist())), dtype=np.int64)
        matrix = np.zeros((len(overlap.previous_ids), len(cur_ids)), dtype=np.int64)
        for j, c in enumerate(stable):
            matrix[:, int(np.searchsorted(cur_ids, c))] += overlap.matrix[:, j]
        drift = drift_report(matrix, overlap.previous_ids, cur_ids, prev_sizes, cur_sizes,
                             examples=moved_examples(overlap.pairs, ids, drift_limits.examples), limits=drift_limits)
        drift = {"previous_run": previous_run, "start": mode, "start_reason": why, **drift}
        rundir.write_json("drift.json", drift)
    log(f"drift: {drift['moved']['count']} of {drift['items']['kept']} kept items moved; "
        f"{drift['items']['added']} added, {drift['items']['removed']} removed; born {drift['clusters_born']}, "
        f"vanished {drift['clusters_vanished']}")
    if cfg.report and summary is not None:
        with timer("report"):
            report = write_report(rundir, cfg, summary, metrics, shards=prep.shards, drift=drift,
                                  title=f"{name} · {cfg.cluster.algorithm} · re-clustered")
        log(f"report: {report}")
    manifest = write_manifest(
        rundir, cfg, prep, started, timer, train=train,
        nodes={"extract": prep.stats.nodes, "cluster": train_nodes(train), "predict": predict_nodes},
        lineage={"previous_run": previous_run, "runs": list(lineage["runs"]) + [previous_run],
                 "next_cluster_id": next_id, "cluster_ids": ids.tolist()},
        recluster={"start": mode, "why": why, "unchanged_archive": unchanged,
                   "moved": drift["moved"]["count"], "kept": drift["items"]["kept"]})
    return RunResult(rundir.uri, metrics, manifest)
