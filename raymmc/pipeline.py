"""`raymmc run`: shards -> features -> clusters -> run directory. Composition only: each stage
lives in its own module."""

from __future__ import annotations

import datetime as _dt
import os
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from raymmc.cluster.base import MultiViewData
from raymmc.config import ConfigError, RunConfig
from raymmc.features.extract import load_features, run_extraction
from raymmc.io import storage
from raymmc.io.rundir import RunDir, StageTimer, check_run_location, open_run, package_versions
from raymmc.io.formats import discover_input
from raymmc.io.storage import StorageOptions
from raymmc.report.metrics import evaluate_contingency
from raymmc.train.blocks import concat_blocks
from raymmc.train.trainer import table_to_multiview


@dataclass
class RunResult:
    run_uri: str
    metrics: dict
    manifest: dict


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def demo_input(cfg: RunConfig, log: Callable[[str], None]) -> str:
    """Build the demo data set once into the cache and return its URI."""
    from raymmc import datasets

    out = os.path.join(datasets.default_cache_dir(), "shards", cfg.demo_dataset)
    if not os.path.exists(os.path.join(out, "_SUCCESS")):
        log(f"building demo data set {cfg.demo_dataset!r} into {out}")
        datasets.build(cfg.demo_dataset, out)
        open(os.path.join(out, "_SUCCESS"), "w").close()
    return out


# What each algorithm clusters on; k-means and DEC follow their configured view.
ALGORITHM_MODALITIES = {"mmdc": {"pixels"}, "jecl": {"image", "text"}, "dm2c": {"image", "text"}}
VIEW_MODALITIES = {"concat": {"image", "text"}, "image": {"image"}, "text": {"text"}}


def choose_algorithm(counts: dict[str, int]) -> tuple[str, str]:
    """``--algorithm auto``: the algorithm that fits the archive's modalities, and why."""
    n, n_img, n_txt = counts["rows"], counts["image"], counts["caption"]
    if n_txt == 0:
        return "mmdc", f"no captions among {n} items: images only, MMDC (end to end on pixels)"
    if n_img == 0:
        return "dec", f"no images among {n} items: text only, DEC on the caption features"
    paired = max(0, n_img + n_txt - n)  # items that must carry both
    if paired >= 0.5 * n:
        return "jecl", (f"at least {paired} of {n} items ({paired / n:.0%}) carry an image and a caption: "
                        "paired data, JECL")
    return "dm2c", (f"{n_img} of {n} items have an image and {n_txt} a caption, so as few as {paired} carry "
                    "both: mostly one modality per item, mixed-modal, DM2C")


def choose_for_input(found, storage_options: StorageOptions | None) -> tuple[str, str, str | None]:
    """``--algorithm auto`` for a discovered input (``raymmc.io.formats.Input``): the algorithm, why, and the view
    DEC clusters when DEC is chosen (the captions without images; precomputed image vectors without captions,
    where MMDC has no pixels to train on)."""
    from raymmc.io.formats import present_counts

    algorithm, why = choose_algorithm(present_counts(found.shards, storage_options))
    if algorithm == "mmdc" and "image" in found.to_dict()["precomputed"]:
        return "dec", f"{why}; but the images are precomputed vectors (no pixels): DEC on them", "image"
    return algorithm, why, "text" if algorithm == "dec" else None


def used_modalities(cfg: RunConfig) -> frozenset[str]:
    algo = cfg.cluster.algorithm
    if algo in ALGORITHM_MODALITIES:
        wanted = ALGORITHM_MODALITIES[algo]
    else:
        from raymmc.cluster.registry import make_config

        view = cfg.cluster.kmeans.view if algo == "kmeans" else make_config(algo, cfg.cluster.params.get(algo)).view
        wanted = VIEW_MODALITIES[view]
    available = {m for m, model in (("image", cfg.extract.image.model), ("text", cfg.extract.text.model))
                 if model != "none"} | {"pixels"}
    used = frozenset(wanted & available)
    if not used:
        raise ConfigError(f"algorithm {algo!r} uses {sorted(wanted)} but only {sorted(available) or 'no'} "
                          "encoder(s) are configured")
    return used


def model_params(cfg: RunConfig):
    c = cfg.cluster
    return c.kmeans if c.algorithm == "kmeans" else c.params.get(c.algorithm)


def make_model(cfg: RunConfig):
    from raymmc.cluster.registry import make_clusterer

    return make_clusterer(cfg.cluster.algorithm, cfg.cluster.clusters, model_params(cfg), seed=cfg.seed)


