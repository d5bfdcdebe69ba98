"""The predictor's ``__call__`` on a batch, without a cluster (as Ray's examples test theirs on a
``take_batch``): assignments, notes and the bounded summary each batch carries."""

import functools

import numpy as np
import pyarrow as pa

from raymmc.cluster.registry import make_clusterer
from raymmc.io import safestate
from raymmc.report.summary import ReportSummary, SummaryLimits, block_summary
from raymmc.train.predict import ASSIGNMENT_COLUMNS, ModelSpec, Predictor
from raymmc.train.sample import MapSample
from raymmc.train.trainer import table_to_multiview


def _batch(n: int = 40) -> pa.Table:
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    img = (rng.normal(size=(2, 8))[y] * 4 + rng.normal(size=(n, 8))).astype(np.float32)
    has_text = np.arange(n) % 5 != 0
    txt = (rng.normal(size=(2, 4))[y] * 4 + rng.normal(size=(n, 4))).astype(np.float32) * has_text[:, None]
    return pa.table({
        "id": [f"i{i}" for i in range(n)],
        "image_feat": pa.FixedSizeListArray.from_arrays(pa.array(img.ravel()), 8),
        "text_feat": pa.FixedSizeListArray.from_arrays(pa.array(txt.ravel()), 4),
        "has_image": np.ones(n, bool), "has_text": has_text, "index": np.arange(n),
        "label": [f"c{v}" for v in y], "image_note": [""] * n,
        "caption_note": ["" if t else "caption: empty" for t in has_text],
        "caption": [f"red rose {i}" if v == 0 else "blue boat" for i, v in enumerate(y)],
        "source": ["s.parquet"] * n, "row": np.arange(n),
    })


def test_predictor_call_on_a_batch_without_a_cluster():
    batch = _batch()
    model = make_clusterer("kmeans", 2, {"nredo": 1}, seed=0).fit(table_to_multiview(batch))
    limits = SummaryLimits(candidates=5, max_terms=100, map_points=10, seed=0)
    predictor = Predictor(ModelSpec("kmeans", 2, {"nredo": 1}, 0), safestate.dumps(model.state_dict()),
                          sample=MapSample(10, 0, batch.num_rows), summarize=functools.partial(block_summary, limits=limits))
    out = predictor(batch)
    # the written columns and the summary, nothing per row beside them (label and node are in the summary)
    assert out.column_names == [*ASSIGNMENT_COLUMNS, "summary"] and out.num_rows == batch.num_rows
    assert out.column("cluster").to_pylist() == model.predict(table_to_multiview(batch)).tolist()
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"  # another test's session
    assert out.column("note").to_pylist()[0] == "caption: empty"
    texts = out.column("summary").to_pylist()
    assert texts[0] is not None and texts[1:] == [None] * (batch.num_rows - 1)  # one summary a batch
    summary = ReportSummary.from_json(texts[0])
    assert summary.n == batch.num_rows and summary.nodes == [node] and len(summary.sample) == 10
    sizes = np.bincount(out.column("cluster").to_numpy(), minlength=2)
    assert {c: s.n for c, s in summary.clusters.items()} == {c: int(k) for c, k in enumerate(sizes) if k}
    red = next(s for s in summary.clusters.values() if "red" in s.terms)
    assert red.terms["rose"] == red.n and len(red.with_image) == 5  # candidates kept per cluster
    embedded = {p.key: p.vector for p in summary.sample}
    assert all(len(v) == len(model.embed(table_to_multiview(batch.slice(0, 1)))[0]) for v in embedded.values())
    # An empty batch keeps the schema (the summary column included).
    assert predictor(batch.slice(0, 0)).column_names == out.column_names


def test_a_prediction_task_leaves_the_process_thread_count_as_it_found_it():
    """Prediction tasks share their worker processes with other tasks: torch's thread count is the task's only."""
    import torch

    from raymmc.train.predict import _MODELS, _predict_batch

    batch = _batch()
    model = make_clusterer("kmeans", 2, {"nredo": 1}, seed=0).fit(table_to_multiview(batch))
    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(1)
        _MODELS.clear()
        out = _predict_batch(batch, key="k", spec=ModelSpec("kmeans", 2, {"nredo": 1}, 0),
                             state=safestate.dumps(model.state_dict()), threads=2)
        seen.append(torch.get_num_threads())
        assert out.column("cluster").to_pylist() == model.predict(table_to_multiview(batch)).tolist()
        assert list(_MODELS) == ["k"]
    finally:
        _MODELS.clear()
        torch.set_num_threads(before)
    assert seen == [1]


def test_work_given_no_gpu_sees_no_gpu(ray_session):
    """Ray 2.60 leaves a node's GPUs visible to a task or actor that asked for none; raymmc's runtime env restores
    hiding them, so no "auto" device (prediction, text encoders, CPU Train workers) takes a GPU Ray did not give."""
    import os

    @ray_session.remote(num_gpus=0)
    def visible() -> str | None:
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    assert ray_session.get(visible.remote()) == ""
