"""`raymmc assign`: new items go into an existing run's clusters without retraining."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import by_id

from raymmc.cli import main
from raymmc.config import load_config
from raymmc.io.rundir import RunDir
from raymmc.io.shards import SCHEMA
from raymmc.pipeline import assign, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fitted_run(ray_session, bad_archive, feature_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(values={"input": bad_archive["uri"], "output": str(out), "run_name": "base",
                              "cluster": {"clusters": 3},
                              "extract": {"text": {"model": "tfidf"}, "cache": feature_cache}})
    return run(cfg, log=lambda _: None)


def test_assign_same_items_reproduces_the_run(fitted_run, bad_archive, tmp_path):
    result = assign(fitted_run.run_uri, bad_archive["uri"], str(tmp_path), run_name="again", log=lambda _: None)
    base = RunDir(fitted_run.run_uri).read_table("assignments")
    again = RunDir(result.run_uri).read_table("assignments")
    # The same fitted text encoder (TF-IDF fitted on the base archive) and the same centroids: every item
    # in the same cluster (compared by id: the files' row order follows the workers, not a promise).
    assert by_id(again) == by_id(base)
    manifest = RunDir(result.run_uri).read_json("manifest.json")
    assert manifest["model_run"] == fitted_run.run_uri
    assert manifest["counts"]["read"] == manifest["counts"]["assigned"] + manifest["counts"]["rejected"]
    # the run had encoded these very files: read from its cache, none encoded again
    features = manifest["features"]
    assert features["files_extracted"] == 0 and features["files_reused"] == features["files_cached"] == 3
    assert features["reused_cache"] == fitted_run.manifest["features"]["cache"]
    dirs = RunDir(result.run_uri).read_json("features.json")["dirs"]
    assert dirs == RunDir(fitted_run.run_uri).read_json("features.json")["dirs"]


def test_assign_new_items_via_cli(fitted_run, bad_archive, tux_items, tmp_path, capsys):
    import numpy as np

    labels = np.array(tux_items.labels)
    # Items the run never saw (it had the first 20 of each class), plus copies of items it did
    # see under new ids: a copy must land in its original's cluster.
    unseen = [i for c in ("animals", "food", "town") for i in np.flatnonzero(labels == c)[20:25]]
    seen = [int(np.flatnonzero(labels == c)[k]) for c in ("animals", "food", "town") for k in (10, 15)]
    rows = unseen + seen
    ids = [f"new/{tux_items.ids[i]}" for i in rows]
    table = pa.table({"id": ids, "image": [tux_items.images[i] for i in rows],
                      "caption": [tux_items.captions[i] for i in rows], "label": [labels[i] for i in rows]},
                     schema=SCHEMA)
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "new.parquet")
    code = main(["assign", "--model", fitted_run.run_uri, "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out"), "--run-name", "new"])
    assert code == 0 and "assignments:" in capsys.readouterr().out
    assigned = RunDir(str(tmp_path / "out" / "new")).read_table("assignments")
    cluster = dict(zip(assigned.column("id").to_pylist(), assigned.column("cluster").to_pylist()))
    assert sorted(cluster) == sorted(ids)
    features = RunDir(str(tmp_path / "out" / "new")).read_json("manifest.json")["features"]
    assert features["files_extracted"] == 1 and "files_reused" not in features  # a file the run never saw
    base = RunDir(fitted_run.run_uri).read_table("assignments")
    base_cluster = dict(zip(base.column("id").to_pylist(), base.column("cluster").to_pylist()))
    for i in seen:
        assert cluster[f"new/{tux_items.ids[i]}"] == base_cluster[tux_items.ids[i]]


def test_assign_needs_a_finished_run(tmp_path):
    from raymmc.io.storage import StorageError

    with pytest.raises(StorageError, match="manifest.json does not exist"):
        assign(str(tmp_path / "nope"), str(tmp_path), str(tmp_path))