@dataclass
class Prepared:
    """Features of one input, accounted for: what the clustering stage needs (counts and a dataset in the
    object store; no per-item data on the driver)."""

    input_uri: str
    shards: list
    stats: object  # ExtractStats
    feature_dirs: list[str]
    dataset: object  # ray.data.Dataset: the usable feature rows with a global ``index``, in input order
    usable: int
    rejected: int
    duplicates: int
    missing_id: int
    resources: dict
    input_format: dict | None = None  # the archive format read, and why (raymmc.io.formats.Input.to_dict)
    duplicate_images: dict | None = None  # groups of ids with the same image bytes (DuplicateImages.to_dict)


def prepare(cfg: RunConfig, input_uri: str, rundir: RunDir, timer: StageTimer, log: Callable[[str], None],
            text_encoder=None, text_identity: str | None = None, cache_root: str | None = None,
            reuse_root: str | None = None) -> Prepared:
    """discover -> extract (cached) -> account (on Ray workers); writes rejects/ and features.json into
    ``rundir``."""
    from raymmc.io.storage import list_files
    from raymmc.raysession import has_gpu, init_ray
    from raymmc.train.usable import usable_rows

    modalities = used_modalities(cfg)
    with timer("discover"):
        found = discover_input(input_uri, cfg.storage, cfg.archive)
        shards = found.shards
    log(f"input {input_uri}: {found.format} ({found.why}); {len(shards)} file(s), {sum(s.rows for s in shards)} rows")
    if "pixels" in modalities and not any("image" in s.columns for s in shards):
        raise ConfigError(f"{cfg.cluster.algorithm} clusters pixels, and this {found.format} archive has no images")
    with timer("ray_init"):
        resources = init_ray(cfg.ray)
    with timer("extract"):
        feature_dirs, stats = run_extraction(
            shards, cfg.extract.cache or storage.join(cfg.output, "features-cache"), extract_cfg=cfg.extract,
            seed=cfg.seed, storage=cfg.storage, has_gpu=has_gpu(), modalities=modalities, log=log,
            text_encoder=text_encoder, text_identity=text_identity, cache_root=cache_root, reuse_root=reuse_root)
    rundir.write_json("features.json", {"cache": stats.cache, "dirs": feature_dirs})
    with timer("account"):
        files = [f.path for listed in storage.in_threads(lambda d: list_files(d, ".parquet", cfg.storage),
                                                          feature_dirs) for f in listed]  # a listing per input file
        offsets, total = {}, 0
        for shard in shards:  # the global index of a row: its position in the input
            offsets[shard.uri] = total
            total += shard.rows
        fs, _ = storage.resolve(feature_dirs[0], cfg.storage) if feature_dirs else (None, None)
        storage.delete_dir(rundir.path("rejects"), cfg.storage)  # a resumed run writes them again
        rfs, rpath = storage.resolve(rundir.path("rejects"), cfg.storage)
        image_groups = {"groups": 0, "items": 0, "dropped": 0, "examples": []}
        if files:
            acc = usable_rows(files, fs, modalities=modalities, decode=cfg.extract.decode, offsets=offsets,
                              n_rows=stats.rows, rejects_path=rpath, rejects_filesystem=rfs)
            dataset, usable, rejected, dups, missing = acc.dataset, acc.usable, acc.rejected, acc.duplicates, acc.missing_id
            has_bytes = stats.with_image > 0 and any("image" in s.columns for s in shards)
            if cfg.archive.duplicate_images != "off" and has_bytes:
                # the same image bytes under several ids: listed, and dropped if asked
                from raymmc.train.duplicate_images import find_duplicate_images

                dataset, dup_images = find_duplicate_images(
                    dataset, usable, drop=cfg.archive.duplicate_images == "drop",
                    shown=cfg.archive.duplicate_groups_shown, rejects_path=rpath, rejects_filesystem=rfs)
                usable, rejected = usable - dup_images.dropped, rejected + dup_images.dropped
                image_groups = dup_images.to_dict()
        else:
            dataset, usable, rejected, dups, missing = None, 0, 0, 0, 0
        if rejected == 0:  # an empty rejects/ table, so that every run directory has one
            from raymmc.accounting import REJECT_SCHEMA

            storage.delete_dir(rundir.path("rejects"), cfg.storage)
            rundir.write_table("rejects", REJECT_SCHEMA.empty_table())
    if usable + rejected != stats.rows:  # the accounting invariant, never relaxed
        raise RuntimeError(f"accounting error: {stats.rows} rows read, {usable} usable + {rejected} rejected")
    log(f"account: {usable} usable, {rejected} rejected ({dups} duplicate id(s), {missing} without id); "
        f"{image_groups['items']} item(s) share an image with another id ({image_groups['groups']} group(s), "
        f"{image_groups['dropped']} dropped)")
    return Prepared(input_uri, shards, stats, feature_dirs, dataset, usable, rejected, dups, missing, resources,
                    found.to_dict(), image_groups)


