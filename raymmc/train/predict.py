"""Prediction on Ray workers: the fitted model, shared once through the object store, assigns every usable
row of the feature dataset in ``map_batches`` tasks (at most ``workers`` at a time), each worker process building
the model once; the workers write the assignments, and each batch carries its bounded summary (sizes, label
counts, report examples), which is all the driver receives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from raymmc.train.sample import MapSample

ASSIGNMENT_COLUMNS = ["id", "cluster", "confidence", "has_image", "has_text", "note"]
OUTLIER = -1  # the cluster id of an item an outlier rule left out


@dataclass
class ModelSpec:
    """What a worker needs to rebuild the fitted model (the state itself travels as an object ref)."""

    algorithm: str
    clusters: int
    params: Any
    seed: int
    pixel_channels: int = 1


class Predictor:
    """One per worker process and prediction: the model is rebuilt from its safetensors state once, then
    ``__call__`` assigns a batch of feature rows (testable on a ``take_batch`` without a cluster)."""

    def __init__(self, spec: ModelSpec, state: Any, threads: int = 1, sample: MapSample | None = None,
                 summarize: Callable[[pa.Table], str] | None = None, cluster_ids: list[int] | None = None):
        import ray
        import torch

        from raymmc.cluster.registry import make_clusterer
        from raymmc.io import safestate

        torch.set_num_threads(max(1, int(threads)))
        raw = ray.get(state) if isinstance(state, ray.ObjectRef) else state
        self.spec = spec
        # With ``summarize``: each batch's bounded summary (a string) rides on its first row, in a ``summary``
        # column, computed here where the model, the captions and the sampled embeddings already are.
        self.sample, self.summarize = sample, summarize
        # ``cluster_ids[j]``: the id written for the model's cluster j (a re-clustering's stable ids)
        self.cluster_ids = None if cluster_ids is None else np.asarray(cluster_ids, dtype=np.int64)
        self.model = make_clusterer(spec.algorithm, spec.clusters, spec.params, seed=spec.seed)
        self.model.load_state_dict(safestate.loads(raw, where="the fitted model"))
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raymmc.accounting import item_notes
        from raymmc.train.trainer import table_to_multiview

        if batch.num_rows == 0:
            empty = empty_assignments()
            return empty if self.summarize is None else self._with_summary(empty, None)
        data = table_to_multiview(batch, self.spec.pixel_channels)
        soft, outlier = self.model.assign(data)
        cluster = soft.argmax(axis=1).astype(np.int64)
        notes = item_notes(batch)
        marked = outlier != ""
        if self.cluster_ids is not None:
            cluster = self.cluster_ids[cluster]
        cluster[marked] = OUTLIER
        notes = ["; ".join(n for n in (note, why) if n) for note, why in zip(notes, outlier)]
        out = pa.table({
            "id": batch.column("id"),
            "cluster": pa.array(cluster),
            "confidence": pa.array(soft.max(axis=1).astype(np.float32)),
            "has_image": batch.column("has_image"),
            "has_text": batch.column("has_text"),
            "note": pa.array(notes, pa.string()),
            "label": batch.column("label").cast(pa.string()),
            "node": pa.array([self.node] * batch.num_rows, pa.string()),
        })
        if self.summarize is None:
            return out
        return self._with_summary(out, self.summarize(self._report_columns(out, batch)))

    @staticmethod
    def _with_summary(out: pa.Table, summary: str | None) -> pa.Table:
        """The written columns and the batch's summary on its first row: the label and node of each row are in the
        summary, so they do not stay in the object store (at a billion items, the node id alone is 60 GB)."""
        column = [summary] + [None] * (out.num_rows - 1) if out.num_rows else []
        return out.select(ASSIGNMENT_COLUMNS).append_column("summary", pa.array(column, pa.string()))

    def _report_columns(self, out: pa.Table, batch: pa.Table) -> pa.Table:
        """The batch's assignments with the caption, source and row of each item and the embedding of the rows
        the map may sample (a few thousand in the whole archive: the model embeds only those)."""
        from raymmc.train.sample import sample_mask, with_sample
        from raymmc.train.trainer import table_to_multiview

        n = batch.num_rows
        for name, default, type_ in (("caption", "", pa.string()), ("source", "", pa.string()), ("row", 0, pa.int64())):
            out = out.append_column(name, batch.column(name) if name in batch.column_names
                                    else pa.array([default] * n, type_))
        if self.sample is None or self.sample.points <= 0:
            return out
        keys, mask = sample_mask(batch.column("id").to_pylist(), self.sample)
        vectors = (self.model.embed(table_to_multiview(batch.filter(pa.array(mask)), self.spec.pixel_channels))
                   if mask.any() else np.zeros((0, 0), np.float32))
        return with_sample(out, keys, mask, vectors)


# Per worker process: the last model a prediction task built, under its prediction's key. Prediction runs as
# tasks, not as an actor pool: Ray keeps its task workers between datasets, so a prediction starts on warm
# processes (an actor is a new process every time: 2.8 s before its first batch on a 60-row run; the predict stage
# took 3.8 s every time with actors, 2.6 s and then 0.25 s with tasks once the workers had imported torch), and
# each process still builds the model once per prediction.
_MODELS: dict[str, Predictor] = {}


def _predict_batch(batch: pa.Table, *, key: str, **predictor_kwargs: Any) -> pa.Table:
    """One prediction task: the process's Predictor for ``key`` (built on its first batch), on ``batch``, with
    torch's thread count set for the task and restored after it (the process runs other tasks too)."""
    import torch

    before = torch.get_num_threads()
    try:
        predictor = _MODELS.get(key)
        if predictor is None:
            _MODELS.clear()  # one model per process at a time: an idle worker keeps no more than the last one
            predictor = _MODELS[key] = Predictor(**predictor_kwargs)
        torch.set_num_threads(max(1, int(predictor_kwargs.get("threads", 1))))
        return predictor(batch)
    finally:
        torch.set_num_threads(before)


