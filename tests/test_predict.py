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
    assert set(ASSIGNMENT_COLUMNS) <= set(out.column_names) and out.num_rows == batch.num_rows
    assert out.column("cluster").to_pylist() == model.predict(table_to_multiview(batch)).tolist()
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"  # another test's session
    assert out.column("note").to_pylist()[0] == "caption: empty" and out.column("node").to_pylist()[0] == node
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