def driver_table(prep: Prepared, columns: list[str] | None = None) -> pa.Table:
    """The usable rows on the driver, in input order: only for an in-process fit (at most
    ``cluster.train.local_max_items`` rows). Everything else reads ``prep.dataset`` on the workers."""
    import ray

    ds = prep.dataset if columns is None else prep.dataset.select_columns(columns)
    return concat_blocks(ray.get(ds.to_arrow_refs())).sort_by("index")


def usable_features(prep: Prepared, cfg: RunConfig) -> MultiViewData:
    """The usable rows with their feature vectors, on the driver (see :func:`driver_table`)."""
    return table_to_multiview(driver_table(prep), cfg.extract.pixels.channels)


def summary_limits(cfg: RunConfig):
    from raymmc.report.summary import SummaryLimits

    sm = cfg.summary
    return SummaryLimits(candidates=sm.candidates, max_terms=sm.max_terms,
                         map_points=sm.map_points if cfg.report else 0, seed=cfg.seed)


def write_results(rundir: RunDir, cfg: RunConfig, prep: Prepared, state: bytes,
                  cluster_ids: list[int] | None = None) -> tuple[dict, list[str], object]:
    """assignments/ (written by the prediction workers), and metrics.json (from the label x cluster counts)
    and clusters.parquet, both from the bounded summary the prediction batches carry; the driver never holds
    a per-item array here. Returns the metrics, the Ray nodes the prediction ran on, and the summary (for the
    report; None when nothing was assigned). ``cluster_ids``: the id written for each model cluster (a
    re-clustering's stable ids; default its index)."""
    import functools

    from raymmc.report.summary import block_summary, clusters_table, summarize_dataset
    from raymmc.train.predict import OUTLIER, ModelSpec, predict_and_write

    if prep.usable == 0:
        rundir.write_table("assignments", empty_assignments_table())
        metrics: dict = {"n_assigned": 0, "cluster_sizes": {}}
        rundir.write_json("metrics.json", metrics)
        return metrics, [], None
    spec = ModelSpec(cfg.cluster.algorithm, cfg.cluster.clusters, model_params(cfg), cfg.seed,
                     cfg.extract.pixels.channels)
    fs, path = storage.resolve(rundir.path("assignments"), cfg.storage)
    limits = summary_limits(cfg)
    storage.delete_dir(rundir.path("assignments"), cfg.storage)  # a resumed run writes them again
    predicted = predict_and_write(prep.dataset, spec, state, path, filesystem=fs,
                               workers=cfg.cluster.train.workers, cpus_per_worker=cfg.cluster.train.cpus_per_worker,
                               batch_rows=cfg.cluster.train.read_batch_rows,
                               summarize=functools.partial(block_summary, limits=limits),
                               map_points=limits.map_points, seed=cfg.seed, cluster_ids=cluster_ids)
    summary = summarize_dataset(predicted, limits)
    rundir.write_parquet("clusters.parquet", clusters_table(summary, n_terms=cfg.summary.top_terms,
                                                            n_ids=cfg.summary.representatives))
    _, clusters, table, unlabeled = summary.contingency()
    sizes = {c: int(k) for c, k in zip(clusters, table.sum(axis=0) + unlabeled)}
    metrics = {"n_assigned": summary.n, "cluster_sizes": sizes}
    if OUTLIER in sizes:
        metrics["n_outliers"] = sizes[OUTLIER]
    if table.sum() > 0:
        metrics.update(evaluate_contingency(table))
        metrics["n_labeled"] = int(table.sum())
    rundir.write_json("metrics.json", metrics)
    return metrics, summary.nodes, summary


def empty_assignments_table() -> pa.Table:
    from raymmc.train.predict import ASSIGNMENT_COLUMNS, empty_assignments

    return empty_assignments().select(ASSIGNMENT_COLUMNS)