def _map_predict(dataset, rows: int, workers: int, cpus_per_worker: float, **predictor_kwargs: Any):
    """``dataset`` mapped by prediction tasks of ``rows`` rows, ``workers`` at a time (the state travels as an
    object ref inside the kwargs: fetched once per process, by the Predictor)."""
    import uuid

    import ray.data

    return dataset.map_batches(
        _predict_batch, fn_kwargs={"key": uuid.uuid4().hex, **predictor_kwargs,
                                   "threads": max(1, int(cpus_per_worker))},
        batch_format="pyarrow", batch_size=rows, compute=ray.data.TaskPoolStrategy(size=max(1, workers)),
        num_cpus=cpus_per_worker)


def empty_assignments() -> pa.Table:
    return pa.table({"id": pa.array([], pa.string()), "cluster": pa.array([], pa.int64()),
                     "confidence": pa.array([], pa.float32()), "has_image": pa.array([], pa.bool_()),
                     "has_text": pa.array([], pa.bool_()), "note": pa.array([], pa.string()),
                     "label": pa.array([], pa.string()), "node": pa.array([], pa.string())})


def _split_rows(dataset, workers: int, batch_rows: int):
    """``(dataset, rows per batch, rows)`` that give each of ``workers`` concurrent tasks work."""
    # A small archive would be one task: map_batches bundles blocks up to batch_size rows per task. At least 8
    # blocks and tasks per worker spread the work (a split, not a shuffle), over nodes too (Ray Data spreads
    # its tasks).
    n = dataset.count()
    if workers <= 1:  # one task at a time: a split would only cost a shuffle stage (2 s on 12 rows)
        return dataset, max(1, min(batch_rows, n)), n
    if dataset.num_blocks() < 8 * workers:
        # Materialised before the prediction starts: with every CPU held by a predictor, a repartition task
        # fused upstream of it could wait forever (seen with an actor pool: 2 actors on a 2-CPU node hung the run).
        dataset = dataset.repartition(8 * workers).materialize()
    return dataset, max(1, min(batch_rows, -(-n // (8 * workers)))), n


def predict_clusters(dataset, spec: ModelSpec, state: bytes, *, workers: int = 1, cpus_per_worker: float = 1.0,
                     batch_rows: int = 4096):
    """Every usable row's ``(id, cluster)`` under the model's own cluster numbering, materialised in the
    object store (a re-clustering matches those clusters to the previous run's before writing)."""
    import ray

    dataset, rows, _ = _split_rows(dataset, workers, batch_rows)
    return _map_predict(dataset, rows, workers, cpus_per_worker, spec=spec, state=ray.put(state)
                        ).select_columns(["id", "cluster"]).materialize()


def predict_and_write(dataset, spec: ModelSpec, state: bytes, out_uri: str, *, filesystem, workers: int = 1,
                      cpus_per_worker: float = 1.0, batch_rows: int = 4096,
                      summarize: Callable[[pa.Table], str] | None = None, map_points: int = 0, seed: int = 0,
                      cluster_ids: list[int] | None = None):
    """Assign every row of ``dataset`` (usable feature rows) in tasks, ``workers`` at a time, write
    ``ASSIGNMENT_COLUMNS`` as Parquet under ``out_uri`` from the workers, and return the prediction rows
    (a materialised Ray Dataset). With ``summarize`` (a function of a batch's assignments, labels, captions,
    sources, rows and, on a ``map_points`` sample keyed by ``seed``, embeddings), those rows also carry each
    batch's summary (see :class:`Predictor`): all the driver needs of them. ``cluster_ids``: the id written
    for each model cluster (default: its index)."""
    import ray

    ref = ray.put(state)
    dataset, rows, n = _split_rows(dataset, workers, batch_rows)
    assigned = _map_predict(dataset, rows, workers, cpus_per_worker, spec=spec, state=ref,
                            sample=MapSample(map_points, seed, n), summarize=summarize, cluster_ids=cluster_ids,
                            ).materialize()  # once in the object store: written and counted without predicting twice
    assigned.select_columns(ASSIGNMENT_COLUMNS).write_parquet(out_uri, filesystem=filesystem)
    return assigned
