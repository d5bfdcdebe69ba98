"""`raymmc run` end to end on a real local Ray cluster, on real (tuxpaint) data with every kind
of bad input mixed in (the same archive from an S3-compatible server: test_s3_e2e.py)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymmc.cli import main
from raymmc.config import load_config
from raymmc.io.rundir import RunDir
from raymmc.pipeline import run

pytestmark = pytest.mark.slow


def check_accounting(rundir: RunDir, archive: dict) -> tuple[pa.Table, pa.Table]:
    assignments, rejects = rundir.read_table("assignments"), rundir.read_table("rejects")
    assigned = assignments.column("id").to_pylist()
    assert len(assigned) == len(set(assigned)), "an id was assigned twice"
    rejected = rejects.column("id").to_pylist()
    # Every input id is accounted for: assigned, or rejected with a reason.
    assert set(assigned) | {r for r in rejected if r is not None} == set(archive["ids"])
    assert len(assigned) + len(rejected) == archive["n_rows"]
    reasons = {(r["id"], r["reason"]) for r in rejects.to_pylist()}
    assert (archive["rejected_id"], "image: undecodable (not one of the formats JPEG, PNG, WEBP, GIF, BMP, TIFF, ICO); "
            "caption: empty") in reasons
    dup = [r for r in rejects.to_pylist() if r["id"] == archive["duplicate"]]
    assert len(dup) == 1 and dup[0]["reason"].startswith("duplicate id: first seen in")
    assert dup[0]["source"].endswith("part-00002.parquet")
    assert [r["reason"] for r in rejects.to_pylist() if r["id"] is None] == ["missing id"]
    rows = {r["id"]: r for r in assignments.to_pylist()}
    for i in archive["text_only"]:
        assert not rows[i]["has_image"] and rows[i]["has_text"] and rows[i]["note"].startswith("image:")
    for i in archive["image_only"]:
        assert rows[i]["has_image"] and not rows[i]["has_text"]
    assert rows[archive["image_only"][1]]["note"] == "caption: empty"
    assert all(0 < c <= 1 for c in assignments.column("confidence").to_pylist())
    return assignments, rejects


def test_run_local_with_bad_input(ray_session, bad_archive, feature_cache, tmp_path):
    cfg = load_config(values={"input": bad_archive["uri"], "output": str(tmp_path), "run_name": "r1",
                              "cluster": {"clusters": 3}, "extract": {"cache": feature_cache}})
    result = run(cfg)
    rundir = RunDir(result.run_uri)
    assignments, rejects = check_accounting(rundir, bad_archive)

    manifest = rundir.read_json("manifest.json")
    counts = manifest["counts"]
    assert counts["read"] == bad_archive["n_rows"] == counts["assigned"] + counts["rejected"]
    assert counts["duplicates"] == 1 and counts["missing_id"] == 1 and counts["empty_files"] == 1
    assert counts["image_dropped"] == 4 and counts["caption_dropped"] == 2
    assert manifest["seed"] == 0 and manifest["config"]["cluster"]["clusters"] == 3
    assert len(manifest["inputs"]["files"]) == 4 and all(f["size"] > 0 for f in manifest["inputs"]["files"])
    assert {"ray", "torch", "faiss-cpu"} <= set(manifest["versions"])
    assert manifest["encoders"]["image"]["model"] == "mobilenet_v2"
    assert set(manifest["stage_seconds"]) >= {"extract", "cluster"}

    metrics = rundir.read_json("metrics.json")
    assert sum(metrics["cluster_sizes"].values()) == assignments.num_rows
    assert metrics["n_labeled"] == assignments.num_rows
    # Three real classes: far above chance (random assignments: NMI ~0.03, ACC ~0.40).
    assert metrics["nmi"] > 0.3 and metrics["acc"] > 0.45

    # The report: one card per non-empty cluster, images embedded, the summary figure beside it.
    page = rundir.read_bytes("report/index.html").decode()
    for c, size in metrics["cluster_sizes"].items():
        assert f'data-cluster="{c}" data-size="{size}"' in page
    assert page.count("data:image/") >= 10 and "http://" not in page and "https://" not in page
    assert rundir.read_bytes("report/summary.png").startswith(b"\x89PNG")
    # clusters.parquet, from the same bounded summary the workers merged: one row per cluster.
    clusters = pq.read_table(rundir.path("clusters.parquet")).to_pylist()
    assert {c["cluster"]: c["size"] for c in clusters} == {int(c): n for c, n in metrics["cluster_sizes"].items()}
    assigned = {r["id"]: r for r in assignments.to_pylist()}
    for c in clusters:
        reps = [assigned[i] for i in c["representative_ids"]]
        assert reps and all(r["cluster"] == c["cluster"] for r in reps)
        assert [r["confidence"] for r in reps] == sorted((r["confidence"] for r in reps), reverse=True)
        members = [r["confidence"] for r in assigned.values() if r["cluster"] == c["cluster"]]
        assert reps[0]["confidence"] == max(members)
        assert c["mean_confidence"] == pytest.approx(sum(members) / len(members), rel=1e-5)
        assert c["top_terms"] and c["majority_label"] is not None


def test_cli_run(ray_session, bad_archive, tmp_path, capsys):
    code = main(["run", "--input", bad_archive["uri"], "--output", str(tmp_path), "--run-name", "cli",
                 "--clusters", "3", "--seed", "7", "--set", "extract.text.model=none",
                 "--set", "cluster.kmeans.view=image"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"run directory: {tmp_path}/cli" in out and "nmi=" in out
    manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["encoders"]["text"] == {}
    # Without text, the items that only had a caption are rejected, with the reason.
    rejects = pq.read_table(tmp_path / "cli" / "rejects").to_pylist()
    assert {r["id"] for r in rejects} >= set(bad_archive["text_only"])


def test_cli_reports_config_errors(capsys):
    assert main(["run", "--set", "cluster.bogus=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
