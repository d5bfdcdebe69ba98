"""A real two-node Ray cluster on this machine (`ray start --head`, then a second `ray start --address` with
its own custom resource), and `raymmc run` submitted to it as a user would (RAY_ADDRESS): extraction,
k-means and prediction run on both nodes, and the clustering equals a single-node run's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sklearn.metrics import normalized_mutual_info_score

from conftest import CLUSTER_MARKER, _free_port, by_id, stop_cluster

from raymmc.cli import main
from raymmc.io.rundir import RunDir

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))
RAYMMC = str(Path(sys.executable).with_name("raymmc"))


@pytest.fixture()
def two_nodes():
    """Head and worker node, 3 logical CPUs each (a 2-CPU encoder, Train worker or predictor per node,
    plus room for the light tasks), in their own temp dir so that stopping them leaves any other Ray
    cluster on the machine (the suite's ray_session) alone."""
    # Short, as test_jobs' cluster: Ray refuses a Unix socket path over 107 bytes, and under pytest-xdist's base
    # temp (/tmp/pytest-of-root/pytest-4/popen-gw0/ray20) the second node's
    # <temp dir>/session_<date>_<pid>/sockets/plasma_store.1 is 107 bytes with a 4-digit pid, 108 with a 5-digit one.
    temp_dir = tempfile.mkdtemp(prefix="ray2-", dir="/tmp")
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", CLUSTER_MARKER: temp_dir}
    common = ["--num-cpus", "3", "--temp-dir", temp_dir, "--disable-usage-stats"]
    try:
        _ray_start(["--head", "--port", str(port), "--include-dashboard=false", *common], env)
        _ray_start(["--address", f"127.0.0.1:{port}", "--resources", json.dumps({"second_node": 1}), *common], env)
        yield {"address": f"127.0.0.1:{port}", "env": env}
    finally:
        stop_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_start(args: list[str], env: dict) -> None:
    proc = subprocess.run([RAY, "start", "--node-ip-address", "127.0.0.1", *args], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr)[-4000:]
        pytest.fail(f"`ray start {' '.join(args)}` exited with {proc.returncode}:\n{output}")


def _run(args: list[str], env: dict) -> None:
    proc = subprocess.run([RAYMMC, "run", *args], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_a_run_uses_both_nodes_and_matches_a_single_node_run(two_nodes, bad_archive, tmp_path, ray_session):
    # one feature cache: the single-node run clusters the features the two-node run extracted
    common = ["--input", bad_archive["uri"], "--clusters", "3", "--set", "report=false",
              "--set", "extract.text.model=tfidf", "--set", f"extract.cache={tmp_path / 'cache'}"]
    # Ray Data hands blocks to the actors that are ready: without waiting for both encoder actors to load their
    # model, a fast first one could take every block of this small archive (seen once in four suite runs).
    env = {**two_nodes["env"], "RAY_ADDRESS": two_nodes["address"], "RAYMMC_PROGRESS": "0",
           "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"}
    _run([*common, "--output", str(tmp_path / "multi"), "--run-name", "r", "--workers", "2",
          "--set", "cluster.train.cpus_per_worker=2", "--set", "extract.min_actors=2",
          "--set", "extract.cpus_per_actor=2",
          # 15 blocks of 4 rows queue up while the two encoder actors load their models, more than the 4 in
          # flight Ray Data gives the actor beside them: the other node's actor encodes too
          "--set", "extract.decode_batch_size=4"], env)
    # the single-node reference on this test worker's own one-node session (in-process: no second Ray start)
    assert main(["run", *common, "--output", str(tmp_path / "single"), "--run-name", "r"]) == 0

    multi = RunDir(str(tmp_path / "multi" / "r"))
    manifest = multi.read_json("manifest.json")
    nodes, stages = set(manifest["ray_nodes"]), manifest["nodes"]
    assert len(nodes) == 2
    for stage in ("extract", "cluster", "predict"):
        assert set(stages[stage]) == nodes, (stage, stages)  # every stage ran on both nodes
    assert manifest["train"]["workers"] == 2
    counts = manifest["counts"]
    assert counts["read"] == counts["assigned"] + counts["rejected"] == bad_archive["n_rows"]

    one = by_id(RunDir(str(tmp_path / "single" / "r")).read_table("assignments"))
    two = by_id(multi.read_table("assignments"))
    assert sorted(one) == sorted(two)
    ids = sorted(one)
    assert normalized_mutual_info_score([one[i] for i in ids], [two[i] for i in ids]) >= 0.99