def write_report(rundir: RunDir, cfg: RunConfig, summary, metrics: dict, title: str, shards: list = (),
                 drift: dict | None = None) -> str:
    """report/: from the run's bounded summary; the images of the shown items are read from their shards."""
    from raymmc.report.html import write_report as render
    from raymmc.report.images import load_images

    return render(rundir, summary, metrics=metrics, title=title, top_images=cfg.summary.top_images,
                  n_terms=cfg.summary.top_terms, image_loader=lambda pairs: load_images(pairs, cfg.storage, shards),
                  drift=drift)


def write_manifest(rundir: RunDir, cfg: RunConfig, prep: Prepared, started: _dt.datetime, timer: StageTimer,
                   **extra: object) -> dict:
    from raymmc.raysession import alive_nodes

    stats = prep.stats
    manifest = {
        "raymmc_run": rundir.uri,
        "started_utc": started.isoformat(),
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": package_versions(),
        "ray_resources": prep.resources,
        "ray_nodes": alive_nodes(),
        "inputs": {"uri": prep.input_uri, "files": [s.to_dict() for s in prep.shards]},
        "input_format": prep.input_format,
        "duplicate_images": prep.duplicate_images,
        "encoders": {"image": stats.image_encoder, "text": stats.text_encoder},
        "features": {"cache": stats.cache, "files_cached": stats.files_cached,
                     "files_extracted": stats.files_extracted, "stages": stats.stages,
                     **({"files_reused": stats.files_reused, "reused_cache": stats.reused_cache}
                        if stats.reused_cache else {})},
        "counts": {
            "read": stats.rows, "assigned": prep.usable, "rejected": prep.rejected,
            "duplicates": prep.duplicates, "missing_id": prep.missing_id, "with_image": stats.with_image,
            "with_text": stats.with_text, "image_dropped": stats.image_dropped,
            "caption_dropped": stats.caption_dropped, "empty_files": sum(1 for s in prep.shards if s.rows == 0),
        },
        "stage_seconds": timer.seconds,
        **extra,
    }
    rundir.write_json("manifest.json", manifest)
    return manifest


MODEL_FILE = "model/state.safetensors"


def model_state(model) -> bytes:
    """The model's weights as safetensors bytes: what is saved, and what the prediction workers load."""
    from raymmc.io import safestate

    return safestate.dumps(model.state_dict())


def save_model(rundir: RunDir, model) -> bytes:
    """Write the model to the run directory; returns its serialised state (serialised once per run)."""
    state = model_state(model)
    rundir.write_bytes(MODEL_FILE, state)
    return state


def load_model(rundir: RunDir, cfg: RunConfig):
    """The fitted model of a finished run. Safetensors only: a run directory on shared storage is
    data, and a planted pickle in it must be refused, not run."""
    return _load_model_and_state(rundir, cfg)[0]


def load_model_state(rundir: RunDir, cfg: RunConfig) -> bytes:
    """A finished run's model file as stored, once it has loaded into ``cfg``'s model (refused as
    ``load_model`` refuses it): the prediction workers get the stored bytes, not a re-serialisation."""
    return _load_model_and_state(rundir, cfg)[1]


def _load_model_and_state(rundir: RunDir, cfg: RunConfig):
    from raymmc.io import safestate

    state = rundir.read_bytes(MODEL_FILE)
    model = make_model(cfg)
    model.load_state_dict(safestate.loads(state, where=rundir.path(MODEL_FILE)))
    return model, state


def train_nodes(train_report: dict) -> list[str]:
    """The Ray nodes the clustering was fitted on: the Ray Train workers', or the driver's (in-process fit)."""
    import ray

    if train_report.get("nodes"):
        return sorted(train_report["nodes"].split(","))
    return [ray.get_runtime_context().get_node_id()]


def train_experiment(name: str, run_uri: str) -> str:
    """The Ray Train experiment of a run whose checkpoints go to a shared ``cluster.train.storage_path``: runs of one
    name under different outputs (every sweep's "best") must not resume from, or delete, each other's checkpoints.
    The run folder is one run's (``open_run``), so a hash of its URI tells them apart; a resumed run gets its own
    again, however its local output was written."""
    import hashlib

    where = run_uri.rstrip("/") if storage.is_remote(run_uri) else os.path.abspath(run_uri)
    return f"{name}-{hashlib.sha1(where.encode()).hexdigest()[:8]}"


