"""Ray Train glue: fit any raymmc clusterer data-parallel under TorchTrainer.

Each worker reads its shard of the feature Parquet through Ray Data (``get_dataset_shard``),
builds the same model from the same seed, wraps its nets in DDP (when there is more than one
worker) and calls ``fit`` with :class:`TorchDistributedOps`, so that every whole-data-set
quantity (cluster frequencies, alignment counts, k-means samples, per-item targets) is reduced
across workers. Progress is reported every epoch; rank 0's final state is the run's checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from raymmc.train.blocks import concat_blocks


@dataclass
class TrainConfig:
    # "auto": Ray Train for the deep algorithms (dec, jecl, dm2c, mmdc), and for k-means too when workers > 1
    # or the archive has more than local_max_items usable items; otherwise k-means runs in the driver (no
    # Ray Train start-up, ~13 s here, for a small archive).
    mode: str = "auto"  # auto | ray | local
    # The most usable items "auto" fits in the driver: their features come to it (about 6 KB an item with
    # MobileNetV2 + Doc2Vec: 600 MB at the default). Above it one Ray Train worker reads them as its shard.
    local_max_items: int = 100_000
    workers: int = 1  # `raymmc run --workers N`
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # a killed worker is restarted this many times
    storage_path: str | None = None  # Ray Train checkpoints; None = <run directory>/train
    report_every: int = 10  # progress reports every N epochs / target updates (and at each new phase)
    read_batch_rows: int = 4096  # rows per Arrow batch when a worker reads its shard (memory, not results)


DEEP = frozenset({"dec", "jecl", "dm2c", "mmdc"})


def use_ray_train(cfg: TrainConfig, algorithm: str, n_items: int) -> bool:
    """Whether a fit of ``n_items`` usable items goes through Ray Train (see ``TrainConfig.mode``)."""
    if cfg.mode not in ("auto", "ray", "local"):
        raise ValueError(f"cluster.train.mode must be auto, ray or local, not {cfg.mode!r}")
    return cfg.mode == "ray" or (cfg.mode == "auto" and (
        algorithm in DEEP or cfg.workers > 1 or n_items > cfg.local_max_items))


def table_to_multiview(table: pa.Table, pixel_channels: int = 1):
    """Feature rows (with a global ``index`` column when present) -> MultiViewData; ``pixel_channels``
    is ``extract.pixels.channels`` (the pixels column holds C*H*W values of square images)."""
    from raymmc.cluster.base import MultiViewData
    from raymmc.features.extract import feature_matrix

    names = table.column_names
    pixels = None
    if "pixels" in names:
        flat = feature_matrix(table, "pixels", np.uint8)
        side = int(round((flat.shape[1] / pixel_channels) ** 0.5))
        if pixel_channels * side * side != flat.shape[1]:
            raise ValueError(f"pixels rows of {flat.shape[1]} values are not {pixel_channels} square channel(s)")
        pixels = flat.reshape(len(flat), pixel_channels, side, side)
    has_image = table.column("has_image").to_numpy(zero_copy_only=False) & (
        "image_feat" in names or "pixels" in names)
    has_text = table.column("has_text").to_numpy(zero_copy_only=False) & ("text_feat" in names)
    extra = {"index": table.column("index").to_numpy()} if "index" in names else {}
    return MultiViewData(
        image=feature_matrix(table, "image_feat") if "image_feat" in names else None,
        text=feature_matrix(table, "text_feat") if "text_feat" in names else None,
        has_image=has_image, has_text=has_text, pixels=pixels,
        ids=np.array(table.column("id").to_pylist(), dtype=object), extra=extra,
    )


# Checkpoint files: safetensors states (raymmc.io.safestate), never pickles. A checkpoint directory on shared
# storage is data: a planted file in it must be refused on resume, not run on every worker.
RESUME_FILE = "resume.safetensors"  # the state `fit` continues from
STATE_FILE = "state.safetensors"  # the final model (in the last checkpoint only)


def _serialize(state: dict) -> bytes:
    from raymmc.io import safestate

    return safestate.dumps(state)


def _train_loop(loop_cfg: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    from torch.nn.parallel import DistributedDataParallel

    from raymmc.cluster import checkpoint as protocol
    from raymmc.cluster.checkpoint import Phase
    from raymmc.cluster.registry import make_clusterer
    from raymmc.train.ops import TorchDistributedOps

    ctx = ray.train.get_context()
    shard = ray.train.get_dataset_shard(f"train_{ctx.get_world_rank()}")
    table = concat_blocks(list(shard.iter_batches(batch_format="pyarrow", batch_size=loop_cfg["read_batch_rows"])))
    n_rows = table.num_rows
    if n_rows == 0:
        raise RuntimeError(f"worker {ctx.get_world_rank()} received no rows; use fewer workers")
    if "index" in table.column_names:  # the shard's rows in input order, however its blocks arrived
        index = table.column("index").to_numpy()
        if np.any(index[1:] < index[:-1]):  # a sorted copy only when they did not arrive in order
            table = table.sort_by("index")
    data = table_to_multiview(table, loop_cfg["pixel_channels"])
    del table  # the fit holds the shard once, as ``data``, not also as Arrow
    ops = TorchDistributedOps()
    world = ctx.get_world_size()

    def wrap(module):
        if world == 1 or not any(p.requires_grad for p in module.parameters()):
            return module
        # Some nets skip a view in some batches (e.g. no caption): allow unused parameters.
        return DistributedDataParallel(module, find_unused_parameters=True)

    last_phase = {"phase": None, "calls": 0}

    def on_epoch(info: dict) -> None:
        # Every rank calls this in lock-step with the same info, so reporting on a count (not a
        # clock) keeps ray.train.report collective-safe; every 10th epoch and every new phase.
        last_phase["calls"] += 1
        if info.get("phase") != last_phase["phase"] or last_phase["calls"] % loop_cfg["report_every"] == 0:
            last_phase["phase"] = info.get("phase")
            ray.train.report({k: v for k, v in info.items() if isinstance(v, (int, float, str))})

    model = make_clusterer(loop_cfg["algorithm"], loop_cfg["clusters"], loop_cfg["params"], seed=loop_cfg["seed"],
                           on_epoch=on_epoch, wrap=wrap)
    # A restarted worker group gets this run's last checkpoint; `raymmc run --resume` passes the
    # interrupted run's (Train V2 has no resume_from_checkpoint).
    restored = ray.train.get_checkpoint()
    if restored is None and loop_cfg.get("resume_from") is not None:
        restored = loop_cfg["resume_from"]
    from raymmc.io import safestate

    if restored is not None:  # a restarted worker group: continue from the last checkpoint
        with restored.as_directory() as d:
            with open(os.path.join(d, RESUME_FILE), "rb") as f:
                model.resume_state = safestate.loads(f.read(), where=f"{restored.path}/{RESUME_FILE}")
    if loop_cfg.get("warm_start") is not None:  # a re-clustering: the previous run's model (also on a restart)
        model.warm_start = safestate.loads(ray.get(loop_cfg["warm_start"]), where="the warm-start model")

    def checkpoint_fn(state: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if ctx.get_world_rank() == 0:
                with open(os.path.join(tmp, RESUME_FILE), "wb") as f:
                    f.write(_serialize(state))
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"phase": "checkpoint", "checkpoint_phase": str(state.get("phase"))}, checkpoint=ckpt)

    model.checkpoint_fn = checkpoint_fn
    state = model.resume_state or {}
    if state.get("phase") == Phase.DONE.value:  # restarted after the end (written below): nothing left to train
        model.load_state_dict(state["state"]["model"])
    else:
        model.fit(data, ops)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            with open(os.path.join(tmp, STATE_FILE), "wb") as f:
                f.write(_serialize(model.state_dict()))
            with open(os.path.join(tmp, RESUME_FILE), "wb") as f:
                f.write(_serialize(protocol.record(model.name, Phase.DONE, {"model": model.state_dict()}, [], [])))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        nodes = sorted(set(protocol.gather_strings(ray.get_runtime_context().get_node_id(), ops)))
        ray.train.report({"phase": "done", "rows": int(n_rows), "resumed": int(restored is not None),
                          "nodes": ",".join(nodes)}, checkpoint=checkpoint)


def latest_checkpoint(storage_path: str, run_name: str, options=None):
    """The newest complete checkpoint of a Ray Train run (its directories sort by time), or None."""
    from ray.train import Checkpoint

    from raymmc.io import storage

    root = storage.join(storage_path, run_name)
    if not storage.exists(root, options):
        return None
    files = storage.list_files(root, RESUME_FILE, options)
    if not files:
        return None
    latest = max(files, key=lambda f: f.path.rsplit("/", 2)[-2])
    fs, _ = storage.resolve(root, options)
    return Checkpoint(latest.path.rsplit("/", 1)[0], filesystem=fs)


def exact_shards(dataset, world_size: int) -> dict:
    """``{"train_0": rows [0, n/N), "train_1": ..., ...}``: worker i's rows of the (materialised, ordered)
    training dataset, each row in exactly one shard and the shards within one row of each other, the
    same on every run. Cut here, before the workers take the CPUs the split tasks need. Ray's default
    ``streaming_split(equal=True)`` may drop up to N-1 rows and hands blocks to whichever worker asks
    first, so a seed did not fix a run's result."""
    n = dataset.count()
    if n < world_size:
        raise ValueError(f"{n} training rows cannot be split over {world_size} workers; use fewer")
    if world_size == 1:
        return {"train_0": dataset.materialize()}
    parts = dataset.split_at_indices([n * i // world_size for i in range(1, world_size)])
    return {f"train_{i}": part.materialize() for i, part in enumerate(parts)}


def fit_ray_train(dataset, *, algorithm: str, clusters: int, params: Any, seed: int, train: TrainConfig,
                  storage_path: str, run_name: str, has_gpu: bool, resume: bool = False,
                  log: Callable[[str], None] = print, options=None, pixel_channels: int = 1,
                  warm_start: bytes | None = None) -> tuple[bytes, dict]:
    """Fit under TorchTrainer on ``dataset`` (usable feature rows); returns the serialised state
    and the final report (``resumed`` is 1 when the workers continued from a checkpoint).
    ``warm_start``: a previous model's serialised state that a fresh fit starts from (a re-clustering).
    ``resume``: continue from this run's last checkpoint; otherwise old checkpoints of a run of
    the same name are removed first (they belong to another configuration)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raymmc.io import storage

    start = latest_checkpoint(storage_path, run_name, options) if resume else None
    if not resume:
        storage.delete_dir(storage.join(storage_path, run_name), options)
    if start is not None:
        uri = storage.join(storage.to_uri(storage_path, start.path), RESUME_FILE)
        # Checked here, once, before any worker starts: a refused file is then one clear error naming it, not
        # a worker failure retried max_failures times.
        from raymmc.io import safestate

        safestate.loads(storage.read_bytes(uri, options), where=uri)
        log(f"train: resuming from {uri}")

    fs, fs_path = storage.resolve(storage_path, options)
    # use_gpu unset: decided by the cluster as it is now (an autoscaling GPU group may be up or not): reported
    use_gpu = has_gpu if train.use_gpu is None else train.use_gpu
    if use_gpu:
        log(f"train: {train.workers} worker(s) with a GPU each")
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"algorithm": algorithm, "clusters": clusters, "params": params, "seed": seed,
                           "report_every": train.report_every, "resume_from": start, "read_batch_rows": train.read_batch_rows,
                           "pixel_channels": pixel_channels,
                           # through the object store, not the config: a model of any size
                           "warm_start": None if warm_start is None else ray.put(warm_start)},
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker}),
        # Our filesystem (s3fs with the configured endpoint, the AWS credential chain) rather than Ray's own
        # resolution of the URI, which knows nothing of storage.endpoint_url.
        run_config=RunConfig(name=run_name, storage_path=fs_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             # the newest two: a resume needs the last, and a model's checkpoint can be GBs
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=exact_shards(dataset, train.workers),
        dataset_config=DataConfig(datasets_to_split=[]),  # each worker reads its own train_<rank> whole
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {algorithm} produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, STATE_FILE), "rb") as f:
            return f.read(), {**(result.metrics or {}), "use_gpu": bool(use_gpu)}
