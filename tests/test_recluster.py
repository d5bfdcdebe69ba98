"""Re-clustering a grown archive (`raymmc recluster`): stable cluster ids, the drift report, the overlap of two
runs on Ray workers, and end to end on the real demo archive grown from 3 of its 4 files to all 4."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import by_id

from raymmc.cluster.assignment import stable_cluster_ids
from raymmc.report.drift import drift_report


# ------------------------------------------------------------------------------------ stable ids (pure)
def test_matched_clusters_keep_their_ids_and_new_ones_get_never_used_ids():
    # previous ids 3, 5, 9 (lineage next id 12); the new model's cluster 0 is old 5, 1 is old 9, 2 is new
    overlap = np.array([[0, 1, 0], [40, 0, 2], [1, 30, 0]])
    ids, nxt = stable_cluster_ids(overlap, np.array([3, 5, 9]), next_id=12)
    assert ids.tolist() == [5, 9, 12] and nxt == 13
    # a pairing the Hungarian algorithm would force on clusters that share nothing is not a match
    ids, nxt = stable_cluster_ids(np.array([[0, 7], [0, 0]]), np.array([0, 1]), next_id=2)
    assert ids.tolist() == [2, 0] and nxt == 3
    # more previous clusters than new ones: the unmatched previous ids simply vanish
    ids, _ = stable_cluster_ids(np.array([[5], [9], [1]]), np.array([0, 1, 2]), next_id=3)
    assert ids.tolist() == [1]
    with pytest.raises(ValueError, match="next_id"):
        stable_cluster_ids(np.ones((2, 2)), np.array([0, 4]), next_id=4)


def test_the_drift_report_counts_moves_births_deaths_splits_and_merges():
    # previous 0 -> current 0 (stays) and 1 (split); previous 1 and 2 -> current 2 (merge); previous 3 vanishes
    prev_ids, cur_ids = np.array([0, 1, 2, 3]), np.array([0, 1, 2, 7])
    overlap = np.array([[50, 40, 0, 0],
                        [0, 0, 30, 0],
                        [0, 0, 25, 1],
                        [0, 0, 0, 0]])
    prev_sizes, cur_sizes = {0: 95, 1: 30, 2: 26, 3: 4}, {0: 60, 1: 40, 2: 55, 7: 9}
    d = drift_report(overlap, prev_ids, cur_ids, prev_sizes, cur_sizes, examples=[{"id": "a"}] * 30)
    assert d["items"] == {"previous": 155, "current": 164, "kept": 146, "added": 18, "removed": 9}
    assert d["moved"]["count"] == 146 - 50 - 25 and d["moved"]["share"] == pytest.approx(71 / 146, abs=1e-6)
    assert len(d["moved"]["examples"]) == 20
    assert d["clusters_born"] == [7] and d["clusters_vanished"] == [3]
    assert d["split"] == [{"cluster": 0, "into": [0, 1], "items": [50, 40]}]
    assert d["merged"] == [{"cluster": 2, "from": [1, 2], "items": [30, 25]}]
    c7 = next(c for c in d["clusters"] if c["cluster"] == 7)
    assert c7 == {"cluster": 7, "previous_size": 0, "size": 9, "change": 9, "new_items": 8, "new_share": round(8 / 9, 6)}
    json.dumps(d)  # plain JSON types


# ------------------------------------------------------------------------------------ warm starts (in process)
def _blobs(n: int, seed: int, k: int = 4):
    from raymmc.cluster.base import MultiViewData

    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centers_i, centers_t = np.random.default_rng(99).normal(size=(2, k, 16)) * 3
    image = (centers_i[y] + rng.normal(size=(n, 16))).astype(np.float32)
    text = (centers_t[y] + rng.normal(size=(n, 16))).astype(np.float32)
    return MultiViewData(image=image, text=text, ids=np.array([f"{seed}-{i}" for i in range(n)], dtype=object))


def _grown():
    from raymmc.cluster.base import MultiViewData

    old, new = _blobs(120, 0), _blobs(40, 1)
    return old, MultiViewData(image=np.vstack([old.image, new.image]), text=np.vstack([old.text, new.text]),
                              ids=np.concatenate([old.ids, new.ids]))


def test_kmeans_warm_starts_from_the_previous_centroids(one_torch_thread):
    from raymmc.cluster.registry import make_clusterer

    old, grown = _grown()
    first = make_clusterer("kmeans", 4, {"nredo": 2}, seed=0).fit(old)
    again = make_clusterer("kmeans", 4, {"nredo": 2}, seed=5)
    again.warm_start = first.state_dict()
    again.fit(old)  # from converged centroids on the same items: the same clustering, whatever the seed
    assert again.history_[0]["warm_start"] and (again.labels_ == first.labels_).all()
    grown_fit = make_clusterer("kmeans", 4, {"nredo": 2}, seed=0)
    grown_fit.warm_start = first.state_dict()
    assert (grown_fit.fit(grown).labels_[:120] == first.labels_).mean() >= 0.95
    other = make_clusterer("kmeans", 5, {"nredo": 2}, seed=0)
    other.warm_start = first.state_dict()
    with pytest.raises(ValueError, match="cannot come from a 'kmeans' model with 4 clusters"):
        other.fit(old)


@pytest.mark.parametrize("name", ["jecl", "dec"])
def test_self_training_warm_starts_from_the_previous_network(name, one_torch_thread):
    from raymmc.cluster.registry import make_clusterer

    ae = {"hidden": [16], "latent": 4, "epochs": 10, "batch_size": 32}
    cfg = {"init": {"nredo": 2}, "cluster": {"batch_size": 32, "max_iter": 120}, "device": "cpu",
           **({"image_ae": ae, "text_ae": ae} if name == "jecl" else {"ae": ae, "view": "concat"})}
    old, grown = _grown()
    first = make_clusterer(name, 4, cfg, seed=0).fit(old)
    # no step: the warm-started model is the previous one, exactly
    start = make_clusterer(name, 4, {**cfg, "cluster": {**cfg["cluster"], "max_iter": 0}}, seed=0)
    start.warm_start = first.state_dict()
    np.testing.assert_array_equal(start.fit(grown).labels_, first.predict(grown))
    warm = make_clusterer(name, 4, cfg, seed=0)
    warm.warm_start = first.state_dict()
    warm.fit(grown)
    phases = [h["phase"] for h in warm.history_]
    assert phases[0] == "warm_start" and "pretrain" not in phases  # no pretraining, no k-means start
    # 120 more steps on 160 items move some boundary items, not the numbering (a cold fit: ~1/4 by chance)
    assert (warm.labels_[:120] == first.labels_).mean() >= 0.8
    wrong = make_clusterer("dec" if name == "jecl" else "jecl", 4, seed=0)
    with pytest.raises(ValueError, match="cannot come from"):
        wrong._check_warm_start(first.state_dict())


def test_dm2c_warm_starts_from_the_previous_networks_and_centroids(one_torch_thread):
    from raymmc.cluster.protocols import mixed_modal
    from raymmc.cluster.registry import make_clusterer

    cfg = {"image_hidden": [16], "text_hidden": [16], "latent_dim": 8, "mapping_hidden": [16], "critic_hidden": [8],
           "batch_size": 32, "pretrain_epochs": 10, "adv_epochs": 10, "kmeans_nredo": 2, "device": "cpu"}
    old, grown = (mixed_modal(d, seed=0) for d in _grown())
    first = make_clusterer("dm2c", 4, cfg, seed=0).fit(old)
    start = make_clusterer("dm2c", 4, {**cfg, "adv_epochs": 0}, seed=0)
    start.warm_start = first.state_dict()
    start.fit(old)  # no adversarial step on the same items: the previous model (Lloyd stays at its centroids)
    np.testing.assert_array_equal(start.labels_, first.predict(old))
    assert start.target_ == first.target_ and [h["phase"] for h in start.history_][:1] == ["warm_start"]
    warm = make_clusterer("dm2c", 4, cfg, seed=0)
    warm.warm_start = first.state_dict()
    assert "pretrain" not in {h["phase"] for h in warm.fit(grown).history_}
    again = make_clusterer("dm2c", 4, cfg, seed=0)
    again.load_state_dict(warm.state_dict())  # the warm-started model saves and loads like any other
    np.testing.assert_array_equal(again.predict(grown), warm.predict(grown))


def test_a_warm_start_needs_the_same_architecture_and_the_start_mode_says_why():
    from raymmc.cluster.registry import make_clusterer
    from raymmc.config import RunConfig, from_dict
    from raymmc.recluster import start_mode

    old, _ = _grown()
    first = make_clusterer("kmeans", 4, {"nredo": 1}, seed=0).fit(old)
    other_view = make_clusterer("kmeans", 4, {"nredo": 1, "view": "image"}, seed=0)
    other_view.warm_start = first.state_dict()
    with pytest.raises(ValueError, match="architecture"):
        other_view.fit(old)

    def cfg(**cluster):
        return from_dict(RunConfig, {"cluster": {"algorithm": "jecl", "clusters": 5, **cluster}})

    assert start_mode(cfg(), cfg(), unchanged=True, warm=True)[0] == "reuse"
    assert start_mode(cfg(), cfg(), unchanged=True, warm=False)[0] == "cold"  # --cold wins
    assert start_mode(cfg(), cfg(), unchanged=False, warm=True)[0] == "warm"
    schedule = cfg(params={"jecl": {"cluster": {"max_iter": 10}}})
    assert start_mode(schedule, cfg(), unchanged=False, warm=True)[0] == "warm"  # a schedule is not the model
    shape = cfg(params={"jecl": {"image_ae": {"latent": 16}}})
    assert start_mode(shape, cfg(), unchanged=False, warm=True) == (
        "cold", "the model's architecture or input preparation changed (--set)")
    assert start_mode(cfg(clusters=6), cfg(), unchanged=False, warm=True)[0] == "cold"
    mmdc = from_dict(RunConfig, {"cluster": {"algorithm": "mmdc", "clusters": 5}})
    assert start_mode(mmdc, mmdc, unchanged=False, warm=True)[0] == "warm"

    def mmdc_with(**params):
        return from_dict(RunConfig, {"cluster": {"algorithm": "mmdc", "clusters": 5, "params": {"mmdc": params}}})

    assert start_mode(mmdc_with(flip=True), mmdc, unchanged=False, warm=True)[0] == "warm"  # not the model
    assert start_mode(mmdc_with(rotation=False), mmdc, unchanged=False, warm=True)[0] == "cold"


def test_outliers_are_not_clusters_in_the_drift_report():
    # the outlier id -1 gains and loses items: counted as moves, never born, vanished, split or merged
    overlap = np.array([[40, 30], [10, 5]])  # previous 0, -1 x current 0, -1 (sorted: -1 first below)
    d = drift_report(overlap[::-1, ::-1], np.array([-1, 0]), np.array([-1, 0]), {0: 70, -1: 15}, {0: 50, 5: 3},
                     examples=[])
    assert d["moved"]["count"] == 85 - 40 - 5
    assert d["split"] == [] and d["merged"] == [] and d["clusters_born"] == [5] and d["clusters_vanished"] == []


def test_an_interrupted_reclustering_is_not_resumed_as_a_plain_run(tmp_path):
    from raymmc.config import ConfigError
    from raymmc.io.rundir import RunDir
    from raymmc.pipeline import resume

    run = RunDir(str(tmp_path / "v2")).create()
    run.write_json("config.json", {})
    run.write_json("recluster.json", {"previous_run": "runs/v1", "overrides": [], "warm": True})
    with pytest.raises(ConfigError, match="interrupted re-clustering: run `raymmc recluster --previous runs/v1`"):
        resume(run.uri)


# ------------------------------------------------------------------------------------ overlap on Ray
@pytest.mark.parametrize("rows_per_partition", [10**6, 50])  # one task, and a hash-partitioned groupby
def test_the_overlap_of_two_runs_on_workers_equals_a_crosstab(ray_session, rows_per_partition):
    import ray

    from raymmc.train.overlap import assignment_overlap, cluster_sizes, moved_examples

    rng = np.random.default_rng(0)
    prev = pd.DataFrame({"id": [f"i{k}" for k in range(300)], "cluster": rng.integers(0, 4, 300)})
    cur = pd.DataFrame({"id": [f"i{k}" for k in range(100, 420)], "cluster": rng.integers(-1, 5, 320)})
    ov = assignment_overlap(ray.data.from_pandas(prev).repartition(3), ray.data.from_pandas(cur).repartition(4),
                            n_rows=620, rows_per_partition=rows_per_partition)
    both = prev.merge(cur, on="id", suffixes=("_p", "_c"))
    expected = pd.crosstab(both.cluster_p, both.cluster_c)
    assert ov.previous_ids.tolist() == expected.index.tolist() and ov.current_ids.tolist() == expected.columns.tolist()
    np.testing.assert_array_equal(ov.matrix, expected.to_numpy())
    assert ov.submatrix([0, 9], [-1, 4]).tolist() == [[expected.loc[0, -1], expected.loc[0, 4]], [0, 0]]
    assert cluster_sizes(ray.data.from_pandas(cur)) == cur.cluster.value_counts().to_dict()
    ids = np.arange(5)  # identity renaming: an item moved when its cluster differs
    moved = moved_examples(ov.pairs, ids, limit=7)
    want = both[both.cluster_p != both.cluster_c].sort_values("id").head(7)
    assert moved == [{"id": i, "previous": int(p), "current": int(c)}
                     for i, p, c in zip(want.id, want.cluster_p, want.cluster_c)]


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def grown(tux_items, tmp_path_factory):
    """The demo archive, rows in a seeded random order, in 4 files (~130 items each), and a folder holding the
    first 3 of them (v1): the archive grows by more of the same (docs/recluster.md measures growth by new
    categories too)."""
    from raymmc.datasets.shards import write_shards

    table = tux_items.table()
    table = table.take(np.random.default_rng(0).permutation(table.num_rows))
    full = tmp_path_factory.mktemp("tux4")
    write_shards(table, str(full), 130)
    files = sorted(full.glob("part-*.parquet"))
    assert len(files) == 4
    v1 = tmp_path_factory.mktemp("archive")
    for f in files[:3]:
        shutil.copy2(f, v1)
    return v1, files[3]


CHEAP = ["--set", "report=false", "--set", "extract.decode.image_size=112", "--set", "extract.decode.resize=128"]


def _assignments(run) -> dict:
    from raymmc.io.rundir import RunDir

    return by_id(RunDir(str(run)).read_table("assignments"))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,extra", [
    ("kmeans", ["--set", "extract.text.model=tfidf"]),  # JECL keeps its ids on MiniLM captions, not on TF-IDF
    ("jecl", ["--set", "cluster.params.jecl.image_ae.epochs=10", "--set", "cluster.params.jecl.text_ae.epochs=10",
              "--set", "cluster.params.jecl.cluster.max_iter=150"]),
])
def test_a_grown_archive_is_reclustered_with_stable_ids_and_an_unchanged_one_moves_nothing(
        grown, tmp_path, ray_session, algorithm, extra):
    from raymmc.cli import main
    from raymmc.io.rundir import RunDir

    folder, fourth = grown
    archive = tmp_path / "archive"
    shutil.copytree(folder, archive)  # the same files (mtime kept): the cache knows them
    out = tmp_path / "runs"
    assert main(["run", "--input", str(archive), "--output", str(out), "--run-name", "v1", "--algorithm", algorithm,
                 "--clusters", "8", "--set", f"extract.cache={tmp_path / 'cache'}", *CHEAP, *extra]) == 0
    v1 = _assignments(out / "v1")
    shutil.copy2(fourth, archive)  # the archive grows by a file
    assert main(["recluster", "--previous", str(out / "v1"), "--output", str(out), "--run-name", "v2"]) == 0
    v2_dir = RunDir(str(out / "v2"))
    m2, drift = v2_dir.read_json("manifest.json"), v2_dir.read_json("drift.json")
    v2 = _assignments(out / "v2")
    assert m2["features"]["files_cached"] == 3 and m2["features"]["files_extracted"] == 1  # only the new file
    assert m2["recluster"]["start"] == "warm" and m2["lineage"]["runs"] == [str(out / "v1")]
    assert m2["counts"]["read"] == m2["counts"]["assigned"] + m2["counts"]["rejected"] and len(v2) > len(v1)
    kept = sum(v2[i] == c for i, c in v1.items())
    # cluster ids are stable: most v1 items keep theirs (here k-means keeps over 95%, JECL with its short
    # schedule 94%; a cold start keeps 57-83% on stamps-icons, docs/recluster.md)
    assert kept >= 0.9 * len(v1)
    assert drift["moved"]["count"] == len(v1) - kept and drift["items"]["added"] == len(v2) - len(v1)
    assert drift["items"]["kept"] == len(v1) and drift["moved"]["examples"] == sorted(
        [{"id": i, "previous": c, "current": v2[i]} for i, c in v1.items() if v2[i] != c], key=lambda e: e["id"])[:20]
    ids = set(v2.values())
    assert set(m2["lineage"]["cluster_ids"]) == ids and m2["lineage"]["next_cluster_id"] > max(ids)
    if algorithm == "kmeans":  # `raymmc assign` with a re-clustered model writes the lineage's ids
        assert main(["assign", "--model", str(out / "v2"), "--input", str(archive), "--output", str(out),
                     "--run-name", "again"]) == 0
        assert _assignments(out / "again") == v2
    if algorithm != "kmeans":  # an unchanged archive reuses the model, whichever it is: checked once, below
        return

    # unchanged: nothing extracted, nothing moved
    assert main(["recluster", "--previous", str(out / "v2"), "--output", str(out), "--run-name", "v3"]) == 0
    m3 = RunDir(str(out / "v3")).read_json("manifest.json")
    assert m3["features"]["files_extracted"] == 0 and m3["recluster"]["start"] == "reuse"
    assert _assignments(out / "v3") == v2
    assert RunDir(str(out / "v3")).read_json("drift.json")["moved"]["count"] == 0
    assert m3["lineage"]["runs"] == [str(out / "v1"), str(out / "v2")]