def fit_model(cfg: RunConfig, prep: Prepared, rundir: RunDir, name: str, log: Callable[[str], None],
              resuming: bool = False, warm_start: bytes | None = None):
    """Fit in-process, or data-parallel under Ray Train (cluster.train); ``warm_start``: a previous model's
    serialised state to start from (an algorithm that supports it)."""
    from raymmc.io import safestate
    from raymmc.raysession import has_gpu
    from raymmc.train.trainer import fit_ray_train, use_ray_train

    c = cfg.cluster
    if not use_ray_train(c.train, c.algorithm, prep.usable):
        model = make_model(cfg)
        if warm_start is not None:
            model.warm_start = safestate.loads(warm_start, where="the warm-start model")
        return model.fit(usable_features(prep, cfg)), {}
    storage_path = c.train.storage_path or rundir.path("train")
    if not storage.is_remote(storage_path):
        storage_path = os.path.abspath(storage_path)
    if c.train.storage_path:
        name = train_experiment(name, rundir.uri)
    log(f"train: {c.algorithm} on {c.train.workers} Ray Train worker(s), checkpoints in {storage_path}")
    state, report = fit_ray_train(prep.dataset, algorithm=c.algorithm, clusters=c.clusters,
                          params=model_params(cfg), seed=cfg.seed, train=c.train, storage_path=storage_path,
                          run_name=name, has_gpu=has_gpu(), resume=resuming, log=log, options=cfg.storage,
                          pixel_channels=cfg.extract.pixels.channels, warm_start=warm_start)
    model = make_model(cfg)
    model.load_state_dict(safestate.loads(state, where=f"the final checkpoint in {storage_path}"))
    return model, {"workers": c.train.workers, "storage_path": storage_path, "experiment": name, **report}


def run(cfg: RunConfig, log: Callable[[str], None] = print, resuming: bool = False) -> RunResult:
    """`raymmc run`: cluster an archive and write a run directory."""
    import dataclasses

    seed_everything(cfg.seed)
    timer = StageTimer()
    started = _dt.datetime.now(_dt.timezone.utc)
    input_uri = cfg.input or demo_input(cfg, log)
    extra: dict = {}
    if cfg.cluster.algorithm == "auto":
        algorithm, why, dec_view = choose_for_input(discover_input(input_uri, cfg.storage, cfg.archive), cfg.storage)
        log(f"algorithm auto -> {algorithm}: {why}")
        params = dict(cfg.cluster.params)
        if dec_view:  # DEC clusters that view unless told otherwise
            params["dec"] = {"view": dec_view, **(params.get("dec") or {})}
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, algorithm=algorithm, params=params))
        extra["algorithm_choice"] = {"algorithm": algorithm, "why": why}
    used_modalities(cfg)  # config errors before any work
    rundir = open_run(cfg.output, cfg.run_name, f"{cfg.cluster.algorithm}-{started.strftime('%Y%m%d-%H%M%S')}",
                      cfg.storage, command="run", resuming=resuming)
    name = rundir.name
    cfg = dataclasses.replace(cfg, input=input_uri, run_name=name)
    # Written first, so that an interrupted run can be resumed (`raymmc run --resume`).
    rundir.write_json("config.json", cfg.to_dict())

    prep = prepare(cfg, input_uri, rundir, timer, log)
    if prep.usable < cfg.cluster.clusters:
        raise ValueError(f"only {prep.usable} usable items for {cfg.cluster.clusters} clusters; "
                         f"see {rundir.path('rejects')}")
    with timer("cluster"):
        model, extra["train"] = fit_model(cfg, prep, rundir, name, log, resuming)
    state = save_model(rundir, model)
    with timer("predict"):
        metrics, predict_nodes, summary = write_results(rundir, cfg, prep, state)
    extra["nodes"] = {"extract": prep.stats.nodes, "cluster": train_nodes(extra["train"]), "predict": predict_nodes}
    if cfg.report and summary is not None:
        with timer("report"):
            report = write_report(rundir, cfg, summary, metrics, shards=prep.shards,
                                  title=f"{os.path.basename(input_uri.rstrip('/'))} · {cfg.cluster.algorithm}")
        log(f"report: {report}")
    manifest = write_manifest(rundir, cfg, prep, started, timer, **extra)
    return RunResult(rundir.uri, metrics, manifest)


