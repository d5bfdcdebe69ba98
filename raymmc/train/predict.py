"""Prediction on Ray workers: the fitted model, shared once through the object store, assigns every usable
row of the feature dataset in a ``map_batches`` actor pool; the workers write the assignments and the
driver receives only the label x cluster counts (O(K x L)) for the metrics and the sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    """One per actor: the model is rebuilt from its safetensors state once, then ``__call__`` assigns
    a batch of feature rows (testable on a ``take_batch`` without a cluster)."""

    def __init__(self, spec: ModelSpec, state: Any, threads: int = 1):
        import ray
        import torch

        from raymmc.cluster.registry import make_clusterer
        from raymmc.io import safestate

        torch.set_num_threads(max(1, int(threads)))
        raw = ray.get(state) if isinstance(state, ray.ObjectRef) else state
        self.spec = spec
        self.model = make_clusterer(spec.algorithm, spec.clusters, spec.params, seed=spec.seed)
        self.model.load_state_dict(safestate.loads(raw, where="the fitted model"))
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raymmc.accounting import item_notes
        from raymmc.train.trainer import table_to_multiview

        if batch.num_rows == 0:
            return empty_assignments()
        data = table_to_multiview(batch, self.spec.pixel_channels)
        soft, outlier = self.model.assign(data)
        cluster = soft.argmax(axis=1).astype(np.int64)
        notes = item_notes(batch)
        marked = outlier != ""
        cluster[marked] = OUTLIER
        notes = ["; ".join(n for n in (note, why) if n) for note, why in zip(notes, outlier)]
        return pa.table({
            "id": batch.column("id"),
            "cluster": pa.array(cluster),
            "confidence": pa.array(soft.max(axis=1).astype(np.float32)),
            "has_image": batch.column("has_image"),
            "has_text": batch.column("has_text"),
            "note": pa.array(notes, pa.string()),
            "label": batch.column("label").cast(pa.string()),
            "node": pa.array([self.node] * batch.num_rows, pa.string()),
        })


def empty_assignments() -> pa.Table:
    return pa.table({"id": pa.array([], pa.string()), "cluster": pa.array([], pa.int64()),
                     "confidence": pa.array([], pa.float32()), "has_image": pa.array([], pa.bool_()),
                     "has_text": pa.array([], pa.bool_()), "note": pa.array([], pa.string()),
                     "label": pa.array([], pa.string()), "node": pa.array([], pa.string())})


def label_cluster_counts(batch: pa.Table) -> pa.Table:
    """One block's (labeled, label, cluster, node, count) rows; ``labeled`` keeps null labels apart from ""."""
    label = batch.column("label")
    labeled = pc.is_valid(label)
    keys = pa.table({"labeled": labeled, "label": pc.fill_null(label, ""), "cluster": batch.column("cluster"),
                     "node": batch.column("node")})
    return keys.group_by(COUNT_KEYS).aggregate([([], "count_all")]).rename_columns([*COUNT_KEYS, "count"])


COUNT_KEYS = ["labeled", "label", "cluster", "node"]
# Up to this many per-block count rows (about 50 MB on the driver) are summed there; beyond it, by a shuffle
# on the workers (whose fixed start-up of several seconds a small run should not pay).
DRIVER_COUNT_ROWS = 1_000_000


@dataclass
class Counts:
    """The aggregated label x cluster table of a prediction: all the driver keeps of it."""

    labels: list[str]  # labelled classes, sorted
    clusters: list[int]  # cluster ids that occur (OUTLIER included), sorted
    table: np.ndarray  # (len(labels), len(clusters)) items with that label in that cluster
    unlabeled: np.ndarray  # (len(clusters),) items without a label per cluster
    nodes: list[str]  # the Ray nodes the predictors ran on

    @property
    def sizes(self) -> dict[int, int]:
        return {c: int(n) for c, n in zip(self.clusters, self.table.sum(0) + self.unlabeled)}

    @property
    def n(self) -> int:
        return int(self.table.sum() + self.unlabeled.sum())


def aggregate_counts(rows: list[dict]) -> Counts:
    clusters = sorted({int(r["cluster"]) for r in rows})
    labels = sorted({r["label"] for r in rows if r["labeled"]})
    ci, li = {c: j for j, c in enumerate(clusters)}, {v: i for i, v in enumerate(labels)}
    table, unlabeled = np.zeros((len(labels), len(clusters)), np.int64), np.zeros(len(clusters), np.int64)
    for r in rows:
        if r["labeled"]:
            table[li[r["label"]], ci[int(r["cluster"])]] += int(r["count"])
        else:
            unlabeled[ci[int(r["cluster"])]] += int(r["count"])
    return Counts(labels, clusters, table, unlabeled, sorted({r["node"] for r in rows}))


def predict_and_write(dataset, spec: ModelSpec, state: bytes, out_uri: str, *, filesystem, workers: int = 1,
                      cpus_per_worker: float = 1.0, batch_rows: int = 4096) -> Counts:
    """Assign every row of ``dataset`` (usable feature rows) on a pool of ``workers`` actors, write
    ``ASSIGNMENT_COLUMNS`` as Parquet under ``out_uri`` from the workers, and return the counts."""
    import ray

    ref = ray.put(state)
    # A small archive would go to one actor: map_batches bundles blocks up to batch_size rows per task, and
    # Ray Data sends tasks to the actor beside their blocks until it has 4 in flight. At least 8 blocks and
    # tasks per actor give every actor work (a split, not a shuffle).
    n = dataset.count()
    if dataset.num_blocks() < 8 * workers:
        # Materialised before the actors start: with every CPU held by a predictor, a repartition task
        # fused upstream of them would wait forever (seen: 2 actors on a 2-CPU node hung the run).
        dataset = dataset.repartition(8 * workers).materialize()
    rows = max(1, min(batch_rows, -(-n // (8 * workers))))
    assigned = dataset.map_batches(
        Predictor, fn_constructor_kwargs={"spec": spec, "state": ref, "threads": max(1, int(cpus_per_worker))},
        batch_format="pyarrow", batch_size=rows, concurrency=max(1, workers), num_cpus=cpus_per_worker,
    ).materialize()  # once in the object store: written and counted without predicting twice
    assigned.select_columns(ASSIGNMENT_COLUMNS).write_parquet(out_uri, filesystem=filesystem)
    per_block = assigned.map_batches(label_cluster_counts, batch_format="pyarrow", batch_size=None).materialize()
    if per_block.count() > DRIVER_COUNT_ROWS:  # many blocks x clusters x labels: sum them on the workers first
        per_block = per_block.groupby(COUNT_KEYS).sum("count").rename_columns({"sum(count)": "count"})
    return aggregate_counts(per_block.take_all())