def resume(run_uri: str, storage_options: StorageOptions | None = None,
           log: Callable[[str], None] = print) -> RunResult:
    """`raymmc run --resume RUN`: continue an interrupted run with its own config. Finished
    feature files come from the cache; Ray Train restores the last checkpoint of the same run."""
    from raymmc.config import from_dict

    rundir = RunDir(run_uri, storage_options)
    if rundir.exists("recluster.json"):
        previous = rundir.read_json("recluster.json")["previous_run"]
        raise ConfigError(f"{run_uri} is an interrupted re-clustering: run `raymmc recluster --previous {previous}` "
                          "again (with another --run-name); its finished feature files come from the cache")
    cfg = from_dict(RunConfig, rundir.read_json("config.json"))
    expected = storage.join(cfg.output, cfg.run_name)
    if storage.is_remote(run_uri):
        same = expected.rstrip("/") == run_uri.rstrip("/")
    else:
        same = os.path.abspath(expected) == os.path.abspath(run_uri)
    if not same:
        raise ValueError(f"{run_uri} was written as {expected}; resume it from there")
    log(f"resuming {run_uri}")
    return run(cfg, log, resuming=True)


def fitted_text_encoder(cfg: RunConfig, cache_root: str):
    """The text encoder a run fitted on its archive (TF-IDF, Doc2Vec), saved beside its features in
    ``cache_root``; None for a pretrained or absent one."""
    from raymmc.features.extract import saved_text_encoder

    return saved_text_encoder(cache_root, cfg.extract.text.model, cfg.storage)


def assign(model_run: str, input_uri: str, output: str, *, run_name: str | None = None,
           storage_options: StorageOptions | None = None, log: Callable[[str], None] = print,
           input_format: str | None = None) -> RunResult:
    """`raymmc assign`: put new items into an existing run's clusters, without retraining.
    Features come from the same encoders (the run's fitted text encoder included); the files the run itself
    encoded are read from its feature cache, not encoded again."""
    import dataclasses

    from raymmc.config import from_dict

    started = _dt.datetime.now(_dt.timezone.utc)
    check_run_location(output, run_name)  # before anything is read
    source = RunDir(model_run, storage_options)
    src_manifest = source.read_json("manifest.json")
    cfg = from_dict(RunConfig, src_manifest["config"])
    if storage_options is not None:
        cfg = dataclasses.replace(cfg, storage=storage_options)
    if input_format is not None:  # the new items may come in another format than the run's
        cfg = dataclasses.replace(cfg, archive=dataclasses.replace(cfg.archive, format=input_format))
    seed_everything(cfg.seed)
    timer = StageTimer()
    rundir = open_run(output, run_name, f"assign-{started.strftime('%Y%m%d-%H%M%S')}", cfg.storage,
                      command="assign")

    cache = src_manifest["features"]["cache"]
    text_encoder = fitted_text_encoder(cfg, cache)
    cfg = dataclasses.replace(cfg, input=input_uri, output=output)
    # the files the model run already encoded are read from its cache, with the same encoders by construction
    prep = prepare(cfg, input_uri, rundir, timer, log, text_encoder=text_encoder,
                   text_identity=cache.rstrip("/").rsplit("/", 1)[-1], reuse_root=cache)
    with timer("assign"):  # a re-clustered model writes its lineage's stable cluster ids
        metrics, predict_nodes, _ = write_results(rundir, cfg, prep, load_model_state(source, cfg),
                                                  cluster_ids=(src_manifest.get("lineage") or {}).get("cluster_ids"))
    manifest = write_manifest(rundir, cfg, prep, started, timer, model_run=model_run,
                              nodes={"extract": prep.stats.nodes, "predict": predict_nodes})
    return RunResult(rundir.uri, metrics, manifest)


def load_run_features(run_uri: str, options: StorageOptions | None = None) -> tuple[MultiViewData, np.ndarray]:
    """A finished run's clustered items as ``(MultiViewData, labels)``: its cached features
    less its rejects, in assignment order (for benchmarks and notebooks)."""
    rundir = RunDir(run_uri, options)
    table = load_features(rundir.read_json("features.json")["dirs"], options)
    rejects = rundir.read_table("rejects")
    drop = set(zip(rejects.column("source").to_pylist(), rejects.column("row").to_pylist()))
    keep = [(s, r) not in drop for s, r in zip(table.column("source").to_pylist(), table.column("row").to_pylist())]
    table = table.filter(pa.array(keep))
    channels = rundir.read_json("manifest.json")["config"]["extract"]["pixels"]["channels"]
    return table_to_multiview(table, channels), np.array(table.column("label").to_pylist(), dtype=object)
